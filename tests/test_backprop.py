"""Tests of fnbp/backprop.py: the hand-written backward pass against independent references."""

import ast
import functools
import importlib
import inspect
import itertools
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import every_kind_net, models, nets, perturbed, random_data, random_net_data
from hypothesis import event, given, settings
from hypothesis import strategies as st

import fnbp
from fnbp.activations import ACTIVATIONS
from fnbp.crosscheck import RTOL_AUTODIFF, _errors
from fnbp.losses import LOSSES, to_targets
from fnbp.model import _loss, _loss_and_state, draw_batch_masks

# fnbp.backprop is the function (re-exported); the module is reached through importlib.
backprop_module = importlib.import_module("fnbp.backprop")

# float64 tolerances: both computations round at ~1e-16 per operation; 1e-9 leaves room for
# depth 6 and cancellation in bias sums, and is still 6+ orders tighter than any real bug.
RTOL64, ATOL64 = 1e-9, 1e-12


@st.composite
def networks(draw):
    model = draw(models(max_width=64))
    batch = draw(st.integers(1, 33))
    l2 = draw(st.sampled_from([0.0, 0.05]))
    bias_std = draw(st.sampled_from([0.0, 0.1]))
    seed = draw(st.integers(0, 2**16))
    return model, batch, l2, bias_std, seed


@settings(max_examples=10)  # each draw compiles anew; the net tests below cover more kinds
@given(networks())
def test_manual_grads_match_jax_grad_on_random_networks(net):
    model, batch, l2, bias_std, seed = net
    # drawn with NumPy: a jitted PRNG (init_params, random_data) compiles anew for every shape
    rng = np.random.default_rng(seed)
    with jax.enable_x64(True):
        params = [
            {"W": jnp.asarray(rng.standard_normal((m, n)) * np.sqrt(2.0 / n)),  # He: σ_w² = 2
             "b": jnp.asarray(bias_std * rng.standard_normal(m))}
            for n, m in zip(model.sizes[:-1], model.sizes[1:], strict=True)
        ]  # fmt: skip
        x, y = random_net_data(seed, model, batch, np.float64)
        result = fnbp.backprop(params, model, x, y, l2=l2)
        loss, grads = fnbp.autodiff_grads(params, model, x, y, l2=l2)
        chex.assert_trees_all_close(result.loss, loss, rtol=RTOL64, atol=ATOL64)
        chex.assert_trees_all_close(result.grads, grads, rtol=RTOL64, atol=ATOL64)
        chex.assert_trees_all_equal_shapes_and_dtypes(result.grads, params)


def _numpy_textbook_backprop(params, activation, x, y_onehot):
    """Nielsen-style backprop in NumPy, one example at a time: an independent implementation.

    Sigmoid/tanh/relu hidden layers, softmax + cross-entropy output, mean over examples.
    """
    f = {
        "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
        "tanh": np.tanh,
        "relu": lambda z: np.maximum(z, 0),
    }
    df = {
        "sigmoid": lambda z: f["sigmoid"](z) * (1 - f["sigmoid"](z)),
        "tanh": lambda z: 1 - np.tanh(z) ** 2,
        "relu": lambda z: (z > 0).astype(float),
    }
    Ws = [np.asarray(p["W"], np.float64) for p in params]
    bs = [np.asarray(p["b"], np.float64) for p in params]
    nabla_W = [np.zeros_like(W) for W in Ws]
    nabla_b = [np.zeros_like(b) for b in bs]
    for xn, yn in zip(np.asarray(x, np.float64), y_onehot, strict=True):
        activation_ = xn
        activations, zs = [xn], []
        for i, (W, b) in enumerate(zip(Ws, bs, strict=True)):
            z = W @ activation_ + b
            zs.append(z)
            activation_ = z if i == len(Ws) - 1 else f[activation](z)
            activations.append(activation_)
        p = np.exp(zs[-1] - zs[-1].max())
        p /= p.sum()
        delta = p - yn
        nabla_W[-1] += np.outer(delta, activations[-2])
        nabla_b[-1] += delta
        for l in range(2, len(Ws) + 1):
            delta = (Ws[-l + 1].T @ delta) * df[activation](zs[-l])
            nabla_W[-l] += np.outer(delta, activations[-l - 1])
            nabla_b[-l] += delta
    n = len(x)
    return [{"W": gW / n, "b": gb / n} for gW, gb in zip(nabla_W, nabla_b, strict=True)]


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_manual_grads_match_a_numpy_textbook_implementation(activation, x64):
    model = fnbp.MLP((7, 9, 8, 4), activation)
    params = fnbp.init_params(jax.random.key(3), model, dtype=jnp.float64)
    x, y = random_data(jax.random.key(4), model, 11, jnp.float64)
    expected = _numpy_textbook_backprop(params, activation, x, np.eye(4)[np.asarray(y)])
    chex.assert_trees_all_close(
        fnbp.backprop(params, model, x, y).grads, expected, rtol=RTOL64, atol=ATOL64
    )


