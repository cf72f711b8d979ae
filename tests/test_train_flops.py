"""Model FLOPs per token, the datasheet peaks MFU is reported against, and the batch prefetcher."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from omnimoe_jax import OmniMoEConfig
from omnimoe_jax._model import LMConfig, parameter_counts
from omnimoe_jax.baselines import DenseFFNConfig
from train.data import BatchSampler
from train.flops import mfu, model_flops_per_token, peak_flops
from train.prefetch import BatchPrefetcher


def test_dense_model_flops_count_every_weight_and_attention():
    config = LMConfig(ffn=DenseFFNConfig(64, 96), num_layers=3, hidden_size=64, context_length=32)
    d, layers, width, vocab = 64, 3, 96, 259
    # Per layer: q, k, v, out (4 d^2), the SwiGLU's three d x width matrices, two RMSNorm scales; then the
    # final norm and the tied embedding.
    params = layers * (4 * d * d + 3 * d * width + 2 * d) + d + vocab * d
    assert parameter_counts(config)["active"] == params
    flops = model_flops_per_token(config)
    assert flops["attention_flops_per_token"] == 12 * layers * 32 * d
    assert flops["model_flops_per_token"] == 6 * params + 12 * layers * 32 * d


def test_sparse_model_flops_count_active_parameters_only():
    config = LMConfig(ffn=OmniMoEConfig(64, 64, 16 * 16, 4), hidden_size=64, dense_intermediate_size=64)
    counts = parameter_counts(config)
    flops = model_flops_per_token(config)
    assert flops["active_parameters"] == counts["active"] < counts["total"]
    assert flops["model_flops_per_token"] == 6 * counts["active"] + flops["attention_flops_per_token"]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("cpu", None)],
)
def test_peak_flops_by_device_kind(kind, expected):
    assert peak_flops(kind) == expected


def test_mfu_refuses_a_missing_peak():
    assert mfu(100.0, 10.0, 2000.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="peak_flops"):
        mfu(100.0, 10.0, 0.0)


def test_prefetcher_yields_the_sampler_batches_in_order_with_the_state_after_each():
    tokens = np.arange(1000, dtype=np.int32)
    sampler = BatchSampler(tokens, window=9, batch_size=4, seed=3)
    reference = BatchSampler(tokens, window=9, batch_size=4, seed=3)
    with BatchPrefetcher(sampler.next, put=np.copy, state=sampler.state, depth=3) as prefetcher:
        for _ in range(6):
            batch, state = prefetcher.next()
            np.testing.assert_array_equal(batch, reference.next())
            assert state == reference.state()  # resuming from it draws exactly the following batches
    assert not any(t.name == "batch-prefetch" for t in threading.enumerate())


def test_prefetcher_raises_the_threads_error_in_the_consumer():
    calls = iter([np.zeros(2), None])

    def draw():
        batch = next(calls)
        if batch is None:
            raise RuntimeError("corpus went away")
        return batch

    with BatchPrefetcher(draw, put=lambda b: b) as prefetcher:
        prefetcher.next()
        with pytest.raises(RuntimeError, match="corpus went away"):
            prefetcher.next()


@pytest.mark.parametrize("depth", [0, 1.5, True])
def test_prefetcher_depth_must_be_a_positive_int(depth):
    with pytest.raises(ValueError, match="depth"):
        BatchPrefetcher(lambda: 0, put=lambda b: b, depth=depth)
