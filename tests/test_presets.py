"""benchmarks.presets: a run appends one complete ledger record per seed; --report writes the README's
marked blocks from the ledger (means of "report" records only) and nothing else; a used workdir is refused."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys

import pytest

from benchmarks import presets, presets_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ("model_options.width=16,model_options.depth=1,model_options.num_heads=2,model_options.mlp_dim=32,"
        "total_steps=3,warmup_steps=1,batch_size=16,eval_batch_size=64,eval_max_batches=1,eval_every=0,"
        "checkpoint_every=0,log_every=1")
SPEC = f"configs/vit_tiny.py:{TINY}"


def command(tmp, *args) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # one CPU device, as a user runs it; conftest's fast compiles
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
  return subprocess.run([sys.executable, "-m", "benchmarks.presets", SPEC, "--ledger",
                         str(tmp / "ledger.jsonl"), "--workdir", str(tmp / "runs"), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("presets")
  proc = command(tmp, "--seeds", "0", "1", "--note", "test")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return tmp, proc


def test_run_appends_one_complete_record_per_seed(recorded):
  tmp, _ = recorded
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
  records = presets_report.read_ledger(str(tmp / "ledger.jsonl"))
  assert [r["seed"] for r in records] == [0, 1]
  for r in records:
    assert r["config"] == SPEC and r["config_file"] == "configs/vit_tiny.py" and r["presets"] == []
    assert r["overrides"]["model_options.width"] == "16" and r["role"] == "report" and r["note"] == "test"
    assert r["resolved"]["seed"] == r["seed"] and r["resolved"]["total_steps"] == 3
    assert r["resolved"]["model_options"]["width"] == 16
    assert r["commit"] == head and isinstance(r["dirty"], bool)
    with open(os.path.join(r["workdir"], "metrics.jsonl")) as f:
      lines = [json.loads(line) for line in f]
    final = {k.split("/", 1)[1]: v for k, v in lines[-1].items() if k.startswith("test/")}
    assert r["metrics"]["test"] == final and set(final) == {"loss", "accuracy"}
    (validation,) = [line for line in lines if any(k.startswith("validation/") for k in line)]
    assert r["metrics"]["validation"] == {k.split("/", 1)[1]: v for k, v in validation.items() if "/" in k}
    assert set(r["metrics"]) == {"test", "validation"}  # the loop's time record is not a split
    assert r["final_split"] == "test" and r["timed_steps"] == 2
    assert 0 < r["train_seconds"] < r["wall_seconds"]
    for key in ("load_start", "load_end"):
      assert isinstance(r[key], float) and r[key] >= 0
    assert r["machine"]["cores"] == os.cpu_count() and r["machine"]["cpu"] and r["machine"]["jax"]
    assert r["date"][:2] == "20" and os.path.basename(r["workdir"]).endswith(f"-s{r['seed']}")


def test_a_used_workdir_is_refused_unless_fresh(recorded):
  tmp, _ = recorded
  before = (tmp / "ledger.jsonl").read_text()
  proc = command(tmp, "--seeds", "1")
  assert proc.returncode == 2 and proc.stdout == ""
  assert len(proc.stderr.strip().splitlines()) == 1 and "--fresh" in proc.stderr and "-s1" in proc.stderr
  assert (tmp / "ledger.jsonl").read_text() == before


def test_resume_continues_the_workdir_and_says_where_it_started(recorded):
  tmp, _ = recorded
  first = presets_report.read_ledger(str(tmp / "ledger.jsonl"))[0]
  proc = command(tmp, "--seeds", "0", "--resume")
  assert proc.returncode == 0, proc.stderr[-3000:]
  again = presets_report.read_ledger(str(tmp / "ledger.jsonl"))[-1]
  assert first["start_step"] == 0 and again["start_step"] == 3 and again["timed_steps"] == 0
  assert again["metrics"]["test"] == pytest.approx(first["metrics"]["test"])  # the same checkpoint, evaluated
  assert presets_report.time_cell([again]).startswith("— (every run was resumed")
  assert presets_report.time_cell([first, again]) == presets_report.time_cell([first])


def record(presets, spec: str, seed: int, role: str, metrics: dict, minutes: float, load: float = 0.2, **change):
  file, _, preset = spec.partition(":")
  config = presets.load_config_file(os.path.join(ROOT, file) + (f":{preset}" if preset else ""))
  config.seed = seed
  for key, value in change.items():
    config[key] = value
  return {"config": spec, "config_file": file, "presets": [preset] if preset else [], "overrides": {},
          "resolved": presets_report.resolved(config), "seed": seed, "role": role, "commit": "abcdef0123", "dirty": False,
          "metrics": metrics, "train_seconds": 60 * minutes, "timed_steps": config.total_steps - 1,
          "wall_seconds": 60 * minutes + 30, "load_start": load, "load_end": 0.1,
          "machine": {"cores": 2, "cpu": "Test CPU"}}


def strip_blocks(text: str) -> str:
  for name in ("presets", "gpt-default"):
    head, rest = text.split(f"<!-- {name}:begin -->")
    text = head + rest.split(f"<!-- {name}:end -->")[1]
  return text


def test_report_writes_the_ledgers_means_into_the_marked_blocks_only(tmp_path):
  acc = lambda a: {"test": {"accuracy": a, "loss": 0.3}, "validation": {"accuracy": a, "loss": 0.3}}  # noqa: E731
  default = [0.86, 0.88, 0.89]
  hybrid = {3: 0.921, 4: 0.915, 5: 0.93}
  records = [record(presets, "configs/vit_tiny.py", s, "report", acc(a), m, load)
             for s, a, m, load in zip((0, 1, 2), default, (3.0, 2.0, 4.0), (0.3, 1.7, 0.2))]
  records += [record(presets, "configs/vit_tiny.py:hybrid", s, "report", acc(a), 20.0) for s, a in hybrid.items()]
  records += [record(presets, "configs/vit_tiny.py:hybrid", s, "choose", acc(0.5), 20.0) for s in (0, 1, 2)]
  records.append(record(presets, "configs/vit_tiny.py:hybrid", 6, "report", acc(0.1), 20.0, total_steps=7))
  records.append({**record(presets, "configs/vit_tiny.py", 9, "report", acc(0.1), 1.0), "overrides": {"lr": "1"}})
  ppl = lambda v, t: {"validation": {"perplexity": v}, "test": {"perplexity": t}}  # noqa: E731
  records.append(record(presets, "configs/gpt_tiny.py", 0, "report", ppl(123.4, 130.2), 6.0))
  ledger, readme = tmp_path / "ledger.jsonl", tmp_path / "README.md"
  ledger.write_text("".join(json.dumps(r) + "\n" for r in records))
  shutil.copy(os.path.join(ROOT, "README.md"), readme)
  original = readme.read_text()

  assert presets.main(["--report", "--ledger", str(ledger), "--readme", str(readme)]) == 0
  text = readme.read_text()
  assert strip_blocks(text) == strip_blocks(original)
  block = text.split("<!-- presets:begin -->\n")[1].split("<!-- presets:end -->")[0]
  rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in block.splitlines() if line.startswith("| ")}
  mean = 100 * statistics.mean(default)
  assert rows["(default)"][3] == f"{mean:.1f} % (86.0 / 88.0 / 89.0, seeds 0, 1, 2)"
  assert rows["(default)"][4] == "3.0 min (wall 3.5 min; load 0.1–1.7: above half the 2 cores in seed 1)"
  assert rows["(default)"][2] == "1,200" and rows["(default)"][5] == "— |"
  assert rows["`:hybrid`"][3] == f"{100 * statistics.mean(hybrid.values()):.1f} % (92.1 / 91.5 / 93.0, seeds 3, 4, 5)"
  assert rows["`:hybrid`"][4] == "20.0 min (wall 20.5 min; load 0.1–0.2)"
  assert rows["`:full`"][3] == rows["`:full`"][4] == "not yet recorded"
  assert "`:hybrid` was chosen with seeds 0, 1, 2" in block and "1 record(s) of an earlier recipe set aside" in block

  p_stem, p_all, f_stem, f_all = presets_report.stem_share("configs/vit_tiny.py", "hybrid")
  assert p_stem == 9 * (1 * 64 + 64 * 128 + 2 * 128 * 128) + 2 * (64 + 3 * 128)  # 3x3 kernels + LayerNorms
  convs = conv_flops(28, (1, 64, 128, 128, 128), (2, 2, 1, 1))
  assert convs <= f_stem <= 1.05 * convs and f_stem < f_all  # + LayerNorm and GELU
  share = (f"{100 * p_stem / p_all:.0f} % of parameters ({p_stem:,} of {p_all:,}), "
           f"{100 * f_stem / f_all:.0f} % of FLOPs ({f_stem / 1e6:.1f}M of {f_all / 1e6:.1f}M) |")
  assert rows["`:hybrid`"][5] == share

  gpt = text.split("<!-- gpt-default:begin -->\n")[1].split("<!-- gpt-default:end -->")[0]
  assert "**validation perplexity 123.4**" in gpt and "(test 130.2; seed 0;" in gpt and "6.0 min" in gpt
  assert f"about {599 * 32 * 128 / 360:,.0f} tokens/s" in gpt

  assert presets.main(["--report", "--ledger", str(ledger), "--readme", str(readme)]) == 0
  assert readme.read_text() == text  # regenerating changes nothing


def conv_flops(size: int, channels: tuple, strides: tuple) -> float:
  """2 x the multiply-adds of 3x3 convolutions (padding 1) over the taps inside the image."""
  total = 0
  for cin, cout, stride in zip(channels, channels[1:], strides):
    out = size // stride
    taps = sum(0 <= stride * o + k - 1 < size for o in range(out) for k in range(3))
    total += 2 * taps * taps * cin * cout
    size = out
  return total
