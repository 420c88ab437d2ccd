"""Per-example gradient norms and gradient statistics from one backward pass, against the
materialised reference: ``vmap(jax.grad)`` of each example's own loss (its row of the batch's
dropout masks), reduced with NumPy."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import every_kind_net, nets, perturbed, random_net_data
from hypothesis import given, settings
from hypothesis import strategies as st

import fnbp
from fnbp.backprop import _backward
from fnbp.instruments import factors as fx
from fnbp.instruments import per_example as pe
from fnbp.layers import BatchNorm, Conv, Dense, Dropout, Flatten, LayerNorm, Residual
from fnbp.model import _loss, draw_batch_masks

_quick_jit = functools.partial(
    jax.jit, static_argnames="train", compiler_options={"xla_backend_optimization_level": 0}
)


@_quick_jit
def _both(params, net, x, y, l2, state, key, train):
    """fnbp's norms and stats, and the materialised per-example grads ``vmap(jax.grad)``
    (each example with its row of the batch's masks): one compiled program."""
    masks = draw_batch_masks(net, key, x.shape[0], train)
    norms = pe._norms(params, net, x, y, l2, state, masks, train)
    stats = pe._stats(params, net, x, y, l2, state, masks, train)

    def one(xi, yi, mi):
        rows = jax.tree.map(lambda m: m[None], mi)
        return jax.grad(_loss)(params, net, xi[None], yi[None], l2, None, state, rows, train)

    return norms, stats, jax.vmap(one)(x, y, masks)


def _numpy_stats(per_example):
    """Every statistic from the materialised grads ``(B, …)`` per leaf, in NumPy float64."""
    leaves = [np.asarray(v, np.float64) for v in jax.tree.leaves(per_example)]
    B = leaves[0].shape[0]
    flat = np.concatenate([v.reshape(B, -1) for v in leaves], axis=1)  # row i: gᵢ
    gbar = flat.mean(0)
    g2 = gbar @ gbar
    tr = np.var(flat, axis=0, ddof=1).sum()
    proj = flat @ gbar
    resid = flat - np.outer(proj / g2, gbar)
    return {
        "sq_norms": np.sum(flat**2, 1),
        "trace_cov": tr,
        "grad_norm_sq": g2,
        "b_simple": tr / g2,
        "norm_test": np.sqrt(tr / (B * g2)),
        "inner_product_test": np.sqrt(np.var(proj, ddof=1) / (B * g2**2)),
        "orthogonality_test": np.sqrt(np.sum(resid**2) / (B - 1) / (B * g2)),
    }


def _check_against_reference(params, net, x, y, l2, state, key, train, rtol=1e-9):
    norms, stats, ref = _both(params, net, x, y, l2, state, key, train)
    B = x.shape[0]
    # per layer: the norm of that layer's own leaves of every example's materialised gradient
    ref_layers = pe.layer_entries(jax.tree.map(lambda v: v, ref))
    want = [
        np.sqrt(sum(np.sum(np.reshape(v, (B, -1)) ** 2, 1) for v in own.values()))
        for own in ref_layers
    ]
    assert len(norms.per_layer) == len(want) == len(pe.layer_names(net))
    # float64: the same sums in another order (measured ~1e-15 relative)
    chex.assert_trees_all_close(norms.per_layer, want, rtol=rtol, atol=1e-12)
    ns = _numpy_stats(ref)
    chex.assert_trees_all_close(norms.total, np.sqrt(ns["sq_norms"]), rtol=rtol)
    for name, value in ns.items():
        chex.assert_trees_all_close(getattr(stats, name), value, rtol=1e-7, custom_message=name)
    sq = jax.tree.map(lambda v: np.sum(np.asarray(v) ** 2, 0), ref)
    var = jax.tree.map(lambda v: np.var(np.asarray(v), 0, ddof=1), ref)
    scale = max(float(np.max(v)) for v in jax.tree.leaves(sq))
    chex.assert_trees_all_close(stats.sum_sq, sq, rtol=rtol, atol=rtol * scale)
    chex.assert_trees_all_close(stats.variance, var, rtol=1e-7, atol=1e-9 * scale)
    chex.assert_trees_all_close(
        stats.grads, jax.tree.map(lambda v: np.mean(v, 0), ref), rtol=rtol, atol=1e-12
    )
    return norms, stats


@pytest.mark.parametrize("l2", [0.0, 0.05])
def test_a_net_of_every_kind_matches_vmap_of_jax_grad_in_eval_mode(l2, x64):
    net = every_kind_net()
    params, state = perturbed(0, net, np.float64)
    x, y = random_net_data(1, net, 6, np.float64)
    _check_against_reference(params, net, x, y, l2, state, None, False)


def test_train_mode_dropout_uses_each_examples_row_of_the_masks(x64):
    net = fnbp.Net(
        (7, 2),
        [Conv(3, (3,), activation="relu"), Dropout(0.4), Flatten(),
         Residual((Dense(6, "tanh"), Dropout(0.3), LayerNorm()), learn_alpha=True), Dense(3)],
    )  # fmt: skip
    params, state = perturbed(2, net, np.float64)
    x, y = random_net_data(3, net, 5, np.float64)
    _check_against_reference(params, net, x, y, 0.05, state, jax.random.key(4, impl="rbg"), True)


@settings(max_examples=6)
@given(nets(), st.integers(0, 2**16), st.sampled_from([0.0, 0.05]))
def test_random_nets_match_vmap_of_jax_grad(net, seed, l2):
    train = not net.couples_examples  # train-mode BatchNorm is refused (below)
    with jax.enable_x64(True):
        params, state = perturbed(seed, net, np.float64)
        x, y = random_net_data(seed, net, 4, np.float64)
        _check_against_reference(
            params, net, x, y, l2, state, jax.random.key(seed, impl="rbg"), train
        )


@pytest.mark.parametrize(
    "conv, input_shape, method",
    [(Conv(16, (3, 3), padding="VALID"), (4, 4, 2), "gram T=4"),  # T(n_out + n_in) < n_out·n_in
     (Conv(2, (2, 2), strides=1), (6, 6, 2), "formed T=36")],  # forming each kernel grad is cheaper
)  # fmt: skip
def test_convolutions_take_the_cheaper_of_the_gram_form_and_forming_the_grads(
    conv, input_shape, method, x64
):
    net = fnbp.Net(input_shape, [conv, Flatten(), Dense(3)])
    params, state = perturbed(5, net, np.float64)
    x, y = random_net_data(6, net, 3, np.float64)
    out = _backward(params, net, x, y, 0.0)
    f = fx.example_factors(net.layers, params, out.trace, out.deltas, 3)[0]["W"]
    assert fx.uses_gram(f) is method.startswith("gram")
    assert pe.norm_methods(net) == [{"W": method, "b": "direct"}, {"W": "outer", "b": "direct"}]
    _check_against_reference(params, net, x, y, 0.0, state, None, False)


def test_a_dense_layers_per_example_norm_is_the_product_of_delta_and_input_norms(x64):
    """Goodfellow (2015): ‖∂ℓᵢ/∂W‖ = ‖δᵢ‖‖aᵢ‖ for the first layer, whose aᵢ is the input."""
    model = fnbp.MLP((4, 5, 3), "tanh")
    params = fnbp.init_params(jax.random.key(0), model, dtype=jnp.float64)
    x, y = random_net_data(1, model, 6, np.float64)
    b = fnbp.backprop(params, model, x, y)
    delta = np.asarray(b.deltas[0]) * 6  # δᵢ of example i's own loss: B × the batch's δ
    w_norm = np.linalg.norm(delta, axis=1) * np.linalg.norm(np.asarray(x), axis=1)
    norms = fnbp.per_example_grad_norms(params, model, x, y)
    want = np.sqrt(w_norm**2 + np.sum(delta**2, 1))  # W and b of layer 1 together
    chex.assert_trees_all_close(norms.per_layer[0], want, rtol=1e-12)


def test_kronecker_factors_of_the_first_and_last_dense_layers(x64):
    """A of the first layer is xᵀx/B of the inputs; G of the softmax output layer is
    Σᵢ (pᵢ − yᵢ)(pᵢ − yᵢ)ᵀ/B, the softmax computed here in NumPy."""
    model = fnbp.MLP((4, 6, 3), "relu")
    params = fnbp.init_params(jax.random.key(0), model, dtype=jnp.float64)
    x, y = random_net_data(1, model, 7, np.float64)
    stats = fnbp.gradient_stats(params, model, x, y)
    xs = np.asarray(x)
    chex.assert_trees_all_close(stats.kron[0]["W"]["A"], xs.T @ xs / 7, rtol=1e-12)
    h = np.maximum(xs @ np.asarray(params[0]["W"]).T + np.asarray(params[0]["b"]), 0)
    logits = h @ np.asarray(params[1]["W"]).T + np.asarray(params[1]["b"])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    r = p - np.eye(3)[np.asarray(y)]
    chex.assert_trees_all_close(stats.kron[1]["W"]["G"], r.T @ r / 7, rtol=1e-10)
    chex.assert_trees_all_close(stats.kron[1]["W"]["A"], h.T @ h / 7, rtol=1e-10)


def test_per_example_quantities_refuse_train_mode_batch_norm_naming_the_layer():
    net = fnbp.Net(3, [Dense(4), Residual((BatchNorm(),)), Dense(2)])
    params, state = perturbed(0, net)
    x, y = random_net_data(0, net, 4)
    for fn in (fnbp.per_example_grad_norms, fnbp.gradient_stats):
        with pytest.raises(ValueError, match=r"layer 2 \(residual\) branch layer 1 \(batch_norm\)"):
            fn(params, net, x, y, state=state, train=True)
        fn(params, net, x, y, state=state, train=False)  # eval mode: examples independent


def test_gradient_stats_needs_two_examples_and_bad_arguments_name_themselves():
    model = fnbp.MLP((3, 2))
    params = fnbp.init_params(jax.random.key(0), model)
    x, y = random_net_data(0, model, 1)
    with pytest.raises(ValueError, match="at least 2"):
        fnbp.gradient_stats(params, model, x, y)
    with pytest.raises(ValueError, match="l2"):
        fnbp.per_example_grad_norms(params, model, x, y, l2=-1.0)
    with pytest.raises(ValueError, match=r"x"):
        fnbp.per_example_grad_norms(params, model, jnp.zeros((2, 4)), jnp.zeros(2, int))


def test_a_population_of_models_vmaps_and_float32_stays_close_to_float64():
    model = fnbp.MLP((5, 8, 3), "gelu")
    keys = jax.random.split(jax.random.key(0), 3)
    population = jax.vmap(lambda k: fnbp.init_params(k, model))(keys)
    x, y = random_net_data(1, model, 6)
    batched = jax.vmap(lambda p: fnbp.per_example_grad_norms(p, model, x, y).total)(population)
    for m in range(3):
        one = jax.tree.map(lambda v, m=m: v[m], population)
        # float32: the same program per model, vmapped (measured ~1e-7 relative)
        chex.assert_trees_all_close(
            batched[m], fnbp.per_example_grad_norms(one, model, x, y).total, rtol=1e-5
        )
        with jax.enable_x64(True):
            one64 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), one)
            exact = fnbp.per_example_grad_norms(one64, model, jnp.asarray(x, jnp.float64), y).total
        chex.assert_trees_all_close(batched[m], exact, rtol=1e-5)  # float32 rounding of a few sums
