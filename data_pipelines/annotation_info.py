"""How many keypoints an annotation file holds, found cheaply (config-time checks, TFDS builds).

A 14-keypoint file read with a 17-keypoint skeleton should fail when the config is checked, not
when the final evaluation runs. Small files are parsed; for large ones (COCO's training file is
~240 MB) only the first and last few MB are scanned: COCO-format files put `categories` (with
its keypoint names) at one end and every annotation's flat `keypoints` list early.
"""

from __future__ import annotations

import json
import re
from typing import Any

from etils import epath

_PARSE_LIMIT = 32 << 20  # Parse files up to this size whole.
_SCAN_BYTES = 4 << 20  # Otherwise scan this much at each end.

_NAMES_RE = re.compile(r'"keypoints"\s*:\s*\[\s*((?:"[^"]*"\s*,?\s*)+)\]')
_VALUES_RE = re.compile(r'"keypoints"\s*:\s*\[([-+0-9.eE,\s]+)\]')


def _count_from_json(doc: Any, fmt: str) -> int | None:
  if fmt == "mpii":
    if isinstance(doc, list) and doc and isinstance(doc[0], dict) and "joints" in doc[0]:
      return len(doc[0]["joints"])
    return None
  if not isinstance(doc, dict):
    return None
  for cat in doc.get("categories") or ():
    if isinstance(cat, dict) and cat.get("keypoints"):
      return len(cat["keypoints"])
  for ann in doc.get("annotations") or ():
    if isinstance(ann, dict) and isinstance(ann.get("keypoints"), list):
      return len(ann["keypoints"]) // 3
  return None


def _count_from_text(text: str) -> int | None:
  m = _NAMES_RE.search(text)
  if m:
    return len(re.findall(r'"[^"]*"', m.group(1)))
  m = _VALUES_RE.search(text)
  if m:
    return len([v for v in m.group(1).split(",") if v.strip()]) // 3
  return None


def keypoint_count(ann_path: str, fmt: str = "coco") -> int | None:
  """Keypoints per instance in `ann_path` (local or gs://), or None if it cannot tell.

  COCO formats: the first category's `keypoints` names, else the first annotation's flat list
  / 3. MPII (JSON list): the first entry's `joints`. COCO-WholeBody: None (its categories list the
  17 body keypoints; the 133 are fixed by the format).

  Raises:
    OSError: the file cannot be read.
  """
  if fmt == "coco_wholebody":
    return None
  path = epath.Path(ann_path)
  st = path.stat()
  size = getattr(st, "length", getattr(st, "st_size", None))
  if size is None or size <= _PARSE_LIMIT or fmt == "mpii":
    try:
      return _count_from_json(json.loads(path.read_bytes()), fmt)
    except ValueError:
      return None  # Not JSON: the reader names the problem when it reads the file.
  with path.open("rb") as f:
    head = f.read(_SCAN_BYTES).decode("utf-8", "replace")
    f.seek(max(0, size - _SCAN_BYTES))
    tail = f.read().decode("utf-8", "replace")
  # Names (categories) first, wherever they are; then the first annotation's values.
  for text in (tail, head):
    m = _NAMES_RE.search(text)
    if m:
      return len(re.findall(r'"[^"]*"', m.group(1)))
  return _count_from_text(head)
