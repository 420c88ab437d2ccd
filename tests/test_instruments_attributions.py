"""Tests of fnbp/instruments/attributions.py: input gradients, integrated gradients and Grad-CAM
from the hand-written backward pass, against jax.grad of the input (or of the feature map, the
net split at the layer), a plain Riemann sum, finite differences of the forward pass and closed
forms for linear heads, on nets of every kind that keeps examples independent."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import every_kind_net, perturbed, random_net_data

import fnbp
from fnbp import presets
from fnbp.backprop import _backward, _rows
from fnbp.engine import forward_seq, no_masks
from fnbp.layers import (
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
from fnbp.model import _loss, draw_batch_masks, run

# float64: the hand-written pass and jax.grad round at ~1e-16 per operation; 1e-9 leaves room
# for a dozen layers and cancellation, and is still orders of magnitude tighter than any bug.
RTOL64, ATOL64 = 1e-9, 1e-12
# central differences with h = 1e-5 in float64: truncation h²·f‴ ≈ 1e-10, rounding 1e-16/h
# ≈ 1e-11, on O(1) values; 1e-6 is tight enough that a missing f′ or a wrong sign fails.
FD_H, FD_TOL = 1e-5, 1e-6

# Nets of every kind whose examples stay independent, each with its mode: (net, train).
NETS = {
    "mlp": (fnbp.MLP((5, 4, 3), "tanh"), False),
    "conv_pool": (
        fnbp.Net(
            (4, 4, 2),
            [
                Conv(3, (2, 2), activation="tanh"),
                MaxPool((2, 2)),
                Conv(2, (2, 2), activation="softplus"),
                Flatten(),
                Dense(3),
            ],
        ),
        False,
    ),  # fmt: skip
    "residual_mse": (
        fnbp.Net(
            5,
            [
                Dense(4, "tanh"),
                Residual((Dense(4, "gelu"), Dense(6)), alpha=0.7),
                Dense(3, "sigmoid"),
            ],
            "mse",
        ),
        False,
    ),  # fmt: skip
    "layer_norm_bce": (
        fnbp.Net(
            5, [Dense(4), LayerNorm(activation="tanh"), Dense(3)], "sigmoid_binary_cross_entropy"
        ),
        False,
    ),  # fmt: skip
    "dropout_train": (fnbp.Net(5, [Dense(6, "tanh"), Dropout(0.5), Dense(3)]), True),
    "batch_norm_eval": (
        fnbp.Net(
            16,
            [
                Reshape((4, 4, 1)),
                Conv(2, (3, 3), activation="silu"),
                BatchNorm(),
                AvgPool((2, 2)),
                Flatten(),
                Dense(3),
            ],
        ),
        False,
    ),  # fmt: skip
    "every_kind_eval": (every_kind_net(), False),
}
BATCH = 3


def _setup(name, seed=0):
    """``(net, params, x, y, kw)`` in float64, ``kw`` the mode keywords."""
    net, train = NETS[name]
    params, state = perturbed(seed, net, np.float64)
    x, y = random_net_data(seed + 1, net, BATCH, np.float64)
    kw = {"train": train, "key": jax.random.key(seed + 2) if train else None}
    kw["state"] = state if net.needs_state else None
    return net, params, x, y, kw


def _scalar(net, params, target, state, train):
    """The reference F of one example ``(xi, yi, masks)``: the per-example loss by
    fnbp.model's loss (a batch of one) or the class logit from the forward pass."""

    def f(xi, yi, mi):
        if target == "loss":
            return _loss(params, net, xi[None], yi[None], 0.0, None, state, _rows(mi), train)
        z = run(params, net, xi[None], state=state, masks=_rows(mi), train=train).z[-1][0]
        return z[yi] if yi.ndim == 0 else jnp.sum(yi * z)

    return f


