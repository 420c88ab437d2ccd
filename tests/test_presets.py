"""Tests of fnbp/presets.py: the nets ``--arch`` names have the layers, shapes and parameter
counts their docstrings promise (counted here by hand, not by the code under test)."""

import math

import chex
import jax
import jax.numpy as jnp
import pytest

import fnbp
from fnbp import presets
from fnbp.layers import BatchNorm, Conv, Dense, Dropout, LayerNorm, Residual


def test_mnist1d_cnn_has_the_papers_three_convs_and_5210_params():
    net = presets.mnist1d_cnn(40, 10)
    convs = [layer for layer in net.layers if isinstance(layer, Conv)]
    assert [(c.features, c.kernel_size, c.strides, c.padding) for c in convs] == [
        (25, (k,), (2,), ((1, 1),)) for k in (5, 3, 3)
    ]
    assert all(c.activation == "relu" for c in convs)
    # lengths ⌊(w + 2 − k)/2⌋ + 1: 40 → 19 → 10 → 5, so 5·25 = 125 features into Dense(10)
    assert [s[0] for s in net.in_shapes[:4]] == [40, 19, 10, 5]
    assert net.input_shape == (40, 1) and net.in_shapes[-1] == (125,)
    by_hand = (5 * 1 * 25 + 25) + 2 * (3 * 25 * 25 + 25) + (125 * 10 + 10)
    assert net.num_params == by_hand == 5210


def test_cnn_for_digits_reshapes_to_8x8_and_pools_twice():
    net = presets.cnn(64, 10)
    assert net.input_shape == (64,) and net.in_shapes[1] == (8, 8, 1)
    assert net.in_shapes[-2] == (128,)  # 2·2·32 after two 2×2 pools
    by_hand = (9 * 1 * 16 + 16) + (9 * 16 * 32 + 32) + (128 * 64 + 64) + (64 * 10 + 10)
    assert net.num_params == by_hand
    assert presets.cnn(784, 10).in_shapes[1] == (28, 28, 1)


@pytest.mark.parametrize("features", [40, 36, 100])
def test_cnn_refuses_inputs_that_are_not_square_images_of_a_side_divisible_by_4(features):
    with pytest.raises(ValueError, match=f"cnn: reshapes .* got {features}"):
        presets.cnn(features, 10)


@pytest.mark.parametrize("norm, kind", [("batch", BatchNorm), ("layer", LayerNorm)])
def test_resmlp_blocks_are_dense_norm_relu_dropout_dense_norm(norm, kind):
    net = presets.resmlp(20, 3, depth=5, width=7, norm=norm, dropout=0.25)
    first, *blocks, last = net.layers
    assert first == Dense(7) and last == Dense(3) and len(blocks) == 5
    for block in blocks:
        assert isinstance(block, Residual) and block.alpha == pytest.approx(1 / math.sqrt(5))
        d1, n1, drop, d2, n2 = block.branch
        assert (d1.features, d2.features) == (7, 7)
        assert isinstance(n1, kind) and n1.activation == "relu"
        assert isinstance(n2, kind) and n2.activation == "identity"
        assert drop == Dropout(0.25)
        assert d1.use_bias is d2.use_bias is (norm != "batch")  # BatchNorm cancels a bias


def test_resmlp_without_norm_and_a_given_alpha():
    net = presets.resmlp(4, 2, depth=2, width=3, alpha=0.0)
    assert net.layers[1] == Residual((Dense(3, "relu"), Dense(3)), alpha=0.0)
    assert not net.needs_state and not net.needs_train


def test_mlp_preset_without_dropout_in_eval_mode_computes_the_mlp():
    net = presets.mlp((6, 5, 4, 3), activation="tanh", dropout=0.5)
    mlp = fnbp.MLP((6, 5, 4, 3), "tanh")
    assert [type(layer) for layer in net.layers] == [Dense, Dropout, Dense, Dropout, Dense]
    params = fnbp.init_params(jax.random.key(0), mlp)
    net_params = [params[0], {}, params[1], {}, params[2]]
    x = jax.random.normal(jax.random.key(1), (7, 6))
    # eval mode: dropout is the identity, so the same float32 ops in the same order
    chex.assert_trees_all_close(
        fnbp.forward(net_params, net, x), fnbp.forward(params, mlp, x), rtol=0, atol=0
    )
    train = fnbp.loss(net_params, net, x, jnp.arange(7) % 3, train=True, key=jax.random.key(2))
    assert train != fnbp.loss(params, mlp, x, jnp.arange(7) % 3)  # train mode drops units
