"""The README's quick start runs as written, so the first thing a user copies never rots."""

import importlib.util

from helpers import ROOT, run_readme_block


def test_quickstart_block_runs():
    stdout = run_readme_block("quickstart")
    assert "(1, 4096, 1024) (1, 4096, 16) float32" in stdout
    assert stdout.strip().endswith("1")


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
