"""``python -m benchmarks.speed --quick`` and ``python -m benchmarks.study --quick`` run end to end and write well-formed,
self-consistent tables.

No timing is asserted (speed belongs in the benchmark's own output); the tests check that every
section ran, that each table is rectangular and complete, and that the printed numbers are the
ones derived from the recorded measurements. The quick profiles exist only for these tests: the
benchmarks run as a user runs them (one CPU device), compiled for compile speed rather than
runtime, and the study runs beside the speed runs (each keeps one core busy).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def quick_env(cache_dir) -> dict[str, str]:
  """The environment of a quick benchmark run: one CPU device, as a user runs it (conftest's
  simulated devices are for the in-process tests), fast compiles (conftest's flags: the quick runs'
  numbers are not used), and every compile cached for the test's next run: in the session's cache
  (conftest's), else in ``cache_dir``. (benchmarks.study keeps its own cache under its --workdir.)"""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags).strip()
  env.update(JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir))
  return env


def tables(markdown: str) -> list[list[list[str]]]:
  """Every markdown table as rows of stripped cells (header first, separator dropped)."""
  out, current = [], []
  for line in markdown.splitlines() + [""]:
    if line.startswith("|"):
      current.append([c.strip() for c in line.strip().strip("|").split("|")])
    elif current:
      out.append(current)
      current = []
  for table in out:
    assert all(re.fullmatch(r":?-+:?", c) for c in table[1]), table[1]
    del table[1]
  return out


def number(cell: str) -> float:
  return float(cell.replace(",", "").split()[0])


class Background:
  """A benchmark command running in a subprocess, its output in files (a pipe could fill and stall it)."""

  def __init__(self, command: list[str], env: dict, directory):
    self.command, self.directory = command, directory
    self.files = [open(directory / name, "w+") for name in ("stdout.txt", "stderr.txt")]
    self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.files[0], stderr=self.files[1],
                                 text=True)

  def result(self, timeout: float) -> subprocess.CompletedProcess:
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.stop()
      raise
    stdout, stderr = ((self.directory / name).read_text() for name in ("stdout.txt", "stderr.txt"))
    return subprocess.CompletedProcess(self.command, self.proc.returncode, stdout, stderr)

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
    for f in self.files:
      f.close()


@pytest.fixture(scope="module")
def study_first(tmp_path_factory):
  """The quick study's first run, started in the background: the study and the speed runs are each
  one busy core (tracing and compiling), so on two cores they overlap."""
  root = tmp_path_factory.mktemp("study")
  command = [sys.executable, "-m", "benchmarks.study", "--quick",
             "--workdir", str(root / "runs"), "--out", str(root / "out")]
  run = Background(command, quick_env(root / "jax_cache"), root)
  yield run, root
  run.stop()


def study_selected(request) -> bool:
  """Whether a selected test uses the study (not under pytest-xdist, whose workers overlap already)."""
  return (not os.environ.get("PYTEST_XDIST_WORKER")
          and any("study_run" in getattr(item, "fixturenames", ()) for item in request.session.items))


@pytest.fixture(scope="module")
def speed_env(tmp_path_factory):
  return quick_env(tmp_path_factory.mktemp("speed_jax_cache"))


@pytest.fixture(scope="module")
def quick_run(request, tmp_path_factory, speed_env):
  if study_selected(request):
    request.getfixturevalue("study_first")  # starts it, to run beside this one
  out = tmp_path_factory.mktemp("speed")
  proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--quick",
                         "--out", str(out)], cwd=ROOT, env=speed_env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout, out


def timm_importable() -> bool:
  """Whether install.sh installed benchmarks/requirements.txt (timm, a benchmark-only contender, in
  its own directory): CI installs it, so the timm rows must be there."""
  site = os.environ.get("POSENC_BENCH_SITE") or os.path.expanduser("~/.cache/posenc/bench-site")
  return os.path.isdir(os.path.join(site, "timm")) or importlib.util.find_spec("timm") is not None


