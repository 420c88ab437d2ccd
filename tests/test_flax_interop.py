"""Tests of fnbp/flax_interop.py: the same network as a Flax Linen module, and back."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnbp
from fnbp.flax_interop import FlaxMLP, FlaxNet, from_flax, to_flax


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


# ----------------------------------------------------------------------------------------------
# Every network: FlaxNet, a third reference built from Linen's own modules.

L = fnbp.layers

# One net per family, together covering every kind: strides, SAME/VALID/explicit padding,
# no-bias convs, both pools, BatchNorm over space, residual blocks with BatchNorm, a learned α
# and a projection (on a 4-D stream and on vectors), dropout, LayerNorm on vectors and channels.
NETS = {
    "cnn2d": lambda: fnbp.Net(
        (10, 10, 2),
        [
            L.Conv(4, (3, 3), strides=2, padding="SAME"),
            L.BatchNorm(momentum=0.8, activation="relu"),
            L.Conv(6, (2, 2), padding="VALID", activation="relu"),
            L.MaxPool((2, 2)),
            L.Residual((L.Conv(5, (3, 3)), L.BatchNorm()), alpha=0.7, learn_alpha=True),
            L.Conv(5, (3, 2), padding=((1, 1), (1, 0)), use_bias=False, activation="gelu"),
            L.AvgPool((2, 1), strides=(1, 1)),
            L.Flatten(),
            L.Dense(3),
        ],
    ),
    "cnn1d": lambda: fnbp.Net(
        (16, 3),
        [
            L.Conv(5, (5,), strides=2, padding=((1, 1),)),
            L.LayerNorm(eps=1e-4, activation="relu"),
            L.Conv(4, (3,), strides=2, padding="SAME", activation="tanh"),
            L.MaxPool((2,)),
            L.AvgPool((2,), strides=(1,)),
            L.Reshape((4,)),
            L.Dense(3),
        ],
    ),
    "bn_dropout_ln_mlp": lambda: fnbp.Net(
        6,
        [
            L.Dense(8),
            L.BatchNorm(momentum=0.7, eps=1e-3, activation="tanh"),
            L.Dropout(0.3),
            L.Dense(7, use_bias=False),
            L.LayerNorm(activation="silu"),
            L.Dropout(0.5),
            L.Dense(3),
        ],
    ),
    "residual": lambda: fnbp.Net(
        5,
        [
            L.Dense(6, "relu"),
            L.Residual(
                (L.Dense(6), L.BatchNorm(activation="relu"), L.Dropout(0.2), L.Dense(6)),
                alpha=0.5,
                learn_alpha=True,
                activation="relu",
            ),
            L.Residual(
                (L.Dense(9, "tanh"), L.LayerNorm(), L.Activation("softplus"), L.Dense(9)),
                alpha=-0.4,
                learn_alpha=True,
            ),
            L.Dense(3),
        ],
    ),
}
BN_NETS = ["cnn2d", "bn_dropout_ln_mlp", "residual"]
BATCH = 12
# The Flax side is compiled without XLA's backend optimisations: half the compile time of these
# tiny programs, and the reference needs no speed (float64 results agree to rounding anyway).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _perturbed(net, dtype=np.float64, seed=0):
    """Random params and state drawn with NumPy (eager jax.random costs a compile per op):
    weights N(0, 2/fan_in) as He's, and every other leaf off its init (γ = 1 + N(0, 0.3²),
    β, biases and α moved by N(0, 0.3²), running mean ≠ 0 and var ≠ 1): at init
    (γ = 1, β = 0, α = 0) bugs of the normalization and residual rules hide."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: fnbp.init_params(jax.random.key(0), net))

    def draw(path, v):
        start = np.asarray(np.ones(v.shape) if path[-1].key == "gamma" else np.zeros(v.shape))
        if path[-1].key in ("W", "P"):  # dense/projection (out, in); conv (*k, C_in, C_out)
            fan_in = v.shape[1] if path[-1].key == "P" or v.ndim == 2 else np.prod(v.shape[:-1])
            return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), v.shape).astype(dtype))
        return jnp.asarray((start + 0.3 * rng.normal(size=v.shape)).astype(dtype))

    def stat(path, v):
        if path[-1].key == "mean":
            return jnp.asarray(0.2 * rng.normal(size=v.shape).astype(dtype))
        return jnp.asarray(np.exp(0.3 * rng.normal(size=v.shape)).astype(dtype))

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    state = jax.tree_util.tree_map_with_path(stat, jax.eval_shape(lambda: fnbp.init_state(net)))
    return params, state


def _batch(net, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, *net.input_shape)).astype(dtype)
    return jnp.asarray(x), jnp.asarray(rng.integers(0, net.output_size, BATCH))


