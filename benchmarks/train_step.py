"""Training-step throughput of the presets: tokens/s, MFU, peak memory and where the step's time goes.

    PYTHONPATH=. python benchmarks/train_step.py [--presets tiny,small,small-dense,...] [--steps 60]
        [--steady-steps 200] [--trace] [--key=value ...]

One process per preset (a preset that runs out of memory cannot poison the next). Each process:

1. compiles the real `train.steps` train step of the preset (its model, optimizer, batch shape
   [grad_accum, micro_batch, L + 1]) as the training loop does (`train.memory.fit_train_step`: grad_accum
   "auto" resolved, XLA's memory estimate read), timing the compilation (every grad_accum "auto" tried); a
   step whose estimate cannot fit the device's memory is reported as "does not fit" with the estimate
   instead of being run;
2. device-bound timing: `--steps` steps on batches already on the device, dispatched back to back, timed
   in windows of 10 steps (a block at each window's end); the median window gives the step time;
3. loop timing: the same number of steps the way `train.loop.run` feeds them (the sampler draws each batch
   on the host, `train.prefetch.BatchPrefetcher` puts it on the device ahead of the step), blocking once at
   the end; loop minus device-bound time is what the host adds per step;
4. steady state: with `--steady-steps S`, the device-bound window tokens/s at step 50 and at step S;
5. with `--trace`, a `jax.profiler` trace of three steps whose device kernels are summed by name: the
   device-busy fraction of the traced wall time, the kernels that take the most of it, and every kernel's
   time summed by what it is (`KERNEL_GROUPS`: the expert op's, the router's, matrix products,
   attention, sorts, XLA's other fusions), so the whole step is accounted for, not only its top kernels.

Model FLOPs per token (`train.flops.model_flops_per_token`): 6 x active parameters (forward 2, backward 4
per parameter and token) + 12 x layers x context x d for the attention scores and values (the PaLM
appendix's count, causal masking not discounted). MFU divides achieved model FLOP/s by the bf16 matrix
rate of an 8192^3 product measured in the same run (`benchmarks/layer.py`'s `matmul_rate`).

Writes `--output` (default train_step.json: environment, rows) under $OUT when set, else
benchmarks/results/, and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

DEFAULT_PRESETS = (
    "tiny",
    "small",
    "small-dense",
    "small-omnimoe",
    "small-deepseekmoe",
    "small-gshard",
    "small-peer",
    "small-pkm",
)
WINDOW = 10  # steps per timed window
# Trace kernel names -> what they are: the first group with a key in the name decides (a substring, not a
# prefix: library kernels' names carry a namespace); anything else is "other".
KERNEL_GROUPS = (
    ("expert op", ("omni_expert_",)),
    ("router", ("omni_router_",)),
    ("other Pallas kernels", ("omni_", "embedding_bag", "row_dots")),
    ("matrix products", ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas", "triton_gemm")),
    ("attention", ("cudnn", "flash")),
    ("sorts", ("sort", "cub::")),
    ("XLA fusions", ("loop_", "input_", "fusion", "wrapped_", "copy", "transpose", "reduce")),
)
MATMUL_WORKER = ":matmul"  # the worker that measures the device's matrix rate

COLUMNS = [
    "preset",
    "status",
    "active_params",
    "compile_s",
    "step_ms",
    "tokens_per_s",
    "mfu",
    "loop_step_ms",
    "host_ms_per_step",
    "device_busy",
    "peak_gb",
    "estimate_gb",
    "steady_ratio",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    parser.add_argument("--steps", type=int, default=60, help="timed steps per measurement (>= 50)")
    parser.add_argument("--steady-steps", type=int, default=0, help="also time a window at this step (0: skip)")
    parser.add_argument("--trace", action="store_true", help="profile three steps and sum kernels by name")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per preset")
    parser.add_argument("--output", default="train_step.json", help="result file name, under $OUT or results/")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--matmul-flops", type=float, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.steps < WINDOW:
        parser.error(f"--steps={args.steps} must be >= {WINDOW}")
    if args.worker == MATMUL_WORKER:
        pathlib.Path(args.result).write_text(json.dumps(measure_device()))
        return
    if args.worker:
        result = measure(
            args.worker, args, overrides, save=lambda row: pathlib.Path(args.result).write_text(json.dumps(row))
        )
        pathlib.Path(args.result).write_text(json.dumps(result))
        return

    from benchmarks.common import RESULTS, print_table

    # The parent never touches the device: a process holding it (JAX preallocates 75% of a GPU's memory on
    # first use) would leave the preset workers a quarter of it.
    device = _run_child(MATMUL_WORKER, [], args.timeout)
    matmul = device["matmul"]
    print(f"matmul rate {matmul / 1e12:.3f} TFLOP/s", flush=True)
    rows = []
    for preset in args.presets.split(","):
        rows.append(_run_worker(preset, args, overrides, matmul))
        print(json.dumps(rows[-1]), flush=True)
    out = pathlib.Path(os.environ.get("OUT") or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    path = out / args.output
    run = {**device["environment"], "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])}
    path.write_text(json.dumps({**run, "bf16_matmul_flops": matmul, "columns": COLUMNS, "rows": rows}, indent=2) + "\n")
    print_table(rows, COLUMNS)
    print(f"wrote {path}")


def measure_device() -> dict:
    """The environment record and the matrix-product rate (FLOP/s) of this process's first device."""
    import jax

    from benchmarks.common import environment
    from benchmarks.layer import matmul_rate

    # 8192^3 saturates a GPU; a CPU (a smoke run) would take minutes over it.
    matmul = matmul_rate() if jax.default_backend() == "gpu" else cpu_matmul_rate()
    return {"environment": environment(), "matmul": matmul}


