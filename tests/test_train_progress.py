"""The console: a live progress bar on a terminal, the plain lines elsewhere (train/progress.py)."""

from __future__ import annotations

import io
import re
import sys

from test_train_loop import shrunk_config

from train import progress as progress_lib
from train.data import stdlib_root
from train.loop import run
from train.metrics import MetricsLog, read_metrics


class Terminal(io.StringIO):
    """What a user's terminal receives, as text."""

    def isatty(self) -> bool:
        return True


def test_off_a_terminal_there_is_no_bar_and_the_log_is_unchanged(tmp_path):
    out = io.StringIO()
    lines = []
    log = lines.append
    metrics_log = MetricsLog(tmp_path)
    with progress_lib.Progress(10, file=out) as progress:
        assert not progress.enabled
        assert progress.start(0, log, metrics_log) is log
        progress.advance(3)
    assert out.getvalue() == "" and not metrics_log.subscribers


def test_on_a_terminal_the_bar_moves_every_step_and_shows_the_last_record(tmp_path, monkeypatch):
    monkeypatch.setattr(progress_lib, "MININTERVAL", 0)  # draw every update, so each one can be checked
    out = Terminal()
    metrics_log = MetricsLog(tmp_path)
    with progress_lib.Progress(10, file=out) as progress:
        log = progress.start(4, print, metrics_log)  # a resumed run: the bar starts at step 4
        progress.advance(5)
        assert "5/10" in out.getvalue()
        metrics_log.write({"kind": "train", "step": 5, "loss": 2.25, "tokens_per_s": 1234.5})
        log("step      5/10 | loss 2.2500")
        metrics_log.write({"kind": "eval", "step": 5, "val_loss": 2.0, "bits_per_byte": 2.885})
        progress.advance(6)
    text = out.getvalue()
    assert re.search(r"6/10 .*loss=2\.2500, tok/s=1,234, val=2\.885 bits/byte", text), text
    assert "step      5/10 | loss 2.2500\n" in text  # the loop's line, printed above the bar


def test_a_run_on_a_terminal_shows_the_bar_from_the_first_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(progress_lib, "MININTERVAL", 0)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    config = shrunk_config(f"--data={stdlib_root() / 'argparse.py'}", "--log_every=5")  # the loop tests' compiled steps
    run(config, tmp_path / "run")
    monkeypatch.undo()
    text = terminal.getvalue()
    first_line = text.index("step      5/10 | loss")
    # Before the first logged line (step 5) the bar already counted steps 1..4.
    for step in range(1, 5):
        assert f"{step}/10 [" in text[:first_line], text[:first_line]
    train = next(r for r in read_metrics(tmp_path / "run") if r["kind"] == "train")
    assert f"loss={train['loss']:.4f}" in text[first_line:]  # the record's numbers beside the bar