@functools.cache
def _reference(name, target):
    """``(net, params, x, y, kw, masks, F, ∇F)`` for a net of :data:`NETS`, the reference F and
    its ``jax.vmap(jax.grad)`` jitted once per net (compiling dominates these tests)."""
    with jax.enable_x64(True):
        net, params, x, y, kw = _setup(name)
        f = _scalar(net, params, target, kw["state"], kw["train"])
        masks = draw_batch_masks(net, kw["key"], BATCH, kw["train"])
        return net, params, x, y, kw, masks, jax.jit(jax.vmap(f)), jax.jit(jax.vmap(jax.grad(f)))


def _central_differences(f, x, y, masks):
    """``∂Fᵢ/∂xᵢ`` of every example by central differences of the forward pass alone, every
    input entry at once: no program shared with any backward pass."""
    flat = x.reshape(BATCH, -1)
    eye = jnp.eye(flat.shape[1], dtype=x.dtype) * FD_H
    at = jax.jit(jax.vmap(lambda step: f((flat + step[None]).reshape(x.shape), y, masks)))
    return ((at(eye) - at(-eye)) / (2 * FD_H)).T.reshape(x.shape)  # at(·): (n_in, batch)


def _target_label(net, y):
    """Class labels for the logit target: ``y`` itself, or a class per example for nets whose
    ``y`` holds regression or binary targets."""
    return y if y.ndim == 1 else jnp.arange(BATCH) % net.output_size


# ----------------------------------------------------------------------------------------------
# Input gradients.


@pytest.mark.parametrize("name", sorted(NETS))
def test_input_gradients_equal_jax_grad_of_the_input_per_example(name, x64):
    net, params, x, y, kw, _, _, grad = _reference(name, "loss")
    got = fnbp.input_gradients(params, net, x, y, **kw)
    chex.assert_trees_all_close(got, grad(x, y, _reference(name, "loss")[5]), rtol=RTOL64,
                                atol=ATOL64)  # fmt: skip


@pytest.mark.parametrize("name", ["mlp", "conv_pool", "dropout_train"])
def test_input_gradients_equal_finite_differences_and_b_times_the_mean_losss(name, x64):
    net, params, x, y, kw, masks, value, _ = _reference(name, "loss")
    got = fnbp.input_gradients(params, net, x, y, **kw)
    fd = _central_differences(value, x, y, masks)
    chex.assert_trees_all_close(got, fd, rtol=FD_TOL, atol=FD_TOL)
    # ∂ℓᵢ/∂xᵢ is B times the backward pass's ∂L/∂x of the mean loss (1e-12: one rounding of ×B)
    whole = jax.jit(_backward, static_argnums=8)(
        params, net, x, y, 0.0, None, kw["state"], masks, kw["train"]
    ).input_grad
    chex.assert_trees_all_close(got, BATCH * whole, rtol=1e-12, atol=1e-15)


def test_input_gradients_of_the_logit_equal_jax_grad(x64):
    net, params, x, y, kw, masks, _, grad = _reference("conv_pool", "logit")
    got = fnbp.input_gradients(params, net, x, y, target="logit", **kw)
    chex.assert_trees_all_close(got, grad(x, y, masks), rtol=RTOL64, atol=ATOL64)


def test_input_gradients_ignore_l2_and_keep_float32():
    net, _ = NETS["conv_pool"]
    params, _ = perturbed(0, net, np.float32)
    x, y = random_net_data(1, net, BATCH, np.float32)
    plain = fnbp.input_gradients(params, net, x, y)
    assert plain.dtype == jnp.float32 and plain.shape == x.shape
    # the penalty does not depend on x: bit-identical with and without it
    np.testing.assert_array_equal(fnbp.input_gradients(params, net, x, y, l2=0.3), plain)


# ----------------------------------------------------------------------------------------------
# Integrated gradients.


def _riemann_reference(grad, x, y, masks, baseline, steps):
    """IG by jax.grad at each midpoint, summed in NumPy: (x − x′) ⊙ (1/m) Σₖ ∇F(x′ + αₖ(x − x′))."""
    total = np.zeros(x.shape)
    for k in range(steps):
        total += np.asarray(grad(baseline + (k + 0.5) / steps * (x - baseline), y, masks))
    return np.asarray(x - baseline) * total / steps


