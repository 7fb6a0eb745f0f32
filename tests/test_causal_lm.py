"""The causal-LM task end to end: training, logs, resume, length transfer, both evaluation modes,
bad inputs and generation from the command line (tiny GPT, 512-token BPE)."""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from posenc.config import ConfigError, load_config_file
from posenc.training import setup, train

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY = ("model_options.width=16,model_options.depth=1,model_options.num_heads=2,model_options.mlp_dim=32,"
        "vocab_size=512,max_len=16,batch_size=8,eval_batch_size=8,eval_tokens=256,total_steps=4,"
        "warmup_steps=1,lr=1e-2,log_every=1,eval_every=0,checkpoint_every=2")


def config(arg: str = ""):
  return load_config_file(f"{REPO / 'configs' / 'gpt_tiny.py'}:{TINY}" + (f",{arg}" if arg else ""))


def cli(script: str, *args: str) -> subprocess.CompletedProcess:
  """``python <script> <args>`` (train.py, generate.py) from the repository, on one CPU device."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)}
  return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)


def params_at(workdir: Path, step: int) -> dict:
  return ocp.StandardCheckpointer().restore((workdir / "checkpoints" / str(step) / "params").resolve())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("gpt") / "run"
  results = train(config(), str(workdir))
  return workdir, results


def test_run_logs_perplexity_and_tokens_per_second(trained):
  workdir, results = trained
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in steps] == [1, 2, 3, 4]
  assert all(r["train/perplexity"] == pytest.approx(math.exp(r["train/loss"]), rel=1e-4) for r in steps)
  assert all(r["train/tokens_per_sec"] > 0 for r in steps[1:])
  assert results["perplexity"] == pytest.approx(math.exp(results["loss"]), rel=1e-5)
  assert steps[0]["train/loss"] > math.log(512) - 1.0 and results["loss"] < steps[0]["train/loss"]


def test_resume_from_an_earlier_checkpoint_ends_bit_identical(trained, tmp_path, capsys):
  workdir, _ = trained
  again = tmp_path / "again"
  shutil.copytree(workdir, again)
  shutil.rmtree(again / "checkpoints" / "4")  # as if the run had stopped right after step 2
  train(config(), str(again))
  # It resumed at step 2 (a fresh start would end bit-identical too: the run is deterministic).
  assert f"Resuming from {again / 'checkpoints' / '2'} (step 2)" in capsys.readouterr().out
  jax.tree.map(np.testing.assert_array_equal, params_at(again, 4), params_at(workdir, 4))


def test_longer_length_and_both_modes_from_the_trained_run(trained, tmp_path, capsys):
  """init_from at 2L: the learned table extends; at L with S = L the two modes agree exactly, and
  every mode and length scores the same number of tokens."""
  workdir, _ = trained
  evaluated = train(config(f"init_from={workdir},total_steps=0,eval_lengths=(32,),eval_stride=16"),
                    str(tmp_path / "eval"))
  assert evaluated["loss_16_s16"] == evaluated["loss"]
  for key in ("loss_32", "loss_32_s16"):
    assert np.isfinite(evaluated[key]) and evaluated[key] != evaluated["loss"]
  longer = train(config(f"init_from={workdir},max_len=32,total_steps=2"), str(tmp_path / "len32"))
  assert "posenc/table (16, 16) -> (32, 16)" in capsys.readouterr().out
  assert np.isfinite(longer["loss"])


@pytest.mark.parametrize("arg,field", [
    ("eval_lengths=(32,),eval_stride=64", "'eval_stride'"),
    ("eval_max_batches=2", "'eval_max_batches'"),
    ("dataset=fashion_mnist", "'dataset'"),
    ("vocab_size=100", "'vocab_size'"),
    ("posenc=rope_mixed", "'posenc'"),
])
def test_bad_inputs_are_one_clear_error(arg, field):
  with pytest.raises(ConfigError, match=field):
    setup(config(arg))


def test_generate_prints_a_continuation(trained):
  workdir, _ = trained
  out = cli("generate.py", f"--workdir={workdir}", "--prompt=It is a", "--max_new_tokens=8")
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.startswith("It is a") and len(out.stdout.strip()) > len("It is a")
  too_long = cli("generate.py", f"--workdir={workdir}", "--max_new_tokens=50")
  assert too_long.returncode == 2 and "Traceback" not in too_long.stderr and "max_len=16" in too_long.stderr


@pytest.mark.parametrize("flag,value", [("temperature", "-1"), ("temperature", "nan"), ("temperature", "inf"),
                                        ("max_new_tokens", "0"), ("prompt", "")])
def test_generate_names_each_bad_flag_before_loading_anything(tmp_path, flag, value):
  """The workdir does not exist: an error about the flag, not the workdir, shows nothing was loaded first."""
  out = cli("generate.py", f"--workdir={tmp_path / 'no_run'}", f"--{flag}={value}")
  assert out.returncode == 2 and out.stderr.startswith(f"Error: --{flag} "), out.stderr[-2000:]
  assert "--workdir" not in out.stderr and "Traceback" not in out.stderr


def test_unknown_encoding_is_one_line_suggesting_the_tasks_closest(tmp_path):
  out = cli("train.py", "--config=configs/gpt_tiny.py:posenc=ropee", f"--workdir={tmp_path / 'run'}")
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
  assert lines[0].startswith("Config error: config field 'posenc'") and "did you mean 'rope'?" in lines[0]
  assert "kerple" in lines[0] and not any(n in lines[0] for n in ("rope_mixed", "sincos2d", "cpe"))  # 1D ones only
  assert not (tmp_path / "run").exists()


def test_resuming_with_another_vocabulary_says_what_works(trained, tmp_path):
  """The error names the parameter and the field; both ways on it gives work: the run's own value resumes
  the run (the flags exactly as printed), a fresh workdir trains the new vocabulary."""
  workdir, _ = trained
  again = tmp_path / "again"
  shutil.copytree(workdir, again)
  shutil.rmtree(again / "checkpoints" / "4")  # stopped after step 2, restarted with another vocabulary
  command = [f"--config=configs/gpt_tiny.py:{TINY},vocab_size=4096", f"--workdir={again}"]
  out = cli("train.py", *command)
  error = out.stderr.strip()
  assert out.returncode == 2 and len(error.splitlines()) == 1, out.stderr[-2000:]
  assert "token_embed: stored (512, 16), wanted (4096, 16)" in error and "vocab_size (512 -> 4096)" in error
  assert "init_from" not in error  # a vocabulary does not transfer: init_from would fail too
  flags = re.search(r"to resume the run, rerun with (.+?); to train this config instead, give a fresh --workdir",
                    error).group(1)
  resumed = cli("train.py", *command, *shlex.split(flags))
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"Resuming from {again / 'checkpoints' / '2'} (step 2)" in resumed.stdout
  fresh = cli("train.py", *command[:1], f"--workdir={tmp_path / 'fresh'}")
  assert fresh.returncode == 0 and "Resuming" not in fresh.stdout, fresh.stderr[-2000:]
