"""Tests of fnbp/net.py: the Net spec, its inferred shapes, its params and state layout, its
JSON form, and its passage through jit and vmap."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import every_kind_net, perturbed, random_net_data

import fnbp
from fnbp.layers import (
    KINDS,
    Activation,
    AvgPool,
    BatchNorm,
    Conv,
    Dense,
    Dropout,
    Flatten,
    LayerNorm,
    MaxPool,
    Reshape,
    Residual,
)

# ----------------------------------------------------------------------------------------------
# Shapes: hand-computed, and the shapes the forward pass really produces.

# (layer, per-example input shape, output shape worked out by hand)
SHAPES = [
    # 1-D convolution, width 10: SAME gives ceil(10/s); VALID (10 − k)//s + 1; explicit pads
    (Conv(4, (3,)), (10, 2), (10, 4)),
    (Conv(4, (3,), strides=2), (10, 2), (5, 4)),
    (Conv(4, (3,), strides=3), (10, 2), (4, 4)),  # ceil(10/3) = 4
    (Conv(4, (3,), strides=2, padding="VALID"), (10, 2), (4, 4)),  # (10 − 3)//2 + 1
    (Conv(4, (4,), padding="VALID"), (10, 2), (7, 4)),
    (Conv(4, (3,), strides=2, padding=((1, 2),)), (10, 2), (6, 4)),  # (10 + 3 − 3)//2 + 1
    (Conv(1, (1,)), (3, 5), (3, 1)),
    # 2-D convolution, 7 × 6 × 3
    (Conv(5, (3, 2)), (7, 6, 3), (7, 6, 5)),
    (Conv(5, (3, 2), strides=(2, 1)), (7, 6, 3), (4, 6, 5)),  # ceil(7/2), ceil(6/1)
    (Conv(5, (3, 2), strides=(2, 1), padding="VALID"), (7, 6, 3), (3, 5, 5)),
    (Conv(5, (3, 2), strides=(2, 3), padding=((0, 1), (2, 0))), (7, 6, 3), (3, 3, 5)),
    (Conv(2, (7, 6), padding="VALID"), (7, 6, 3), (1, 1, 2)),
    # pools: strides default to the window
    (MaxPool((2,)), (8, 4), (4, 4)),
    (AvgPool((3,), strides=(1,)), (8, 4), (6, 4)),
    (MaxPool((3,), strides=(5,)), (8, 4), (2, 4)),  # windows at 0 and 5
    (MaxPool((2, 2)), (6, 4, 3), (3, 2, 3)),
    (AvgPool((3, 2), strides=(1, 2)), (6, 4, 3), (4, 2, 3)),
    (AvgPool((6, 1)), (6, 4, 3), (1, 4, 3)),
    # shape-preserving kinds, and the rearranging ones
    (BatchNorm(), (6, 4, 3), (6, 4, 3)),
    (LayerNorm(), (5, 2), (5, 2)),
    (Dropout(0.5), (7,), (7,)),
    (Activation("tanh"), (2, 3), (2, 3)),
    (Flatten(), (6, 4, 3), (72,)),
    (Reshape((4, 3, 6)), (72,), (4, 3, 6)),
    (Reshape((2, 36)), (6, 4, 3), (2, 36)),
    (Dense(9), (72,), (9,)),
    # residual blocks: without a projection, and with one on the last axis
    (Residual((Dense(5, "relu"), Dense(5))), (5,), (5,)),
    (Residual((Dense(8),)), (5,), (8,)),
    (Residual((Conv(3, (3,)), BatchNorm())), (6, 3), (6, 3)),
    (Residual((Conv(7, (3, 3)),)), (4, 4, 2), (4, 4, 7)),
    (Residual((Residual((Dense(4),)), LayerNorm())), (3,), (4,)),
]


def _net_around(layer, in_shape):
    """``layer`` with a Flatten and a Dense after it (a Net must end in a vector)."""
    return fnbp.Net(in_shape, [layer, Flatten(), Dense(2)])


@pytest.mark.parametrize("layer, in_shape, out_shape", SHAPES, ids=[repr(s[0]) for s in SHAPES])
def test_shapes_are_inferred_as_worked_out_by_hand_and_as_the_forward_pass_makes_them(
    layer, in_shape, out_shape
):
    net = _net_around(layer, in_shape)
    assert layer.out_shape(in_shape) == out_shape
    assert net.in_shapes == (in_shape, out_shape, (int(np.prod(out_shape)),))
    assert net.output_shape == (2,) and net.output_size == 2
    params, state = perturbed(0, net)
    x = jax.ShapeDtypeStruct((3, *in_shape), jnp.float32)
    masks = [None] * 3 if not layer.sublayers() else [layer.no_mask(), None, None]
    trace = jax.eval_shape(
        lambda x: fnbp.model.run(params, net, x, state=state, masks=masks, train=False), x
    )
    assert [z.shape for z in trace.z] == [(3, *out_shape), (3, int(np.prod(out_shape))), (3, 2)]


def test_the_same_padding_matches_lax_conv_general_dilated():
    """An independent witness for "SAME": XLA's own padding rule gives the same outputs."""
    for n, k, s in [(10, 3, 2), (7, 4, 3), (5, 5, 1), (4, 2, 4), (9, 1, 2)]:
        out = jax.eval_shape(
            lambda x, w, s=s: jax.lax.conv_general_dilated(
                x, w, (s,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
            ),
            jax.ShapeDtypeStruct((1, n, 2), jnp.float32),
            jax.ShapeDtypeStruct((k, 2, 3), jnp.float32),
        )
        assert Conv(3, (k,), strides=s).out_shape((n, 2)) == out.shape[1:], (n, k, s)


def test_a_cnns_shapes_are_threaded_layer_by_layer():
    net = fnbp.Net(
        64,
        [
            Reshape((8, 8, 1)),
            Conv(6, (3, 3), activation="relu"),
            MaxPool((2, 2)),
            Conv(10, (3, 3), strides=2, padding="VALID", activation="relu"),
            Flatten(),
            Dense(10),
        ],
    )
    assert net.input_shape == (64,)
    assert net.in_shapes == ((64,), (8, 8, 1), (8, 8, 6), (4, 4, 6), (1, 1, 10), (10,))
    assert net.output_shape == (10,)


def _param_shapes(net):
    """``fnbp.init_params``'s structure and shapes, traced, not run (nothing to compile)."""
    return jax.eval_shape(lambda: fnbp.init_params(jax.random.key(0), net))


def test_residual_blocks_add_a_projection_only_when_the_branch_changes_the_last_axis():
    same = Residual((Dense(6, "relu"), Dense(6)))
    wider = Residual((Dense(6, "relu"), Dense(9)), learn_alpha=True)
    net = fnbp.Net(6, [same, wider, Dense(2)])
    params = _param_shapes(net)
    assert set(params[0]) == {"branch"} and not same.projects((6,))
    assert set(params[1]) == {"branch", "alpha", "P"} and wider.projects((6,))
    assert params[1]["P"].shape == (9, 6)  # (C_out, C_in), like a Dense W
    assert params[1]["alpha"].shape == ()
    conv = fnbp.Net((8, 3), [Residual((Conv(5, (3,)),)), Flatten(), Dense(2)])
    assert _param_shapes(conv)[0]["P"].shape == (5, 3)
    assert conv.in_shapes[1] == (8, 5)


# ----------------------------------------------------------------------------------------------
# Specs are static: hashable, equal by value, ordinary arguments of jit and vmap.

EVERY_LAYER = [
    Dense(3, "relu", use_bias=False),
    Activation("gelu"),
    Conv(4, (3,), 2, ((1, 0),)),
    Conv(4, (3, 2), (1, 2), "VALID", "tanh"),
    MaxPool((2,)),
    AvgPool((2, 2), strides=(1, 2)),
    BatchNorm(0.8, 1e-3, "relu"),
    LayerNorm(1e-4),
    Dropout(0.25),
    Residual((Dense(3), Residual((LayerNorm(),), alpha=0.0)), 0.5, True, "relu"),
    Flatten(),
    Reshape((2, 3)),
]


def test_every_layer_kind_is_listed_here():
    assert {type(layer) for layer in EVERY_LAYER} == set(KINDS.values())


@pytest.mark.parametrize("layer", EVERY_LAYER, ids=lambda l: l.kind)
def test_every_layer_kind_is_hashable_equal_by_value_and_leafless(layer):
    twin = fnbp.layers.from_dict(json.loads(json.dumps(layer.to_dict())))
    assert twin == layer and hash(twin) == hash(layer) and twin is not layer
    assert jax.tree.leaves(layer) == []  # a static pytree: nothing for jit to trace
    assert jax.jit(lambda l: l)(layer) == layer  # through jit as an ordinary argument
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.activation = "relu"


def test_lists_become_tuples_so_that_specs_built_from_json_lists_hash():
    a = Conv(2, [3, 3], [1, 2], [[1, 1], [0, 2]])
    b = Conv(2, (3, 3), (1, 2), ((1, 1), (0, 2)))
    assert a == b and hash(a) == hash(b)
    assert Residual([Dense(2)]) == Residual((Dense(2),))
    assert fnbp.Net([4], [Dense(2)]) == fnbp.Net(4, (Dense(2),))
    assert hash(fnbp.Net([4], [Dense(2)])) == hash(fnbp.Net(4, (Dense(2),)))


def test_a_net_with_every_kind_passes_through_jit_without_static_argnums_and_does_not_retrace():
    net = every_kind_net()
    params, state = perturbed(0, net)
    x, y = random_net_data(0, net, 4)
    key = jax.random.key(1, impl="rbg")  # cheap to compile, unlike threefry

    @jax.jit
    def step(params, net, state, key, x, y):
        return fnbp.backprop(params, net, x, y, state=state, key=key, train=True)

    chex.clear_trace_counter()
    counted = jax.jit(chex.assert_max_traces(step.__wrapped__, n=1))
    first = counted(params, net, state, key, x, y)
    again = counted(params, every_kind_net(), state, key, x, y)  # equal, not identical: no retrace
    chex.assert_trees_all_equal((first.grads, first.state), (again.grads, again.state))
    chex.assert_tree_all_finite(first.grads)


def test_a_net_passes_through_vmap_over_a_population_of_params():
    net = fnbp.Net(
        (6, 2),
        [Conv(3, (3,), activation="tanh"), BatchNorm(), AvgPool((2,)), Flatten(), Dense(3)],
    )
    members = [perturbed(seed, net)[0] for seed in range(3)]
    population = jax.tree.map(lambda *v: jnp.stack(v), *members)
    state = fnbp.init_state(net)
    x, y = random_net_data(1, net, 5)
    losses = jax.vmap(lambda p, net: fnbp.loss(p, net, x, y, state=state, train=True),
                      in_axes=(0, None))(population, net)  # fmt: skip
    alone = [fnbp.loss(p, net, x, y, state=state, train=True) for p in members]
    # float32: the batched and the single programs reduce in different orders.
    chex.assert_trees_all_close(losses, jnp.stack(alone), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# JSON


def _kinds(layers):
    out = set()
    for layer in layers:
        out |= {layer.kind} | _kinds(layer.sublayers())
    return out


ROUND_TRIP = [
    every_kind_net(),
    every_kind_net("mse"),
    fnbp.Net((6, 4, 3), EVERY_LAYER[3:4] + [EVERY_LAYER[5], Flatten(), Dense(2)]),
    fnbp.Net(
        5,
        [
            Residual(
                (Residual((Residual((Dense(5, "relu"),), -0.3),), 1.0, True), Dropout(0.1)), 0.0
            ),
            Dense(2, use_bias=False),
        ],
        "sigmoid_binary_cross_entropy",
    ),  # fmt: skip
    fnbp.Net(
        (8, 8, 1),
        [Conv(2, (3, 3), padding=((0, 2), (1, 1))), MaxPool((2, 2), (2, 2)), Flatten(), Dense(3)],
    ),  # fmt: skip
]


@pytest.mark.parametrize("net", ROUND_TRIP, ids=lambda n: f"{len(n.layers)}-layers-{n.loss}")
def test_json_round_trip_gives_back_an_equal_net(net):
    text = net.to_json()
    back = fnbp.Net.from_json(text)
    assert back == net and hash(back) == hash(net)
    assert back.in_shapes == net.in_shapes
    assert back.to_json() == text  # stable: the same text again
    assert fnbp.Net.from_json(net.to_json(indent=2)) == net
    d = json.loads(text)  # plain JSON: lists, numbers, strings
    assert d["kind"] == "net" and d["loss"] == net.loss and len(d["layers"]) == len(net.layers)


def test_the_round_trip_nets_use_every_kind_and_nest_residuals():
    used = set().union(*(_kinds(net.layers) for net in ROUND_TRIP))
    assert used == set(KINDS)
    nested = ROUND_TRIP[3].layers[0]
    assert nested.branch[0].branch[0].kind == "residual"


def test_json_of_a_layer_names_its_kind_and_every_field():
    net = fnbp.Net((4, 1), [Conv(2, (3,)), Flatten(), Dense(1)], "mse")
    assert json.loads(net.to_json()) == {
        "kind": "net",
        "input_shape": [4, 1],
        "loss": "mse",
        "layers": [
            {"kind": "conv", "features": 2, "kernel_size": [3], "strides": [1],
             "padding": "SAME", "activation": "identity", "use_bias": True},
            {"kind": "flatten", "activation": "identity"},
            {"kind": "dense", "features": 1, "activation": "identity", "use_bias": True},
        ],
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Params and state: aligned with the layers.


def test_init_params_is_aligned_with_the_layers_with_empty_dicts_for_param_free_kinds():
    net = every_kind_net()
    params = _param_shapes(net)  # init_params traced, not compiled (4 s of CPU for this net)
    assert len(params) == len(net.layers)
    keys = [sorted(p) for p in params]
    assert keys == [
        [],  # reshape
        ["W", "b"],  # conv 2-D
        [],  # max_pool
        ["beta", "gamma"],  # batch_norm
        [],  # reshape
        ["W"],  # conv 1-D, use_bias=False
        [],  # avg_pool
        ["beta", "gamma"],  # layer_norm
        ["P", "alpha", "branch"],  # residual: projection 4 -> 5, learned alpha
        [],  # flatten
        ["W", "b"],  # dense
        [],  # dropout
        ["branch"],  # residual, no projection, fixed alpha
        [],  # activation
        ["W", "b"],  # dense
    ]
    assert params[1]["W"].shape == (2, 2, 2, 3) and params[5]["W"].shape == (3, 3, 4)
    assert [sorted(p) for p in params[8]["branch"]] == [["W", "b"], []]
    inner = params[12]["branch"]
    assert [sorted(p) for p in inner] == [["W", "b"], ["beta", "gamma"], ["branch"]]
    assert inner[2]["branch"][0]["W"].shape == (6, 6)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))


def test_init_params_start_normalization_at_one_and_zero_and_a_learned_alpha_at_its_field():
    net = fnbp.Net(3, [BatchNorm(), Residual((LayerNorm(), Dropout(0.1)), 0.7, True), Dense(2)])
    params = fnbp.init_params(jax.random.key(0, impl="rbg"), net, dtype=jnp.bfloat16)
    one, zero = jnp.ones(3, jnp.bfloat16), jnp.zeros(3, jnp.bfloat16)
    chex.assert_trees_all_equal(params[0], {"gamma": one, "beta": zero})
    chex.assert_trees_all_equal(
        params[1], {"branch": [{"gamma": one, "beta": zero}, {}], "alpha": jnp.bfloat16(0.7)}
    )
    assert sorted(params[2]) == ["W", "b"] and params[2]["W"].dtype == jnp.bfloat16


def test_init_state_is_aligned_with_the_layers_with_mean_and_var_for_batch_norm():
    net = fnbp.Net(
        (4, 2),
        [
            Conv(3, (3,)),
            BatchNorm(),
            Residual((Conv(3, (1,)), BatchNorm(), Residual((BatchNorm(),)))),
            Residual((LayerNorm(),)),
            Flatten(),
            Dense(2),
        ],
    )
    state = fnbp.init_state(net)
    bn = {"mean": jnp.zeros(3), "var": jnp.ones(3)}
    expected = [{}, bn, {"branch": [{}, bn, {"branch": [bn]}]}, {"branch": [{}]}, {}, {}]
    chex.assert_trees_all_equal(state, expected)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state))
    assert net.needs_state and net.needs_train and net.couples_examples


