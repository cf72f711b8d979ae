"""Named starting configurations; `python -m train --preset NAME --key=value ...` refines one.

| preset | where | model | tokens/step | steps |
| --- | --- | --- | --- | --- |
| tiny | a 2-core CPU, minutes (the default) | d=128, 4 layers, N=32^2, K=8, f32 | 32 x 128 | 400 |
| small | one H100, ~10 minutes | d=512, 8 layers, N=128^2, K=32, bf16 | 64 x 512 | 3000 |
| small-<kind> | one H100 | `small` with the FFN kind at matched active parameters (below) | 64 x 512 | 3000 |
| base | GPUs, ~125M active parameters | d=768, 12 layers, N=256^2, K=64, bf16 | 128 x 1024 | 20000 |
| paper | documented, not run here | d=1024, 24 layers, N=320^2, K=512, bf16 | 256 x 2048 | 50000 |

`paper` uses the OmniMoE layer of the paper's latency benchmark (d=1024, N=102400=320^2, K=512 atomic
experts per token, shared MLP width 1024, as encoded in the seed repositories' benchmarks). The depth,
heads, context, batch and schedule are our assumptions: the paper's full training table (1.7B active
parameters) was not available to us. `python -m train --preset paper` would run it; nothing here has.

**Matched presets** `small-<kind>` for each FFN kind (omnimoe, dense, flashmoe, gshard, deepseekmoe, peer, pkm): the
`small` preset (d=512, 8 layers, everything else equal) with every FFN sized by
`omnimoe_jax.baselines.presets.small_presets(512)`, which gives each kind 12 d^2 = 3,145,728 active
parameters per token and layer, up to the gates' and queries' few per cent (`matched_ffn_overrides` holds
the overrides, for any width). Per FFN layer (arithmetic in `omnimoe_jax.baselines.presets`), and for the
whole model (`omnimoe_jax.parameter_counts`: the FFNs' 8 x 3.1M plus 8 x 4 d^2 of attention and the tied
259 x 512 embedding):

| preset | FFN (d = 512) | FFN active | model active | model total |
| --- | --- | --- | --- | --- |
| small-dense | SwiGLU of width 2048 | 3,145,728 | 33,695,744 | 33,695,744 |
| small-omnimoe | shared 1024, N = 256^2, K = 1280 | 3,145,728 | 33,695,744 | 560,080,896 |
| small-flashmoe | as small-omnimoe (one joint gate d -> 2n) | 3,145,728 | 33,695,744 | 560,080,896 |
| small-deepseekmoe | 64 experts of 256, top 6, shared 512 | 3,178,496 (+1.0%) | 33,957,888 (+0.8%) | 216,410,112 |
| small-gshard | 16 experts of 1024, top 2 | 3,153,920 (+0.3%) | 33,761,280 (+0.2%) | 209,922,048 |
| small-peer | N = 256^2, 8 heads x 256, key_dim 256 | 3,211,264 (+2.1%) | 34,220,032 (+1.6%) | 554,313,728 |
| small-pkm | N = 256^2, 4 heads x 1152, key_dim 256 | 3,145,728 | 33,695,744 | 283,256,832 |

(The plain `small` preset's OmniMoE, shared 1024, N = 128^2, K = 32, has 1,736,704 active FFN parameters
and 22,423,552 for the model.) Matching active parameters makes the fine-grained kinds do much more
gathering per token than `small`: OmniMoE touches 1280 expert rows of each table per token instead of 32,
PEER 2048, PKM 4608 value rows, so their steps take correspondingly longer (the README's training-step
tables, from `benchmarks/train_step.py`). On a GPU PKM sums its rows through `pallas_kernels.embedding_bag`
without storing them; its "xla" path (a CPU, or implementation="xla") gathers them as PKM's reference code
does, into a [T, 4, 1152, 512] array per layer (T tokens per micro-batch): 155 GB in bf16 at the preset's
32768 tokens. So small-pkm sets grad_accum="auto": before the first step the training script compiles the step
for 1, 2, 4, ... micro-batches of the same 64 sequences and trains with the fewest whose XLA memory estimate
fits the device (`train.memory`; the start record holds the choice and its estimate). That arithmetic is the
reason for the setting; on an H200, where the kernel path stores no gathered rows, it picks 1 (the training
step benchmark's record for small-pkm).
"""

from __future__ import annotations

import dataclasses

from omnimoe_jax import ffn_registry
from omnimoe_jax._config import OmniMoEConfig
from omnimoe_jax._model import FFN_KINDS, LMConfig
from train.config import TrainConfig, apply_overrides

PRESETS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(
        model=LMConfig(
            context_length=128,
            num_layers=4,
            num_heads=4,
            hidden_size=128,
            ffn=OmniMoEConfig(128, 256, 32 * 32, 8),
            dense_intermediate_size=256,
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
            ffn=OmniMoEConfig(512, 1024, 128 * 128, 32),
            dense_intermediate_size=1024,
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
            ffn=OmniMoEConfig(768, 3328, 256 * 256, 64),
            dense_intermediate_size=3328,
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
            ffn=OmniMoEConfig(1024, 1024, 320 * 320, 512),
            dense_intermediate_size=1024,
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


def matched_ffn_overrides(kind: str, hidden_size: int) -> dict[str, str]:
    """`--key=value` overrides (values as strings) that give a model of width `hidden_size` the FFN `kind`
    with the sizes of its `small_preset(hidden_size)` (`omnimoe_jax.baselines.presets.small_presets`): about
    12 d^2 active parameters per token and layer for every kind.

    The preset's sizes (its own fields that have no default or another value) are set as `--ffn.<field>`, so
    the overrides also resize a model whose FFN is already of that kind.
    """
    preset = ffn_registry.config_class(kind).small_preset(hidden_size)
    overrides = {"hidden_size": hidden_size, "ffn": kind}
    for field in dataclasses.fields(preset):
        value = getattr(preset, field.name)
        if field.name in ffn_registry.own_field_types(kind) and (
            field.default is dataclasses.MISSING or value != field.default
        ):
            overrides[f"ffn.{field.name}"] = value
    return {key: str(value) for key, value in overrides.items()}


# small-<kind>: the `small` preset with each FFN kind at matched active parameters (the table above).
PRESETS.update(
    {f"small-{kind}": apply_overrides(PRESETS["small"], matched_ffn_overrides(kind, 512)) for kind in FFN_KINDS}
)
PRESETS["small-pkm"] = apply_overrides(PRESETS["small-pkm"], {"grad_accum": "auto"})  # see the docstring


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not defined; expected one of {sorted(PRESETS)}")
    return PRESETS[name]
