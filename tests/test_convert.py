"""Seed checkpoint interop: torch-layout dict <-> Flax variables, and .safetensors files."""

import json
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from oracle import random_state_dict

from omnimoe_jax import OmniMoE, OmniMoEConfig
from omnimoe_jax.convert import from_torch_state_dict, load_safetensors, save_safetensors, to_torch_state_dict

CONFIG = OmniMoEConfig(hidden_size=16, intermediate_size=24, num_experts=25, num_experts_per_token=3)


def test_round_trip_is_exact(seed):
    state = random_state_dict(np.random.default_rng(seed), CONFIG)
    back = to_torch_state_dict(from_torch_state_dict(state, CONFIG), CONFIG)
    assert back.keys() == state.keys()
    for k in state:
        assert back[k].dtype == state[k].dtype and back[k].shape == state[k].shape, k
        np.testing.assert_array_equal(back[k], state[k], err_msg=k)


def test_variables_match_what_the_layer_creates(seed):
    variables = from_torch_state_dict(random_state_dict(np.random.default_rng(seed), CONFIG), CONFIG)
    created = OmniMoE(CONFIG).init(jax.random.key(0), jnp.ones((4, 16)))
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype).name), tree)
    assert shapes(variables) == shapes(created)


def test_layout_is_torch_linear_out_by_in(seed):
    state = random_state_dict(np.random.default_rng(seed), CONFIG)
    variables = from_torch_state_dict(state, CONFIG)
    np.testing.assert_array_equal(variables["params"]["shared"]["gate_proj"]["kernel"], state["gate_proj.weight"].T)
    np.testing.assert_array_equal(
        variables["params"]["router"]["router_gate_y"]["kernel"], state["router_gate_y.weight"].T
    )
    np.testing.assert_array_equal(variables["params"]["experts"]["down_embed"], state["down_embed.weight"])


def test_prefix_selects_one_layer_of_a_model_checkpoint(seed):
    rng = np.random.default_rng(seed)
    model_state = {}
    for layer in range(2):
        for k, v in random_state_dict(rng, CONFIG).items():
            model_state[f"model.layers.{layer}.mlp.{k}"] = v
    model_state["model.embed_tokens.weight"] = rng.standard_normal((10, 16)).astype(np.float32)
    variables = from_torch_state_dict(model_state, CONFIG, prefix="model.layers.1.mlp.")
    back = to_torch_state_dict(variables, CONFIG, prefix="model.layers.1.mlp.")
    for k, v in back.items():
        np.testing.assert_array_equal(v, model_state[k])


def test_safetensors_written_by_the_safetensors_package_loads(tmp_path, seed):
    state = random_state_dict(np.random.default_rng(seed), CONFIG)
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(state, str(path))
    from_file = from_torch_state_dict(path, CONFIG)
    from_dict = from_torch_state_dict(state, CONFIG)
    jax.tree.map(np.testing.assert_array_equal, from_file, from_dict)


def test_our_safetensors_writer_is_read_by_the_safetensors_package(tmp_path, seed):
    state = random_state_dict(np.random.default_rng(seed), CONFIG)
    path = tmp_path / "out.safetensors"
    save_safetensors(path, state)
    loaded = safetensors.numpy.load_file(str(path))
    assert loaded.keys() == state.keys()
    for k in state:
        assert loaded[k].dtype == state[k].dtype and loaded[k].shape == state[k].shape, k
        np.testing.assert_array_equal(loaded[k], state[k])


def bits(array):
    return np.atleast_1d(array).view(np.uint8)