@pytest.mark.parametrize("name", sorted(set(NETS) - {"every_kind_eval"}))  # each kind on its own
def test_integrated_gradients_equal_a_jax_grad_riemann_sum(name, x64):
    target = "loss" if name in ("residual_mse", "layer_norm_bce") else "logit"
    net, params, x, y, kw, masks, value, grad = _reference(name, target)
    baseline = jnp.asarray(0.3 * np.random.default_rng(3).standard_normal(x.shape))
    got = fnbp.integrated_gradients(
        params, net, x, y, baseline=baseline, steps=3, target=target, **kw
    )
    ref = _riemann_reference(grad, x, y, masks, baseline, 3)
    chex.assert_trees_all_close(got.attributions, ref, rtol=RTOL64, atol=ATOL64)
    chex.assert_trees_all_close(got.values, value(x, y, masks), rtol=RTOL64, atol=ATOL64)
    chex.assert_trees_all_close(got.baseline_values, value(baseline, y, masks),
                                rtol=RTOL64, atol=ATOL64)  # fmt: skip
    gap = ref.reshape(BATCH, -1).sum(1) - (got.values - got.baseline_values)
    chex.assert_trees_all_close(got.gap, gap, rtol=1e-6, atol=1e-12)  # a difference of sums


def test_integrated_gradients_of_a_linear_net_are_x_times_the_class_weights_for_any_steps(x64):
    """F = W_y x + b_y is linear: IG = (x − x′) ⊙ W_y exactly, whatever the quadrature."""
    net = fnbp.MLP((6, 4), "relu")
    params, _ = perturbed(0, net, np.float64)
    x, y = random_net_data(1, net, BATCH, np.float64)
    want = np.asarray(x) * np.asarray(params[0]["W"])[np.asarray(y)]
    for steps in (1, 3):
        got = fnbp.integrated_gradients(params, net, x, y, steps=steps)
        chex.assert_trees_all_close(got.attributions, want, rtol=1e-12, atol=1e-14)
        chex.assert_trees_all_close(got.gap, np.zeros(BATCH), atol=1e-13)  # Σ IG = F(x) − F(0)


def test_integrated_gradients_complete_with_a_gap_shrinking_as_one_over_steps_squared(x64):
    """Σⱼ IGⱼ → F(x) − F(x′), F from the forward pass alone, the midpoint rule's error falling
    by ~4× per doubling of the steps on a smooth net (F = Σₖ yₖzₖ: y holds target rows)."""
    net, params, x, y, kw, masks, value, _ = _reference("residual_mse", "logit")
    diff = np.asarray(value(x, y, masks) - value(jnp.zeros_like(x), y, masks))
    gaps = {}
    for steps in (8, 16, 32):
        out = fnbp.integrated_gradients(params, net, x, y, steps=steps)
        total = np.asarray(out.attributions).reshape(BATCH, -1).sum(1)
        np.testing.assert_allclose(out.gap, total - diff, rtol=1e-6, atol=1e-13)
        gaps[steps] = np.abs(total - diff)
    assert np.all(gaps[8] > 1e-6 * np.abs(diff))  # few steps do miss: F is not linear
    for m in (8, 16):
        ratio = gaps[m] / gaps[2 * m]
        assert np.all((ratio > 3.5) & (ratio < 4.5)), (m, ratio)  # O(1/m²)
    assert np.all(gaps[32] < 1e-3 * np.abs(diff))


def test_integrated_gradients_converge_on_a_relu_conv_net(x64):
    """Kinks along the path make the gradient piecewise constant in α: the rule's error is then
    O(1/m) and not monotone in m, but it still vanishes."""
    net = presets.cnn(16, 3)
    params, _ = perturbed(0, net, np.float64)
    x, y = random_net_data(1, net, BATCH, np.float64)
    relative = {}
    for steps in (4, 256):
        out = fnbp.integrated_gradients(params, net, x, y, steps=steps)
        relative[steps] = np.max(np.abs(out.gap) / np.abs(out.values - out.baseline_values))
    assert relative[4] > 0.05  # measured 0.41: few steps miss
    assert relative[256] < 1e-2  # measured 5.1e-3 (1.6e-3 at 1024 steps)