@functools.partial(_jit, static_argnames=("module", "train"))
@functools.partial(jax.value_and_grad, has_aux=True)
def _flax_value_and_grad(params, stats, x, y, masks, l2, *, module, train):
    """jax.grad of Flax's loss, from Linen's modules and optax alone (no fnbp code): mean
    softmax cross-entropy plus (λ/2) Σ ‖kernel‖² over every kernel (dense, conv, projection:
    the leaves fnbp decays). Returns ``((loss, (output, new batch_stats)), grads)``."""
    variables = {"params": params, **({"batch_stats": stats} if stats else {})}
    if train:
        out, new = module.apply(variables, x, train=True, masks=masks, mutable=["batch_stats"])
    else:
        out, new = module.apply(variables, x, train=False), {}
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y))
    kernels = [
        v for path, v in jax.tree_util.tree_flatten_with_path(params)[0] if path[-1].key == "kernel"
    ]
    penalty = 0.5 * l2 * sum(jnp.sum(k**2) for k in kernels)
    return ce + penalty, (out, dict(new).get("batch_stats", {}))


def _as_params(module, variables, flax_grads):
    """Flax-named grads in fnbp's layout (transposes and renames only)."""
    return from_flax(module, {**variables, "params": flax_grads})[0]


def _max_change(a, b) -> float:
    return max(np.max(np.abs(np.asarray(u) - np.asarray(v))) for u, v in zip(
        jax.tree.leaves(a), jax.tree.leaves(b), strict=True))  # fmt: skip


# both modes, except for a net without BatchNorm or Dropout (its train mode is its eval mode)
MODES = [
    pytest.param(name, train, id=f"{name}-{'train' if train else 'eval'}")
    for name in sorted(NETS)
    for train in (False, True)
    if not train or NETS[name]().needs_train
]


@pytest.mark.parametrize(("name", "train"), MODES)
def test_jax_grad_through_flax_net_equals_backprop(x64, name, train):
    net = NETS[name]()
    params, state = _perturbed(net)
    x, y = _batch(net, 3)
    module, variables = to_flax(params, net, state)
    key, l2 = jax.random.key(7), (0.02 if train else 0.0)
    masks = fnbp.model.draw_batch_masks(net, key, BATCH, train)
    (flax_loss, (out, flax_stats)), flax_grads = _flax_value_and_grad(
        variables["params"], variables.get("batch_stats", {}), x, y, masks, l2,
        module=module, train=train,
    )  # fmt: skip
    r = fnbp.backprop(params, net, x, y, l2=l2, state=state, key=key, train=train)
    # float64 through ≤ 9 layers: rounding ~1e-16 per op; 1e-10 still fails any real bug.
    tol = dict(rtol=1e-10, atol=1e-12)
    chex.assert_trees_all_close(r.loss, flax_loss, **tol)
    chex.assert_trees_all_close(r.grads, _as_params(module, variables, flax_grads), **tol)
    if not train:
        chex.assert_trees_all_close(out, fnbp.forward(params, net, x, state=state), **tol)
    if net.needs_state and train:  # Flax's new batch_stats are fnbp's new state
        new_state = from_flax(module, {**variables, "batch_stats": flax_stats})[1]
        chex.assert_trees_all_close(r.state, new_state, **tol)
        assert _max_change(r.state, state) > 1e-3
    elif net.needs_state:  # eval mode leaves the running statistics alone
        chex.assert_trees_all_equal(r.state, state)
    # not a vacuous comparison (a bias before train-mode BatchNorm has gradient 0, so only W)
    assert all(np.max(np.abs(np.asarray(w))) > 1e-6 for w in fnbp.model.weights(net, r.grads))


@_jit
def _sgd(params, grads, opt_state):
    updates, opt_state = optax.sgd(0.1).update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state


@pytest.mark.parametrize("name", BN_NETS)
def test_batch_norm_running_stats_after_5_sgd_steps_equal_flax(x64, name):
    net = NETS[name]()
    params, state = _perturbed(net)
    module, variables = to_flax(params, net, state)
    flax_params, flax_stats = variables["params"], variables["batch_stats"]
    opt_state, flax_opt_state = optax.sgd(0.1).init(params), optax.sgd(0.1).init(flax_params)
    for step in range(5):  # a fresh batch and fresh dropout masks each step
        x, y = _batch(net, 10 + step)
        key = jax.random.key(100 + step)
        r = fnbp.backprop(params, net, x, y, l2=0.0, state=state, key=key, train=True)
        params, opt_state = _sgd(params, r.grads, opt_state)
        state = r.state
        masks = fnbp.model.draw_batch_masks(net, key, BATCH, True)
        (_, (_, flax_stats)), g = _flax_value_and_grad(
            flax_params, flax_stats, x, y, masks, 0.0, module=module, train=True
        )
        flax_params, flax_opt_state = _sgd(flax_params, g, flax_opt_state)
    got_params, got_state, _ = from_flax(module, {"params": flax_params, "batch_stats": flax_stats})
    # float64, five steps of lr 0.1: the two paths' rounding (~1e-16) grows little.
    chex.assert_trees_all_close(state, got_state, rtol=1e-9, atol=1e-12)
    chex.assert_trees_all_close(params, got_params, rtol=1e-9, atol=1e-12)
    assert _max_change(state, _perturbed(net)[1]) > 1e-2  # the statistics really moved


