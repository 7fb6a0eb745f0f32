"""Train a model: ``python train.py --config=configs/vit_tiny.py [--workdir=DIR] [--config.FIELD=V]``.

Resumes automatically from the latest checkpoint in the workdir. SIGTERM or SIGINT saves the step
in progress and exits with status 143 / 130; rerunning resumes it. Multi-host:
runs ``jax.distributed.initialize`` when a cluster is detected (see
posenc/training/distributed.py) or when --coordinator_address is given.
Every input error is one message on stderr (exit status 2), never a traceback.
"""
from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from posenc.config import ConfigError, load_config_file
from posenc.training import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':preset,field=value,...' (e.g. "
    "configs/vit_tiny.py:full,posenc=rope_mixed).", lock_config=False,
    accept_new_attributes=True)  # e.g. --config.posenc_options.base=100; unknown fields: ConfigError
flags.DEFINE_string("workdir", None, "Run directory: checkpoints/, metrics.jsonl, tb/. Default: "
                    "runs/<config>-<posenc>-<size>.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.mark_flag_as_required("config")


def check_config_argument(argv: list[str]) -> None:
  """Load ``--config=FILE[:arg]`` once before absl does, so a bad file, preset or override is one
  clear message (absl would print the loader's traceback)."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      load_config_file(a.split("=", 1)[1])
    elif a == "--config" and i + 1 < len(argv):
      load_config_file(argv[i + 1])


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if logging.get_verbosity() == logging.INFO and "--verbosity" not in " ".join(sys.argv):
    logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines off the console
  distributed.maybe_initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # resumed runs skip recompiling
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/posenc/jax"))

  from posenc.training import RunError, default_workdir, train
  config = FLAGS.config
  try:
    workdir = FLAGS.workdir or default_workdir(config, config_flags.get_config_filename(FLAGS["config"]))
    results = train(config, workdir)  # prints the workdir first
  except ConfigError as e:
    print(f"Config error: {e}", file=sys.stderr)
    return 2
  except RunError as e:  # preempted (exit 128 + signal), busy workdir, storage, divergence
    print(str(e), file=sys.stderr)
    return getattr(e, "exit_code", 1)
  except KeyboardInterrupt:  # before training started (during setup)
    print("Interrupted before training started; nothing was written.", file=sys.stderr)
    return 130
  print("final: " + ", ".join(f"{k}={v:.4f}" for k, v in results.items()), flush=True)
  return 0


if __name__ == "__main__":
  try:
    check_config_argument(sys.argv[1:])
  except ConfigError as e:
    print(f"Config error: {e}", file=sys.stderr)
    sys.exit(2)
  app.run(lambda argv: sys.exit(main(argv)))