def test_integrated_gradients_one_baseline_for_all_equals_it_broadcast(x64):
    net, params, x, y, kw = _setup("conv_pool")
    one = jnp.asarray(np.random.default_rng(0).standard_normal(net.input_shape))
    got = fnbp.integrated_gradients(params, net, x, y, baseline=one, steps=3)
    want = fnbp.integrated_gradients(
        params, net, x, y, baseline=jnp.broadcast_to(one, x.shape), steps=3
    )
    chex.assert_trees_all_close(got, want, rtol=0, atol=0)  # the same computation


def test_integrated_gradients_in_chunks_of_path_points_equal_all_at_once(x64):
    net, params, x, y, kw, *_ = _reference("dropout_train", "logit")
    whole = fnbp.integrated_gradients(params, net, x, y, steps=5, **kw)
    for chunk in (2, 5):  # 2: chunks of 2, 2 and the remainder 1; 5: all at once
        got = fnbp.integrated_gradients(params, net, x, y, steps=5, chunk=chunk, **kw)
        chex.assert_trees_all_close(got, whole, rtol=1e-13, atol=1e-15)  # the same sums


# ----------------------------------------------------------------------------------------------
# Grad-CAM.


def _split_reference(net, params, x, y, layer, state):
    """Grad-CAM with ∂z_y/∂A from jax.grad of the net's head (the layers after ``layer``) run
    from the feature map A, and the head itself (for finite differences)."""
    state = fnbp.model.blank_state(net) if state is None else state
    A = jax.jit(lambda: run(params, net, x, state=state).a[layer + 1])()
    after = slice(layer + 1, None)

    def head(a, yi):  # one example's class logit from its feature map
        tr = forward_seq(net.layers[after], params[after], state[after], a[None],
                         no_masks(net.layers[after]), False)  # fmt: skip
        return tr.z[-1][0, yi]

    dA = jax.jit(jax.vmap(jax.grad(head)))(A, y)
    alpha = dA.mean(axis=tuple(range(1, dA.ndim - 1)))
    cam = np.maximum(np.einsum("b...c,bc->b...", A, alpha), 0)
    return A, alpha, cam, head


@pytest.mark.parametrize(
    ("name", "layer", "default"),
    [("conv_pool", None, 2), ("conv_pool", -5, 0), ("batch_norm_eval", None, 1),
     ("batch_norm_eval", 3, 3), ("every_kind_eval", None, 8)],
)  # fmt: skip
def test_grad_cam_equals_jax_grad_of_the_logit_at_the_split_net(name, layer, default, x64):
    net, params, x, y, kw = _setup(name)
    got = fnbp.grad_cam(params, net, x, y, layer=layer, state=kw["state"])
    assert got.layer == default
    A, alpha, cam, _ = _split_reference(net, params, x, y, default, kw["state"])
    assert got.map.shape == A.shape[:-1] and got.weights.shape == (BATCH, A.shape[-1])
    chex.assert_trees_all_close(got.weights, alpha, rtol=RTOL64, atol=ATOL64)
    chex.assert_trees_all_close(got.map, cam, rtol=RTOL64, atol=ATOL64)
    assert np.any(np.asarray(got.map) > 0)  # not an all-zero map that any bug would also give


