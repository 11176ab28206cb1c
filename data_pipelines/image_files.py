"""Image files for the readers and the TFDS builders: existence / decode checks, bytes, decoding.

Every image is read the same way: its bytes through `storage.read_bytes` (local files with plain
Python, so names that are not valid UTF-8 work; URLs such as gs:// through `etils.epath`), then
decoded from memory by `decode_bgr` (`cv2.imdecode`). One path means one result: a TFDS build
(which stores the bytes), training, evaluation and inference agree on every file, truncated JPEGs
included (an error everywhere; `cv2.imread` would silently fill them grey).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import PIL.Image

from data_pipelines import storage


class ImageError(IOError):
  """An image that is missing, cannot be read or decoded, or is not the size its annotation says;
  the message names the file (and the record, where there is one)."""


class ImageDecodeError(ImageError):
  """Image bytes that do not decode (corrupt, truncated or empty); the message names the record."""


class ImageSizeError(ImageError):
  """A decoded image whose size differs from the width/height in its annotation file."""


def read_bytes(path: str) -> bytes:
  """The file's bytes exactly as stored (no re-encoding); local paths or URLs (gs://)."""
  return storage.read_bytes(path)


def decode_bgr(data: bytes) -> np.ndarray | None:
  """THE decoder of every image path (training, TFDS builds, evaluation, inference).

  Encoded bytes → BGR uint8 [H, W, 3], or None if they do not decode. Unlike `cv2.imread`,
  `cv2.imdecode` rejects a truncated JPEG (imread fills the missing part grey and only warns
  on stderr), so a truncated file is an error wherever it is met.
  """
  if not len(data):
    return None
  return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def decode_rgb(data: bytes) -> np.ndarray | None:
  """Encoded image bytes → RGB uint8 [H, W, 3], or None if they do not decode."""
  image = decode_bgr(data)
  return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def describe_record(record: Mapping[str, Any]) -> str:
  return (f"dataset {record.get('dataset_index', '?')}, image_id {record.get('image_id', '?')}, "
          f"ann_id {record.get('ann_id', '?')}")


def load_record_bgr(record: Mapping[str, Any]) -> np.ndarray:
  """A record's image as BGR uint8 [H, W, 3]: its `image_bytes` if present, else the bytes of
  its `image_path` (local or URL), through `decode_bgr`.

  If the record carries the annotation's size (`image_wh`, (W, H)), the decoded image must have
  it: a 1×1 file recorded as 640×425 would otherwise be cropped into a blank sample.

  Raises:
    ImageError: no image, unreadable file (missing, permissions), undecodable bytes
      (`ImageDecodeError`), or a size other than the annotation's (`ImageSizeError`); the
      message names the file and the record.
  """
  path = record.get("image_path")
  shown = storage.display(path) if path is not None else "<no path>"
  if "image_bytes" in record:
    data = record["image_bytes"]
    if isinstance(data, np.ndarray) and data.dtype != np.uint8:
      data = data.item()  # A 0-d object/bytes array, as data sources may return.
    what = "the stored bytes of image"
  elif path is not None:
    try:
      data = read_bytes(path)
    except OSError as e:
      raise ImageError(f"cannot read image {shown} ({describe_record(record)}): "
                       f"{e.strerror or type(e).__name__}") from None
    what = "image"
  else:
    raise ImageError(f"record without image_path or image_bytes ({describe_record(record)})")
  image = decode_bgr(data)
  if image is None:
    raise ImageDecodeError(f"cannot decode {what} {shown} ({describe_record(record)}): corrupt, "
                           f"truncated or empty ({len(data)} bytes)")
  want = record.get("image_wh")
  if want is not None and min(int(v) for v in want) > 0:  # (0, 0): size unknown.
    have = (image.shape[1], image.shape[0])
    if tuple(int(v) for v in want) != have:
      raise ImageSizeError(
          f"image {shown} ({describe_record(record)}) is {have[0]}x{have[1]} pixels but its "
          f"annotation says {int(want[0])}x{int(want[1])}")
  return image


def decode_record_image(record: Mapping[str, Any]) -> np.ndarray:
  """A TFDS-read record's image (`record["image_bytes"]`) as RGB uint8 [H, W, 3].

  The counterpart of `pipeline.load_image` for records that carry their encoded image instead of
  only a path; the result is identical to decoding the original file (same decoder).

  Raises:
    ImageDecodeError: naming the record's image, dataset, image_id and ann_id.
  """
  if "image_bytes" not in record:
    raise ImageError(f"record without image_bytes ({describe_record(record)})")
  return cv2.cvtColor(load_record_bgr(record), cv2.COLOR_BGR2RGB)


@dataclasses.dataclass(frozen=True)
class ImageStatus:
  """What a check found: a skip reason (None = usable) and, if it was read, the size (W, H)."""

  problem: str | None
  size_wh: tuple[int, int] | None = None


class ImageChecker:
  """Checks each image path once (several instances share an image) and remembers the result.

  Without `decode`, a file counts as usable if it exists; with `decode`, only if it decodes
  (`decode_bgr`, slow: a full decode per image) and, where the annotation gives a size, has it.
  `need_size` reads the size from the header (PIL, cheap) for readers whose annotations lack it
  (MPII).
  """

  MISSING = "missing image file"
  CORRUPT = "corrupt image"
  WRONG_SIZE = "image size differs from annotation"

  def __init__(self, decode: bool = False):
    self.decode = decode
    self._seen: dict[str, ImageStatus] = {}

  def __call__(self, path: str, need_size: bool = False,
               expected_wh: tuple[float, float] | None = None) -> ImageStatus:
    """The path's status; with `decode` and `expected_wh` (W, H), a decoded image of another
    size is a problem (`WRONG_SIZE`)."""
    status = self._seen.get(path)
    if status is None or (need_size and status.problem is None and status.size_wh is None):
      status = self._inspect(path, need_size)
      self._seen[path] = status
    if (status.problem is None and expected_wh is not None and status.size_wh is not None
        and tuple(int(v) for v in expected_wh) != tuple(status.size_wh)):
      return ImageStatus(self.WRONG_SIZE, status.size_wh)
    return status

  def _inspect(self, path: str, need_size: bool) -> ImageStatus:
    if not storage.is_file(path):
      return ImageStatus(self.MISSING)
    if self.decode:
      try:
        image = decode_bgr(read_bytes(path))
      except OSError:
        image = None
      if image is None:
        return ImageStatus(self.CORRUPT)
      return ImageStatus(None, (image.shape[1], image.shape[0]))
    if need_size:
      try:
        return ImageStatus(None, tuple(PIL.Image.open(io.BytesIO(read_bytes(path))).size))
      except (OSError, SyntaxError, ValueError):  # PIL's "cannot identify image file" etc.
        return ImageStatus(self.CORRUPT)
    return ImageStatus(None)
