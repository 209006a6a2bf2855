"""examples/transfer_learning.ipynb runs top to bottom at CI sizes (its settings cell reads them from
the environment), and it is committed without outputs (the rendered run is the .html beside it)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "transfer_learning.ipynb"
# Small, but every step still does its work (README, "Notebook").
# 96 px: the random export (the real weights are 224 px only; tests/test_pretrained.py covers them).
CI_SIZES = {"FLOWERS_NB_IMAGES": "40", "FLOWERS_NB_EPOCHS": "2", "FLOWERS_NB_SWEEP_IMAGES": "40",
            "FLOWERS_NB_IMAGE_SIZE": "96", "FLOWERS_NB_SWEEP_CONFIGS": "naive,featcache"}


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "no code cells"
    assert all(not c.outputs and c.execution_count is None for c in code), \
        "clear the outputs before committing (jupyter nbconvert --clear-output --inplace ...)"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_notebook_runs_top_to_bottom(tmp_path, cache, monkeypatch):
    from nbclient import NotebookClient

    # The kernel inherits this environment: the sizes, this checkout's code, and the session's cache.
    for key, value in {**CI_SIZES, "FLOWERS_NB_OUT": str(tmp_path / "results"),
                       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
                       "CUDA_VISIBLE_DEVICES": "-1", "TF_CPP_MIN_LOG_LEVEL": "3"}.items():
        monkeypatch.setenv(key, os.environ.get(key, value) if key.startswith("FLOWERS_NB_") else value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Kernel "python3" from ipykernel: jupyter_client starts it with this interpreter (the venv's).
    # cwd examples/, as Jupyter opens the notebook; a cell that raises fails with CellExecutionError.
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]  # nbclient raises on one anyway
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Recommended:" in text and "exit code 0" in text, text[-2000:]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 7, f"{len(images)} figures"  # samples x3, confusion x2, grid, sweep plot
    print(f"notebook ran in {seconds:.0f} s")

