"""Tests of fnbp/engine.py: the backward loop against ``jax.vjp`` of the forward loop on a
random sequence of every kind, ``act_backward``'s exact zeros, masks as a pure function of the
key, and the MLP path bit for bit equal to the frozen backprop of before the engine
(``tests/oracles.py``)."""

import functools
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import assert_rel_close, old_backprop, random_masks, random_params, random_state

import fnbp
from fnbp.activations import ACTIVATIONS
from fnbp.engine import act_backward, backward_seq, draw_masks, forward_seq, no_masks
from fnbp.layers import (
    BatchNorm,
    Conv,
    Dense,
    Dropout,
    Flatten,
    LayerNorm,
    MaxPool,
    Residual,
)

backprop_module = importlib.import_module("fnbp.backprop")

# every kind once, channels changing, a strided conv, overlapping pools, a projected block
NET = fnbp.Net(
    (7, 7, 2),
    [
        Conv(3, (3, 3), strides=2, activation="tanh"),
        BatchNorm(activation="relu"),
        MaxPool((2, 2), strides=(1, 1)),
        LayerNorm(activation="gelu"),
        Dropout(0.3),
        Flatten(),
        Residual((Dense(8, "tanh"), Dropout(0.2), Dense(5)), alpha=0.7, learn_alpha=True,
                 activation="sigmoid"),
        Dense(4),
    ],
    loss="mse",
)  # fmt: skip
BATCH = 6


def _net_inputs(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    params = [
        random_params(l, s, rng, dtype) for l, s in zip(NET.layers, NET.in_shapes, strict=True)
    ]
    state = [random_state(l, s, rng) for l, s in zip(NET.layers, NET.in_shapes, strict=True)]
    masks = [random_masks(l, s, BATCH, rng) for l, s in zip(NET.layers, NET.in_shapes, strict=True)]
    x = rng.standard_normal((BATCH, *NET.input_shape)).astype(dtype)
    delta = rng.standard_normal((BATCH, *NET.output_shape)).astype(dtype)
    return params, state, masks, x, delta


@functools.partial(jax.jit, static_argnames="train")
def _both(params, state, masks, x, delta, l2, train):
    """The hand-written loop, ``(grads, deltas, ∂L/∂x)`` by :func:`backward_seq` after
    :func:`forward_seq`, and beside it the reference ``(∂⟨δ, z_last⟩/∂params, ∂/∂x,
    ∂/∂offsets)`` by ``jax.vjp`` of the forward loop with zero offsets added to every z (the
    last are the deltas), without the L2 term. One program: one compile per mode."""
    hand = backward_seq(
        NET.layers, params, forward_seq(NET.layers, params, state, x, masks, train), delta, l2
    )
    zeros = [
        jnp.zeros((BATCH, *layer.out_shape(s)))
        for layer, s in zip(NET.layers, NET.in_shapes, strict=True)
    ]

    def last_z(params, x, offsets):
        return forward_seq(NET.layers, params, state, x, masks, train, offsets).z[-1]

    return hand, jax.vjp(last_z, params, x, zeros)[1](delta)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_backward_seq_equals_jax_vjp_of_forward_seq_on_every_kind(train, x64):
    params, state, masks, x, delta = _net_inputs()
    masks = masks if train else no_masks(NET.layers)
    (grads, deltas, back), (g_ref, back_ref, d_ref) = _both(
        params, state, masks, x, delta, 0.0, train
    )
    outer = [d["out"] if isinstance(d, dict) else d for d in deltas]
    # float64, eight layers each rounding at ~1e-16 of O(1) terms: 1e-11 relative leaves room
    # for the depth, 1e-14 absolute for a leaf that is a cancellation of O(1) terms (BN's γ
    # behind dead ReLUs); both far below any wrong term
    assert_rel_close(grads, g_ref, 1e-11, "grads", atol=1e-14)
    assert_rel_close(back, back_ref, 1e-11, "dL/dx", atol=1e-14)
    assert_rel_close(outer, d_ref, 1e-11, "deltas", atol=1e-14)
    assert len(deltas[6]["branch"]) == 3


def test_l2_decays_every_weight_leaf_and_nothing_else(x64):
    params, state, masks, x, delta = _net_inputs(seed=1)
    g0 = _both(params, state, masks, x, delta, 0.0, True)[0][0]
    g1 = _both(params, state, masks, x, delta, 0.5, True)[0][0]  # λ traced: the same program

    def expected(path, w, a):  # conv/dense W and the projection P: + λW; the rest unchanged
        name = jax.tree_util.keystr(path)
        return a + 0.5 * w if name.endswith(("['W']", "['P']")) else a

    want = jax.tree_util.tree_map_with_path(expected, params, g0)
    assert_rel_close(g1, want, 1e-14)
    assert sum(k.endswith(("['W']", "['P']")) for k in _paths(params)) == 5  # each one seen


def _paths(tree):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_act_backward_passes_exactly_zero_where_the_slope_is_zero_even_for_infinities():
    inf = jnp.inf
    z = jnp.array([-2.0, -0.5, 1.0, 3.0])
    back = jnp.array([inf, -inf, 2.0, inf])
    relu = ACTIVATIONS["relu"]
    chex.assert_trees_all_equal(
        act_backward(relu, z, relu.f(z), back), jnp.array([0.0, 0.0, 2.0, inf])
    )
    # saturated units in float32: tanh(20) = 1 and sigmoid(−200) = 0 exactly, slopes exactly 0
    for name, z in (("tanh", jnp.array([20.0, -20.0])), ("sigmoid", jnp.array([-200.0, 200.0]))):
        act = ACTIVATIONS[name]
        assert np.all(np.asarray(act.df(z, act.f(z))) == 0)
        out = act_backward(act, z, act.f(z), jnp.array([inf, -inf]))
        chex.assert_trees_all_equal(out, jnp.zeros(2))
    # where the slope is not 0, f′·back; the identity hands back the very array it got
    tanh = ACTIVATIONS["tanh"]
    z = jnp.array([0.3, -1.2])
    np.testing.assert_allclose(
        act_backward(tanh, z, jnp.tanh(z), jnp.array([2.0, 3.0])),
        np.array([2.0, 3.0]) / np.cosh(np.array([0.3, -1.2])) ** 2,
        rtol=1e-6,  # float32 tanh and cosh
    )
    assert act_backward(ACTIVATIONS["identity"], z, z, back) is back


@jax.jit
def _draws(key):
    """The net's masks, and beside them what layer 5 and the block's branch draw on their own
    from ``fold_in(key, i)`` (one compile for all)."""
    branch = NET.layers[6].branch
    return (
        draw_masks(NET.layers, key, NET.in_shapes, BATCH),
        jax.random.bernoulli(jax.random.fold_in(key, 4), 0.7, (BATCH, *NET.in_shapes[4])),
        draw_masks(branch, jax.random.fold_in(key, 6), (NET.in_shapes[6], (8,), (8,)), BATCH),
    )


def test_draw_masks_is_a_pure_function_of_the_key_layer_i_from_fold_in_key_i():
    masks, layer_5, branch = _draws(jax.random.key(11))
    chex.assert_trees_all_equal(_draws(jax.random.key(11))[0], masks)  # same key, same masks
    assert [i for i, m in enumerate(masks) if m is not None] == [4, 6]
    chex.assert_trees_all_equal(masks[4], layer_5)
    chex.assert_trees_all_equal(masks[6], branch)  # nested: the branch's own draw
    assert masks[6][0] is None and masks[6][2] is None and masks[6][1].shape == (BATCH, 8)
    assert not np.array_equal(masks[4], _draws(jax.random.key(12))[0][4])
    assert not np.array_equal(masks[4].reshape(BATCH, -1)[:, :8], masks[6][1])  # apart
    assert no_masks(NET.layers) == [None] * 6 + [[None, None, None], None]


# ----------------------------------------------------------------------------------------------
# The MLP path, bit for bit the frozen backprop of before the engine


def _mlp_data(model, batch, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, model.sizes[0])).astype(np.float32)
    n = model.sizes[-1]
    if model.loss == "softmax_cross_entropy":
        return x, rng.integers(0, n, batch).astype(np.int32)
    if model.loss == "sigmoid_binary_cross_entropy":
        return x, rng.uniform(size=(batch, n)).astype(np.float32)
    return x, rng.standard_normal((batch, n)).astype(np.float32)