def test_bf16_tensors_round_trip_through_safetensors(tmp_path, seed):
    rng = np.random.default_rng(seed)
    state = random_state_dict(rng, CONFIG, dtype=ml_dtypes.bfloat16)
    path = tmp_path / "bf16.safetensors"
    save_safetensors(path, state)
    loaded = load_safetensors(path)
    for k in state:
        assert loaded[k].dtype == state[k].dtype and loaded[k].shape == state[k].shape, k
        np.testing.assert_array_equal(bits(loaded[k]), bits(state[k]))
    config = CONFIG.replace(param_dtype="bfloat16")
    back = to_torch_state_dict(from_torch_state_dict(path, config), config)
    for k in state:
        np.testing.assert_array_equal(bits(back[k]), bits(state[k]), err_msg=k)


def test_missing_counter_starts_at_zero(seed):
    state = random_state_dict(np.random.default_rng(seed), CONFIG)
    del state["router_norm_x.num_batches_tracked"]
    variables = from_torch_state_dict(state, CONFIG)
    assert int(variables["batch_stats"]["router"]["router_norm_x"]["num_batches_tracked"]) == 0


def test_router_norm_none_has_no_norm_entries(seed):
    config = CONFIG.replace(router_norm="none")
    state = random_state_dict(np.random.default_rng(seed), config)
    assert not any("router_norm" in k for k in state)
    variables = from_torch_state_dict(state, config)
    assert "batch_stats" not in variables
    assert to_torch_state_dict(variables, config).keys() == state.keys()


def test_missing_key_is_named(seed):
    state = random_state_dict(np.random.default_rng(seed), CONFIG)
    del state["up_embed.weight"]
    with pytest.raises(ValueError, match=r"missing keys: \['up_embed.weight'\]"):
        from_torch_state_dict(state, CONFIG)


def test_unexpected_key_is_named(seed):
    state = random_state_dict(np.random.default_rng(seed), CONFIG)
    state["experts.bias"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"unexpected keys .*\['experts.bias'\]"):
        from_torch_state_dict(state, CONFIG)


def test_wrong_shape_is_named(seed):
    state = random_state_dict(np.random.default_rng(seed), CONFIG)
    # A seed layer built for 24 experts floors sqrt(24) to 4 and stores 16 rows in its router axes.
    state["router_gate_x.weight"] = np.zeros((4, 16), np.float32)
    with pytest.raises(ValueError, match=r"router_gate_x.weight has shape \(4, 16\), expected \(5, 16\)"):
        from_torch_state_dict(state, CONFIG)


def test_truncated_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match=r"bad.safetensors' is not a valid safetensors file: .*header too small"):
        load_safetensors(path)


def _safetensors_bytes(header, data: bytes) -> bytes:
    text = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _f32_pairs(*entries: tuple[str, int, int]) -> str:
    """A header of [2]-shaped F32 tensors, (name, begin, end) each, written as text so a name may repeat."""
    fields = (
        f'"{name}": {{"dtype": "F32", "shape": [2], "data_offsets": [{begin}, {end}]}}' for name, begin, end in entries
    )
    return "{" + ", ".join(fields) + "}"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "invalid UTF-8 in header"),
        (_safetensors_bytes([1, 2], b""), "invalid JSON in header"),
        (_safetensors_bytes({"w": {"dtype": "F32"}}, b""), "missing field `shape`"),
        (
            _safetensors_bytes({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}, bytes(16)),
            "invalid shape, data type, or offset for tensor",
        ),
        (
            _safetensors_bytes({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, bytes(16)),
            "incomplete metadata, file not fully covered",
        ),
        # Two tensors sharing bytes: b's [4, 12) overlaps a's [0, 8).
        (
            _safetensors_bytes(_f32_pairs(("a", 0, 8), ("b", 4, 12)), bytes(12)),
            "offset for tensor `b`",
        ),
        # A hole: nothing claims bytes [8, 12).
        (
            _safetensors_bytes(_f32_pairs(("a", 0, 8), ("b", 12, 20)), bytes(20)),
            "offset for tensor `b`",
        ),
        # One name twice, at different offsets or at the same: which one loads would be the parser's choice.
        (
            _safetensors_bytes(_f32_pairs(("a", 0, 8), ("a", 8, 16)), bytes(16)),
            r"names tensor\(s\) \['a'\] more than once",
        ),
        (
            _safetensors_bytes(_f32_pairs(("a", 0, 8), ("a", 0, 8)), bytes(8)),
            r"names tensor\(s\) \['a'\] more than once",
        ),
    ],
    ids=["not-utf8", "not-object", "no-shape", "short", "past-end", "overlap", "hole", "duplicate", "duplicate-same"],
)
def test_malformed_safetensors_files_are_named(tmp_path, content, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"bad.safetensors'.*" + match):
        load_safetensors(path)


