"""Model FLOPs per token and model FLOPs utilisation (MFU), the figures every train record reports.

Model FLOPs count the arithmetic the model needs, not what an implementation happens to do (no
rematerialisation, no padding), as the PaLM paper's appendix B defines them:

    model_flops_per_token = 6 * active_parameters + 12 * num_layers * context_length * hidden_size

6 per active parameter (2 in the forward's multiply-add, 4 in the backward's two products), and 12 L d per
layer for attention's scores and weighted values (forward and backward, causal masking not discounted).
Active parameters are `omnimoe_jax.parameter_counts(...)["active"]`: a sparse FFN counts only what one token
uses (OmniMoE's K expert rows of each table, a MoE's routed experts), and the tied embedding counts once,
as the output projection it also is.
"""

from __future__ import annotations

import functools

from omnimoe_jax._model import LMConfig, parameter_counts


@functools.lru_cache(maxsize=16)  # parameter_counts traces the model: once per config
def model_flops_per_token(config: LMConfig) -> dict[str, int]:
    """{"active_parameters", "attention_flops_per_token", "model_flops_per_token"} of `config`."""
    active = parameter_counts(config)["active"]
    attention = 12 * config.num_layers * config.context_length * config.hidden_size
    return {
        "active_parameters": active,
        "attention_flops_per_token": attention,
        "model_flops_per_token": 6 * active + attention,
    }


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's `peak_flops` (FLOP/s)."""
    if not peak_flops > 0:
        raise ValueError(f"peak_flops={peak_flops!r} must be a positive FLOP/s rate")
    return flops_per_token * tokens_per_s / peak_flops


# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s, matched against
# `jax.Device.device_kind` in order (the first substring found wins, so "H100 PCIe" precedes "H100").
# MFU in the train records is against these, as MaxText and the PaLM paper report it; the step benchmark
# (`benchmarks/train_step.py`) also divides by the matrix rate it measures in the same run.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
)


def peak_flops(device_kind: str) -> float | None:
    """The datasheet dense bf16 peak of a device kind, or None for one not in PEAK_BF16_FLOPS (a CPU)."""
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None
