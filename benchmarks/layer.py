"""The whole OmniMoE layer: implementation "pallas" vs "xla" in the same run, forward and forward+backward.

Settings (issue 4): bf16 compute and parameters, d = 1024; I = 4096 with T = 4096 and (N, K) in {(4096, 16),
(16384, 32), (65536, 32), (1048576, 32)}, the same at T = 16384; the paper's setting I = 1024, N = 102400,
K = 512 at T in {1024, 4096, 16384}. Inputs x ~ N(0, 1), freshly initialised parameters, eval-mode router
(running statistics); forward+backward is the gradient of sum(y * dy) with respect to every parameter and x.

The floor adds the parts' floors: the shared SwiGLU and the router projections at the measured bf16 matmul
rate, the atomic experts at max(FLOPs / FP32 rate, fewest bytes / measured copy bandwidth).

    PYTHONPATH=. python benchmarks/layer.py [--budget-s 100]

Writes benchmarks/results/layer.json and layer.png (and copies both to $OUT when it is set).
"""

from __future__ import annotations

import argparse
import pathlib
import time
import traceback

import jax
import jax.numpy as jnp

from benchmarks.common import copy_to_out, plot_latency_bars, print_table, time_fn, write_results
from benchmarks.experts import copy_bandwidth, flop_rate, is_out_of_memory, timed, work
from omnimoe_jax import OmniMoE, OmniMoEConfig

D = 1024
DTYPE = jnp.bfloat16
SETTINGS = [
    # (T, I, N, K), in priority order (the targets' settings first)
    (4096, 4096, 4096, 16),
    (4096, 4096, 16384, 32),
    (4096, 4096, 65536, 32),
    (4096, 4096, 1048576, 32),
    (4096, 1024, 102400, 512),
    (1024, 1024, 102400, 512),
    (16384, 4096, 4096, 16),
    (16384, 4096, 16384, 32),
    (16384, 4096, 65536, 32),
    (16384, 4096, 1048576, 32),
    (16384, 1024, 102400, 512),
]
IMPLEMENTATIONS = ("pallas", "xla")


def matmul_rate() -> float:
    """Measured bf16 matrix-product rate (FLOP/s) of an 8192^3 product."""
    n = 8192
    pairs = [
        (jax.random.normal(jax.random.key(i), (n, n), DTYPE), jax.random.normal(jax.random.key(9 + i), (n, n), DTYPE))
        for i in range(2)
    ]
    timing = time_fn(jax.jit(lambda a, b: a @ b), pairs, reps=10, batches=3)
    return 2 * n**3 / (timing["ms"] * 1e-3)


def floor_ms(tokens, intermediate, num_experts, top_k, d, mode, bandwidth, matmul, fp32) -> float:
    n = round(num_experts**0.5)
    factor = 3 if mode == "forward+backward" else 1  # a backward costs about twice the forward's products
    dense_flops = factor * (6 * tokens * d * intermediate + 4 * tokens * d * n)
    expert = work(tokens, top_k, num_experts, d, jnp.dtype(DTYPE).itemsize)[mode]
    expert_s = max(expert["bytes"] / bandwidth, expert["flops"] / fp32 if fp32 else 0.0)
    return (dense_flops / matmul + expert_s) * 1e3


def layer_functions(config: OmniMoEConfig, x):
    model = OmniMoE(config)
    variables = jax.jit(model.init)(jax.random.key(1), x)
    dy = jax.random.normal(jax.random.key(2), x.shape, DTYPE)

    @jax.jit
    def forward(variables, x):
        return model.apply(variables, x)

    @jax.jit
    def forward_backward(variables, x):
        def loss(params, x):
            y = model.apply({**variables, "params": params}, x)
            return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1))(variables["params"], x)

    return variables, forward, forward_backward