def ratio_cell(cell: str) -> tuple[float, float, float]:
  """``"1.23× (0.98–1.40)"`` -> (1.23, 0.98, 1.40)."""
  found = re.fullmatch(r"([\d.]+)× \(([\d.]+)–([\d.]+)\)", cell)
  assert found, cell
  return tuple(float(x) for x in found.groups())


@pytest.mark.slow
def test_speed_quick_writes_well_formed_tables(quick_run):
  stdout, out = quick_run
  markdown = (out / "speed.md").read_text()
  assert stdout.strip() == markdown.strip()
  assert "shared with other jobs" in markdown
  found = tables(markdown)
  # headline (contenders, ratios + ceiling, compile times), ViT, BERT, GPT, eval, restore
  assert len(found) == 8, [t[0] for t in found]
  for table in found:
    assert len({len(row) for row in table}) == 1, table
    assert all(cell for row in table for cell in row), table
  contenders, ratios, compiles, vit, bert, gpt, evaluation, restore = found
  assert timm_importable(), "run install.sh: it installs benchmarks/requirements.txt"
  assert [row[1].split()[0] for row in contenders[1:]] == ["posenc", "posenc,", "Flax", "timm"]
  assert contenders[2][1] == "posenc, scanned layers"  # the CPU default unrolls; the other mode is scanned
  assert [row[0] for row in ratios[1:]] == [contenders[1][0]]  # one headline group in the quick profile
  assert "timm: torch " in markdown and "torch threads (= the host's" in markdown
  assert contenders[-1][4] == "— (eager)"
  assert [row[0] for row in compiles[1:]][:2] == ["posenc, unrolled layers (this backend's default)",
                                                  "posenc, scanned layers"]
  assert [row[2] for row in vit[1:]] == ["`learned`", "`none`"]
  assert [row[2] for row in bert[1:]] == ["`learned`"]
  assert [row[2] for row in gpt[1:]] == ["`alibi`"] and gpt[1][10] == "XLA"  # no cuDNN on a CPU
  assert [row[0] for row in evaluation[1:]] == ["8", "16"]
  assert restore[1][0] == "`learned`" and "posenc/" in restore[1][2]
  with open(out / "speed.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_speed_quick_numbers_follow_from_measurements(quick_run):
  _, out = quick_run
  markdown = (out / "speed.md").read_text()
  results = json.loads((out / "speed.json").read_text())
  found = tables(markdown)
  median = statistics.median
  rate = lambda e: e["items"] / median(e["times"])
  # --- headline: posenc vs linen vs timm, timed in the same two rounds as the ceiling's matmuls
  group = results["headline"]["groups"][0]
  entries = {e["name"]: e for e in group["entries"]}
  assert len(group["ceiling"]) == 12  # 4 projections x (forward, input gradient, weight gradient)
  for e in group["entries"] + group["ceiling"]:
    assert len(e["times"]) == 2 and min(e["times"]) > 0  # two interleaved rounds, one call each
  for name in ("posenc", "posenc, scanned layers", "Flax linen reference"):
    e = entries[name]
    assert e["flops"] > 0 and e["compile_s"] > 0 and e["xla_bytes"] > 0
  assert entries["timm"]["compile_s"] is None and entries["timm"]["flops"] is None  # eager: no compile, no XLA count
  rows = {row[1].split(" (")[0].split(" `")[0]: row for row in found[0][1:]}
  for label, name in (("posenc", "posenc"), ("Flax linen reference", "Flax linen reference"), ("timm", "timm")):
    if name in entries:
      assert number(rows[label][2]) == pytest.approx(rate(entries[name]), rel=1e-3, abs=0.06)
  ours = entries["posenc"]

  def ratio(other):
    per_round = [(ours["items"] / a) / (other["items"] / b) for a, b in zip(ours["times"], other["times"])]
    return rate(ours) / rate(other), min(per_round), max(per_round)

  ratios = found[1][1]
  for column, name in ((1, "timm"), (2, "Flax linen reference")):
    if name in entries:
      assert ratio_cell(ratios[column]) == pytest.approx(ratio(entries[name]), abs=0.006)
  bold = re.search(r"posenc / linen = ([\d.]+)×", markdown)
  assert float(bold.group(1)) == pytest.approx(ratio(entries["Flax linen reference"])[0], abs=0.006)
  if "timm" in entries:
    bold = re.search(r"posenc / timm = ([\d.]+)×", markdown)
    assert float(bold.group(1)) == pytest.approx(ratio(entries["timm"])[0], abs=0.006)
  # The ceiling: the 12 matmuls' FLOPs over their time; posenc's step FLOP/s as a fraction of it.
  ceiling = sum(e["flops"] for e in group["ceiling"]) / sum(median(e["times"]) for e in group["ceiling"])
  assert number(ratios[3]) == pytest.approx(ceiling / 1e9, abs=0.06)
  fraction = ours["flops"] / median(ours["times"]) / ceiling
  assert number(ratios[5].split()[0].rstrip("%")) == pytest.approx(100 * fraction, abs=0.6)
  assert number(found[0][1][6].rstrip("%")) == pytest.approx(100 * fraction, abs=0.6)
  # Compile times: the recorded ones.
  compiles = {row[0]: row for row in found[2][1:]}
  assert number(compiles["posenc, unrolled layers (this backend's default)"][1]) == pytest.approx(
      ours["compile_s"], abs=0.06)
  assert number(compiles["posenc, scanned layers"][1]) == pytest.approx(
      entries["posenc, scanned layers"]["compile_s"], abs=0.06)
  # Both ViTs do the same arithmetic: XLA's FLOP counts agree to within the extras of posenc's
  # step (gradient clipping, metrics), which are a few elementwise passes over the parameters.
  assert ours["flops"] == pytest.approx(entries["Flax linen reference"]["flops"], rel=0.15)
  # --- ViT table: cells are the medians' rates; overhead vs `none` from the medians
  vit_group = results["vit"][0]
  vit_entries = {e["name"]: e for e in vit_group["entries"]}
  vit_rows = {row[2]: row for row in found[3][1:]}
  for name in ("learned", "none"):
    assert number(vit_rows[f"`{name}`"][3]) == pytest.approx(rate(vit_entries[name]), rel=1e-3, abs=0.06)
  overhead = number(vit_rows["`learned`"][5].rstrip("%"))
  none_s = median(vit_entries["none"]["times"])
  assert overhead == pytest.approx(100 * (median(vit_entries["learned"]["times"]) / none_s - 1), abs=0.6)
  # --- restore: with the transfer built once over a plain restore of the same checkpoint
  row = results["restore"][0]
  assert len(row["plain_times"]) == len(row["transfer_times"]) == 3
  per = [m / p for p, m in zip(row["plain_times"], row["transfer_times"])]
  expected = (median(row["transfer_times"]) / median(row["plain_times"]), min(per), max(per))
  assert ratio_cell(found[7][1][8]) == pytest.approx(expected, abs=0.006)
  bold = re.search(r"Restore with transfer / plain restore: `learned` ([\d.]+)×", markdown)
  assert float(bold.group(1)) == pytest.approx(expected[0], abs=0.006)


@pytest.mark.slow
def test_speed_sections_remeasure_one_and_keep_the_rest(quick_run, speed_env, tmp_path):
  _, out = quick_run
  for name in ("speed.md", "speed.json"):
    (tmp_path / name).write_bytes((out / name).read_bytes())
  proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--quick", "--sections",
                         "eval", "--out", str(tmp_path)], cwd=ROOT, env=speed_env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  before, after = (json.loads((d / "speed.json").read_text()) for d in (out, tmp_path))
  assert set(after["measured"]) == {"headline", "vit", "bert", "gpt", "eval", "restore"}
  for section in ("headline", "vit", "bert", "gpt", "restore"):
    assert after[section] == before[section] and after["measured"][section] == before["measured"][section]
  assert after["eval"] != before["eval"]  # measured again: new timings
  assert tables((tmp_path / "speed.md").read_text())[:5] == tables((out / "speed.md").read_text())[:5]


