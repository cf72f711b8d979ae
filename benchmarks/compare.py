"""Latency and memory of OmniMoE beside FlashMoE and the baseline FFNs (dense, GShard, DeepSeekMoE, PEER, PKM), on
one device.

Run from the repository root (the GPU machine; see the README's results section):

    PYTHONPATH=. python benchmarks/compare.py            # checks, tokens 1k..16k, N sweep; --budget-s 300
    PYTHONPATH=. python benchmarks/compare.py --quick    # checks, T = 4096 only (the targets' point)
    PYTHONPATH=. python benchmarks/compare.py --smoke    # tiny f32 configs: the machinery, on a CPU

The budget bounds the wall time (plus up to GRACE_S for a configuration in flight and the final plot); what
does not fit is recorded as skipped, and `--ffn/--tokens/--n-sweep --name other` measures it in a second run.

What it does, in order:
1. Checks on the device: pairs of implementations that must compute the same function (OmniMoE, FlashMoE and
   PKM with the kernels vs plain XLA; PEER through omni_router + omni_expert vs PEER's reference; DeepSeekMoE sorted
   ragged_dot vs capacity buffers with room for every pair), outputs and gradients, f32.
2. Latency, forward (eval) and forward+backward (train mode, gradients of every parameter and the input, the
   auxiliary losses included), bf16, of each FFN in the paper's setting (`omnimoe_jax.baselines.presets.
   paper_presets`, d = 1024) against tokens, and of the fine-grained ones against the table size N at
   T = 4096. Timing: `benchmarks/common.time_fn` (compiled once, warmed up, back-to-back calls over three
   input sets, median of batches), with the repetitions sized to the call.
3. Memory per configuration: XLA's buffer assignment of the compiled program (arguments + outputs + temporaries,
   `memory_analysis()`), and the device allocator's peak (`device.memory_stats()["peak_bytes_in_use"]`) of
   the process that ran the variant (cumulative over that variant's configurations: JAX cannot reset it).
4. One table, the targets at T = 4096 (OmniMoE >= 10.9x faster than PEER's reference implementation; OmniMoE
   faster than DeepSeekMoE at matched active parameters), one PNG plot, and JSON through
   `benchmarks/common.write_results` (both copied to $OUT when set).

Each variant runs in its own subprocess with a share of the time budget, so a configuration that fails, runs
out of memory or crashes the process is recorded in its row and the rest go on; configurations left when a
variant's share runs out are recorded as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # benchmarks/ is a folder of scripts, not a package

from omnimoe_jax import FlashMoEConfig, OmniMoEConfig
from omnimoe_jax.baselines import DeepSeekMoEConfig, PEERConfig, PKMConfig, presets

# name: (preset, config changes, in the token sweep (else T = 4096 only), in the N sweep, what it is)
VARIANTS: dict[str, tuple[str, dict[str, Any], bool, bool, str]] = {
    "dense": ("dense", {}, True, False, "SwiGLU of width 1600"),
    "gshard": ("gshard", {}, True, False, "128 experts of 512, top 2, capacity 1.25 (paper setting)"),
    "deepseekmoe": ("deepseekmoe", {}, True, False, "256 of 256, top 4, shared 1024, sorted ragged_dot (paper)"),
    "deepseekmoe-matched": ("deepseekmoe-matched", {}, True, False, "as deepseekmoe with shared 512"),
    "deepseekmoe-capacity": (
        "deepseekmoe-matched",
        {"dispatch": "capacity"},
        False,
        False,
        "deepseekmoe-matched through capacity buffers (factor 1.25, drops) instead of ragged_dot",
    ),
    "omnimoe": ("omnimoe", {"implementation": "auto"}, True, True, "OmniMoE, kernels on GPU where available"),
    "omnimoe-xla": ("omnimoe", {"implementation": "xla"}, True, True, "OmniMoE, plain jnp"),
    "flashmoe": (
        "flashmoe",
        {"implementation": "auto"},
        True,
        True,
        "FlashMoE (input BatchNorm, one joint gate) at OmniMoE's sizes, kernels on GPU where available",
    ),
    "peer-omni": (
        "peer",
        {"expert_implementation": "omni_expert", "implementation": "auto"},
        True,
        True,
        "PEER through omni_router + omni_expert",
    ),
    "peer-reference": (
        "peer",
        {"expert_implementation": "reference", "implementation": "xla"},
        True,
        True,
        "PEER as its reference code: top-k per axis, top-k of the k*k sums, [T, h, k, d] gathers",
    ),
    "pkm": ("pkm", {}, True, True, "PKM, 4 heads x 625 of 197136 rows"),
}
# The order runs fast variants first: a variant's unused time share passes to the ones after it.
DEFAULT_FFNS = [
    "dense",
    "gshard",
    "deepseekmoe",
    "deepseekmoe-matched",
    "deepseekmoe-capacity",
    "omnimoe",
    "flashmoe",
    "peer-omni",
    "pkm",
    "peer-reference",
]
TOKENS = [1024, 2048, 4096, 8192, 16384]
TARGET_TOKENS = 4096
N_SWEEP = [16384, 262144, 1048576]  # 128^2, 512^2, 1024^2; the paper's 102400 = 320^2 is in the token sweep
MODES = ["fwd", "fwdbwd"]
PAPER_SPEEDUP_OVER_PEER = 10.9  # 73 ms / 6.7 ms at 4,096 tokens, the OmniMoE paper's ratio
GRACE_S = 45.0  # a worker past its share gets this long to finish the configuration in flight
# The checks compile pairs of models (f32, highest precision) at ~40 s each on an H100: 120 s cut the fourth
# of four off. They get at most this long (five pairs since FlashMoE's), and at most half the budget.
CHECKS_TIMEOUT_S = 300.0
RESULTS_NAME = "compare"


# ----------------------------------------------------------------------------------------------------------
# configurations


def smoke_presets() -> dict[str, Any]:
    """Tiny stand-ins with the paper presets' names, so `--smoke` exercises every path on a CPU."""
    small = presets.small_presets(64)
    return {
        **small,
        "deepseekmoe-matched": small["deepseekmoe"].replace(shared_intermediate_size=32),
        "gshard-matched": small["gshard"],
    }


