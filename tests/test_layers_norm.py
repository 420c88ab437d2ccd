"""Tests of fnbp/layers/norm.py: BatchNorm (train and eval rules, the running-statistics update
with the biased variance, statistics over batch and space, float32 statistics under bfloat16)
and LayerNorm (γ inside the means), with random γ, β and running statistics throughout: at
γ = 1, β = 0 the BN-shaped LayerNorm formula is exact and a wrong rule would pass."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import assert_rel_close, layer_rule, mixed_rule, np_batch_norm_train

from fnbp.layers import BatchNorm, LayerNorm

# float64: both sides round at ~1e-16 per operation over sums of ≤ 48 terms; 1e-12 is still ten
# orders below the 47% error of a misplaced γ.
RTOL = 1e-12
SHAPES = [(8, 5), (3, 5, 4), (4, 3, 3, 2)]  # dense, after a 1-D conv, after a 2-D conv
IDS = ["2d", "3d", "4d"]


def _data(shape, seed, dtype=np.float64, gamma=None):
    """x with a per-channel offset and scale (so the statistics matter), random γ, β, running
    mean and var, and δ."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 3, c) + rng.standard_normal(c)).astype(dtype)
    p = {
        "gamma": (rng.standard_normal(c) if gamma is None else np.full(c, gamma)).astype(dtype),
        "beta": rng.standard_normal(c).astype(dtype),
    }
    s = {
        "mean": rng.standard_normal(c).astype(np.float32),
        "var": rng.uniform(0.5, 2, c).astype(np.float32),
    }
    return x, p, s, rng.standard_normal(shape).astype(dtype)


# ----------------------------------------------------------------------------------------------
# BatchNorm


# one configuration for most tests (each (layer, shape, mode) compiles once and is shared)
BN = BatchNorm(momentum=0.8, eps=1e-3)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_batch_norm_rule_equals_jax_vjp(shape, train, x64):
    x, p, s, delta = _data(shape, seed=0)
    r = layer_rule(BN, p, s, x, None, train, delta)
    assert r.inner is None
    assert_rel_close((r.grads, r.back), (r.vjp_grads, r.vjp_back), RTOL)


@pytest.mark.parametrize(
    "shape, layer", [*((s, BN) for s in SHAPES), (SHAPES[2], BatchNorm(momentum=0.3, eps=1e-3))]
)
def test_batch_norm_train_output_and_new_state_equal_numpy_with_the_biased_variance(
    shape, layer, x64
):
    x, p, s, delta = _data(shape, seed=1)
    r = layer_rule(layer, p, s, x, None, True, delta)
    m = layer.momentum
    z_np, mean_np, var_np = np_batch_norm_train(
        x, p["gamma"], p["beta"], s["mean"].astype(np.float64), s["var"].astype(np.float64),
        m, layer.eps,
    )  # fmt: skip
    assert_rel_close(r.z, z_np, RTOL, "z")
    # the state stays float32 (as initialised): agreement to float32 rounding
    assert r.state["mean"].dtype == r.state["var"].dtype == jnp.float32
    assert_rel_close(r.state, {"mean": mean_np, "var": var_np}, 1e-6, "state")
    # the unbiased variance m/(m − 1)·σ² (PyTorch's running var) would miss by far more
    axes = tuple(range(len(shape) - 1))
    var_unbiased = m * s["var"] + (1 - m) * x.var(axis=axes, ddof=1)
    assert np.max(np.abs(var_unbiased - var_np)) > 1e3 * 1e-6 * np.max(np.abs(var_np))


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_batch_norm_eval_uses_running_statistics_and_keeps_the_state(shape, x64):
    x, p, s, delta = _data(shape, seed=2)
    r = layer_rule(BN, p, s, x, None, False, delta)
    mean, var = s["mean"].astype(np.float64), s["var"].astype(np.float64)
    xhat = (x - mean) / np.sqrt(var + BN.eps)
    assert_rel_close(r.z, p["gamma"] * xhat + p["beta"], RTOL, "z")
    chex.assert_trees_all_equal(r.state, s)
    # eval: the statistics are constants, back = γ r δ (no mean-subtraction terms)
    assert_rel_close(r.back, p["gamma"] / np.sqrt(var + BN.eps) * delta, RTOL, "back")
    axes = tuple(range(len(shape) - 1))
    want = {"gamma": (delta * xhat).sum(axis=axes), "beta": delta.sum(axis=axes)}
    assert_rel_close(r.grads, want, RTOL, "grads")


def test_batch_norm_train_back_sums_to_zero_per_channel_over_batch_and_space_only(x64):
    # back = γr(δ − mean δ − x̂ mean(δ x̂)) sums to 0 over exactly the axes the statistics run
    # over (batch and space for a 4-D input), for any δ: the output is shift-invariant there
    x, p, s, delta = _data(SHAPES[2], seed=3)
    back = np.asarray(layer_rule(BN, p, s, x, None, True, delta).back)
    axes = (0, 1, 2)
    np.testing.assert_array_less(np.abs(back.sum(axes)), 1e-12 * np.abs(back).sum(axes))
    # statistics per spatial position (over the batch only) would also pass the line above,
    # but would make every position's own sum 0: here they are not
    assert np.all(np.abs(back[:, 0].sum(axis=(0, 1))) > 1e-3)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=["2d", "4d"])
