"""Tests of fnbp/flax_interop.py: the same network as a Flax Linen module, and back."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnbp
from fnbp.flax_interop import FlaxMLP, from_flax, to_flax


def _net(sizes, activation="relu", *, key=0, dtype=jnp.float32, scheme="glorot_normal", **kw):
    model = fnbp.MLP(sizes, activation, **kw)
    params = fnbp.init_params(jax.random.key(key), model, scheme, dtype=dtype)
    # Non-zero biases, so a bias dropped or misplaced in the conversion would show.
    params = [
        dict(p, b=0.3 * jax.random.normal(jax.random.key(100 + i), p["b"].shape, dtype))
        for i, p in enumerate(params)
    ]
    return params, model


def _data(model, batch=16, dtype=jnp.float32, key=1):
    k_x, k_y = jax.random.split(jax.random.key(key))
    x = jax.random.normal(k_x, (batch, model.sizes[0]), dtype)
    y = jax.random.randint(k_y, (batch,), 0, model.sizes[-1])
    return x, y


@pytest.mark.parametrize("activation", sorted(fnbp.ACTIVATIONS))
def test_to_flax_apply_equals_fnbp_forward(activation):
    params, model = _net((6, 9, 7, 4), activation)
    x, _ = _data(model)
    module, variables = to_flax(params, model)
    out = module.apply(variables, x)
    assert out.shape == (16, 4) and out.dtype == jnp.float32
    # Same float32 ops in the same order up to XLA fusion: agreement to a few ulps.
    chex.assert_trees_all_close(out, fnbp.forward(params, model, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("output_activation", ["sigmoid", "tanh"])
def test_to_flax_applies_the_output_activation(output_activation):
    params, model = _net((5, 8, 3), "gelu", loss="mse", output_activation=output_activation)
    x, _ = _data(model)
    module, variables = to_flax(params, model)
    out = module.apply(variables, x)
    # float32, as above.
    chex.assert_trees_all_close(out, fnbp.forward(params, model, x), rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(out))) < 1.0  # squashed: the activation really is there


def test_to_flax_variables_hold_transposed_weights_named_by_layer():
    params, model = _net((5, 8, 3))
    module, variables = to_flax(params, model)
    assert isinstance(module, FlaxMLP) and module.sizes == (5, 8, 3)
    assert set(variables["params"]) == {"layer1", "layer2"}
    np.testing.assert_array_equal(variables["params"]["layer1"]["kernel"], params[0]["W"].T)
    np.testing.assert_array_equal(variables["params"]["layer2"]["bias"], params[1]["b"])
    # The module's own init gives the same tree structure and shapes.
    fresh = module.init(jax.random.key(0), jnp.zeros((1, 5)))
    assert jax.tree.structure(fresh) == jax.tree.structure(variables)
    chex.assert_trees_all_equal_shapes(fresh, variables)


def _flax_grads(module, variables, x, y):
    """jax.grad of the mean softmax cross-entropy of the Flax module, computed with optax."""

    def loss(v):
        logits = module.apply(v, x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return jax.jit(jax.value_and_grad(loss))(variables)


def _as_fnbp(grads):
    g = grads["params"]
    return [
        {"W": g[f"layer{l}"]["kernel"].T, "b": g[f"layer{l}"]["bias"]} for l in range(1, len(g) + 1)
    ]


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "softplus"])
def test_jax_grad_through_flax_equals_hand_written_backprop(activation):
    params, model = _net((7, 12, 10, 5), activation)
    x, y = _data(model, batch=32)
    module, variables = to_flax(params, model)
    flax_loss, flax_grads = _flax_grads(module, variables, x, y)
    r = fnbp.backprop(params, model, x, y)
    # float32: ~6e-8 rounding per op accumulated over 3 layers and a 32-row sum (see crosscheck).
    chex.assert_trees_all_close(r.loss, flax_loss, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(r.grads, _as_fnbp(flax_grads), rtol=1e-5, atol=1e-7)
    assert float(jnp.linalg.norm(r.grads[0]["W"])) > 1e-3  # not a vacuous all-zero comparison


def test_jax_grad_through_flax_equals_backprop_in_float64(x64):
    params, model = _net((7, 12, 10, 5), "tanh", dtype=jnp.float64)
    x, y = _data(model, batch=32, dtype=jnp.float64)
    module, variables = to_flax(params, model)
    assert variables["params"]["layer1"]["kernel"].dtype == jnp.float64
    flax_loss, flax_grads = _flax_grads(module, variables, x, y)
    r = fnbp.backprop(params, model, x, y)
    assert r.grads[0]["W"].dtype == jnp.float64
    # float64: rounding ~1e-16 per op; 1e-10 leaves room for depth and still fails any real bug.
    chex.assert_trees_all_close(r.loss, flax_loss, rtol=1e-10, atol=1e-14)
    chex.assert_trees_all_close(r.grads, _as_fnbp(flax_grads), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "mse"])
def test_from_flax_inverts_to_flax_exactly(loss):
    params, model = _net((4, 6, 3), "silu", loss=loss)
    module, variables = to_flax(params, model)
    back, model_back = from_flax(module, variables, loss=loss)
    assert model_back == model
    chex.assert_trees_all_equal(back, params)


def test_from_flax_accepts_variables_from_module_init():
    module = FlaxMLP((3, 5, 2), "tanh")
    variables = module.init(jax.random.key(0), jnp.zeros((1, 3)))
    params, model = from_flax(module, variables)
    assert model == fnbp.MLP((3, 5, 2), "tanh")
    x = jax.random.normal(jax.random.key(1), (4, 3))
    # float32 forward of the same weights by two code paths.
    chex.assert_trees_all_close(
        fnbp.forward(params, model, x), module.apply(variables, x), rtol=0, atol=1e-6
    )


def test_from_flax_rejects_other_modules():
    module = nn.Dense(3)
    with pytest.raises(TypeError, match="FlaxMLP"):
        from_flax(module, {"params": {}})


def test_from_flax_rejects_wrong_kernel_shape():
    params, model = _net((4, 6, 3))
    module, variables = to_flax(params, model)
    variables["params"]["layer2"]["kernel"] = jnp.zeros((6, 4))
    with pytest.raises(ValueError, match=r"\['W'\] \(layer 2\) must have shape \(3, 6\)"):
        from_flax(module, variables)


def test_from_flax_rejects_missing_layer_and_non_dict_variables():
    params, model = _net((4, 6, 3))
    module, variables = to_flax(params, model)
    del variables["params"]["layer2"]
    with pytest.raises(ValueError, match="layer2"):
        from_flax(module, variables)
    with pytest.raises(ValueError, match="must be a dict"):
        from_flax(module, [params])


def test_to_flax_rejects_params_that_do_not_fit_the_model():
    params, model = _net((4, 6, 3))
    with pytest.raises(ValueError, match="layers"):
        to_flax(params[:1], model)
