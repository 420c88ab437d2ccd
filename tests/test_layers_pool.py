"""Tests of fnbp/layers/pool.py: AvgPool and MaxPool forward and local rules against NumPy
loops (overlapping strides included), ``jax.vjp`` of fnbp's own forward, and the tie
convention of max-pool (ties share δ equally, as ``jax.grad`` of ``jnp.max`` does)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from oracles import assert_rel_close, layer_rule, mixed_rule, np_pool, np_pool_backward

import fnbp
from fnbp.layers import AvgPool, Flatten, MaxPool

# (spatial size, window, strides): non-overlapping (strides = window), overlapping (stride <
# window), 1-D and 2-D, non-square windows and strides.
CASES = [
    ((8,), (2,), None),
    ((9,), (3,), (2,)),
    ((7,), (2,), (1,)),
    ((6, 4), (2, 2), None),
    ((7, 7), (3, 3), (2, 2)),
    ((5, 6), (2, 3), (1, 3)),
]
IDS = [f"{len(w)}d-n{n}-w{w}-s{s}" for n, w, s in CASES]
KINDS = {"avg": AvgPool, "max": MaxPool}
# float64: sums of ≤ 9 terms in another order (avg) or exact copies (max): 1e-12 is loose.
RTOL = 1e-12


def _setup(case, op, seed=0, dtype=np.float64):
    n, window, strides = case
    layer = KINDS[op](window, strides)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, *n, 3)).astype(dtype)
    delta = rng.standard_normal((2, *layer.out_shape(x.shape[1:]))).astype(dtype)
    return layer, x, delta, layer.steps


@pytest.mark.parametrize("op", ["avg", "max"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_backward_equal_numpy_loops(case, op, x64):
    layer, x, delta, steps = _setup(case, op)
    r = layer_rule(layer, {}, {}, x, None, False, delta)
    assert (r.grads, r.inner) == ({}, None)
    assert_rel_close(r.z, np_pool(x, case[1], steps, op), RTOL, "z")
    assert_rel_close(r.back, np_pool_backward(x, case[1], steps, delta, op), RTOL, "back")
    assert_rel_close(r.back, r.vjp_back, RTOL, "back vs jax.vjp")


@pytest.mark.parametrize("case", [CASES[2], CASES[5]], ids=[IDS[2], IDS[5]])
def test_max_pool_ties_in_overlapping_windows_match_numpy_and_jax_vjp(case, x64):
    # integer-valued inputs make ties common, and overlapping windows share entries
    layer, x, delta, steps = _setup(case, "max")
    x = np.round(x)
    r = layer_rule(layer, {}, {}, x, None, False, delta)
    assert_rel_close(r.back, np_pool_backward(x, case[1], steps, delta, "max"), RTOL)
    assert_rel_close(r.back, r.vjp_back, RTOL)


def test_max_pool_window_of_equal_values_gives_each_a_quarter_unlike_reduce_window():
    x = jnp.full((1, 2, 2, 1), 3.0)
    back = layer_rule(MaxPool((2, 2)), {}, {}, x, None, False, jnp.ones((1, 1, 1, 1))).back
    chex.assert_trees_all_equal(back, jnp.full((1, 2, 2, 1), 0.25))  # exact: 1/4
    # what jax.grad of jnp.max over the window does: the same equal split
    chex.assert_trees_all_equal(jax.grad(jnp.max)(x), back)
    # lax.reduce_window's gradient gives the whole δ to one entry of the window: a reference
    # built on it would disagree with a correct rule wherever a window holds a tie
    rw = jax.grad(
        lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID").sum()
    )(x)
    assert sorted(np.asarray(rw).ravel().tolist()) == [0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("op", ["avg", "max"])
def test_mixed_precision_keeps_the_compute_dtype(op):
    layer, x, delta, _ = _setup(CASES[5], op, dtype=np.float32)
    x16, d16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(delta, jnp.bfloat16)
    z, _, _, back, _ = mixed_rule(layer, {}, {}, x16, None, False, d16)
    assert z.dtype == back.dtype == jnp.bfloat16 and back.shape == x.shape


@pytest.mark.parametrize("kind", [AvgPool, MaxPool])
def test_a_window_that_does_not_tile_the_input_is_refused_naming_the_layer(kind):
    # (7 − 2) mod 2 ≠ 0: the last row would be dropped silently
    with pytest.raises(ValueError, match=r"layer 1 \((avg|max)_pool\).*window 2 with stride 2"):
        fnbp.Net((7, 3), [kind((2,)), Flatten()])
