"""TrainConfig (model + data + optimisation + bookkeeping) and `--key=value` command-line overrides.

Override keys are paths: a TrainConfig field (`--steps=200`), an LMConfig field (`--hidden_size=256`), `--ffn=KIND`
for the sparse layers' FFN kind (a new kind starts from its `small_preset(hidden_size)`, the sizes of
`omnimoe_jax.baselines.presets.small_presets`), and `--ffn.<field>` for a field of that kind's config
(`--ffn=peer --ffn.num_heads=4`, `--ffn.num_experts=4096`; the kind is the model's after this command line's
`--ffn`). Dashes and underscores are interchangeable. Values are parsed by the field's type: int, float, bool
(true/false/1/0/yes/no), str, an int or a word for int-or-str fields (`--grad_accum=4`, `--grad_accum=auto`),
and "none" for optional fields. An unknown key is refused with the nearest valid ones and the list of all.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from omnimoe_jax import ffn_registry
from omnimoe_jax._config import check_known_fields
from omnimoe_jax._config_fields import is_int, is_number
from omnimoe_jax._model import LMConfig
from omnimoe_jax.ffn_registry import FFN_REGISTRY

# grad_accum's word for "the first count of micro-batches tried that fits" (`train.memory.fit_train_step`).
AUTO_GRAD_ACCUM = "auto"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; stored as config.json in the run directory.

    Attributes:
      model: the language model (LMConfig); its context_length is the training sequence length.
      data: corpus path (see `train.data`), None = the Python standard library's sources.
      tokenizer: a Hugging Face `tokenizers` file (tokenizer.json) to tokenise the text with instead of bytes
        (see `train.tokenizer`); None = byte tokens.
      val_fraction: share of documents (or of a single document's tokens) held out for validation.
      token_dtype: element type of headerless .bin token files ("uint16" or "uint32").
      seed: seeds the parameter initialisation and the batch sampler.
      batch_size: sequences per optimizer step.
      grad_accum: micro-batches per step (batch_size / grad_accum sequences each, gradients averaged), or "auto":
        the first count of micro-batches tried (powers of two, then the smallest micro-batch:
        `train.memory.grad_accum_candidates`) whose compiled step XLA estimates to fit the device's memory
        (`train.memory.fit_train_step`, before the first step). The run's config.json and start record hold
        the value chosen, so a resumed run keeps it; an int whose step cannot fit is refused before training.
      steps: optimizer steps of the whole run (the learning-rate schedule spans them).
      learning_rate: peak learning rate, reached after `warmup_steps` of linear warmup from 0, then cosine
        decay to `learning_rate * min_lr_ratio` at `steps`.
      warmup_steps: steps of linear learning-rate warm-up from 0, fewer than `steps`. On the command line a
        new run's `--steps` without `--warmup_steps` scales the preset's warm-up by the same factor
        (floor(warmup_steps * new_steps / steps)), so `--steps=20` alone is a short run with the same shape.
      min_lr_ratio: the cosine decay ends at learning_rate * min_lr_ratio.
      weight_decay: AdamW decoupled weight decay, on matrices and tables only (not on norm scales).
      table_learning_rate_multiplier: the expert tables (the FFN kind's `table_parameters`: OmniMoE's and
        FlashMoE's up/down embeddings, PEER's, PKM's values) train at this multiple of the learning-rate
        schedule (> 0). Memory-layer systems train their tables faster than the rest of the model. With all
        three table fields at their defaults the optimizer is one AdamW over all parameters; with any of
        them set it is partitioned into a table group and the rest (`train.steps.make_optimizer`), and the
        model's FFN kind must have tables (`omnimoe_jax.ffn_registry.table_kinds()`).
      table_lr_decay_to_one: the table multiplier decays linearly from table_learning_rate_multiplier at
        step 0 to 1 at the run's last update (step `steps - 1`), on top of the base schedule.
      table_weight_decay: the expert tables' AdamW weight decay (>= 0; None = weight_decay), scaled by their
        learning rate as every AdamW decay is.
      beta1, beta2, adam_eps: AdamW moments.
      grad_clip: global gradient norm clip (0 = off).
      aux_loss_coefficient: the objective is cross-entropy + aux_loss_coefficient * (sum of the "losses" the
        FFNs sow when training: GShard's and DeepSeekMoE's load-balancing losses, each already weighted by
        its config's aux_loss_weight, 0.01 and 0.001 by default). 1 keeps those published weights, 0 trains
        without balancing. OmniMoE, PEER, PKM and dense FFNs sow none.
      eval_every: evaluate every this many steps (and at the end).
      eval_batches: validation batches (of batch_size sequences) per evaluation, the same ones each time.
      log_every: print and record a training line every this many steps.
      checkpoint_every: save a checkpoint every this many steps (and at the end, and on SIGINT/SIGTERM).
      keep_checkpoints: how many of the latest checkpoints to keep.
      time_limit_minutes: stop (saving a checkpoint) once this much wall time has passed; 0 = no limit.
    """

    model: LMConfig
    data: str | None = None
    tokenizer: str | None = None
    val_fraction: float = 0.05
    token_dtype: str = "uint16"
    seed: int = 0
    batch_size: int = 32
    grad_accum: int | str = 1
    steps: int = 1000
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    table_learning_rate_multiplier: float = 1.0
    table_lr_decay_to_one: bool = False
    table_weight_decay: float | None = None
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    aux_loss_coefficient: float = 1.0
    eval_every: int = 200
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    time_limit_minutes: float = 0.0

    def __post_init__(self):
        if not isinstance(self.model, LMConfig):
            raise TypeError(f"model must be an LMConfig, got {type(self.model).__name__}")
        positive = ("batch_size", "steps", "eval_every", "eval_batches", "log_every")
        for field in (*positive, "checkpoint_every", "keep_checkpoints"):
            _check_int(field, getattr(self, field), minimum=1)
        # jax.random.key keeps 32 bits without x64: seed 2**32 would silently be seed 0.
        _check_int("seed", self.seed, minimum=0, maximum=2**32 - 1)
        _check_int("warmup_steps", self.warmup_steps, minimum=0)
        if self.grad_accum != AUTO_GRAD_ACCUM:
            if not is_int(self.grad_accum) or self.grad_accum < 1:
                raise ValueError(f"grad_accum={self.grad_accum!r} must be a positive int or {AUTO_GRAD_ACCUM!r}")
            if self.batch_size % self.grad_accum:
                raise ValueError(f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}")
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must be < steps={self.steps} (override both for a short run)"
            )
        _check_number("learning_rate", self.learning_rate, lambda v: v > 0, "> 0")
        _check_number("val_fraction", self.val_fraction, lambda v: 0 < v < 1, "in (0, 1)")
        _check_number("min_lr_ratio", self.min_lr_ratio, lambda v: 0 <= v <= 1, "in [0, 1]")
        _check_number("weight_decay", self.weight_decay, lambda v: v >= 0, ">= 0")
        _check_number("table_learning_rate_multiplier", self.table_learning_rate_multiplier, lambda v: v > 0, "> 0")
        if not isinstance(self.table_lr_decay_to_one, bool):
            raise ValueError(f"table_lr_decay_to_one={self.table_lr_decay_to_one!r} must be a bool")
        if self.table_weight_decay is not None:
            _check_number(
                "table_weight_decay", self.table_weight_decay, lambda v: v >= 0, ">= 0 (or None: weight_decay)"
            )
        self._check_table_fields_have_tables()
        _check_number("beta1", self.beta1, lambda v: 0 <= v < 1, "in [0, 1)")
        _check_number("beta2", self.beta2, lambda v: 0 <= v < 1, "in [0, 1)")
        _check_number("adam_eps", self.adam_eps, lambda v: v > 0, "> 0")
        _check_number("grad_clip", self.grad_clip, lambda v: v >= 0, ">= 0 (0 = no clipping)")
        _check_number("aux_loss_coefficient", self.aux_loss_coefficient, lambda v: v >= 0, ">= 0")
        _check_number("time_limit_minutes", self.time_limit_minutes, lambda v: v >= 0, ">= 0")
        if self.data is not None and (not isinstance(self.data, str) or not self.data):
            raise ValueError(f"data={self.data!r} must be a non-empty path string or None")
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer):
            raise ValueError(f"tokenizer={self.tokenizer!r} must be a non-empty path string or None")
        if self.token_dtype not in ("uint16", "uint32"):
            raise ValueError(f"token_dtype={self.token_dtype!r} must be 'uint16' or 'uint32'")

    def _check_table_fields_have_tables(self) -> None:
        """ValueError naming the table fields set when the model has no expert tables for them to set. The
        model's tables are its FFN kind's: that kind is its sparse layers' (`LMConfig.moe_every`; at least one
        layer is sparse), and the other layers are dense SwiGLUs, which have none."""
        kind = self.model.ffn_kind
        if not self.has_table_group or ffn_registry.has_tables(kind):
            return
        given = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._table_fields_set())
        raise ValueError(
            f"{given}: ffn={kind!r} has no expert tables to optimise (the kinds with tables: "
            f"{', '.join(ffn_registry.table_kinds())}); leave {', '.join(TABLE_FIELDS)} at their defaults"
        )

    def _table_fields_set(self) -> list[str]:
        """The TABLE_FIELDS off their defaults, in that order."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return [name for name in TABLE_FIELDS if getattr(self, name) != defaults[name]]

    @property
    def has_table_group(self) -> bool:
        """Whether the optimizer trains the expert tables as a group of their own (a table field is set)."""
        return bool(self._table_fields_set())

    @property
    def micro_batch_size(self) -> int:
        """Sequences per micro-batch; ValueError while grad_accum is "auto" (`train.memory` resolves it)."""
        if self.grad_accum == AUTO_GRAD_ACCUM:
            raise ValueError(
                'grad_accum="auto" has no micro-batch size until train.memory.fit_train_step resolves it to an int'
            )
        return self.batch_size // self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.model.context_length

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["model"] = self.model.to_dict()
        return fields

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> TrainConfig:
        check_known_fields(cls, fields)
        return cls(**{**fields, "model": LMConfig.from_dict(fields["model"])})


# The fields that set the expert tables' own optimisation (any of them off its default: `has_table_group`).
TABLE_FIELDS = ("table_learning_rate_multiplier", "table_lr_decay_to_one", "table_weight_decay")


def _check_int(field: str, value: Any, *, minimum: int, maximum: int | None = None) -> None:
    if not is_int(value) or value < minimum:
        raise ValueError(f"{field}={value!r} must be an int >= {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{field}={value!r} must be an int in [{minimum}, {maximum}]")


def _check_number(field: str, value: Any, in_range: Callable[[float], bool], expected: str) -> None:
    """ValueError unless `value` is a finite real number `in_range` (inf and nan are refused whatever the
    range: an infinite learning rate, decay or epsilon trains nothing but NaNs)."""
    if not is_number(value) or not math.isfinite(value) or not in_range(value):
        raise ValueError(f"{field}={value!r} must be a finite number {expected}")


def override_keys() -> list[str]:
    """Every key `apply_overrides` accepts: TrainConfig fields (but `model`), LMConfig fields and `ffn.<field>`
    for every own field of any FFN kind (but expert_axis, which `--mesh` sets); a field must be one of the
    model's kind when applied."""
    train = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "model"]
    model = [f.name for f in dataclasses.fields(LMConfig)]
    return sorted(train + model) + [f"ffn.{field}" for field in _ffn_fields()]


