"""The README's quick start runs as written, so the first thing a user copies never rots."""

import importlib.util
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_block_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```python quickstart\n(.*?)^```$", readme, flags=re.S | re.M)
    assert len(blocks) == 1, "README.md must hold exactly one ```python quickstart block"
    result = subprocess.run([sys.executable, "-c", blocks[0]], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(1, 4096, 1024) (1, 4096, 16) float32" in result.stdout
    assert result.stdout.strip().endswith("1")


def test_results_tables_are_what_the_measurements_say():
    """The README's results block is exactly what benchmarks/report.py renders from benchmarks/results/*.json."""
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    readme = (ROOT / "README.md").read_text()
    start, stop = readme.find(report.BEGIN), readme.find(report.END)
    assert start >= 0 and stop > start, "README.md lacks the generated results block"
    assert readme[start : stop + len(report.END)] == report.render(), (
        "README results are stale: run `python benchmarks/report.py --write`"
    )