def variant_config(variant: str, setting: str, table_size: int | None = None):
    """The config of `variant` in "paper" (bf16, d = 1024) or "smoke" (f32, d = 64), with N = table_size."""
    preset, changes, _, _, _ = VARIANTS[variant]
    base = presets.paper_presets(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16) if setting == "paper" else None
    config = (base or smoke_presets())[preset].replace(**changes)
    if table_size is not None:
        field = "num_values" if isinstance(config, PKMConfig) else "num_experts"
        config = config.replace(**{field: table_size})
    return config


def table_size(config) -> int:
    """N of the fine-grained FFNs, E of the coarse ones, 0 for the dense one."""
    for field in ("num_values", "num_experts"):
        if hasattr(config, field):
            return getattr(config, field)
    return 0


def build(config):
    return config.module_class()(config)


def row_base(variant: str, config, tokens: int, size: int | None) -> dict:
    """The fields that name a configuration in every row (measured, failed or skipped)."""
    return {
        "variant": variant,
        "sweep": "N" if size is not None else "tokens",
        "tokens": tokens,
        "N": table_size(config),
        "active_params": presets.active_parameters(config),
    }


# ----------------------------------------------------------------------------------------------------------
# worker: one variant's configurations in one process


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= 400 else text[:400] + " ..."


def _emit(kind: str, record: dict) -> None:
    print(f"{kind} {json.dumps(record)}", flush=True)


def _init(model, config, key):
    # Parameters do not depend on the token count: initialise on a few tokens (the forward is then cheap).
    x = jnp.zeros((8, config.hidden_size), config.dtype)
    return jax.jit(model.init)(key, x)


