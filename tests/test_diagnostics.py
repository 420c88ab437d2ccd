"""Tests of fnbp/diagnostics.py: layer_stats against a forward pass and jax.grad written here,
and its measured χ against mean-field theory on wide random networks."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp import theory
from fnbp.diagnostics import layer_stats

# float64: the reference and layer_stats do the same arithmetic in different orders, rounding
# at ~1e-16 per operation over three layers; 1e-10 is still orders tighter than any real bug.
RTOL64, ATOL64 = 1e-10, 1e-14

FIELDS = ("delta_sq", "delta_norm", "weight_grad_norm", "preactivation_q", "activation_std")


def _small_problem():
    """A 6-8-7-3 tanh classifier in float64 (call under x64). Drawn with NumPy's RNG: cheap (no
    threefry compilation) and with nonzero biases, so every term of the forward pass matters."""
    model = fnbp.MLP((6, 8, 7, 3), "tanh")
    rng = np.random.default_rng(0)
    params = [
        {
            "W": jnp.asarray(rng.normal(0.0, np.sqrt(1.5 / n_in), (n_out, n_in))),
            "b": jnp.asarray(rng.normal(0.0, 0.2, n_out)),
        }
        for n_in, n_out in zip(model.sizes[:-1], model.sizes[1:], strict=True)
    ]
    x = jnp.asarray(rng.normal(size=(10, 6)))
    y = jnp.asarray(rng.integers(0, 3, 10))
    return model, params, x, y


def _forward_with_offsets(params, x, offsets):
    """tanh hidden layers, identity output: z⁽ˡ⁾ = a⁽ˡ⁻¹⁾Wᵀ + b + offset⁽ˡ⁾, written out here."""
    zs, acts, a = [], [], x
    for l, (p, off) in enumerate(zip(params, offsets, strict=True), start=1):
        z = a @ p["W"].T + p["b"][None, :] + off
        a = z if l == len(params) else jnp.tanh(z)
        zs.append(z)
        acts.append(a)
    return zs, acts


def _ce_loss(params, x, y, offsets):
    zs, _ = _forward_with_offsets(params, x, offsets)
    logp = jax.nn.log_softmax(zs[-1])
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


@jax.jit
def _reference_stats(params, model, x, y):
    offsets = [jnp.zeros((x.shape[0], n), x.dtype) for n in model.sizes[1:]]
    zs, acts = _forward_with_offsets(params, x, offsets)
    deltas = jax.grad(lambda o: _ce_loss(params, x, y, o))(offsets)  # δ⁽ˡ⁾ = ∂L/∂z⁽ˡ⁾
    w_grads = jax.grad(lambda p: fnbp.loss(p, model, x, y))(params)
    return {
        "loss": _ce_loss(params, x, y, offsets),
        "delta_sq": jnp.stack([jnp.sum(d**2) for d in deltas]),
        "delta_norm": jnp.stack([jnp.mean(jnp.sqrt(jnp.sum(d**2, axis=1))) for d in deltas]),
        "weight_grad_norm": jnp.stack([jnp.sqrt(jnp.sum(g["W"] ** 2)) for g in w_grads]),
        "preactivation_q": jnp.stack([jnp.mean(z**2) for z in zs]),
        "activation_std": jnp.stack([jnp.std(a) for a in acts]),
    }


def test_every_field_equals_an_independent_forward_pass_and_jax_grad(x64):
    model, params, x, y = _small_problem()
    stats = layer_stats(params, model, x, y)
    expected = _reference_stats(params, model, x, y)
    assert set(stats) == set(expected)
    for name in expected:
        chex.assert_trees_all_close(stats[name], expected[name], rtol=RTOL64, atol=ATOL64)


def test_every_per_layer_field_has_shape_num_layers_and_loss_is_a_scalar(x64):
    model, params, x, y = _small_problem()
    stats = layer_stats(params, model, x, y)
    assert stats["loss"].shape == ()
    for name in FIELDS:
        assert stats[name].shape == (model.num_layers,), name
        assert np.all(np.isfinite(stats[name])), name


def test_layer_stats_vmaps_over_a_population_from_vmapped_init_params(x64):
    model, _, x, y = _small_problem()
    keys = jax.random.split(jax.random.key(7), 4)
    population = jax.vmap(lambda k: fnbp.init_params(k, model, dtype=jnp.float64))(keys)
    stats = jax.vmap(lambda p: layer_stats(p, model, x, y))(population)
    assert stats["loss"].shape == (4,)
    for name in FIELDS:
        assert stats[name].shape == (4, model.num_layers), name
    for i in (0, 3):  # each row is that member's own statistics, not a mix
        member = jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], population)
        expected = _reference_stats(member, model, x, y)
        for name in expected:
            chex.assert_trees_all_close(stats[name][i], expected[name], rtol=RTOL64, atol=ATOL64)


def test_layer_stats_rejects_params_that_do_not_fit_the_model(x64):
    model, params, x, y = _small_problem()
    with pytest.raises(ValueError, match="layers"):
        layer_stats(params[:2], model, x, y)
    wrong = [dict(p) for p in params]
    wrong[1] = {"W": params[1]["W"][:, :5], "b": params[1]["b"]}
    with pytest.raises(ValueError, match=r"params\[1\]\['W'\]"):
        layer_stats(wrong, model, x, y)


def test_layer_stats_rejects_inputs_and_labels_that_do_not_fit_the_model(x64):
    model, params, x, y = _small_problem()
    with pytest.raises(ValueError, match="x must have shape"):
        layer_stats(params, model, x[:, :5], y)
    with pytest.raises(ValueError, match="rows"):
        layer_stats(params, model, x, y[:4])
    with pytest.raises(ValueError, match="class labels"):
        layer_stats(params, model, x, y.at[0].set(3))


# ----------------------------------------------------------------------------------------------
# Measured χ on wide ReLU networks against mean-field theory.


def _measured_chi_relu(sigma_w2, seeds=6, width=256, depth=12, batch=32):
    """Geometric mean over seeds and middle layers of delta_sq[l − 1] / delta_sq[l] (the
    measured χ of layer l), and the mean measured q of those layers."""
    model = fnbp.MLP((width,) * (depth + 1), "relu")
    scheme = fnbp.variance_scaling_scheme(sigma_w2)
    keys = jax.random.split(jax.random.key(2024), seeds)
    population = jax.vmap(lambda k: fnbp.init_params(k, model, scheme, dtype=jnp.float64))(keys)
    rng = np.random.default_rng(99)
    x = jnp.asarray(rng.normal(size=(batch, width)))
    y = jnp.asarray(rng.integers(0, width, batch))
    stats = jax.vmap(lambda p: layer_stats(p, model, x, y))(population)
    delta_sq = np.asarray(stats["delta_sq"])  # (seeds, depth)
    middle = slice(2, depth - 2)  # away from the input and the softmax output layer
    ratios = delta_sq[:, :-1] / delta_sq[:, 1:]  # ratios[:, l − 1] = χ of layer l
    q = np.asarray(stats["preactivation_q"])[:, :-1][:, middle]
    return float(np.exp(np.mean(np.log(ratios[:, middle])))), q


@pytest.mark.parametrize("sigma_w2, expected_chi", [(2.0, 1.0), (1.0, 0.5)])
def test_wide_relu_net_measured_delta_ratio_matches_mean_field_chi(sigma_w2, expected_chi, x64):
    measured, q = _measured_chi_relu(sigma_w2)
    # Theory at each measured q (ReLU's χ is scale-free, so it is the closed form σ_w²/2).
    predicted = np.array([theory.chi("relu", sigma_w2, float(v)) for v in q.ravel()])
    np.testing.assert_allclose(predicted, expected_chi, rtol=1e-12)
    # Width 256: each layer's ratio fluctuates by a few percent (O(1/√width)); the geometric
    # mean over 6 seeds × 8 layers is well inside 10%, while the other init's χ is 2× away.
    assert measured == pytest.approx(expected_chi, rel=0.10)


# ----------------------------------------------------------------------------------------------
# Nets: a CNN and a ResNet, against jax.grad of the reference loss written with offsets.


def _cnn():
    from fnbp.layers import Conv, Dense, Flatten, MaxPool

    return fnbp.Net((6, 6, 1), [
        Conv(3, (3, 3), activation="tanh"),
        MaxPool((2, 2)),
        Conv(4, (2, 2), padding="VALID", activation="relu"),
        Flatten(),
        Dense(3),
    ])  # fmt: skip


def _resnet():
    from fnbp.layers import BatchNorm, Dense, LayerNorm, Residual

    return fnbp.Net(6, [
        Dense(8, "tanh"),
        Residual((Dense(8, "tanh"), LayerNorm(), Dense(8)), alpha=0.5),
        BatchNorm(activation="relu"),
        Residual((Dense(5, "relu"),), alpha=0.3, learn_alpha=True),  # projects 8 → 5
        Dense(3),
    ])  # fmt: skip


def _random_params(net, seed=0):
    """Params of ``net`` drawn with NumPy's RNG (cheap: no threefry compilation per shape),
    away from init's special values (γ = 1, β = 0, b = 0 hide bugs): N(0, 0.5²) entries,
    γ = 1 + N(0, 0.3²)."""
    rng = np.random.default_rng(seed)
    like = jax.eval_shape(lambda: fnbp.init_params(jax.random.key(0), net, dtype=jnp.float64))

    def draw(path, v):
        gamma = path[-1].key == "gamma"
        return jnp.asarray(rng.normal(1.0 if gamma else 0.0, 0.3 if gamma else 0.5, v.shape))

    return jax.tree_util.tree_map_with_path(draw, like)


def _weight_leaves(g):
    """Every weight matrix in a layer's grads, found by name (dense and conv W, projections
    P, nested branches included); not b, γ, β, α."""
    if isinstance(g, dict):
        return [v for k, v in g.items() if k in ("W", "P")] + _weight_leaves(g.get("branch", []))
    return [w for item in g for w in _weight_leaves(item)]


@functools.partial(jax.jit, static_argnames=("net", "train"))
def _reference_net_stats(params, net, x, y, state, train):
    from fnbp.model import _loss_and_state, run

    tr = run(params, net, x, state=state, train=train)
    offsets = [jnp.zeros_like(z) for z in tr.z]  # z⁽ⁱ⁾ + offset⁽ⁱ⁾: a residual block's stream z
    loss = lambda p, o: _loss_and_state(p, net, x, y, 0.0, None, state, None, train, o)[0]  # noqa: E731
    deltas = jax.grad(loss, argnums=1)(params, offsets)  # δ⁽ⁱ⁾ = ∂L/∂z⁽ⁱ⁾
    grads = jax.grad(loss)(params, offsets)
    axes = lambda v: tuple(range(1, v.ndim))  # noqa: E731 (every axis but the batch's)
    norm = lambda ws: jnp.sqrt(sum(jnp.sum(w**2) for w in ws)) if ws else jnp.nan  # noqa: E731
    return {
        "loss": loss(params, offsets),
        "delta_sq": jnp.stack([jnp.sum(d**2) for d in deltas]),
        "delta_norm": jnp.stack([jnp.mean(jnp.sqrt(jnp.sum(d**2, axis=axes(d)))) for d in deltas]),
        "weight_grad_norm": jnp.stack([norm(_weight_leaves(g)) for g in grads]),
        "preactivation_q": jnp.stack([jnp.mean(z**2) for z in tr.z]),
        "activation_std": jnp.stack([jnp.std(a) for a in tr.a[1:]]),
    }


@pytest.mark.parametrize("make, train", [(_cnn, False), (_resnet, True)], ids=["cnn", "resnet"])
def test_layer_stats_of_a_cnn_and_a_resnet_equal_jax_grad_through_offsets(make, train, x64):
    net = make()
    params = _random_params(net)
    state = fnbp.init_state(net)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(7, *net.input_shape)))
    y = jnp.asarray(rng.integers(0, 3, 7))
    stats = layer_stats(params, net, x, y, state=state, train=train if net.needs_train else None)
    expected = _reference_net_stats(params, net, x, y, state, train)
    assert set(stats) == set(expected)
    for name in FIELDS:
        assert stats[name].shape == (len(net.layers),), name
    # layers without weights (pooling, flatten, normalization) have no weight-gradient norm
    no_weights = [i for i, layer in enumerate(net.layers) if layer.kind in ("max_pool", "flatten",
                                                                            "batch_norm")]  # fmt: skip
    assert np.flatnonzero(np.isnan(stats["weight_grad_norm"])).tolist() == no_weights
    for name in expected:  # float64: the same sums in another order (see RTOL64)
        chex.assert_trees_all_close(stats[name], expected[name], rtol=RTOL64, atol=ATOL64)
