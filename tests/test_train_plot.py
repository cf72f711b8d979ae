"""`python -m train.plot` on real run directories of `python -m train`."""

from __future__ import annotations

import contextlib
import io
import shutil

import matplotlib.image
import numpy as np
import pytest
from test_train_loop import SHRUNK

from train import cli, plot
from train.data import stdlib_root
from train.metrics import read_metrics


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run directory, what `python -m train` printed) of one shrunken run on one standard-library file."""
    run_dir = tmp_path_factory.mktemp("plot") / "tiny"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["--run-dir", str(run_dir), *SHRUNK, f"--data={stdlib_root() / 'argparse.py'}"]) == 0
    return run_dir, printed.getvalue()


@pytest.fixture
def run_dir(trained):
    return trained[0]


def test_a_run_ends_by_printing_the_plot_command(trained):
    run_dir, printed = trained
    assert printed.rstrip().splitlines()[-1] == f"curves: python -m train.plot {run_dir}"


def test_curves_are_the_records_against_tokens(run_dir):
    records = read_metrics(run_dir)
    curves = plot.run_curves(records)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    tokens_per_step = 8 * 32  # SHRUNK's batch x context
    assert (
        curves["train"]["tokens"]
        == [r["tokens_seen"] for r in train]
        == [s * tokens_per_step for s in (2, 4, 6, 8, 10)]
    )
    assert curves["train"]["loss"] == [r["loss"] for r in train]
    assert curves["eval"]["tokens"] == [5 * tokens_per_step, 10 * tokens_per_step]
    assert curves["eval"]["bits_per_byte"] == [r["bits_per_byte"] for r in evals]
    assert curves["eval"]["router_entropy"] == [r["routing"]["router_entropy"] for r in evals]
    assert "mfu" not in curves["train"]  # these records have none


def test_a_resumed_runs_retrained_steps_replace_the_earlier_records():
    start = {"kind": "start", "config": {"batch_size": 2, "model": {"context_length": 3}}}
    train = lambda step, loss: {"kind": "train", "step": step, "loss": loss, "tokens_per_s": 1.0, "mfu": 0.5}
    records = [start, train(1, 5.0), train(2, 4.0), start, train(2, 3.5), train(3, 3.0)]
    curves = plot.run_curves(records)
    assert curves["train"]["tokens"] == [6, 12, 18]
    assert curves["train"]["loss"] == [5.0, 3.5, 3.0]
    assert curves["train"]["mfu"] == [0.5, 0.5, 0.5]


def test_runs_overlay_with_a_legend_and_the_png_is_written(run_dir, tmp_path):
    other = tmp_path / "other-run"
    shutil.copytree(run_dir, other)
    fig = plot.make_figure([run_dir, other])
    loss_axes = fig.axes[0]
    labels = [t.get_text() for t in loss_axes.get_legend().get_texts()]
    assert labels == ["tiny train", "tiny val", "other-run train", "other-run val"]
    routing = fig.axes[3]
    assert {line.get_label() for line in routing.lines} >= {"tiny experts_used", "other-run router_entropy"}
    out = tmp_path / "both.png"
    assert plot.main([str(run_dir), str(other), "--out", str(out)]) == 0
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 500 and image.shape[1] > 800
    assert np.std(image[..., :3]) > 0.05  # curves drawn, not a blank canvas


def test_default_output_is_curves_png_in_the_first_run(run_dir, capsys):
    assert plot.main([str(run_dir)]) == 0
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == f"wrote {run_dir / 'curves.png'}"


def test_a_directory_without_metrics_is_named(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 2
    assert f"run_dir={str(tmp_path)!r} holds no metrics.jsonl" in capsys.readouterr().err
