"""OmniMoEConfig validation: every refusal names the field and the value."""

import jax.numpy as jnp
import pytest

from omnimoe_jax import OmniMoEConfig

BASE = dict(hidden_size=64, intermediate_size=128, num_experts=4096, num_experts_per_token=16)


def make(**changes):
    return OmniMoEConfig(**{**BASE, **changes})


def test_defaults_match_the_seed():
    config = make()
    assert config.hidden_act == "silu" and config.router_norm == "batchnorm"
    assert config.router_norm_eps == 1e-5 and config.router_norm_momentum == 0.1
    assert config.norm_topk_prob is False and config.implementation == "auto"
    assert config.num_expert_sqrt == 64


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"num_experts": 4000}, r"num_experts=4000 must be a perfect square .* nearest valid counts: \[3969, 4096\]"),
        ({"num_experts": 1, "num_experts_per_token": 1}, r"num_experts=1 .* n >= 2.*\[4, 9\]"),
        ({"num_experts": 0}, "num_experts=0 must be a positive int"),
        ({"num_experts_per_token": 0}, "num_experts_per_token=0 must be a positive int"),
        ({"num_experts_per_token": 4097}, "num_experts_per_token=4097 must be <= num_experts=4096"),
        ({"hidden_size": -1}, "hidden_size=-1 must be a positive int"),
        ({"intermediate_size": 2.5}, "intermediate_size=2.5 must be a positive int"),
        ({"hidden_size": True}, "hidden_size=True must be a positive int"),
        ({"hidden_act": "swiglu"}, r"hidden_act='swiglu' is not supported; expected one of \["),
        ({"hidden_act": ["silu"]}, r"hidden_act=\['silu'\] is not supported; expected one of \["),
        ({"router_norm_eps": float("inf")}, "router_norm_eps=inf must be a positive finite number"),
        ({"router_norm": "layernorm"}, "router_norm='layernorm' must be one of"),
        ({"router_norm_eps": 0.0}, "router_norm_eps=0.0 must be a positive finite number"),
        ({"router_norm_momentum": 1.5}, r"router_norm_momentum=1.5 must be in \(0, 1\]"),
        ({"norm_topk_prob": 1}, "norm_topk_prob=1 must be a bool"),
        ({"implementation": "cuda"}, "implementation='cuda' must be one of"),
        ({"dtype": "int32"}, "dtype='int32' must be a floating dtype"),
        ({"param_dtype": "nonsense"}, "param_dtype='nonsense' is not a dtype"),
        ({"implementation": "pallas", "hidden_size": 24}, 'hidden_size=24: implementation="pallas" needs a multiple'),
        ({"implementation": "pallas", "dtype": "float16"}, 'implementation="pallas" needs float32 or bfloat16'),
    ],
)
def test_invalid_fields_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        make(**changes)


def test_dtypes_normalise_so_equal_configs_are_equal():
    a, b = make(dtype="bfloat16"), make(dtype=jnp.bfloat16)
    assert a == b and hash(a) == hash(b)


def test_dict_round_trip_and_unknown_fields():
    config = make(dtype="bfloat16", norm_topk_prob=True)
    assert OmniMoEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown OmniMoEConfig fields \['top_k'\]"):
        OmniMoEConfig.from_dict({**config.to_dict(), "top_k": 3})