def _output(out):
    """y of a module's output: FlashMoE returns (y, router_logits), the others y."""
    return out[0] if isinstance(out, tuple) else out


def _fwd_fn(model):
    return lambda variables, x: _output(model.apply(variables, x))


def _fwdbwd_fn(model):
    def fwdbwd(variables, x, cotangent):
        def loss(params, x):
            out, state = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats", "losses"])
            y = _output(out)
            aux = sum(jax.tree.leaves(state.get("losses", {})), jnp.float32(0))
            return jnp.sum(y.astype(jnp.float32) * cotangent.astype(jnp.float32)) + aux

        return jax.grad(loss, argnums=(0, 1))(variables["params"], x)

    return fwdbwd


def _memory_gib(compiled) -> float | None:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend reports it; the row then has no number rather than a wrong one
        return None
    if stats is None:
        return None
    total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    return (total - stats.alias_size_in_bytes) / 2**30


def _peak_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def measure(model, config, variables, tokens: int, mode: str, target_s: float) -> dict:
    """Compile, check the output is finite, and time one (configuration, tokens, mode)."""
    keys = jax.random.split(jax.random.key(tokens), 6)
    xs = [jax.random.normal(k, (tokens, config.hidden_size), jnp.float32).astype(config.dtype) for k in keys[:3]]
    if mode == "fwd":
        fn, arg_sets = _fwd_fn(model), [(variables, x) for x in xs]
    else:
        cts = [jax.random.normal(k, (tokens, config.hidden_size), jnp.float32).astype(config.dtype) for k in keys[3:]]
        fn, arg_sets = _fwdbwd_fn(model), [(variables, x, ct) for x, ct in zip(xs, cts, strict=True)]
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*arg_sets[0]).compile()
    compile_s = time.perf_counter() - start
    out = jax.block_until_ready(compiled(*arg_sets[0]))
    finite = all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(out))
    del out
    start = time.perf_counter()
    jax.block_until_ready(compiled(*arg_sets[1]))
    one_call = time.perf_counter() - start
    reps = max(1, min(50, int(target_s / max(one_call, 1e-6))))
    timing = common.time_fn(compiled, arg_sets, reps=reps, batches=3)
    return {
        **timing,
        "reps": reps,
        "compile_s": compile_s,
        "finite": finite,
        "mem_gib": _memory_gib(compiled),
        "peak_gib": _peak_gib(),
    }


def run_worker(spec: dict) -> None:
    """Measure spec["jobs"] ([tokens, N or None] pairs) x spec["modes"] for one variant; one ROW line each."""
    variant, setting, deadline = spec["variant"], spec["setting"], spec["deadline"]
    for tokens, size in spec["jobs"]:
        config = variant_config(variant, setting, size)
        base = row_base(variant, config, tokens, size)
        if time.time() > deadline:
            for mode in spec["modes"]:
                _emit("ROW", {**base, "mode": mode, "error": "skipped: the variant's time share ran out"})
            continue
        model = build(config)
        try:
            variables = _init(model, config, jax.random.key(0))
        except Exception as err:  # recorded in the rows; the next configuration goes on
            for mode in spec["modes"]:
                _emit("ROW", {**base, "mode": mode, "error": "init: " + _short(err)})
            continue
        for mode in spec["modes"]:
            row = {**base, "mode": mode}
            if time.time() > deadline:
                row["error"] = "skipped: the variant's time share ran out"
            else:
                try:
                    row.update(measure(model, config, variables, tokens, mode, spec["target_s"]))
                except Exception as err:  # an OOM or a failing kernel: record it, go on
                    row["error"] = _short(err)
            _emit("ROW", row)
        del variables


# ----------------------------------------------------------------------------------------------------------
# checks: implementations that must agree, on the device


