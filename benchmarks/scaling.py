"""Scale-out on several GPUs: tokens/s of the `small` preset's training step on 1, 2 and 4 devices at
equal per-device batch (scaling efficiency), and the bytes the expert-parallel layer exchanges per step as
N grows. Checks first, then measures; prints tables, writes JSON to benchmarks/results/scaling_<platform>.json
(and a copy under $OUT if set).

    PYTHONPATH=. python3 benchmarks/scaling.py                                    # a 4-GPU host, ~5 minutes
    PYTHONPATH=. python3 benchmarks/scaling.py --cpu-devices 8 --parts bytes --dtype float32   # any machine
    PYTHONPATH=. python3 benchmarks/scaling.py --cpu-devices 8 --quick            # a smoke test of every part

`--layout rows,hidden` (the default) measures every mesh with an expert axis once per table layout
(`expert_parallel_layout`: the tables sharded by rows, each shard owning N/E experts, or by columns, each
holding d/E columns of every expert); meshes without one once ("-").

Parts (`--parts`, comma-separated), run in this order within `--budget-s` seconds:
  check       the sharded layer's forward and gradients against the same layer with no mesh, on a mesh over
              all devices, for each layout, with the configured implementation ("auto" = Pallas kernels on
              GPU): a mismatch aborts before anything is timed.
  throughput  the training step of `python -m train --preset small [--mesh ...]` (train.steps.build_steps:
              model, AdamW, shardings, donation), `--sequences-per-device` sequences of the preset's length
              per device (default: the preset's batch), random bytes as data: first on one device with no
              mesh (the baseline), then on meshes expert=4, data=2,expert=2, expert=2, each once per
              layout (the scaling efficiency = tokens/s on g devices / (g x baseline tokens/s)), then
              data=4, data=2 (plain data parallelism, for comparison). A layout that would not finish within the budget,
              judging by the slowest so far, is skipped and listed as such.
  bytes       per device and training step (forward + backward, the input's gradient included) of one layer
              (d=1024, K=32 by default), for each mesh (--mesh, repeatable) and N in --experts: the bytes in
              each kind of collective of the compiled program (`parallel.collective_bytes`), per layout,
              and the expert layer's exchange predicted from its buffer shapes (`parallel.dispatch_payload_bytes`
              for rows: the all_to_all; `parallel.hidden_payload_bytes` for hidden: the all_to_all and the
              all-gather), which must agree. Compiles only (abstract inputs), so N = 4M needs no memory;
              the expert op is the XLA one (`--bytes-implementation`), as the collectives are outside it.
              XLA:CPU widens bf16 collectives to f32: on CPU use --dtype float32 for the prediction to match.

The expert layer's traffic is flat in N in both layouts; what grows with N is the data-parallel all-reduce
of the expert-table gradients (2 x N/E rows, or 2 x N rows of d/E columns, per device over the "data"
axis) and, slightly, the router gates' (2 x d x sqrt(N)), both inside the all-reduce column.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import statistics
import sys
import time

# NVLink multicast stays off on the shared GPU hosts (see the device notes); keep any value already set.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import RESULTS, copy_to_out, environment, print_table, write_results
from omnimoe_jax import OmniMoE, OmniMoEConfig, parallel
from train import mesh as train_mesh
from train.config import TrainConfig, apply_overrides, parse_overrides
from train.presets import get_preset
from train.steps import build_steps, compiled_train_step


def layer_config(args, num_experts: int, layout: str = "rows", **changes) -> OmniMoEConfig:
    fields = dict(
        expert_parallel_layout=layout,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_experts=num_experts,
        num_experts_per_token=args.top_k,
        dtype=args.dtype,
        implementation=args.implementation,
        expert_axis=parallel.EXPERT_AXIS,
        expert_capacity_factor=args.capacity_factor,
    )
    return OmniMoEConfig(**{**fields, **changes})


def layer_loss(model: OmniMoE, params, batch_stats, x):
    """Mean square of the layer output after a training-mode call: a scalar that touches every output."""
    y, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
    return jnp.mean(jnp.square(y.astype(jnp.float32))), updates["batch_stats"]


def gradient_step(model: OmniMoE, params, batch_stats, x):
    """(loss, new batch_stats), (d params, d x): the input gradient too, as for a layer inside a model."""
    grad = jax.value_and_grad(functools.partial(layer_loss, model), argnums=(0, 2), has_aux=True)
    return grad(params, batch_stats, x)


def check(args) -> dict:
    """Sharded vs one-device forward and gradients on every device, per layout; exits on a mismatch."""
    return {layout: check_layout(args, layout) for layout in args.layout}


def check_layout(args, layout: str) -> dict:
    """Sharded vs one-device forward and gradients on every device, f32 at highest matmul precision."""
    devices = jax.device_count()
    mesh = parallel.make_mesh({"expert": devices})
    # d = 16 columns per device at 4 devices: the kernels' narrowest slice for the hidden layout.
    config = layer_config(
        args, 256, layout, hidden_size=16 * devices, intermediate_size=128, num_experts_per_token=8, dtype="float32"
    )
    model = OmniMoE(config)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64 * devices, config.hidden_size)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype) * 0.2, variables["params"])
    with jax.default_matmul_precision("highest"):
        (loss_ref, _), grads_ref = jax.jit(functools.partial(gradient_step, model))(params, variables["batch_stats"], x)
        with jax.set_mesh(mesh):
            rules = parallel.table_rules(layout)
            sharded = [
                jax.device_put(t, parallel.shardings(t, mesh, rules)) for t in (params, variables["batch_stats"])
            ]
            (loss, _), grads = jax.jit(functools.partial(gradient_step, model))(
                *sharded, jax.device_put(x, parallel.batch_sharding(mesh))
            )
    errors = {"loss": abs(float(loss) - float(loss_ref)) / abs(float(loss_ref))}
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_ref), strict=True):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        errors[parallel.path_name(path)] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    worst = max(errors.values())
    passed = bool(np.isfinite(worst) and worst < 1e-4)
    print(f"check {layout} on {devices} devices ({config.implementation}): worst relative error {worst:.2e}", end=" ")
    print("PASS" if passed else "FAIL")
    if not passed:
        print({k: f"{v:.2e}" for k, v in errors.items()})
        sys.exit(f"the sharded layer ({layout}) disagrees with the one-device layer (worst {worst:.2e})")
    return {"devices": devices, "worst_relative_error": worst, "errors": errors}


def default_meshes() -> list[str]:
    """Every device on the expert axis, and (with 4 or more devices) two data-parallel groups of experts."""
    devices = jax.device_count()
    meshes = [f"expert={devices}"]
    if devices >= 4 and devices % 2 == 0:
        meshes.append(f"data=2,expert={devices // 2}")
    return meshes


def mesh_table_layouts(args, spec: str | None) -> list[str | None]:
    """The table layouts measured on mesh `spec`: each of --layout where it has an expert axis, else None."""
    if spec is None or parallel.parse_mesh_spec(spec)[parallel.EXPERT_AXIS] == 1:
        return [None]
    return list(args.layout)


def predicted_exchange(args, layout: str, shards: int, dtype) -> dict[str, int]:
    """{collective: bytes} the expert layer's own exchange should show in the compiled step, per device."""
    if shards == 1:
        return {}
    if layout == "rows":
        capacity = parallel.dispatch_capacity(args.tokens_per_device, shards, args.top_k, args.capacity_factor)
        payload = parallel.dispatch_payload_bytes(shards, capacity, args.top_k, args.hidden, dtype)
        return {"all-to-all": payload["forward_backward"]}
    payload = parallel.hidden_payload_bytes(shards, args.tokens_per_device, args.top_k, args.hidden, dtype)
    return {"all-to-all": payload["all_to_all"], "all-gather": payload["all_gather"]}


