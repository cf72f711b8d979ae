"""FlashMoE against the seed's own PyTorch module (flash-algo/flash-moe, `FlashMoE_Pytorch`, its pure-torch path).

Not part of the default suite (marker `seed`): it needs torch, transformers, triton and cuda-tile, and a checkout
of the seed, none of which CI installs. Run it with

    OMNIMOE_SEED_FLASH_MOE=/path/to/flash-moe-checkout python -m pytest -m seed tests/test_flashmoe_seed_parity.py

The seed's module is built with random weights and random BatchNorm running statistics, its `state_dict()` is
converted with `omnimoe_jax.convert.from_torch_state_dict`, and both run on the same tokens in eval and in train
mode. Compared: y, router_logits, the running statistics after a train step, the gradients with respect to the
input and every parameter (torch autograd against jax.grad, a random cotangent on both outputs, the parameters
paired through the converter's own key mapping), and the round trip back into the seed module.
"""

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe_jax import FlashMoE, FlashMoEConfig
from omnimoe_jax.convert import from_torch_state_dict, to_torch_state_dict
from omnimoe_jax.testing import assert_close

pytestmark = pytest.mark.seed

SEED_ENV = "OMNIMOE_SEED_FLASH_MOE"
SEED_DIR = os.environ.get(SEED_ENV)
if not SEED_DIR:
    pytest.skip(
        f"set {SEED_ENV} to a checkout of flash-algo/flash-moe and run with -m seed "
        "(needs torch, transformers, triton and cuda-tile installed)",
        allow_module_level=True,
    )
torch = pytest.importorskip("torch")
pytest.importorskip("transformers", reason="the seed module takes its activations from transformers' ACT2FN")
# The seed's module file imports its Triton kernels at the top (for `FlashMoE`); `FlashMoE_Pytorch` never
# calls them, but the import needs the triton package (importable without a GPU).
pytest.importorskip("triton", reason="the seed's flash_moe.py imports its Triton kernels at module level")
# Seed bug: flash_moe/ops/utils.py (imported by those kernels) builds a torch -> cuTile dtype table from
# `cuda.tile` unconditionally, although it guards that import and cuda-tile is not among the seed's
# dependencies: the package needs cuda-tile installed to import at all (it imports without a GPU).
pytest.importorskip("cuda.tile", reason="the seed's flash_moe/ops/utils.py reads cuda.tile at import (pip cuda-tile)")
if not os.path.isfile(os.path.join(SEED_DIR, "flash_moe", "modules", "flash_moe.py")):
    raise FileNotFoundError(f"{SEED_ENV}={SEED_DIR!r} has no flash_moe/modules/flash_moe.py; expected a seed checkout")
sys.path.insert(0, SEED_DIR)
from flash_moe.modules import flash_moe as seed_moe  # noqa: E402

TORCH_DTYPE = {"float64": torch.float64, "float32": torch.float32}


def case(batch, seq, d, inter, act, experts, top_k, norm_topk_prob=False):
    """(B, S, the FlashMoEConfig fields, which are the seed config's)."""
    fields = dict(hidden_size=d, intermediate_size=inter, hidden_act=act, num_experts=experts)
    return batch, seq, {**fields, "num_experts_per_tok": top_k, "norm_topk_prob": norm_topk_prob}


CASES = [  # n = sqrt(num_experts)
    case(2, 5, 16, 24, "silu", 16, 3),
    case(3, 4, 16, 24, "silu", 16, 8, norm_topk_prob=True),  # K > n: past the best row and column of the grid
    case(1, 7, 12, 20, "gelu", 25, 25),  # K = N
    case(2, 3, 8, 16, "relu", 36, 10, norm_topk_prob=True),  # n = 6, K > n
    case(4, 2, 8, 12, "gelu_pytorch_tanh", 9, 1),  # K = 1
]


def seed_module(fields: dict, dtype: str):
    """The seed's FlashMoE_Pytorch for `fields`, its weights at torch's default init (seeded by the caller)."""
    config = seed_moe.FlashMoEConfig(**fields)
    # Seed bug: FlashMoE_Pytorch reads `config.mlp_bias`, which its FlashMoEConfig does not define (the module
    # raises AttributeError without it). FlashMoE (the Triton path) has a bias-free shared MLP, and so has ours:
    # set it to False.
    config.mlp_bias = False
    return seed_moe.FlashMoE_Pytorch(config).to(TORCH_DTYPE[dtype])


