"""benchmarks/speed.py --quick and benchmarks/study.py --quick run end to end and write well-formed,
self-consistent tables.

No timing is asserted (speed belongs in the benchmark's own output); the tests check that every
section ran, that each table is rectangular and complete, and that the printed numbers are the
ones derived from the recorded measurements. The quick profiles exist only for these tests: the
benchmarks run as a user runs them (one CPU device), compiled for compile speed rather than
runtime, and the study runs beside the speed runs (each keeps one core busy).
"""
from __future__ import annotations

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
  (conftest's), else in ``cache_dir``. (study.py keeps its own cache under its --workdir.)"""
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
  command = [sys.executable, os.path.join(ROOT, "benchmarks", "study.py"), "--quick",
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
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "speed.py"), "--quick",
                         "--out", str(out)], cwd=ROOT, env=speed_env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout, out


@pytest.mark.slow
def test_speed_quick_writes_well_formed_tables(quick_run):
  stdout, out = quick_run
  markdown = (out / "speed.md").read_text()
  assert stdout.strip() == markdown.strip()
  assert "shared with other jobs" in markdown
  found = tables(markdown)
  assert len(found) == 5, [t[0] for t in found]  # headline, ViT, BERT, eval, restore
  for table in found:
    assert len({len(row) for row in table}) == 1, table
    assert all(cell for row in table for cell in row), table
  headline, vit, bert, evaluation, restore = found
  assert [row[0].split()[0] for row in headline[1:]] == ["posenc", "Flax"]
  assert [row[2] for row in vit[1:]] == ["`learned`", "`none`"]
  assert [row[2] for row in bert[1:]] == ["`learned`"]
  assert [row[0] for row in evaluation[1:]] == ["8", "16"]
  assert restore[1][0] == "`learned`" and "posenc/" in restore[1][2]
  with open(out / "speed.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_speed_quick_numbers_follow_from_measurements(quick_run):
  _, out = quick_run
  markdown = (out / "speed.md").read_text()
  results = json.loads((out / "speed.json").read_text())
  vit_group = results["vit"][0]
  entries = {e["name"]: e for e in vit_group["entries"]}
  rate = lambda e: e["items"] / statistics.median(e["times"])
  for e in entries.values():
    assert len(e["times"]) == 2 and min(e["times"]) > 0  # two interleaved rounds, one call each
    assert e["flops"] > 0 and e["compile_s"] > 0 and e["xla_bytes"] > 0
  # Table cells are the medians' rates; the headline ratio is theirs.
  vit_rows = {row[2]: row for row in tables(markdown)[1][1:]}
  for name in ("learned", "none"):
    assert number(vit_rows[f"`{name}`"][3]) == pytest.approx(rate(entries[name]), rel=1e-3, abs=0.06)
  ratio = float(re.search(r"posenc / linen = ([\d.]+)×", markdown).group(1))
  expected = rate(entries["learned"]) / rate(entries["Flax linen reference"])
  assert ratio == pytest.approx(expected, abs=0.006)
  overhead = number(vit_rows["`learned`"][5].rstrip("%"))
  none_s = statistics.median(entries["none"]["times"])
  assert overhead == pytest.approx(100 * (statistics.median(entries["learned"]["times"]) / none_s - 1), abs=0.6)
  # Both ViTs do the same arithmetic: XLA's FLOP counts agree to within the extras of posenc's
  # step (gradient clipping, metrics), which are a few elementwise passes over the parameters.
  ours, linen = entries["learned"]["flops"], entries["Flax linen reference"]["flops"]
  assert ours == pytest.approx(linen, rel=0.15)


@pytest.mark.slow
def test_speed_sections_remeasure_one_and_keep_the_rest(quick_run, speed_env, tmp_path):
  _, out = quick_run
  for name in ("speed.md", "speed.json"):
    (tmp_path / name).write_bytes((out / name).read_bytes())
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "speed.py"), "--quick", "--sections",
                         "eval", "--out", str(tmp_path)], cwd=ROOT, env=speed_env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  before, after = (json.loads((d / "speed.json").read_text()) for d in (out, tmp_path))
  assert set(after["measured"]) == {"vit", "bert", "eval", "restore"}
  for section in ("vit", "bert", "restore"):
    assert after[section] == before[section] and after["measured"][section] == before["measured"][section]
  assert after["eval"] != before["eval"]  # measured again: new timings
  assert tables((tmp_path / "speed.md").read_text())[1:3] == tables((out / "speed.md").read_text())[1:3]


@pytest.fixture(scope="module")
def study_run(study_first):
  background, root = study_first
  first = background.result(timeout=600)
  assert first.returncode == 0, first.stderr[-4000:]
  # A number recorded under other settings (the same cell, e.g. before a budget change) is set aside.
  with open(root / "runs" / "quick" / "cells.jsonl", "a") as f:
    f.write(json.dumps(dict(family="vit", budget="other settings", posenc="learned", seed=0, mode="transfer",
                            size=28, accuracy=0.0, loss=9.0, seconds=1.0)) + "\n")
  again = subprocess.run(background.command, cwd=ROOT, env=quick_env(root / "jax_cache"), capture_output=True,
                         text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-4000:]
  return first, again, root


@pytest.mark.slow
def test_study_quick_tables_follow_from_its_cells(study_run):
  first, again, root = study_run
  markdown = (root / "out" / "study.md").read_text()  # the second run's report
  assert again.stdout.strip() == markdown.strip()
  results = json.loads((root / "out" / "study.json").read_text())
  found = tables(markdown)
  assert "`sinusoidal_scaled` is `posenc=sinusoidal,posenc_options.scale=0.028`." in markdown
  assert len(found) == 6  # (ViT, BERT) x (accuracy: no fine-tuning, fine-tuned; loss: no fine-tuning)
  kinds = [("accuracy", "transfer", 100, 0.051), ("accuracy", "finetune", 100, 0.051), ("loss", "transfer", 1, 5e-4)]
  for table, (family, (metric, mode, scale, tol)) in zip(found, [(f, k) for f in ("vit", "bert") for k in kinds]):
    spec = next(f for f in results["families"] if f["name"] == family)
    assert len(table[0]) == 1 + len(spec["sizes"]) and "(trained)" in " ".join(table[0])
    assert [row[0] for row in table[1:]] == [f"`{e}`" for e in spec["encodings"]]
    for row, posenc in zip(table[1:], spec["encodings"]):
      for cell, size in zip(row[1:], spec["sizes"]):
        values = [c[metric] for c in results["cells"]
                  if (c["family"], c["posenc"], c["mode"], c["size"]) == (family, posenc, mode, size)]
        assert len(values) == 1 and 0.0 <= values[0] <= (1.0 if metric == "accuracy" else 20.0)  # one seed
        assert number(cell) == pytest.approx(scale * values[0], abs=tol)
  with open(root / "out" / "study.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_study_resumes_from_its_record(study_run):
  """A second run finds every cell in cells.jsonl: it trains nothing and reports the same numbers."""
  first, again, _ = study_run
  assert "cells in" in first.stderr and "cells in" not in again.stderr
  # The ViT cells at another image size came from the trained model through init_from, its learned
  # position table resampled to the new grid.
  assert re.search(r"Initialised parameters from \S+/train28/checkpoints/\d+; transferred \(bicubic\): "
                   r"posenc/table \(16, 16\) -> \(4, 16\)", first.stderr), first.stderr[-4000:]
  assert "1 recorded cells were measured under other settings" in again.stderr
  assert tables(again.stdout) == tables(first.stdout)
