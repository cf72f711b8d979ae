"""Seed (PyTorch) checkpoint interop: the seed `OmniMoE` and `FlashMoE` modules' state dicts <-> Flax variables.

The seed stores `nn.Linear` weights as [out, in] and `nn.Embedding` tables as [N, d]; Flax `Dense` kernels
are [in, out]. Every key maps to exactly one variable:

| torch key | torch shape | Flax variable | Flax shape |
| --- | --- | --- | --- |
| gate_proj.weight, up_proj.weight | [I, d] | params/shared/{gate,up}_proj/kernel | [d, I] |
| down_proj.weight | [d, I] | params/shared/down_proj/kernel | [I, d] |
| router_gate_x.weight, router_gate_y.weight | [n, d] | params/router/router_gate_{x,y}/kernel | [d, n] |
| up_embed.weight, down_embed.weight | [N, d] | params/experts/{up,down}_embed | [N, d] |
| router_norm_{x,y}.running_mean / running_var | [n] | batch_stats/router/router_norm_{x,y}/... | [n] |
| router_norm_{x,y}.num_batches_tracked | [] int64 | batch_stats/router/router_norm_{x,y}/... | [] int32 |

A `FlashMoEConfig` selects the FlashMoE seed's keys (flash-algo/flash-moe), with the same shared MLP rows:

| torch key | torch shape | Flax variable | Flax shape |
| --- | --- | --- | --- |
| router_gate.weight | [2n, d] | params/router_gate/kernel | [d, 2n] |
| down_embed.weight, up_embed.weight | [N, d] | params/experts/{down,up}_embed | [N, d] |
| router_norm.running_mean / running_var | [d] | batch_stats/router_norm/... | [d] |
| router_norm.num_batches_tracked | [] int64 | batch_stats/router_norm/num_batches_tracked | [] int32 |


No torch import: values are numpy arrays (or array-likes), read from a dict or a `.safetensors` file through
the `safetensors` library's numpy API. The library validates the file's layout (header, offsets, overlaps);
on top of it `load_safetensors` refuses duplicate keys, and `from_torch_state_dict` refuses values the layer
cannot use (non-finite tables, negative `running_var`, a `num_batches_tracked` outside the layer's int32
counter), each naming the tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from omnimoe_jax._config import FlashMoEConfig, OmniMoEConfig

__all__ = ["from_torch_state_dict", "load_safetensors", "save_safetensors", "to_torch_state_dict"]


def _refuse_duplicate_keys(where: str) -> None:
    """The library keeps one of two entries with the same name (JSON objects may repeat keys), so which
    tensor a duplicated name loads is the parser's choice: refuse such a file instead."""
    with open(where, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            return  # the library reports the truncated file
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            return
        text = f.read(header_len)
    repeated: list[str] = []

    def note_repeats(items: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in items]
        repeated.extend(name for i, name in enumerate(names) if name in names[:i])
        return dict(items)

    try:
        json.loads(text, object_pairs_hook=note_repeats)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return  # the library names what is wrong with the header
    if repeated:
        raise ValueError(f"{where!r}: its header names tensor(s) {sorted(set(repeated))} more than once")


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor in a `.safetensors` file as a numpy array (bf16 as `ml_dtypes.bfloat16`).

    Raises ValueError naming the path for a file the `safetensors` library refuses (bad header, offsets
    that overlap, leave holes or run past the end) or whose header repeats a tensor name.
    """
    where = os.fspath(path)
    _refuse_duplicate_keys(where)
    try:
        return safetensors.numpy.load_file(where)
    except safetensors.SafetensorError as error:
        raise ValueError(f"{where!r} is not a valid safetensors file: {error}") from None


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any]) -> None:
    """Write numpy arrays (or array-likes) to a `.safetensors` file that `safetensors.torch.load_file` reads."""
    # The library reads each array's buffer as dense C order; copy(order="C") keeps 0-d arrays 0-d.
    arrays = {name: np.asarray(value).copy(order="C") for name, value in tensors.items()}
    try:
        safetensors.numpy.save_file(arrays, os.fspath(path))
    except (safetensors.SafetensorError, KeyError, ValueError, TypeError) as error:
        dtypes = {name: a.dtype.name for name, a in arrays.items()}
        raise ValueError(f"cannot write {os.fspath(path)!r} (dtypes {dtypes}): {error}") from None


LayerConfig = OmniMoEConfig | FlashMoEConfig


def _layout(config: LayerConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...], bool]]:
    """(torch key, Flax variable path, torch shape, transpose) for every entry of the seed's state dict."""
    if not isinstance(config, LayerConfig):
        raise TypeError(f"config must be an OmniMoEConfig or a FlashMoEConfig, got {type(config).__name__}")
    d, inter, n, experts = config.hidden_size, config.intermediate_size, config.num_expert_sqrt, config.num_experts
    rows = [
        ("gate_proj.weight", ("params", "shared", "gate_proj", "kernel"), (inter, d), True),
        ("up_proj.weight", ("params", "shared", "up_proj", "kernel"), (inter, d), True),
        ("down_proj.weight", ("params", "shared", "down_proj", "kernel"), (d, inter), True),
    ]
    if isinstance(config, FlashMoEConfig):
        # The seed module's state_dict order: shared MLP, router_gate, router_norm, down_embed, up_embed.
        norm = ("batch_stats", "router_norm")
        rows += [
            ("router_gate.weight", ("params", "router_gate", "kernel"), (2 * n, d), True),
            ("router_norm.running_mean", (*norm, "running_mean"), (d,), False),
            ("router_norm.running_var", (*norm, "running_var"), (d,), False),
            ("router_norm.num_batches_tracked", (*norm, "num_batches_tracked"), (), False),
            ("down_embed.weight", ("params", "experts", "down_embed"), (experts, d), False),
            ("up_embed.weight", ("params", "experts", "up_embed"), (experts, d), False),
        ]
        return rows
    rows += [
        ("router_gate_x.weight", ("params", "router", "router_gate_x", "kernel"), (n, d), True),
        ("router_gate_y.weight", ("params", "router", "router_gate_y", "kernel"), (n, d), True),
        ("up_embed.weight", ("params", "experts", "up_embed"), (experts, d), False),
        ("down_embed.weight", ("params", "experts", "down_embed"), (experts, d), False),
    ]
    if config.router_norm == "batchnorm":
        for axis in ("x", "y"):
            norm = ("batch_stats", "router", f"router_norm_{axis}")
            rows += [
                (f"router_norm_{axis}.running_mean", (*norm, "running_mean"), (n,), False),
                (f"router_norm_{axis}.running_var", (*norm, "running_var"), (n,), False),
                (f"router_norm_{axis}.num_batches_tracked", (*norm, "num_batches_tracked"), (), False),
            ]
    return rows


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


_COUNTER_MAX = np.iinfo(np.int32).max  # the layer's num_batches_tracked is int32 (torch's is int64)


def _check_value(name: str, value: np.ndarray) -> None:
    """Refuse what the format stores happily but the layer cannot use, naming the tensor."""
    if name.endswith("num_batches_tracked"):
        if not np.issubdtype(value.dtype, np.integer):
            raise ValueError(f"{name} has dtype {value.dtype}, expected an integer count (int64 in torch)")
        count = int(value)  # a Python int: compares exactly whatever the stored width (uint64 included)
        if not 0 <= count <= _COUNTER_MAX:
            raise ValueError(f"{name} = {count} is outside the layer's int32 counter range [0, {_COUNTER_MAX}]")
        return
    if not (np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16"):
        raise ValueError(f"{name} has dtype {value.dtype}, expected a floating-point tensor")
    bad = ~np.isfinite(value)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} has {int(bad.sum())} NaN/inf values (the first at index {first}); expected finite")
    if name.endswith("running_var") and (value < 0).any():
        raise ValueError(
            f"{name} has {int((value < 0).sum())} negative entries (min {value.min()}); a variance is >= 0"
        )


def from_torch_state_dict(
    state_dict: Mapping[str, Any] | str | os.PathLike,
    config: LayerConfig,
    *,
    prefix: str = "",
) -> dict[str, Any]:
    """Flax variables {"params", "batch_stats"} for `OmniMoE(config)` or `FlashMoE(config)` (whichever
    `config` is for) from a seed state dict.

    Args:
      state_dict: mapping of torch keys to arrays, or the path of a `.safetensors` file.
      config: the layer's config; shapes are checked against it.
      prefix: prepended to every key, for one layer inside a larger model's checkpoint
        (e.g. "model.layers.3.mlp."). Keys outside the prefix are ignored; keys inside it must all be known.

    Raises ValueError naming the key for a missing or unexpected key, a wrong shape or dtype, NaN/inf values,
    a negative `running_var`, or a `num_batches_tracked` outside [0, 2**31 - 1] (the layer's int32 counter).
    `num_batches_tracked` may be absent (older torch); it then starts at 0.
    """
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = load_safetensors(state_dict)
    ours = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    layout = _layout(config)
    known = {key for key, *_ in layout}
    unexpected = sorted(set(ours) - known)
    if unexpected:
        raise ValueError(f"unexpected keys for {config}: {[prefix + k for k in unexpected]}")
    missing = sorted(key for key in known - set(ours) if not _is_counter(key))
    if missing:
        raise ValueError(f"missing keys: {[prefix + k for k in missing]}")
    variables: dict[str, Any] = {}
    for key, path, shape, transpose in layout:
        if key not in ours:  # an absent counter
            value = np.zeros((), np.int32)
        else:
            value = np.asarray(ours[key])
            if value.shape != shape:
                raise ValueError(f"{prefix + key} has shape {value.shape}, expected {shape} for {config}")
            _check_value(prefix + key, value)
            if transpose:
                value = value.T
        if _is_counter(key):
            value = jnp.asarray(value.astype(np.int32))  # in range: _check_value refused what would wrap
        elif path[0] == "batch_stats":
            value = jnp.asarray(value, jnp.float32)
        else:
            value = jnp.asarray(value, config.param_dtype)
        node = variables
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return variables


def to_torch_state_dict(
    variables: Mapping[str, Any], config: LayerConfig, *, prefix: str = ""
) -> dict[str, np.ndarray]:
    """The seed's state dict (numpy arrays in torch layout) for `OmniMoE(config)` or `FlashMoE(config)`
    variables.

    Parameters keep their dtype (bf16 as `ml_dtypes.bfloat16`); `num_batches_tracked` is int64 as in torch.
    Write it with `save_safetensors(path, state_dict)`.
    """
    state = {}
    for key, path, shape, transpose in _layout(config):
        node: Any = variables
        for name in path:
            if not isinstance(node, Mapping) or name not in node:
                raise ValueError(f"variables lack {'/'.join(path)} (needed for {key})")
            node = node[name]
        value = np.asarray(node)
        if transpose:
            value = value.T
        if _is_counter(key):
            value = value.astype(np.int64)
        if value.shape != shape:
            raise ValueError(f"{'/'.join(path)} gives {key} shape {value.shape}, expected {shape} for {config}")
        state[prefix + key] = value.copy(order="C")  # np.ascontiguousarray would make 0-d arrays 1-d
    return state