def test_param_free_nets_have_empty_state():
    net = fnbp.Net(4, [Dense(3), Dropout(0.5), Residual((LayerNorm(),)), Dense(2)])
    assert fnbp.init_state(net) == [{}, {}, {"branch": [{}]}, {}]
    assert not net.needs_state and net.needs_train and not net.couples_examples


def test_num_params_matches_a_hand_count():
    net = every_kind_net()
    # conv 2×2, 2 -> 3: 2·2·2·3 + 3; BN: 2·3; conv 3, 3 -> 4 without bias: 3·3·4;
    # LN: 2·4; residual: P 5×4, α, branch conv 3, 4 -> 5: 3·4·5 + 5; dense 10 -> 6: 60 + 6;
    # residual: dense 6 -> 6 (42), LN (12), inner residual dense 6 -> 6 (42); dense 6 -> 3: 21
    by_hand = (24 + 3) + 6 + 36 + 8 + (20 + 1 + 60 + 5) + 66 + (42 + 12 + 42) + 21
    assert net.num_params == by_hand == 346
    assert sum(v.size for v in jax.tree.leaves(_param_shapes(net))) == by_hand
    assert fnbp.Net(4, [Dense(3, use_bias=False), BatchNorm(), Dense(2)]).num_params == 12 + 6 + 8