def test_a_well_formed_hand_built_file_loads(tmp_path):
    """The hand-built files above differ from this one only in the defect each carries."""
    path = tmp_path / "good.safetensors"
    data = np.array([1, 2, 3, 4], np.float32).tobytes()
    path.write_bytes(_safetensors_bytes(_f32_pairs(("a", 0, 8), ("b", 8, 16)), data))
    loaded = load_safetensors(path)
    np.testing.assert_array_equal(loaded["a"], [1, 2])
    np.testing.assert_array_equal(loaded["b"], [3, 4])


def _spoil(state, key, value):
    state = dict(state)
    state[key] = value
    return state


@pytest.mark.parametrize(
    ("key", "spoil", "match"),
    [
        (
            "up_embed.weight",
            lambda a: _set(a, (3, 5), np.nan),
            r"up_embed.weight has 1 NaN/inf values \(the first at index \(3, 5\)\)",
        ),
        ("gate_proj.weight", lambda a: _set(a, (0, 0), -np.inf), r"gate_proj.weight has 1 NaN/inf values"),
        ("router_norm_x.running_mean", lambda a: _set(a, (2,), np.inf), r"router_norm_x.running_mean has 1 NaN/inf"),
        (
            "router_norm_y.running_var",
            lambda a: _set(a, (1,), -0.5),
            r"router_norm_y.running_var has 1 negative entries",
        ),
        (
            "router_norm_x.num_batches_tracked",
            lambda a: np.array(-1, np.int64),
            r"= -1 is outside .* \[0, 2147483647\]",
        ),
        ("router_norm_x.num_batches_tracked", lambda a: np.array(2**31, np.int64), r"= 2147483648 is outside"),
        (
            "router_norm_x.num_batches_tracked",
            lambda a: np.array(2**64 - 1, np.uint64),
            r"= 18446744073709551615 is out",
        ),
        ("router_norm_x.num_batches_tracked", lambda a: np.array(3.0), r"has dtype float64, expected an integer count"),
        (
            "up_embed.weight",
            lambda a: a.astype(np.int32),
            r"up_embed.weight has dtype int32, expected a floating-point",
        ),
    ],
)
def test_unusable_values_are_refused_naming_the_tensor(tmp_path, seed, key, spoil, match):
    """From a dict and from a file: the format stores these happily, the layer cannot use them."""
    state = random_state_dict(np.random.default_rng(seed), CONFIG)
    bad = _spoil(state, key, spoil(state[key]))
    with pytest.raises(ValueError, match=match):
        from_torch_state_dict(bad, CONFIG)
    path = tmp_path / "bad.safetensors"
    save_safetensors(path, bad)
    with pytest.raises(ValueError, match=match):
        from_torch_state_dict(path, CONFIG)


def _set(array, index, value):
    array = array.copy()
    array[index] = value
    return array


def test_largest_counter_loads_exactly(seed):
    state = random_state_dict(np.random.default_rng(seed), CONFIG)
    state["router_norm_y.num_batches_tracked"] = np.array(2**31 - 1, np.int64)
    variables = from_torch_state_dict(state, CONFIG)
    assert int(variables["batch_stats"]["router"]["router_norm_y"]["num_batches_tracked"]) == 2**31 - 1
