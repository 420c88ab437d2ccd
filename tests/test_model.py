"""Tests of fnbp/model.py: the MLP spec, forward/loss/accuracy against NumPy, and validation."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp

# float64 forward passes: a few matmuls of width ≤ 9, each rounded at ~1e-16; 1e-12 is far
# below any wrong layer, transposition or activation.
RTOL64, ATOL64 = 1e-12, 1e-14

NP_ACT = {
    "relu": lambda z: np.maximum(z, 0.0),
    "tanh": np.tanh,
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "identity": lambda z: z,
}


def _numpy_forward(params, model, x):
    """The network written out in NumPy: a⁽ˡ⁾ = f(W⁽ˡ⁾ a⁽ˡ⁻¹⁾ + b⁽ˡ⁾), one example at a time."""
    out = []
    for xn in np.asarray(x, np.float64):
        a = xn
        for l, p in enumerate(params, start=1):
            z = np.asarray(p["W"], np.float64) @ a + np.asarray(p["b"], np.float64)
            a = NP_ACT[model.output_activation if l == len(params) else model.activation](z)
        out.append(a)
    return np.stack(out)


def _setup(model, batch=7, seed=0, dtype=jnp.float32, bias_std=0.2):
    k_p, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
    scheme = fnbp.variance_scaling_scheme(2.0, bias_std=bias_std)  # nonzero biases: they count
    params = fnbp.init_params(k_p, model, scheme, dtype=dtype)
    x = jax.random.normal(k_x, (batch, model.sizes[0]), dtype)
    y = jax.random.randint(k_y, (batch,), 0, model.sizes[-1])
    return params, x, y


# ----------------------------------------------------------------------------------------------
# The MLP spec.


def test_mlp_is_hashable_and_equal_specs_hash_equal():
    a = fnbp.MLP((4, 5, 3), "tanh")
    b = fnbp.MLP([4, 5, 3], "tanh")
    assert a == b and hash(a) == hash(b)
    assert a != fnbp.MLP((4, 5, 3), "relu")
    assert a != fnbp.MLP((4, 6, 3), "tanh")
    assert len({a, b, fnbp.MLP((4, 5, 3))}) == 2


def test_mlp_is_frozen():
    model = fnbp.MLP((4, 3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.sizes = (5, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.activation = "tanh"
    assert model.sizes == (4, 3) and model.activation == "relu"


def test_mlp_is_a_pytree_with_no_leaves():
    model = fnbp.MLP((4, 5, 3))
    assert jax.tree.leaves(model) == []
    assert jax.tree.map(lambda v: v + 1, model) == model
    params = fnbp.init_params(jax.random.key(0), model)
    # next to params, it adds nothing to the leaves
    assert len(jax.tree.leaves((params, model))) == len(jax.tree.leaves(params)) == 4


def test_mlp_passes_through_jit_as_an_ordinary_argument_and_retraces_per_spec():
    relu, tanh = fnbp.MLP((4, 5, 3)), fnbp.MLP((4, 5, 3), "tanh")
    params, x, _ = _setup(relu)
    traces = []

    def f(p, m, x):
        traces.append(m)
        return fnbp.forward(p, m, x)

    jitted = jax.jit(f)  # no static_argnums
    out_relu = jitted(params, relu, x)
    jitted(params, relu, x)
    jitted(params, fnbp.MLP([4, 5, 3]), x)  # an equal spec built afresh: a cache hit
    assert traces == [relu]
    out_tanh = jitted(params, tanh, x)  # same shapes, different spec: must retrace
    assert traces == [relu, tanh]
    # and the retrace really used the new spec
    chex.assert_trees_all_close(out_relu, fnbp.forward(params, relu, x), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(out_tanh, fnbp.forward(params, tanh, x), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(out_relu), np.asarray(out_tanh))


def test_jitted_forward_traces_once_for_repeated_calls():
    model = fnbp.MLP((4, 5, 3))
    params, x, _ = _setup(model)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(p, m, x):
        return fnbp.forward(p, m, x)

    for i in range(3):
        f(params, model, x + i)
    with pytest.raises(AssertionError, match="traced"):  # a second spec would be a second trace
        f(params, fnbp.MLP((4, 5, 3), "tanh"), x)


def test_sizes_list_is_converted_to_a_tuple_of_ints():
    model = fnbp.MLP([np.int64(4), 5, np.int32(3)])
    assert model.sizes == (4, 5, 3)
    assert type(model.sizes) is tuple
    assert all(type(s) is int for s in model.sizes)


@pytest.mark.parametrize(
    ("sizes", "num_layers", "num_params"),
    [
        ((784, 16, 16, 10), 3, 13002),  # 784·16+16 + 16·16+16 + 16·10+10
        ((3, 1), 1, 4),
        ((2, 3, 4, 5, 6), 4, 9 + 16 + 25 + 36),
    ],
)
def test_num_layers_and_num_params(sizes, num_layers, num_params):
    model = fnbp.MLP(sizes)
    assert model.num_layers == num_layers
    assert model.num_params == num_params
    params = fnbp.init_params(jax.random.key(0), model)
    assert sum(v.size for v in jax.tree.leaves(params)) == num_params


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"sizes": (5,)}, ValueError, "at least two entries"),
        ({"sizes": ()}, ValueError, "at least two entries"),
        ({"sizes": []}, ValueError, "at least two entries"),
        ({"sizes": (5, 0)}, ValueError, "positive int"),
        ({"sizes": (5, -3, 2)}, ValueError, "positive int"),
        ({"sizes": (5, 3.0)}, ValueError, "positive int"),
        ({"sizes": (5, True)}, ValueError, "positive int"),
        ({"sizes": (5, "3")}, ValueError, "positive int"),
        ({"sizes": "53"}, TypeError, "sequence of ints"),
        ({"sizes": 5}, TypeError, "sequence of ints"),
        ({"sizes": (4, 3), "activation": "swish"}, ValueError, "unknown activation 'swish'"),
        (
            {"sizes": (4, 3), "loss": "mse", "output_activation": "soft"},
            ValueError,
            "unknown activation 'soft'",
        ),
        ({"sizes": (4, 3), "loss": "hinge"}, ValueError, "unknown loss 'hinge'"),
        (
            {"sizes": (4, 3), "output_activation": "sigmoid"},
            ValueError,
            "output_activation must be 'identity'",
        ),
        (
            {
                "sizes": (4, 3),
                "loss": "sigmoid_binary_cross_entropy",
                "output_activation": "sigmoid",
            },
            ValueError,
            "output_activation must be 'identity'",
        ),
        (
            {"sizes": (4, 3), "loss": "softmax_cross_entropy", "output_activation": "tanh"},
            ValueError,
            "output_activation must be 'identity'",
        ),
    ],
)
def test_bad_spec_raises_with_a_message_naming_the_problem(kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        fnbp.MLP(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "table"),
    [
        ({"activation": "swish"}, fnbp.ACTIVATIONS),
        ({"loss": "mse", "output_activation": "swish"}, fnbp.ACTIVATIONS),
        ({"loss": "hinge"}, fnbp.LOSSES),
    ],
)
def test_unknown_names_in_a_spec_list_the_valid_names(kwargs, table):
    with pytest.raises(ValueError) as info:
        fnbp.MLP((4, 3), **kwargs)
    for name in table:
        assert repr(name) in str(info.value)


def test_mse_accepts_a_squashing_output_activation():
    assert (
        fnbp.MLP((4, 3), loss="mse", output_activation="sigmoid").layer_activation(1).name
        == "sigmoid"
    )


# ----------------------------------------------------------------------------------------------
# forward, loss and accuracy against NumPy.


@pytest.mark.parametrize(
    "model",
    [
        fnbp.MLP((5, 7, 6, 3), "relu"),
        fnbp.MLP((5, 9, 4), "tanh", "mse", "sigmoid"),
        fnbp.MLP((3, 1), "relu", "mse"),
    ],
    ids=str,
)
def test_forward_equals_a_numpy_network(model, x64):
    params, x, _ = _setup(model, dtype=jnp.float64)
    out = fnbp.forward(params, model, x)
    assert out.shape == (7, model.sizes[-1]) and out.dtype == jnp.float64
    chex.assert_trees_all_close(out, _numpy_forward(params, model, x), rtol=RTOL64, atol=ATOL64)


def test_forward_keeps_float32():
    model = fnbp.MLP((5, 6, 3))
    params, x, _ = _setup(model)
    out = fnbp.forward(params, model, x)
    assert out.dtype == jnp.float32 and out.shape == (7, 3)


def _numpy_softmax_ce(logits, onehot):
    m = logits.max(axis=1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
    return -(onehot * logp).sum(axis=1).mean()


@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_loss_is_mean_softmax_ce_plus_half_lambda_weight_norms_without_biases(l2, x64):
    model = fnbp.MLP((5, 8, 6, 4), "tanh")
    params, x, y = _setup(model, batch=9, dtype=jnp.float64, bias_std=0.5)
    onehot = np.eye(4)[np.asarray(y)]
    penalty = 0.5 * l2 * sum((np.asarray(p["W"]) ** 2).sum() for p in params)  # no biases
    expected = _numpy_softmax_ce(_numpy_forward(params, model, x), onehot) + penalty
    for labels in (y, jnp.asarray(onehot)):
        got = float(fnbp.loss(params, model, x, labels, l2=l2))
        assert got == pytest.approx(expected, rel=1e-12)
    if l2:  # the biases are large here; decaying them too would shift the loss by > 1e-2
        bias_norm = sum((np.asarray(p["b"]) ** 2).sum() for p in params)
        assert 0.5 * l2 * bias_norm > 1e-2


def test_loss_without_l2_is_finite_even_where_a_weight_squares_past_the_largest_float():
    """λ = 0 is no penalty at all: (λ/2)‖W‖² is 0, not 0·∞ = NaN, when a float32 weight of
    1e30 squares past 3.4e38. That weight multiplies a dead ReLU unit, so the data loss is an
    ordinary ½(2 − 0)² = 2; with λ > 0 the penalty (5e58) overflows and the loss is inf."""
    model = fnbp.MLP((1, 2, 1), "relu", "mse")
    params = [
        {"W": jnp.array([[1.0], [-1.0]]), "b": jnp.zeros(2)},  # a⁽¹⁾ = (1, 0): unit 2 is dead
        {"W": jnp.array([[2.0, 1e30]]), "b": jnp.zeros(1)},  # z⁽²⁾ = 2·1 + 1e30·0 = 2
    ]
    x, y = jnp.ones((1, 1)), jnp.zeros((1, 1))
    assert float(fnbp.loss(params, model, x, y)) == 2.0
    assert float(fnbp.backprop(params, model, x, y).loss) == 2.0
    assert float(fnbp.autodiff_grads(params, model, x, y)[0]) == 2.0
    assert float(fnbp.loss(params, model, x, y, l2=0.1)) == np.inf


def test_mse_loss_is_the_mean_of_half_squared_errors(x64):
    model = fnbp.MLP((5, 6, 3), "tanh", "mse", "sigmoid")
    params, x, _ = _setup(model, dtype=jnp.float64)
    t = np.asarray(jax.random.uniform(jax.random.key(9), (7, 3), jnp.float64))
    expected = (0.5 * ((_numpy_forward(params, model, x) - t) ** 2).sum(axis=1)).mean()
    assert float(fnbp.loss(params, model, x, jnp.asarray(t))) == pytest.approx(expected, rel=1e-12)


def test_bce_loss_is_the_mean_of_summed_binary_cross_entropies(x64):
    model = fnbp.MLP((5, 6, 3), "relu", "sigmoid_binary_cross_entropy")
    params, x, _ = _setup(model, dtype=jnp.float64)
    t = np.asarray(jax.random.uniform(jax.random.key(9), (7, 3), jnp.float64))
    p = 1.0 / (1.0 + np.exp(-_numpy_forward(params, model, x)))
    expected = (-(t * np.log(p) + (1 - t) * np.log(1 - p))).sum(axis=1).mean()
    assert float(fnbp.loss(params, model, x, jnp.asarray(t))) == pytest.approx(expected, rel=1e-10)


def test_accuracy_equals_numpy_argmax_accuracy_for_integer_and_one_hot_labels():
    model = fnbp.MLP((6, 8, 5))
    params, x, y = _setup(model, batch=64)
    pred = _numpy_forward(params, model, x).argmax(axis=1)
    expected = float((pred == np.asarray(y)).mean())
    assert 0.0 < expected < 1.0  # random labels: neither trivial value, so the test can fail
    for labels in (y, jax.nn.one_hot(y, 5)):
        assert float(fnbp.accuracy(params, model, x, labels)) == pytest.approx(expected, abs=1e-7)
    assert float(fnbp.accuracy(params, model, x, jnp.asarray(pred))) == 1.0


# ----------------------------------------------------------------------------------------------
# Validation at the boundary.

_MODEL = fnbp.MLP((4, 5, 3))


def _good():
    params, x, y = _setup(_MODEL, batch=6)
    return {"params": params, "model": _MODEL, "x": x, "y": y, "l2": 0.0}


def _without_b(params):
    return [{"W": params[0]["W"]}, params[1]]


def _transposed(params):
    return [{"W": params[0]["W"].T, "b": params[0]["b"]}, params[1]]


BAD_INPUTS = {
    "x rank 1": ({"x": jnp.zeros(4)}, ValueError, r"x must have shape \(batch, 4\)"),
    "x rank 3": ({"x": jnp.zeros((6, 4, 1))}, ValueError, r"x must have shape \(batch, 4\)"),
    "x wrong features": ({"x": jnp.zeros((6, 5))}, ValueError, r"x must have shape \(batch, 4\)"),
    "x integer": ({"x": jnp.zeros((6, 4), jnp.int32)}, TypeError, "x must be a floating array"),
    "x a list": ({"x": [[0.0] * 4] * 6}, TypeError, "x must be an array"),
    "y wrong length": ({"y": jnp.zeros(5, jnp.int32)}, ValueError, "y must have 6 rows"),
    "label -1": ({"y": jnp.array([0, 1, 2, -1, 0, 1])}, ValueError, r"labels must lie in \[0, 3\)"),
    "label == classes": (
        {"y": jnp.array([0, 1, 2, 3, 0, 1])},
        ValueError,
        r"labels must lie in \[0, 3\)",
    ),
    "y wrong width": (
        {"y": jnp.zeros((6, 4))},
        ValueError,
        r"y has shape \(6, 4\) but the model has 3 outputs",
    ),
    "y float vector": (
        {"y": jnp.zeros(6)},
        ValueError,
        "neither integer class indices nor targets",
    ),
    "y rank 3": ({"y": jnp.zeros((6, 3, 1))}, ValueError, "y must have 6 rows"),
    "params missing a layer": ({"params": lambda p: p[:1]}, ValueError, "params has 1 layers"),
    "W transposed": (
        {"params": _transposed},
        ValueError,
        r"params\[0\]\['W'\] \(layer 1\) must have shape \(5, 4\)",
    ),
    "b missing": (
        {"params": _without_b},
        ValueError,
        r"params\[0\] must be a dict with keys 'W' and 'b'",
    ),
    "params a dict": ({"params": lambda p: {"layers": p}}, TypeError, "params must be a list"),
    "W integer": (
        {"params": lambda p: [{"W": p[0]["W"].astype(jnp.int32), "b": p[0]["b"]}, p[1]]},
        TypeError,
        r"params\[0\]\['W'\] must be a floating array",
    ),
    "l2 negative": ({"l2": -0.1}, ValueError, "l2 must be a finite number >= 0"),
    "l2 nan": ({"l2": float("nan")}, ValueError, "l2 must be a finite number >= 0"),
    "l2 inf": ({"l2": float("inf")}, ValueError, "l2 must be a finite number >= 0"),
    "model a tuple": ({"model": (4, 5, 3)}, TypeError, "model must be an fnbp.MLP"),
}


def _apply(change):
    args = _good()
    for k, v in change.items():
        args[k] = v(args[k]) if callable(v) else v
    return args


def _uses_y_or_l2(change):
    return "y" in change or "l2" in change


@pytest.mark.parametrize(("change", "error", "fragment"), BAD_INPUTS.values(), ids=BAD_INPUTS)
def test_loss_rejects_bad_input_naming_the_argument(change, error, fragment):
    a = _apply(change)
    with pytest.raises(error, match=fragment):
        fnbp.loss(a["params"], a["model"], a["x"], a["y"], l2=a["l2"])


@pytest.mark.parametrize(("change", "error", "fragment"), BAD_INPUTS.values(), ids=BAD_INPUTS)
def test_forward_and_accuracy_reject_bad_input_naming_the_argument(change, error, fragment):
    a = _apply(change)
    if "l2" not in change:
        with pytest.raises(error, match=fragment):
            fnbp.accuracy(a["params"], a["model"], a["x"], a["y"])
    if not _uses_y_or_l2(change):
        with pytest.raises(error, match=fragment):
            fnbp.forward(a["params"], a["model"], a["x"])


def test_good_inputs_pass_validation():
    a = _good()
    assert np.isfinite(float(fnbp.loss(a["params"], a["model"], a["x"], a["y"], l2=a["l2"])))
    # tuple params, one-hot float labels and a concrete jnp scalar l2 are all accepted
    params = tuple(a["params"])
    fnbp.loss(params, _MODEL, a["x"], jax.nn.one_hot(a["y"], 3), l2=jnp.float32(0.1))


def test_inside_jit_the_label_range_check_is_skipped_but_shape_checks_still_raise():
    params, x, _ = _setup(_MODEL, batch=6)
    out_of_range = jnp.array([0, 1, 2, 3, 0, 1])  # 3 is not a class of a 3-output model
    with pytest.raises(ValueError, match="labels must lie in"):
        fnbp.loss(params, _MODEL, x, out_of_range)
    jitted = jax.jit(lambda p, x, y: fnbp.loss(p, _MODEL, x, y))
    # y is a tracer: its values are unknown at trace time, so no check and no error
    assert np.isfinite(float(jitted(params, x, out_of_range)))
    # shapes are known at trace time, so these still raise
    with pytest.raises(ValueError, match="x must have shape"):
        jitted(params, x[:, :3], out_of_range)
    with pytest.raises(ValueError, match="y must have 6 rows"):
        jitted(params, x, out_of_range[:5])
    with pytest.raises(ValueError, match=r"params\[0\]\['W'\]"):
        jitted(_transposed(params), x, out_of_range)


def test_inside_jit_a_traced_l2_is_not_checked_but_a_concrete_one_is():
    params, x, y = _setup(_MODEL, batch=6)
    jitted = jax.jit(lambda l2: fnbp.loss(params, _MODEL, x, y, l2=l2))
    assert np.isfinite(float(jitted(0.1)))
    with pytest.raises(ValueError, match="l2"):
        jax.jit(lambda p: fnbp.loss(p, _MODEL, x, y, l2=-0.1))(params)
