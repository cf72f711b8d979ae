"""Every notebook runs top to bottom on the CPU, and is committed without outputs.

OMNIMOE_NOTEBOOK_FAST=1 tells the notebooks to shrink their work to fit the default suite's budget.
OMNIMOE_RUN_DIR points the notebooks that study a training run at a directory of `python -m train`; the
default tests clear it (the notebooks then train their own runs), the slow test sets it.
"""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from train import cli
from train.data import stdlib_root

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# The notebooks that read OMNIMOE_RUN_DIR (found in their source, so a new one is covered automatically).
RUN_DIR_NOTEBOOKS = [p for p in NOTEBOOKS if "OMNIMOE_RUN_DIR" in p.read_text()]


def execute(path: pathlib.Path, monkeypatch, tmp_path: pathlib.Path, run_dir: pathlib.Path | None) -> None:
    monkeypatch.setenv("OMNIMOE_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # what the notebooks' tempfile.mkdtemp() writes goes with pytest's
    monkeypatch.setenv("MPLBACKEND", "Agg")
    if run_dir is None:
        monkeypatch.delenv("OMNIMOE_RUN_DIR", raising=False)
    else:
        monkeypatch.setenv("OMNIMOE_RUN_DIR", str(run_dir))
    # The kernel imports the repository's packages whether or not they are pip-installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError naming the failing cell


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path.name}: a cell has stale outputs; clear them before committing"
            assert cell.execution_count is None, f"{path.name}: a cell has an execution count; clear outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, monkeypatch, tmp_path):
    execute(path, monkeypatch, tmp_path, run_dir=None)


def test_the_four_notebooks_are_found():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_routing.ipynb",
        "03_kernels.ipynb",
        "04_training.ipynb",
    ]


def test_run_dir_notebooks_are_found():
    names = {p.name for p in RUN_DIR_NOTEBOOKS}
    assert {"02_routing.ipynb", "04_training.ipynb"} <= names, names


@pytest.mark.slow
@pytest.mark.parametrize("path", RUN_DIR_NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_studies_a_script_run(path, monkeypatch, tmp_path):
    """The OMNIMOE_RUN_DIR branch: a short run of the real `python -m train`, then the notebook reads it."""
    run_dir = tmp_path / "run"
    data = stdlib_root() / "argparse.py"  # one standard-library file: quick to load
    overrides = ["--num_layers=2", "--context_length=32", "--hidden_size=32", "--intermediate_size=64"]
    overrides += ["--num_heads=2", "--num_experts=64", "--num_experts_per_token=4", "--batch_size=8", "--steps=6"]
    overrides += ["--warmup_steps=1", "--eval_every=3", "--eval_batches=1", "--log_every=3", f"--data={data}"]
    assert cli.main(["--run-dir", str(run_dir), *overrides]) == 0
    execute(path, monkeypatch, tmp_path, run_dir=run_dir)
