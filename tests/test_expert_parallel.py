"""Expert-parallel dispatch (8 CPU devices): the sharded layer equals the one-device layer, forward and
backward, on several mesh shapes; overflow is counted exactly; traffic does not depend on N."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, assert_trees_close, count_triton_calls, cpu_mesh, lower_for_cuda
from jax.sharding import AbstractMesh, AxisType
from oracle import decisive_inputs

from omnimoe_jax import OmniMoE, OmniMoEConfig, SharedMLP, parallel
from omnimoe_jax.convert import from_torch_state_dict
from pallas_kernels import omni_expert_reference

# The default suite keeps two meshes whose expert axis has several shards; pure data parallelism (data=8)
# also trains end to end there, in test_train_parallel.py (a resume onto it). The others run with -m slow.
MESHES = [
    "data=2,expert=4",
    "expert=8",
    pytest.param("data=8", marks=pytest.mark.slow),
    pytest.param("data=4,expert=2", marks=pytest.mark.slow),
]


def layer_config(**changes):
    fields = dict(
        hidden_size=32,
        intermediate_size=48,
        num_experts=64,
        num_experts_per_token=6,
        implementation="xla",
        expert_axis="expert",
    )
    return OmniMoEConfig(**{**fields, **changes})


def decisive_variables(seed, config, tokens, *, train):
    """Random variables and tokens [tokens, d] whose routing is far from a tie (see oracle.routing_margin)."""
    state, x = decisive_inputs(seed, config, tokens, train=train)
    return from_torch_state_dict(state, config), jnp.asarray(x)


def forward_and_gradients(config, variables, x, cotangent):
    """y, d params, d x (through jax.vjp with `cotangent`) and the mutable collections of a training call."""
    model = OmniMoE(config)

    def run(params, tokens):
        return model.apply(
            {**variables, "params": params}, tokens, train=True, mutable=["batch_stats", "intermediates"]
        )

    y, pullback, updates = jax.vjp(run, variables["params"], x, has_aux=True)
    d_params, d_x = pullback(cotangent)
    return y, d_params, d_x, updates


# One jitted function for every one-device reference, so equal shapes compile once for all tests.
reference_step = jax.jit(forward_and_gradients, static_argnums=0)


def dropped_pairs(updates):
    return int(sum(jax.tree.leaves(updates["intermediates"])))


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_layer_matches_the_single_device_layer(spec, seed):
    config = layer_config()
    variables, x = decisive_variables(seed, config, 64, train=True)
    cotangent = np.random.default_rng(seed + 1).standard_normal(x.shape).astype(np.float32)
    # The reference is the same configuration with no mesh in context: the layer's one-device path.
    y_ref, d_params_ref, d_x_ref, updates_ref = reference_step(config, variables, x, cotangent)
    assert dropped_pairs(updates_ref) == 0

    mesh = cpu_mesh(spec)
    with jax.set_mesh(mesh):
        batch = parallel.batch_sharding(mesh)
        variables = jax.device_put(variables, parallel.shardings(variables, mesh))
        x, cotangent = jax.device_put((x, cotangent), batch)
        step = jax.jit(forward_and_gradients, static_argnums=0).lower(config, variables, x, cotangent).compile()
        y, d_params, d_x, updates = step(variables, x, cotangent)

    # The dispatch ran and moved what its buffers hold (nothing across a one-shard expert axis), and no
    # step gathered the batch onto every device (XLA would, for the router's top_k, outside shard_map).
    exchanged = parallel.collective_bytes(step.as_text())
    shards = mesh.shape["expert"]
    capacity = parallel.dispatch_capacity(x.shape[0] // mesh.size, shards, config.num_experts_per_token, None)
    payload = parallel.dispatch_payload_bytes(
        shards, capacity, config.num_experts_per_token, config.hidden_size, jnp.float32
    )
    assert exchanged["all-to-all"] == (payload["forward_backward"] if shards > 1 else 0)
    assert exchanged["all-gather"] == 0
    assert y.sharding.is_equivalent_to(batch, y.ndim)
    table_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert", None))
    assert d_params["experts"]["up_embed"].sharding.is_equivalent_to(table_sharding, 2)
    assert_close(y, y_ref, jnp.float32)
    assert_close(d_x, d_x_ref, jnp.float32, what="d x")
    assert_trees_close(d_params, d_params_ref, jnp.float32, what="d ")
    # Router BatchNorm statistics are those of the global batch, whatever the mesh.
    assert_trees_close(updates["batch_stats"], updates_ref["batch_stats"], jnp.float32)
    assert dropped_pairs(updates) == 0


def one_shard_routing(seed, config, tokens, shard, num_shards):
    """Variables and tokens for which every token's K experts all live on expert shard `shard`.

    Tokens carry a constant feature x[:, 0] = 4, and the row gate gives it weight 25 toward the rows of
    experts owned by `shard` (rows [shard R, (shard + 1) R) with R = n / num_shards): those rows win by
    ~100 in log-probability, so the top K (K <= R n) are all on that shard.
    """
    variables, x = decisive_variables(seed, config, tokens, train=False)
    n = config.num_expert_sqrt
    rows = n // num_shards
    kernel = variables["params"]["router"]["router_gate_x"]["kernel"]  # [d, n]
    kernel = kernel.at[0, shard * rows : (shard + 1) * rows].add(25.0)
    variables["params"]["router"]["router_gate_x"]["kernel"] = kernel
    return variables, x.at[:, 0].set(4.0)


@pytest.mark.parametrize("spec", ["data=2,expert=4", pytest.param("expert=8", marks=pytest.mark.slow)])
def test_routing_every_pair_to_one_shard_drops_exactly_what_capacity_cannot_hold(spec, seed):
    mesh = cpu_mesh(spec)
    devices, shards = mesh.size, mesh.shape["expert"]
    config = layer_config(router_norm="none")
    shard = int(np.random.default_rng(seed).integers(shards))
    tokens = 64
    variables, x = one_shard_routing(seed, config, tokens, shard, shards)
    model = OmniMoE(config)
    y_ref, routing = jax.jit(lambda v, a: model.apply(v, a, return_routing=True))(variables, x)
    rows_per_shard = config.num_experts // shards
    np.testing.assert_array_equal(routing.indices // rows_per_shard, shard)  # the setup did what it says

    local_tokens, top_k = tokens // devices, config.num_experts_per_token
    capacity = parallel.dispatch_capacity(local_tokens, shards, top_k, 0.5)
    assert 1 <= capacity < local_tokens
    for factor, want_dropped in [(None, 0), (0.5, devices * (local_tokens - capacity) * top_k)]:
        layer = OmniMoE(config.replace(expert_capacity_factor=factor))
        with jax.set_mesh(mesh):
            run = jax.jit(lambda v, a, layer=layer: layer.apply(v, a, mutable=["intermediates"]))
            y, updates = run(variables, jax.device_put(x, parallel.batch_sharding(mesh)))
        assert dropped_pairs(updates) == want_dropped, f"capacity factor {factor}"
        if factor is None:
            assert_close(y, y_ref, jnp.float32)
            continue
        # Each device keeps its first `capacity` tokens (token order); the rest lose their routed part.
        kept = (np.arange(tokens) % local_tokens) < capacity
        assert_close(y[kept], y_ref[kept], jnp.float32, what="tokens within capacity")
        shared = SharedMLP(config).apply({"params": variables["params"]["shared"]}, x)
        assert_close(y[~kept], shared[~kept], jnp.float32, what="dropped tokens: shared MLP only")


def test_dispatch_with_repeated_experts_matches_the_reference_with_gradients(seed):
    mesh = cpu_mesh("data=4,expert=2")
    tokens, experts, d, top_k = 32, 16, 16, 5
    rng = np.random.default_rng(seed)
    shapes = [(tokens, d), (experts, d), (experts, d), (tokens, d)]
    x, up, down, cotangent = (rng.standard_normal(shape).astype(np.float32) for shape in shapes)
    weights = rng.uniform(0.1, 1.0, (tokens, top_k)).astype(np.float32)
    # Repeats within a token and experts nobody picks are both allowed; half the tokens use only shard 0.
    indices = rng.integers(0, experts, (tokens, top_k), dtype=np.int32)
    indices[::2] = np.arange(top_k) % 3

    def reference(x, up, down, weights):
        return omni_expert_reference(x, up, down, weights, indices)

    def sharded(x, up, down, weights):
        return parallel.expert_parallel_omni_expert(x, up, down, weights, indices, mesh=mesh, expert_axis="expert")

    @jax.jit
    def run_reference(*args):
        y, pullback = jax.vjp(reference, *args)
        return y, pullback(cotangent)

    y_ref, grads_ref = run_reference(x, up, down, weights)
    with jax.set_mesh(mesh):

        @jax.jit
        def run(*args):
            y, pullback, dropped = jax.vjp(sharded, *args, has_aux=True)
            return y, pullback(cotangent), dropped

        y, grads, dropped = run(x, up, down, weights)
    assert int(dropped) == 0
    assert_close(y, y_ref, jnp.float32)
    for name, grad, want in zip(("x", "up", "down", "weights"), grads, grads_ref, strict=True):
        assert_close(grad, want, jnp.float32, what=f"d {name}")


@pytest.mark.parametrize(
    ("local_tokens", "shards", "top_k", "factor", "want"),
    [
        (8, 4, 6, None, 8),  # default: every token fits, whatever the routing
        (8, 4, 6, 0.5, 4),  # ceil(0.5 * 8 * (1 - 0.75^6)) = ceil(3.29)
        (8, 8, 6, 0.5, 3),  # ceil(0.5 * 8 * (1 - 0.875^6)) = ceil(2.20)
        (1000, 8, 2, 1.25, 293),  # ceil(1.25 * 1000 * (1 - 0.875^2)) = ceil(292.97)
        (8, 4, 6, 100.0, 8),  # never more slots than tokens
        (8, 8, 1, 0.01, 1),  # never fewer than one
    ],
)
def test_dispatch_capacity(local_tokens, shards, top_k, factor, want):
    assert parallel.dispatch_capacity(local_tokens, shards, top_k, factor) == want


def test_shapes_that_cannot_be_split_are_refused():
    mesh = cpu_mesh("data=2,expert=4")
    split = dict(mesh=mesh, expert_axis="expert")

    def arrays(tokens, experts, d=8, top_k=2):
        shapes = [((tokens, d), "f4"), ((experts, d), "f4"), ((experts, d), "f4"), ((tokens, top_k), "f4")]
        return [jax.ShapeDtypeStruct(s, t) for s, t in shapes] + [jax.ShapeDtypeStruct((tokens, top_k), "i4")]

    with pytest.raises(ValueError, match=r"splits its 12 tokens over the 8 devices .* a multiple of 8"):
        jax.eval_shape(lambda *a: parallel.expert_parallel_omni_expert(*a, **split), *arrays(12, 16))
    with pytest.raises(ValueError, match="num_experts=18 rows do not divide over the 4 shards of mesh axis 'expert'"):
        jax.eval_shape(lambda *a: parallel.expert_parallel_omni_expert(*a, **split), *arrays(16, 18))
    with pytest.raises(ValueError, match=r"expert_axis='experts' is not an axis of the mesh"):
        jax.eval_shape(
            lambda *a: parallel.expert_parallel_omni_expert(*a, mesh=mesh, expert_axis="experts"), *arrays(16, 16)
        )
    # The whole layer says the same before it routes anything.
    config = layer_config(hidden_size=8)
    tokens = jax.ShapeDtypeStruct((12, 8), "f4")
    variables = jax.eval_shape(OmniMoE(config).init, jax.random.key(0), tokens)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"token count .* multiple of 8; got .* shape \(12, 8\)"):
        jax.eval_shape(OmniMoE(config).apply, variables, tokens)


@pytest.mark.parametrize("factor", [None, pytest.param(0.5, marks=pytest.mark.slow)])
def test_dispatch_traffic_is_what_the_shapes_say_and_does_not_grow_with_num_experts(factor):
    mesh = cpu_mesh("data=2,expert=4")
    tokens, d, top_k = 64, 16, 6
    measured = []
    for experts in (64, 4096):
        shapes = [((tokens, d), jnp.float32), ((experts, d), jnp.float32), ((experts, d), jnp.float32)]
        shapes += [((tokens, top_k), jnp.float32), ((tokens, top_k), jnp.int32)]
        args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]

        def loss(x, up, down, weights, indices):
            y, _ = parallel.expert_parallel_omni_expert(
                x, up, down, weights, indices, mesh=mesh, expert_axis="expert", capacity_factor=factor
            )
            return jnp.sum(y * y)

        with jax.set_mesh(mesh):
            step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
            measured.append(parallel.collective_bytes(step.lower(*args).compile().as_text())["all-to-all"])
    capacity = parallel.dispatch_capacity(tokens // mesh.size, 4, top_k, factor)
    want = parallel.dispatch_payload_bytes(4, capacity, top_k, d, jnp.float32)["forward_backward"]
    assert measured == [want, want]


def sharded_expert_op(mesh, **options):
    """The expert-parallel op over `mesh` as a function of (x, up, down, weights, indices) -> y."""

    def op(x, up, down, weights, indices):
        y, _ = parallel.expert_parallel_omni_expert(
            x, up, down, weights, indices, mesh=mesh, expert_axis="expert", **options
        )
        return y

    return op


def test_sharded_op_runs_the_pallas_kernels(seed):
    # The GPU path: Pallas kernels inside shard_map (interpret mode here), forward and gradients.
    mesh = cpu_mesh("data=2,expert=4")
    rng = np.random.default_rng(seed)
    tokens, d, experts, top_k = 32, 16, 64, 4
    x, up, down = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((tokens, d), (experts, d), (experts, d)))
    weights = jnp.asarray(rng.random((tokens, top_k)), jnp.float32)
    indices = jnp.asarray(rng.integers(0, experts, (tokens, top_k)), jnp.int32)
    cotangent = jnp.asarray(rng.standard_normal((tokens, d)), jnp.float32)

    def outputs(op):
        y, pullback = jax.vjp(lambda *a: op(*a, indices), x, up, down, weights)
        return y, pullback(cotangent)

    want = jax.jit(outputs, static_argnums=0)(omni_expert_reference)
    with jax.set_mesh(mesh):
        got = jax.jit(outputs, static_argnums=0)(sharded_expert_op(mesh, implementation="pallas"))
    assert_close(got[0], want[0], jnp.float32)
    for name, grad, ref in zip(("x", "up", "down", "weights"), got[1], want[1], strict=True):
        assert_close(grad, ref, jnp.float32, what=f"d {name}")


def test_sharded_op_with_pallas_kernels_lowers_for_cuda():
    # Deviceless: an abstract 2 x 4 mesh, lowered for CUDA on this CPU (catches what only a GPU would reject).
    mesh = AbstractMesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto, AxisType.Auto))
    op = sharded_expert_op(mesh, implementation="pallas", interpret=False)
    tokens, d, experts, top_k = 256, 64, 1024, 8
    shapes = [((tokens, d), jnp.bfloat16), ((experts, d), jnp.bfloat16), ((experts, d), jnp.bfloat16)]
    shapes += [((tokens, top_k), jnp.float32), ((tokens, top_k), jnp.int32)]
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]

    def loss(*args):
        return jnp.sum(op(*args).astype(jnp.float32))

    with jax.sharding.use_abstract_mesh(mesh):
        text = lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2, 3)), *args).as_text()
    # The shard runs the one-device op: forward 2 (pair_dots, token_combine) + backward 7 (segment sums as
    # blocks + fix-up + untouched rows for d_up and d_down, token_combine for dx), as test_expert_kernel.py
    # counts them.
    assert count_triton_calls(text) == 9
    assert text.count("all_to_all") >= 4  # token rows, weights, rows out; partials back (and the transposes)


def test_collective_bytes_reads_hlo_results():
    hlo = """
    %all-to-all.6 = (f32[1,8,6]{2,1,0}, s32[1,8,6]{2,1,0}) all-to-all(%a, %b), channel_id=1, replica_groups={{0,1}}
    ROOT %all-reduce.7 = bf16[8,32]{1,0} all-reduce(%c), channel_id=2, replica_groups=[2,4]<=[8], to_apply=%add
    %all-reduce.8 = f32[64]{0} all-reduce(%e), replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_1'}, to_apply=%add
    %all-reduce.9 = f32[512,64]{1,0} all-reduce(%f), channel_id=1, replica_groups={{0},{1},{2},{3}}, to_apply=%add
    %all-reduce.10 = f32[99]{0} all-reduce(%g), replica_groups=mesh['axis_0'=4,'axis_1'=1] {'axis_1'}, to_apply=%add
    %all-gather-start = (f32[4]{0}, f32[16]{0}) all-gather-start(%d), dimensions={0}
    %all-gather-done = f32[16]{0} all-gather-done(%all-gather-start)
    %fusion = f32[8]{0} fusion(%all-reduce.7), kind=kLoop, calls=%fused
    """
    want = {"all-to-all": 2 * 48 * 4, "all-reduce": 256 * 2 + 64 * 4, "all-gather": 64}
    assert parallel.collective_bytes(hlo) == {**dict.fromkeys(parallel.COLLECTIVES, 0), **want}
