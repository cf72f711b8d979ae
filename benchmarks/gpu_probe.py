"""One-shot probe of the GPU machine: versions, devices, and that Pallas-on-Triton gathers/atomics and
jax-triton work there. Prints facts only; the kernel tests and benchmarks are the real checks."""

import importlib
import platform

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "triton", "jax_triton", "numpy"):
    try:
        module = importlib.import_module(name)
        print(f"{name:18s} {getattr(module, '__version__', '?')}")
    except Exception as err:  # a probe reports every failure and goes on
        print(f"{name:18s} import failed: {err!r}")
print("python", platform.python_version(), "devices", jax.devices())
dev = jax.devices()[0]
print(
    "device kind",
    dev.device_kind,
    "memory_stats",
    {k: v for k, v in (dev.memory_stats() or {}).items() if "limit" in k},
)


def gather_atomic_kernel(ids_ref, x_ref, zeros_ref, o_ref):
    # Gather rows x[ids] and atomically add them into o[ids // 2] (pairs of ids share an output row).
    del zeros_ref  # aliased to o_ref
    ids = ids_ref[...]
    rows = x_ref[ids, :]
    pltriton.atomic_add(o_ref, (ids // 2, slice(None)), rows)


ids = jnp.arange(32, dtype=jnp.int32)
x = jax.random.normal(jax.random.key(0), (32, 64), jnp.float32)
out = pl.pallas_call(
    gather_atomic_kernel,
    out_shape=jax.ShapeDtypeStruct((16, 64), jnp.float32),
    input_output_aliases={2: 0},  # the output starts as the zeros input: atomics need a defined start
    compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
)(ids, x, jnp.zeros((16, 64), jnp.float32))
want = x.reshape(16, 2, 64).sum(1)
print("pallas gather+atomic_add max err", float(jnp.max(jnp.abs(out - want))))
print("x64 default matmul precision check", np.asarray(jnp.ones((2, 2)) @ jnp.ones((2, 2)))[0, 0])
