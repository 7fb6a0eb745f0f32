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


# Files of a minute or more (serially, on 2 cores) go first, so that under ``-n 2 --dist loadfile``
# (pyproject's addopts) the last files handed out are short ones and both workers finish together.
HEAVY_FILES = ("test_notebooks.py", "test_benchmarks.py", "test_cached_decoding.py", "test_training_runs.py")


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: item.path.name not in HEAVY_FILES)  # stable: file order kept otherwise


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


# --- helpers shared by the encoding tests (imported with `from conftest import ...`) --------------
# JAX is imported only here, after the set-up above.
import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from posenc.encodings import Geometry, make  # noqa: E402

GRID = Geometry.grid(3, 4, num_prefix=1)  # a 3x4 patch grid after one class token


def num_params(module) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


# Absolute encodings (tests/test_encodings_absolute*.py): they add a table to the tokens.
ABSOLUTE_DIM = 16
ABSOLUTE_SEQ = Geometry.seq(8, num_prefix=1)


def build_absolute(name, geometry, dim=ABSOLUTE_DIM, param_dtype=jnp.float32, **options):
  """Build as a model does: every context key, plus encoding options."""
  return make(name, dim=dim, num_heads=2, num_layers=2, geometry=geometry,
              param_dtype=param_dtype, rngs=nnx.Rngs(0), **options)


def tokens(geometry, dim=ABSOLUTE_DIM, batch=2, dtype=jnp.float32, seed=0):
  x = np.random.default_rng(seed).standard_normal((batch, geometry.num_tokens, dim))
  return jnp.asarray(x.astype(jnp.dtype(dtype)))  # cast on the host: no compile


@nnx.jit(static_argnums=2)
def _embed(enc, x, geometry, positions):
  return enc.embed(x, geometry, positions)


def embed(enc, x, geometry, positions=None):
  """``enc.embed`` under jit: one compile, shared by encodings of one structure.

  ``positions`` (default: the geometry's grid) are traced data, as in a model.
  """
  return _embed(enc, x, geometry, geometry.positions() if positions is None else jnp.asarray(positions))


# Attention biases and cpe (tests/test_encodings_relative.py, _rel_bias.py, _cpe.py).
BIAS_HEADS, BIAS_DIM = 4, 8
BIAS_SEQ = Geometry.seq(9, num_prefix=1)


def build_bias(name, geometry=GRID, **options):
  return make(name, dim=BIAS_DIM, num_heads=BIAS_HEADS, num_layers=3, geometry=geometry,
              rngs=nnx.Rngs(0), **options)


@functools.partial(nnx.jit, static_argnums=(1, 2))
def _bias(enc, geometry, layer, positions):
  return enc.attention_bias(geometry, positions, layer)


def bias_of(enc, geometry, layer=0, positions=None):
  """The bias of ``layer`` (a Python int here), computed in one compiled call; ``positions``
  (default: the geometry's grid) are traced data, as in a model."""
  return _bias(enc, geometry, layer,
               geometry.positions() if positions is None else jnp.asarray(positions))


def randomize(enc, seed=1, scale=1.0):
  """Give every parameter random values, so no check passes by a flat init."""
  rng = np.random.default_rng(seed)
  for _, p in nnx.iter_graph(enc):
    if isinstance(p, nnx.Param):
      p[...] = jnp.asarray(scale * rng.normal(size=p.shape), p.dtype)
  return enc


def bias_positions(bias, geometry, batch=None):
  """Drop the prefix rows/cols after checking they are zero. A bias shared by the batch
  (``[1, H, T, T]``) gives ``[H, N, N]``; with ``batch`` a ``[batch, H, N, N]`` one."""
  n = geometry.num_prefix
  bias = np.asarray(bias)
  assert bias.shape == (batch or 1, BIAS_HEADS, geometry.num_tokens, geometry.num_tokens)
  assert not bias[..., :n, :].any() and not bias[..., :, :n].any()
  bias = bias[..., n:, n:]
  return bias if batch else bias[0]


def int_positions(geometry, high, batch=2, low=0, seed=0):
  """``[batch, N, ndim]`` int32 coordinates, uniform in ``[low, high)`` per axis."""
  rng = np.random.default_rng(seed)
  size = (batch, geometry.num_positions, geometry.ndim)
  return rng.integers(low, np.asarray(high), size=size).astype(np.int32)


# --- helpers shared by the training tests (tests/test_training*.py) --------------------------------
import pathlib  # noqa: E402

from posenc.config import load_config_file  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
  """``configs/<name>.py``, with ``arg`` (presets and overrides) as train.py's ``--config`` takes it."""
  return load_config_file(f"{REPO / 'configs' / name}.py" + (f":{arg}" if arg else ""))
