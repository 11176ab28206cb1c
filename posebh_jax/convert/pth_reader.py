"""Reads `torch.save` zip checkpoints into numpy without torch and without running pickled code.

A `.pth` file (torch >= 1.6) is a zip archive `<name>/data.pkl`, `<name>/data/<key>`, ...: the
pickle describes the object tree and refers to raw tensor storages by key through pickle's
persistent-id mechanism. We unpickle with a whitelist: only the handful of globals a tensor
checkpoint needs resolve, each to our own stand-in (never to torch or to arbitrary code), and
any other global raises `ValueError`. Tensors come back as numpy arrays.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np


class _StorageType:
  """Stand-in for `torch.FloatStorage` & co.: only remembers the element dtype."""

  def __init__(self, name: str, dtype: np.dtype):
    self.name = name
    self.dtype = np.dtype(dtype)

  def __repr__(self) -> str:
    return f"torch.{self.name}"


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def _rebuild_tensor_v2(storage: np.ndarray, storage_offset: int, size: tuple[int, ...],
                       stride: tuple[int, ...], requires_grad: bool = False,
                       backward_hooks: Any = None, metadata: Any = None) -> np.ndarray:
  """Stand-in for `torch._utils._rebuild_tensor_v2`: a strided view of a storage, copied.

  Bounds are checked before `as_strided`, which would otherwise read arbitrary memory when a
  malformed file gives a bad offset/stride.
  """
  del requires_grad, backward_hooks, metadata  # Autograd state and tensor metadata are dropped.
  if not isinstance(storage, np.ndarray):
    raise ValueError(f"tensor storage is a {type(storage).__name__}, expected a storage record")
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  offset = int(storage_offset)
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise ValueError(f"invalid tensor geometry: size {size}, stride {stride}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if offset < 0 or last >= storage.size:
    raise ValueError(f"tensor (offset {offset}, size {size}, stride {stride}) exceeds its "
                     f"storage of {storage.size} elements")
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride],
      writeable=False)
  return np.array(view, copy=True)


def _rebuild_tensor(storage: np.ndarray, storage_offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...]) -> np.ndarray:
  """Stand-in for the older `torch._utils._rebuild_tensor`."""
  return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data: np.ndarray, requires_grad: bool = False,
                       backward_hooks: Any = None) -> np.ndarray:
  """Stand-in for `torch._utils._rebuild_parameter`: a Parameter is just its data here."""
  del requires_grad, backward_hooks
  return data


# (module, name) -> stand-in. Nothing outside this table can be loaded.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only whitelisted globals and reads storages from the zip."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str,
               path: str):
    super().__init__(io.BytesIO(data))
    self._archive = archive
    self._prefix = prefix
    self._byteorder = "<" if byteorder == "little" else ">"
    self._path = path
    self._storages: dict[str, np.ndarray] = {}  # Views of one storage share it (e.g. tied weights).

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise ValueError(
          f"{self._path}: refusing to load forbidden global '{module}.{name}' "
          "(only tensor checkpoints are supported; the file may contain code)") from None

  def persistent_load(self, pid: Any) -> np.ndarray:
    # torch writes ('storage', storage_type, key, location, numel).
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise ValueError(f"{self._path}: unsupported persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid
    key = str(key)
    if key not in self._storages:
      try:
        raw = self._archive.read(f"{self._prefix}data/{key}")
      except KeyError:
        raise ValueError(f"{self._path}: storage data/{key} missing from the archive") from None
      dtype = storage_type.dtype.newbyteorder(self._byteorder)
      if len(raw) < int(numel) * dtype.itemsize:
        raise ValueError(f"{self._path}: storage data/{key} has {len(raw)} bytes, "
                         f"{numel} x {dtype.itemsize} expected")
      arr = np.frombuffer(raw, dtype=dtype, count=int(numel))
      self._storages[key] = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    return self._storages[key]


def load_pth(path: str | Path) -> Any:
  """Loads a `torch.save` zip checkpoint as Python containers of numpy arrays.

  Args:
    path: a `.pth` written by `torch.save` (zip format, torch >= 1.6).

  Returns:
    The saved object with every tensor replaced by a numpy array (e.g. for mmcv checkpoints a
    dict with 'meta', 'state_dict' (an OrderedDict name -> array) and 'optimizer').

  Raises:
    ValueError: the file is not a zip checkpoint, is malformed, or its pickle references a
      global outside the whitelist (e.g. `os.system`); the message names the file and global.
  """
  path = str(path)
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path}: not a zip-format torch checkpoint (legacy format unsupported)")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected exactly one data.pkl in the archive, found {pickles}")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in archive.namelist():
      byteorder = archive.read(f"{prefix}byteorder").decode().strip()
      if byteorder not in ("little", "big"):
        raise ValueError(f"{path}: unknown byteorder {byteorder!r}")
    unpickler = _RestrictedUnpickler(archive.read(pickles[0]), archive, prefix, byteorder, path)
    try:
      return unpickler.load()
    except ValueError:
      raise
    except Exception as e:  # Malformed pickle stream, bad REDUCE arguments, ...
      raise ValueError(f"{path}: cannot unpickle checkpoint: {e!r}") from e
