"""FFN presets at matched active parameters per token, with the arithmetic that matches them.

Active parameters per token: the parameters one token's output is computed from. Dense weights, gates,
query networks and sub-keys count in full (every token multiplies all of them); of an expert or value table
only the rows a token retrieves count. Non-affine BatchNorms have no parameters. With d = hidden_size:

| FFN | active parameters per token |
| --- | --- |
| DenseFFN (width I) | 3 d I |
| OmniMoE (shared width I, N = n*n, K) | 3 d I + 2 d n (two router gates) + 2 d K (u_e, v_e per expert) |
| FlashMoE (shared width I, N = n*n, K) | 3 d I + 2 d n (one joint gate d -> 2n) + 2 d K |
| DeepSeekMoE (E experts of width I_e, top k, shared width I_s) | 3 d I_s + d E (gate) + 3 d I_e k |
| GShardMoE (E experts of width I_e, top k) | d E (gate) + 3 d I_e k |
| PEER (N = n*n, h heads, k per head, key_dim c) | d h c (queries) + n c (2 shared sub-key tables, n x c/2) + 2 d h k |
| PKM (N = n*n, h heads, k per head, key_dim c) | d h c (queries) + h n c (each head's two sub-key tables) + d h k |

`paper_presets()`: the latency setting of the OmniMoE paper as the seed's benchmark suites encode it, d = 1024.
The brief fixes everything but the dense width and PEER's and PKM's heads and query sizes; those are chosen
to land near OmniMoE's count. The two "-matched" entries change only the shared width (DeepSeekMoE) or the
expert width (GShard) so that they match too; the paper's own coarse settings are 35% above and 32% below.

| preset | configuration | active parameters | vs OmniMoE |
| --- | --- | --- | --- |
| omnimoe | N = 102400 (320^2), K = 512, shared 1024 | 3,145,728 + 655,360 + 1,048,576 = 4,849,664 | 1 |
| flashmoe | as omnimoe (the FlashMoE variant) | 4,849,664 | 0 |
| dense | width 1600 | 4,915,200 | +1.4% |
| deepseekmoe | 256 experts of 256, top 4, shared 1024 | 3,145,728 + 262,144 + 3,145,728 = 6,553,600 | +35.1% |
| deepseekmoe-matched | 256 experts of 256, top 4, shared 512 | 1,572,864 + 262,144 + 3,145,728 = 4,980,736 | +2.7% |
| gshard | 128 experts of 512, top 2 | 131,072 + 3,145,728 = 3,276,800 | -32.4% |
| gshard-matched | 128 experts of 768, top 2 | 131,072 + 4,718,592 = 4,849,664 | 0 |
| peer | N = 102400, 10 heads x 125 = 1250 experts, key_dim 224 | 2,293,760 + 71,680 + 2,560,000 = 4,925,440 | +1.6% |
| pkm | N = 197136 (444^2), 4 heads x 625 = 2500, key_dim 384 | 1,572,864 + 681,984 + 2,560,000 = 4,814,848 | -0.7% |

`small_presets(d)`: for training comparisons; every entry is 12 d^2 active parameters up to a few per cent
(d = 256: 786,432), with n = d/2 sub-keys per axis (N = d^2/4) for the product-key ones:

| preset | configuration | active parameters |
| --- | --- | --- |
| dense | width 4d | 12 d^2 |
| omnimoe | shared 2d, N = (d/2)^2, K = 5d/2 | 6 d^2 + d^2 + 5 d^2 = 12 d^2 |
| flashmoe | as omnimoe | 12 d^2 |
| deepseekmoe | 64 experts of d/2, top 6, shared d | 3 d^2 + 64 d + 9 d^2 = 12 d^2 + 64 d |
| gshard | 16 experts of 2d, top 2 | 16 d + 12 d^2 |
| peer | N = (d/2)^2, 8 heads x d/2, key_dim d/2 | 4 d^2 + d^2/4 + 8 d^2 = 12.25 d^2 |
| pkm | N = (d/2)^2, 4 heads x 9d/4, key_dim d/2 | 2 d^2 + d^2 + 9 d^2 = 12 d^2 |
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

# The registry imports this package's config modules, so this module is imported while the registry is: it
# reads FFN_REGISTRY only when called.
from omnimoe_jax import ffn_registry
from omnimoe_jax._config import FFNConfig, FlashMoEConfig, OmniMoEConfig
from omnimoe_jax._config_fields import is_int
from omnimoe_jax.baselines._deepseek import DeepSeekMoEConfig
from omnimoe_jax.baselines._dense import DenseFFNConfig
from omnimoe_jax.baselines._gshard import GShardMoEConfig
from omnimoe_jax.baselines._peer import PEERConfig
from omnimoe_jax.baselines._pkm import PKMConfig

__all__ = ["FFNConfig", "active_parameters", "paper_presets", "small_presets"]


def active_parameters(config: FFNConfig) -> int:
    """Parameters one token's output is computed from (the table in this module's docstring; each kind's
    config counts its own, `FFNConfig.active_parameters`).

    Retrieved rows count once per retrieval (it is the compute that is matched), so at toy sizes where a
    token's h * k retrievals outnumber a PEER or PKM table's rows, the count exceeds the table.
    """
    if not isinstance(config, FFNConfig):
        kinds = ", ".join(cls.__name__ for cls in ffn_registry.FFN_REGISTRY.values())
        raise TypeError(f"config must be one of the FFN configs ({kinds}), got {type(config).__name__}")
    return config.active_parameters()


def paper_presets(*, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> dict[str, FFNConfig]:
    """The OmniMoE paper's latency setting (d = 1024), FlashMoE at OmniMoE's sizes, and two matched coarse
    variants; see the module doc."""
    d = 1024
    common = dict(dtype=dtype, param_dtype=param_dtype)
    deepseek = DeepSeekMoEConfig(d, 256, 256, 4, shared_intermediate_size=1024, **common)
    gshard = GShardMoEConfig(d, 128, 512, 2, **common)
    return {
        "omnimoe": OmniMoEConfig(d, 1024, 102400, 512, **common),
        "flashmoe": FlashMoEConfig(d, 1024, "silu", 102400, 512, **common),
        "dense": DenseFFNConfig(d, 1600, **common),
        "deepseekmoe": deepseek,
        "deepseekmoe-matched": deepseek.replace(shared_intermediate_size=512),
        "gshard": gshard,
        "gshard-matched": gshard.replace(expert_intermediate_size=768),
        "peer": PEERConfig(d, 102400, num_heads=10, experts_per_head=125, key_dim=224, **common),
        "pkm": PKMConfig(d, 197136, num_heads=4, values_per_head=625, key_dim=384, **common),
    }


def small_presets(
    hidden_size: int = 256, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
) -> dict[str, FFNConfig]:
    """{kind: its `small_preset(d)`} for every registered FFN kind: about 12 d^2 active parameters each (the
    dense SwiGLU of width 4d); see the module doc.

    hidden_size must be a multiple of 4 and at least 12 (n = d/2 sub-keys per axis, and the table of n^2
    rows must hold OmniMoE's K = 5d/2 and PKM's k = 9d/4 per head: (d/2)^2 >= 5d/2 from d = 10 on).
    """
    d = hidden_size
    if not is_int(d) or d < 12 or d % 4:
        raise ValueError(f"hidden_size={d!r} must be an int >= 12 and a multiple of 4")
    return {
        kind: cls.small_preset(d, dtype=dtype, param_dtype=param_dtype)
        for kind, cls in ffn_registry.FFN_REGISTRY.items()
    }