def bytes_rows(args, deadline: float) -> tuple[list[dict], list[str]]:
    """Collective bytes of one layer's compiled training step per device, for each mesh, layout and N (compile
    only); (mesh, layout, N) left when `deadline` has passed are skipped and listed."""
    rows, skipped = [], []
    for spec in args.mesh or default_meshes():
        mesh = parallel.make_mesh(spec)
        shards = mesh.shape[parallel.EXPERT_AXIS]
        tokens = args.tokens_per_device * mesh.size
        for layout in mesh_table_layouts(args, spec):
            tables = layout or "rows"
            for num_experts in args.experts:
                if time.perf_counter() > deadline:
                    skipped.append(f"{spec} {tables} N={num_experts}")
                    continue
                config = layer_config(args, num_experts, tables, implementation=args.bytes_implementation)
                model = OmniMoE(config)
                x = jax.ShapeDtypeStruct((tokens, args.hidden), config.dtype, sharding=parallel.batch_sharding(mesh))
                abstract = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(x.shape, x.dtype))
                abstract = parallel.abstract_state(abstract, mesh, parallel.table_rules(tables))
                with jax.set_mesh(mesh):
                    step = jax.jit(functools.partial(gradient_step, model))
                    compiled = step.lower(abstract["params"], abstract["batch_stats"], x).compile()
                measured = parallel.collective_bytes(compiled.as_text())
                predicted = predicted_exchange(args, tables, shards, config.dtype)
                table_bytes = num_experts // shards * args.hidden * jnp.dtype(config.param_dtype).itemsize
                others = ("reduce-scatter", "collective-permute")
                row = {
                    "mesh": spec,
                    "tables": layout or "-",
                    "num_experts": num_experts,
                    "table_mb_per_device": table_bytes / 1e6,
                    "all_to_all_mb": measured["all-to-all"] / 1e6,
                    "all_gather_mb": measured["all-gather"] / 1e6,
                    "all_reduce_mb": measured["all-reduce"] / 1e6,
                    "other_collectives_mb": sum(measured[k] for k in others) / 1e6,
                    "exchange_predicted_mb": sum(predicted.values()) / 1e6,
                    "exchange_matches": all(measured[kind] == value for kind, value in predicted.items()),
                    "total_mb": sum(measured.values()) / 1e6,
                }
                rows.append(row)
                print(
                    f"{spec} {row['tables']} N={num_experts}: {row['total_mb']:.3f} MB of collectives per device "
                    f"per step (all_to_all {row['all_to_all_mb']:.3f}, all-gather {row['all_gather_mb']:.3f})",
                    flush=True,
                )
    return rows, skipped


