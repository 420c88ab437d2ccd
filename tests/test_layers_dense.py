"""Tests of fnbp/layers/dense.py: the affine rule against NumPy and ``jax.vjp``, L2 on W only,
dtypes under mixed precision, the activation-only layer, and the MLP's init bit for bit the
frozen init of before the engine (``tests/oracles.py``)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import assert_rel_close, layer_rule, mixed_rule, old_init_params, random_params

import fnbp
from fnbp.layers import Activation, Dense

# (batch, fan_in, features): a row, a column, wide, narrow
SHAPES = [(1, 5, 3), (7, 1, 4), (9, 12, 2), (4, 3, 11)]
# float64: sums of ≤ 12 products in another order: 1e-12 is loose, far below a wrong term
RTOL = 1e-12


def _setup(shape, use_bias=True, seed=0, dtype=np.float64):
    batch, fan_in, features = shape
    layer = Dense(features, use_bias=use_bias)
    rng = np.random.default_rng(seed)
    p = random_params(layer, (fan_in,), rng, dtype)
    x = rng.standard_normal((batch, fan_in)).astype(dtype)
    delta = rng.standard_normal((batch, features)).astype(dtype)
    return layer, p, x, delta


@pytest.mark.parametrize(
    "shape, use_bias", [(s, True) for s in SHAPES] + [(SHAPES[2], False)], ids=str
)
def test_rule_equals_numpy_and_jax_vjp(shape, use_bias, x64):
    layer, p, x, delta = _setup(shape, use_bias)
    r = layer_rule(layer, p, {}, x, None, True, delta)
    want_z = x @ p["W"].T + (p["b"] if use_bias else 0)
    want = {"W": delta.T @ x, **({"b": delta.sum(0)} if use_bias else {})}  # Σₙ δxᵀ, Σₙ δ
    assert r.inner is None
    assert_rel_close(r.z, want_z, RTOL, "z")
    assert_rel_close(r.grads, want, RTOL, "grads")
    assert_rel_close(r.back, delta @ p["W"], RTOL, "back")  # Wᵀδ per row
    assert_rel_close((r.grads, r.back), (r.vjp_grads, r.vjp_back), RTOL, "vjp")


def test_l2_adds_lambda_w_to_w_only(x64):
    layer, p, x, delta = _setup(SHAPES[2], seed=1)
    r0 = layer_rule(layer, p, {}, x, None, True, delta, 0.0)
    r1 = layer_rule(layer, p, {}, x, None, True, delta, 0.3)  # λ traced: the same program
    assert_rel_close(r1.grads["W"], r0.grads["W"] + 0.3 * p["W"], 1e-14)
    chex.assert_trees_all_equal((r1.grads["b"], r1.back), (r0.grads["b"], r0.back))


def test_mixed_precision_grads_in_the_params_dtype_and_back_in_the_compute_dtype():
    # the engine hands the rule float32 master params beside bfloat16 activations and δ
    layer, p, x, delta = _setup((16, 24, 8), seed=2, dtype=np.float32)
    x16, d16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(delta, jnp.bfloat16)
    z, _, grads, back, _ = mixed_rule(layer, p, {}, x16, None, True, d16)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, jax.tree.map(jnp.asarray, p))
    assert z.dtype == back.dtype == jnp.bfloat16
    # float32 accumulation of the exact bfloat16 products: equal to float64 sums to ~1e-6
    xe, de = np.asarray(x16, np.float64), np.asarray(d16, np.float64)
    assert_rel_close(grads, {"W": de.T @ xe, "b": de.sum(0)}, 1e-5)


@pytest.mark.parametrize("name", ["relu", "tanh", "identity"])
def test_activation_layer_passes_its_input_and_delta_on_unchanged(name):
    layer = Activation(name)
    x, delta = np.random.default_rng(3).standard_normal((2, 4, 5)).astype(np.float32)
    r = layer_rule(layer, {}, {}, x, None, False, delta)
    chex.assert_trees_all_equal((r.z, r.grads, r.back), (x, {}, delta))  # f, f′ act outside


@pytest.mark.parametrize(
    "model, scheme, dtype",
    [
        (fnbp.MLP((64, 128, 128, 10)), "he_normal", jnp.float32),  # the defaults
        # biases drawn, and low-precision params drawn through float32
        (
            fnbp.MLP((12, 7, 3), "tanh"),
            fnbp.variance_scaling_scheme(1.0, bias_std=0.1),
            jnp.bfloat16,
        ),
    ],
    ids=["he-float32", "bias-std-bf16"],
)
def test_mlp_init_params_is_bitwise_the_frozen_old_init(model, scheme, dtype):
    net = fnbp.Net(model.sizes[0], list(model.layers), model.loss)  # the same Dense layers
    draws = jax.jit(  # one compile for the three draws (eager, each op would compile apart)
        lambda key: (
            fnbp.init_params(key, model, scheme, dtype=dtype),
            old_init_params(key, model, scheme, dtype=dtype),
            fnbp.init_params(key, net, scheme, dtype=dtype),
        )
    )
    new, old, from_net = draws(jax.random.key(5))
    chex.assert_trees_all_equal(new, old)
    chex.assert_trees_all_equal(from_net, new)
    chex.assert_trees_all_equal_shapes_and_dtypes(new, old)