def _ffn_fields() -> list[str]:
    """The own fields of every FFN kind (in registry order, each once), as `ffn.<field>` sets them."""
    fields = {f: None for kind in FFN_REGISTRY for f in ffn_registry.own_field_types(kind)}
    return [f for f in fields if f not in ffn_registry.SET_BY_MESH]


def parse_overrides(args: Sequence[str]) -> dict[str, str | None]:
    """["--steps=10", "--data", "dir", "--norm_topk_prob"] -> {"steps": "10", "data": "dir", "norm_topk_prob":
    None} (values still strings; None: the flag stood alone, which `apply_overrides` reads as true for a
    bool field and refuses for any other). A word after a flag is its value unless it starts with "--"."""
    pairs: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ValueError(f"expected --key=value or --key value, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = arg[2:], args[i + 1]
            i += 2
        else:
            key, value = arg[2:], None
            i += 1
        pairs[key.replace("-", "_")] = value
    return pairs


def _unknown_keys_message(unknown: list[str], valid: list[str]) -> str:
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=3)
        head, _, field = key.partition(".")
        if key in _COMMAND_LINE_FLAGS:
            hints.append(f"--{key} is written --{key.replace('_', '-')}")
        elif f"ffn.{key}" in valid:  # an FFN field given as the model's (the flat keys of earlier versions)
            hints.append(f"--{key}: did you mean --ffn.{key}?")
        elif head in FFN_REGISTRY and f"ffn.{field}" in valid:  # the <kind>.<field> keys of earlier versions
            hints.append(f"--{key}: did you mean --ffn={head} --ffn.{field}?")
        elif head == "ffn" and field in ffn_registry.MODEL_OWNED:
            hints.append(f"--{key}: every FFN of the model has the model's {field}: did you mean --{field}?")
        elif close:
            hints.append(f"--{key}: did you mean {' or '.join('--' + c for c in close)}?")
    hint = "".join(f"; {h}" for h in hints)
    return f"unknown config keys {unknown}{hint}; valid keys: {', '.join(valid)}"


