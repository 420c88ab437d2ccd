"""Tests of fnbp/crosscheck.py: the cross-check must pass on correct grads and catch wrong ones."""

import importlib

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import models, random_data
from hypothesis import given, settings
from hypothesis import strategies as st

import fnbp

crosscheck_module = importlib.import_module("fnbp.crosscheck")


@st.composite
def networks(draw):
    model = draw(models(max_width=16))
    return (
        model,
        draw(st.integers(1, 17)),
        draw(st.sampled_from([0.0, 0.05])),
        draw(st.integers(0, 999)),
    )


@settings(max_examples=10)
@given(networks())
def test_crosscheck_passes_on_random_networks_against_finite_differences(net):
    model, batch, l2, seed = net
    k_p, k_d = jax.random.split(jax.random.key(seed))
    params = fnbp.init_params(k_p, model, fnbp.variance_scaling_scheme(2.0, bias_std=0.1))
    x, y = random_data(k_d, model, batch)
    report = fnbp.crosscheck(params, model, x, y, l2=l2)
    assert report.passed, str(report)
    assert all(
        np.isfinite(leaf.fd_error) or leaf.kinks == np.prod(leaf.shape) for leaf in report.leaves
    )


def test_crosscheck_passes_on_the_784_16_16_10_relu_network_and_prints_a_table():
    model = fnbp.MLP((784, 16, 16, 10))
    params = fnbp.init_params(jax.random.key(1), model)
    x, y = random_data(jax.random.key(2), model, 32)
    report = fnbp.crosscheck(params, model, x, y, l2=1e-3)
    assert report.passed, str(report)
    text = str(report)
    for l in (1, 2, 3):
        assert f"layer {l} W" in text and f"layer {l} b" in text
    assert "PASSED" in text and "13002 parameters" in text
    for leaf in report.leaves:
        assert leaf.autodiff_error < 1e-5  # float32
        assert leaf.autodiff64_error < 1e-10
        assert leaf.fd_error < 1e-6


def _structured_fd(params, model, x, y, l2):
    fd, kinked = crosscheck_module._finite_differences_jit(
        params, model, x, y, l2, crosscheck_module.FD_STEP, chunk=64
    )
    return fd, kinked


def test_structured_finite_differences_equal_naive_full_forward_differences(x64):
    """The fast FD reruns the net from the perturbed layer on; it must equal perturbing each
    parameter and rerunning fnbp.loss from the input, parameter by parameter."""
    model = fnbp.MLP((3, 4, 2), "tanh", "mse", "sigmoid")
    params = fnbp.init_params(jax.random.key(0), model, dtype=jnp.float64)
    x, y = random_data(jax.random.key(1), model, 5, jnp.float64)
    eps = crosscheck_module.FD_STEP
    fd, kinked = _structured_fd(params, model, x, y, 0.2)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    loss = lambda v: float(fnbp.loss(unravel(v), model, x, y, l2=0.2))  # noqa: E731
    naive = np.array(
        [
            (loss(flat.at[i].add(eps)) - loss(flat.at[i].add(-eps))) / (2 * eps)
            for i in range(flat.size)
        ]
    )
    # Both are difference quotients of the same function at the same step; they differ only by
    # rounding of the loss (~1e-16·|L|/ε ≈ 1e-10).
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(fd)[0], naive, atol=1e-8)
    assert not any(np.any(k) for k in jax.tree.leaves(kinked))  # tanh has no kinks


