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


# ------------------------------------------------------------------ shared data-test helpers
# (after the environment above: posenc.data imports JAX; imported inside the helpers, as only the
# data tests need it)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

FM = "fashion_mnist"


@pytest.fixture(scope="session")
def idx_train():
  """Fashion-MNIST's 60,000 training images and labels, read from the Debian IDX files."""
  from posenc.data import fashion_mnist
  return fashion_mnist.read_split(fashion_mnist.source_dir(), "train")


@pytest.fixture(scope="session")
def idx_test():
  from posenc.data import fashion_mnist
  return fashion_mnist.read_split(fashion_mnist.source_dir(), "test")


def take(loader_or_iterator, n):
  it = iter(loader_or_iterator)
  return [next(it) for _ in range(n)]


def concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def unnormalise(images, dataset=FM):
  """Normalised pixels back to [0, 1] with the dataset's registered statistics."""
  from posenc.data import registry
  mean, std = registry.get(dataset).stats
  return images * std + mean


def image_loader(dataset, split, *, batch_size, train, seed=0, process_index=None, process_count=None,
                 num_epochs=None, **options):
  """``posenc.data.images.loader`` with the Batching and ImageOptions fields as keywords."""
  from posenc.data import Batching, images
  batching = Batching(batch_size, train, seed, num_epochs=num_epochs, process_index=process_index,
                      process_count=process_count)
  return images.loader(dataset, split, batching, images.ImageOptions(**options))
