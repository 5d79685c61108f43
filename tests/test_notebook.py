"""examples/attention_maps.ipynb runs top to bottom in a fresh kernel (nbclient, in a temporary
folder) and shows its figures inline; the copy in git carries no outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parents[1] / "examples" / "attention_maps.ipynb"


def test_the_notebook_in_git_has_no_outputs():
    """Outputs stay out of git: strip them before committing (e.g. `jupyter nbconvert
    --clear-output --inplace examples/attention_maps.ipynb`)."""
    nb = json.loads(NOTEBOOK.read_text())
    dirty = [
        i
        for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert dirty == [], (
        f"{NOTEBOOK.name}: code cells {dirty} hold outputs or execution counts; clear them with "
        f"jupyter nbconvert --clear-output --inplace {NOTEBOOK.relative_to(NOTEBOOK.parents[1])}"
    )


@pytest.mark.slow
def test_the_notebook_runs_and_shows_its_figures(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel inherits the test's environment (temporary HOME and caches: tests/conftest.py)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert errors == []
    figures = [i for i, c in enumerate(code) for o in c.outputs if "image/png" in o.get("data", {})]
    # the word's map, the loss curves, the patch, clean vs patched attention, the examples
    assert len(figures) == 5, figures
    assert (tmp_path / "runs" / "notebook" / "summary.json").is_file()  # written where it ran
