"""Every notebook runs top to bottom on the CPU, and is committed without outputs.

OMNIMOE_NOTEBOOK_FAST=1 tells the notebooks to shrink their work to fit the default suite's budget.
OMNIMOE_RUN_DIR points the notebooks that study a training run at a directory of `python -m train`; the
default tests clear it (the notebooks then train their own runs), the slow test sets it.
"""

import ast
import json
import os
import pathlib
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from train import cli
from train.data import stdlib_root

ROOT = pathlib.Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
PACKAGES = ("omnimoe_jax", "pallas_kernels", "train")  # what pyproject.toml installs


def _installed_locations() -> dict[str, str]:
    """Where a plain interpreter started in notebooks/ (no PYTHONPATH) finds each of the project's packages."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = "import importlib.util as u, json; print(json.dumps({p: str(getattr(u.find_spec(p), 'origin', None)) "
    probe += f"for p in {PACKAGES!r}}}))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=NB_DIR, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


INSTALLED_HERE = all(
    o != "None" and pathlib.Path(o).resolve().is_relative_to(ROOT) for o in _installed_locations().values()
)
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
    # As a user runs it: the kernel started in notebooks/, without PYTHONPATH, importing the installed package
    # (`pip install -e .`, as CI does). Only where the interpreter's installed copy is another checkout (a
    # shared virtualenv) is this checkout put on the path, so the test checks this code, not that copy.
    if INSTALLED_HERE:
        monkeypatch.delenv("PYTHONPATH", raising=False)
    else:
        monkeypatch.setenv("PYTHONPATH", str(ROOT))
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NB_DIR)}})
    client.execute()  # raises CellExecutionError naming the failing cell


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path.name}: a cell has stale outputs; clear them before committing"
            assert cell.execution_count is None, f"{path.name}: a cell has an execution count; clear outputs"


def notebook_imports(path: pathlib.Path) -> set[str]:
    """The top-level modules a notebook's code cells import."""
    names = set()
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_imports_only_installed_packages(path):
    """A user's kernel has the installed packages, not the repository's tests/ folder (nor any local module)."""
    imports = notebook_imports(path)
    local = {p.stem for p in ROOT.iterdir() if p.suffix == ".py"}
    local |= {p.name for p in ROOT.iterdir() if p.is_dir() and p.name not in PACKAGES}  # tests, benchmarks, ...
    assert not imports & local, f"{path.name} imports {sorted(imports & local)}, which pip install does not install"
    assert "tests" not in imports, f"{path.name} imports the test suite; move what it needs into the library"


def test_notebook_imports_are_found_in_the_source():
    assert {"omnimoe_jax", "pallas_kernels", "jax"} <= notebook_imports(NB_DIR / "03_kernels.ipynb")


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
    overrides = ["--num_layers=2", "--context_length=32", "--hidden_size=32", "--ffn.intermediate_size=64"]
    overrides += ["--num_heads=2", "--ffn.num_experts=64", "--ffn.num_experts_per_token=4", "--batch_size=8"]
    overrides += ["--steps=6"]
    overrides += ["--warmup_steps=1", "--eval_every=3", "--eval_batches=1", "--log_every=3", f"--data={data}"]
    assert cli.main(["--run-dir", str(run_dir), *overrides]) == 0
    execute(path, monkeypatch, tmp_path, run_dir=run_dir)