def test_a_step_across_a_relu_kink_is_reported_and_excluded_instead_of_failing(x64):
    """Hidden unit 0 gets W = 0, so its pre-activation is exactly b = 0 on every example:
    moving b by ±ε crosses the ReLU kink, and the difference quotient there is half the slope."""
    model = fnbp.MLP((3, 4, 2))
    params = fnbp.init_params(jax.random.key(0), model, dtype=jnp.float64)
    params[0]["W"] = params[0]["W"].at[0].set(0.0)
    x, y = random_data(jax.random.key(1), model, 6, jnp.float64)
    report = fnbp.crosscheck(params, model, x, y)
    assert report.passed, str(report)
    assert report.leaves[1].name == "layer 1 b" and report.leaves[1].kinks == 1
    fd, kinked = _structured_fd(params, model, x, y, 0.0)
    assert bool(kinked[0]["b"][0])
    manual = fnbp.backprop(params, model, x, y).grads[0]["b"][0]
    assert float(manual) == 0.0  # relu′(0) = 0, as jax.grad says
    # One-sided slopes are 0 and s; the central quotient is s/2, not the derivative.
    assert abs(float(fd[0]["b"][0])) > 1e-3


@pytest.mark.parametrize("scale, leaf", [(1 + 1e-4, 0), (1 + 1e-4, 1), (1.01, 2)])
def test_crosscheck_catches_a_wrong_gradient(monkeypatch, scale, leaf):
    model = fnbp.MLP((6, 5, 4), "tanh")
    params = fnbp.init_params(jax.random.key(0), model)
    x, y = random_data(jax.random.key(1), model, 7)
    real = crosscheck_module._backprop_jit

    def wrong(*args):
        result = real(*args)
        leaves, tree = jax.tree.flatten(result.grads)
        leaves[leaf] = leaves[leaf] * scale
        return result._replace(grads=jax.tree.unflatten(tree, leaves))

    monkeypatch.setattr(crosscheck_module, "_backprop_jit", wrong)
    report = fnbp.crosscheck(params, model, x, y)
    assert not report.passed
    assert [l.passed for l in report.leaves] == [i != leaf for i in range(4)]
    bad = report.leaves[leaf]
    assert bad.autodiff64_error == pytest.approx(scale - 1, rel=1e-3)
    assert bad.fd_error == pytest.approx(scale - 1, rel=1e-2)
    assert "FAIL" in str(report) and "FAILED" in str(report)


def test_crosscheck_runs_in_float64_when_x64_is_enabled(x64):
    model = fnbp.MLP((5, 6, 3), "softplus")
    params = fnbp.init_params(jax.random.key(0), model, dtype=jnp.float64)
    x, y = random_data(jax.random.key(1), model, 4, jnp.float64)
    report = fnbp.crosscheck(params, model, x, y)
    assert report.dtype == "float64" and report.rtol_autodiff == 1e-10 and report.passed


def test_crosscheck_in_bfloat16_uses_the_bfloat16_tolerance():
    model = fnbp.MLP((8, 16, 4))
    params = jax.tree.map(
        lambda v: v.astype(jnp.bfloat16), fnbp.init_params(jax.random.key(0), model)
    )
    x, y = random_data(jax.random.key(1), model, 8)
    report = fnbp.crosscheck(params, model, x.astype(jnp.bfloat16), y, finite_differences=False)
    assert report.dtype == "bfloat16" and report.rtol_autodiff == 5e-2
    assert report.passed, str(report)
    assert "vs finite diff" not in str(report)


def test_crosscheck_in_mixed_precision_passes_at_the_bfloat16_tolerance_and_says_so():
    model = fnbp.MLP((784, 16, 16, 10))
    params = fnbp.init_params(jax.random.key(1), model)
    x, y = random_data(jax.random.key(2), model, 32)
    report = fnbp.crosscheck(params, model, x, y, l2=1e-3, compute_dtype=jnp.bfloat16)
    assert report.passed, str(report)
    assert report.dtype == "float32" and report.compute_dtype == "bfloat16"
    assert report.rtol_autodiff == 5e-2
    assert "float32 params, bfloat16 compute" in str(report)
    assert "vs jax.grad (bfloat16 compute)" in str(report)
    # bfloat16 rounding shows in the first comparison (measured up to 6e-3 here; XLA may merge
    # identical subgraphs of the two in one program, so some leaves agree exactly) ...
    assert all(leaf.autodiff_error < 2e-2 for leaf in report.leaves)
    assert max(leaf.autodiff_error for leaf in report.leaves) > 1e-4
    # ... while the float64 and finite-difference checks of the math are unchanged.
    assert all(leaf.autodiff64_error < 1e-10 and leaf.fd_error < 1e-6 for leaf in report.leaves)


