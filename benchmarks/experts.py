"""omni_expert alone: implementation "xla" vs "pallas" (each forward variant), forward and forward+backward.

Settings (issue 4): bf16, d = 1024, T = 4096 with (N, K) in {(4096, 16), (16384, 32), (65536, 32),
(1048576, 32)}, the same at T = 16384, and the paper's (N = 102400, K = 512) at T in {1024, 4096, 16384}.
Indices are uniform random, weights uniform; every call rotates over independently drawn input sets.

Each row shows the time, the floor (the larger of FLOPs over the FP32 rate and the fewest bytes over the
measured copy bandwidth) and the time's multiple of that floor. Two more sections explain the time:
`--breakdown` times each kernel of the pallas path alone (and the XLA pieces between them) with the bytes
it gathers and the rate it achieves; `--sweep` tries a few block-size variations at the paper's setting.

    PYTHONPATH=. python benchmarks/experts.py [--budget-s 150] [--no-breakdown] [--no-sweep]

Writes benchmarks/results/experts.json and experts.png (and copies both to $OUT when it is set).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import time
import traceback

import jax
import jax.numpy as jnp

from benchmarks.common import copy_to_out, plot_latency_bars, print_table, time_fn, write_results
from pallas_kernels import _dispatch, omni_expert
from pallas_kernels.omni_expert import kernel
from pallas_kernels.omni_expert.config import MIN_DOT_DIM, default_config
from pallas_kernels.omni_expert.scheduling import build_schedule

D = 1024
DTYPE = jnp.bfloat16
# Priority order: what the targets are stated for first, so a time budget cuts the least important.
SETTINGS = [
    # (T, K, N)
    (4096, 512, 102400),
    (4096, 16, 4096),
    (4096, 32, 16384),
    (4096, 32, 65536),
    (4096, 32, 1048576),
    (1024, 512, 102400),
    (16384, 16, 4096),
    (16384, 32, 16384),
    (16384, 32, 65536),
    (16384, 32, 1048576),
    (16384, 512, 102400),
]
IMPLEMENTATIONS = ("pallas:token", "pallas:sorted", "xla")
INTERPRET = _dispatch.resolve_interpret(None)  # the kernels called directly: natively on a GPU only
# FP32 FMA rate of the CUDA cores (datasheet; the expert work has nothing for the matrix units).
FP32_FLOPS = {"H100": 67e12, "H200": 67e12}


# ---------------------------------------------------------------------------------------------------------
# Counting


def expected_distinct(pairs: int, num_experts: int) -> float:
    """Distinct experts among `pairs` uniform draws from N: N (1 - exp(-P/N))."""
    return num_experts * -math.expm1(-pairs / num_experts)


def work(tokens: int, top_k: int, num_experts: int, d: int, itemsize: int) -> dict:
    """FLOPs, fewest bytes (each input read once, each output written once), and bytes the kernels gather."""
    pairs = tokens * top_k
    rows = expected_distinct(pairs, num_experts) * d * itemsize  # touched rows of one table
    token_rows = tokens * d * itemsize
    forward = {
        "flops": 4 * pairs * d,
        # x, y; touched rows of up and down; indices and weights
        "bytes": 2 * token_rows + 2 * rows + 8 * pairs,
        # one row of one side per pair, per pass (2 passes)
        "gathered": 2 * pairs * d * itemsize,
    }
    backward = {
        "flops": 8 * pairs * d,
        # x, dy, dx; touched rows of up and down read; dense d_up, d_down written; indices, weights, s, dw
        "bytes": 3 * token_rows + 2 * rows + 2 * num_experts * d * itemsize + 16 * pairs,
        "gathered": 4 * pairs * d * itemsize,
    }
    both = {key: forward[key] + backward[key] for key in forward}
    return {"forward": forward, "forward+backward": both}


def copy_bandwidth(count: int = 2**28) -> float:
    """Measured device memory bandwidth (bytes/s): a copy of `count` f32 (1 GiB), bytes read plus written."""
    arrays = [jnp.full((count,), float(i), jnp.float32) for i in range(2)]
    timing = time_fn(jax.jit(lambda a: a + 1.0), [(a,) for a in arrays], reps=10, batches=3)
    return 2 * count * 4 / (timing["ms"] * 1e-3)


def flop_rate() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((rate for name, rate in FP32_FLOPS.items() if name in kind), None)


# ---------------------------------------------------------------------------------------------------------
# Inputs and the functions timed


@dataclasses.dataclass(frozen=True)
class Setting:
    tokens: int
    top_k: int
    num_experts: int
    d: int = D

    @property
    def label(self) -> str:
        return f"T={self.tokens} K={self.top_k} N={self.num_experts}"


def draw_inputs(setting: Setting, sets: int) -> list[tuple]:
    """`sets` independent (x, up, down, weights, indices, dy) tuples, drawn on the device."""

    @jax.jit
    def draw(key):
        kx, ku, kd, kw, ki, kc = jax.random.split(key, 6)
        t, n, k, d = setting.tokens, setting.num_experts, setting.top_k, setting.d
        scale = d**-0.5
        return (
            jax.random.normal(kx, (t, d), DTYPE),
            (scale * jax.random.normal(ku, (n, d), jnp.float32)).astype(DTYPE),
            (scale * jax.random.normal(kd, (n, d), jnp.float32)).astype(DTYPE),
            jax.random.uniform(kw, (t, k), jnp.float32) / k,
            jax.random.randint(ki, (t, k), 0, n, jnp.int32),
            jax.random.normal(kc, (t, d), DTYPE),
        )

    return [draw(jax.random.key(i)) for i in range(sets)]


def op_functions(implementation: str, setting: Setting):
    """(forward, forward+backward) jitted functions of (x, up, down, weights, indices, dy)."""
    if implementation == "xla":
        kwargs = {"implementation": "xla"}
    else:
        variant = implementation.split(":")[1]
        config = default_config(setting.tokens, setting.top_k, setting.num_experts, setting.d, DTYPE, variant=variant)
        kwargs = {"implementation": "pallas", "config": config}

    def forward(x, up, down, weights, indices, dy):
        del dy
        return omni_expert(x, up, down, weights, indices, **kwargs)

    def forward_backward(x, up, down, weights, indices, dy):
        _, vjp = jax.vjp(lambda *a: omni_expert(*a, indices, **kwargs), x, up, down, weights)
        return vjp(dy)

    return jax.jit(forward), jax.jit(forward_backward)


def is_out_of_memory(err: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower()


def timed(fn, arg_sets) -> dict:
    """time_fn with the repetitions scaled so one batch takes ~0.2 s (slow XLA cases would take minutes)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))  # compile and first run
    first_ms = (time.perf_counter() - start) * 1e3
    probe = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[-1]))
    once_ms = (time.perf_counter() - probe) * 1e3
    reps = int(min(50, max(3, 200 / max(once_ms, 1e-3))))
    result = time_fn(fn, arg_sets, reps=reps, batches=5 if once_ms < 20 else 3)
    return {**result, "compile_and_first_ms": first_ms, "reps": reps}


