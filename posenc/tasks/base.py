"""What every task provides (``Task``), and the loss and metrics the tasks share."""
from __future__ import annotations

import abc

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from posenc.config import ConfigError
from posenc.config_fields import Field
from posenc.geometry import Geometry

Batch = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array, label_smoothing: float = 0.0
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted mean cross-entropy, and the summed statistics evaluation aggregates. With
  ``label_smoothing`` a, the target is (1 - a) one-hot + a / classes: (1 - a) xent + a (logsumexp -
  mean logit), without materialising the smoothed targets (a vocabulary-wide one-hot for LMs)."""
  logits = logits.astype(jnp.float32)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  if label_smoothing:
    uniform = jax.nn.logsumexp(logits, axis=-1) - jnp.mean(logits, axis=-1)
    xent = (1.0 - label_smoothing) * xent + label_smoothing * uniform
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  stats = {"loss_sum": jnp.sum(xent * weights), "correct": jnp.sum(correct * weights),
           "count": jnp.sum(weights)}
  return stats["loss_sum"] / jnp.maximum(stats["count"], 1.0), stats



def classify(model, batch: Batch, *, train: bool, position_scale: float = 1.0, label_smoothing: float = 0.0
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """A ViT's ``cross_entropy`` on ``batch["image"]`` (images, or clips for a video ViT), the positions
  of its patches scaled by ``position_scale`` (position interpolation)."""
  inputs = batch["image"]
  positions = None
  if position_scale != 1.0:
    positions = model.geometry_for(inputs.shape[1:-1]).positions() * position_scale
  logits = model(inputs, positions=positions, train=train)
  return cross_entropy(logits, batch["label"], batch["valid"].astype(logits.dtype), label_smoothing)

class Task(abc.ABC):
  """One kind of training problem. Subclasses set the class attributes and override the methods."""

  name: str = "?"
  FIELDS: dict[str, Field] = {}  # this task's config fields, declared (posenc.config_fields)
  NDIM: int = 0                 # dimensionality of its positions (1: sequences, 2: image grids)
  CAUSAL: bool = False          # its model is a causal decoder (it may use causal-only encodings)
  ITEMS: str = "items"          # what a batch counts, for throughput logs (images, tokens)
  # the eval metric that picks the best checkpoint, and whether its best is its "max" or its "min"
  BEST_METRIC: tuple[str, str] = ("accuracy", "max")

  # ----------------------------------------------------------------- config
  def validate(self, config) -> None:
    """ConfigError for the first broken rule that joins fields (each field's own checks are declared)."""

  def check_dataset(self, config) -> None:
    """ConfigError unless ``config.dataset`` exists and holds what this task reads."""

  @abc.abstractmethod
  def size_label(self, config) -> str:
    """The geometry in a workdir name, e.g. ``28`` or ``len128``."""

  def eval_sizes(self, config) -> tuple:
    """Other geometries evaluated during training, besides the trained one."""
    return ()

  def size_suffix(self, size) -> str:
    """What metrics measured at ``size`` (one of ``eval_sizes``) append to their names."""
    return f"_{size}"

  # ----------------------------------------------------------------- geometry and model
  @abc.abstractmethod
  def geometry(self, config, size=None) -> Geometry:
    """The token geometry of ``config`` (at ``size``, one of ``eval_sizes``, if given). Builds no model."""

  @abc.abstractmethod
  def create_model(self, config, size=None) -> nnx.Module:
    """The config's model, built at ``size``; runs under ``nnx.eval_shape`` / ``jax.jit``."""

  # ----------------------------------------------------------------- data and steps
  @abc.abstractmethod
  def loader(self, config, split: str, *, train: bool, batch_size: int, size=None):
    """This process's batches of ``split`` (a grain dataset; iterators resume from their state)."""

  @abc.abstractmethod
  def random_batch(self, config, rng: np.random.Generator, rows: int, *, train: bool, size=None) -> dict:
    """``rows`` random rows with the keys, shapes and dtypes of ``loader``'s (dataset 'synthetic')."""

  @staticmethod
  def batching(config, batch_size: int, train: bool):
    """How ``loader`` batches: ``batch_size`` rows, shuffled and augmented when ``train``, read in
    ``config.data_workers`` grain workers."""
    from posenc.data import Batching
    return Batching(batch_size, train, config.seed, worker_count=config.data_workers)

  def splits(self, config) -> dict[str, int]:
    """The split names of ``config.dataset`` and their sizes (examples)."""
    return dict(dataset_info(config, "splits", "").splits)

  def batches(self, config, split: str, *, train: bool, batch_size: int, size=None):
    """``loader``, or, for a dataset of random batches ('synthetic'), ``random_batch``'s rows."""
    from posenc.data import registry, synthetic  # imported late: data builders are heavy
    if not registry.get(config.dataset).random_batches:
      return self.loader(config, split, train=train, batch_size=batch_size, size=size)
    return synthetic.loader(lambda rng, rows: self.random_batch(config, rng, rows, train=train, size=size),
                            split=split, batch_size=batch_size, train=train, seed=config.seed,
                            process_index=jax.process_index(), process_count=jax.process_count())

  @abc.abstractmethod
  def forward(self, model, batch: Batch, *, train: bool, position_scale: float = 1.0,
              label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean loss, summed statistics) of ``model`` on ``batch``; ``position_scale`` multiplies
    the positions (position interpolation); ``label_smoothing``: see ``cross_entropy``."""

  def metrics(self, stats: dict) -> dict:
    """Reported metrics from summed statistics (one step's or a whole evaluation's)."""
    count = jnp.maximum(stats["count"], 1.0)
    return {"loss": stats["loss_sum"] / count, "accuracy": stats["correct"] / count}

  @abc.abstractmethod
  def items(self, batch: Batch) -> int:
    """How many ``ITEMS`` a batch holds."""


def build_model(config, **task_kwargs) -> nnx.Module:
  """``posenc.models.create`` for ``config`` (model, encoding, overrides, dtype, seed) + the task's kwargs."""
  from posenc import models  # imported late: models import every encoding
  return models.create(config.model, posenc=config.posenc, rngs=nnx.Rngs(config.seed, dropout=config.seed + 1),
                       posenc_options=dict(config.posenc_options), dtype=jnp.dtype(config.dtype),
                       attention_impl=config.attention_impl,
                       param_dtype=jnp.float32, **{**dict(config.model_options), **task_kwargs})


def dataset_info(config, has: str, hint: str):
  """``posenc.data.info(config.dataset)``; ConfigError unless it has the attribute ``has``."""
  from posenc import data  # imported late: data builders are heavy
  try:
    info = data.info(config.dataset)
  except Exception as e:  # noqa: BLE001 - any failure to find the dataset is a config problem
    raise ConfigError(f"config field 'dataset': cannot use '{config.dataset}': {e}") from None
  if getattr(info, has, None) is None:
    raise ConfigError(f"config field 'dataset': '{config.dataset}' does not fit task "
                      f"'{config.task}' ({hint}).")
  return info