def _loss_with_z_offsets(params, model, x, y, offsets):
    """The model's mean loss with an additive offset on every z⁽ˡ⁾, written out independently."""
    a = x
    for l, (p, off) in enumerate(zip(params, offsets, strict=True), start=1):
        z = a @ p["W"].T + p["b"][None, :] + off
        a = model.layer_activation(l).f(z)
    logp = jax.nn.log_softmax(z)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


@pytest.mark.parametrize("activation", ["relu", "gelu", "sigmoid"])
def test_deltas_are_dloss_dz_of_every_layer(activation, x64):
    model = fnbp.MLP((6, 8, 7, 5), activation)
    params = fnbp.init_params(jax.random.key(0), model, dtype=jnp.float64)
    x, y = random_data(jax.random.key(1), model, 9, jnp.float64)
    offsets = [jnp.zeros((9, n), jnp.float64) for n in model.sizes[1:]]
    expected = jax.grad(lambda o: _loss_with_z_offsets(params, model, x, y, o))(offsets)
    result = fnbp.backprop(params, model, x, y)
    assert [d.shape for d in result.deltas] == [(9, 8), (9, 7), (9, 5)]
    chex.assert_trees_all_close(result.deltas, expected, rtol=RTOL64, atol=ATOL64)


def test_output_delta_is_p_minus_y_over_batch(x64):
    model = fnbp.MLP((3, 4))
    params = fnbp.init_params(jax.random.key(0), model, dtype=jnp.float64)
    x, y = random_data(jax.random.key(1), model, 6, jnp.float64)
    p = jax.nn.softmax(x @ params[0]["W"].T + params[0]["b"][None, :])
    expected = (p - jax.nn.one_hot(y, 4)) / 6
    chex.assert_trees_all_close(fnbp.backprop(params, model, x, y).deltas[-1], expected, rtol=1e-12)


def test_l2_adds_lambda_w_to_weight_grads_and_half_lambda_norm_to_loss():
    model = fnbp.MLP((5, 6, 3), "tanh")
    params = fnbp.init_params(jax.random.key(0), model)
    x, y = random_data(jax.random.key(1), model, 4)
    lam = 0.3
    plain, decayed = fnbp.backprop(params, model, x, y), fnbp.backprop(params, model, x, y, l2=lam)
    for p, g0, g1 in zip(params, plain.grads, decayed.grads, strict=True):
        # float32: λW is added to a gradient of size ~1, so agreement to ~1e-6 is the limit.
        chex.assert_trees_all_close(g1["W"] - g0["W"], lam * p["W"], atol=1e-6)
        chex.assert_trees_all_equal(g1["b"], g0["b"])  # biases are not decayed
    penalty = 0.5 * lam * sum(float(jnp.sum(p["W"] ** 2)) for p in params)
    assert float(decayed.loss - plain.loss) == pytest.approx(penalty, rel=1e-5)


def test_grads_have_the_structure_shapes_and_dtypes_of_params():
    model = fnbp.MLP((4, 5, 3))
    params = fnbp.init_params(jax.random.key(0), model)
    x, y = random_data(jax.random.key(1), model, 2)
    result = fnbp.backprop(params, model, x, y)
    chex.assert_trees_all_equal_shapes_and_dtypes(result.grads, params)
    assert [a.shape for a in result.activations] == [(2, 5), (2, 3)]


def test_bfloat16_params_and_inputs_run_and_stay_close_to_float32():
    model = fnbp.MLP((16, 32, 10))
    params16 = jax.tree.map(
        lambda v: v.astype(jnp.bfloat16), fnbp.init_params(jax.random.key(0), model)
    )
    x, y = random_data(jax.random.key(1), model, 8)
    x16 = x.astype(jnp.bfloat16)
    result16 = fnbp.backprop(params16, model, x16, y)
    chex.assert_trees_all_equal_dtypes(result16.grads, params16)
    # Reference: float32 arithmetic on the same (bf16-rounded) params and inputs.
    up = lambda t: jax.tree.map(lambda v: v.astype(jnp.float32), t)  # noqa: E731
    expected = fnbp.backprop(up(params16), model, up(x16), y).grads
    for g, e in zip(jax.tree.leaves(up(result16.grads)), jax.tree.leaves(expected), strict=True):
        # bfloat16 keeps 8 mantissa bits (~4e-3 relative per op); measured errors are ~3e-3.
        assert float(jnp.linalg.norm(g - e)) <= 2e-2 * float(jnp.linalg.norm(e))


# ----------------------------------------------------------------------------------------------
# Mixed precision: bfloat16 compute, float32 master params.


