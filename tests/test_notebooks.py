"""Every notebook in notebooks/ executes without error, and is committed with its outputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

nbclient = pytest.importorskip(
    "nbclient", reason="needs the notebooks extra: pip install -e '.[notebooks]'"
)
nbformat = pytest.importorskip("nbformat", reason="needs the notebooks extra")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def test_the_three_journeys_are_there():
    names = [path.stem for path in NOTEBOOKS]
    assert names == ["01_top_eigenvalues", "02_damped_solves", "03_spectral_density"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_executes(path):
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError, with the failing cell, on any error


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_is_committed_with_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells), "run build_notebooks.py"
    outputs = [output for cell in code_cells for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs), "no plot saved"


def test_notebooks_match_their_generator():
    """The committed sources are those of notebooks/build_notebooks.py (rebuild after editing)."""
    spec = importlib.util.spec_from_file_location(
        "build_notebooks", NOTEBOOK_DIR / "build_notebooks.py"
    )
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    for path in NOTEBOOKS:
        committed = [cell.source for cell in nbformat.read(path, as_version=4).cells]
        generated = [cell.source for cell in builder.build(path.stem).cells]
        assert committed == generated, f"{path.name} differs from build_notebooks.py"