def test_grad_cam_weights_equal_finite_differences_of_the_head_not_the_layers_delta(x64):
    """The gradient at A = f(z) by differences of the forward pass; δ = ∂/∂z (f′ ≠ 1 for the
    tanh conv) would differ, and does here."""
    net, params, x, y, _ = _setup("conv_pool")
    got = fnbp.grad_cam(params, net, x, y, layer=0)
    A, _, _, head = _split_reference(net, params, x, y, 0, None)
    flat = A.reshape(BATCH, -1)
    eye = jnp.eye(flat.shape[1], dtype=A.dtype) * FD_H
    at = jax.jit(jax.vmap(lambda e: jax.vmap(head)((flat + e[None]).reshape(A.shape), y)))
    dA = ((at(eye) - at(-eye)) / (2 * FD_H)).T.reshape(A.shape)
    alpha = np.asarray(dA).mean(axis=(1, 2))
    chex.assert_trees_all_close(got.weights, alpha, rtol=FD_TOL, atol=FD_TOL)
    # weights from the layer's δ = f′(z) ⊙ ∂z_y/∂A (tanh: f′ = 1 − A²) are far from these
    wrong = (np.asarray(dA) * (1 - np.square(np.asarray(A)))).mean(axis=(1, 2))
    assert np.max(np.abs(wrong - np.asarray(got.weights))) > 1e-2


def test_grad_cam_of_a_linear_head_is_the_class_weights_averaged_over_positions(x64):
    """Conv → Flatten → Dense: ∂z_y/∂A = W[y] reshaped to the map, a closed form."""
    net = fnbp.Net((4, 3, 2), [Conv(3, (2, 2), activation="relu"), Flatten(), Dense(4)])
    params, _ = perturbed(0, net, np.float64)
    x, y = random_net_data(1, net, BATCH, np.float64)
    got = fnbp.grad_cam(params, net, x, y)
    W = np.asarray(params[2]["W"])[np.asarray(y)].reshape(BATCH, 4, 3, 3)  # (batch, h, w, C)
    alpha = W.mean(axis=(1, 2))
    A = np.maximum(np.asarray(run(params, net, x).z[0]), 0)  # relu(conv): the map the head reads
    chex.assert_trees_all_close(got.weights, alpha, rtol=1e-12, atol=1e-14)
    chex.assert_trees_all_close(
        got.map, np.maximum(np.einsum("bhwc,bc->bhw", A, alpha), 0), rtol=1e-12, atol=1e-14
    )


def test_grad_cam_defaults_to_a_residual_block_of_convolutions(x64):
    net = fnbp.Net((5, 5, 1), [Conv(2, (3, 3), activation="relu"), Residual(
        (Conv(2, (3, 3), activation="tanh"), Conv(2, (1, 1))), alpha=0.5), Flatten(), Dense(3)])  # fmt: skip
    params, _ = perturbed(0, net, np.float64)
    x, y = random_net_data(1, net, BATCH, np.float64)
    got = fnbp.grad_cam(params, net, x, y)
    assert got.layer == 1
    _, alpha, cam, _ = _split_reference(net, params, x, y, 1, None)
    chex.assert_trees_all_close(got.weights, alpha, rtol=RTOL64, atol=ATOL64)
    chex.assert_trees_all_close(got.map, cam, rtol=RTOL64, atol=ATOL64)


# ----------------------------------------------------------------------------------------------
# No autodiff on the hand-written path (tests/test_backprop.py also scans this module's source).


def test_attributions_run_with_jax_autodiff_disabled(monkeypatch, x64):
    """Every JAX derivative starts a JVPTrace or a LinearizeTrace; with both made impossible
    the three attributions still trace afresh (a batch size no other test uses) and agree with
    the jax.grad references computed before."""
    from jax._src.interpreters import ad

    net, params, x, y, _, masks, _, grad = _reference("conv_pool", "logit")
    x, y, baseline = x[:2], y[:2], jnp.full(x[:2].shape, 0.1)
    want_grad = grad(x, y, masks)
    want_ig = _riemann_reference(grad, x, y, masks, baseline, 2)
    _, want_alpha, want_cam, _ = _split_reference(net, params, x, y, 2, None)

    def forbidden(*args, **kwargs):
        raise RuntimeError("autodiff used")

    monkeypatch.setattr(ad.JVPTrace, "__init__", forbidden)
    monkeypatch.setattr(ad.LinearizeTrace, "__init__", forbidden)
    with pytest.raises(RuntimeError, match="autodiff used"):
        grad(x[:1], y[:1], masks)  # a shape jax.grad has not traced yet
    got = fnbp.input_gradients(params, net, x, y, target="logit")
    chex.assert_trees_all_close(got, want_grad, rtol=RTOL64, atol=ATOL64)
    got = fnbp.integrated_gradients(params, net, x, y, baseline=baseline, steps=2)
    chex.assert_trees_all_close(got.attributions, want_ig, rtol=RTOL64, atol=ATOL64)
    got = fnbp.grad_cam(params, net, x, y)
    chex.assert_trees_all_close((got.weights, got.map), (want_alpha, want_cam), rtol=RTOL64,
                                atol=ATOL64)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Errors.


