"""Scale-out of the expert-parallel OmniMoE layer: bytes exchanged per step as N grows, and tokens/s vs
device count at equal per-device batch. Checks first, then measures; prints tables, writes JSON to
benchmarks/results/scaling_<platform>.json (and a copy under $OUT if set).

    python -m benchmarks.scaling --cpu-devices 8 --parts bytes --dtype float32   # any machine: compile only
    python -m benchmarks.scaling                                                 # GPU host: all three parts

Parts (`--parts`, comma-separated):
  check       the sharded layer's forward and gradients against the same layer with no mesh, on a mesh over
              all devices, with the configured implementation ("auto" = Pallas kernels on GPU where they
              exist): a mismatch aborts before anything is timed.
  bytes       per device and training step (forward + backward, the input's gradient included) of one layer,
              for each mesh (--mesh, repeatable) and N in --experts: the bytes in each kind of collective of
              the compiled program (`parallel.collective_bytes`) and the all_to_all payload predicted from
              the dispatch buffer shapes (`parallel.dispatch_payload_bytes`), which must agree. Compiles only
              (abstract inputs), so N = 4M needs no memory. XLA:CPU widens bf16 collectives to f32: on CPU
              use --dtype float32 for the prediction to match.
  throughput  tokens/s of one layer's training step (forward, backward, AdamW update) at --tokens-per-device
              tokens per device: the plain layer with no mesh, then meshes of 1, 2, 4, ... devices on the
              expert axis; scaling efficiency = tokens/s on g devices / (g x tokens/s with no mesh).

The throughput part times the layer, not a whole model: the train script's `small` preset (issue 5) belongs
in `model_step` once it lands. The dispatch traffic is flat in N; what grows with N is the data-parallel
all-reduce of the expert-table gradients (2 x N/E rows per device over the "data" axis), reported apart.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import pathlib
import shutil
import sys

# NVLink multicast stays off on the shared GPU hosts (see the device notes); keep any value already set.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import environment, print_table, time_fn, write_results
from omnimoe_jax import OmniMoE, OmniMoEConfig, parallel


def layer_config(args, num_experts: int, **changes) -> OmniMoEConfig:
    fields = dict(
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
    """Sharded vs one-device forward and gradients on every device, f32 at highest matmul precision."""
    devices = jax.device_count()
    mesh = parallel.make_mesh({"expert": devices})
    config = layer_config(args, 256, hidden_size=64, intermediate_size=128, num_experts_per_token=8, dtype="float32")
    model = OmniMoE(config)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64 * devices, config.hidden_size)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype) * 0.2, variables["params"])
    with jax.default_matmul_precision("highest"):
        (loss_ref, _), grads_ref = jax.jit(functools.partial(gradient_step, model))(params, variables["batch_stats"], x)
        with jax.set_mesh(mesh):
            sharded = [jax.device_put(t, parallel.shardings(t, mesh)) for t in (params, variables["batch_stats"])]
            (loss, _), grads = jax.jit(functools.partial(gradient_step, model))(
                *sharded, jax.device_put(x, parallel.batch_sharding(mesh))
            )
    errors = {"loss": abs(float(loss) - float(loss_ref)) / abs(float(loss_ref))}
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_ref), strict=True):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        errors[parallel.path_name(path)] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    worst = max(errors.values())
    passed = bool(np.isfinite(worst) and worst < 1e-4)
    print(f"check on {devices} devices ({config.implementation}): worst relative error {worst:.2e}", end=" ")
    print("PASS" if passed else "FAIL")
    if not passed:
        print({k: f"{v:.2e}" for k, v in errors.items()})
        sys.exit(f"the sharded layer disagrees with the one-device layer (worst {worst:.2e})")
    return {"devices": devices, "worst_relative_error": worst, "errors": errors}


def default_meshes() -> list[str]:
    """Every device on the expert axis, and (with 4 or more devices) two data-parallel groups of experts."""
    devices = jax.device_count()
    meshes = [f"expert={devices}"]
    if devices >= 4 and devices % 2 == 0:
        meshes.append(f"data=2,expert={devices // 2}")
    return meshes


def bytes_rows(args) -> list[dict]:
    """Collective bytes of one layer's compiled training step per device, for each mesh and N (compile only)."""
    rows = []
    for spec in args.mesh or default_meshes():
        mesh = parallel.make_mesh(spec)
        shards = mesh.shape[parallel.EXPERT_AXIS]
        tokens = args.tokens_per_device * mesh.size
        capacity = parallel.dispatch_capacity(args.tokens_per_device, shards, args.top_k, args.capacity_factor)
        for num_experts in args.experts:
            config = layer_config(args, num_experts)
            model = OmniMoE(config)
            x = jax.ShapeDtypeStruct((tokens, args.hidden), config.dtype, sharding=parallel.batch_sharding(mesh))
            abstract = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(x.shape, x.dtype))
            abstract = parallel.abstract_state(abstract, mesh)
            with jax.set_mesh(mesh):
                step = jax.jit(functools.partial(gradient_step, model))
                compiled = step.lower(abstract["params"], abstract["batch_stats"], x).compile()
            measured = parallel.collective_bytes(compiled.as_text())
            predicted = parallel.dispatch_payload_bytes(shards, capacity, args.top_k, args.hidden, config.dtype)
            table_bytes = num_experts // shards * args.hidden * jnp.dtype(config.param_dtype).itemsize
            others = ("all-gather", "reduce-scatter", "collective-permute")
            rows.append(
                {
                    "mesh": spec,
                    "num_experts": num_experts,
                    "capacity": capacity,
                    "table_mb_per_device": table_bytes / 1e6,
                    "all_to_all_mb": measured["all-to-all"] / 1e6,
                    "all_to_all_predicted_mb": (predicted["forward_backward"] if shards > 1 else 0) / 1e6,
                    "all_reduce_mb": measured["all-reduce"] / 1e6,
                    "other_collectives_mb": sum(measured[k] for k in others) / 1e6,
                }
            )
            row = rows[-1]
            row["all_to_all_matches"] = row["all_to_all_mb"] == row["all_to_all_predicted_mb"]
            print(f"{spec} N={num_experts}: all_to_all {row['all_to_all_mb']:.3f} MB per device per step", flush=True)
    return rows


