"""Tests of fnbp/layers/dropout.py: masks from an explicit key, the keep fraction, the identity
in eval mode and at rate 0, and a rule that uses the stored mask (rebuilding it from the
output's zeros, as BackPACK does, is wrong wherever an input is exactly 0)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import assert_rel_close, layer_rule

from fnbp.layers import Dropout


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _draw(layer, key, in_shape, batch):
    return layer.draw_mask(key, in_shape, batch)


def test_the_same_key_gives_the_same_mask_and_another_key_another():
    layer = Dropout(0.4)
    m1 = _draw(layer, jax.random.key(7), (5, 3), 4)
    m2 = _draw(layer, jax.random.key(7), (5, 3), 4)
    m3 = _draw(layer, jax.random.key(8), (5, 3), 4)
    assert m1.shape == (4, 5, 3) and m1.dtype == jnp.bool_
    chex.assert_trees_all_equal(m1, m2)
    assert not np.array_equal(m1, m3)


@pytest.mark.parametrize("rate", [0.1, 0.7])
def test_the_mean_keep_fraction_is_one_minus_rate_within_binomial_noise(rate):
    n = 200 * 1000
    mask = _draw(Dropout(rate), jax.random.key(3), (1000,), 200)
    q = 1 - rate
    sd = np.sqrt(q * (1 - q) / n)  # binomial standard error of the kept fraction
    kept = float(np.mean(mask))
    assert abs(kept - q) < 5 * sd, f"kept {kept:.4f}, expected {q} ± {5 * sd:.4f}"


def test_kept_entries_are_scaled_by_one_over_q_and_dropped_ones_are_zero(x64):
    rng = np.random.default_rng(0)
    x, delta = rng.standard_normal((2, 6, 10))
    m = rng.random((6, 10)) < 0.65
    z = np.asarray(layer_rule(Dropout(0.35), {}, {}, x, m, True, delta).z)
    np.testing.assert_array_equal(z[~m], 0.0)
    np.testing.assert_allclose(z[m], x[m] / 0.65, rtol=1e-15)  # one division: exact to 1 ulp


@pytest.mark.parametrize(
    "layer, mask, train",
    [(Dropout(0.3), None, False), (Dropout(0.0), None, True)],
    ids=["eval", "rate-0"],
)
def test_eval_mode_and_rate_zero_are_the_identity_bit_for_bit(layer, mask, train):
    if train:  # rate 0 draws no mask at all
        assert layer.draw_mask(jax.random.key(0), (4,), 3) is None  # (draws nothing: no compile)
    x, delta = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    r = layer_rule(layer, {}, {}, x, mask, train, delta)
    chex.assert_trees_all_equal((r.z, r.grads, r.back), (x, {}, delta))


@pytest.mark.parametrize("shape", [(6, 10), (2, 5, 3), (2, 4, 3, 2)])
def test_rule_equals_jax_vjp_with_the_stored_mask(shape, x64):
    rng = np.random.default_rng(1)
    x, delta = rng.standard_normal((2, *shape))
    mask = rng.random(shape) < 0.65  # any stored mask: the rule must use this one
    r = layer_rule(Dropout(0.35), {}, {}, x, mask, True, delta)
    assert_rel_close((r.grads, r.back), (r.vjp_grads, r.vjp_back), 1e-15)  # one multiply: exact


def test_the_stored_mask_is_used_where_an_input_is_exactly_zero(x64):
    # a ReLU before dropout makes exact zeros common; where a kept entry's input is 0 the output
    # is 0 too, so a mask rebuilt from the output's zeros (BackPACK's way) drops its gradient
    rng = np.random.default_rng(3)
    x = np.maximum(rng.standard_normal((8, 12)), 0.0)
    delta = rng.standard_normal((8, 12))
    mask = rng.random((8, 12)) < 0.5
    r = layer_rule(Dropout(0.5), {}, {}, x, mask, True, delta)
    np.testing.assert_array_equal(r.back, r.vjp_back)
    kept_zeros = mask & (x == 0)
    assert kept_zeros.sum() >= 5  # the case the trap needs is there
    rebuilt = np.where(np.asarray(r.z) != 0, delta / 0.5, 0.0)  # BackPACK: mask = (z ≠ 0)
    assert np.all(rebuilt[kept_zeros] == 0) and np.all(r.vjp_back[kept_zeros] != 0)
    np.testing.assert_array_equal(np.asarray(r.back)[kept_zeros], delta[kept_zeros] / 0.5)
