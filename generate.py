"""Print a trained causal-LM run's continuation of a prompt.

    python generate.py --workdir=runs/gpt_tiny-learned-len128 --prompt="It is a truth universally"
    python generate.py --workdir=... --prompt="Call me" --max_new_tokens=80 --temperature=0.8 --seed=1

The run's own config (stored in its checkpoint) rebuilds the model and its BPE
tokenizer; decoding uses the KV cache (``posenc.models.generate``), with the run's positions (its
``position_scale``) and encoding options, and gives the tokens recomputation would.
"""
from __future__ import annotations

import math
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A causal_lm run's workdir (or checkpoint directory / step).")
flags.DEFINE_string("prompt", "It is a truth universally acknowledged", "Text to continue.")
flags.DEFINE_integer("max_new_tokens", 60, "Tokens to generate.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flag_as_required("workdir")


def check_flags(prompt: str, max_new_tokens: int, temperature: float) -> None:
  """ConfigError naming the first bad flag; nothing is loaded before these checks."""
  from posenc.config import ConfigError
  if not prompt:
    raise ConfigError("--prompt is empty; give some text to continue.")
  if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
    raise ConfigError(f"--max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
  if not math.isfinite(temperature) or temperature < 0:
    raise ConfigError(f"--temperature must be a finite number >= 0 (0 = greedy, > 0 samples), got {temperature!r}.")


def continuation(workdir: str, prompt: str, max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> str:
  """The run's continuation of ``prompt`` (the prompt not repeated)."""
  check_flags(prompt, max_new_tokens, temperature)
  import jax
  import ml_collections

  from posenc.config import ConfigError
  from posenc.data import lm
  from posenc.models import generate
  from posenc.training import checkpoint, setup

  try:
    root, step = checkpoint.resolve(workdir)
    meta = checkpoint.Checkpointer(root, read_only=True).meta(step)
  except checkpoint.CheckpointError as e:
    raise ConfigError(f"--workdir: {e}") from None
  if meta.get("task") != "causal_lm":
    raise ConfigError(f"--workdir: {root}/{step} is a '{meta.get('task')}' run; generation needs a causal_lm run.")
  from configs import common
  config = common.base("causal_lm")  # fields a run written by an older posenc lacks take today's defaults
  config.update(ml_collections.ConfigDict(meta["config"]))
  config.update(init_from=workdir, total_steps=0, eval_lengths=(), eval_stride=0, batch_size=1,
                eval_batch_size=1, mesh=dict(data=1, fsdp=1, model=1))
  run = setup(config)
  run.initial_state(log=lambda _: None)
  tokenizer = lm.tokenizer(config.vocab_size)
  ids = tokenizer.encode(prompt).ids
  if not ids:
    raise ConfigError("--prompt is empty; give some text to continue.")
  try:
    out = generate(run.model(), [ids], max_new_tokens, temperature=temperature, rng=jax.random.key(seed),
                   position_scale=run.position_scale)  # the run's position interpolation, as in training
  except ValueError as e:  # the flags are checked: what is left is the length the model can serve
    raise ConfigError(f"--max_new_tokens: {e}") from None
  return tokenizer.decode([int(t) for t in out[0, len(ids):]])


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from posenc.config import ConfigError
  try:
    text = continuation(FLAGS.workdir, FLAGS.prompt, FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.seed)
  except ConfigError as e:
    print(f"Error: {e}", file=sys.stderr)
    return 2
  print(FLAGS.prompt + text)
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