@pytest.mark.parametrize("name", sorted(NETS))
def test_flax_net_round_trip_is_exact_and_matches_module_init(name):
    net = NETS[name]()
    params, state = _perturbed(net, np.float32)
    module, variables = to_flax(params, net, state)
    assert isinstance(module, FlaxNet) and module.net == net
    assert ("batch_stats" in variables) == net.needs_state
    with_params = [f"layer{i}" for i, p in enumerate(params, start=1) if p]
    assert sorted(variables["params"]) == sorted(with_params)
    # Linen's own init lays out the same names, shapes and dtypes (shapes only: no compute).
    x = jax.ShapeDtypeStruct((BATCH, *net.input_shape), jnp.float32)
    fresh = jax.eval_shape(module.init, jax.random.key(0), x)
    assert jax.tree.structure(fresh) == jax.tree.structure(variables)
    chex.assert_trees_all_equal_shapes_and_dtypes(fresh, variables)
    back, back_state, back_net = from_flax(module, variables)
    assert back_net == net
    chex.assert_trees_all_equal(back, params)
    chex.assert_trees_all_equal(back_state, state)
    chex.assert_trees_all_equal_dtypes(back, params)


def test_flax_net_dense_kernels_are_transposed_and_conv_kernels_kept():
    net = NETS["cnn2d"]()
    params, state = _perturbed(net, np.float32)
    module, variables = to_flax(params, net, state)
    v = variables["params"]
    np.testing.assert_array_equal(v["layer1"]["kernel"], params[0]["W"])  # (*k, C_in, C_out)
    np.testing.assert_array_equal(v["layer9"]["kernel"], params[8]["W"].T)
    np.testing.assert_array_equal(v["layer2"]["scale"], params[1]["gamma"])
    np.testing.assert_array_equal(v["layer5"]["alpha"], params[4]["alpha"])
    np.testing.assert_array_equal(v["layer5"]["projection"]["kernel"], params[4]["P"].T)
    np.testing.assert_array_equal(
        variables["batch_stats"]["layer5"]["layer2"]["var"], state[4]["branch"][1]["var"]
    )
    assert "bias" not in v["layer6"]  # use_bias=False
    x, _ = _batch(net, 4, np.float32)
    out = _apply(variables, x, module=module, train=False)
    assert out.dtype == jnp.float32
    # float32, the same ops in another order: a few ulps of the O(1) outputs.
    chex.assert_trees_all_close(out, fnbp.forward(params, net, x, state=state), rtol=0, atol=1e-5)


@functools.partial(_jit, static_argnames=("module", "train"))
def _apply(variables, x, rngs=None, *, module, train):
    if not train:
        return module.apply(variables, x)
    return module.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])[0]


def test_flax_net_without_masks_draws_its_own_dropout():
    net = NETS["bn_dropout_ln_mlp"]()
    params, state = _perturbed(net, np.float32)
    module, variables = to_flax(params, net, state)
    x, _ = _batch(net, 5, np.float32)
    outs = [
        _apply(variables, x, {"dropout": jax.random.key(k)}, module=module, train=True)
        for k in (0, 1)
    ]
    assert not np.allclose(outs[0], outs[1])  # nn.Dropout drew two different masks


def test_to_flax_takes_init_state_when_state_is_none():
    net = NETS["residual"]()
    params, _ = _perturbed(net, np.float32)
    _, variables = to_flax(params, net)
    stats = variables["batch_stats"]["layer2"]["layer2"]
    np.testing.assert_array_equal(stats["mean"], np.zeros(6))
    np.testing.assert_array_equal(stats["var"], np.ones(6))


def test_flax_net_errors_name_the_layer():
    net = NETS["residual"]()
    params, state = _perturbed(net, np.float32)
    module, variables = to_flax(params, net, state)
    bad = {**variables, "params": {**variables["params"]}}
    del bad["params"]["layer2"]
    with pytest.raises(ValueError, match=r"'layer2' \(residual\) 'layer1' \(dense\) 'kernel'"):
        from_flax(module, bad)
    with pytest.raises(
        ValueError, match="lack 'batch_stats'.*layer 2 \\(residual\\) branch layer 2"
    ):
        from_flax(module, {"params": variables["params"]})
    x, _ = _batch(net, 5, np.float32)
    with pytest.raises(ValueError, match="masks must be a list aligned with the 4 layers"):
        module.apply(variables, x, train=True, masks=[None], mutable=["batch_stats"])
    with pytest.raises(ValueError, match=r"state\[1\].*layer 2, residual"):
        to_flax(params, net, [state[0], {}, *state[2:]])
    mlp = fnbp.MLP((4, 3))
    mlp_params = [{"W": jnp.zeros((3, 4)), "b": jnp.zeros(3)}]
    with pytest.raises(ValueError, match="an MLP keeps no state"):
        to_flax(mlp_params, mlp, state=[{"mean": jnp.zeros(3)}])