def test_batch_norm_under_bfloat16_keeps_float32_statistics_and_grads(shape):
    x, p, s, delta = _data(shape, seed=4, dtype=np.float32)
    x16, d16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(delta, jnp.bfloat16)
    z, new, grads, back, (xhat, r) = mixed_rule(BN, p, s, x16, None, True, d16)
    assert z.dtype == back.dtype == jnp.bfloat16
    assert xhat.dtype == r.dtype == new["mean"].dtype == new["var"].dtype == jnp.float32
    # the statistics of the bfloat16 values, computed in float32 (not rounded to bfloat16,
    # which would be off by up to 2⁻⁸ ≈ 4e-3)
    _, mean_np, var_np = np_batch_norm_train(
        np.asarray(x16, np.float64), 1.0, 0.0, s["mean"].astype(np.float64),
        s["var"].astype(np.float64), BN.momentum, BN.eps,
    )  # fmt: skip
    assert_rel_close(new, {"mean": mean_np, "var": var_np}, 1e-6, "state")
    # the rule gets the float32 master params beside bfloat16 δ: float32 grads
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, jax.tree.map(jnp.asarray, p))


# ----------------------------------------------------------------------------------------------
# LayerNorm

LN_SHAPES = [(6, 7), (3, 4, 6), (2, 3, 2, 5)]


def _bn_shaped_layer_norm_back(x, gamma, delta, eps):
    """The WRONG rule: BatchNorm's formula over the features, γ outside the means,
    γ r (δ − mean δ − x̂ mean(δ ⊙ x̂)). Exact only where γ is constant."""
    mu = x.mean(axis=-1, keepdims=True)
    r = 1 / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + eps)
    xhat = (x - mu) * r
    inner = delta - delta.mean(-1, keepdims=True) - xhat * (delta * xhat).mean(-1, keepdims=True)
    return gamma * r * inner


LN = LayerNorm(eps=1e-3)
# its output does not depend on the mode: eval once, beside train for every shape
LN_MODES = [(s, True) for s in LN_SHAPES] + [(LN_SHAPES[1], False)]


@pytest.mark.parametrize("shape, train", LN_MODES, ids=[*IDS, "3d-eval"])
def test_layer_norm_rule_equals_jax_vjp_with_random_gamma(shape, train, x64):
    x, p, _, delta = _data(shape, seed=5)
    r = layer_rule(LN, p, {}, x, None, train, delta)
    assert (r.state, r.inner) == ({}, None)
    assert_rel_close((r.grads, r.back), (r.vjp_grads, r.vjp_back), RTOL)


def test_the_bn_shaped_layer_norm_formula_fails_for_random_gamma_but_passes_at_gamma_one(x64):
    # the trap: a test at init (γ = 1) cannot tell the right rule from the wrong one
    for gamma, wrong_passes in ((1.0, True), (None, False)):
        x, p, _, delta = _data(LN_SHAPES[0], seed=6, gamma=gamma)
        r = layer_rule(LN, p, {}, x, None, True, delta)
        wrong = _bn_shaped_layer_norm_back(x, p["gamma"], delta, LN.eps)
        err = np.max(np.abs(wrong - r.vjp_back)) / np.max(np.abs(r.vjp_back))
        assert (err <= RTOL) == wrong_passes, f"γ = {gamma}: BN-shaped formula off by {err:.2g}"
        if not wrong_passes:
            assert err > 0.05  # not a rounding matter: tens of percent
        assert_rel_close(r.back, r.vjp_back, RTOL)  # while fnbp's rule passes at both


@pytest.mark.parametrize("shape", LN_SHAPES, ids=IDS)
def test_layer_norm_output_equals_numpy_per_example_over_the_last_axis(shape, x64):
    x, p, _, delta = _data(shape, seed=7)
    z = layer_rule(LN, p, {}, x, None, True, delta).z
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)  # biased
    assert_rel_close(z, p["gamma"] * (x - mu) / np.sqrt(var + LN.eps) + p["beta"], RTOL)


def test_layer_norm_under_bfloat16_keeps_float32_statistics_and_grads():
    x, p, _, delta = _data((4, 3, 6), seed=8, dtype=np.float32)
    x16, d16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(delta, jnp.bfloat16)
    z, _, grads, back, (xhat, r) = mixed_rule(LN, p, {}, x16, None, False, d16)
    assert z.dtype == back.dtype == jnp.bfloat16 and xhat.dtype == r.dtype == jnp.float32
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, jax.tree.map(jnp.asarray, p))
