"""Test setup: 8 fake CPU devices and no hub access, before JAX loads."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Every temporary file of the suite (tempfile.mkdtemp/TemporaryDirectory
# in tests, pytest's tmp_path, torch's inductor cache, CLI subprocesses via
# TMPDIR) goes under one root removed at exit: the suite leaves nothing in
# /tmp even where a test forgets to clean up or is killed half-way.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if not os.environ.get("BISTIL_TEST_TMP"):
  _root = tempfile.mkdtemp(prefix="bistil-tests-")
  os.environ["BISTIL_TEST_TMP"] = _root
  os.environ["TMPDIR"] = _root
  tempfile.tempdir = _root
  atexit.register(shutil.rmtree, _root, ignore_errors=True)
