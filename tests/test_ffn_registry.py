"""The FFN registry is the one list of kinds: every registered kind builds and trains in the language model and
reports its active parameters, what lists kinds (presets, overrides, help, benchmarks) reads the registry, and
a kind added to it (its own config class and module, one registry entry) works everywhere without more edits.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
from typing import Any, ClassVar, Self

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe_jax import ffn_registry
from omnimoe_jax._model import LMConfig, TransformerLM, parameter_counts
from omnimoe_jax.baselines import presets
from omnimoe_jax.baselines._config import BaselineConfig
from omnimoe_jax.ffn_registry import FFN_KINDS, FFN_REGISTRY
from train import help as help_text
from train.config import apply_overrides, override_keys
from train.presets import PRESETS, get_preset

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import compare  # benchmarks/ is a folder of scripts, not a package

D = 16


def tiny_model(ffn: Any) -> LMConfig:
    return LMConfig(vocab_size=32, context_length=8, num_layers=1, num_heads=2, hidden_size=D, ffn=ffn)


def one_training_step(model: LMConfig, key: jax.Array) -> dict[str, Any]:
    """One SGD step of the language model on random tokens, unjitted (op by op: quicker than a compile at this
    size); returns the gradients, the sown collections and the routings."""
    tokens = jax.random.randint(key, (2, model.context_length), 0, model.vocab_size)
    lm = TransformerLM(model)
    variables = lm.init(jax.random.fold_in(key, 1), tokens)

    def loss(params):
        (logits, routings), sown = lm.apply(
            {**variables, "params": params},
            tokens,
            train=True,
            return_routing=True,
            mutable=["batch_stats", "losses", "metrics"],
        )  # [B, L, V]
        nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1))
        aux = sum(jax.tree.leaves(sown.get("losses", {})), jnp.float32(0))
        return nll + aux, (sown, routings)

    (value, (sown, routings)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    return {"loss": value, "grads": grads, "sown": sown, "routings": routings}


@pytest.mark.parametrize("kind", FFN_KINDS)
def test_every_registered_kind_builds_and_reports_active_parameters(kind):
    cls = FFN_REGISTRY[kind]
    model = tiny_model(kind)  # by name: its small preset at d = 16, with the model's owned fields
    assert type(model.ffn) is cls and model.ffn_kind == kind and ffn_registry.kind_of(model.ffn) == kind
    assert ffn_registry.to_dict(model.ffn) == ffn_registry.to_dict(cls.small_preset(D))
    assert presets.small_presets(D)[kind] == cls.small_preset(D)
    assert LMConfig.from_dict(model.to_dict()) == model
    tokens = jax.ShapeDtypeStruct((2, model.context_length), jnp.int32)
    shapes = jax.eval_shape(TransformerLM(model).init, jax.random.key(0), tokens)  # nothing compiled
    ffn_total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]["layer_0"]["ffn"]))
    # Active parameters: the kind's own count for the FFN, everything else in full.
    counts = parameter_counts(model)
    assert counts["active"] == counts["total"] - ffn_total + model.ffn.active_parameters()
    assert 0 < model.ffn.active_parameters() == presets.active_parameters(model.ffn)
    assert ("batch_stats" in shapes) == (kind in ("omnimoe", "flashmoe", "peer", "pkm"))


@pytest.mark.slow  # every kind also trains in the default suite, through `python -m train` (test_train_ffn.py)
@pytest.mark.parametrize("kind", FFN_KINDS)
def test_every_registered_kind_trains_one_step(kind, key):
    cls = FFN_REGISTRY[kind]
    model = tiny_model(kind)
    step = one_training_step(model, key)
    assert math.isfinite(float(step["loss"]))
    ffn_grads = jax.tree.leaves(step["grads"]["layer_0"]["ffn"])
    assert ffn_grads and all(bool(jnp.all(jnp.isfinite(g))) for g in ffn_grads)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in ffn_grads)  # the FFN is part of what trains
    assert ("losses" in step["sown"]) == cls.sows_aux_loss
    assert len(step["routings"]) == (1 if cls.routed else 0)


def test_what_lists_kinds_reads_the_registry():
    assert FFN_KINDS == tuple(FFN_REGISTRY) == ("omnimoe", "dense", "flashmoe", "gshard", "deepseekmoe", "peer", "pkm")
    assert list(presets.small_presets(D)) == list(FFN_KINDS)
    assert {name for name in PRESETS if name.startswith("small-")} == {f"small-{kind}" for kind in FFN_KINDS}
    assert all(get_preset(f"small-{kind}").model.ffn_kind == kind for kind in FFN_KINDS)
    # Every compare.py variant is a registered kind's config, and every kind has a row.
    variants = {name: compare.variant_config(name, "smoke") for name in compare.VARIANTS}
    assert {ffn_registry.kind_of(config) for config in variants.values()} == set(FFN_KINDS)
    assert all(type(compare.build(c)) is type(c).module_class() for c in variants.values())
    text = help_text.HELP_FILE.read_text()
    assert all(f"--ffn={kind} fields" in text for kind in FFN_KINDS)
    # The routed kinds and those with an auxiliary loss are the classes' own flags.
    assert [k for k, c in FFN_REGISTRY.items() if c.routed] == ["omnimoe", "flashmoe"]
    assert [k for k, c in FFN_REGISTRY.items() if c.sows_aux_loss] == ["gshard", "deepseekmoe"]
    assert ffn_registry.table_kinds() == ("omnimoe", "flashmoe", "peer", "pkm")
    assert ffn_registry.table_parameter_names() == {"up_embed", "down_embed", "values"}


@pytest.mark.parametrize("kind", FFN_KINDS)
def test_each_kinds_declared_tables_are_its_table_parameters(kind):
    """A kind's `table_parameters` are exactly the parameters of the model named as any kind's tables (what
    `train.steps.table_labels` groups), each an [N, d] table in every sparse layer and nowhere else."""
    cls = FFN_REGISTRY[kind]
    assert ffn_registry.has_tables(kind) == bool(cls.table_parameters)
    model = dataclasses.replace(tiny_model(kind), num_layers=2, moe_every=2)  # layer_0 dense, layer_1 sparse
    tokens = jax.ShapeDtypeStruct((1, model.context_length), jnp.int32)
    shapes = jax.eval_shape(TransformerLM(model).init, jax.random.key(0), tokens)["params"]  # nothing allocated
    names = ffn_registry.table_parameter_names()
    found = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        keys = tuple(p.key for p in path)
        if keys[-1] in names:
            found.setdefault(keys[-1], []).append((keys[:-1], leaf.shape))
    assert set(found) == cls.table_parameters
    for name, places in found.items():
        rows = getattr(model.ffn, getattr(cls, "table_field", "num_experts"))  # PKM's N is num_values
        assert [where[0] for where, _ in places] == ["layer_1"], (name, places)
        assert all(shape == (rows, D) for _, shape in places), (name, places)


# A new kind: its config class and module, nothing else. The test registers it for its duration.
@dataclasses.dataclass(frozen=True)
class ReLUFFNConfig(BaselineConfig):
    """A two-matrix ReLU MLP.

    Attributes:
      hidden_size: d.
      width: the hidden width.
      dtype, param_dtype: compute and storage dtypes.
    """

    hidden_size: int
    width: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    sows_aux_loss: ClassVar[bool] = False

    def __post_init__(self):
        self._check_positive_ints("hidden_size", "width")
        super().__post_init__()

    @classmethod
    def module_class(cls) -> type[nn.Module]:
        return ReLUFFN

    def active_parameters(self) -> int:
        return 2 * self.hidden_size * self.width

    @classmethod
    def small_preset(cls, hidden_size: int, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> Self:
        return cls(hidden_size, 6 * hidden_size, dtype=dtype, param_dtype=param_dtype)


class ReLUFFN(nn.Module):
    config: ReLUFFNConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train
        cfg = self.config
        dense = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        return nn.Dense(cfg.hidden_size, **dense)(nn.relu(nn.Dense(cfg.width, **dense)(x)))  # [..., d]


def test_a_new_kind_is_its_module_plus_one_registry_entry(monkeypatch, key):
    monkeypatch.setitem(FFN_REGISTRY, "relu", ReLUFFNConfig)
    # The training job's overrides, the model, its parameter counts and serialisation, the presets, the help.
    tiny = get_preset("tiny")
    config = apply_overrides(tiny, {"ffn": "relu", "ffn.width": "40", "hidden_size": "16", "num_heads": "2"})
    model = config.model
    assert model.ffn == ReLUFFNConfig(16, 40) and model.ffn_kind == "relu"
    assert "ffn.width" in override_keys()
    assert LMConfig.from_dict(model.to_dict()) == model
    assert model.to_dict()["ffn"] == {"kind": "relu", "width": 40}
    counts = parameter_counts(model)
    assert counts["active"] == counts["total"]  # a dense kind: every parameter is active
    step = one_training_step(tiny_model(ReLUFFNConfig(D, 24)), key)
    assert np.isfinite(float(step["loss"])) and step["routings"] == ()
    assert presets.small_presets(D)["relu"] == ReLUFFNConfig(D, 6 * D)
    assert "--ffn=relu fields (defaults: small_preset(hidden_size=128)):\n  --ffn.width INT  (default 768)" in (
        help_text.render_fields()
    )
    with pytest.raises(ValueError, match=r"--ffn\.width is not a field of ffn='omnimoe' \(it is one of relu"):
        apply_overrides(tiny, {"ffn.width": "40"})
