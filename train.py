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
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from posenc.config import ConfigError, load_config_file
from posenc.training import distributed

FLAGS = flags.FLAGS
CONFIG_HELP = ("Config file, optionally with ':preset,field=value,...' (e.g. configs/vit_tiny.py:full,"
               "posenc=rope_mixed); then --config.FIELD=VALUE flags. Every field: python -m posenc.config_fields.")
CONFIG_FILE = ""  # the --config file, for the default workdir's name
flags.DEFINE_string("workdir", None, "Run directory: checkpoints/, metrics.jsonl, tb/. Default: "
                    "runs/<config>-<posenc>-<size>.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def fail(message: str) -> None:
  print(message, file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with ``--config=FILE[:arg]`` loaded once, here: a bad file, preset or override
  (``:field=value`` or ``--config.FIELD=V``) is one message and exit status 2, never a traceback."""
  spec, rest = None, [argv[0]]
  for i, a in enumerate(argv[1:], 1):
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif not (i > 1 and argv[i - 1] == "--config"):
      rest.append(a)
  help_asked = any(a.lstrip("-").startswith("help") for a in rest[1:])
  if spec is None and not help_asked:
    fail("Config error: give --config=FILE[:preset,field=value,...], e.g. --config=configs/vit_tiny.py.")
  try:
    config = load_config_file(spec) if spec else ml_collections.ConfigDict()
  except ConfigError as e:
    fail(f"Config error: {e}")
  config_flags.DEFINE_config_dict("config", config, CONFIG_HELP, lock_config=False, sys_argv=rest,
                                  accept_new_attributes=True)  # --config.posenc_options.NAME=V; unknown: ConfigError
  global CONFIG_FILE
  CONFIG_FILE = (spec or "").partition(":")[0]
  try:
    return FLAGS(rest)
  except flags.Error as e:
    fail(f"Config error: {e}" if "config." in str(e) else f"Error: {e}")


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
    workdir = FLAGS.workdir or default_workdir(config, CONFIG_FILE)
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
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