def _mlp_params(model, seed):
    """N(0, 1/fan_in) weights and N(0, 0.1²) biases, float32, drawn in NumPy."""
    rng = np.random.default_rng(seed)
    return [
        {
            "W": (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32),
            "b": (0.1 * rng.standard_normal(o)).astype(np.float32),
        }
        for i, o in zip(model.sizes[:-1], model.sizes[1:], strict=True)
    ]


MLPS = [
    fnbp.MLP((64, 128, 128, 10), "relu", "softmax_cross_entropy"),
    fnbp.MLP((20, 32, 16, 5), "tanh", "mse", "sigmoid"),
    fnbp.MLP((20, 32, 24, 6), "gelu", "sigmoid_binary_cross_entropy"),
    fnbp.MLP((784, 16, 16, 10), "sigmoid", "mse", "softplus"),
]


@pytest.mark.parametrize("model", MLPS, ids=[f"{m.activation}-{m.loss}" for m in MLPS])
def test_mlp_backprop_is_bitwise_the_frozen_old_backprop(model):
    params = _mlp_params(model, seed=3)
    x, y = _mlp_data(model, 32, seed=4)
    # float32 and bfloat16 mixed precision, one with λ = 0 (the literal-0 path), one with λ > 0
    cases = ((None, 0.0), (jnp.bfloat16, 1e-3))
    # one jit boundary: both compile into one program, where equal computations are equal
    # bit for bit (compiled apart, fusion choices alone move float32 results by ~3e-8)
    both = jax.jit(
        lambda p, x, y: [
            (
                old_backprop(p, model, x, y, l2, dtype),
                backprop_module._backprop(p, model, x, y, l2, dtype),
            )
            for dtype, l2 in cases
        ]
    )
    for (dtype, _), (old, new) in zip(cases, both(params, x, y), strict=True):
        assert new.state is None
        chex.assert_trees_all_equal(tuple(old), tuple(new[:5]), custom_message=f"compute {dtype}")
        chex.assert_trees_all_equal_shapes_and_dtypes(new.grads, params)
