"""Reads `torch.save` zip checkpoints into numpy without torch and without running pickled code.

A `.pth` file (torch >= 1.6) is a zip archive `<name>/data.pkl`, `<name>/data/<key>`, ...: the
pickle describes the object tree and refers to raw tensor storages by key through pickle's
persistent-id mechanism. We unpickle with a whitelist: only the handful of globals a tensor
checkpoint needs resolve, each to our own stand-in (never to torch or to arbitrary code), and
any other global raises `ValueError`. Tensors come back as numpy arrays.

The work is bounded by what the file holds: storage sizes are checked against the archive's
declared entry sizes before anything is decompressed, compressed entries may not expand more than
`_MAX_EXPANSION` times, a tensor may not have more elements than its storage (no stride-0 bombs),
and all tensors together at most `_MAX_VIEWS_PER_STORAGE` times the storage bytes. The stand-ins
are created per load and immutable, so a BUILD opcode in one file cannot change later loads.
Every error names the file.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np


class _Immutable:
  """Base of the stand-ins a pickle can reach: no attribute can be set after construction.

  A pickle's BUILD opcode sets attributes on the object below it on the stack (`__setstate__`,
  `__dict__` or `setattr`). On a stand-in that would change how later tensors, or later loads in
  the same process, are read; here it fails instead. (Stand-ins are also created per load.)
  """

  __slots__ = ()

  def __setattr__(self, name: str, value: Any) -> None:
    raise ValueError(f"cannot set attribute {name!r} on {self!r} (BUILD on a whitelisted global)")

  def __delattr__(self, name: str) -> None:
    raise ValueError(f"cannot delete attribute {name!r} of {self!r}")

  def __setstate__(self, state: Any) -> None:
    raise ValueError(f"refusing BUILD on whitelisted global {self!r}")


class _StorageType(_Immutable):
  """Stand-in for `torch.FloatStorage` & co.: only remembers the element dtype."""

  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype: np.dtype):
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "dtype", np.dtype(dtype))

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _Function(_Immutable):
  """A whitelisted function as the pickle sees it: callable, but no `__defaults__` to rewrite."""

  __slots__ = ("_fn", "_name", "_charge")

  def __init__(self, name: str, fn: Any, charge: Any):
    object.__setattr__(self, "_name", name)
    object.__setattr__(self, "_fn", fn)
    object.__setattr__(self, "_charge", charge)

  def __call__(self, *args: Any) -> Any:
    out = self._fn(*args)
    if isinstance(out, np.ndarray):
      self._charge(out.nbytes)
    return out

  def __repr__(self) -> str:
    return self._name


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
  numel = math.prod(size)
  if numel > storage.size:
    # Stride-0 (expanded) or overlapping views: copying them would allocate more than the file
    # holds (a 640-byte file could ask for gigabytes). torch checkpoints of weights have none.
    raise ValueError(f"tensor of size {size} (stride {stride}) has {numel} elements, more than "
                     f"its storage of {storage.size}: overlapping or stride-0 views are not "
                     "supported")
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


_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}
# Built-in types: immutable (setting an attribute on them raises TypeError).
_TYPES = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


def _allowed_global(module: str, name: str, charge: Any) -> Any:
  """A fresh stand-in for a whitelisted global; KeyError for anything else.

  Fresh per lookup (and immutable), so nothing one file does to a stand-in reaches another.
  `charge(nbytes)` is told the size of every array a function stand-in returns.
  """
  if (module, name) in _FUNCTIONS:
    return _Function(f"{module}.{name}", _FUNCTIONS[(module, name)], charge)
  if (module, name) in _TYPES:
    return _TYPES[(module, name)]
  if module == "torch" and name in _STORAGE_DTYPES:
    return _StorageType(name, _STORAGE_DTYPES[name])
  raise KeyError((module, name))


# An honest torch.save archive stores tensor data uncompressed; a compressed entry may expand at
# most this much (and by at most _SLACK_BYTES) before it is refused unread.
_MAX_EXPANSION = 16
_SLACK_BYTES = 1 << 16
# The tensors of one file may hold at most this many times the bytes of its storages (tied
# weights view one storage twice; a pickle repeating one view a million times is refused).
_MAX_VIEWS_PER_STORAGE = 4


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
    self._storage_bytes = 0  # Distinct storages read so far.
    self._tensor_bytes = 0  # Tensors built from them so far.

  def _charge(self, nbytes: int) -> None:
    """Counts a built tensor; refuses a file whose tensors outgrow its storages."""
    self._tensor_bytes += nbytes
    limit = _MAX_VIEWS_PER_STORAGE * self._storage_bytes + _SLACK_BYTES
    if self._tensor_bytes > limit:
      raise ValueError(f"{self._path}: its tensors would hold {self._tensor_bytes} bytes from "
                       f"{self._storage_bytes} bytes of storage (more than "
                       f"{_MAX_VIEWS_PER_STORAGE} views of each): refused")

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _allowed_global(module, name, self._charge)
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
      name = f"{self._prefix}data/{key}"
      try:
        info = self._archive.getinfo(name)
      except KeyError:
        raise ValueError(f"{self._path}: storage data/{key} missing from the archive") from None
      dtype = storage_type.dtype.newbyteorder(self._byteorder)
      numel = int(numel)
      if numel < 0:
        raise ValueError(f"{self._path}: storage data/{key} declares {numel} elements")
      # Checked against the archive's declared sizes BEFORE anything is decompressed.
      want = numel * dtype.itemsize
      if info.file_size < want:
        raise ValueError(f"{self._path}: storage data/{key} has {info.file_size} bytes, "
                         f"{numel} x {dtype.itemsize} expected")
      raw = _read_entry(self._archive, info, want, self._path)
      arr = np.frombuffer(raw, dtype=dtype, count=numel)
      self._storage_bytes += arr.nbytes
      self._storages[key] = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    return self._storages[key]


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, size: int, path: str) -> bytes:
  """The first `size` bytes of a zip entry, refusing entries that would expand implausibly.

  Only `size` bytes are ever decompressed (`ZipExtFile.read(size)` stops there), whatever the
  entry claims to hold.
  """
  if info.compress_type != zipfile.ZIP_STORED and (
      info.file_size > _MAX_EXPANSION * info.compress_size + _SLACK_BYTES):
    raise ValueError(f"{path}: archive entry {info.filename} expands from {info.compress_size} "
                     f"to {info.file_size} bytes (more than {_MAX_EXPANSION}x; torch.save does "
                     "not compress tensors): refused unread")
  with archive.open(info) as f:
    raw = f.read(size)
  if len(raw) < size:
    raise ValueError(f"{path}: archive entry {info.filename} holds {len(raw)} bytes, "
                     f"{size} expected")
  return raw


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
    info = archive.getinfo(pickles[0])
    unpickler = _RestrictedUnpickler(_read_entry(archive, info, info.file_size, path), archive,
                                     prefix, byteorder, path)
    try:
      return unpickler.load()
    except ValueError as e:
      if str(e).startswith(path):
        raise
      # Raised by a stand-in (tensor geometry, BUILD refused), which does not know the file.
      raise ValueError(f"{path}: {e}") from e
    except Exception as e:  # Malformed pickle stream, bad REDUCE arguments, ...
      raise ValueError(f"{path}: cannot unpickle checkpoint: {e!r}") from e
