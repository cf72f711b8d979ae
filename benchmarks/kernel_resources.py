"""Compile omni_expert's kernels for sm_90 on a machine without a GPU and report their resources.

Lowers jax.grad of the op for CUDA (the same Triton IR the GPU would get), compiles each kernel's IR with
the pip `triton` package for an H100 target (GPUTarget("cuda", 90, 32)) and reads registers, spills
(LOCAL) and shared memory off the cubin with `cuobjdump -res-usage`, plus a count of the global load
and store instructions in the SASS (LDG.E.128 = 16-byte vector loads) and of the tensor-core instructions
(HMMA: mma.sync; HGMMA: Hopper's warpgroup products). A development tool, not a test:
the GPU compiles the same IR with the Triton bundled in jaxlib, so the counts are close, not identical.

It reaches into one private JAX function (the Pallas-to-Triton lowering) to capture each kernel's IR; it
works with jax 0.10.2 (this project's CPU machines).

    PYTHONPATH=. python benchmarks/kernel_resources.py --shape 4096 512 102400 1024 [--set num_warps=8 ...]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import pathlib
import re
import subprocess
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, stated to silence its warning

import jax
import jax.numpy as jnp
import triton
from jax._src.pallas.triton import pallas_call_registration
from triton.backends.compiler import GPUTarget

from pallas_kernels.omni_expert import default_config, omni_expert

H100 = GPUTarget("cuda", 90, 32)


def capture_triton_modules(fn, *specs) -> list[tuple[str, str, tuple]]:
    """(kernel name, Triton IR text, launch grid) of every pallas_call in jax.jit(fn) lowered for CUDA."""
    captured = []
    lower = pallas_call_registration.lowering.lower_jaxpr_to_triton_module

    def recording(*args, **kwargs):
        result = lower(*args, **kwargs)
        text = result.module.operation.get_asm(enable_debug_info=False)
        name = re.search(r"tt\.func public @(\w+)", text).group(1)
        captured.append((name, text, tuple(result.grid)))
        return result

    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = recording
    try:
        jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",))
    finally:
        pallas_call_registration.lowering.lower_jaxpr_to_triton_module = lower
    return captured


def resources(ir_text: str, *, num_warps: int, num_stages: int) -> dict:
    """Registers, local (spill) bytes, shared bytes and global memory instruction counts for sm_90."""
    bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        source = pathlib.Path(tmp) / "kernel.ttir"
        source.write_text(ir_text)
        compiled = triton.compile(str(source), target=H100, options={"num_warps": num_warps, "num_stages": num_stages})
        cubin = pathlib.Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([bin_dir / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([bin_dir / "cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    memory = collections.Counter(re.findall(r"\b((?:LDGSTS|LDG|STG)\.E[.A-Z0-9]*)", sass))
    matrix = collections.Counter(re.findall(r"\b((?:HMMA|HGMMA)\.[.A-Z0-9]*)", sass))
    return {
        "registers": int(fields["REG"]),
        "local_bytes": int(fields["LOCAL"]),
        # Triton's shared memory is dynamic: the compiler's metadata has it, the cubin's static count does not.
        "shared_bytes": compiled.metadata.shared,
        "global_ops": dict(sorted(memory.items())),
        "matrix_ops": dict(sorted(matrix.items())),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, metavar=("T", "K", "N", "D"), default=[4096, 512, 102400, 1024])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override config fields")
    args = parser.parse_args()
    tokens, top_k, num_experts, d = args.shape
    dtype = jnp.dtype(args.dtype)
    config = default_config(tokens, top_k, num_experts, d, dtype)
    for item in args.set:
        field, value = item.split("=")
        config = dataclasses.replace(config, **{field: value if field == "variant" else int(value)})
    print(config)

    def loss(x, up, down, weights, indices):
        y = omni_expert(x, up, down, weights, indices, implementation="pallas", interpret=False, config=config)
        return jnp.sum(y.astype(jnp.float32))

    specs = [
        jax.ShapeDtypeStruct((tokens, d), dtype),
        jax.ShapeDtypeStruct((num_experts, d), dtype),
        jax.ShapeDtypeStruct((num_experts, d), dtype),
        jax.ShapeDtypeStruct((tokens, top_k), jnp.float32),
        jax.ShapeDtypeStruct((tokens, top_k), jnp.int32),
    ]
    seen = set()
    for name, text, grid in capture_triton_modules(jax.grad(loss, argnums=(0, 1, 2, 3)), *specs):
        if text in seen:  # the same kernel lowered twice (jax.grad traces the forward again)
            continue
        seen.add(text)
        report = resources(text, num_warps=config.num_warps, num_stages=config.num_stages)
        print(f"{name:28s} grid={grid!s:16s} {report}")


if __name__ == "__main__":
    main()
