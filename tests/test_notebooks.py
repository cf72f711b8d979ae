"""Every notebook runs top to bottom on the CPU, and is committed without outputs.

OMNIMOE_NOTEBOOK_FAST=1 tells the notebooks to shrink their work to fit the default suite's budget.
"""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path.name}: a cell has stale outputs; clear them before committing"
            assert cell.execution_count is None, f"{path.name}: a cell has an execution count; clear outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    monkeypatch.setenv("OMNIMOE_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The kernel imports the repository's packages whether or not they are pip-installed.
    root = str(path.parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": root}})
    client.execute()  # raises CellExecutionError naming the failing cell
