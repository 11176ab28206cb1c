"""Image files for the readers and the TFDS builders: existence / decode checks, bytes, decoding.

Paths go through `etils.epath` (installed with tfds), so local paths and `gs://` paths work the
same without TensorFlow. Decoding is OpenCV's, from bytes: `cv2.imdecode` and `cv2.imread` share
one decoder, so an image decoded from stored bytes equals the one read from its file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import PIL.Image
from etils import epath


class ImageDecodeError(IOError):
  """Image bytes that do not decode; the message names the record."""


def read_bytes(path: str) -> bytes:
  """The file's bytes exactly as stored (no re-encoding)."""
  return epath.Path(path).read_bytes()


def decode_rgb(data: bytes) -> np.ndarray | None:
  """Encoded image bytes → RGB uint8 [H, W, 3], or None if they do not decode."""
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_record_image(record: Mapping[str, Any]) -> np.ndarray:
  """A TFDS-read record's image (`record["image_bytes"]`) as RGB uint8 [H, W, 3].

  The counterpart of `pipeline.load_image` for records that carry their encoded image instead of
  only a path; the result is identical to decoding the original file (same OpenCV decoder).

  Raises:
    ImageDecodeError: naming the record's image, dataset, image_id and ann_id.
  """
  image = decode_rgb(record["image_bytes"])
  if image is None:
    raise ImageDecodeError(
        f"cannot decode the stored bytes of image {record.get('image_path', '?')} (dataset "
        f"{record.get('dataset_index', '?')}, image_id {record.get('image_id', '?')}, ann_id "
        f"{record.get('ann_id', '?')})")
  return image


@dataclasses.dataclass(frozen=True)
class ImageStatus:
  """What a check found: a skip reason (None = usable) and, if it was read, the size (W, H)."""

  problem: str | None
  size_wh: tuple[int, int] | None = None


class ImageChecker:
  """Checks each image path once (several instances share an image) and remembers the result.

  Without `decode`, a file counts as usable if it exists; with `decode`, only if OpenCV decodes
  it (slow: a full decode per image). `need_size` reads the size from the header (PIL, cheap)
  for readers whose annotations lack it (MPII).
  """

  MISSING = "missing image file"
  CORRUPT = "corrupt image"

  def __init__(self, decode: bool = False):
    self.decode = decode
    self._seen: dict[str, ImageStatus] = {}

  def __call__(self, path: str, need_size: bool = False) -> ImageStatus:
    status = self._seen.get(path)
    if status is None or (need_size and status.problem is None and status.size_wh is None):
      status = self._inspect(path, need_size)
      self._seen[path] = status
    return status

  def _inspect(self, path: str, need_size: bool) -> ImageStatus:
    p = epath.Path(path)
    if not p.is_file():
      return ImageStatus(self.MISSING)
    if self.decode:
      image = decode_rgb(p.read_bytes())
      if image is None:
        return ImageStatus(self.CORRUPT)
      return ImageStatus(None, (image.shape[1], image.shape[0]))
    if need_size:
      try:
        with p.open("rb") as f:
          return ImageStatus(None, tuple(PIL.Image.open(f).size))
      except (OSError, SyntaxError, ValueError):  # PIL's "cannot identify image file" etc.
        return ImageStatus(self.CORRUPT)
    return ImageStatus(None)
