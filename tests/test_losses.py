"""Tests of fnbp/losses.py: values against optax and closed forms, δ against jax.grad."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fnbp.activations import ACTIVATIONS
from fnbp.losses import LOSSES, get_loss, to_targets

SOFTMAX = LOSSES["softmax_cross_entropy"]
MSE = LOSSES["mse"]
BCE = LOSSES["sigmoid_binary_cross_entropy"]

# float64: value and δ are a handful of operations on numbers of size ~1; 1e-12 is many orders
# below any wrong formula (a missing factor, a dropped term) and above rounding.
RTOL64, ATOL64 = 1e-12, 1e-12


def _logits(seed, shape=(6, 4)):
    return 3.0 * jax.random.normal(jax.random.key(seed), shape, jnp.float64)


def _integer_labels(seed, batch=6, classes=4):
    return jax.random.randint(jax.random.key(seed), (batch,), 0, classes)


# ----------------------------------------------------------------------------------------------
# Values against independent implementations.


def test_softmax_ce_value_matches_optax_for_one_hot_and_integer_labels(x64):
    z, labels = _logits(0), _integer_labels(1)
    t = jax.nn.one_hot(labels, 4, dtype=jnp.float64)
    got = SOFTMAX.value(z, z, t)
    assert got.shape == (6,)
    chex.assert_trees_all_close(got, optax.softmax_cross_entropy(z, t), rtol=RTOL64, atol=ATOL64)
    chex.assert_trees_all_close(
        got,
        optax.softmax_cross_entropy_with_integer_labels(z, labels),
        rtol=RTOL64,
        atol=ATOL64,
    )


def test_softmax_ce_value_matches_optax_for_probability_and_unnormalised_targets(x64):
    z = _logits(0)
    probs = jax.nn.softmax(_logits(2), axis=-1)
    weights = jax.random.uniform(jax.random.key(3), (6, 4), jnp.float64, 0.0, 2.0)  # Σt ≠ 1
    for t in (probs, weights):
        chex.assert_trees_all_close(
            SOFTMAX.value(z, z, t), optax.softmax_cross_entropy(z, t), rtol=RTOL64, atol=ATOL64
        )


def test_bce_value_matches_optax_summed_over_outputs(x64):
    z = _logits(0)
    t = jax.random.uniform(jax.random.key(1), (6, 4), jnp.float64)
    expected = jnp.sum(optax.sigmoid_binary_cross_entropy(z, t), axis=-1)
    chex.assert_trees_all_close(BCE.value(z, z, t), expected, rtol=RTOL64, atol=ATOL64)


def test_mse_value_is_half_the_summed_squared_error(x64):
    a = np.asarray(_logits(0))
    t = np.asarray(_logits(1))
    expected = 0.5 * ((a - t) ** 2).sum(axis=1)
    got = MSE.value(jnp.asarray(a), jnp.asarray(a), jnp.asarray(t))
    chex.assert_trees_all_close(got, expected, rtol=RTOL64, atol=ATOL64)
    # Not PyTorch's MSELoss, which averages over outputs and drops the ½.
    assert not np.allclose(np.asarray(got), ((a - t) ** 2).mean(axis=1))


def test_mse_value_uses_the_output_activation_not_the_logits(x64):
    z = _logits(0)
    a = jax.nn.sigmoid(z)
    t = jnp.full((6, 4), 0.25, jnp.float64)
    expected = 0.5 * jnp.sum((a - t) ** 2, axis=-1)
    chex.assert_trees_all_close(MSE.value(z, a, t), expected, rtol=RTOL64, atol=ATOL64)


# ----------------------------------------------------------------------------------------------
# δ⁽ᴸ⁾ = ∂ℓ/∂z against jax.grad.


def _grad_of_value(loss, g, z, t):
    """∂ℓ/∂z for each example, through a = g(z), by jax.grad."""
    return jax.vmap(jax.grad(lambda zi, ti: loss.value(zi[None], g(zi)[None], ti[None])[0]))(z, t)


_TARGETS = {
    "softmax_cross_entropy": lambda: jax.nn.one_hot(_integer_labels(1), 4, dtype=jnp.float64),
    "sigmoid_binary_cross_entropy": lambda: jax.random.uniform(
        jax.random.key(1), (6, 4), jnp.float64
    ),
    "mse": lambda: _logits(1),
}


@pytest.mark.parametrize(
    ("name", "output"),
    [
        ("softmax_cross_entropy", "identity"),
        ("sigmoid_binary_cross_entropy", "identity"),
        ("mse", "identity"),
        ("mse", "sigmoid"),
        ("mse", "tanh"),
        ("mse", "softplus"),
    ],
)
def test_delta_equals_jax_grad_of_the_per_example_value(name, output, x64):
    loss, g = LOSSES[name], ACTIVATIONS[output]
    z, t = _logits(0), _TARGETS[name]()
    a = g.f(z)
    expected = _grad_of_value(loss, g.f, z, t)
    chex.assert_trees_all_close(loss.delta(z, a, t, g.df(z, a)), expected, rtol=RTOL64, atol=ATOL64)


def test_softmax_delta_is_p_minus_t_for_one_hot_targets(x64):
    z = _logits(0)
    t = jax.nn.one_hot(_integer_labels(1), 4, dtype=jnp.float64)
    p = np.exp(np.asarray(z))
    p /= p.sum(axis=1, keepdims=True)
    got = SOFTMAX.delta(z, z, t, jnp.ones_like(z))
    chex.assert_trees_all_close(got, p - np.asarray(t), rtol=RTOL64, atol=ATOL64)


def test_softmax_delta_is_exact_for_unnormalised_targets(x64):
    z = _logits(0)
    t = jax.random.uniform(jax.random.key(3), (6, 4), jnp.float64, 0.0, 2.0)
    p = np.exp(np.asarray(z))
    p /= p.sum(axis=1, keepdims=True)
    tn = np.asarray(t)
    expected = p * tn.sum(axis=1, keepdims=True) - tn  # p·Σt − t
    got = SOFTMAX.delta(z, z, t, jnp.ones_like(z))
    chex.assert_trees_all_close(got, expected, rtol=RTOL64, atol=ATOL64)
    assert not np.allclose(np.asarray(got), p - tn)  # the plain p − t would be wrong here
    # and it is the gradient of the value (optax's −Σ t log p) for these targets too
    chex.assert_trees_all_close(
        got, _grad_of_value(SOFTMAX, lambda v: v, z, t), rtol=RTOL64, atol=ATOL64
    )


# ----------------------------------------------------------------------------------------------
# Numerical stability at extreme logits (float32).


def test_softmax_ce_is_exact_and_finite_at_logits_of_1e4():
    z = jnp.array([[1e4, 0.0], [1e4, 0.0], [-1e4, 1e4]], jnp.float32)
    t = jnp.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], jnp.float32)
    value = SOFTMAX.value(z, z, t)
    delta = SOFTMAX.delta(z, z, t, jnp.ones_like(z))
    chex.assert_tree_all_finite((value, delta))
    # Exact answers: −log p is 1e4, 0 and 2e4 (e^(−1e4) vanishes even in float64).
    np.testing.assert_array_equal(np.asarray(value), [1e4, 0.0, 2e4])
    np.testing.assert_array_equal(np.asarray(delta), [[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0]])


def test_bce_is_exact_and_finite_at_logits_of_1e4():
    z = jnp.array([[1e4, -1e4, 1e4, -1e4]], jnp.float32)
    t = jnp.array([[0.0, 1.0, 1.0, 0.0]], jnp.float32)
    value = BCE.value(z, z, t)
    delta = BCE.delta(z, z, t, jnp.ones_like(z))
    chex.assert_tree_all_finite((value, delta))
    # Two confidently wrong outputs cost 1e4 each; two confidently right ones cost 0.
    np.testing.assert_array_equal(np.asarray(value), [2e4])
    np.testing.assert_array_equal(np.asarray(delta), [[1.0, -1.0, 0.0, 0.0]])


def test_mse_with_sigmoid_output_is_finite_at_logits_of_1e4():
    g = ACTIVATIONS["sigmoid"]
    z = jnp.array([[1e4, -1e4]], jnp.float32)
    a = g.f(z)
    t = jnp.array([[0.0, 1.0]], jnp.float32)
    value = MSE.value(z, a, t)
    delta = MSE.delta(z, a, t, g.df(z, a))
    chex.assert_tree_all_finite((value, delta))
    np.testing.assert_array_equal(np.asarray(value), [1.0])  # ½(1² + 1²)
    np.testing.assert_array_equal(np.asarray(delta), [[0.0, 0.0]])  # saturated: σ′ = 0


# Hypothesis: random logits at every scale up to far beyond ±1e4.


def _identity(v):
    return v


@functools.partial(jax.jit, static_argnums=0)
def _value_delta_and_jax_delta(name, z, t):
    """(ℓ, δ, jax.grad of ℓ), jitted: each shape compiles once."""
    loss = LOSSES[name]
    delta = loss.delta(z, z, t, jnp.ones_like(z))
    return loss.value(z, z, t), delta, _grad_of_value(loss, _identity, z, t)


def _reference_value_and_delta(name, z, t):
    """ℓ and δ in extended precision (NumPy long double), from the stable closed forms."""
    z, t = np.asarray(z, np.longdouble), np.asarray(t, np.longdouble)
    if name == "softmax_cross_entropy":
        m = z.max(axis=-1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=-1))
        p = np.exp(z - lse[:, None])
        return t.sum(-1) * lse - (t * z).sum(-1), p * t.sum(-1, keepdims=True) - t
    softplus = np.logaddexp(z, 0)  # log(1 + e^z) without overflow
    sigmoid = np.exp(-np.logaddexp(-z, 0))  # 1/(1 + e^(−z)) without overflow
    return (softplus - t * z).sum(-1), sigmoid - t


@st.composite
def _logits_and_targets(draw, name):
    dtype = draw(st.sampled_from(["float32", "float64"]))
    batch, outputs = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2, 4]))
    # ~±1e4 is the scale the naive forms die at (e^(1e4) overflows, log p = log 0); the larger
    # scales come close to the dtype's range, where the loss (≈ the largest logit) still fits.
    scale = draw(st.sampled_from([1.0, 1e4, 1e8, 1e30] + ([1e300] if dtype == "float64" else [])))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    z = scale * rng.standard_normal((batch, outputs))
    if name == "softmax_cross_entropy":
        if draw(st.booleans()):
            t = np.eye(outputs)[rng.integers(0, outputs, batch)]  # one-hot
        else:
            t = rng.dirichlet(np.ones(outputs), batch)  # probability rows
    elif draw(st.booleans()):
        t = rng.uniform(size=z.shape)
    else:
        t = rng.integers(0, 2, z.shape)
    return dtype, z.astype(dtype), t.astype(dtype)


@pytest.mark.parametrize("name", ["softmax_cross_entropy", "sigmoid_binary_cross_entropy"])
@settings(max_examples=25)
@given(data=st.data())
def test_cross_entropy_value_and_delta_are_finite_and_exact_at_extreme_logits(name, data):
    """Logits up to 1e30 (float32) or 1e300 (float64): ℓ is finite and correct to a few ulps of
    the largest logit, δ to a few ulps of 1, against an extended-precision closed form and
    against jax.grad of ℓ. A naive log(softmax) or log(sigmoid) gives inf or NaN here."""
    dtype, z_np, t_np = data.draw(_logits_and_targets(name))
    with jax.enable_x64(dtype == "float64"):
        value, delta, jax_delta = _value_delta_and_jax_delta(
            name, jnp.asarray(z_np), jnp.asarray(t_np)
        )
        chex.assert_tree_all_finite((value, delta))
        ref_value, ref_delta = _reference_value_and_delta(name, z_np, t_np)
        eps = float(np.finfo(dtype).eps)
        # ℓ sums ≤ 2·outputs terms, each at most (1 + |tₖ|)·max|z| in size and rounded at eps;
        # the cancellation in logsumexp(z) − zₖ loses nothing more than that.
        size = np.sum(1 + np.abs(t_np), axis=-1) * (np.max(np.abs(z_np), axis=-1) + 1)
        np.testing.assert_array_less(np.abs(np.asarray(value) - ref_value), 8 * eps * size)
        # δ entries are at most Σt + 1 in size; softmax and σ are computed to a few eps of that.
        atol = 8 * eps * (1 + float(np.max(np.sum(np.abs(t_np), axis=-1))))
        chex.assert_trees_all_close(delta, ref_delta.astype(dtype), rtol=0, atol=atol)
        # jax.grad of the value: softplus′ = exp(z − softplus z) adds ~|z|·eps where |z| < 40.
        chex.assert_trees_all_close(delta, jax_delta, rtol=0, atol=8 * atol)


@functools.partial(jax.jit, static_argnums=0)
def _mse_value_delta_and_jax_delta(output, z, t):
    g = ACTIVATIONS[output]
    a = g.f(z)
    return a, MSE.value(z, a, t), MSE.delta(z, a, t, g.df(z, a)), _grad_of_value(MSE, g.f, z, t)


@settings(max_examples=25)
@given(
    dtype=st.sampled_from(["float32", "float64"]),
    output=st.sampled_from(sorted(ACTIVATIONS)),
    scale=st.sampled_from([1.0, 1e4, 1e15]),
    seed=st.integers(0, 2**16),
)
def test_mse_value_and_delta_are_finite_and_equal_jax_grad_at_extreme_preactivations(
    dtype, output, scale, seed
):
    """z up to 1e15 through any output activation (sigmoid and tanh saturated, softplus and
    relu huge): ½‖a − t‖² and (a − t) ⊙ g′(z) are finite and equal jax.grad of the value."""
    rng = np.random.default_rng(seed)
    with jax.enable_x64(dtype == "float64"):
        z = jnp.asarray(scale * rng.standard_normal((3, 4)), dtype)
        t = jnp.asarray(rng.standard_normal((3, 4)), dtype)
        a, value, delta, jax_delta = _mse_value_delta_and_jax_delta(output, z, t)
        chex.assert_tree_all_finite((value, delta))
        # ½Σ(a − t)² is ~1e30 at the largest scale, far from float32's 3e38, and exact to eps.
        expected = 0.5 * np.sum((np.asarray(a, np.float64) - np.asarray(t, np.float64)) ** 2, -1)
        chex.assert_trees_all_close(value, expected.astype(dtype), rtol=4 * np.finfo(dtype).eps)
        # δ = (a − t)·g′: g′ agrees with jax's to 64 eps (tests/test_activations.py), times |a − t|.
        atol = 64 * float(np.finfo(dtype).eps) * max(1.0, float(jnp.max(jnp.abs(a - t))))
        chex.assert_trees_all_close(delta, jax_delta, rtol=0, atol=atol)


# ----------------------------------------------------------------------------------------------
# to_targets.


def test_to_targets_passes_a_batch_by_outputs_matrix_through():
    y = jnp.array([[0.2, 0.8, 0.0], [1.0, 0.0, 0.0]], jnp.float32)
    for loss in LOSSES.values():
        t = to_targets(loss, y, 3, jnp.float32)
        chex.assert_trees_all_equal(t, y)


def test_to_targets_casts_to_the_requested_dtype():
    y = jnp.array([[0, 1], [1, 0]], jnp.int32)
    t = to_targets(SOFTMAX, y, 2, jnp.bfloat16)
    assert t.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(t, np.float32), [[0, 1], [1, 0]])


def test_integer_labels_become_one_hot_for_softmax():
    t = to_targets(SOFTMAX, jnp.array([2, 0, 1]), 3, jnp.float32)
    np.testing.assert_array_equal(np.asarray(t), np.eye(3)[[2, 0, 1]])


def test_integer_labels_become_one_hot_for_softmax_even_with_one_output():
    t = to_targets(SOFTMAX, jnp.array([0, 0]), 1, jnp.float32)
    assert t.shape == (2, 1)
    np.testing.assert_array_equal(np.asarray(t), [[1.0], [1.0]])
    # and a label of 1 is not "the target value 1": it is out of range, one-hot gives zeros
    np.testing.assert_array_equal(
        np.asarray(to_targets(SOFTMAX, jnp.array([1]), 1, jnp.float32)), [[0.0]]
    )


@pytest.mark.parametrize("name", ["mse", "sigmoid_binary_cross_entropy"])
def test_integer_labels_become_one_hot_when_there_is_more_than_one_output(name):
    t = to_targets(LOSSES[name], jnp.array([3, 1]), 4, jnp.float32)
    np.testing.assert_array_equal(np.asarray(t), np.eye(4)[[3, 1]])


@pytest.mark.parametrize("name", ["mse", "sigmoid_binary_cross_entropy"])
def test_integer_labels_with_one_output_are_the_target_column(name):
    t = to_targets(LOSSES[name], jnp.array([0, 1, 1]), 1, jnp.float32)
    np.testing.assert_array_equal(np.asarray(t), [[0.0], [1.0], [1.0]])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_float_vector_with_one_output_becomes_a_column(name):
    y = jnp.array([0.5, -1.25, 3.0], jnp.float32)
    t = to_targets(LOSSES[name], y, 1, jnp.float32)
    assert t.shape == (3, 1)
    np.testing.assert_array_equal(np.asarray(t), [[0.5], [-1.25], [3.0]])


# ----------------------------------------------------------------------------------------------
# Lookup.


def test_get_loss_returns_the_table_entry():
    for name, entry in LOSSES.items():
        assert get_loss(name) is entry


def test_from_logits_is_set_exactly_for_the_cross_entropies():
    assert {n for n, l in LOSSES.items() if l.from_logits} == {
        "softmax_cross_entropy",
        "sigmoid_binary_cross_entropy",
    }


@pytest.mark.parametrize("bad", ["cross_entropy", "MSE", None, ["mse"]])
def test_unknown_loss_raises_value_error_listing_valid_names(bad):
    with pytest.raises(ValueError, match="unknown loss") as info:
        get_loss(bad)
    for name in LOSSES:
        assert repr(name) in str(info.value)