# ---------------------------------------------------------------------------------------------------------
# Sections


def main_table(settings: list[Setting], deadline, bandwidth, flops_rate) -> list[dict]:
    rows = []
    for setting in settings:
        tokens, top_k, num_experts, d = setting.tokens, setting.top_k, setting.num_experts, setting.d
        counts = work(tokens, top_k, num_experts, d, jnp.dtype(DTYPE).itemsize)
        arg_sets = None
        for implementation in IMPLEMENTATIONS:
            fns = op_functions(implementation, setting)
            for mode, fn in zip(("forward", "forward+backward"), fns, strict=True):
                row = {"setting": setting.label, "impl": implementation, "mode": mode}
                row.update(tokens=tokens, top_k=top_k, num_experts=num_experts, d=d, dtype=jnp.dtype(DTYPE).name)
                c = counts[mode]
                floor_s = max(c["bytes"] / bandwidth, c["flops"] / flops_rate if flops_rate else 0.0)
                row.update(flops=c["flops"], floor_bytes=c["bytes"], gathered_bytes=c["gathered"])
                row["floor_ms"] = floor_s * 1e3
                if time.monotonic() > deadline:
                    row["status"] = "skipped (time budget)"
                    rows.append(row)
                    continue
                try:
                    if arg_sets is None:
                        arg_sets = draw_inputs(setting, sets=2 if num_experts >= 2**20 else 3)
                    row.update(timed(fn, arg_sets))
                    row["x_floor"] = row["ms"] / row["floor_ms"]
                    row["gather_TBps"] = c["gathered"] / (row["ms"] * 1e-3) / 1e12
                    row["status"] = "ok"
                except Exception as err:  # one failing cell must not cost the whole run its other numbers
                    row["status"] = "out of memory" if is_out_of_memory(err) else f"error: {type(err).__name__}"
                    row["error"] = traceback.format_exc(limit=3)[-2000:]
                print(_one_line(row), flush=True)
                rows.append(row)
        del arg_sets
    return rows


