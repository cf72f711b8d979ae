"""The console of `python -m train`: a live `tqdm` progress bar on a terminal, the plain lines elsewhere.

On a terminal the bar moves every step from the first one on (steps done, steps/s and an ETA, both
smoothed by tqdm's moving average), with the latest train record's loss and tokens/s and the latest eval's
bits/byte beside it; the loop's lines print above it. Advancing the bar reads nothing from the device: the
numbers are those the loop already fetched for its last record (every `log_every` steps), so the bar adds
no host sync. Off a terminal (CI, a log file, a notebook), or with a `log` function of the caller's, there
is no bar and the lines are printed exactly as before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

# Weight of the newest step in tqdm's moving averages of the rate (so of the ETA): low enough that one
# slow step (an evaluation, a checkpoint) does not swing the ETA, high enough to follow a real change.
SMOOTHING = 0.05
MININTERVAL = 0.2  # seconds between redraws (tqdm's throttle): every step counts, not every step redraws


class Progress:
    """A progress bar over steps [0, total), shown when `enabled` (default: `file` is a terminal).

    Use as a context manager; `start(step, log, metrics_log)` opens the bar at the first step of this
    run (a resumed run starts past 0) and returns the `log` to use from then on.
    """

    def __init__(self, total: int, *, enabled: bool | None = None, file: TextIO | None = None):
        self.total = total
        self.file = file if file is not None else sys.stdout
        self.enabled = _is_terminal(self.file) if enabled is None else enabled
        self.bar: tqdm | None = None
        self.postfix: dict[str, str] = {}

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def start(self, step: int, log: Callable[[str], None], metrics_log: Any = None) -> Callable[[str], None]:
        """Open the bar at `step` and watch `metrics_log`'s records; the returned log prints above the bar."""
        if not self.enabled:
            return log
        self.bar = tqdm(
            total=self.total,
            initial=step,
            file=self.file,
            unit="step",
            dynamic_ncols=True,
            smoothing=SMOOTHING,
            mininterval=MININTERVAL,
            desc="train",
        )
        if metrics_log is not None:
            metrics_log.subscribe(self.record)
        return self.write

    def write(self, line: str) -> None:
        tqdm.write(line, file=self.file)

    def advance(self, step: int) -> None:
        """The loop finished (dispatched) `step`: host bookkeeping only, nothing waits for the device."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def record(self, record: dict[str, Any]) -> None:
        """Show the numbers of a metrics record beside the bar (train: loss, tokens/s; eval: bits/byte)."""
        if self.bar is None:
            return
        if record.get("kind") == "train":
            self.postfix["loss"] = f"{record['loss']:.4f}"
            self.postfix["tok/s"] = f"{record['tokens_per_s']:,.0f}"
        elif record.get("kind") == "eval":
            bits = record.get("bits_per_byte")
            self.postfix["val"] = f"{bits:.3f} bits/byte" if bits is not None else f"{record['val_loss']:.4f}"
        else:
            return
        self.bar.set_postfix(self.postfix, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _is_terminal(file: TextIO) -> bool:
    isatty = getattr(file, "isatty", None)
    return bool(isatty and isatty())
