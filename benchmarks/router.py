"""Router benchmark: the Pallas and jax-triton top-K kernels against the jnp reference, bf16, on one GPU.

For each (T, n, K): forward and forward+backward time of "pallas", "triton" and "xla" (the `lax.top_k`
reference), the kernels' forward and forward+backward again with sort_by_score=False (the K winners in slot
order: no XLA sort of the [T, K] result), the forward of "pallas" with the other step-1 method
(axis_sort="select"), the bytes of log-probs a call must read (2 T n x 2 bytes), the achieved read rate,
and the time XLA needs to read those logits once (a max over both arrays) as the floor the forward is
compared with. The main columns run `default_config`'s tiling and backward (column "backward").
`--backward onehot,factored` adds, per kernel, forward+backward (sorted and unsorted) with each listed
`RouterConfig.backward` other than the default's at that shape, its backward's time over the default's
(fwd+bwd - fwd of each), and whether its gradients match the default's. The steps apart (columns `merge_*`,
`*_step1_ms`): the merge kernel alone (steps 2-4, unsorted, on positions sorted beforehand by `lax.top_k`)
with step 3's compaction and without it (`RouterConfig.compact_merge=False`, also timed in the whole
unsorted "pallas" forward), jax-triton's step-1 kernel alone where it runs, and "pallas"'s step 1 as its
unsorted forward less the merge. Then a sweep of tilings and both step-1 methods for a few shapes, to check
`default_config`. Prints tables and writes benchmarks/results/router.json (`--output`; and a copy under
$OUT if set).

    PYTHONPATH=. python benchmarks/router.py            # the full grid (~2-3 minutes on an H100)
    PYTHONPATH=. python benchmarks/router.py --quick    # two shapes, to try the script
    PYTHONPATH=. python benchmarks/router.py --paper    # the paper's setting (and K = 1024) and its sweep
    PYTHONPATH=. python benchmarks/router.py --large-k  # K = 1280, 2048 at n = 256, 320 -> router_large_k.json
    PYTHONPATH=. python benchmarks/router.py --large-k --backward onehot,factored  # and both backwards
    PYTHONPATH=. python benchmarks/router.py --backward-warps  # the backward kernel alone at 4, 8, 16 warps
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import copy_to_out, print_table, time_fn, write_results
from omnimoe_jax.testing import rel_error, tolerance
from pallas_kernels import _dispatch, omni_router
from pallas_kernels.omni_router import RouterConfig, default_config, kernel
from pallas_kernels.omni_router.config import AXIS_SORTS, BACKWARDS

IMPLEMENTATIONS = ("pallas", "triton", "xla")
TOKENS = (4096, 16384)
GRID = [(n, k) for n in (64, 128, 256, 1024) for k in (16, 32, 64)] + [(320, 512), (320, 1024)]
PAPER_SHAPES = [(4096, 320, 512), (4096, 320, 1024)]  # T, n, K: the paper's setting, and K = 1024
# K > 1024: small-omnimoe's router (T = 32768 tokens per step, n = 256, K = 1280) and its neighbours.
LARGE_K_SHAPES = [(t, n, k) for t in (32768, 4096) for n in (256, 320) for k in (1280, 2048)]
# --backward-warps: the backward kernel alone at the shapes where "factored" ran slower at n = 256 than n = 320.
BACKWARD_WARPS_SHAPES = [(32768, 256, 1280), (32768, 320, 1280), (4096, 320, 512)]
BACKWARD_WARPS = (4, 8, 16)
SWEEP_SHAPES = [(4096, 320, 512), (16384, 256, 32), (16384, 1024, 64)]
SWEEP_TILINGS = [(1, 4), (2, 4), (4, 4), (8, 4), (2, 8), (8, 8), (1, 16), (2, 16)]
INPUT_SETS = 3  # independently drawn inputs per shape, rotated between calls (see benchmarks/common.py)


def inputs(tokens: int, n: int, top_k: int) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """INPUT_SETS of (log_probs_x, log_probs_y, cotangent of the scores), bf16 log-probs."""
    sets = []
    for i in range(INPUT_SETS):
        kx, ky, kc = jax.random.split(jax.random.key(i), 3)
        lpx = jax.nn.log_softmax(2.0 * jax.random.normal(kx, (tokens, n)), axis=-1).astype(jnp.bfloat16)
        lpy = jax.nn.log_softmax(2.0 * jax.random.normal(ky, (tokens, n)), axis=-1).astype(jnp.bfloat16)
        sets.append((lpx, lpy, jax.random.normal(kc, (tokens, top_k), jnp.float32)))
    return jax.block_until_ready(sets)


@functools.cache  # one jitted function (and compile) per route, shared by the timing and the check
def forward(top_k, implementation, config=None, sort_by_score=True):
    route = functools.partial(
        omni_router, top_k=top_k, implementation=implementation, config=config, sort_by_score=sort_by_score
    )
    return jax.jit(lambda lpx, lpy, cotangent: route(lpx, lpy))


@functools.cache
def forward_backward(top_k, implementation, sort_by_score=True, config=None):
    route = functools.partial(
        omni_router, top_k=top_k, implementation=implementation, config=config, sort_by_score=sort_by_score
    )

    def run(lpx, lpy, cotangent):
        (_, indices), vjp = jax.vjp(route, lpx, lpy)
        return indices, vjp((cotangent, np.zeros(indices.shape, jax.dtypes.float0)))

    return jax.jit(run)


@functools.cache
def merge_only(top_k, config):
    """Steps 2-4 alone: the merge kernel, unsorted, from given [T, k'] position lists."""
    merge = functools.partial(
        kernel.router_merge,
        top_k=top_k,
        config=config,
        interpret=_dispatch.resolve_interpret(None),
        sort_by_score=False,
    )
    return jax.jit(merge)


@functools.cache
def triton_step1(top_k, config):
    """jax-triton's step 1 alone (`tl.topk` per axis), as implementation="triton" runs it."""
    from pallas_kernels.omni_router import triton_kernel  # needs triton: only where "triton" runs

    return jax.jit(lambda lpx, lpy, cotangent: triton_kernel.sort_axes(lpx, lpy, top_k, config=config))


def sorted_positions(arg_sets, top_k) -> list[tuple[jax.Array, ...]]:
    """(lpx, lpy, positions_x, positions_y) per input set: what step 1 hands to the merge (a full sort)."""
    sets = []
    for lpx, lpy, _ in arg_sets:
        k_axis = min(top_k, lpx.shape[1])
        positions = [jax.lax.top_k(kernel.order_key(lp.astype(jnp.float32)), k_axis)[1] for lp in (lpx, lpy)]
        sets.append((lpx, lpy, *(p.astype(jnp.int32) for p in positions)))
    return jax.block_until_ready(sets)


def read_once(lpx, lpy, cotangent):
    """What reading both log-prob arrays once costs in XLA (the forward's floor)."""
    return jnp.max(lpx, axis=1) + jnp.max(lpy, axis=1)


def timed(fn, arg_sets) -> dict:
    """time_fn with the repetitions scaled so one batch takes ~0.1 s (slow references stay affordable)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))  # compile
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[1 % len(arg_sets)]))
    once = time.perf_counter() - start
    reps = int(min(50, max(3, 0.1 / max(once, 1e-6))))
    return {**time_fn(fn, arg_sets, reps=reps, batches=3 if once > 0.02 else 5), "compile_s": compile_s}


def same_routes(arg_sets, top_k, kernels) -> bool:
    """The kernels' indices equal the reference's on the first input set, and so do their unsorted indices
    as sets per row (a benchmark of wrong code is moot)."""
    lpx, lpy, cotangent = arg_sets[0]
    want = forward(top_k, "xla")(lpx, lpy, cotangent)[1]
    exact = all(bool(jnp.all(forward(top_k, impl)(lpx, lpy, cotangent)[1] == want)) for impl in kernels)
    unsorted = (forward(top_k, impl, sort_by_score=False)(lpx, lpy, cotangent)[1] for impl in kernels)
    return exact and all(bool(jnp.all(jnp.sort(got, axis=1) == jnp.sort(want, axis=1))) for got in unsorted)


def same_gradients(arg_sets, top_k, implementation, config) -> bool:
    """`config`'s gradients within the tolerance of their dtype (bf16 here) of the default config's, on the
    first input set (a benchmark of wrong code is moot)."""
    _, want = forward_backward(top_k, implementation)(*arg_sets[0])
    _, got = forward_backward(top_k, implementation, config=config)(*arg_sets[0])
    return all(rel_error(g, w) <= tolerance(g.dtype) for g, w in zip(got, want, strict=True))


def parse_backwards(text: str) -> list[str]:
    backwards = [b for b in text.split(",") if b]
    bad = [b for b in backwards if b not in BACKWARDS]
    if bad or not backwards:
        raise argparse.ArgumentTypeError(f"--backward {text!r}: a comma list of {BACKWARDS}")
    return backwards


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two small shapes, no sweep (tries the script)")
    parser.add_argument("--paper", action="store_true", help="only T = 4096, n = 320, K = 512 / 1024, and its sweep")
    parser.add_argument(
        "--large-k", action="store_true", help="only K = 1280, 2048 at n = 256, 320, T = 32768, 4096; no sweep"
    )
    parser.add_argument("--output", default=None, help="results/<OUTPUT>.json (default router, router_large_k)")
    parser.add_argument("--implementations", nargs="+", default=IMPLEMENTATIONS, choices=IMPLEMENTATIONS)
    parser.add_argument(
        "--backward",
        type=parse_backwards,
        default=[],
        help="RouterConfig.backward values to time beside default_config's, comma-separated",
    )
    parser.add_argument(
        "--backward-warps",
        action="store_true",
        help="only the backward kernel alone, each backward at 4, 8, 16 warps (-> router_backward_warps.json)",
    )
    parser.add_argument("--budget-s", type=float, default=None, help="start no new shape after this many seconds")
    args = parser.parse_args(argv)
    if args.backward_warps:
        backward_warps(args)
        return
    start = time.perf_counter()
    skipped = []

    def over_budget(shape) -> bool:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            skipped.append(shape)
            return True
        return False

    if args.quick:
        shapes, sweep = [(256, 64, 16), (256, 320, 512)], []
    elif args.paper:
        shapes, sweep = PAPER_SHAPES, SWEEP_SHAPES[:1]
    elif args.large_k:
        shapes, sweep = LARGE_K_SHAPES, []
    else:  # the paper's shapes first: a --budget-s run that stops early still has them
        grid = [(t, n, k) for t in TOKENS for n, k in GRID]
        shapes, sweep = PAPER_SHAPES + [s for s in grid if s not in PAPER_SHAPES], SWEEP_SHAPES
    implementations = args.implementations
    kernels = [impl for impl in implementations if impl != "xla"]

    rows = []
    for tokens, n, top_k in shapes:
        if over_budget((tokens, n, top_k)):
            continue
        arg_sets = inputs(tokens, n, top_k)
        logit_bytes = 2 * tokens * n * 2
        read_ms = timed(jax.jit(read_once), arg_sets)["ms"]
        default_backward = default_config(tokens, n, top_k).backward
        row = {"T": tokens, "n": n, "K": top_k, "backward": default_backward, "MB_read": logit_bytes / 1e6}
        row["read_ms"] = read_ms
        row["exact"] = same_routes(arg_sets, top_k, kernels)
        for impl in implementations:
            fwd = timed(forward(top_k, impl), arg_sets)
            both = timed(forward_backward(top_k, impl), arg_sets)
            row[f"{impl}_fwd_ms"] = fwd["ms"]
            row[f"{impl}_fwdbwd_ms"] = both["ms"]
            row[f"{impl}_fwd_GBps"] = logit_bytes / fwd["ms"] / 1e6
            row[f"{impl}_detail"] = {"fwd": fwd, "fwd+bwd": both}
            if impl != "xla":  # the reference's selection is its sort: it has no unsorted form
                fwd = timed(forward(top_k, impl, sort_by_score=False), arg_sets)
                both = timed(forward_backward(top_k, impl, sort_by_score=False), arg_sets)
                row[f"{impl}_unsorted_fwd_ms"] = fwd["ms"]
                row[f"{impl}_unsorted_fwdbwd_ms"] = both["ms"]
                row[f"{impl}_detail"].update({"unsorted fwd": fwd, "unsorted fwd+bwd": both})
                for backward in [b for b in args.backward if b != default_backward]:
                    config = dataclasses.replace(default_config(tokens, n, top_k), backward=backward)
                    both = timed(forward_backward(top_k, impl, config=config), arg_sets)
                    unsorted = timed(forward_backward(top_k, impl, sort_by_score=False, config=config), arg_sets)
                    row[f"{impl}_fwdbwd_{backward}_ms"] = both["ms"]
                    row[f"{impl}_unsorted_fwdbwd_{backward}_ms"] = unsorted["ms"]
                    default_bwd_ms = row[f"{impl}_fwdbwd_ms"] - row[f"{impl}_fwd_ms"]  # noise can make it <= 0
                    row[f"{impl}_bwd_{backward}_over_default"] = (
                        (both["ms"] - row[f"{impl}_fwd_ms"]) / default_bwd_ms if default_bwd_ms > 0 else float("nan")
                    )
                    row[f"{impl}_{backward}_grads_match"] = same_gradients(arg_sets, top_k, impl, config)
                    row[f"{impl}_detail"][f"fwd+bwd {backward}"] = both
                    row[f"{impl}_detail"][f"unsorted fwd+bwd {backward}"] = unsorted
        if "pallas" in implementations:
            select = dataclasses.replace(default_config(tokens, n, top_k), axis_sort="select")
            row["pallas_select_fwd_ms"] = timed(forward(top_k, "pallas", select), arg_sets)["ms"]
        if kernels:  # the steps apart
            config = default_config(tokens, n, top_k)
            uncompacted = dataclasses.replace(config, compact_merge=False)
            merge_sets = sorted_positions(arg_sets, top_k)
            row["merge_ms"] = timed(merge_only(top_k, config), merge_sets)["ms"]
            row["merge_uncompacted_ms"] = timed(merge_only(top_k, uncompacted), merge_sets)["ms"]
            row["merge_same"] = all(
                bool(jnp.all(a == b))
                for a, b in zip(
                    merge_only(top_k, config)(*merge_sets[0]),
                    merge_only(top_k, uncompacted)(*merge_sets[0]),
                    strict=True,
                )
            )
            if "pallas" in implementations:
                row["pallas_step1_ms"] = row["pallas_unsorted_fwd_ms"] - row["merge_ms"]
                fwd = timed(forward(top_k, "pallas", uncompacted, sort_by_score=False), arg_sets)
                row["pallas_unsorted_fwd_uncompacted_ms"] = fwd["ms"]
            if "triton" in implementations:
                row["triton_step1_ms"] = timed(triton_step1(top_k, config), arg_sets)["ms"]
        for impl in kernels:
            if "xla" in implementations:
                row[f"{impl}_speedup"] = row["xla_fwd_ms"] / row[f"{impl}_fwd_ms"]
            row[f"{impl}_fwd_over_read"] = row[f"{impl}_fwd_ms"] / read_ms
        rows.append(row)
        print(f"T={tokens} n={n} K={top_k}: done", flush=True)

    columns = ["T", "n", "K", "backward", "exact", "MB_read", "read_ms"]
    columns += [f"{impl}_fwd_ms" for impl in implementations] + ["pallas_select_fwd_ms"]
    columns += [f"{impl}_fwdbwd_ms" for impl in implementations]
    columns += [f"{impl}_unsorted_{what}_ms" for what in ("fwd", "fwdbwd") for impl in kernels]
    if kernels:
        columns += ["merge_ms", "merge_uncompacted_ms", "merge_same"]
        columns += [f"{impl}_step1_ms" for impl in kernels]
        columns += ["pallas_unsorted_fwd_uncompacted_ms"] if "pallas" in kernels else []
    for backward in args.backward:
        columns += [f"{impl}_{what}_{backward}_ms" for what in ("fwdbwd", "unsorted_fwdbwd") for impl in kernels]
        columns += [f"{impl}_bwd_{backward}_over_default" for impl in kernels]
        columns += [f"{impl}_{backward}_grads_match" for impl in kernels]
    columns += [f"{impl}_{what}" for what in ("speedup", "fwd_over_read", "fwd_GBps") for impl in kernels]
    print_table(rows, columns)

    sweep_rows = []
    for tokens, n, top_k in sweep:
        if over_budget(("sweep", tokens, n, top_k)):
            continue
        arg_sets = inputs(tokens, n, top_k)
        chosen = default_config(tokens, n, top_k)
        for (block_tokens, num_warps), axis_sort in itertools.product(SWEEP_TILINGS, AXIS_SORTS):
            config = RouterConfig(block_tokens=block_tokens, num_warps=num_warps, num_stages=1, axis_sort=axis_sort)
            ms = timed(forward(top_k, "pallas", config), arg_sets)["ms"]
            is_default = (block_tokens, num_warps, axis_sort) == (
                chosen.block_tokens,
                chosen.num_warps,
                chosen.axis_sort,
            )
            sweep_rows.append(
                {"T": tokens, "n": n, "K": top_k, "block_tokens": block_tokens, "num_warps": num_warps,
                 "axis_sort": axis_sort, "pallas_fwd_ms": ms, "default": is_default}
            )  # fmt: skip
    if sweep_rows:
        print()
        print_table(sweep_rows, ["T", "n", "K", "block_tokens", "num_warps", "axis_sort", "pallas_fwd_ms", "default"])

    if skipped:
        print(f"over the {args.budget_s} s budget, skipped: {skipped}")
    name = args.output or ("router_large_k" if args.large_k else "router")
    path = write_results(name, rows, dtype="bfloat16", tiling_sweep=sweep_rows, skipped=skipped)
    print(f"wrote {path}")
    copy_to_out(path)


def backward_warps(args) -> None:
    """The backward kernel alone (`kernel.router_backward`: f32 cotangents, the unsorted forward's experts),
    each backward at each `RouterConfig.backward_num_warps` of BACKWARD_WARPS: the factored chunk of K follows them
    (`kernel.factored_block_k`), so this also sweeps the chunk. Rows to results/router_backward_warps.json."""
    start, rows, skipped = time.perf_counter(), [], []
    for tokens, n, top_k in BACKWARD_WARPS_SHAPES:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            skipped.append((tokens, n, top_k))
            continue
        route = forward(top_k, "pallas", sort_by_score=False)  # the experts a training step's backward gets
        arg_sets = [(cotangent, route(lpx, lpy, cotangent)[1]) for lpx, lpy, cotangent in inputs(tokens, n, top_k)]
        chosen = default_config(tokens, n, top_k)
        for backward, num_warps in itertools.product(BACKWARDS, BACKWARD_WARPS):
            config = dataclasses.replace(chosen, backward=backward, backward_num_warps=num_warps)
            fn = jax.jit(
                functools.partial(
                    kernel.router_backward,
                    n=n,
                    dtype=jnp.bfloat16,
                    config=config,
                    interpret=_dispatch.resolve_interpret(None),
                )
            )
            factored = kernel.uses_factored_backward(n, config)
            rows.append(
                {"T": tokens, "n": n, "K": top_k, "backward": backward, "num_warps": num_warps,
                 "block_k": kernel.factored_block_k(n, top_k, num_warps) if factored else config.backward_block_k,
                 "ms": timed(fn, arg_sets)["ms"],
                 "default": (backward, num_warps) == (chosen.backward, chosen.backward_num_warps)}
            )  # fmt: skip
        print(f"T={tokens} n={n} K={top_k}: done", flush=True)
    print_table(rows, ["T", "n", "K", "backward", "num_warps", "block_k", "ms", "default"])
    if skipped:
        print(f"over the {args.budget_s} s budget, skipped: {skipped}")
    path = write_results(args.output or "router_backward_warps", rows, dtype="float32 cotangents", skipped=skipped)
    print(f"wrote {path}")
    copy_to_out(path)


if __name__ == "__main__":
    main()