# Options of `python -m train` itself (train/cli.py), which take dashes: --run_dir is a typo of --run-dir.
_COMMAND_LINE_FLAGS = ("run_dir", "num_processes", "process_id")


def apply_overrides(config: TrainConfig, overrides: dict[str, str], *, scale_warmup: bool = False) -> TrainConfig:
    """A copy of `config` with the overrides applied (each value parsed by its field's type).

    scale_warmup: when `steps` is overridden and `warmup_steps` is not, scale `warmup_steps` by the same
    factor (rounded down), keeping the warm-up's share of the run. For a new run from a preset, not a resumed
    one (whose warm-up is part of what already happened).
    """
    valid = override_keys()
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(_unknown_keys_message(unknown, valid))
    model_fields = {f.name for f in dataclasses.fields(LMConfig)}
    train_changes = {}
    model_changes = {}
    ffn_texts = {}
    for key, text in overrides.items():
        if key.startswith("ffn."):  # parsed below, once the kind is known
            ffn_texts[key.removeprefix("ffn.")] = text
            continue
        if key == "ffn":
            if text not in FFN_REGISTRY:
                raise ValueError(f"--ffn={text!r} must be one of {', '.join(FFN_REGISTRY)}")
            # The same kind keeps its config; a new kind starts from its small_preset at the model's width.
            if text != config.model.ffn_kind:
                model_changes["ffn"] = text
            continue
        owner = LMConfig if key in model_fields else TrainConfig
        value = _parse_value(key, text, typing.get_type_hints(owner)[key])
        (model_changes if owner is LMConfig else train_changes)[key] = value
    if scale_warmup and "steps" in train_changes and "warmup_steps" not in train_changes:
        train_changes["warmup_steps"] = config.warmup_steps * train_changes["steps"] // config.steps
    model = config.model.replace(**model_changes) if model_changes else config.model
    if ffn_texts:
        model = model.replace(ffn=_ffn_with(model, ffn_texts))
    return dataclasses.replace(config, model=model, **train_changes)


