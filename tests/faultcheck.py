"""Fault tests' witness: which files outside a job's own outputs changed."""

from __future__ import annotations

import os
from pathlib import Path

_SKIP = {"__pycache__", ".pytest_cache", ".git"}


def snapshot(*roots: str | os.PathLike, exclude: tuple[str | os.PathLike, ...] = ()
             ) -> dict[str, tuple[int, int]]:
  """{path: (size, mtime_ns)} of every file under `roots`, except under `exclude` (the job's own
  outputs) and Python's caches."""
  excluded = tuple(str(Path(e).resolve()) for e in exclude)
  out = {}
  for root in roots:
    for dirpath, dirnames, filenames in os.walk(Path(root).resolve()):
      dirnames[:] = [d for d in dirnames if d not in _SKIP
                     and not os.path.join(dirpath, d).startswith(excluded)]
      for name in filenames:
        path = os.path.join(dirpath, name)
        st = os.stat(path)
        out[path] = (st.st_size, st.st_mtime_ns)
  return out


def changed(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
  """Files added, removed or modified between two snapshots (sorted)."""
  return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