@pytest.mark.slow
def test_device_check_dry_run_reports_every_step_and_flops_count_again(speed_env, tmp_path):
  """benchmarks/device_check.sh --dry-run: every step runs and passes on this CPU (synthetic batches), and
  benchmarks.speed --count-flops fills in a report's missing GFLOP/step with the counts the run itself made."""
  proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_check.sh"), "--dry-run", str(tmp_path)],
                        cwd=ROOT, env=speed_env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  (steps,) = tables((tmp_path / "device_check.md").read_text())
  assert [row[0] for row in steps[1:]] == ["pytest -m accelerator"] + [
      f"benchmarks.speed --quick --synthetic --sections {s}" for s in ("vit", "gpt", "headline", "restore", "eval")]
  assert all(row[1] == "passed" for row in steps[1:]), steps
  markdown = (tmp_path / "speed.md").read_text()
  assert "Batches are synthetic" in markdown and "synthetic 3-channel images, 1,000 classes" in markdown
  measured = json.loads((tmp_path / "speed.json").read_text())
  assert set(measured["measured"]) == {"vit", "gpt", "headline", "restore", "eval"}
  assert all(g["loader"] is None for g in measured["vit"] + measured["gpt"])  # nothing to read: synthetic
  blank = json.loads(json.dumps(measured))
  for g in blank["vit"] + blank["gpt"]:
    for e in g["entries"]:
      e["flops"] = None
  (tmp_path / "speed.json").write_text(json.dumps(blank))
  proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--quick", "--synthetic",
                         "--count-flops", "--out", str(tmp_path)], cwd=ROOT, env=speed_env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  counted = json.loads((tmp_path / "speed.json").read_text())
  for family in ("vit", "gpt"):
    for g, h in zip(counted[family], measured[family]):
      assert [e["flops"] for e in g["entries"]] == [e["flops"] for e in h["entries"]] and g["entries"][0]["flops"]
  assert "counted after the run by `--count-flops`" in (tmp_path / "speed.md").read_text()


