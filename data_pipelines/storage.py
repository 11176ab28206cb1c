"""Paths that may be local or URLs (gs://...): one place for joining, reading and writing them.

Every path a user gives may be a URL, so nothing here hands a path to `os.path`, `open` or OpenCV
unless it is local: `os.path.abspath("gs://b/x")` is `<cwd>/gs:/b/x`, and `cv2.imread` reads only
local files. Remote files go through `etils.epath` (gcsfs for gs:// when TensorFlow is absent).
Local files keep the fast, plain-Python path (and accept names that are not valid UTF-8: Python
carries them as surrogate escapes and `open` turns them back into the original bytes).

Writes are atomic in both cases: locally through a temporary file and `os.replace`; on object
stores an upload becomes visible only when complete.
"""

from __future__ import annotations

import os
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_remote(path: PathLike) -> bool:
  """Whether `path` is a URL (gs://, s3://, ...) rather than a local path."""
  return "://" in os.fspath(path)


def join(base: PathLike, *parts: str) -> str:
  """`base/part/...` as a string, for local paths and URLs alike (URLs are never normalised)."""
  base = os.fspath(base)
  if not is_remote(base):
    return os.path.join(base, *parts)
  out = base
  for p in parts:
    out = p if is_remote(p) else (out.rstrip("/") + "/" + p if out else p)
  return out


def join_root(root: str, path: str) -> str:
  """`path` under `root` (a config's `data.root`) unless it is empty, absolute or a URL."""
  if not path or is_remote(path) or os.path.isabs(path):
    return path
  return join(root, path)


def absolute(path: PathLike) -> str:
  """A local path made absolute; a URL unchanged."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def basename(path: PathLike) -> str:
  """The last component of a local path or URL."""
  return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def dirname(path: PathLike) -> str:
  """Everything before the last component ('' for a bare name)."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.dirname(path)
  return path.rstrip("/").rsplit("/", 1)[0]


def exists(path: PathLike) -> bool:
  return epath.Path(path).exists()


def is_file(path: PathLike) -> bool:
  return epath.Path(path).is_file()


def is_dir(path: PathLike) -> bool:
  return epath.Path(path).is_dir()


def makedirs(path: PathLike) -> None:
  """Creates a directory and its parents (a no-op on object stores, which have no directories)."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_bytes(path: PathLike) -> bytes:
  """The file's bytes exactly as stored."""
  if is_remote(path):
    return epath.Path(path).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def read_text(path: PathLike, encoding: str = "utf-8") -> str:
  return read_bytes(path).decode(encoding)


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` atomically (readers never see a half-written file); creates local parents."""
  path = os.fspath(path)
  if is_remote(path):
    epath.Path(path).write_bytes(data)
    return
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
  """`write_bytes` of the encoded text."""
  write_bytes(path, text.encode(encoding))


def listdir(path: PathLike) -> list[str]:
  """Names of the entries directly under a directory, sorted."""
  if not is_remote(path):
    return sorted(os.listdir(path))
  return sorted(p.name for p in epath.Path(path).iterdir())


def remove(path: PathLike) -> None:
  epath.Path(path).unlink()


def display(path: PathLike) -> str:
  """A path for messages and logs: bytes that are not UTF-8 shown as `\\xNN` escapes.

  Python carries such file names as lone surrogates, which cannot be printed or logged.
  """
  return os.fsencode(path).decode("utf-8", "backslashreplace")


def upload_tree(local_dir: str, dest: str, *, last: tuple[str, ...] = ()) -> int:
  """Copies every file under the local `local_dir` to `dest` (local or URL), keeping the
  relative layout; files named in `last` go after all others (a completion marker). Returns
  the number of files copied."""
  files = []
  for root, _, names in os.walk(local_dir):
    for n in names:
      files.append(os.path.relpath(os.path.join(root, n), local_dir))
  files.sort(key=lambda f: (os.path.basename(f) in last, f))
  for f in files:
    with open(os.path.join(local_dir, f), "rb") as src:
      write_bytes(join(dest, *f.split(os.sep)), src.read())
  return len(files)


def move_tree(src: PathLike, dst: PathLike) -> None:
  """Moves the directory `src` to `dst` (which must not exist), local or URL.

  Object stores have no directories to rename (and epath's rename of a "folder" fails: the
  destination's parent, never created as an object, "does not exist"), so there each file is
  copied first and the source deleted only once every copy is complete: an interruption leaves
  the files in both places, never in neither.
  """
  if not is_remote(src) and not is_remote(dst):
    os.makedirs(os.path.dirname(os.fspath(dst)), exist_ok=True)
    os.rename(src, dst)
    return
  src_path, dst_path = epath.Path(src), epath.Path(dst)

  def files(d: epath.Path, rel: tuple[str, ...]):  # epath refuses `**` globs on GCS.
    for p in d.iterdir():
      if p.is_dir():
        yield from files(p, rel + (p.name,))
      else:
        yield p, rel + (p.name,)
  for p, rel in list(files(src_path, ())):
    target = dst_path.joinpath(*rel)
    target.parent.mkdir(parents=True, exist_ok=True)
    p.copy(target)
  src_path.rmtree()