def _rel_errors(a, b):
    return [
        float(jnp.linalg.norm(u - v) / jnp.linalg.norm(v))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_mixed_precision_grads_match_jax_grad_of_the_same_mixed_loss(activation):
    model = fnbp.MLP((64, 128, 128, 10), activation)
    params = fnbp.init_params(jax.random.key(0), model)
    x, y = random_data(jax.random.key(1), model, 32)
    result = fnbp.backprop(params, model, x, y, l2=1e-3, compute_dtype=jnp.bfloat16)
    loss, reference = fnbp.autodiff_grads(params, model, x, y, l2=1e-3, compute_dtype=jnp.bfloat16)
    # float32 master params in, float32 loss and grads out; the error signals stay bfloat16.
    assert result.loss.dtype == jnp.float32
    chex.assert_trees_all_equal_shapes_and_dtypes(result.grads, params)
    assert all(d.dtype == jnp.bfloat16 for d in result.deltas)
    # Both round every matmul and activation to bfloat16 (2⁻⁹ ≈ 2e-3), at different places
    # (jax.grad rounds Σδaᵀ to bfloat16, backprop accumulates it in float32): measured 2e-3 to
    # 1.2e-2 here; 5e-2 is crosscheck's documented tolerance for this mode.
    assert max(_rel_errors(result.grads, reference)) < 5e-2
    assert float(abs(result.loss - loss)) < 1e-3 * float(loss)


def test_mixed_precision_grads_are_close_to_float32_grads():
    # tanh, so that the comparison measures rounding; under ReLU a pre-activation that bfloat16
    # rounding moves across 0 switches its unit off, a different function (measured 3-9%).
    model = fnbp.MLP((64, 128, 128, 10), "tanh")
    params = fnbp.init_params(jax.random.key(0), model)
    x, y = random_data(jax.random.key(1), model, 128)
    mixed = fnbp.backprop(params, model, x, y, compute_dtype=jnp.bfloat16)
    full = fnbp.backprop(params, model, x, y)
    # bfloat16 keeps 8 mantissa bits; measured worst leaf 9e-3, loss 1e-4 relative.
    assert max(_rel_errors(mixed.grads, full.grads)) < 3e-2
    assert float(abs(mixed.loss - full.loss)) < 2e-3 * float(full.loss)


def test_mixed_precision_backward_matmuls_all_run_in_bfloat16():
    """A float32 δ⁽ᴸ⁾ (from the float32 softmax) or a float32 master W meeting a bfloat16 operand
    would silently promote the matmul to float32: twice the time of jax.grad on a GPU. Every dot
    must take bfloat16 operands, and the weight-gradient dots must accumulate into float32."""
    model = fnbp.MLP((16, 32, 32, 10))
    params = fnbp.init_params(jax.random.key(0), model)
    x, y = random_data(jax.random.key(1), model, 8)
    step = jax.jit(lambda p: backprop_module._backprop(p, model, x, y, 1e-3, jnp.bfloat16)[:2])
    hlo = step.lower(params).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert len(dots) == 3 + 3 + 2  # forward, Σδaᵀ per layer, Wᵀδ below the output layer
    for line in dots:
        operands = line.split(":")[-1].split("->")[0]
        assert operands.count("bf16") == 2 and "f32" not in operands, line
    assert sum(line.split("->")[-1].strip().endswith("xf32>") for line in dots) == 3


def test_compute_dtype_must_be_a_floating_dtype():
    model = fnbp.MLP((4, 3))
    params = fnbp.init_params(jax.random.key(0), model)
    x, y = random_data(jax.random.key(1), model, 2)
    with pytest.raises(TypeError, match="compute_dtype"):
        fnbp.backprop(params, model, x, y, compute_dtype=jnp.int8)
    with pytest.raises(TypeError, match="compute_dtype"):
        fnbp.loss(params, model, x, y, compute_dtype="bf16x")


def test_one_hot_and_integer_labels_give_the_same_grads():
    model = fnbp.MLP((5, 6, 4))
    params = fnbp.init_params(jax.random.key(0), model)
    x, y = random_data(jax.random.key(1), model, 7)
    a = fnbp.backprop(params, model, x, y)
    b = fnbp.backprop(params, model, x, jax.nn.one_hot(y, 4))
    chex.assert_trees_all_close(a.grads, b.grads, rtol=1e-6, atol=1e-8)


def test_extreme_logits_give_finite_grads_equal_to_jax_grad():
    model = fnbp.MLP((2, 3))
    params = [{"W": jnp.array([[1e4, 0.0], [-1e4, 0.0], [0.0, 1e4]]), "b": jnp.zeros(3)}]
    x = jnp.array([[1.0, 0.5], [-1.0, 2.0]])
    y = jnp.array([1, 2])
    result = fnbp.backprop(params, model, x, y)
    _, reference = fnbp.autodiff_grads(params, model, x, y)
    assert np.isfinite(float(result.loss)) and float(result.loss) > 1e3
    chex.assert_tree_all_finite(result.grads)
    chex.assert_trees_all_close(result.grads, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_a_unit_of_slope_zero_passes_back_zero_even_when_the_error_reaching_it_overflows(jit):
    """A dead ReLU unit whose outgoing weight is 1e30 receives Wᵀδ = 1e10·1e30 = ∞ in float32.
    Its slope is 0, so its δ is 0 (as jax.grad's select makes it), not 0·∞ = NaN, and the
    whole gradient stays finite. Under jit, XLA happens to turn the mask product into a select
    on CPU; run eagerly, the product is carried out as written."""
    model = fnbp.MLP((1, 2, 1), "relu", "mse")
    params = [
        {"W": jnp.array([[1e10], [-1.0]]), "b": jnp.zeros(2)},  # a⁽¹⁾ = (1e10, 0)
        {"W": jnp.array([[1.0, 1e30]]), "b": jnp.zeros(1)},  # z⁽²⁾ = 1e10, δ⁽²⁾ = 1e10
    ]
    x, y = jnp.ones((1, 1)), jnp.zeros((1, 1))
    _, reference = fnbp.autodiff_grads(params, model, x, y)
    chex.assert_tree_all_finite(reference)
    with jax.disable_jit(not jit):
        result = fnbp.backprop(params, model, x, y)
    np.testing.assert_array_equal(np.asarray(result.deltas[0]), [[1e10, 0.0]])
    chex.assert_tree_all_finite(result.grads)
    # float32: both are the same few products of powers of ten, rounded once each.
    chex.assert_trees_all_close(result.grads, reference, rtol=1e-6, atol=0)


def test_per_example_grads_match_vmap_of_jax_grad_and_average_to_the_batch_grad():
    model = fnbp.MLP((6, 8, 3), "tanh")
    params = fnbp.init_params(jax.random.key(0), model)
    x, y = random_data(jax.random.key(1), model, 5)
    per_example = fnbp.per_example_grads(params, model, x, y, l2=0.1)
    reference = jax.vmap(
        lambda xi, yi: jax.grad(fnbp.loss)(params, model, xi[None], yi[None], l2=0.1)
    )(x, y)
    # float32, one example through two layers: agreement to a few ulps of values ~1.
    chex.assert_trees_all_close(per_example, reference, rtol=1e-5, atol=1e-6)
    assert per_example[0]["W"].shape == (5, 8, 6)
    mean = jax.tree.map(lambda g: g.mean(0), per_example)
    chex.assert_trees_all_close(
        mean, fnbp.backprop(params, model, x, y, l2=0.1).grads, rtol=1e-5, atol=1e-6
    )


def test_backprop_jits_and_vmaps_with_the_model_as_an_ordinary_argument():
    model = fnbp.MLP((4, 5, 3))
    keys = jax.random.split(jax.random.key(0), 3)
    params = jax.vmap(lambda k: fnbp.init_params(k, model))(keys)
    x, y = random_data(jax.random.key(1), model, 6)
    losses = jax.jit(jax.vmap(lambda p: fnbp.backprop(p, model, x, y).loss))(params)
    expected = [fnbp.loss(jax.tree.map(lambda v, i=i: v[i], params), model, x, y) for i in range(3)]
    chex.assert_trees_all_close(losses, jnp.stack(expected), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Random nets over every layer kind (tests/helpers.py: nets, perturbed).


def _z_shapes(net, batch):
    """The shape of every top-level layer's z: its output before its activation."""
    return [(batch, *s) for s in (*net.in_shapes[1:], net.output_shape)]


def _stream(deltas):
    """Each top-level layer's δ: a residual block's ``"out"`` entry, the others as they are."""
    return [d["out"] if isinstance(d, dict) else d for d in deltas]


# Every random net is a new program; each runs for microseconds, compiling one takes 1–3 s of
# CPU at XLA's default optimization level and half that at level 0 (same results to rounding).
_quick_jit = functools.partial(
    jax.jit, static_argnames="train", compiler_options={"xla_backend_optimization_level": 0}
)


@_quick_jit
def _manual_and_autodiff(params, net, x, y, l2, state, key, train):
    """The hand-written backprop and ``jax.value_and_grad`` of the reference loss, with the
    same dropout masks; the reference's deltas are its gradient with respect to zero offsets
    added to every top-level z."""
    masks = draw_batch_masks(net, key, x.shape[0], train)
    manual = backprop_module._backprop(params, net, x, y, l2, None, state, masks, train)
    offsets = [jnp.zeros(s, x.dtype) for s in _z_shapes(net, x.shape[0])]
    (loss, new_state), (grads, deltas) = jax.value_and_grad(
        lambda p, o: _loss_and_state(p, net, x, y, l2, None, state, masks, train, o),
        argnums=(0, 1),
        has_aux=True,
    )(params, offsets)
    return manual, (loss, grads, deltas, new_state)


def _kinds(layers) -> set:
    return set().union(*({layer.kind} | _kinds(layer.sublayers()) for layer in layers))


def _close(actual, expected, rtol):
    """Every entry within ``rtol`` of its own size plus ``rtol`` × the largest entry of the
    whole tree: entries that cancel to nearly 0 (the bias gradient of a layer feeding a
    train-mode BatchNorm is 0 in exact arithmetic) are judged against the tree's scale."""
    scale = max([float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(expected)] + [0.0])
    chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=rtol * scale + 1e-300)


@st.composite
def net_cases(draw, families=("dense", "cnn1d", "cnn2d")):
    """A random net, a batch of 2–5 (train-mode BatchNorm needs a spread), the mode, λ, a seed."""
    return (draw(nets(families=families)), draw(st.integers(2, 5)), draw(st.booleans()),
            draw(st.sampled_from([0.0, 0.05])), draw(st.integers(0, 2**16)))  # fmt: skip


def _record(case):
    """Hypothesis events (``--hypothesis-show-statistics``): how often each mode and kind ran."""
    net, _, train, l2, _ = case
    event(f"{'train' if train else 'eval'}, l2={l2}")
    for kind in _kinds(net.layers):
        event(kind)


def _check_random_net(case, dtype, rtol):
    net, batch, train, l2, seed = case
    params, state = perturbed(seed, net, dtype)
    x, y = random_net_data(seed, net, batch, dtype)
    key = jax.random.key(seed, impl="rbg")  # cheap to compile, unlike threefry
    manual, (loss, grads, deltas, new_state) = _manual_and_autodiff(
        params, net, x, y, l2, state, key, train
    )
    _close(manual.loss, loss, rtol)
    _close(manual.grads, grads, rtol)
    _close(_stream(manual.deltas), deltas, rtol)
    _close(manual.state, new_state, rtol)
    chex.assert_trees_all_equal_shapes_and_dtypes(manual.grads, params)
    if train and net.needs_state:  # the running statistics moved
        assert not all(
            bool(jnp.all(a == b))
            for a, b in zip(jax.tree.leaves(manual.state), jax.tree.leaves(state), strict=True)
        )


@settings(max_examples=14)
@given(net_cases())
def test_manual_grads_deltas_and_state_match_jax_grad_on_random_nets_in_float64(case):
    """Dense stacks with BatchNorm/LayerNorm/Dropout/Residual blocks and small 1-D and 2-D CNNs
    with pools, perturbed params (γ ≠ 1, β ≠ 0, α ≠ 0, b ≠ 0) and running statistics, both
    modes, λ = 0 and 0.05. float64: both sides round at ~1e-16 per operation; measured worst
    7e-16 of the gradient's scale, so 1e-10 is tight yet leaves room for depth."""
    _record(case)
    with jax.enable_x64(True):
        _check_random_net(case, np.float64, 1e-10)


@settings(max_examples=8)
@given(net_cases())
def test_manual_grads_deltas_and_state_match_jax_grad_on_random_nets_in_float32(case):
    """The same in float32. The two computations are the same math in different orders (the
    normalizations' closed-form rules against autodiff's chain through mean and variance, a
    sum of branch and skip gradients against the reverse accumulation), each rounding at
    6e-8 per operation and amplified by 1/σ in the normalizations: measured worst 1.3e-6 of
    the gradient's scale, so 1e-5 relative."""
    _record(case)
    _check_random_net(case, np.float32, 1e-5)


@pytest.mark.parametrize(
    "train, loss, l2", [(True, "softmax_cross_entropy", 0.05), (False, "mse", 0.0)]
)
def test_a_net_of_every_kind_matches_jax_grad_in_float64(train, loss, l2):
    """Every kind in one net (tests/helpers.py: every_kind_net), whatever the draws above hit:
    grads, stream deltas and state to 1e-10 of their scale, as above."""
    with jax.enable_x64(True):
        _check_random_net((every_kind_net(loss), 5, train, l2, 7), np.float64, 1e-10)


@_quick_jit
def _per_example_manual_and_autodiff(params, net, x, y, l2, state, key, train):
    """The hand-written per-example grads (what ``fnbp.per_example_grads`` jits), vmap of
    jax.grad of the one-example loss (each example with its row of the batch's masks), and
    the hand-written batch gradient with the same masks: one compiled program."""
    manual = backprop_module._per_example_grads(params, net, x, y, l2, state, key, train)
    masks = draw_batch_masks(net, key, x.shape[0], train)

    def one(xi, yi, mi):
        rows = jax.tree.map(lambda m: m[None], mi)
        return jax.grad(_loss)(params, net, xi[None], yi[None], l2, None, state, rows, train)

    batch = backprop_module._backprop(params, net, x, y, l2, None, state, masks, train)
    return manual, jax.vmap(one)(x, y, masks), batch.grads


@settings(max_examples=8)
@given(net_cases())
def test_per_example_grads_of_random_nets_match_vmap_of_jax_grad_and_average_to_the_batch_grad(
    case,
):
    net, batch, train, l2, seed = case
    train = train and not net.couples_examples  # train-mode BatchNorm is refused (see below)
    with jax.enable_x64(True):
        params, state = perturbed(seed, net, np.float64)
        x, y = random_net_data(seed, net, batch, np.float64)
        key = jax.random.key(seed, impl="rbg")
        per_example, reference, batch_grads = _per_example_manual_and_autodiff(
            params, net, x, y, l2, state, key, train
        )
        # float64: one example's gradient, the same math rounded differently (see above).
        _close(per_example, reference, 1e-10)
        _close(jax.tree.map(lambda g: g.mean(0), per_example), batch_grads, 1e-10)
        chex.assert_trees_all_equal_shapes(jax.tree.map(lambda g: g[0], per_example), params)


def test_per_example_grads_refuse_train_mode_batch_norm_naming_the_layer():
    net = fnbp.Net(3, [fnbp.layers.Residual((fnbp.layers.BatchNorm(),)), fnbp.layers.Dense(2)])
    params, state = perturbed(0, net)
    x, y = random_net_data(0, net, 4)
    with pytest.raises(ValueError, match=r"layer 1 \(residual\) branch layer 1 \(batch_norm\)"):
        fnbp.per_example_grads(params, net, x, y, state=state, train=True)
    fnbp.per_example_grads(params, net, x, y, state=state, train=False)  # eval mode: defined


# ----------------------------------------------------------------------------------------------
# Extreme scales: wherever jax.grad's gradient is finite, the hand-written one is too, and equal.

# Per-layer weight scales: tiny (1e-20), ordinary, saturating (30: sigmoid and tanh units at
# |z| ≈ 30 have f′ = 0 in float32), logits of ±1e4, and 1e12, which overflows float32 within
# three layers (where jax.grad itself goes non-finite). Inputs: ordinary, ±1e4, 1e-30, and
# subnormal (a quarter of the dtype's smallest normal number).
_WEIGHT_SCALES = (1e-20, 1.0, 30.0, 1e4, 1e12)
_INPUT_SCALES = (1.0, 1e4, 1e-30, "subnormal")


def _extreme_population(model, batch, dtype, seed):
    """One network per combination of per-layer weight scale and input scale, stacked.

    Returns ``(params, x, y)`` with a leading population axis; biases are 0.1 × the layer's
    scale, so tiny layers have tiny pre-activations (and tiny activations, for the activations
    with f(0) = 0).
    """
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(_INPUT_SCALES, *[_WEIGHT_SCALES] * model.num_layers))
    n = len(combos)
    subnormal = float(np.finfo(dtype).tiny) / 4
    x_scale = np.array([subnormal if c[0] == "subnormal" else c[0] for c in combos])
    x = x_scale[:, None, None] * rng.standard_normal((n, batch, model.sizes[0]))
    params = []
    for l, (fan_in, fan_out) in enumerate(zip(model.sizes[:-1], model.sizes[1:], strict=True)):
        s = np.array([c[l + 1] for c in combos])
        W = s[:, None, None] * rng.standard_normal((n, fan_out, fan_in)) / np.sqrt(fan_in)
        b = 0.1 * s[:, None] * rng.standard_normal((n, fan_out))
        params.append({"W": jnp.asarray(W, dtype), "b": jnp.asarray(b, dtype)})
    n_out = model.sizes[-1]
    if model.loss == "softmax_cross_entropy":
        y = jnp.asarray(rng.integers(0, n_out, (n, batch)))
    elif model.loss == "sigmoid_binary_cross_entropy":
        y = jnp.asarray(rng.integers(0, 2, (n, batch, n_out)), dtype)
    else:
        y = jnp.asarray(rng.standard_normal((n, batch, n_out)), dtype)
    return params, jnp.asarray(x, dtype), y


@jax.jit
def _manual_and_autodiff_over_population(params, model, x, y, l2):
    def one(p, x, y):
        result = fnbp.backprop(p, model, x, y, l2=l2)
        loss, grads = fnbp.autodiff_grads(p, model, x, y, l2=l2)
        t = to_targets(model.loss_fn, y, model.sizes[-1], x.dtype)
        slopes = [
            model.layer_activation(l).df(z, a)
            for l, (z, a) in enumerate(
                zip(result.preactivations, result.activations, strict=True), 1
            )
        ]
        return result, loss, grads, t, slopes

    return jax.vmap(one)(params, x, y)


def _rounding_scale(model, params, x, result, t, slopes, l2):
    """Each gradient entry's size as rounding sees it: the backward loop with every factor
    replaced by the size of what it is computed from (the componentwise bound of
    floating-point error analysis: rounding at eps moves the entry by about eps × this).

    * δ⁽ᴸ⁾ = squash(z) − t of the cross-entropies cancels where a prediction is confidently
      right (σ(z) ≈ t = 1): one ulp of 1 in σ(z) is one ulp of 1 in δ however small δ is, so
      its scale is |squash(z)| + |t|; for mse, δ⁽ᴸ⁾ = (a − t) ⊙ g′ has scale (|a| + |t|)·ḡ′.
    * a smooth f′ is built from terms of size ≤ 1 (1 − a², σ(1 + z(1 − σ)), Φ + zφ) that can
      cancel (silu′ has a root at z ≈ −1.28): its scale is f̄′ = |f′| + 1. Piecewise-linear
      f′ are exact: f̄′ = |f′|.
    * then δ̄⁽ˡ⁻¹⁾ = f̄′ ⊙ (δ̄⁽ˡ⁾ |W⁽ˡ⁾|), ∂W̄ = Σₙ δ̄ |a|ᵀ + λ|W|, ∂b̄ = Σₙ δ̄.

    Arrays carry the leading population axis.
    """
    batch = x.shape[1]
    x, result, t, slopes = jax.tree.map(lambda v: np.asarray(v, np.float64), (x, result, t, slopes))
    params = jax.tree.map(lambda v: np.asarray(v, np.float64), params)

    def slope_scale(l):
        exact = model.layer_activation(l).region is not None
        return np.abs(slopes[l - 1]) + (0.0 if exact else 1.0)

    L = model.num_layers
    if model.loss_fn.from_logits:  # per-example δ = squash(z)·Σt − t
        delta_bar = np.abs(result.deltas[-1] * batch + t) + np.abs(t)
    else:  # δ = (a − t) ⊙ g′(z)
        delta_bar = (np.abs(result.activations[-1]) + np.abs(t)) * slope_scale(L)
    delta_bar = delta_bar / batch
    acts = [x] + list(result.activations)
    bound = [None] * L
    for l in range(L, 0, -1):
        W = np.abs(params[l - 1]["W"])
        bound[l - 1] = {
            "W": np.einsum("pbo,pbi->poi", delta_bar, np.abs(acts[l - 1])) + l2 * W,
            "b": delta_bar.sum(axis=1),
        }
        if l > 1:
            delta_bar = slope_scale(l - 1) * np.einsum("pbo,poi->pbi", delta_bar, W)
    return bound


def _all_finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@settings(max_examples=2)
@given(data=st.data())
def test_manual_grads_are_finite_and_match_jax_grad_wherever_it_is_finite_at_extreme_scales(
    activation, loss, data
):
    """Every activation × loss, depth 1 to 3, widths and batch down to 1, float32 and float64,
    with and without l2, over a population of every combination of the extreme scales above:
    tiny and subnormal activations, saturated units, logits of ±1e4 and beyond.

    Wherever every leaf of jax.grad's gradient is finite, backprop's is finite and agrees with
    it leaf by leaf: to crosscheck's relative tolerance (float32 1e-5, float64 1e-10: the same
    math, rounded differently; a leaf near zero is judged against 1e-3 × the whole gradient's
    norm), plus 16 eps × each entry's rounding scale (:func:`_rounding_scale`), what two
    roundings of the same math can differ by where it cancels: at z ≈ 6 in float32 one ulp of
    σ(z) is already 7e-5 of δ = σ(z) − 1, and jax.grad's σ is exp(z − softplus z). Over 300
    random draws the largest multiple of eps × scale needed was 5.

    Where jax.grad's is not finite (float32 overflow in the forward pass), nothing is
    demanded; the hypothesis statistics (``--hypothesis-show-statistics``) record what backprop
    gives there.
    """
    sizes = tuple(data.draw(st.lists(st.integers(1, 3), min_size=2, max_size=4), label="sizes"))
    outputs = ["identity", "sigmoid", "tanh", "relu"]
    output = "identity" if LOSSES[loss].from_logits else data.draw(st.sampled_from(outputs))
    model = fnbp.MLP(sizes, activation, loss, output)
    batch = data.draw(st.sampled_from([1, 3]), label="batch")
    dtype = data.draw(st.sampled_from(["float32", "float64"]), label="dtype")
    l2 = data.draw(st.sampled_from([0.0, 0.05]), label="l2")
    with jax.enable_x64(dtype == "float64"):
        params, x, y = _extreme_population(model, batch, dtype, data.draw(st.integers(0, 2**16)))
        out = _manual_and_autodiff_over_population(params, model, x, y, l2)
        result, ref_loss, ref, t, slopes = jax.device_get(out)
    params = jax.device_get(params)
    eps = float(np.finfo(dtype).eps)
    with np.errstate(invalid="ignore"):  # inf·0 in networks that overflowed: skipped below
        scale = _rounding_scale(model, params, x, result, t, slopes, l2)
    atol = jax.tree.map(lambda b: 16 * eps * b, scale)
    finite, largest_logit = 0, 0.0
    for i in range(len(ref_loss)):
        m, r, a = (jax.tree.map(lambda v, i=i: v[i], tree) for tree in (result.grads, ref, atol))
        if not _all_finite(r):
            event(f"jax.grad non-finite; backprop {'finite' if _all_finite(m) else 'non-finite'}")
            continue
        finite += 1
        largest_logit = max(largest_logit, float(np.max(np.abs(result.preactivations[-1][i]))))
        assert _all_finite(m), f"network {i}: jax.grad is finite but backprop is not: {m}"
        errors = _errors(m, r, RTOL_AUTODIFF[dtype], atol_entry=a)
        assert all(ok for _, ok in errors), f"network {i}: relative errors {errors}"
        if np.isfinite(ref_loss[i]):
            np.testing.assert_allclose(result.loss[i], ref_loss[i], rtol=RTOL_AUTODIFF[dtype])
    # The population is not vacuous: most networks have a finite gradient, logits reach 1e4.
    assert finite >= len(ref_loss) // 4 and largest_logit >= 1e4


# ----------------------------------------------------------------------------------------------
# Proof that the backward pass is hand-written.

_AUTODIFF_NAMES = {
    "grad",
    "value_and_grad",
    "vjp",
    "jvp",
    "linearize",
    "custom_vjp",
    "custom_jvp",
    "jacrev",
    "jacfwd",
    "hessian",
}


_PACKAGE = Path(fnbp.__file__).parent
# Every module the hand-written path runs through: the loop, the spec, each layer kind's rule.
_BACKPROP_PATH = sorted(
    [f"{m}.py" for m in ("backprop", "model", "losses", "activations", "engine", "net")]
    + [str(p.relative_to(_PACKAGE)) for p in (_PACKAGE / "layers").glob("*.py")]
    + [str(p.relative_to(_PACKAGE)) for p in (_PACKAGE / "instruments").glob("*.py")]
)


def test_the_autodiff_scan_covers_every_layer_module():
    assert {"engine.py", "net.py", "layers/conv.py", "layers/residual.py"} <= set(_BACKPROP_PATH)
    assert len([m for m in _BACKPROP_PATH if m.startswith("layers/")]) >= 9
    assert {"instruments/factors.py", "instruments/per_example.py"} <= set(_BACKPROP_PATH)


@pytest.mark.parametrize("module", _BACKPROP_PATH)
def test_backprop_path_source_names_no_autodiff_function(module):
    path = _PACKAGE / module
    tree = ast.parse(path.read_text())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    # a bare name counts unless the module binds it itself (an argument ``grad`` of a rule is
    # a local array; ``grad = jax.grad`` would still be caught as the attribute ``jax.grad``)
    local = {n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)}
    local |= {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
    }
    used |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - local
    used |= {
        a.name.split(".")[-1]
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom)
        for a in n.names
    }
    assert not used & _AUTODIFF_NAMES, f"{path.name} uses {used & _AUTODIFF_NAMES}"


