"""Tests of fnbp/activations.py: each (f, f′) pair against jax.grad, closed forms and NumPy."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special

from fnbp.activations import ACTIVATIONS, LEAKY_RELU_SLOPE, get_activation

NAMES = sorted(ACTIVATIONS)

# 0 exactly (the ReLU kink), just either side of it, the bulk, and saturation.
GRID = [0.0, 1e-8, -1e-8, 0.5, -0.5, 3.0, -3.0, 30.0, -30.0]


def _np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# Independent float64 references, written from the textbook definitions.
REFERENCE_F = {
    "relu": lambda z: np.maximum(z, 0.0),
    "leaky_relu": lambda z: np.where(z >= 0, z, 0.01 * z),
    "tanh": np.tanh,
    "sigmoid": _np_sigmoid,
    "gelu": lambda z: z * special.ndtr(z),  # exact GELU: z·Φ(z), Φ the standard normal CDF
    "softplus": lambda z: np.log1p(np.exp(z)),
    "silu": lambda z: z * _np_sigmoid(z),
    "identity": lambda z: z,
}


def test_reference_table_covers_every_activation():
    assert sorted(REFERENCE_F) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_df_equals_jax_grad_of_f_on_a_grid_including_the_kink(name, x64):
    act = ACTIVATIONS[name]
    z = jnp.array(GRID, jnp.float64)
    expected = jax.vmap(jax.grad(act.f))(z)
    # float64: both sides are a few correctly rounded operations on values ≤ 1 in size; 1e-12
    # is far below any wrong slope, and covers a(1 − a) cancelling near sigmoid saturation.
    chex.assert_trees_all_close(act.df(z, act.f(z)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_df_equals_jax_grad_of_f_at_random_points(name, x64):
    act = ACTIVATIONS[name]
    z = 4.0 * jax.random.normal(jax.random.key(0), (257,), jnp.float64)
    expected = jax.vmap(jax.grad(act.f))(z)
    chex.assert_trees_all_close(act.df(z, act.f(z)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("name", "slope_at_zero"), [("relu", 0.0), ("leaky_relu", 1.0)])
def test_kink_derivative_follows_the_jax_grad_convention(name, slope_at_zero, x64):
    act = ACTIVATIONS[name]
    zero = jnp.zeros((1,), jnp.float64)
    assert float(act.df(zero, act.f(zero))[0]) == slope_at_zero
    # The convention is jax's own: jax.nn's versions of the same functions agree.
    reference = {"relu": jax.nn.relu, "leaky_relu": jax.nn.leaky_relu}[name]
    assert float(jax.grad(reference)(0.0)) == slope_at_zero


@pytest.mark.parametrize("name", NAMES)
def test_f_matches_an_independent_formula(name, x64):
    z64 = np.array(GRID + list(np.linspace(-6.0, 6.0, 49)), np.float64)
    got = ACTIVATIONS[name].f(jnp.asarray(z64))
    assert got.dtype == jnp.float64
    # float64 closed forms; atol absorbs gelu's far tail (z·Φ(z) ≈ −1e−196 at z = −30, which
    # 1 + erf(z/√2) rounds to 0).
    chex.assert_trees_all_close(got, REFERENCE_F[name](z64), rtol=1e-12, atol=1e-15)


def test_leaky_relu_negative_slope_is_one_hundredth():
    assert LEAKY_RELU_SLOPE == 0.01
    act = ACTIVATIONS["leaky_relu"]
    z = jnp.array([-2.0, -1.0, 4.0])
    np.testing.assert_allclose(np.asarray(act.f(z)), [-0.02, -0.01, 4.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(act.df(z, act.f(z))), [0.01, 0.01, 1.0], rtol=1e-6)


def test_gelu_is_exact_not_the_tanh_approximation(x64):
    # At z = 1 the two differ by ~1.6e-4: exact 0.8413447460685429 = Φ(1).
    got = float(ACTIVATIONS["gelu"].f(jnp.array(1.0, jnp.float64)))
    assert got == pytest.approx(0.5 * (1 + math.erf(1 / math.sqrt(2))), rel=1e-14)
    assert abs(got - float(jax.nn.gelu(1.0, approximate=True))) > 1e-4


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_f_and_df_are_finite_at_large_inputs(name, dtype, x64):
    act = ACTIVATIONS[name]
    z = jnp.array([-1e4, 1e4], dtype)
    a = act.f(z)
    chex.assert_tree_all_finite((a, act.df(z, a)))


# f′ from jax.grad of f, jitted once per activation (each dtype compiles once).
_JAX_DF = {name: jax.jit(jax.vmap(jax.grad(act.f))) for name, act in ACTIVATIONS.items()}


def _extreme_inputs(dtype):
    """Every kind of finite float, each sign: 0, the smallest subnormal, the smallest normal,
    1e-30, 1e4 (saturating), 1e30 and the largest finite number."""
    info = np.finfo(dtype)
    mags = [info.smallest_subnormal, info.tiny, 1e-30, 1.0, 1e4, 1e30, info.max]
    return np.array([0.0] + mags + [-m for m in mags], dtype)


@settings(max_examples=30)
@given(
    dtype=st.sampled_from(["float32", "float64"]),
    data=st.data(),
)
def test_df_is_finite_and_equals_jax_grad_for_every_finite_input(dtype, data):
    """From subnormals to the largest float: f and f′ never overflow into inf or 0·∞ = NaN, and
    f′ stays the slope jax.grad finds (sigmoid and tanh saturate to exactly 0, never NaN)."""
    width = np.finfo(dtype).bits
    drawn = data.draw(
        st.lists(
            st.floats(allow_nan=False, allow_infinity=False, width=width), min_size=9, max_size=9
        )
    )
    with jax.enable_x64(dtype == "float64"):
        z = jnp.asarray(np.concatenate([_extreme_inputs(dtype), np.array(drawn, dtype)]))
        for name in NAMES:
            act = ACTIVATIONS[name]
            a = act.f(z)
            df = act.df(z, a)
            chex.assert_tree_all_finite((a, df))
            # Every f′ here is at most 1.13 in size, computed in a handful of operations; jax's
            # own softplus′ = exp(z − softplus z) carries a further ~|z|·eps for |z| < 40 (the
            # largest seen: 4.5 eps in float32, 16 eps in float64). 64 eps is far below any
            # wrong slope (an O(1) error) and above these roundings.
            atol = 64 * float(np.finfo(dtype).eps)
            chex.assert_trees_all_close(df, _JAX_DF[name](z), rtol=0, atol=atol)


def test_region_is_given_exactly_for_the_piecewise_linear_activations():
    piecewise = {name for name, act in ACTIVATIONS.items() if act.region is not None}
    assert piecewise == {"relu", "leaky_relu"}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", ["relu", "leaky_relu"])
def test_region_changes_exactly_at_the_kink_and_groups_zero_with_its_slope(name, dtype, x64):
    act = ACTIVATIONS[name]
    # The smallest normal number: XLA on CPU flushes subnormals to zero.
    tiny = float(np.finfo(dtype).tiny)
    neg = jnp.array([-1e4, -1.0, -tiny], dtype)
    pos = jnp.array([tiny, 1.0, 1e4], dtype)
    zero = jnp.zeros((1,), dtype)
    r_neg, r_pos = act.region(neg), act.region(pos)
    assert len(set(np.asarray(r_neg).tolist())) == 1  # one piece on each side ...
    assert len(set(np.asarray(r_pos).tolist())) == 1
    assert bool(r_neg[0]) != bool(r_pos[0])  # ... and they differ across the kink
    # z = 0 lies on the piece whose slope df gives there, so a finite-difference step from 0
    # into that piece is linear.
    slope0 = float(act.df(zero, act.f(zero))[0])
    same_side = pos if bool(act.region(zero)[0]) == bool(r_pos[0]) else neg
    assert slope0 == float(act.df(same_side, act.f(same_side))[1])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_f_and_df_preserve_the_input_dtype(name, dtype):
    act = ACTIVATIONS[name]
    z = jnp.linspace(-3.0, 3.0, 7, dtype=dtype)
    a = act.f(z)
    assert a.dtype == dtype
    assert act.df(z, a).dtype == dtype


def test_get_activation_returns_the_table_entry():
    for name in NAMES:
        assert get_activation(name) is ACTIVATIONS[name]


@pytest.mark.parametrize("bad", ["swish", "ReLU", "", None, ["relu"]])
def test_unknown_activation_raises_value_error_listing_valid_names(bad):
    with pytest.raises(ValueError, match="unknown activation") as info:
        get_activation(bad)
    for name in NAMES:
        assert repr(name) in str(info.value)