def model_step(args, mesh):
    """The timed training step: (jitted step, initial state, input sets, tokens per step).

    One OmniMoE layer with AdamW, its input's gradient included; the train script's `small` preset (issue 5)
    replaces it once it lands. `mesh` None: the plain one-device layer, the baseline of the scaling table.
    """
    config = layer_config(args, args.throughput_experts)
    model = OmniMoE(config)
    tx = optax.adamw(1e-4)
    devices = 1 if mesh is None else mesh.size
    tokens = args.tokens_per_device * devices

    def init(key):
        variables = model.init(key, jnp.zeros((tokens, config.hidden_size), config.dtype))
        return {**variables, "opt_state": tx.init(variables["params"])}

    def step(state, x):
        (loss, batch_stats), (grads, d_x) = gradient_step(model, state["params"], state["batch_stats"], x)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # d x is returned so the step does the work of a layer inside a model (XLA would drop it otherwise).
        return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}, loss, d_x

    inputs = [np.random.default_rng(i).standard_normal((tokens, args.hidden)).astype(np.float32) for i in range(3)]
    if mesh is None:
        xs = [jnp.asarray(x, config.dtype) for x in inputs]
        return jax.jit(step), jax.jit(init)(jax.random.key(0)), xs, tokens
    with jax.set_mesh(mesh):
        state_shardings = parallel.shardings(jax.eval_shape(init, jax.random.key(0)), mesh)
        state = jax.jit(init, out_shardings=state_shardings)(jax.random.key(0))
        batch = parallel.batch_sharding(mesh)
        xs = [jax.device_put(jnp.asarray(x, config.dtype), batch) for x in inputs]
        jitted = jax.jit(step, in_shardings=(state_shardings, batch), out_shardings=(state_shardings, None, batch))
    return jitted, state, xs, tokens


