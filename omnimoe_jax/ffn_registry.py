"""The FFN kinds, in one table: kind name -> config class.

Everything that lists kinds reads `FFN_REGISTRY`: the language model (`LMConfig.ffn`), the training job's
`--ffn=KIND` and `--ffn.<field>` overrides and presets, `omnimoe_jax.baselines.presets.small_presets`, the
benchmarks. What a kind is lives on its config class (an `omnimoe_jax._config.FFNConfig`): `module_class()`,
`active_parameters()`, `small_preset(d)`, `sows_aux_loss`, `routed` and `table_parameters`. A new kind is its own
module (a config class and its module) plus one line here.

In a `TransformerLM` the model owns some of every kind's fields (`MODEL_OWNED`: one width, activation, dtype and
kernel choice for every FFN of the model); a kind's other fields are its "own" fields, the ones
`--ffn.<field>` sets and config.json stores as `{"kind": ..., <own fields>}`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from omnimoe_jax._config import FFNConfig, FlashMoEConfig, OmniMoEConfig
from omnimoe_jax.baselines._deepseek import DeepSeekMoEConfig
from omnimoe_jax.baselines._dense import DenseFFNConfig
from omnimoe_jax.baselines._gshard import GShardMoEConfig
from omnimoe_jax.baselines._peer import PEERConfig
from omnimoe_jax.baselines._pkm import PKMConfig

FFN_REGISTRY: dict[str, type[FFNConfig]] = {
    "omnimoe": OmniMoEConfig,
    "dense": DenseFFNConfig,  # the SwiGLU; also every layer that is not sparse (LMConfig.moe_every)
    "flashmoe": FlashMoEConfig,
    "gshard": GShardMoEConfig,
    "deepseekmoe": DeepSeekMoEConfig,
    "peer": PEERConfig,
    "pkm": PKMConfig,
}
FFN_KINDS = tuple(FFN_REGISTRY)  # the names, in order (what the code reads at call time is FFN_REGISTRY)
# Fields a model sets from its own fields of the same name (where a kind has them).
MODEL_OWNED = ("hidden_size", "hidden_act", "dtype", "param_dtype", "implementation")
# An own field that is not an override: `python -m train --mesh` sets it for the run (train.mesh).
SET_BY_MESH = ("expert_axis",)


def config_class(kind: str) -> type[FFNConfig]:
    """The config class of FFN `kind`; ValueError listing the kinds otherwise."""
    if not isinstance(kind, str) or kind not in FFN_REGISTRY:
        raise ValueError(f"ffn={kind!r} must be one of {tuple(FFN_REGISTRY)}")
    return FFN_REGISTRY[kind]


def kind_of(config: Any) -> str:
    """The registered kind whose config `config` is; TypeError otherwise."""
    for kind, cls in FFN_REGISTRY.items():
        if type(config) is cls:
            return kind
    raise TypeError(
        f"ffn={config!r} is not the config of a registered FFN kind; expected one of "
        f"{', '.join(cls.__name__ for cls in FFN_REGISTRY.values())}"
    )


def has_tables(kind: str) -> bool:
    """Whether FFN `kind` has expert or value tables (its config's `table_parameters`)."""
    return bool(config_class(kind).table_parameters)


def table_kinds() -> tuple[str, ...]:
    """The kinds with expert or value tables, in registry order."""
    return tuple(kind for kind in FFN_REGISTRY if has_tables(kind))


def table_parameter_names() -> frozenset[str]:
    """The parameter names of every kind's tables: a model's tables are its parameters of these names (the
    last key of their path), since the layers that are not sparse are dense SwiGLUs and no kind's other
    parameters take a table's name (tests/test_ffn_registry.py checks both against every kind's parameters)."""
    return frozenset().union(*(cls.table_parameters for cls in FFN_REGISTRY.values()))


def own_field_types(kind: str) -> dict[str, Any]:
    """{field: type annotation} of `kind`'s own fields: its config's fields but those the model owns."""
    cls = config_class(kind)
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in MODEL_OWNED}


def to_dict(config: FFNConfig) -> dict[str, Any]:
    """{"kind": ..., <own fields>}: the JSON form of an FFN config inside a model's (no model-owned fields)."""
    kind = kind_of(config)
    return {"kind": kind, **{name: getattr(config, name) for name in own_field_types(kind)}}


def from_dict(fields: dict[str, Any], owned: dict[str, Any]) -> FFNConfig:
    """Inverse of `to_dict`, with the model-owned fields taken from `owned` ({field: the model's value})."""
    if not isinstance(fields, dict) or "kind" not in fields:
        raise ValueError(f"ffn={fields!r} must be a dict with a 'kind' (one of {FFN_KINDS}) and that kind's fields")
    fields = dict(fields)
    kind = fields.pop("kind")
    valid = own_field_types(kind)
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise ValueError(f"ffn fields {unknown} are not own fields of kind {kind!r}; its fields: {sorted(valid)}")
    cls = config_class(kind)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**fields, **{name: value for name, value in owned.items() if name in names})