def _rel_err(a, b) -> float:
    a, b = jnp.ravel(a).astype(jnp.float32), jnp.ravel(b).astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def check_pairs(setting: str) -> list[tuple[str, Any, dict, float]]:
    """(name, config, changes giving the other implementation, tolerance on ||a-b||/||b||)."""
    d = 256 if setting == "paper" else 32
    # Pallas kernels may run their f32 dots at TF32 (relative error near 3e-4); plain XLA here runs at the
    # highest precision, so the pair of XLA implementations is held to f32 rounding.
    kernels, xla = 2e-3, 1e-4
    return [
        ("omnimoe: implementation auto vs xla", OmniMoEConfig(d, 2 * d, 4096, 32), {"implementation": "xla"}, kernels),
        (
            "flashmoe: implementation auto vs xla",
            FlashMoEConfig(d, 2 * d, "silu", 4096, 32),
            {"implementation": "xla"},
            kernels,
        ),
        (
            "peer: omni_router + omni_expert vs PEER's reference",
            PEERConfig(d, 4096, 4, 32, 64, expert_implementation="omni_expert", implementation="auto"),
            {"expert_implementation": "reference", "implementation": "xla"},
            kernels,
        ),
        ("pkm: implementation auto vs xla", PKMConfig(d, 4096, 2, 40, 64), {"implementation": "xla"}, kernels),
        (
            "deepseekmoe: sorted ragged_dot vs capacity buffers with room for all",
            DeepSeekMoEConfig(d, 16, 64, 4, shared_intermediate_size=128),
            {"dispatch": "capacity", "capacity_factor": 4.0},  # C = 4 * 4 * T / 16 = T: nothing drops
            xla,
        ),
    ]


def run_checks(setting: str) -> None:
    jax.config.update("jax_default_matmul_precision", "highest")
    tokens = 512 if setting == "paper" else 64
    for name, config, changes, tol in check_pairs(setting):
        record = {"check": name, "tol": tol}
        try:
            other = config.replace(**changes)
            model_a, model_b = build(config), build(other)
            variables = _init(model_a, config, jax.random.key(1))
            x = jax.random.normal(jax.random.key(2), (tokens, config.hidden_size), jnp.float32)
            ct = jax.random.normal(jax.random.key(3), (tokens, config.hidden_size), jnp.float32)
            outputs = []
            for model in (model_a, model_b):
                y = jax.jit(_fwd_fn(model))(variables, x)
                grads = jax.jit(_fwdbwd_fn(model))(variables, x, ct)
                outputs.append((y, grads))
            (ya, ga), (yb, gb) = outputs
            record["y_rel_err"] = _rel_err(ya, yb)
            pairs = zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True)
            record["grad_rel_err"] = max(_rel_err(a, b) for a, b in pairs)
            finite = all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves((ya, ga, yb, gb)))
            record["passed"] = finite and record["y_rel_err"] <= tol and record["grad_rel_err"] <= tol
            if isinstance(config, DeepSeekMoEConfig):
                _, state = model_b.apply(variables, x, mutable=["metrics"])
                dropped = int(state["metrics"]["dropped_pairs"][0])
                record["dropped_pairs"] = dropped
                record["passed"] = record["passed"] and dropped == 0
        except Exception as err:  # a failing kernel is a failed check, not a crashed benchmark
            record.update(passed=False, error=_short(err))
        _emit("CHECK", record)


# ----------------------------------------------------------------------------------------------------------
# parent: budget, subprocesses, table, targets, plot, JSON


def _run_subprocess(flag: str, payload: str, timeout: float, env: dict) -> tuple[list[dict], list[dict], str]:
    """Run this script with `flag payload`; (ROW records, CHECK records, a note when it did not end well)."""
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), flag, payload]
    note = ""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, env=env)
        stdout, stderr = done.stdout, done.stderr
        if done.returncode != 0:
            note = f"worker exited with code {done.returncode}"
    except subprocess.TimeoutExpired as err:
        stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
        note = f"worker killed after {timeout:.0f} s"
    rows, checks = [], []
    for line in stdout.splitlines():
        kind, _, record = line.partition(" ")
        if kind == "ROW":
            rows.append(json.loads(record))
        elif kind == "CHECK":
            checks.append(json.loads(record))
    if note:
        tail = [line for line in stderr.splitlines() if line.strip()][-3:]
        note += (": " + " | ".join(tail))[:600] if tail else ""
    return rows, checks, note