def model_layouts(args) -> list[tuple[str | None, str | None]]:
    """The throughput (mesh, table layout) pairs in the order they are measured (later ones are skipped first
    when the budget runs out): one device with no mesh (the baseline), then meshes whose every device is an
    expert shard (the widest first, each per layout), then all-data meshes (plain data parallelism)."""
    counts = [g for g in (4, 2) if g <= jax.device_count()]
    expert = [f"expert={g}" for g in counts]
    if 4 in counts:
        expert.insert(1, "data=2,expert=2")
    meshes = [None, *expert, *(f"data={g}" for g in counts)]
    if args.quick:  # the smoke test: the baseline and the smallest expert mesh, in each layout
        meshes = [None, "expert=2"]
    return [(spec, layout) for spec in meshes for layout in mesh_table_layouts(args, spec)]


def model_config(args, devices: int, tables: str | None = None) -> TrainConfig:
    """The preset's training config with `--sequences-per-device` sequences per device, `--set` applied, and
    the FFN's table layout `tables` (None: the preset's)."""
    overrides = parse_overrides([f"--{item}" for item in args.set])
    if tables is not None:
        overrides["ffn.expert_parallel_layout"] = tables
    preset = get_preset(args.preset)
    sequences = args.sequences_per_device or preset.batch_size
    overrides["batch_size"] = str(sequences * devices)
    overrides["grad_accum"] = "1"
    return apply_overrides(preset, overrides)


