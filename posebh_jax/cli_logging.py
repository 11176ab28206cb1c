"""Logging set-up shared by the command-line tools (no flags defined here)."""

from __future__ import annotations

import logging


def setup_logging() -> None:
  """Our progress at INFO on stderr; libraries (orbax, grain, absl) only at WARNING."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  log = logging.getLogger("posebh")
  if not log.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False