@pytest.fixture(scope="module")
def study_run(study_first):
  background, root = study_first
  first = background.result(timeout=600)
  assert first.returncode == 0, first.stderr[-4000:]
  # A number recorded under other settings (the same cell, e.g. before a budget change) is set aside.
  with open(root / "out" / "study_cells_quick.jsonl", "a") as f:
    f.write(json.dumps(dict(family="vit", budget="other settings", posenc="learned", seed=0, mode="zoom",
                            size=16, accuracy=0.0, loss=9.0, seconds=1.0)) + "\n")
  again = subprocess.run(background.command, cwd=ROOT, env=quick_env(root / "jax_cache"), capture_output=True,
                         text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-4000:]
  return first, again, root


@pytest.mark.slow
def test_bias_sharing_quick_prints_one_row_per_case(speed_env):
  proc = subprocess.run([sys.executable, "-m", "benchmarks.bias_sharing", "--quick"],
                        cwd=ROOT, env=speed_env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  (table,) = tables(proc.stdout)
  header, *rows = table
  assert len(header) == 5 and [r[:2] for r in rows] == [["`cpb`", "vit 8"], ["`kerple`", "bert 16"]]
  for row in rows:
    ratio, low, high = ratio_cell(row[4])
    assert low - 0.01 <= ratio <= high + 0.01  # the ratio of medians lies among the per-round ratios (2 rounds)


@pytest.mark.slow
def test_step_profile_quick_attributes_every_thunk_to_a_part_of_the_step(speed_env, tmp_path):
  """The trace's thunks are found in the compiled module and sorted into the step's parts: the
  matmuls and attention products in the forward and the backward pass, the update after them."""
  proc = subprocess.run([sys.executable, "-m", "benchmarks.step_profile", "--quick", "--steps", "2",
                         "--out", str(tmp_path)], cwd=ROOT, env=speed_env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads((tmp_path / "step_profile.json").read_text())
  parts = result["categories"]
  for name in ("projection and MLP matmuls", "attention products (QKᵀ, PV, and what XLA fuses into them)"):
    assert parts[name]["forward"] > 0 and parts[name]["backward"] > 0, parts
  assert parts["optimizer update, gradient norm, finiteness"]["update"] > 0, parts
  assert "other elementwise and reductions" not in parts, parts  # every thunk of the ViT step has its place
  assert result["thunks"] > 20 and all(r["seconds"] > 0 for r in result["top"])
  (table, top) = tables(proc.stdout)
  assert len(table) == 1 + len(parts) and len(top) == 1 + len(result["top"])


@pytest.mark.slow
def test_loop_time_quick_reports_the_runs_own_phases(speed_env, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "benchmarks.loop_time", "--quick", "--out", str(tmp_path)],
                        cwd=ROOT, env=speed_env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads((tmp_path / "loop_time.json").read_text())
  p = result["phases"]
  assert result["steps"] == 5 and set(p) == {"total", "steps", "data", "logging", "evaluation", "checkpoints"}
  assert p["evaluation"] > 0 and abs(sum(v for k, v in p.items() if k != "total") - p["total"]) < 1e-6
  assert result["host_share_of_steps"] == pytest.approx((p["data"] + p["logging"] + p["checkpoints"]) / p["steps"])
  (table,) = tables(proc.stdout)
  assert [row[0] for row in table[1:]] == ["steps", "data", "logging", "checkpoints", "evaluation", "all"]


@pytest.mark.slow
def test_study_quick_tables_follow_from_its_cells(study_run):
  first, again, root = study_run
  markdown = (root / "out" / "study.md").read_text()  # the second run's report
  assert again.stdout.strip() == markdown.strip()
  results = json.loads((root / "out" / "study.json").read_text())
  found = [t for t in tables(markdown) if t[0][0] != "mode"]
  orderings = [t for t in tables(markdown) if t[0][0] == "mode"]  # image, LM and algo families: one table each
  assert len(orderings) == 3 and all(len(row) == 3 for t in orderings for row in t)
  assert "`sinusoidal_scaled` is `posenc=sinusoidal,posenc_options.scale=0.028`." in markdown
  spec = {f["name"]: f for f in results["families"]}
  assert list(spec) == ["vit", "bert", "gpt", "algo"]
  # Each family's tables in order: (family, metric, mode, sizes, percent?, tolerance of the printed digits)
  expected = [("vit", "accuracy", mode, sizes, 100, 0.051) for p in spec["vit"]["protocols"]
              for mode, sizes in ((p, spec["vit"]["sizes"]), (f"{p}+ft", spec["vit"]["finetune_sizes"]))]
  expected += [("bert", "accuracy", "transfer", spec["bert"]["sizes"], 100, 0.051),
               ("bert", "accuracy", "finetune", spec["bert"]["sizes"], 100, 0.051),
               ("bert", "loss", "transfer", spec["bert"]["sizes"], 1, 5e-4)]
  expected += [("gpt", "perplexity", mode, spec["gpt"]["sizes"], 1, 0.051) for mode in ("nonoverlap", "sliding")]
  expected += [("algo", "exact_match", task, spec["algo"]["sizes"], 100, 0.051) for task in spec["algo"]["tasks"]]
  assert len(found) == len(expected) == 10
  for table, (family, metric, mode, sizes, scale, tol) in zip(found, expected):
    assert len(table[0]) == 1 + len(sizes)
    assert [row[0] for row in table[1:]] == [f"`{e}`" for e in spec[family]["encodings"]]
    for row, posenc in zip(table[1:], spec[family]["encodings"]):
      for cell, size in zip(row[1:], sizes):
        values = [c[metric] for c in results["cells"]
                  if (c["family"], c["posenc"], c["mode"], c["size"]) == (family, posenc, mode, size)]
        assert len(values) == 1 and 0.0 <= values[0] <= (1.0 if scale == 100 else 1e4)  # one seed
        assert number(cell) == pytest.approx(scale * values[0], abs=tol)
  assert "Baselines on the same tokens" in markdown and results["baselines"]["gpt"]["unigram"] > 1
  with open(root / "out" / "study.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_study_resumes_from_its_record(study_run):
  """A second run finds every cell in cells.jsonl: it trains nothing and reports the same numbers."""
  first, again, _ = study_run
  assert "cells in" in first.stderr and "cells in" not in again.stderr
  # The ViT cells at another image size came from the trained model through init_from, its learned
  # position table resampled to the new grid.
  assert re.search(r"Initialised parameters from \S+/train16/checkpoints/\d+; transferred \(bicubic\): "
                   r"posenc/table \(16, 16\) -> \(4, 16\)", first.stderr), first.stderr[-4000:]
  assert "1 recorded cells were measured under other settings" in again.stderr
  assert tables(again.stdout) == tables(first.stdout)


def test_interleaved_rounds_settle_each_entry_untimed_and_keep_the_order():
  """``settle``: one untimed call per entry per round, right before its timed calls."""
  from benchmarks import timing
  calls = []
  entries = [timing.Timed(name, lambda name=name: calls.append(name) or 0, None, 1) for name in "ab"]
  timing.time_interleaved(entries, rounds=2, calls_per_round=2, settle=True)
  assert calls == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
  assert [len(e.times) for e in entries] == [4, 4]  # the settling calls are not recorded


def test_image_plot_draws_variants_in_their_own_row_beside_their_base():
  from benchmarks import study_report
  image = dict(kind="image", encodings=["learned", "rope", "none", "rope+dinov3", "learned+multires"])
  assert study_report.plot_rows(image) == [["learned", "rope", "none"], ["learned", "rope", "rope+dinov3",
                                                                         "learned+multires"]]
  assert study_report.plot_rows(dict(image, encodings=["learned", "none"])) == [["learned", "none"]]
  text = dict(kind="lm", encodings=["rope", "rope+yarn"])  # text variants share the one row
  assert study_report.plot_rows(text) == [["rope", "rope+yarn"]]


def test_longrope_row_past_the_trained_length_has_static_yarns_frequencies():
  from benchmarks import study
  import numpy as np
  from posenc.encodings import rope_scaling
  long = study.longrope_long_factor(32, 64, 16)
  assert long[0] == 1.0 and long[-1] == 16.0 and list(long) == sorted(long)  # fast pairs kept, slow ones / 16
  short = (1.0,) * 16
  for n, want in ((64, rope_scaling.rope_frequencies(32, 1e4, 64)[0]),
                  (256, rope_scaling.rope_frequencies(32, 1e4, 256, "yarn", original_length=64, factor=16)[0])):
    got, _ = rope_scaling.rope_frequencies(32, 1e4, n, "longrope", original_length=64, short_factor=short,
                                           long_factor=long)
    np.testing.assert_allclose(got, want, rtol=1e-5)
  variants = {label: args for label, _, args in study.gpt_variants(64, 1024, 32)}
  assert "posenc_options.factor=16" in variants["rope+llama3"] and "long_factor=(1.0," in variants["rope+longrope"]


def test_a_preempted_study_stops_with_one_message_and_keeps_its_cells(tmp_path, monkeypatch, capsys):
  """SIGTERM reaches the study as the run's Preempted (its step saved): one message, exit 128 + 15."""
  import signal

  from benchmarks import study
  from posenc.training.guard import Preempted

  def preempted(family, overrides, workdir):
    raise Preempted(f"Stopped by SIGTERM after step 7; saved {workdir}/checkpoints/7. Rerun the same command "
                    f"to resume from it.", signal.SIGTERM)

  monkeypatch.setattr(study, "run", preempted)
  code = study.main(["--quick", "--families", "gpt", "--seeds", "0", "--workdir", str(tmp_path / "runs"),
                     "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert code == 128 + signal.SIGTERM
  assert "Traceback" not in err and "Stopped by SIGTERM after step 7" in err
  assert f"The cells finished so far are kept in {tmp_path / 'out'}; the same study command resumes" in err