def target_tokens(tokens: list[int]) -> int:
    """The token count the targets, the N sweep and the one-point variants use: 4096 when swept."""
    return TARGET_TOKENS if TARGET_TOKENS in tokens else tokens[len(tokens) // 2]


def plan(ffns: list[str], tokens: list[int], n_sweep: list[int], setting: str) -> tuple[list[dict], list[dict]]:
    """One worker spec per variant: its token sweep (the target point first), then its N sweep; and error
    rows for the N-sweep sizes a variant's config refuses (e.g. N below its experts per token)."""
    target = target_tokens(tokens)
    specs, refused = [], []
    for variant in ffns:
        _, _, in_token_sweep, in_n_sweep, _ = VARIANTS[variant]
        sweep = sorted(tokens, key=lambda t: (t != target, t)) if in_token_sweep else [target]
        own_size = table_size(variant_config(variant, setting))  # already measured by the token sweep
        jobs = [[t, None] for t in sweep]
        for size in n_sweep if in_n_sweep else []:
            try:
                variant_config(variant, setting, size)
            except ValueError as err:
                base = {"variant": variant, "sweep": "N", "tokens": target, "N": size, "active_params": None}
                refused += [{**base, "mode": mode, "error": f"config refused: {err}"} for mode in MODES]
                continue
            if size != own_size:
                jobs.append([target, size])
        specs.append({"variant": variant, "setting": setting, "jobs": jobs, "modes": MODES})
    return specs, refused


def targets(rows: list[dict], target: int) -> list[dict]:
    """The two claims at T = target (4096), forward and forward+backward, from this run's rows."""

    def ms(variant, mode):
        for row in rows:
            ok = row["sweep"] == "tokens" and row["tokens"] == target and "ms" in row
            if ok and row["variant"] == variant and row["mode"] == mode:
                return row["ms"]
        return None

    found = []
    for mode in MODES:
        omni = ms("omnimoe", mode)
        for other, need in (("peer-reference", PAPER_SPEEDUP_OVER_PEER), ("deepseekmoe-matched", 1.0)):
            theirs = ms(other, mode)
            speedup = theirs / omni if omni and theirs else None
            by = f"at least {need}x " if need > 1 else ""
            found.append(
                {
                    "claim": f"omnimoe {by}faster than {other} at T={target} ({mode})",
                    "omnimoe_ms": omni,
                    f"{other}_ms": theirs,
                    "speedup": speedup,
                    "met": None if speedup is None else speedup >= need,
                }
            )
    return found


def summary(rows: list[dict]) -> list[dict]:
    """One line per configuration: both modes side by side (the JSON keeps every field of every row)."""
    lines: dict[tuple, dict] = {}
    for row in rows:
        key = (row["variant"], row["sweep"], row["tokens"], row["N"])
        line = lines.setdefault(
            key, {"variant": row["variant"], "T": row["tokens"], "N": row["N"], "active": row["active_params"]}
        )
        mode = row["mode"]
        line[f"{mode} ms"] = row.get("ms")
        line[f"{mode} GiB"] = row.get("mem_gib")
        problem = row.get("error") or (None if row.get("finite", True) else "non-finite output")
        if problem and problem not in line.get("note", ""):
            line["note"] = (line.get("note", "") + f" {mode}: {problem}").strip()[:90]
    return list(lines.values())


def print_tables(rows: list[dict], checks: list[dict], claims: list[dict]) -> None:
    print("\nchecks (f32, same variables and inputs, implementations that must agree):")
    shown = [
        {**c, **{k: f"{c[k]:.1e}" for k in ("y_rel_err", "grad_rel_err", "tol") if isinstance(c.get(k), float)}}
        for c in checks
    ]
    common.print_table(shown, ["check", "y_rel_err", "grad_rel_err", "tol", "passed", "error"])
    print("\nlatency in ms (median; fwd = eval forward, fwdbwd = train forward + all gradients), XLA memory in GiB:")
    columns = ["variant", "T", "N", "active", "fwd ms", "fwdbwd ms", "fwd GiB", "fwdbwd GiB", "note"]
    common.print_table(summary(rows), columns)
    print("\ntargets:")
    for claim in claims:
        speedup = "n/a" if claim["speedup"] is None else f"{claim['speedup']:.2f}x"
        verdict = {True: "MET", False: "NOT MET", None: "NO DATA"}[claim["met"]]
        print(f"  {claim['claim']}: {speedup} -> {verdict}")


def plot(rows: list[dict], path: pathlib.Path, target: int, setting: str, device: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    device = device or common.environment()["device"]
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    colors = {v: f"C{i % 10}" for i, v in enumerate(variants)}  # one colour per variant in every panel
    for ax, mode in zip(axes[:2], MODES, strict=True):
        for variant in variants:
            points = sorted(
                (r["tokens"], r["ms"])
                for r in rows
                if r["variant"] == variant and r["mode"] == mode and r["sweep"] == "tokens" and "ms" in r
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=colors[variant], label=variant)
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms", title=f"{mode}, {setting} setting, {device}")
        ax.grid(True, which="both", alpha=0.3)
    for variant in (v for v in variants if VARIANTS[v][3]):  # the fine-grained ones
        for mode, style in zip(MODES, ("-", "--"), strict=True):
            points = sorted(
                (r["N"], r["ms"])
                for r in rows
                if r["variant"] == variant and r["mode"] == mode and r["tokens"] == target and "ms" in r
            )
            if len(points) > 1:
                label = f"{variant} {mode}"
                axes[2].plot(*zip(*points, strict=True), style, marker="o", color=colors[variant], label=label)
    axes[2].set(xscale="log", yscale="log", xlabel="N (experts or value rows)", ylabel="ms")
    axes[2].set_title(f"fine-grained FFNs vs N at T={target} (solid fwd, dashed fwdbwd)")
    axes[2].grid(True, which="both", alpha=0.3)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _standing(row: dict) -> int:
    """How much a row says: a measurement (2), an error or out-of-memory (1), a skip for lack of time (0)."""
    if "ms" in row:
        return 2
    return 0 if "skipped" in row.get("error", "") else 1


def combine(results: list[dict], only_from: dict[str, set[int]] | None = None) -> list[dict]:
    """The rows of several runs, one per configuration and mode: a measured row wins over a failed one, a
    failed one over a skipped one, and among equals the later run (the order given) wins. Each row records
    its run's index. `only_from` {variant: run indices} takes that variant's rows from those runs alone (its
    code changed since the others measured it)."""
    only_from = only_from or {}
    merged: dict[tuple, dict] = {}
    for index, result in enumerate(results):
        for row in result["rows"]:
            if index not in only_from.get(row["variant"], {index}):
                continue
            key = (row["variant"], row["sweep"], row["tokens"], row["N"], row["mode"])
            held = merged.get(key)
            if held is None or _standing(row) >= _standing(held):
                merged[key] = {**row, "source": index}
    return list(merged.values())


def combine_checks(results: list[dict], only_from: dict[str, set[int]] | None = None) -> list[dict]:
    """The checks of several runs, one per name, the later run's winning. "<variant>: ..." checks follow their
    variant's rows (`only_from`); a "checks worker" failure (its time ran out) is dropped once a later run
    ran its checks to the end."""
    only_from = only_from or {}
    merged: dict[str, dict] = {}
    for index, result in enumerate(results):
        checks = result["checks"]
        if checks and not any(c["check"] == "checks worker" for c in checks):
            merged.pop("checks worker", None)
        for check in checks:
            if index in only_from.get(check["check"].split(":")[0], {index}):
                merged[check["check"]] = {**check, "source": index}
    return list(merged.values())


def write_combined(stems: list[str], name: str, only_from: dict[str, list[str]] | None = None) -> None:
    """`--combine`: one table, plot and JSON (with every source run's device, versions, date and command)
    from runs that each measured part of the sweep, for example after a run's time budget ran out.
    `only_from` {variant: stems}: that variant's rows (and checks) come from those runs alone."""
    only_from = only_from or {}
    for variant, chosen in only_from.items():
        for stem in chosen:
            if variant not in VARIANTS or stem not in stems:
                raise SystemExit(
                    f"--only-from {variant}={stem}: expected a variant of {sorted(VARIANTS)} and a run of {stems}"
                )
    results = []
    for stem in stems:
        path = common.RESULTS / f"{stem}.json"
        if not path.exists():
            raise SystemExit(f"--combine: {path} does not exist")
        results.append(json.loads(path.read_text()))
    devices = {r["device"] for r in results}
    if len(devices) > 1:
        raise SystemExit(f"--combine: the runs were measured on different devices {sorted(devices)}")
    settings = {r["setting"] for r in results}
    if len(settings) > 1:
        raise SystemExit(f"--combine: the runs used different settings {sorted(settings)}")
    source_of = {variant: {stems.index(stem) for stem in chosen} for variant, chosen in only_from.items()}
    rows = combine(results, source_of)
    checks = combine_checks(results, source_of)
    claims = targets(rows, TARGET_TOKENS)
    print_tables(rows, checks, claims)
    png = common.RESULTS / f"{name}.png"
    (device,), (setting,) = devices, settings
    plot(rows, png, TARGET_TOKENS, setting, device=device)
    sources = [
        {key: r.get(key) for key in ("device", "cpu_count", "versions", "date", "command", "wall_s")} | {"name": stem}
        for stem, r in zip(stems, results, strict=True)
    ]
    configs = {k: v for r in results for k, v in r["configs"].items()}
    variants = {k: v for r in results for k, v in r["variants"].items()}

    def shared(field):  # the sources' common value of a field, or None where they differ
        values = [r.get(field) for r in results]
        return values[0] if all(v == values[0] for v in values) else None

    # The measuring runs' device, machine, versions and last date; `command` is this merge's.
    path = common.write_results(
        name,
        rows,
        setting=setting,
        checks=checks,
        targets=claims,
        configs=configs,
        variants=variants,
        sources=sources,
        only_from=only_from,
        device=device,
        platform=results[0]["platform"],
        cpu_count=shared("cpu_count"),
        versions=shared("versions"),
        date=max(r["date"] for r in results),
    )
    print(f"\nwrote {path} and {png} from {', '.join(stems)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 4096 only and no N sweep")
    parser.add_argument("--smoke", action="store_true", help="tiny f32 configs (d = 64): the machinery on a CPU")
    parser.add_argument("--ffn", default=",".join(DEFAULT_FFNS), help=f"variants, from {sorted(VARIANTS)}")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts (default 1k..16k)")
    parser.add_argument(
        "--n-sweep", default=None, help="comma-separated table sizes N (perfect squares), or 'none' for no N sweep"
    )
    parser.add_argument("--no-checks", action="store_true", help="skip the implementation-agreement checks")
    parser.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget for everything")
    parser.add_argument("--target-s", type=float, default=0.2, help="seconds of timed calls per batch")
    parser.add_argument("--name", default=RESULTS_NAME, help="results file stem (another name keeps a 2nd run apart)")
    parser.add_argument(
        "--combine",
        default=None,
        help="measure nothing: merge the results files with these comma-separated stems into --name's JSON and plot",
    )
    parser.add_argument(
        "--only-from",
        action="append",
        default=[],
        metavar="VARIANT=STEM",
        help="with --combine: take this variant's rows and checks from that run (repeatable: from those runs) alone",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-checks", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bad = [pair for pair in args.only_from if "=" not in pair]
    if bad:
        parser.error(f"--only-from takes VARIANT=STEM, got {bad}")
    if args.worker:
        return run_worker(json.loads(args.worker))
    if args.worker_checks:
        return run_checks(args.worker_checks)
    if args.combine:
        only_from: dict[str, list[str]] = {}
        for pair in args.only_from:
            variant, stem = pair.split("=", 1)
            only_from.setdefault(variant, []).append(stem)
        return write_combined([stem.strip() for stem in args.combine.split(",") if stem.strip()], args.name, only_from)

    start = time.time()
    setting = "smoke" if args.smoke else "paper"
    ffns = [name.strip() for name in args.ffn.split(",") if name.strip()]
    unknown = sorted(set(ffns) - set(VARIANTS))
    if unknown:
        parser.error(f"--ffn has unknown variants {unknown}; known: {sorted(VARIANTS)}")
    default_tokens = [64, 128] if args.smoke else ([TARGET_TOKENS] if args.quick else TOKENS)
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else default_tokens
    default_n = [256] if args.smoke else ([] if args.quick else N_SWEEP)
    n_sweep = default_n
    if args.n_sweep:
        n_sweep = [] if args.n_sweep == "none" else [int(n) for n in args.n_sweep.split(",")]
    for n in n_sweep:
        if math.isqrt(n) ** 2 != n:
            parser.error(f"--n-sweep value {n} is not a perfect square")

    # The workers own the device. This process touches it only at the end (to name it), and then without
    # JAX's default preallocation, which would otherwise hold most of the memory while workers run.
    child_env = dict(os.environ)
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    checks = []
    if not args.no_checks:
        _, checks, note = _run_subprocess(
            "--worker-checks", setting, timeout=min(CHECKS_TIMEOUT_S, args.budget_s / 2), env=child_env
        )
        if note:
            checks.append({"check": "checks worker", "passed": False, "error": note})
        print(f"checks done after {time.time() - start:.0f} s", flush=True)

    specs, rows = plan(ffns, tokens, n_sweep, setting)
    for i, spec in enumerate(specs):
        share = max(0.0, args.budget_s - (time.time() - start)) / (len(specs) - i)
        spec.update(deadline=time.time() + share, target_s=args.target_s)
        got, _, note = _run_subprocess("--worker", json.dumps(spec), timeout=share + GRACE_S, env=child_env)
        reported = {(r["tokens"], r["N"] if r["sweep"] == "N" else None, r["mode"]) for r in got}
        for tokens_, size in spec["jobs"]:
            base = row_base(spec["variant"], variant_config(spec["variant"], setting, size), tokens_, size)
            for mode in spec["modes"]:
                if (tokens_, size, mode) not in reported:
                    got.append({**base, "mode": mode, "error": note or "worker ended without this row"})
        rows += got
        print(f"{spec['variant']}: {len(got)} rows after {time.time() - start:.0f} s {note}", flush=True)

    claims = targets(rows, target_tokens(tokens))
    print_tables(rows, checks, claims)
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    png = common.RESULTS / f"{args.name}.png"
    plot(rows, png, target_tokens(tokens), setting)
    configs = {v: variant_config(v, setting).to_dict() for v in ffns}
    path = common.write_results(
        args.name,
        rows,
        setting=setting,
        checks=checks,
        targets=claims,
        configs=configs,
        variants={v: VARIANTS[v][4] for v in ffns},
        wall_s=time.time() - start,
    )
    print(f"\nwrote {path} and {png} in {time.time() - start:.0f} s")
    common.copy_to_out(path, png)


if __name__ == "__main__":
    main()