def run(settings, deadline, bandwidth, matmul, fp32, d=D, save=None) -> list[dict]:
    """Time every (setting, implementation, mode) cell; `save(rows)` after each setting if given."""
    rows = []
    for tokens, intermediate, num_experts, top_k in settings:
        label = f"T={tokens} I={intermediate} N={num_experts} K={top_k}"
        xs = [jax.random.normal(jax.random.key(10 + i), (1, tokens, d), DTYPE) for i in range(2)]
        for implementation in IMPLEMENTATIONS:
            config = OmniMoEConfig(
                hidden_size=d,
                intermediate_size=intermediate,
                num_experts=num_experts,
                num_experts_per_token=top_k,
                dtype=DTYPE,
                param_dtype=DTYPE,
                implementation=implementation,
            )
            try:
                variables, *fns = layer_functions(config, xs[0])
            except Exception as err:  # report and go on
                variables, fns = None, [None, None]
                init_error = err
            for mode, fn in zip(("forward", "forward+backward"), fns, strict=True):
                row = {"setting": label, "impl": implementation, "mode": mode}
                row.update(tokens=tokens, intermediate=intermediate, num_experts=num_experts, top_k=top_k, d=d)
                row["router"] = implementation  # the layer's implementation is its router's too
                counts = (tokens, intermediate, num_experts, top_k, d, mode)
                row["floor_ms"] = floor_ms(*counts, bandwidth, matmul, fp32)
                if time.monotonic() > deadline:
                    rows.append({**row, "status": "skipped (time budget)"})
                    continue
                try:
                    if fn is None:
                        raise init_error
                    row.update(timed(fn, [(variables, x) for x in xs]))
                    row["x_floor"] = row["ms"] / row["floor_ms"]
                    row["status"] = "ok"
                except Exception as err:  # one failing cell must not cost the whole run its other numbers
                    row["status"] = "out of memory" if is_out_of_memory(err) else f"error: {type(err).__name__}"
                    row["error"] = traceback.format_exc(limit=3)[-2000:]
                print(f"{label:40s} {implementation:7s} {mode:17s} {row.get('ms', row['status'])}", flush=True)
                rows.append(row)
            del variables, fns
        if save is not None:
            save(rows)
    speedups(rows)
    return rows


def speedups(rows: list[dict]) -> None:
    """Add xla_ms / pallas_ms to each pallas row measured beside its xla twin."""
    for row in rows:
        if row["impl"] != "pallas" or "ms" not in row:
            continue
        twin = [r for r in rows if r["impl"] == "xla" and r["setting"] == row["setting"] and r["mode"] == row["mode"]]
        if twin and "ms" in twin[0]:
            row["speedup_vs_xla"] = twin[0]["ms"] / row["ms"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=100.0, help="skip what is left after this many seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check the script runs (CPU: interpret)")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    if args.smoke:
        settings, d = [(64, 128, 256, 8)], 64
        bandwidth, matmul, fp32 = copy_bandwidth(count=2**20), 1e12, None
    else:
        settings, d = SETTINGS, D
        bandwidth, matmul, fp32 = copy_bandwidth(), matmul_rate(), flop_rate()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, bf16 matmul {matmul / 1e12:.0f} TFLOP/s")
    columns = ["setting", "impl", "mode", "ms", "floor_ms", "x_floor", "speedup_vs_xla", "router", "status"]

    def save(rows) -> pathlib.Path:  # after every setting (and into $OUT), so a run cut short keeps its numbers
        extra = {"copy_bandwidth_Bps": bandwidth, "bf16_matmul_flops": matmul, "fp32_flops": fp32, "columns": columns}
        path = write_results("layer_smoke" if args.smoke else "layer", rows, **extra)
        copy_to_out(path)
        return path

    rows = run(settings, deadline, bandwidth, matmul, fp32, d=d, save=save)
    path = save(rows)
    print_table(rows, columns)
    plot_latency_bars(rows, IMPLEMENTATIONS, "OmniMoE layer", path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    copy_to_out(path.with_suffix(".png"))


if __name__ == "__main__":
    main()
