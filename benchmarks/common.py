"""Shared benchmark plumbing: timing, environment record, table printing, JSON results.

Timing method (see /work/.library/device/METHOD.md): compile and warm up first, then enqueue `reps` calls
back to back and block once at the end, so host dispatch overlaps device work and the per-call time is
device throughput; repeat that `batches` times and report the median (and the spread). Calls rotate over
several independently drawn input sets so an L2-resident input cannot flatter the number.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def time_fn(fn: Callable[..., Any], arg_sets: Sequence[tuple], *, reps: int = 20, batches: int = 5) -> dict:
    """Median milliseconds per call of the jitted `fn` over `arg_sets` (a list of argument tuples)."""
    jax.block_until_ready(fn(*arg_sets[0]))  # compile
    for args in arg_sets:
        jax.block_until_ready(fn(*args))  # warm up every input set
    per_call = []
    for _ in range(batches):
        start = time.perf_counter()
        out = None
        for i in range(reps):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - start) * 1e3 / reps)
    return {"ms": statistics.median(per_call), "ms_min": min(per_call), "ms_max": max(per_call)}


def environment() -> dict:
    """Device, library versions, date and the command line, stored with every result."""
    versions = {"python": platform.python_version(), "jax": jax.__version__}
    for name in ("jaxlib", "flax", "optax", "triton", "jax_triton"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # a missing optional package is recorded, not fatal
            versions[name] = None
    device = jax.devices()[0]
    return {
        "device": getattr(device, "device_kind", str(device)),
        "platform": device.platform,
        "cpu_count": os.cpu_count(),  # names a CPU run's machine, where device_kind says only "cpu"
        "versions": versions,
        "date": utc_now(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
    }


def utc_now() -> str:
    """The date and time a result is stamped with (UTC, ISO 8601, to the second)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain fixed-width table of the given columns (floats to 3 decimals)."""
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def copy_to_out(*paths: pathlib.Path, under: str = "") -> None:
    """Copy result files into $OUT (into its folder `under`, if given) when it is set: what the GPU machine's
    command leaves there comes back."""
    out = os.environ.get("OUT")
    if not out:
        return
    folder = pathlib.Path(out) / under
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        shutil.copy(path, folder / path.name)


def write_json_atomic(path: pathlib.Path, data: Any) -> None:
    """Write `data` as JSON to `path` through a temporary file in the same folder and a rename: a reader (or
    a sweep resumed after its process was killed) finds the whole file or none, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_results(name: str, rows: list[dict], **extra: Any) -> pathlib.Path:
    """benchmarks/results/<name>.json with the environment, the rows and any extra fields."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**environment(), **extra, "rows": rows}, indent=2) + "\n")
    return path


def plot_latency_bars(rows: list[dict], implementations: Sequence[str], what: str, path: pathlib.Path) -> None:
    """Forward and forward+backward bars per setting and implementation (log ms), each setting's floor as
    a tick: the PNG beside experts.json and layer.json. Rows: setting, impl, mode, ms (if run), floor_ms, d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    width = 0.8 / len(implementations)
    centres = [j + 0.4 - width / 2 for j in range(len(settings))]  # the middle of each setting's bars
    for ax, mode in zip(axes, ("forward", "forward+backward"), strict=True):
        for i, impl in enumerate(implementations):
            values = []
            for setting in settings:
                match = [r for r in rows if r["setting"] == setting and r["impl"] == impl and r["mode"] == mode]
                values.append(match[0].get("ms", float("nan")) if match else float("nan"))
            ax.bar([j + i * width for j in range(len(settings))], values, width, label=impl)
        floors = [next((r["floor_ms"] for r in rows if r["setting"] == s and r["mode"] == mode), 0) for s in settings]
        ax.scatter(centres, floors, marker="_", s=300, c="k", label="floor")
        ax.set_yscale("log")
        ax.set_title(f"{what} {mode}, bf16, d={rows[0]['d']}")
        ax.set_xticks(centres)
        ax.set_xticklabels([s.replace(" ", "\n") for s in settings], fontsize=7)
        ax.set_ylabel("ms (log)")
    axes[0].legend()
    fig.suptitle(environment()["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