def throughput_rows(args) -> list[dict]:
    """Tokens/s of the step with no mesh, then on meshes of 1, 2, 4, ... devices (all on the expert axis)."""
    rows, base = [], None
    layouts = [None] + [g for g in (1, 2, 4, 8, 16) if g <= jax.device_count()]
    for count in layouts:
        mesh = None if count is None else parallel.make_mesh({"expert": count}, devices=jax.devices()[:count])
        step, state, xs, tokens = model_step(args, mesh)
        # The state is not donated: time_fn reuses it for every call, so each call is one real step.
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            timing = time_fn(step, [(state, x) for x in xs], reps=args.reps, batches=args.batches)
        devices = 1 if mesh is None else mesh.size
        rate = tokens / (timing["ms"] / 1e3)
        base = base or rate  # the plain one-device layer
        layout = "no mesh" if mesh is None else f"expert={count}"
        rows.append(
            {
                "layout": layout,
                "devices": devices,
                "tokens_per_step": tokens,
                **timing,
                "tokens_per_s": rate,
                "efficiency": rate / (devices * base),
            }
        )
        print(f"{layout}: {timing['ms']:.3f} ms per step, {rate:,.0f} tokens/s", flush=True)
        del step, state, xs  # free the devices before the next layout
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="check,bytes,throughput")
    parser.add_argument("--cpu-devices", type=int, help="split the CPU into this many devices (no GPU needed)")
    parser.add_argument(
        "--mesh",
        action="append",
        help="a mesh of the bytes part (repeatable); default: expert=all, data=2,expert=all/2",
    )
    parser.add_argument("--experts", default="65536,262144,1048576,4194304")
    parser.add_argument("--throughput-experts", type=int, default=65536)
    parser.add_argument("--tokens-per-device", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--capacity-factor", type=float, default=None)
    parser.add_argument("--implementation", default="auto")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args()
    args.experts = [int(n) for n in args.experts.split(",")]
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - {"check", "bytes", "throughput"})
    if unknown:
        parser.error(f"unknown parts {unknown}; expected check, bytes, throughput")
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        jax.config.update("jax_platforms", "cpu")

    print(environment())
    results = {"settings": {k: v for k, v in vars(args).items() if k != "parts"}, "parts": parts}
    if "check" in parts:
        results["check"] = check(args)
    if "bytes" in parts:
        rows = bytes_rows(args)
        print_table(
            rows,
            [
                *("mesh", "num_experts", "table_mb_per_device", "all_to_all_mb", "all_to_all_predicted_mb"),
                *("all_reduce_mb", "other_collectives_mb", "all_to_all_matches"),
            ],
        )
        results["bytes"] = rows
        for spec in dict.fromkeys(r["mesh"] for r in rows):
            flat = len({r["all_to_all_mb"] for r in rows if r["mesh"] == spec}) == 1
            print(f"{spec}: all_to_all bytes per step are", "the same for every N" if flat else "NOT flat in N")
    if "throughput" in parts:
        rows = throughput_rows(args)
        print_table(
            rows, ["layout", "devices", "tokens_per_step", "ms", "ms_min", "ms_max", "tokens_per_s", "efficiency"]
        )
        results["throughput"] = rows
    # One file per platform: the CPU run (fake devices: bytes only mean anything) and the GPU run side by side.
    path = write_results(f"scaling_{jax.default_backend()}", results.pop("throughput", []), **results)
    if os.environ.get("OUT"):
        shutil.copy(path, pathlib.Path(os.environ["OUT"]) / path.name)
    print("wrote", path)


if __name__ == "__main__":
    main()
