"""Tests of fnbp/crosscheck.py: the cross-check must pass on correct grads and catch wrong ones."""

import importlib
import re
from pathlib import Path

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    FAULT_SCALE,
    FAULTS,
    INPUT_FAULTS,
    every_kind_net,
    faulty,
    models,
    nets,
    perturbed,
    random_data,
    random_net_data,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import fnbp
from fnbp.layers import (
    Activation,
    AvgPool,
    BatchNorm,
    Conv,
    Dense,
    Dropout,
    Flatten,
    LayerNorm,
    MaxPool,
    Reshape,
    Residual,
)

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


@settings(max_examples=5)
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
    # a budget of 200 values splits the 640 of this net's directions into 4 steps of lax.map
    fd, kinked = crosscheck_module._finite_differences_jit(
        params, model, x, y, l2, crosscheck_module.FD_STEP, budget=200
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

    def wrong_in_bfloat16(params, model, x, y, l2, compute_dtype, *modes):
        result = real(params, model, x, y, l2, compute_dtype, *modes)
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


# ----------------------------------------------------------------------------------------------
# Every fnbp.Net: grads, δ and state vs jax.grad, finite differences of every parameter.

QUICK = crosscheck_module._QUICK_COMPILE  # programs that run once: LLVM at -O0


def _modes(net, state, seed=7):
    """The keywords a net's calls need: train mode, its state, a key for its dropout masks."""
    modes = {"train": True, "key": jax.random.key(seed)} if net.needs_train else {}
    return {**modes, "state": state} if net.needs_state else modes


# Each family with the kinds it exercises (random perturbed params and state from helpers).
FAMILIES = {
    "cnn2d-strides-paddings-pools": fnbp.Net((7, 6, 2), [
        Conv(3, (3, 2), strides=(2, 1), padding="SAME", activation="relu"),
        MaxPool((2, 2), strides=(1, 2)),
        Conv(4, (2, 2), padding=((1, 0), (0, 2)), activation="tanh"),
        AvgPool((3, 2), strides=(1, 2)),
        Flatten(),
        Dense(3),
    ]),
    "cnn1d-mse": fnbp.Net((14, 2), [
        Conv(3, (3,), strides=2, padding=((1, 2),), activation="softplus"),
        AvgPool((2,)),
        Conv(4, (2,), padding="VALID", activation="gelu"),
        MaxPool((3,)),
        Flatten(),
        Dense(2, "tanh"),
    ], "mse"),
    "batch-norm-train": fnbp.Net(6, [
        Dense(8), BatchNorm(activation="relu"), Dense(7, use_bias=False), BatchNorm(momentum=0.5),
        Activation("tanh"), Dense(4),
    ]),
    "layer-norm-dropout-residuals": fnbp.Net(6, [
        Dense(8, "tanh"), LayerNorm(), Dropout(0.3),
        Residual((Dense(8, "relu"), Dense(8)), alpha=0.5, learn_alpha=True),
        Residual((Dense(5, "silu"), BatchNorm()), alpha=0.7),  # a projection P, BN inside
        Dense(3),
    ]),
    "conv-batch-norm-eval-residual-reshape": fnbp.Net(36, [
        Reshape((6, 6, 1)), Conv(3, (3, 3), activation="tanh"), BatchNorm(activation="relu"),
        Residual((Conv(3, (3, 3), activation="tanh"), Dropout(0.2)), learn_alpha=True),
        AvgPool((2, 2)), Flatten(), Dense(4),
    ], "sigmoid_binary_cross_entropy"),
}  # fmt: skip
EVAL = {"conv-batch-norm-eval-residual-reshape"}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_crosscheck_passes_on_nets_of_every_kind_with_perturbed_params_and_state(name):
    net = FAMILIES[name]
    params, state = perturbed(1, net)
    x, y = random_net_data(2, net, 12)
    modes = _modes(net, state)
    if name in EVAL:
        modes = {"train": False, "state": state}
    report = fnbp.crosscheck(params, net, x, y, l2=0.01, **modes)
    assert report.passed and report.broken_layer is None, str(report)
    assert report.train is modes.get("train", False)
    assert len(report.deltas) == len(net.layers)
    assert len(report.state) == len(jax.tree.leaves(state))
    text = str(report)
    assert f"Net {net.input_shape} -> {net.output_size}: " in text.splitlines()[0]
    assert f"{'train' if report.train else 'eval'} mode" in text.splitlines()[0]
    # (a bias before a train-mode BatchNorm has gradient 0: its relative error is meaningless)
    assert all(np.isfinite(leaf.fd_error) or leaf.grad_norm < 1e-12 for leaf in report.leaves)
    assert sum(int(np.prod(leaf.shape)) for leaf in report.leaves) == net.num_params
    if name == "layer-norm-dropout-residuals":
        _assert_named_by_tree_path(report)


def _assert_named_by_tree_path(report):
    names = [leaf.name for leaf in report.leaves]
    assert names[:4] == [
        "layer 1 (dense) W", "layer 1 (dense) b",
        "layer 2 (layer_norm) beta", "layer 2 (layer_norm) gamma",
    ]  # fmt: skip
    assert "layer 4 (residual) alpha" in names and "layer 4 (residual) branch.2.W" in names
    assert "layer 5 (residual) P" in names and "layer 5 (residual) branch.2.gamma" in names
    assert [c.name for c in report.state] == [
        "layer 5 (residual) branch.2.mean", "layer 5 (residual) branch.2.var"
    ]  # fmt: skip
    assert [c.name for c in report.deltas][2:4] == ["layer 3 (dropout)", "layer 4 (residual)"]
    text = str(report)
    assert "residual[dense, dense], residual[dense, batch_norm]" in text.splitlines()[0]
    assert "layer 5 (residual) branch.2.gamma (5,)" in text  # the name column fits the longest


@settings(max_examples=4)
@given(nets(max_blocks=3), st.integers(0, 99), st.sampled_from([0.0, 0.05]), st.booleans())
def test_crosscheck_passes_on_random_nets_in_float64(net, seed, l2, train):
    with jax.enable_x64(True):
        params, state = perturbed(seed, net, np.float64)
        x, y = random_net_data(seed, net, 9, np.float64)
        modes = _modes(net, state) if train else ({"train": False} if net.needs_train else {})
        if net.needs_state:
            modes["state"] = state
        report = fnbp.crosscheck(params, net, x, y, l2=l2, **modes)
    assert report.passed, str(report)


def test_finite_differences_of_every_kind_equal_naive_full_forward_differences(x64):
    """The tail reruns (column shifts for Dense and Conv, one-channel updates into the next
    conv, ravelled params for the rest, train-mode BatchNorm and dropout masks included) must
    equal perturbing each parameter and rerunning the whole forward pass from the input."""
    net = every_kind_net()
    params, state = perturbed(3, net, np.float64)
    x, y = random_net_data(3, net, 6, np.float64)
    masks = crosscheck_module._draw_masks_jit(net, jax.random.key(5), 6, True)
    eps = crosscheck_module.FD_STEP
    fd, kinked = crosscheck_module._finite_differences_jit(
        params, net, x, y, 0.2, eps, crosscheck_module.FD_VALUES, state, masks, train=True
    )
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def loss(v):  # the whole forward pass from x
        return fnbp.model._loss(unravel(v), net, x, y, 0.2, None, state, masks, True)

    quotient = jax.jit(
        lambda i: (loss(flat.at[i].add(eps)) - loss(flat.at[i].add(-eps))) / (2 * eps),
        compiler_options=QUICK,
    )
    naive = np.array([quotient(i) for i in range(flat.size)])
    # Difference quotients of the same function at the same step: they differ by the rounding
    # of the loss (~1e-16·|L|/ε ≈ 1e-10) and at the few kinks, where both mix two slopes.
    keep = ~jax.flatten_util.ravel_pytree(kinked)[0].astype(bool)
    assert keep.sum() >= 0.9 * flat.size
    got = jax.flatten_util.ravel_pytree(fd)[0]
    np.testing.assert_allclose(got[keep], naive[keep], atol=1e-8)
    # and both are the derivative: jax.grad's, to the finite differences' truncation (1e-6)
    want = jax.jit(jax.grad(loss), compiler_options=QUICK)(flat)
    np.testing.assert_allclose(got[keep], want[keep], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", [Dense, Conv])
def test_column_shift_fast_paths_equal_the_generic_rerun(x64, cls):
    """Dense and Conv layers take the column-shift path (and a conv into a conv the one-channel
    update); a subclass (the same forward) takes the generic one: the quotients must agree."""
    generic = faulty(cls, lambda self, p, x, cache, delta, grads, back: (grads, back))
    if cls is Dense:
        layers = lambda D: [D(5, "tanh"), D(4, "relu"), Dense(3)]  # noqa: E731
        shape = (6,)
    else:
        layers = lambda C: [C(3, (3,), strides=2, activation="tanh"),  # noqa: E731
                            C(4, (2,), padding=((1, 1),), activation="softplus"),
                            Flatten(), Dense(3)]  # fmt: skip
        shape = (9, 2)
    fast_net, slow_net = fnbp.Net(shape, layers(cls)), fnbp.Net(shape, layers(generic))
    params, _ = perturbed(4, fast_net, np.float64)
    x, y = random_net_data(4, fast_net, 7, np.float64)
    budget = 1000 if cls is Dense else 5000  # 4 steps of lax.map
    fast = crosscheck_module._finite_differences_jit(params, fast_net, x, y, 0.1, 1e-6, budget)
    slow = crosscheck_module._finite_differences_jit(params, slow_net, x, y, 0.1, 1e-6, budget)
    # the same quotients computed two ways: they differ by rounding of the loss (~1e-10)
    chex.assert_trees_all_close(fast, slow, atol=1e-8)


def test_kinks_of_relu_and_max_pool_ties_are_counted_not_failed(x64):
    """Channel 0 of the conv has a zero kernel and bias, so its pre-activation is exactly 0 and
    every ±ε step of its kernel or bias crosses the ReLU kink; the max-pool windows of input
    channel 1 are tied (equal pairs) while channel 0's differ, so W[·, 1, ·] = 0 makes ties that
    a ±ε step of those entries breaks one way."""
    net = fnbp.Net((8, 2), [Conv(2, (1,), activation="relu"), MaxPool((2,)), Flatten(), Dense(3)])
    params, _ = perturbed(5, net, np.float64)
    params[0]["W"] = params[0]["W"].at[:, :, 0].set(0.0).at[:, 1, 1].set(0.0)
    params[0]["b"] = params[0]["b"].at[0].set(0.0)
    x, y = random_net_data(5, net, 6, np.float64)
    x = x.at[:, 1::2, 1].set(x[:, 0::2, 1])  # pairs of equal entries in channel 1
    report = fnbp.crosscheck(params, net, x, y)
    assert report.passed, str(report)
    W, b = report.leaves[0], report.leaves[1]
    assert b.kinks >= 1 and W.kinks >= 2  # the dead channel's b and W, the tied window's W
    assert report.kinks == W.kinks + b.kinks
    assert f"{report.kinks} of {net.num_params} parameters straddle a kink" in str(report)


def test_tiny_batch_variance_under_batch_norm_is_warned_about(x64):
    net = fnbp.Net(4, [Dense(3), BatchNorm(), Dense(2)])
    params, state = perturbed(6, net, np.float64)
    params[0]["W"] = params[0]["W"].at[1].set(0.0)  # feature 1 of the BN input is constant
    x, y = random_net_data(6, net, 8, np.float64)
    report = fnbp.crosscheck(params, net, x, y, train=True, state=state)
    assert len(report.warnings) == 1, report.warnings
    assert report.warnings[0].startswith(
        "layer 2 (batch_norm): 1 of 3 features have batch variance"
    )
    assert "warning: layer 2 (batch_norm)" in str(report)


def test_a_net_in_mixed_precision_passes_at_the_bfloat16_tolerance():
    """BatchNorm in train mode under bfloat16 compute, a bias before it whose gradient is 0 in
    exact arithmetic (its bfloat16 value is rounding noise of the terms that cancel: judged
    against the whole gradient's norm), and δ and state checked in the compute dtype."""
    net = FAMILIES["batch-norm-train"]
    params, state = perturbed(1, net)
    x, y = random_net_data(2, net, 12)
    report = fnbp.crosscheck(params, net, x, y, compute_dtype=jnp.bfloat16,
                             finite_differences=False, train=True, state=state)  # fmt: skip
    assert report.passed and report.rtol_autodiff == 5e-2, str(report)
    real = [leaf for leaf in report.leaves if leaf.grad_norm > 1e-12]  # all but layer 1's b
    assert len(real) == len(report.leaves) - 1
    assert max(leaf.autodiff_error for leaf in real) < 2e-2
    assert all(leaf.autodiff64_error < 1e-10 for leaf in real)


def test_autodiff_grads_of_a_net_use_the_same_masks_state_and_mode_as_backprop():
    net = FAMILIES["layer-norm-dropout-residuals"]
    params, state = perturbed(2, net)
    x, y = random_net_data(3, net, 8)
    modes = _modes(net, state)
    loss, grads = fnbp.autodiff_grads(params, net, x, y, l2=0.1, **modes)
    manual = fnbp.backprop(params, net, x, y, l2=0.1, **modes)
    # float32, two independent computations of the same gradient (a different dropout mask
    # would move every leaf by far more than this)
    chex.assert_trees_all_close((loss, grads), (manual.loss, manual.grads), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="pass train=True or train=False"):
        fnbp.autodiff_grads(params, net, x, y, state=state)


# ----------------------------------------------------------------------------------------------
# Fault injection: one term of one kind's rule scaled by 1 + 1e-4 (helpers.FAULTS) is caught and
# named.


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_a_fault_in_any_local_rule_is_caught_and_named(x64, name):
    cls, fault, shape, before, args, after, train = FAULTS[name]
    net = fnbp.Net(shape, [*before, faulty(cls, fault)(*args), *after])
    params, state = perturbed(8, net, np.float64)
    x, y = random_net_data(8, net, 8, np.float64)
    modes = {"train": True, "key": jax.random.key(1)} if train else {"train": False}
    if net.needs_state:
        modes["state"] = state
    report = fnbp.crosscheck(params, net, x, y, finite_differences=False, **modes)
    assert not report.passed, str(report)
    assert report.broken_layer == f"layer 2 ({cls.kind})", str(report)
    assert f"first broken local rule: layer 2 ({cls.kind})" in str(report)
    bad = [c.name for c in report.deltas if not c.passed]
    if fault in INPUT_FAULTS:  # ∂L/∂x: δ below it is off
        assert "backward rule" in report.broken_rule and bad == [f"layer 1 ({before[0].kind})"]
    else:  # a parameter formula: every δ agrees, one leaf of layer 2 does not
        assert "parameter gradient" in report.broken_rule and bad == []
        assert [leaf.name for leaf in report.leaves if not leaf.passed] == [
            f"layer 2 ({cls.kind}) {name.split('-')[1]}"
        ]


def test_a_wrong_output_delta_is_named_as_the_loss(monkeypatch):
    net = fnbp.Net(4, [Dense(5, "tanh"), Dense(3)])
    params, _ = perturbed(9, net)
    x, y = random_net_data(9, net, 6)
    real = crosscheck_module._backprop_jit

    def wrong_output_delta(*args):
        result = real(*args)
        return result._replace(deltas=[*result.deltas[:-1], result.deltas[-1] * FAULT_SCALE])

    monkeypatch.setattr(crosscheck_module, "_backprop_jit", wrong_output_delta)
    report = fnbp.crosscheck(params, net, x, y, finite_differences=False)
    assert report.broken_layer == "loss (softmax_cross_entropy)" and not report.passed
    assert [leaf.passed for leaf in report.leaves] == [True] * 4  # only δ⁽ᴸ⁾ was touched


# ----------------------------------------------------------------------------------------------
# The MLP's report is unchanged.


def test_the_mlp_report_keeps_the_format_the_readme_lists():
    """Every line of the README's ``fnbp check`` listing, digits masked, is a line of the
    report of the same network, in order (the README leaves out the rules and the rtol line)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text().splitlines()
    start = readme.index("$ fnbp check --sizes 64,128,128,10") + 1
    listing = readme[start : readme.index("PASSED", start) + 1]
    model = fnbp.MLP((64, 128, 128, 10))
    params = fnbp.init_params(jax.random.key(1), model)
    x, y = random_data(jax.random.key(2), model, 32)
    lines = str(fnbp.crosscheck(params, model, x, y)).splitlines()
    mask = lambda text: re.sub(r"\d", "0", text)  # noqa: E731
    masked, at = [mask(line) for line in lines], 0
    for line in listing:  # each README line is there, in order
        at = masked.index(mask(line), at) + 1
    assert lines[-1] == "PASSED"
    assert all(set(line) == {"-"} for line in lines[2:3] + lines[-3:-2])  # the two rules
    assert lines[-2].startswith("rtol: jax.grad 1e-05 (float32), 1e-10 (float64)")