def _ffn_with(model: LMConfig, texts: dict[str, str | None]) -> Any:
    """The model's FFN config with the `--ffn.<field>` overrides (field: text) parsed and applied."""
    kind = model.ffn_kind
    types_ = ffn_registry.own_field_types(kind)
    changes = {}
    for field, text in texts.items():
        if field not in types_:
            owners = [k for k in FFN_REGISTRY if field in ffn_registry.own_field_types(k)]
            close = difflib.get_close_matches(field, types_, n=3)
            hint = f"did you mean {' or '.join('--ffn.' + c for c in close)}? " if close else ""
            settable = ", ".join(f"--ffn.{f}" for f in types_ if f not in ffn_registry.SET_BY_MESH)
            raise ValueError(
                f"--ffn.{field} is not a field of ffn={kind!r} ({hint}it is one of {', '.join(owners)}: add "
                f"--ffn={owners[0]}); ffn={kind!r} has {settable}"
            )
        changes[field] = _parse_value(f"ffn.{field}", text, types_[field])
    try:
        return model.ffn.replace(**changes)
    except ValueError as err:  # say whose field it is: "num_heads" alone reads as the attention's
        raise ValueError(f"ffn={kind!r}: {err}") from None


def _parse_value(key: str, text: str | None, annotation: Any) -> Any:
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if text is None:  # a flag without a value
        if bool in options:
            return True
        raise ValueError(f"--{key} needs a value (--{key}=value or --{key} value)")
    if type(None) in options and text.lower() in ("none", "null"):
        return None
    kinds = [t for t in options if t is not type(None)]
    if set(kinds) == {int, str}:  # a count or a word (grad_accum: 4 or "auto"); the config checks the word
        try:
            return int(text)
        except ValueError:
            return text
    kind = kinds[0] if len(kinds) == 1 else str
    if kind is Any:  # dtypes: given by name, validated by the config
        return text
    if kind is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"--{key}={text!r}: expected a bool (true/false/1/0/yes/no)")
    try:
        return kind(text)
    except ValueError as err:
        raise ValueError(f"--{key}={text!r}: expected {kind.__name__}") from err
