"""benchmarks/repeatability.py: how repeats of one run are compared, its refusals, and its --quick mode end
to end (two training processes on the CPU, where XLA is deterministic: the repeats agree to the bit)."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import repeatability  # benchmarks/ is a folder of scripts, not a package


def _run(losses, val_loss, *, status="done"):
    run = {"status": status, "losses": dict(losses), "wall_s": 1.0}
    if status == "done":
        run.update(val_loss=val_loss, bits_per_byte=val_loss * 1.4, tokens_per_s=100.0)
    return run


def test_compare_finds_the_first_logged_step_where_repeats_part():
    same = [(25, 5.0), (50, 4.0), (75, 3.0)]
    parted = [(25, 5.0), (50, 4.000001), (75, 3.1)]
    row = repeatability.compare([_run(same, 2.0), _run(same, 2.0)])
    assert row["losses_identical"] and row["val_loss_identical"] and row["first_differing_step"] is None
    assert row["val_loss_spread"] == 0 and row["logged_steps"] == 3
    row = repeatability.compare([_run(same, 2.0), _run(parted, 2.25), _run(same, 2.0)])
    assert not row["losses_identical"] and not row["val_loss_identical"]
    assert row["first_differing_step"] == 50 and row["val_loss_spread"] == 0.25
    assert row["bits_per_byte_spread"] == pytest.approx(0.35)


def test_compare_needs_two_finished_repeats():
    row = repeatability.compare([_run([(25, 5.0)], 2.0), _run([], None, status="error")])
    assert row == {"repeats": 2, "finished": 1}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--settings", "default,fast"], "--settings: ['fast'] not among"),
        (["--repeats", "1"], "--repeats=1 must be >= 2"),
        (["--steps", "10", "--log-every", "20"], "--log-every=20 must be in [1, --steps=10]"),
        (["--ffn", "mlp"], "--ffn: "),
        (["--table_learning_rate_multiplier", "3"], "unrecognised arguments ['--table_learning_rate_multiplier', '3']"),
    ],
)
def test_command_line_refusals(argv, message, capsys):
    with pytest.raises(SystemExit):
        repeatability.main(["--quick", *argv])
    assert message in capsys.readouterr().err


def test_quick_repeats_agree_to_the_bit_on_the_cpu():
    overrides = repeatability.overrides("dense", steps=4, seed=0, learning_rate=4e-3, log_every=1, quick=True)
    (row,) = repeatability.run_settings(["default"], overrides, repeats=2, timeout_s=600)
    assert row["finished"] == 2, row.get("errors")
    assert row["logged_steps"] == 4
    assert row["losses_identical"] and row["val_loss_identical"] and row["val_loss_spread"] == 0
