"""Test set-up, before JAX is imported: 8 simulated CPU devices, fast compiles, and one persistent
compilation cache for the whole session, shared with every subprocess (train.py runs, benchmarks, notebook
kernels inherit the environment), so a program compiled once is not compiled again."""
import atexit
import os
import shutil
import tempfile

# Tests check what programs compute, not how fast: compile for speed of compiling (no LLVM
# optimisation, XLA:CPU's elemental emitters; both exist in the pinned jaxlib). Subprocesses inherit it.
# On an accelerator (benchmarks/device_check.sh sets JAX_PLATFORMS=cuda) XLA's defaults stay.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ["JAX_PLATFORMS"] == "cpu":
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), FAST_COMPILE,
                                      "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="posenc-test-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
