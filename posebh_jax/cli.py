"""What the four command-line tools share: help that exits 0, one-line flag errors, logging.

Each CLI module (`main_train`, `main_eval`, `main_infer`, `main_convert`) defines its flags at
module level and only holds `main`; the work is done by library modules that tests and notebooks
import. Import at most one CLI module per process (their flag names overlap by design).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

from absl import app, flags

_HELP = ("-h", "--help", "-help", "--helpshort", "-?")


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


def no_positional_args(argv: Sequence[str]) -> None:
  """Every option is a --flag; a stray word is almost always a missing `--`."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])} (every option is --name=value)")


def _own_flags_help(defining_flag: str) -> str:
  """The help of the flags defined by the module that defined `defining_flag` (the CLI's own)."""
  module = flags.FLAGS.find_module_defining_flag(defining_flag)
  return flags.FLAGS.module_help(module) if module else ""


def _print_help(doc: str, prog: str, full: bool) -> None:
  text = flags.FLAGS.get_help() if full else _own_flags_help("config")
  try:
    print(f"{doc.strip()}\n\nFlags:\n{text}\n")
    if not full:
      print(f"{prog} --helpfull lists the library flags too (absl, JAX).")
  except BrokenPipeError:  # `--help | head`: the reader has what it wanted.
    pass


def _parse_flags(prog: str) -> Callable[[list[str]], list[str]]:
  """absl's flag parser with one-line errors: a misspelt `--config.train.num_step=5` or a
  value of the wrong type names the flag and exits 2, before anything is loaded."""
  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      sys.exit(f"{prog}: {e}\n{prog} --help lists the flags.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      # ml_collections' config overrides raise these for unknown fields and bad values.
      inner = e
      while inner.args and isinstance(inner.args[0], BaseException):  # KeyError in AttributeError.
        inner = inner.args[0]
      text = inner.args[0] if inner.args and isinstance(inner.args[0], str) else str(inner)
      message = " ".join(text.replace("\\'", "'").split())
      if isinstance(inner, (KeyError, AttributeError)):
        message = f"no such field {message}"
      overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
      named = [a for a in overrides if any(part and part in message
                                           for part in a.split(".")[1:])]
      where = f" {' '.join(named or overrides)}" if overrides else ""
      sys.exit(f"{prog}: bad config override{where}: {message}")
  return parse


def run(main: Callable[[list[str]], None], doc: str, prog: str) -> None:
  """Runs a CLI's `main` under absl: `--help` prints `doc` and the CLI's own flags and exits 0
  (absl's own exits 1), `--helpfull` adds every library flag."""
  args = sys.argv[1:]
  if any(a in _HELP for a in args) or "--helpfull" in args:
    _print_help(doc, prog, full="--helpfull" in args)
    sys.exit(0)

  def logged_main(argv: list[str]) -> None:
    setup_logging()  # After absl's own logging set-up in app.run.
    main(argv)

  app.run(logged_main, flags_parser=_parse_flags(prog))