def test_mixed_precision_crosscheck_catches_a_gradient_wrong_by_ten_percent(monkeypatch):
    """A bug only on the mixed-precision path (the float64 checks do not see it) must fail."""
    model = fnbp.MLP((6, 5, 4), "tanh")
    params = fnbp.init_params(jax.random.key(0), model)
    x, y = random_data(jax.random.key(1), model, 7)
    real = crosscheck_module._backprop_jit

    def wrong_in_bfloat16(params, model, x, y, l2, compute_dtype):
        result = real(params, model, x, y, l2, compute_dtype)
        if compute_dtype is None:
            return result
        grads = [dict(g) for g in result.grads]
        grads[1]["W"] = grads[1]["W"] * 1.1
        return result._replace(grads=grads)

    monkeypatch.setattr(crosscheck_module, "_backprop_jit", wrong_in_bfloat16)
    report = fnbp.crosscheck(params, model, x, y, compute_dtype=jnp.bfloat16)
    assert not report.passed
    assert [leaf.passed for leaf in report.leaves] == [True, True, False, True]
    assert report.leaves[2].autodiff_error == pytest.approx(0.1, abs=0.02)
    assert report.leaves[2].autodiff64_error < 1e-10


def test_autodiff_grads_equal_jax_value_and_grad_of_loss():
    model = fnbp.MLP((4, 3))
    params = fnbp.init_params(jax.random.key(0), model)
    x, y = random_data(jax.random.key(1), model, 5)
    loss, grads = fnbp.autodiff_grads(params, model, x, y, l2=0.1)
    ref_loss, ref_grads = jax.value_and_grad(fnbp.loss)(params, model, x, y, l2=0.1)
    chex.assert_trees_all_close((loss, grads), (ref_loss, ref_grads), rtol=1e-6)


def test_crosscheck_rejects_a_bad_step():
    model = fnbp.MLP((4, 3))
    params = fnbp.init_params(jax.random.key(0), model)
    x, y = random_data(jax.random.key(1), model, 5)
    with pytest.raises(ValueError, match="fd_step"):
        fnbp.crosscheck(params, model, x, y, fd_step=0.0)


def test_leaf_errors_take_a_scalar_or_a_per_entry_absolute_tolerance():
    ref = [{"W": np.array([[1.0, 0.0]]), "b": np.array([0.0])}]
    manual = [{"W": np.array([[1.0, 3e-3]]), "b": np.array([4e-3])}]
    # Alone, rtol 1e-6 of max(‖g‖, 1e-3·‖g_all‖) = 1e-6 allows neither difference.
    assert [ok for _, ok in crosscheck_module._errors(manual, ref, 1e-6)] == [False, False]
    # A scalar atol_entry allows atol·√entries per leaf: 3e-3·√2 ≥ 3e-3, but 3e-3 < 4e-3.
    scalar = crosscheck_module._errors(manual, ref, 1e-6, atol_entry=3e-3)
    assert [ok for _, ok in scalar] == [True, False]
    # A tree gives each entry its own: the leaf passes when ‖Δ‖ ≤ rtol·… + ‖atol‖.
    per_entry = [{"W": np.array([[0.0, 3e-3]]), "b": np.array([3.9e-3])}]
    errors = crosscheck_module._errors(manual, ref, 1e-6, atol_entry=per_entry)
    assert [ok for _, ok in errors] == [True, False]
    assert errors[0][0] == pytest.approx(3e-3)  # the relative error itself is unchanged