def breakdown(setting: Setting, deadline) -> list[dict]:
    """Each piece of the pallas forward+backward alone, heuristic config, both score-pass variants."""
    rows = []
    x, up, down, _, indices, _ = draw_inputs(setting, sets=1)[0]
    tokens, top_k = indices.shape
    pairs = tokens * top_k
    itemsize = jnp.dtype(DTYPE).itemsize
    row_pass = pairs * setting.d * itemsize  # bytes one pass gathers (one row per pair)
    coef = jax.random.uniform(jax.random.key(7), (tokens, top_k), jnp.float32)
    token_config = default_config(tokens, top_k, setting.num_experts, setting.d, DTYPE, variant="token")
    sorted_config = default_config(tokens, top_k, setting.num_experts, setting.d, DTYPE, variant="sorted")
    schedule = jax.jit(build_schedule, static_argnums=1)(indices, setting.num_experts)
    pair_ids = jnp.arange(pairs, dtype=jnp.int32)

    def segment_sum(coef, rows, schedule, like, dot_table=None):
        return kernel.segment_sum(
            coef.reshape(-1),
            rows,
            schedule.sorted_expert,
            schedule.order,
            out_like=like,
            top_k=top_k,
            dot_table=dot_table,
            config=token_config,
            interpret=INTERPRET,
        )

    pieces = {
        "build_schedule (one XLA sort)": (jax.jit(build_schedule, static_argnums=1), (indices, setting.num_experts), 0),
        "pair_dots token order": (
            jax.jit(
                lambda u, v: kernel.pair_dots(
                    u, v, indices.reshape(-1), pair_ids // top_k, pair_ids, config=token_config, interpret=INTERPRET
                )
            ),
            (up, x),
            row_pass,
        ),
        "pair_dots expert order": (
            jax.jit(
                lambda u, v, s: kernel.pair_dots(
                    u, v, s.sorted_expert, s.sorted_token, s.order, config=sorted_config, interpret=INTERPRET
                )
            ),
            (up, x, schedule),
            row_pass,
        ),
        "token_combine": (
            jax.jit(
                lambda c, v: kernel.token_combine(
                    c, indices, v, out_dtype=DTYPE, config=token_config, interpret=INTERPRET
                )
            ),
            (coef, down),
            row_pass,
        ),
        "segment_sum + fused dots (untouched rows zeroed)": (
            jax.jit(lambda c, r, s, t: segment_sum(c, r, s, t, dot_table=t)),
            (coef, x, schedule, down),
            row_pass,
        ),
        "segment_sum (untouched rows zeroed)": (jax.jit(segment_sum), (coef, x, schedule, up), row_pass),
        "dense zeros [N, d] alone": (jax.jit(lambda u: jnp.zeros(u.shape, u.dtype)), (up,), 0),
    }
    for name, (fn, args, gathered) in pieces.items():
        row = {"setting": setting.label, "piece": name}
        if time.monotonic() > deadline:
            rows.append({**row, "status": "skipped (time budget)"})
            continue
        try:
            row.update(timed(fn, [args]))
            if gathered:
                row["gather_TBps"] = gathered / (row["ms"] * 1e-3) / 1e12
            row["status"] = "ok"
        except Exception as err:  # report and go on
            row["status"] = f"error: {type(err).__name__}"
            row["error"] = traceback.format_exc(limit=3)[-2000:]
        print(row, flush=True)
        rows.append(row)
    return rows


def _scaled_tiles(config, factor: float):
    """The config with every program's tile (pairs per program, in each pass) scaled by `factor`."""

    def scale(value: int, floor: int = 1) -> int:
        return max(floor, int(value * factor))

    token_block, k_block = config.token_block, config.k_block
    if factor < 1 and token_block == 1:
        k_block = scale(k_block)  # one token per program already: take fewer of its pairs
    else:
        token_block = scale(token_block)
    segment_block = scale(config.segment_block, MIN_DOT_DIM)
    return dataclasses.replace(
        config,
        pair_block=scale(config.pair_block),
        token_block=token_block,
        k_block=k_block,
        segment_block=segment_block,
        segment_slots=min(config.segment_slots, segment_block),
    )