def routing_margin(router_logits: np.ndarray, top_k: int) -> float:
    """The smallest gap between a token's K-th and (K+1)-th of the n*n log-probability sums (inf when K = n*n)."""
    log_probs = router_logits - np.log(np.exp(router_logits).sum(-1, keepdims=True))  # [2, T, n]
    sums = (log_probs[0][:, :, None] + log_probs[1][:, None, :]).reshape(log_probs.shape[1], -1)  # [T, n*n]
    if top_k == sums.shape[1]:
        return math.inf
    ordered = -np.sort(-sums, axis=1)
    return float((ordered[:, top_k - 1] - ordered[:, top_k]).min())


def draw(fields: dict, batch: int, seq: int, dtype: str, seed_value: int):
    """The seed module (random running statistics too), tokens [B, S, d] and cotangents for (y, router_logits),
    drawn again until the routing is far from a tie in both modes, so both frameworks pick the same experts."""
    rng = np.random.default_rng(seed_value)
    torch.manual_seed(seed_value)
    d, n = fields["hidden_size"], math.isqrt(fields["num_experts"])
    for _ in range(20):
        module = seed_module(fields, dtype)
        norm = module.router_norm
        # Eval must read running statistics that differ from the batch's. Ours stores them in float32 whatever
        # the layer's dtype (RouterBatchNorm; the seed's float64 module keeps float64 buffers): draw values
        # that float32 holds exactly, so a float64 eval compares the computation, not that storage rounding.
        with torch.no_grad():
            norm.running_mean.copy_(torch.from_numpy(rng.normal(0.0, 0.5, d).astype(np.float32)))
            norm.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, d).astype(np.float32)))
        norm.num_batches_tracked.fill_(int(rng.integers(0, 1000)))
        # Off-centre tokens with uneven feature scales: the batch statistics differ clearly from the running ones.
        x = 0.7 + rng.uniform(0.5, 2.0, d) * rng.standard_normal((batch, seq, d))
        margins = []
        for train in (False, True):
            probe = seed_module(fields, "float64")
            probe.load_state_dict(module.state_dict())
            probe.train(train)
            with torch.no_grad():
                _, logits = probe(torch.from_numpy(x))
            margins.append(routing_margin(logits.numpy(), fields["num_experts_per_tok"]))
        if min(margins) > 1e-4:
            cot_y = rng.standard_normal((batch, seq, d))
            cot_logits = rng.standard_normal((2, batch * seq, n))
            return module, x.astype(dtype), cot_y.astype(dtype), cot_logits.astype(dtype)
    raise AssertionError("could not draw inputs with a decisive routing")


def numpy_state(module) -> dict[str, np.ndarray]:
    # Copies: `.numpy()` shares the tensor's memory, which a train step then updates in place (and jnp.asarray
    # may alias a numpy array on the CPU).
    return {key: value.detach().numpy().copy() for key, value in module.state_dict().items()}


def run_seed(module, x, cot_y, cot_logits, *, train: bool):
    """The seed module's outputs, its state dict after the call, and d<y.cot_y + logits.cot_logits> with respect
    to x and every parameter (torch autograd)."""
    module.train(train)
    module.zero_grad(set_to_none=True)
    tokens = torch.from_numpy(x).requires_grad_(True)
    y, router_logits = module(tokens)
    loss = (y * torch.from_numpy(cot_y)).sum() + (router_logits * torch.from_numpy(cot_logits)).sum()
    loss.backward()
    grads = {name: p.grad.numpy() for name, p in module.named_parameters()}
    return y.detach().numpy(), router_logits.detach().numpy(), numpy_state(module), tokens.grad.numpy(), grads


