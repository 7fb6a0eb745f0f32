"""Every notebook in notebooks/ runs top to bottom (nbclient, kernel python3).

The notebooks are committed with their outputs; to refresh them after a change:

    python tests/test_notebooks.py                       # all of them
    python tests/test_notebooks.py notebooks/02_*.ipynb  # some of them

Notebooks that train read their budget from the environment (QUICK's variables):
the refresh above runs them at their defaults (the committed outputs), the
``test_notebook_runs`` check at QUICK's tiny budget (does it run, not what it says).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="no nbformat (pip install -e .[test])")
NotebookClient = pytest.importorskip("nbclient", reason="no nbclient (pip install -e .[test])").NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 1200  # catches a hung cell, far above what a cell needs on a loaded machine
MAX_TOTAL_BYTES = 3 * 2**20  # committed outputs (PNG figures) stay small
# The notebooks' budget knobs (defaults in the notebooks: 200 steps, 2,000 test images),
# set tiny for the test run.
QUICK = {"POSENC_NOTEBOOK_STEPS": "8", "POSENC_NOTEBOOK_EVAL_IMAGES": "100"}


def kernel_env(quick: bool = False) -> dict[str, str]:
  """A user's kernel environment (conftest's 8 simulated devices removed) that imports
  this checkout's posenc, whichever checkout an editable install points at.

  ``quick``: the notebooks' tiny budget (QUICK); otherwise their defaults, whatever
  the calling shell sets."""
  env = {k: v for k, v in os.environ.items() if k not in QUICK}
  if quick:
    env.update(QUICK)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  return env


def execute(path: Path, quick: bool = False) -> nbformat.NotebookNode:
  """Run ``path`` in its own directory; raises CellExecutionError on the first failing cell.
  ``quick``: at the tiny budget (QUICK), else at the notebooks' defaults."""
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(path.parent)}})
  client.execute(env=kernel_env(quick))
  return nb


def test_notebooks_exist():
  want = {"01_learned_position_embeddings.ipynb", "02_resolution_transfer.ipynb",
          "03_encodings_gallery.ipynb"}
  missing = want - {p.name for p in NOTEBOOKS}
  assert not missing, f"missing notebooks: {sorted(missing)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_with_outputs(path):
  """Read on a code host without running: every code cell was executed, none failed."""
  nb = nbformat.read(path, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, f"{path.name} has no code cells"
  unrun = [i for i, c in enumerate(code) if c.execution_count is None]
  assert not unrun, f"{path.name}: code cells {unrun} have no outputs; run python {__file__}"
  errors = [o.ename for c in code for o in c.outputs if o.output_type == "error"]
  assert not errors, f"{path.name} was committed with errors: {errors}"
  assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), \
      f"{path.name} has no figure"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_training_budget_from_env(path):
  """A notebook that trains takes its step count from POSENC_NOTEBOOK_STEPS, so that
  test_notebook_runs stays quick."""
  nb = nbformat.read(path, as_version=4)
  code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
  if "posenc.training import" in code:
    assert 'os.environ.get("POSENC_NOTEBOOK_STEPS"' in code, \
        f"{path.name} trains but does not read POSENC_NOTEBOOK_STEPS"


def test_committed_size():
  total = sum(p.stat().st_size for p in NOTEBOOKS)
  assert total < MAX_TOTAL_BYTES, f"notebooks take {total / 2**20:.1f} MiB; lower the figure dpi"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
  nb = execute(path, quick=True)
  errors = [o.ename for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors, errors


if __name__ == "__main__":  # re-execute and save the outputs
  for arg in sys.argv[1:] or NOTEBOOKS:
    start = time.time()
    path = Path(arg).resolve()
    nbformat.write(execute(path), path)
    print(f"{path.name}: {time.time() - start:.0f}s", flush=True)