SWEEP = {
    # name: the config tried, from the heuristic one (register counts: kernel_resources.py, in NOTES.md)
    "heuristic": lambda c, s: c,
    "8 warps": lambda c, s: dataclasses.replace(c, num_warps=8),
    "segment slots 32": lambda c, s: dataclasses.replace(c, segment_slots=min(32, c.segment_block)),
    "tiles / 2": lambda c, s: _scaled_tiles(c, 0.5),
    "tiles x 2": lambda c, s: _scaled_tiles(c, 2),
    "score pass unsliced": lambda c, s: dataclasses.replace(c, score_splits=1),
    "segment sums by reductions": lambda c, s: dataclasses.replace(c, segment_sums="reductions"),
    "sorted variant": lambda c, s: default_config(s.tokens, s.top_k, s.num_experts, s.d, DTYPE, variant="sorted"),
}


def sweep(setting: Setting, deadline) -> list[dict]:
    rows = []
    arg_sets = draw_inputs(setting, sets=2)
    base = default_config(setting.tokens, setting.top_k, setting.num_experts, setting.d, DTYPE)
    for name, make in SWEEP.items():
        row = {"setting": setting.label, "variation": name, "mode": "forward+backward"}
        if time.monotonic() > deadline:
            rows.append({**row, "status": "skipped (time budget)"})
            continue
        try:
            config = make(base, setting)
            row["config"] = str(config)

            def forward_backward(x, up, down, weights, indices, dy, config=config):
                fn = lambda *a: omni_expert(*a, indices, implementation="pallas", config=config)
                _, vjp = jax.vjp(fn, x, up, down, weights)
                return vjp(dy)

            row.update(timed(jax.jit(forward_backward), arg_sets))
            row["status"] = "ok"
        except Exception as err:  # report and go on
            row["status"] = f"error: {type(err).__name__}"
            row["error"] = traceback.format_exc(limit=3)[-2000:]
        print({k: row.get(k) for k in ("setting", "variation", "ms", "status")}, flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# Output


def _one_line(row: dict) -> str:
    ms = f"{row['ms']:.3f} ms" if "ms" in row else row["status"]
    return f"{row['setting']:28s} {row['impl']:14s} {row['mode']:17s} {ms}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=150.0, help="skip what is left after this many seconds")
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check the script runs (CPU: interpret)")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    if args.smoke:
        settings = [Setting(64, 8, 256, 64), Setting(32, 4, 4096, 64)]
        paper, standard = settings
        bandwidth, rate = copy_bandwidth(count=2**20), None
    else:
        settings = [Setting(*s) for s in SETTINGS]
        paper, standard = Setting(4096, 512, 102400), Setting(4096, 32, 65536)
        bandwidth, rate = copy_bandwidth(), flop_rate()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, FP32 rate {rate and rate / 1e12} TFLOP/s (datasheet)")
    name = "experts_smoke" if args.smoke else "experts"
    columns = ["setting", "impl", "mode", "ms", "floor_ms", "x_floor", "gather_TBps", "status"]
    rows, pieces, variations = [], [], []

    def save() -> pathlib.Path:  # after every section (and into $OUT), so a run cut short keeps its numbers
        extra = {"copy_bandwidth_Bps": bandwidth, "fp32_flops": rate, "columns": columns}
        path = write_results(name, rows, breakdown=pieces, sweep=variations, **extra)
        copy_to_out(path)
        return path

    # The targets' settings first, then what explains them, then the rest, so the budget cuts the least useful.
    first = 5 if not args.smoke else 1
    rows += main_table(settings[:first], deadline, bandwidth, rate)
    save()
    if not args.no_breakdown:
        pieces += breakdown(paper, deadline) + breakdown(standard, deadline)
        save()
    if not args.no_sweep:
        variations += sweep(paper, deadline) + sweep(standard, deadline)
        save()
    rows += main_table(settings[first:], deadline, bandwidth, rate)
    path = save()
    print_table(rows, columns)
    if pieces:
        print_table(pieces, ["setting", "piece", "ms", "gather_TBps", "status"])
    if variations:
        print_table(variations, ["setting", "variation", "ms", "status"])
    plot_latency_bars(rows, IMPLEMENTATIONS, "omni_expert", path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    copy_to_out(path.with_suffix(".png"))


if __name__ == "__main__":
    main()
