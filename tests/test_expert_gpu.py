"""omni_expert's Pallas kernels natively on a GPU (`python -m pytest -m gpu`): the CPU suite's comparisons at
the benchmark shapes, bitwise determinism (no atomics: a moving result would be a race), untouched rows, and
the whole layer's gradients with implementation "pallas" against "xla"."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from expert_checks import (
    check_against_reference,
    check_segment_sum,
    expert_inputs,
    segment_sum,
    segment_sum_stages,
    segments_per_block,
)
from helpers import assert_close, assert_trees_close, normal

from omnimoe_jax import OmniMoE, OmniMoEConfig
from pallas_kernels import omni_expert
from pallas_kernels.omni_expert.config import default_config
from pallas_kernels.omni_expert.scheduling import build_schedule

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU"),
]

F32, BF16 = jnp.float32, jnp.bfloat16

SHAPES = [
    # (T, K, N, d, dtype, hot expert)
    (37, 5, 50, 32, F32, None),  # ragged everything
    (40, 4, 16, 32, F32, 3),  # one expert takes every token
    (33, 1, 8, 16, BF16, None),  # K = 1
    (6, 512, 4, 16, F32, None),  # K > N: segments thousands of pairs long
    (512, 32, 4096, 1024, BF16, None),
    (1000, 32, 65536, 1024, BF16, None),  # T not a multiple of any tile
    (512, 16, 1048576, 1024, BF16, None),  # ~0.01 pairs per expert: almost every row untouched
    (2048, 64, 4096, 1024, BF16, 77),  # one expert in every token: a segment across 30+ blocks, fixed up
    (256, 512, 102400, 1024, BF16, None),  # the paper's N and K
    (64, 1024, 16777216, 16, F32, None),  # the largest N: 16.7M experts
    (64, 64, 4096, 8192, BF16, None),  # the widest d
    (4096, 16, 4096, 1024, F32, None),
]


@pytest.mark.parametrize("variant", ["token", "sorted"])
@pytest.mark.parametrize(("tokens", "top_k", "num_experts", "d", "dtype", "hot"), SHAPES)
def test_forward_and_gradients_match_the_reference(tokens, top_k, num_experts, d, dtype, hot, variant, seed):
    inputs = expert_inputs(seed, tokens, top_k, num_experts, d, dtype, hot_expert=hot)
    config = default_config(tokens, top_k, num_experts, d, dtype, variant=variant)
    check_against_reference(inputs, interpret=False, config=config)


# Summing the segments by reductions: the shapes that stress the segment pass (ragged, one hot expert,
# K > N, a segment across 30+ blocks, the paper's N and K, almost every row untouched).
REDUCTION_SHAPES = [SHAPES[i] for i in (0, 1, 3, 6, 7, 8)]


@pytest.mark.parametrize("segment_sums", ["reductions", "aligned"])
@pytest.mark.parametrize(("tokens", "top_k", "num_experts", "d", "dtype", "hot"), REDUCTION_SHAPES)
def test_segment_sums_by_reductions_match_the_reference(tokens, top_k, num_experts, d, dtype, hot, segment_sums, seed):
    inputs = expert_inputs(seed, tokens, top_k, num_experts, d, dtype, hot_expert=hot)
    config = default_config(tokens, top_k, num_experts, d, dtype, variant="sorted")
    check_against_reference(inputs, interpret=False, config=dataclasses.replace(config, segment_sums=segment_sums))


@pytest.mark.parametrize("segment_sums", [None, "aligned"])  # the heuristic's, and the aligned chunks
def test_results_are_bitwise_deterministic(segment_sums, seed):
    inputs = expert_inputs(seed, 1024, 32, 16384, 1024, BF16)
    config = default_config(1024, 32, 16384, 1024, BF16)
    if segment_sums is not None:
        config = dataclasses.replace(config, segment_sums=segment_sums)

    @jax.jit
    def run(x, up, down, weights):
        def op(*args):
            return omni_expert(*args, inputs.indices, implementation="pallas", config=config)

        y, vjp = jax.vjp(op, x, up, down, weights)
        return y, vjp(inputs.cotangent)

    first = run(inputs.x, inputs.up, inputs.down, inputs.weights)
    for _ in range(3):
        again = run(inputs.x, inputs.up, inputs.down, inputs.weights)
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
            np.testing.assert_array_equal(np.asarray(a.astype(F32)), np.asarray(b.astype(F32)))


@pytest.mark.parametrize("segment_sums", ["products", "reductions", "aligned"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_segment_sum_writes_exactly_the_touched_rows_and_the_fused_dots(dtype, segment_sums, seed):
    rng = np.random.default_rng(seed)
    tokens, top_k, num_experts, d = 2000, 8, 50000, 256
    indices = rng.integers(0, num_experts, (tokens, top_k), dtype=np.int32)
    indices[:, 0] = 12345  # and one segment 2000 pairs long
    coef = rng.standard_normal(tokens * top_k, np.float32)  # in sorted order, like the kernel takes it
    rows = jnp.asarray(rng.standard_normal((tokens, d), np.float32), dtype)
    table = jnp.asarray(rng.standard_normal((num_experts, d), np.float32), dtype)
    schedule = build_schedule(jnp.asarray(indices), num_experts)
    config = dataclasses.replace(default_config(tokens, top_k, num_experts, d, dtype), segment_sums=segment_sums)
    jnp.full((num_experts, d), 7.0, dtype).block_until_ready()  # likely reused memory: garbage if a row is missed
    out, dots = segment_sum(jnp.asarray(coef), rows, table, schedule, top_k=top_k, config=config, interpret=False)
    check_segment_sum(out, dots, coef=coef, rows=rows, table=table, indices=indices, order=schedule.order, dtype=dtype)


@pytest.mark.parametrize(
    ("tokens", "top_k", "num_experts", "hot"),
    [
        (2048, 128, 256, None),  # 1024 pairs per expert: ~1.1 segments per 64-pair block (training's K = 1280)
        (4096, 32, 2048, None),  # 64 pairs per expert: ~2 per block, some 3 (training's K = 32 and 128)
        (2048, 16, 4096, None),  # 8 pairs per expert: ~8 per block, the loop after the unrolled two
        (2000, 8, 50000, 12345),  # ~1 pair per expert, and one segment through 31 blocks
    ],
)
def test_reductions_with_and_without_regathering(tokens, top_k, num_experts, hot, seed):
    # As the CPU test of the same name, natively, in the pass without the dots (d_up's: the one that
    # regathers): against the float64 sums, and here also bit for bit against each other
    # (Triton sums the same values in the same order; interpret mode's XLA does not). Only the finished rows
    # and dots are compared: on a GPU the blocks kernel's unwritten rows hold whatever memory held.
    rng = np.random.default_rng(seed)
    d = 256
    indices = rng.integers(0, num_experts, (tokens, top_k), dtype=np.int32)
    if hot is not None:
        indices[:, 0] = hot
    coef = jnp.asarray(rng.standard_normal(tokens * top_k, np.float32))
    rows = jnp.asarray(rng.standard_normal((tokens, d), np.float32), BF16)
    table = jnp.asarray(rng.standard_normal((num_experts, d), np.float32), BF16)
    schedule = build_schedule(jnp.asarray(indices), num_experts)
    base = dataclasses.replace(default_config(tokens, top_k, num_experts, d, BF16), segment_sums="reductions")
    per_block = segments_per_block(schedule.sorted_expert, base.segment_block)
    sums = {"coef": np.asarray(coef), "rows": rows, "table": table, "indices": indices, "order": schedule.order}
    results = []
    for regather in (False, True):  # d_up's pass, the one that regathers (the pass with dots ignores it)
        config = dataclasses.replace(base, segment_regather=regather)
        run = functools.partial(segment_sum_stages, top_k=top_k, config=config, interpret=False)
        _, _, out, _ = run(coef, rows, table, schedule, with_dots=False)
        check_segment_sum(out, None, **sums, dtype=BF16)
        results.append(np.asarray(out).view(np.uint16))
    what = f"regathered vs not, up to {per_block.max()} segments a block"
    np.testing.assert_array_equal(results[1], results[0], what)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_layer_gradients_with_pallas_match_xla(dtype, key, monkeypatch):
    import omnimoe_jax._router as router_module
    from pallas_kernels.omni_router import api as router_api

    if "pallas" not in router_api.SUPPORTED_IMPLEMENTATIONS:
        # The router's kernel is another issue; until it lands, route with its reference.
        real_router = router_module.omni_router
        monkeypatch.setattr(router_module, "omni_router", lambda *args, implementation, **kw: real_router(*args, **kw))
    xla = OmniMoEConfig(
        hidden_size=256,
        intermediate_size=512,
        num_experts=4096,
        num_experts_per_token=16,
        dtype=dtype,
        implementation="xla",
    )
    x = normal(key, (4, 128, 256))
    variables = jax.jit(OmniMoE(xla).init)(jax.random.key(1), x)

    def value_and_grads(config):
        model = OmniMoE(config)

        @jax.jit
        def run(params):
            def loss(params):
                y = model.apply({**variables, "params": params}, x)
                return jnp.sum(jnp.sin(y.astype(F32))), y

            (_, y), grads = jax.value_and_grad(loss, has_aux=True)(params)
            return y, grads

        return run(variables["params"])

    want_y, want_grads = value_and_grads(xla)
    y, grads = value_and_grads(dataclasses.replace(xla, implementation="pallas"))
    assert_close(y, want_y, dtype)
    assert_trees_close(grads, want_grads, dtype)