@pytest.mark.parametrize("which", ["mlp", "every-kind-net"])
def test_backprop_runs_with_jax_autodiff_disabled(monkeypatch, which):
    """Every JAX derivative (grad, vjp, jvp, linearize, custom rules) starts a JVPTrace or a
    LinearizeTrace. Make both impossible, show that jax.grad now fails, and that the hand-written
    backprop still traces, runs and returns the same numbers: for an MLP, and in train mode
    (batch statistics, dropout masks) for a net with every layer kind (tests/helpers.py)."""
    from jax._src.interpreters import ad

    if which == "mlp":
        model = fnbp.MLP((5, 7, 6, 3), "gelu")
        params, state, train = fnbp.init_params(jax.random.key(0), model), None, False
        x, y = random_data(jax.random.key(1), model, 4)
    else:
        model = every_kind_net()
        (params, state), train = perturbed(0, model), True
        x, y = random_net_data(1, model, 4)
    masks = draw_batch_masks(model, jax.random.key(2, impl="rbg"), 4, train)
    reference = jax.jit(jax.value_and_grad(_loss_and_state, has_aux=True), static_argnums=(1, 8))
    (_, expected_state), expected = reference(params, model, x, y, 0.0, None, state, masks, train)

    def forbidden(*args, **kwargs):
        raise RuntimeError("autodiff used")

    monkeypatch.setattr(ad.JVPTrace, "__init__", forbidden)
    monkeypatch.setattr(ad.LinearizeTrace, "__init__", forbidden)
    with pytest.raises(RuntimeError, match="autodiff used"):
        jax.grad(lambda p: _loss(p, model, x, y, 0.0, None, state, masks, train))(params)
    # a function jit has never seen: traced afresh with both traces forbidden (one compiled
    # program; jax.disable_jit's op-by-op run costs a compile per primitive and shape)
    hand = jax.jit(
        lambda p, s, m: backprop_module._backprop(p, model, x, y, 0.0, None, s, m, train)
    )
    result = hand(params, state, masks)
    # float32: the same math rounded in another order (measured ~1e-7 relative).
    chex.assert_trees_all_close(result.grads, expected, rtol=1e-5, atol=1e-6)
    if which != "mlp":  # an MLP's Backprop has no state
        chex.assert_trees_all_close(result.state, expected_state, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "function", [backprop_module._backward, fnbp.engine.backward_seq], ids=lambda f: f.__name__
)
def test_backprop_source_fits_on_one_screen(function):
    """The backward pass is ``_backward`` (forward, loss, δ⁽ᴸ⁾) and the one loop over the
    layers it calls (``engine.backward_seq``); each reads on one screen."""
    lines = inspect.getsource(function).splitlines()
    assert len(lines) <= 25, "the textbook backward pass should stay readable in one screen"


def test_the_backward_loop_never_branches_on_a_layer_kind():
    """Each kind's rule is its own ``backward``; the loop names no kind and tests no type."""
    tree = ast.parse(inspect.getsource(fnbp.engine.backward_seq))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not names & {"isinstance", "type"} and "kind" not in attrs
    assert not set(fnbp.layers.KINDS) & {
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
    }
