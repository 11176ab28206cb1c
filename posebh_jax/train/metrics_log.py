"""`train_metrics.jsonl`: JSON lines appended during training, on local disks and object stores.

Opening a gs:// object in append mode silently replaces it (objects are immutable: every upload
is a whole new object), so appending there means reading what is stored and writing it back with
the new lines. That costs one read and one upload of the whole file per log step; at one line
per `train.log_every` steps the file stays small (100k lines ≈ 30 MB). Locally the lines are
appended and flushed as usual.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from data_pipelines import storage

log = logging.getLogger("posebh")


def append_lines(path: str, lines: Iterable[str]) -> None:
  """Appends text lines (without their newline) to `path`, local or gs://, keeping every line
  already there.

  On an object store the new content is uploaded as one object, so a reader sees the old or the
  new file, never a torn one; a process killed before the upload loses only these lines.
  """
  text = "".join(line.rstrip("\n") + "\n" for line in lines)
  if not text:
    return
  if not storage.is_remote(path):
    with open(path, "a") as f:
      f.write(text)
      f.flush()
    return
  old = storage.read_bytes(path) if storage.exists(path) else b""
  if old and not old.endswith(b"\n"):
    old += b"\n"
  storage.write_bytes(path, old + text.encode())


def append_records(path: str, records: Iterable[Mapping[str, Any]]) -> None:
  """`append_lines` of one compact JSON object per record."""
  append_lines(path, [json.dumps(dict(r)) for r in records])


def read_records(path: str) -> list[dict[str, Any]]:
  """Every JSON line of `path` (local or gs://), in order; [] if it does not exist."""
  if not storage.exists(path):
    return []
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]



def _logged_step(line: str) -> int | None:
  """The step of a train_metrics.jsonl line; None for a torn or foreign line."""
  try:
    step = json.loads(line).get("step")
  except (ValueError, AttributeError):
    return None
  return step if isinstance(step, int) else None


class TrainMetricsLog:
  """`<workdir>/train_metrics.jsonl`: one JSON line per logged step, each step once.

  A resumed run restarts at its checkpoint, which may be older than the last logged step (kill -9
  during an asynchronous save): the lines after the restored step are dropped when the log is
  opened, and the steps are logged again as they are retrained. Dropping rewrites the whole file
  in one atomic write (`storage.write_bytes`: a temporary file renamed over it locally, one new
  object on gs://), so the log is never half-written.
  """

  def __init__(self, workdir: str, resumed_step: int):
    self.path = storage.join(workdir, "train_metrics.jsonl")
    lines = storage.read_text(self.path).splitlines() if storage.exists(self.path) else []
    keep = [line for line in lines
            if (s := _logged_step(line)) is not None and s <= resumed_step]
    if len(keep) != len(lines):
      storage.write_bytes(self.path, "".join(line + "\n" for line in keep).encode())
      log.info("train_metrics.jsonl: dropped %d lines after the restored step %d (they are "
               "logged again as the steps are retrained)", len(lines) - len(keep), resumed_step)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    append_records(self.path, [dict(step=step, **metrics)])