# ----------------------------------------------------------------------------------------------
# An MLP is a Net of Dense layers.


def test_an_mlps_layers_view_is_its_dense_stack():
    mlp = fnbp.MLP((4, 6, 5, 3), "tanh", "mse", "sigmoid")
    assert mlp.layers == (Dense(6, "tanh"), Dense(5, "tanh"), Dense(3, "sigmoid"))
    assert mlp.input_shape == (4,) and mlp.output_size == 3
    assert mlp.in_shapes == ((4,), (6,), (5,))
    assert not (mlp.needs_train or mlp.needs_state or mlp.couples_examples)


def test_a_net_of_an_mlps_layers_has_the_same_params_and_outputs_bit_for_bit():
    mlp = fnbp.MLP((4, 6, 5, 3), "tanh", "mse", "sigmoid")
    net = fnbp.Net(mlp.input_shape, mlp.layers, mlp.loss)
    assert net.in_shapes == mlp.in_shapes and net.num_params == mlp.num_params
    p_mlp, p_net = (fnbp.init_params(jax.random.key(3, impl="rbg"), m) for m in (mlp, net))
    chex.assert_trees_all_equal(p_mlp, p_net)
    x, y = random_net_data(0, net, 7)
    chex.assert_trees_all_equal(fnbp.forward(p_mlp, mlp, x), fnbp.forward(p_net, net, x))
    chex.assert_trees_all_equal(
        fnbp.backprop(p_mlp, mlp, x, y).grads, fnbp.backprop(p_net, net, x, y).grads
    )


def test_find_names_the_first_matching_layer_nested_branches_included():
    net = every_kind_net()
    assert net.find(lambda l: l.needs_state) == "layer 4 (batch_norm)"
    assert net.find(lambda l: l.kind == "dropout") == "layer 9 (residual) branch layer 2 (dropout)"
    assert net.find(lambda l: l.kind == "leaky") is None
    assert (
        net.find(lambda l: l.activation == "leaky_relu")
        == "layer 13 (residual) branch layer 3 (residual) branch layer 1 (dense)"
    )
