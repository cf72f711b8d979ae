"""`python -m train --help` in a blink: the help text is rendered once from the configs (every field's type,
its value in the default `tiny` preset and the first sentence of its docstring, in groups) into
train/help.txt, which `--help` prints without importing jax (importing jax takes seconds).

After changing a config field, its docstring or a command-line option: `python -m train.help --write`
(tests/test_train_config.py fails while the file is stale).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import textwrap
import types
import typing
from collections.abc import Sequence
from typing import Any

HELP_FILE = pathlib.Path(__file__).with_name("help.txt")
WIDTH = 110  # fixed, so the stored text does not depend on the terminal that wrote it

# Field groups of the help, in order. A TrainConfig field missing here is listed under "loop", an LMConfig
# field under "model" (so a new field is never hidden), and every kind's `ffn.<field>` fields under "FFN".
GROUPS: dict[str, tuple[str, ...]] = {
    "model": (
        "vocab_size",
        "context_length",
        "num_layers",
        "num_heads",
        "hidden_size",
        "tie_embeddings",
        "rope_theta",
        "norm_eps",
        "attention",
        "dtype",
        "param_dtype",
    ),
    "FFN": ("ffn", "moe_every", "dense_intermediate_size", "hidden_act", "implementation"),
    "optimizer": (
        "learning_rate",
        "warmup_steps",
        "min_lr_ratio",
        "weight_decay",
        "table_learning_rate_multiplier",
        "table_lr_decay_to_one",
        "table_weight_decay",
        "beta1",
        "beta2",
        "adam_eps",
        "grad_clip",
        "aux_loss_coefficient",
        "batch_size",
        "grad_accum",
    ),
    "data": ("data", "tokenizer", "val_fraction", "token_dtype"),
    "loop": ("steps", "seed", "eval_every", "eval_batches", "log_every", "time_limit_minutes"),
    "checkpoints": ("checkpoint_every", "keep_checkpoints"),
}

# "name: text" or "name_a, name_b: text" at the start of a docstring's field entry.
_ENTRY = re.compile(r"^(\s+)([a-z_][a-z0-9_]*(?:, [a-z_][a-z0-9_]*)*): (.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """{field: first sentence of its entry} from the indented `name: text` entries of a class docstring
    (continuation lines, indented deeper, belong to the entry before them)."""
    docs: dict[str, list[str]] = {}
    current: list[str] | None = None
    indent = None
    for line in (cls.__doc__ or "").splitlines():
        match = _ENTRY.match(line)
        if match and (indent is None or len(match[1]) == indent):
            indent = len(match[1])
            current = [match[3].strip()]
            for name in match[2].split(", "):
                docs[name] = current
        elif current is not None and indent is not None and line.startswith(" " * (indent + 1)):
            current.append(line.strip())
        else:
            current = None
    return {name: first_sentence(" ".join(parts)) for name, parts in docs.items()}


def first_sentence(text: str) -> str:
    # A ". " (or ".)" closing the entry) ends the sentence; "e.g." and "i.e." do not.
    match = re.search(r"(?<!e\.g)(?<!i\.e)\.(\s|$)", text)
    return text if match is None else text[: match.start() + 1]


def type_name(annotation: Any) -> str:
    """INT, FLOAT, BOOL, STR or DTYPE; "|none" appended for an optional field."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    names = [
        {int: "INT", float: "FLOAT", bool: "BOOL", str: "STR"}.get(t, "DTYPE") for t in options if t is not type(None)
    ]
    return "|".join(names) + ("|none" if type(None) in options else "")


def _value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return getattr(value, "name", None) or str(value)  # a dtype by its name


def _entry(key: str, annotation: Any, default: Any, doc: str) -> str:
    head = f"  --{key} {type_name(annotation)}  (default {_value(default)})"
    body = textwrap.fill(doc, WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return head + "\n" + body


def render_fields() -> str:
    """Every `--key=value` override, grouped, with its type, the `tiny` preset's value and its doc."""
    from omnimoe_jax import ffn_registry
    from omnimoe_jax._model import LMConfig
    from train.config import TrainConfig, override_keys
    from train.presets import get_preset

    tiny = get_preset("tiny")
    train_hints, model_hints = typing.get_type_hints(TrainConfig), typing.get_type_hints(LMConfig)
    docs = {**field_docs(LMConfig), **field_docs(TrainConfig)}
    keys = [k for k in override_keys() if "." not in k]
    grouped = {group: [k for k in names if k in keys] for group, names in GROUPS.items()}
    placed = {k for names in grouped.values() for k in names}
    for key in keys:
        if key not in placed:
            grouped["model" if key in model_hints else "loop"].append(key)
    sections = []
    for group, names in grouped.items():
        lines = []
        for key in names:
            if key == "ffn":  # a kind's name on the command line (its fields follow, as ffn.<field>)
                lines.append(_entry(key, str, tiny.model.ffn_kind, docs.get(key, "")))
            elif key in model_hints:
                lines.append(_entry(key, model_hints[key], getattr(tiny.model, key), docs.get(key, "")))
            else:
                lines.append(_entry(key, train_hints[key], getattr(tiny, key), docs.get(key, "")))
        if group == "FFN":
            for kind, cls in ffn_registry.FFN_REGISTRY.items():
                # Defaults: the preset's own FFN, or what a new --ffn=KIND starts from at the preset's width.
                if kind == tiny.model.ffn_kind:
                    config, whose = tiny.model.ffn, "the tiny preset's"
                else:
                    config = tiny.model.replace(ffn=kind).ffn
                    whose = f"small_preset(hidden_size={tiny.model.hidden_size})"
                kind_docs = field_docs(cls)
                lines.append(f"  --ffn={kind} fields (defaults: {whose}):")
                for field, annotation in ffn_registry.own_field_types(kind).items():
                    if field not in ffn_registry.SET_BY_MESH:
                        doc = kind_docs.get(field, "")
                        lines.append(_entry(f"ffn.{field}", annotation, getattr(config, field), doc))
        sections.append(f"{group}:\n" + "\n".join(lines))
    header = (
        "config fields: --key=value or --key value (dashes or underscores; bools also as a bare --key; 'none' for "
        "an optional field). Defaults are the tiny preset's; another --preset changes them (--print-config shows "
        "a run's). A --steps given without --warmup_steps scales the preset's warm-up by the same factor."
    )
    return textwrap.fill(header, WIDTH) + "\n\n" + "\n\n".join(sections)


def render() -> str:
    """The whole `--help` text, as argparse prints it for train/cli.py's parser."""
    from train.cli import build_parser

    return build_parser().format_help()


def print_help() -> None:
    sys.stdout.write(HELP_FILE.read_text())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.help", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"render the help into {HELP_FILE.name}")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        HELP_FILE.write_text(text)
        print(f"wrote {HELP_FILE}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