def run_ours(config, variables, x, cot_y, cot_logits, *, train: bool):
    """Ours, the same quantities; the parameter gradients mapped to the seed's keys by `to_torch_state_dict`."""
    model = FlashMoE(config)

    def loss(params, tokens):
        (y, router_logits), updates = model.apply(
            {**variables, "params": params}, tokens, train=train, mutable=["batch_stats"]
        )
        value = jnp.sum(y * cot_y) + jnp.sum(router_logits * cot_logits)
        return value, (y, router_logits, updates)

    (_, (y, router_logits, updates)), (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], jnp.asarray(x)
    )
    state = to_torch_state_dict({**variables, **updates}, config)
    # The gradient tree has the params' structure: the converter pairs each leaf with its seed key and layout.
    g_state = to_torch_state_dict({"params": g_params, "batch_stats": variables["batch_stats"]}, config)
    return np.asarray(y), np.asarray(router_logits), state, np.asarray(g_x), g_state


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_seed_pytorch_module(case, train, dtype, seed):
    batch, seq, fields = CASES[case]
    config = FlashMoEConfig(**fields, dtype=dtype, param_dtype=dtype, implementation="xla")
    with jax.enable_x64(dtype == "float64"):
        module, x, cot_y, cot_logits = draw(fields, batch, seq, dtype, seed)
        before = numpy_state(module)
        variables = from_torch_state_dict(before, config)
        want_y, want_logits, want_state, want_gx, want_grads = run_seed(module, x, cot_y, cot_logits, train=train)
        y, router_logits, state, g_x, g_state = run_ours(config, variables, x, cot_y, cot_logits, train=train)

    assert y.shape == want_y.shape == (batch, seq, fields["hidden_size"])
    assert router_logits.shape == want_logits.shape == (2, batch * seq, math.isqrt(fields["num_experts"]))
    assert_close(y, want_y, dtype, what="y")
    assert_close(router_logits, want_logits, dtype, what="router_logits")
    assert_close(g_x, want_gx, dtype, what="d/dx")
    assert set(want_grads) == {k for k in g_state if k.endswith(".weight")}, "parameters differ from the seed's"
    for key, want in want_grads.items():
        assert_close(g_state[key], want, dtype, what=f"d/d {key}")

    # The running statistics: untouched by eval, one momentum step (unbiased variance) and +1 count in train.
    assert list(state) == list(want_state), "our state dict's keys (and order) differ from the seed module's"
    for key in ("router_norm.running_mean", "router_norm.running_var"):
        if train:
            # Ours stores the updated statistics in float32 (see `draw`): the seed's, rounded to float32 once,
            # must be what ours computed in the layer's dtype and stored.
            assert state[key].dtype == np.float32, (key, state[key].dtype)
            assert_close(state[key], want_state[key].astype(np.float32), dtype, what=key)
            assert not np.allclose(want_state[key], before[key]), f"the seed's train step left {key} unchanged"
        else:
            np.testing.assert_array_equal(state[key], before[key], err_msg=key)
            np.testing.assert_array_equal(want_state[key], before[key], err_msg=key)
    count = "router_norm.num_batches_tracked"
    assert int(state[count]) == int(want_state[count]) == int(before[count]) + int(train)
    for key, want in want_state.items():  # the parameters: a forward step changes none of them
        if key.endswith(".weight"):
            np.testing.assert_array_equal(state[key], want, err_msg=key)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_round_trip_into_seed_module(case, seed):
    batch, seq, fields = CASES[case]
    config = FlashMoEConfig(**fields, dtype="float32", param_dtype="float32", implementation="xla")
    module, x, _, _ = draw(fields, batch, seq, "float32", seed)
    original = numpy_state(module)
    back = to_torch_state_dict(from_torch_state_dict(original, config), config)
    assert list(back) == list(original)
    fresh = seed_module(fields, "float32")
    # strict: the keys must match the seed module's exactly; torch also checks every shape.
    fresh.load_state_dict({key: torch.from_numpy(value) for key, value in back.items()}, strict=True)
    reloaded = numpy_state(fresh)
    for key, value in original.items():
        assert reloaded[key].dtype == value.dtype, key
        np.testing.assert_array_equal(reloaded[key], value, err_msg=key)
    module.eval()
    fresh.eval()
    with torch.no_grad():
        want, got = module(torch.from_numpy(x)), fresh(torch.from_numpy(x))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
