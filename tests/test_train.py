"""Tests of fnbp/train.py: jitted steps, scan-fused epochs, vmapped populations, fit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnbp
from fnbp import data, train


def _toy(n=40, key=0):
    model = fnbp.MLP((6, 16, 3), "tanh")
    k_x, k_y = jax.random.split(jax.random.key(key))
    x = jax.random.normal(k_x, (n, 6))
    y = jnp.argmax(x @ jax.random.normal(k_y, (6, 3)), axis=1)  # learnable labels
    return model, x, y


@pytest.mark.parametrize(
    "dtype, rtol, atol", [(jnp.float32, 1e-4, 1e-6), (jnp.float64, 1e-10, 1e-12)]
)
def test_manual_and_autodiff_steps_take_the_same_path_for_20_steps(dtype, rtol, atol):
    with jax.enable_x64(dtype == jnp.float64):
        model, x, y = _toy()
        x = x.astype(dtype)
        optimizer = optax.sgd(0.1, momentum=0.9)
        paths = {}
        for grads in ("manual", "autodiff"):
            step = train.make_train_step(model, optimizer, grads=grads, l2=1e-3)
            params = fnbp.init_params(jax.random.key(1), model, dtype=dtype)
            opt_state = optimizer.init(params)
            losses = []
            for i in range(20):
                batch = slice(2 * i % 40, 2 * i % 40 + 8)
                params, opt_state, metrics = step(params, opt_state, x[batch], y[batch])
                losses.append(metrics["loss"])
            paths[grads] = (params, jnp.stack(losses))
        # float32: each gradient agrees to ~1e-7 relative; 20 momentum steps amplify rounding
        # differences a little, hence 1e-4. float64: the same at ~1e-16 per op.
        chex.assert_trees_all_close(paths["manual"], paths["autodiff"], rtol=rtol, atol=atol)
        start = fnbp.init_params(jax.random.key(1), model, dtype=dtype)
        assert fnbp.loss(paths["manual"][0], model, x, y) < fnbp.loss(start, model, x, y)


@pytest.mark.parametrize("grads", ["manual", "autodiff"])
def test_a_mixed_precision_step_trains_float32_master_params(grads):
    ds = data.load_digits(seed=0)
    model = fnbp.MLP((64, 128, 128, 10))
    optimizer = optax.sgd(0.02, momentum=0.9)
    params = fnbp.init_params(jax.random.key(0), model)
    opt_state = optimizer.init(params)
    step = train.make_train_step(model, optimizer, grads=grads, compute_dtype=jnp.bfloat16)
    start = float(fnbp.loss(params, model, ds.x_train, ds.y_train))
    for i in range(100):
        xb, yb = ds.x_train[32 * i : 32 * (i + 1)], ds.y_train[32 * i : 32 * (i + 1)]
        params, opt_state, metrics = step(params, opt_state, xb, yb)
    chex.assert_trees_all_equal_dtypes(params, fnbp.init_params(jax.random.key(0), model))
    assert metrics["loss"].dtype == jnp.float32
    # 100 steps (3 epochs' worth of batches would be 135) take the loss from ~2.4 to ~0.2.
    assert float(fnbp.loss(params, model, ds.x_train, ds.y_train)) < start / 4
    assert float(fnbp.accuracy(params, model, ds.x_test, ds.y_test)) > 0.9


def test_mixed_precision_epoch_and_population_epoch_run():
    model, x, y = _toy(n=32)
    optimizer = optax.sgd(0.05, momentum=0.9)
    params = fnbp.init_params(jax.random.key(1), model)
    kw = {"batch_size": 8, "compute_dtype": jnp.bfloat16}
    p, _, m = train.make_train_epoch(model, optimizer, **kw)(
        params, optimizer.init(params), jax.random.key(3), x, y
    )
    full, _, _ = train.make_train_epoch(model, optimizer, batch_size=8)(
        params, optimizer.init(params), jax.random.key(3), x, y
    )
    assert m["loss"].shape == (4,) and m["loss"].dtype == jnp.float32
    # Four steps from the same start: bfloat16 rounding of the grads only (~1e-2 relative).
    chex.assert_trees_all_close(p, full, rtol=0.05, atol=2e-3)
    population = train.init_population(jax.random.split(jax.random.key(0), 2), model)
    pop, _, pm = train.make_population_epoch(model, optimizer, **kw)(
        population,
        jax.vmap(optimizer.init)(population),
        jax.random.split(jax.random.key(9), 2),
        x,
        y,
    )
    assert pm["loss"].shape == (2, 4) and pop[0]["W"].dtype == jnp.float32
    chex.assert_tree_all_finite(pop)


def test_step_metrics_hold_the_loss_and_each_layers_weight_grad_norm():
    model, x, y = _toy()
    optimizer = optax.sgd(0.1)
    params = fnbp.init_params(jax.random.key(1), model)
    step = train.make_train_step(model, optimizer)
    new_params, _, metrics = step(params, optimizer.init(params), x, y)
    expected = fnbp.backprop(params, model, x, y)
    chex.assert_trees_all_close(metrics["loss"], expected.loss, rtol=1e-6)
    norms = jnp.stack([jnp.linalg.norm(g["W"]) for g in expected.grads])
    chex.assert_trees_all_close(metrics["grad_norms"], norms, rtol=1e-6)
    # plain SGD: θ ← θ − η g
    sgd = jax.tree.map(lambda p, g: p - 0.1 * g, params, expected.grads)
    chex.assert_trees_all_close(new_params, sgd, rtol=1e-6, atol=1e-7)


def test_step_compiles_once_across_calls():
    model, x, y = _toy()
    optimizer = optax.adam(1e-3)
    params = fnbp.init_params(jax.random.key(1), model)
    opt_state = optimizer.init(params)
    chex.clear_trace_counter()
    traced = chex.assert_max_traces(n=1)(train._step_fn(model, optimizer, "manual", 0.0))
    step = jax.jit(traced)
    for i in range(5):
        params, opt_state, _ = step(params, opt_state, x[i : i + 8], y[i : i + 8])


def test_scan_fused_epoch_equals_a_python_loop_of_steps_over_the_same_batches():
    model, x, y = _toy(n=45)
    optimizer = optax.sgd(0.05, momentum=0.9)
    params = fnbp.init_params(jax.random.key(1), model)
    key = jax.random.key(7)
    epoch = train.make_train_epoch(model, optimizer, batch_size=8)
    p_scan, _, metrics = epoch(params, optimizer.init(params), key, x, y)
    assert metrics["loss"].shape == (5,) and metrics["grad_norms"].shape == (5, 2)

    step = train.make_train_step(model, optimizer)
    p_loop, s_loop, losses = params, optimizer.init(params), []
    for xb, yb in data.batches(key, x, y, 8):
        p_loop, s_loop, m = step(p_loop, s_loop, xb, yb)
        losses.append(m["loss"])
    # Same arithmetic, different fusion: float32 rounding only.
    chex.assert_trees_all_close(p_scan, p_loop, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(metrics["loss"], jnp.stack(losses), rtol=1e-5)


def test_population_epoch_trains_every_member_as_if_alone():
    model, x, y = _toy(n=32)
    optimizer = optax.sgd(0.05, momentum=0.9)
    keys = jax.random.split(jax.random.key(0), 3)
    schemes = ["he_normal", "naive"]
    population = train.init_population(keys, model, schemes)
    assert population[0]["W"].shape == (6, 16, 6)
    epoch_keys = jax.random.split(jax.random.key(9), 6)
    pop_epoch = train.make_population_epoch(model, optimizer, batch_size=8)
    pop_params, _, pop_metrics = pop_epoch(
        population, jax.vmap(optimizer.init)(population), epoch_keys, x, y
    )
    assert pop_metrics["loss"].shape == (6, 4)
    single = train.make_train_epoch(model, optimizer, batch_size=8)
    for member in range(6):
        scheme, key = schemes[member // 3], keys[member % 3]
        params = fnbp.init_params(key, model, scheme)  # scheme-major order
        chex.assert_trees_all_equal(params, jax.tree.map(lambda v, i=member: v[i], population))
        p, _, m = single(params, optimizer.init(params), epoch_keys[member], x, y)
        # vmap batches the matmuls differently: float32 rounding only.
        chex.assert_trees_all_close(
            p, jax.tree.map(lambda v, i=member: v[i], pop_params), rtol=1e-5, atol=1e-6
        )
        chex.assert_trees_all_close(m["loss"], pop_metrics["loss"][member], rtol=1e-5)


def test_fit_on_digits_reaches_97_percent_and_is_reproducible():
    ds = data.load_digits(seed=0)
    model = fnbp.MLP((64, 128, 128, 10))
    runs = []
    for _ in range(2):
        params = fnbp.init_params(jax.random.key(0), model, "he_normal")
        params, _, history = train.fit(
            model, optax.sgd(0.02, momentum=0.9), params, ds.x_train, ds.y_train,
            key=jax.random.key(1), epochs=30, batch_size=32, l2=1e-3,
            x_test=ds.x_test, y_test=ds.y_test, progress=False,
        )  # fmt: skip
        runs.append((params, history))
    assert runs[0][1][-1]["test_accuracy"] >= 0.97
    # train_loss includes the penalty (λ/2)Σ‖W‖² ≈ 0.18, so it cannot fall by 10×.
    assert runs[0][1][-1]["train_loss"] < runs[0][1][0]["train_loss"] / 4
    chex.assert_trees_all_equal(runs[0][0], runs[1][0])  # same seed, same bits
    assert [r["epoch"] for r in runs[0][1]] == list(range(1, 31))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"optimizer": "sgd"}, TypeError, "optax.GradientTransformation"),
        ({"grads": "numeric"}, ValueError, "grads must be one of"),
        ({"l2": -1.0}, ValueError, "l2"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 2.5}, ValueError, "batch_size"),
    ],
)
def test_bad_training_config_is_refused_before_tracing(kwargs, error, match):
    model, _, _ = _toy()
    args = {"optimizer": optax.sgd(0.1), "batch_size": 8, **kwargs}
    with pytest.raises(error, match=match):
        train.make_train_epoch(model, args.pop("optimizer"), **args)


def test_step_refuses_data_that_does_not_fit_the_model():
    model, x, y = _toy()
    optimizer = optax.sgd(0.1)
    params = fnbp.init_params(jax.random.key(1), model)
    step = train.make_train_step(model, optimizer)
    with pytest.raises(ValueError, match="x must have shape"):
        step(params, optimizer.init(params), x[:, :5], y)


def test_fit_refuses_non_positive_epochs():
    model, x, y = _toy()
    params = fnbp.init_params(jax.random.key(1), model)
    with pytest.raises(ValueError, match="epochs"):
        train.fit(
            model, optax.sgd(0.1), params, x, y, key=jax.random.key(0), epochs=0, batch_size=8
        )


def test_fit_regression_on_teacher_student_approaches_the_noise_floor():
    ds = data.teacher_student(
        jax.random.key(0), sizes=(8, 32, 1), n_train=512, n_test=512, noise=0.1
    )
    model = fnbp.MLP((8, 64, 1), "tanh", "mse")
    params = fnbp.init_params(jax.random.key(1), model, "lecun_normal")
    _, _, history = train.fit(
        model, optax.adam(3e-3), params, ds.x_train, ds.y_train, key=jax.random.key(2),
        epochs=60, batch_size=32, x_test=ds.x_test, y_test=ds.y_test, progress=False,
    )  # fmt: skip
    # Best possible test loss is noise²/2 = 0.005; the initial one is ~0.5.
    assert "test_accuracy" not in history[-1]
    assert history[-1]["test_loss"] < 0.03
    assert np.isfinite(history[-1]["train_loss"])


def test_scan_epoch_and_population_epoch_are_bitwise_deterministic():
    model, x, y = _toy(n=32)
    optimizer = optax.sgd(0.05, momentum=0.9)
    keys = jax.random.split(jax.random.key(0), 2)
    runs = []
    for _ in range(2):
        params = fnbp.init_params(jax.random.key(1), model)
        epoch = train.make_train_epoch(model, optimizer, batch_size=8)
        single = epoch(params, optimizer.init(params), jax.random.key(3), x, y)
        population = train.init_population(keys, model, ["he_normal", "lecun_normal"])
        pop_epoch = train.make_population_epoch(model, optimizer, batch_size=8)
        pop = pop_epoch(population, jax.vmap(optimizer.init)(population), jnp.tile(keys, 2), x, y)
        runs.append((single[0], single[2], pop[0], pop[2]))
    chex.assert_trees_all_equal(runs[0], runs[1])  # same inputs, same device: same bits
