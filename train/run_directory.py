"""One writer per run directory, and the directory's misuse errors.

`RunLock` is an exclusive `fcntl.flock` on <run_dir>/lock, taken before the run writes anything. The
kernel drops the lock when its process dies (a SIGKILL included), so a crashed run never leaves a stale
lock behind; the file itself stays, holding the pid of its last holder, which a refused second process
names in its error.
"""

from __future__ import annotations

import fcntl
import os
import pathlib


class RunDirectoryError(ValueError):
    """A run directory that cannot be used: a new run over an old one, a resume without a checkpoint that
    verifies, a directory another process is writing."""


LOCK_FILE = "lock"


class RunLock:
    """Holds <run_dir>/lock exclusively while entered; `enabled=False` (the other processes of a
    multi-process run, whose process 0 holds it for the job) takes nothing."""

    def __init__(self, run_dir: str | pathlib.Path, *, enabled: bool = True):
        self.path = pathlib.Path(run_dir) / LOCK_FILE
        self.enabled = enabled
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        # No O_TRUNC: a refused process must still read the holder's pid.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirectoryError(
                f"run directory {str(self.path.parent)!r} is in use: process {holder} holds {str(self.path)!r} "
                "(one process writes a run at a time; wait for it to finish or stop it)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None
