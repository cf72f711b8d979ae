"""Named starting configurations; `python -m train --preset NAME --key=value ...` refines one.

| preset | where | model | tokens/step | steps |
| --- | --- | --- | --- | --- |
| tiny | a 2-core CPU, minutes (the default) | d=128, 4 layers, N=32^2, K=8, f32 | 32 x 128 | 400 |
| small | one H100, ~10 minutes | d=512, 8 layers, N=128^2, K=32, bf16 | 64 x 512 | 3000 |
| base | GPUs, ~125M active parameters | d=768, 12 layers, N=256^2, K=64, bf16 | 128 x 1024 | 20000 |
| paper | documented, not run here | d=1024, 24 layers, N=320^2, K=512, bf16 | 256 x 2048 | 50000 |

`paper` uses the OmniMoE layer of the paper's latency benchmark (d=1024, N=102400=320^2, K=512 atomic
experts per token, shared MLP width 1024, as encoded in the seed repositories' benchmarks). The depth,
heads, context, batch and schedule are our assumptions: the paper's full training table (1.7B active
parameters) was not available to us. `python -m train --preset paper` would run it; nothing here has.
"""

from __future__ import annotations

from omnimoe_jax._model import LMConfig
from train.config import TrainConfig

PRESETS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(
        model=LMConfig(
            context_length=128,
            num_layers=4,
            num_heads=4,
            hidden_size=128,
            intermediate_size=256,
            num_experts=32 * 32,
            num_experts_per_token=8,
            dtype="float32",
        ),
        batch_size=32,
        steps=400,
        learning_rate=2e-3,
        warmup_steps=40,
        eval_every=100,
        eval_batches=4,
        log_every=20,
        checkpoint_every=200,
    ),
    "small": TrainConfig(
        model=LMConfig(
            context_length=512,
            num_layers=8,
            num_heads=8,
            hidden_size=512,
            intermediate_size=1024,
            num_experts=128 * 128,
            num_experts_per_token=32,
            dtype="bfloat16",
        ),
        batch_size=64,
        steps=3000,
        learning_rate=1e-3,
        warmup_steps=200,
        eval_every=250,
        eval_batches=16,
        log_every=50,
        checkpoint_every=1000,
    ),
    "base": TrainConfig(
        model=LMConfig(
            context_length=1024,
            num_layers=12,
            num_heads=12,
            hidden_size=768,
            intermediate_size=3328,
            num_experts=256 * 256,
            num_experts_per_token=64,
            dtype="bfloat16",
        ),
        batch_size=128,
        grad_accum=2,
        steps=20000,
        learning_rate=6e-4,
        warmup_steps=1000,
        eval_every=1000,
        eval_batches=32,
        log_every=100,
        checkpoint_every=2000,
    ),
    "paper": TrainConfig(
        model=LMConfig(
            context_length=2048,
            num_layers=24,
            num_heads=16,
            hidden_size=1024,
            intermediate_size=1024,
            num_experts=320 * 320,
            num_experts_per_token=512,
            dtype="bfloat16",
        ),
        batch_size=256,
        grad_accum=8,
        steps=50000,
        learning_rate=3e-4,
        warmup_steps=2000,
        eval_every=2000,
        eval_batches=64,
        log_every=100,
        checkpoint_every=2000,
    ),
}


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not defined; expected one of {sorted(PRESETS)}")
    return PRESETS[name]