def time_train_steps(step, state, batches, *, reps: int, rounds: int) -> tuple[dict, dict]:
    """Median ms per training step: `reps` steps back to back (the state donated from one to the next),
    blocking once at the end, `rounds` times; batches rotate. Also returns the last step's metrics."""
    for batch in batches:  # warm up every input set (the step was compiled ahead)
        state, metrics = step(state, batch)
    jax.block_until_ready(state)
    per_step = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(reps):
            state, metrics = step(state, batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
        per_step.append((time.perf_counter() - start) * 1e3 / reps)
    timing = {"ms": statistics.median(per_step), "ms_min": min(per_step), "ms_max": max(per_step)}
    return timing, jax.device_get(metrics)


def model_throughput(args, layout: str | None, tables: str | None = None) -> dict:
    """Tokens/s of the training step of `python -m train --preset <preset> [--mesh <layout>]
    [--ffn.expert_parallel_layout=<tables>]`."""
    devices = 1 if layout is None else math.prod(parallel.parse_mesh_spec(layout).values())
    mesh = None if layout is None else parallel.make_mesh(layout, devices=jax.devices()[:devices])
    config = model_config(args, devices, tables)
    shape = (1, config.batch_size, config.model.context_length + 1)  # [accum, micro, L + 1]
    rng = np.random.default_rng(0)
    # Random byte windows: the step's cost does not depend on which bytes, and no corpus needs loading.
    windows = [rng.integers(0, 256, shape, dtype=np.int32) for _ in range(3)]
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        start = time.perf_counter()
        steps = build_steps(config, mesh)
        step = compiled_train_step(steps, shape)
        state = steps.init_state(jax.random.key(0))
        jax.block_until_ready(state)
        compile_s = time.perf_counter() - start
        batches = windows if mesh is None else [train_mesh.put_batch(mesh, w, axis=1) for w in windows]
        timing, metrics = time_train_steps(step, state, batches, reps=args.reps, rounds=args.batches)
    tokens = config.tokens_per_step
    return {
        "layout": "one device, no mesh" if layout is None else layout,
        "tables": tables or "-",
        "devices": devices,
        "tokens_per_step": tokens,
        "compile_s": compile_s,
        **timing,
        "tokens_per_s": tokens / (timing["ms"] / 1e3),
        "loss": float(metrics["loss"]),
        "dropped_pairs": int(metrics["dropped_pairs"]),
    }


def throughput_rows(args, deadline: float) -> tuple[list[dict], list[str]]:
    """Model throughput per layout, with scaling efficiency against the no-mesh baseline; layouts that
    would not finish before `deadline` (judging by the slowest layout so far) are skipped and listed."""
    rows, skipped, slowest = [], [], 0.0
    for layout, tables in model_layouts(args):
        name = f"{layout} {tables}" if tables else str(layout)
        if rows and time.perf_counter() + slowest > deadline:
            skipped.append(name)
            print(f"skipped {name}: the time budget is spent", flush=True)
            continue
        start = time.perf_counter()
        row = model_throughput(args, layout, tables)
        slowest = max(slowest, time.perf_counter() - start)
        base = rows[0]["tokens_per_s"] if rows else row["tokens_per_s"]  # the first row is the baseline
        row["efficiency"] = row["tokens_per_s"] / (row["devices"] * base)
        rows.append(row)
        print(
            f"{row['layout']} ({row['tables']}): {row['ms']:.2f} ms per step, {row['tokens_per_s']:,.0f} tokens/s, "
            f"efficiency {row['efficiency']:.3f} (compiled in {row['compile_s']:.0f} s)",
            flush=True,
        )
    return rows, skipped


# The defaults of the options --quick changes: (full run, --quick).
DEFAULTS = {
    "preset": ("small", "tiny"),
    "sequences_per_device": (None, 2),
    "reps": (5, 1),
    "batches": (3, 1),
    "experts": ("65536,262144,1048576,4194304", "4096,16384"),
    "tokens_per_device": (4096, 64),
    "hidden": (1024, 64),
    "intermediate": (4096, 128),
    "top_k": (32, 8),
    "dtype": ("bfloat16", "float32"),
}


def apply_defaults(args) -> None:
    """Fill the options left unset with the full run's defaults, or the smoke test's with --quick."""
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="check,throughput,bytes")
    parser.add_argument("--budget-s", type=float, default=300.0, help="wall-time budget of the whole run")
    parser.add_argument(
        "--bytes-reserve-s", type=float, default=40.0, help="of the budget, kept for the bytes part (compiles only)"
    )
    parser.add_argument("--cpu-devices", type=int, help="split the CPU into this many devices (no GPU needed)")
    parser.add_argument(
        "--layout", default="rows,hidden", help="table layouts of the meshes with an expert axis (rows, hidden)"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the parts of this platform's existing results file that this run does not measure (so the "
        "throughput and the bytes can run as two calls, each within a time limit)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: the tiny preset on no mesh and expert=2 only, 2 sequences per device, one timed step, "
        "a d=64 layer and N up to 16384 for the bytes, f32 (explicit options still win)",
    )
    # throughput
    parser.add_argument("--preset", default=None, help="train preset whose training step is timed (default small)")
    parser.add_argument("--sequences-per-device", type=int, help="default: the preset's batch_size")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a train config override")
    parser.add_argument("--reps", type=int, default=None, help="training steps per timed round (default 5)")
    parser.add_argument("--batches", type=int, default=None, help="timed rounds, the median reported (default 3)")
    # check and bytes: one layer
    parser.add_argument(
        "--mesh",
        action="append",
        help="a mesh of the bytes part (repeatable); default: expert=all, data=2,expert=all/2",
    )
    parser.add_argument("--experts", default=None, help="N of the bytes part (default 65536,...,4194304)")
    parser.add_argument("--tokens-per-device", type=int, default=None, help="bytes part (default 4096)")
    parser.add_argument("--hidden", type=int, default=None, help="bytes part (default 1024)")
    parser.add_argument("--intermediate", type=int, default=None, help="bytes part (default 4096)")
    parser.add_argument("--top-k", type=int, default=None, help="bytes part (default 32)")
    parser.add_argument("--dtype", default=None, help="bytes part (default bfloat16)")
    parser.add_argument("--capacity-factor", type=float, default=None)
    parser.add_argument("--implementation", default="auto", help="expert op of the check")
    parser.add_argument("--bytes-implementation", default="xla", help="expert op of the compile-only bytes part")
    args = parser.parse_args()
    apply_defaults(args)
    args.experts = [int(n) for n in args.experts.split(",")]
    args.layout = args.layout.split(",")
    if bad := sorted(set(args.layout) - {"rows", "hidden"}):
        parser.error(f"--layout: unknown layouts {bad}; expected rows and/or hidden")
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - {"check", "bytes", "throughput"})
    if unknown:
        parser.error(f"unknown parts {unknown}; expected check, throughput, bytes")
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        jax.config.update("jax_platforms", "cpu")
    deadline = started + args.budget_s

    print(environment())
    results = {"settings": {k: v for k, v in vars(args).items() if k != "parts"}, "parts": parts, "skipped": []}
    if "check" in parts:
        results["check"] = check(args)
    if "throughput" in parts:
        rows, skipped = throughput_rows(args, deadline - (args.bytes_reserve_s if "bytes" in parts else 0))
        columns = ["layout", "tables", "devices", "tokens_per_step", "ms", "ms_min", "ms_max", "tokens_per_s"]
        columns.append("efficiency")
        print_table(rows, [*columns, "compile_s", "loss", "dropped_pairs"])
        results["throughput"], results["skipped"] = rows, results["skipped"] + skipped
    if "bytes" in parts:
        rows, skipped = bytes_rows(args, deadline)
        print_table(
            rows,
            [
                *("mesh", "tables", "num_experts", "table_mb_per_device", "all_to_all_mb", "all_gather_mb"),
                *("all_reduce_mb", "other_collectives_mb", "exchange_predicted_mb", "exchange_matches", "total_mb"),
            ],
        )
        results["bytes"], results["skipped"] = rows, results["skipped"] + skipped
        for spec, tables in dict.fromkeys((r["mesh"], r["tables"]) for r in rows):
            exchange = {
                r["all_to_all_mb"] + r["all_gather_mb"] for r in rows if (r["mesh"], r["tables"]) == (spec, tables)
            }
            flat = "the same for every N" if len(exchange) == 1 else "NOT flat in N"
            print(f"{spec} ({tables}): the expert layer's all_to_all + all-gather bytes per step are {flat}")
    if results["skipped"]:
        print("skipped for the time budget:", ", ".join(results["skipped"]))
    results["seconds"] = time.perf_counter() - started
    # One file per platform: the CPU run (fake devices: bytes only mean anything) and the GPU run side by side.
    name = f"scaling_{jax.default_backend()}"
    if args.merge and (RESULTS / f"{name}.json").exists():
        previous = json.loads((RESULTS / f"{name}.json").read_text())
        previous["throughput"] = previous.pop("rows", [])
        kept = [part for part in ("check", "throughput", "bytes") if part not in parts and part in previous["parts"]]
        for part in kept:
            results[part] = previous[part]
        results["parts"] = [*kept, *parts]
        results["merged_from"] = {"date": previous.get("date"), "command": previous.get("command"), "parts": kept}
    path = write_results(name, results.pop("throughput", []), **results)
    copy_to_out(path)
    print(f"wrote {path} after {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
