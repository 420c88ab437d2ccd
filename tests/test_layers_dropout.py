"""Tests of fnbp/layers/dropout.py: masks from an explicit key, the keep fraction, the identity
in eval mode and at rate 0, and a rule that uses the stored mask (rebuilding it from the
output's zeros, as BackPACK does, is wrong wherever an input is exactly 0)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import assert_rel_close, layer_rule, vjp_rule

from fnbp.layers import Dropout


def test_the_same_key_gives_the_same_mask_and_another_key_another():
    layer = Dropout(0.4)
    m1 = layer.draw_mask(jax.random.key(7), (5, 3), 4)
    m2 = layer.draw_mask(jax.random.key(7), (5, 3), 4)
    m3 = layer.draw_mask(jax.random.key(8), (5, 3), 4)
    assert m1.shape == (4, 5, 3) and m1.dtype == jnp.bool_
    chex.assert_trees_all_equal(m1, m2)
    assert not np.array_equal(m1, m3)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_the_mean_keep_fraction_is_one_minus_rate_within_binomial_noise(rate):
    n = 200 * 1000
    mask = Dropout(rate).draw_mask(jax.random.key(3), (1000,), 200)
    q = 1 - rate
    sd = np.sqrt(q * (1 - q) / n)  # binomial standard error of the kept fraction
    kept = float(np.mean(mask))
    assert abs(kept - q) < 5 * sd, f"kept {kept:.4f}, expected {q} ± {5 * sd:.4f}"


def test_kept_entries_are_scaled_by_one_over_q_and_dropped_ones_are_zero(x64):
    layer = Dropout(0.25)
    x = np.random.default_rng(0).standard_normal((6, 10))
    mask = layer.draw_mask(jax.random.key(1), (10,), 6)
    z = np.asarray(layer.forward({}, {}, x, mask, True)[0])
    m = np.asarray(mask)
    np.testing.assert_array_equal(z[~m], 0.0)
    np.testing.assert_allclose(z[m], x[m] / 0.75, rtol=1e-15)  # one division: exact to 1 ulp


@pytest.mark.parametrize(
    "layer, mask, train",
    [(Dropout(0.3), None, False), (Dropout(0.0), None, True)],
    ids=["eval", "rate-0"],
)
def test_eval_mode_and_rate_zero_are_the_identity_bit_for_bit(layer, mask, train):
    if train:  # rate 0 draws no mask at all
        assert layer.draw_mask(jax.random.key(0), (4,), 3) is None
    x = jax.random.normal(jax.random.key(1), (3, 4))
    delta = jax.random.normal(jax.random.key(2), (3, 4))
    z, _, grads, back, _ = layer_rule(layer, {}, {}, x, mask, train, delta)
    chex.assert_trees_all_equal((z, grads, back), (x, {}, delta))


@pytest.mark.parametrize("shape", [(6, 10), (2, 5, 3), (2, 4, 3, 2)])
def test_rule_equals_jax_vjp_with_the_stored_mask(shape, x64):
    layer = Dropout(0.35)
    x = np.random.default_rng(1).standard_normal(shape)
    delta = np.random.default_rng(2).standard_normal(shape)
    mask = layer.draw_mask(jax.random.key(4), shape[1:], shape[0])
    _, _, grads, back, _ = layer_rule(layer, {}, {}, x, mask, True, delta)
    g_ref, back_ref = vjp_rule(layer, {}, {}, x, mask, True, delta)
    assert_rel_close((grads, back), (g_ref, back_ref), 1e-15)  # one multiply each: exact


def test_the_stored_mask_is_used_where_an_input_is_exactly_zero(x64):
    # a ReLU before dropout makes exact zeros common; where a kept entry's input is 0 the output
    # is 0 too, so a mask rebuilt from the output's zeros (BackPACK's way) drops its gradient
    layer = Dropout(0.5)
    x = np.maximum(np.random.default_rng(3).standard_normal((8, 12)), 0.0)
    delta = np.random.default_rng(4).standard_normal((8, 12))
    mask = layer.draw_mask(jax.random.key(5), (12,), 8)
    z, _, _, back, _ = layer_rule(layer, {}, {}, x, mask, True, delta)
    back_ref = vjp_rule(layer, {}, {}, x, mask, True, delta)[1]
    np.testing.assert_array_equal(back, back_ref)
    kept_zeros = np.asarray(mask) & (x == 0)
    assert kept_zeros.sum() >= 5  # the case the trap needs is there
    rebuilt = np.where(np.asarray(z) != 0, delta / 0.5, 0.0)  # BackPACK: mask = (z ≠ 0)
    assert np.all(rebuilt[kept_zeros] == 0) and np.all(back_ref[kept_zeros] != 0)
    np.testing.assert_array_equal(np.asarray(back)[kept_zeros], delta[kept_zeros] / 0.5)