def cpu_matmul_rate() -> float:
    """The f32 matrix-product rate of a 1024^3 product (FLOP/s), for runs off a GPU."""
    import jax
    import jax.numpy as jnp

    from benchmarks.common import time_fn

    n = 1024
    pairs = [(jnp.ones((n, n)), jnp.ones((n, n)))]
    return 2 * n**3 / (time_fn(jax.jit(jnp.matmul), pairs, reps=3, batches=2)["ms"] * 1e-3)


def _run_child(worker: str, flags: list[str], timeout: float) -> dict:
    """Runs this script as `--worker=worker` and returns the JSON it wrote; raises if it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        result = pathlib.Path(tmp) / "result.json"
        command = [sys.executable, __file__, f"--worker={worker}", f"--result={result}", *flags]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0 or not result.is_file():
            raise RuntimeError(
                f"{worker} worker failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
            )
        return json.loads(result.read_text())


def _run_worker(preset: str, args, overrides: list[str], matmul: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = pathlib.Path(tmp) / "result.json"
        command = [
            sys.executable,
            __file__,
            f"--worker={preset}",
            f"--result={result}",
            f"--steps={args.steps}",
            f"--steady-steps={args.steady_steps}",
            f"--matmul-flops={matmul}",
            *(["--trace"] if args.trace else []),
            *overrides,
        ]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"preset": preset, "status": f"timed out after {args.timeout:.0f} s"}
        row = json.loads(result.read_text()) if result.is_file() else {"preset": preset}
        if proc.returncode == 0 and row.get("status"):
            return row
        tail = (proc.stdout + proc.stderr)[-1500:]
        kind = "out of memory" if "RESOURCE_EXHAUSTED" in tail or "out of memory" in tail.lower() else "failed"
        return {**row, "status": kind, "error": tail}  # with what was measured before it failed


def measure(preset: str, args, overrides: list[str], save) -> dict:
    """The row of one preset; `save(row)` keeps what is known so far, should a later part fail."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from train.config import AUTO_GRAD_ACCUM, apply_overrides, parse_overrides
    from train.flops import model_flops_per_token
    from train.loop import _prepare_data
    from train.memory import FIT_FRACTION, GB, StepDoesNotFitError, fit_train_step
    from train.prefetch import BatchPrefetcher
    from train.presets import get_preset

    config = apply_overrides(get_preset(preset), parse_overrides(overrides))
    flops = model_flops_per_token(config.model)
    row = {
        "preset": preset,
        "ffn": config.model.ffn_kind,
        "active_params": flops["active_parameters"],
        "model_flops_per_token": flops["model_flops_per_token"],
        "tokens_per_step": config.tokens_per_step,
    }
    device = jax.devices()[0]
    start = time.perf_counter()
    try:  # the loop's own compilation: "auto" resolved, a step that cannot fit refused with its estimate
        config, steps, train_step, fit = fit_train_step(config)
    except StepDoesNotFitError as err:
        row["compile_s"] = round(time.perf_counter() - start, 1)
        row["estimate_gb"] = None if err.estimate_bytes is None else round(err.estimate_bytes / GB, 2)
        estimate = "no estimate" if err.estimate_bytes is None else f"estimate {err.estimate_bytes / GB:.1f} GB"
        # "auto" refuses above FIT_FRACTION of the limit, an int grad_accum above the limit itself.
        bound = FIT_FRACTION if config.grad_accum == AUTO_GRAD_ACCUM else 1.0
        row["status"] = f"does not fit: {estimate} > {bound * err.limit_bytes / GB:.1f} GB"
        row["error"] = str(err)
        return row
    row["compile_s"] = round(time.perf_counter() - start, 1)
    shape = (config.grad_accum, config.micro_batch_size, config.model.context_length + 1)
    tokens_per_step = config.tokens_per_step
    row["batch_shape"] = list(shape)
    row["memory"] = fit.to_dict()
    row["estimate_gb"] = row["memory"]["estimate_gb"]
    save(row)

    state = steps.init_state(jax.random.key(config.seed))
    _, sampler, _ = _prepare_data(config, log=lambda line: None)  # the loop's own corpus and sampler
    batches = [jax.device_put(sampler.next().reshape(shape)) for _ in range(4)]
    for i in range(2):  # warm up (the first calls also allocate)
        state, metrics = train_step(state, batches[i])
    jax.block_until_ready(state)

    def device_bound_windows(count: int) -> list[float]:
        nonlocal state
        seconds = []
        for w in range(count // WINDOW):
            start = time.perf_counter()
            for i in range(WINDOW):
                state, _ = train_step(state, batches[(w * WINDOW + i) % len(batches)])
            jax.block_until_ready(state)
            seconds.append(time.perf_counter() - start)
        return seconds

    windows = device_bound_windows(args.steps)
    step_s = statistics.median(windows) / WINDOW
    row["step_ms"] = round(step_s * 1e3, 2)
    row["step_ms_min"] = round(min(windows) / WINDOW * 1e3, 2)
    row["step_ms_max"] = round(max(windows) / WINDOW * 1e3, 2)
    row["tokens_per_s"] = round(tokens_per_step / step_s)
    row["mfu"] = round(flops["model_flops_per_token"] * tokens_per_step / step_s / args.matmul_flops, 4)

    # The loop's way: host-drawn batches put on the device ahead of the step, one block at the end.
    prefetcher = BatchPrefetcher(lambda: sampler.next().reshape(shape), put=jax.device_put)
    with prefetcher:
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = train_step(state, prefetcher.next()[0])
        jax.block_until_ready(state)
    loop_s = (time.perf_counter() - start) / args.steps
    row["loop_step_ms"] = round(loop_s * 1e3, 2)
    row["host_ms_per_step"] = round((loop_s - step_s) * 1e3, 2)
    row["loop_tokens_per_s"] = round(tokens_per_step / loop_s)

    if args.steady_steps:
        done = 2 + len(windows) * WINDOW + args.steps
        later = device_bound_windows(max(WINDOW, args.steady_steps - done))
        row["steady_ratio"] = round(statistics.median(windows) / later[-1], 3)  # tokens/s late / early
        row["steady_step"] = done + len(later) * WINDOW
    if args.trace:

        def advance():
            nonlocal state
            state, _ = train_step(state, batches[0])  # the state is donated: each call takes the last one's
            return state

        row.update(_trace(advance, step_s))
    stats = device.memory_stats() or {}
    row["peak_gb"] = round(stats.get("peak_bytes_in_use", 0) / 1e9, 2) or None
    row["loss"] = float(np.asarray(jax.device_get(metrics["loss"])))
    row["loss_finite"] = bool(jnp.isfinite(row["loss"]))
    row["status"] = "ran"
    return row


def kernel_groups(kernels: dict[str, float]) -> dict[str, float]:
    """Summed time of `kernels` (name -> time) by KERNEL_GROUPS, largest first; "other" for the rest."""
    groups: dict[str, float] = collections.defaultdict(float)
    for name, time_spent in kernels.items():
        group = next(
            (group for group, keys in KERNEL_GROUPS if any(key in name for key in keys)),
            "other",
        )
        groups[group] += time_spent
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def _trace(step, step_s: float) -> dict:
    """Profile three steps; sum the device kernels' durations by name from the Perfetto trace. Busy is
    their sum over three untraced step times (the traced wall time also holds the profiler's start-up)."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        jax.block_until_ready(step())
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(3):
                last = step()
            jax.block_until_ready(last)
        files = sorted(pathlib.Path(tmp).rglob("*.json.gz"))
        if not files:
            return {"trace": "no trace file written"}
        with gzip.open(files[0]) as file:
            trace = json.loads(file.read())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in names.items() if "gpu" in name.lower() or "device" in name.lower()}
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in device_pids
    }
    # The device process also has op- and module-level rows spanning the kernels: count the streams only.
    streams = {key for key, name in threads.items() if "stream" in name.lower()} or None
    kernels: dict[str, float] = collections.defaultdict(float)
    for e in events:
        key = (e.get("pid"), e.get("tid"))
        on_stream = key in streams if streams is not None else e.get("pid") in device_pids
        if e.get("ph") == "X" and on_stream and "dur" in e:
            kernels[e["name"]] += e["dur"]
    busy = sum(kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:20]
    return {
        "device_busy": round(busy / (3 * step_s * 1e6), 3),
        "trace_processes": sorted(set(names.values())),
        "trace_streams": sorted(set(threads.values())),
        "top_kernels_ms_per_step": [[name[:120], round(us / 3e3, 3)] for name, us in top],
        "kernel_groups_ms_per_step": {group: round(us / 3e3, 3) for group, us in kernel_groups(kernels).items()},
        "kernels": len(kernels),
    }


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    main()