def test_train_mode_batch_norm_is_refused_naming_the_layer():
    net = every_kind_net()
    params, state = perturbed(0, net)
    x, y = random_net_data(1, net, BATCH)
    key = jax.random.key(0)
    for fn in (fnbp.input_gradients, fnbp.integrated_gradients):
        with pytest.raises(ValueError, match=r"layer 4 \(batch_norm\) couples the examples"):
            fn(params, net, x, y, state=state, key=key, train=True)


def test_bad_arguments_raise_naming_them(x64):
    net, params, x, y, _ = _setup("conv_pool")
    for steps in (0, 2.5, True, "50"):
        with pytest.raises(ValueError, match="steps must be a positive int"):
            fnbp.integrated_gradients(params, net, x, y, steps=steps)
    for chunk in (0, 1.0, False):
        with pytest.raises(ValueError, match="chunk must be None .* or a positive int"):
            fnbp.integrated_gradients(params, net, x, y, chunk=chunk)
    with pytest.raises(ValueError, match=r"baseline must have x's shape \(3, 4, 4, 2\)"):
        fnbp.integrated_gradients(params, net, x, y, baseline=jnp.zeros((4, 4)))
    with pytest.raises(TypeError, match="baseline must be a floating array"):
        fnbp.integrated_gradients(params, net, x, y, baseline=jnp.zeros(x.shape, jnp.int32))
    with pytest.raises(TypeError, match="baseline must be None or an array"):
        fnbp.integrated_gradients(params, net, x, y, baseline=0.0)
    for fn in (fnbp.input_gradients, fnbp.integrated_gradients):
        with pytest.raises(ValueError, match=r"target must be one of \('logit', 'loss'\)"):
            fn(params, net, x, y, target="probability")
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 4, 4, 2\)"):
        fnbp.input_gradients(params, net, x[:, 0], y)


def test_grad_cam_errors_name_the_layer_and_what_would_fit(x64):
    mlp, params, x, y, _ = _setup("mlp")
    with pytest.raises(ValueError, match="grad_cam needs a conv net.*fnbp.MLP"):
        fnbp.grad_cam(params, mlp, x, y)
    net, params, x, y, _ = _setup("layer_norm_bce")
    with pytest.raises(ValueError, match=r"layers \(dense, layer_norm, dense\) hold no Conv"):
        fnbp.grad_cam(params, net, x, _target_label(net, y))
    net, params, x, y, _ = _setup("conv_pool")
    with pytest.raises(ValueError, match=r"layer=3 is the net's layer 4 \(flatten\).*layer=2"):
        fnbp.grad_cam(params, net, x, y, layer=3)
    for bad in (5, -6):
        with pytest.raises(ValueError, match="layer must index the net's 5 layers"):
            fnbp.grad_cam(params, net, x, y, layer=bad)
    for bad in ("2", True, 1.0):
        with pytest.raises(TypeError, match="layer must be None"):
            fnbp.grad_cam(params, net, x, y, layer=bad)
    net, params, x, y, kw = _setup("batch_norm_eval")
    with pytest.raises(ValueError, match=r"batch_norm\) keeps running statistics; pass state="):
        fnbp.grad_cam(params, net, x, y)
