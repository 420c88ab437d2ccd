"""Tests of fnbp/train.py: jitted steps, scan-fused epochs, vmapped populations, fit."""

import functools
import json
import math
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import forced_devices_flags

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
    _, _, lean = train.make_train_step(model, optimizer)(params, optimizer.init(params), x, y)
    assert set(lean) == {"loss"}  # the default: what a plain value_and_grad step computes
    step = train.make_train_step(model, optimizer, metrics="norms")
    new_params, _, metrics = step(params, optimizer.init(params), x, y)
    assert set(metrics) == {"loss", "grad_norms"}
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
        params, _, opt_state, _ = step(params, None, opt_state, None, x[i : i + 8], y[i : i + 8])


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


def test_train_step_is_bitwise_deterministic():
    model, x, y = _toy()
    optimizer = optax.adam(1e-2)
    runs = []
    for _ in range(2):
        params = fnbp.init_params(jax.random.key(1), model)
        step = train.make_train_step(model, optimizer)
        runs.append(step(params, optimizer.init(params), x, y))
    chex.assert_trees_all_equal(runs[0], runs[1])


# ----------------------------------------------------------------------------------------------
# fit: checkpoints, resume, divergence guard


@pytest.fixture(scope="module")
def digits():
    return data.load_digits(seed=0)


DIGITS_MODEL = fnbp.MLP((64, 32, 10))


def _fit(ds, folder=None, *, epochs=3, every=10, optimizer=None, **kwargs):
    """fit on digits (44 steps of 32 per epoch), checkpointing into ``folder``."""
    params = fnbp.init_params(jax.random.key(0), DIGITS_MODEL)
    return train.fit(
        DIGITS_MODEL, optimizer or optax.sgd(0.02, momentum=0.9), params, ds.x_train,
        ds.y_train, key=jax.random.key(1), epochs=epochs, batch_size=32, x_test=ds.x_test,
        y_test=ds.y_test, checkpoint_dir=folder, checkpoint_every=every, progress=False,
        **kwargs,
    )  # fmt: skip


def _without_seconds(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def _stop_after(calls):
    """should_stop that says yes on its ``calls``-th question (one question per chunk)."""
    asked = []
    return lambda: asked.append(1) or len(asked) >= calls


@pytest.mark.parametrize(
    "optimizer", [optax.sgd(0.02, momentum=0.9), optax.adam(1e-3)], ids=["momentum", "adam"]
)
def test_fit_stopped_mid_epoch_and_resumed_ends_bitwise_identical(digits, tmp_path, optimizer):
    ref_params, ref_state, ref_history = _fit(digits, tmp_path / "ref", optimizer=optimizer)
    # chunks of an epoch: steps 0-9, 10-19, 20-29, 30-39, 40-43; the 7th chunk ends at step 64
    with pytest.raises(train.Interrupted) as e:
        _fit(digits, tmp_path / "run", optimizer=optimizer, should_stop=_stop_after(7))
    assert (e.value.step, e.value.epoch) == (64, 1)
    assert e.value.checkpoint.name == "ckpt-000000064.npz" and e.value.checkpoint.is_file()
    params, state, history = _fit(digits, tmp_path / "run", optimizer=optimizer, resume=True)
    chex.assert_trees_all_equal(params, ref_params)  # bit for bit
    chex.assert_trees_all_equal(state, ref_state)
    assert _without_seconds(history) == _without_seconds(ref_history)
    assert [r["step"] for r in history] == [44, 88, 132]
    # the newest two checkpoints are kept
    assert [p.name for p in sorted((tmp_path / "run").iterdir())] == [
        "ckpt-000000128.npz", "ckpt-000000132.npz",
    ]  # fmt: skip


def test_fit_keyboard_interrupt_saves_the_last_finished_chunk(digits, tmp_path):
    def interrupt(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(train.Interrupted) as e:
        _fit(digits, tmp_path, on_epoch=interrupt)
    assert isinstance(e.value, KeyboardInterrupt)  # still an interrupt to callers
    assert e.value.step == 88 and e.value.checkpoint.name == "ckpt-000000088.npz"
    ref = _fit(digits, tmp_path / "ref")
    resumed = _fit(digits, tmp_path, resume=True)
    chex.assert_trees_all_equal(resumed[0], ref[0])


def test_fit_checkpointed_in_chunks_equals_fit_without_checkpoints(digits, tmp_path):
    chunked = _fit(digits, tmp_path, every=7)
    plain = _fit(digits, None, every=None)
    chex.assert_trees_all_equal(chunked[0], plain[0])  # chunking changes no bits (on CPU)


def test_fit_resume_of_a_finished_run_returns_its_result(digits, tmp_path):
    done = _fit(digits, tmp_path, epochs=2)
    again = _fit(digits, tmp_path, epochs=2, resume=True)
    chex.assert_trees_all_equal(again[0], done[0])
    assert _without_seconds(again[2]) == _without_seconds(done[2])


def test_fit_refuses_a_checkpoint_folder_in_use_without_resume(digits, tmp_path):
    _fit(digits, tmp_path, epochs=1)
    with pytest.raises(ValueError, match="already holds checkpoints.*resume=True"):
        _fit(digits, tmp_path, epochs=1)


def test_fit_resume_with_other_settings_is_refused_naming_the_file(digits, tmp_path):
    _fit(digits, tmp_path, epochs=1)
    with pytest.raises(ValueError, match=r"ckpt-000000044.npz: .*other settings.*chunk 10"):
        _fit(digits, tmp_path, epochs=2, every=5, resume=True)


def test_fit_resume_with_another_key_is_refused(digits, tmp_path):
    _fit(digits, tmp_path, epochs=1)
    params = fnbp.init_params(jax.random.key(0), DIGITS_MODEL)
    with pytest.raises(ValueError, match="ckpt-000000044.npz: .*another key"):
        train.fit(
            DIGITS_MODEL, optax.sgd(0.02, momentum=0.9), params, digits.x_train,
            digits.y_train, key=jax.random.key(2), epochs=2, batch_size=32,
            checkpoint_dir=tmp_path, checkpoint_every=10, resume=True, progress=False,
        )  # fmt: skip


def test_fit_resume_from_a_corrupt_checkpoint_names_it_and_the_one_before(digits, tmp_path):
    _fit(digits, tmp_path, epochs=1)
    newest = tmp_path / "ckpt-000000044.npz"
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    with pytest.raises(ValueError, match=r"ckpt-000000044.npz.*move it aside.*ckpt-000000040"):
        _fit(digits, tmp_path, epochs=2, resume=True)
    assert newest.exists() and (tmp_path / "ckpt-000000040.npz").exists()  # nothing deleted


def _replay(ds, lr, skip, epochs=3):
    """Python loop of single jitted steps over fit's batches (same shuffles): per-step
    ``(finite, skipped)`` flags, an independent count of what fit's guard should see."""
    optimizer = optax.sgd(lr, momentum=0.9)
    params = fnbp.init_params(jax.random.key(0), DIGITS_MODEL)
    opt_state = optimizer.init(params)
    step = train.make_train_step(DIGITS_MODEL, optimizer, skip_nonfinite=skip, metrics="full")
    flags = []
    for epoch in range(1, epochs + 1):
        key = jax.random.fold_in(jax.random.key(1), epoch)
        for idx in np.asarray(data.epoch_indices(key, len(ds.x_train), 32)):
            params, opt_state, m = step(params, opt_state, ds.x_train[idx], ds.y_train[idx])
            finite = bool(np.isfinite(m["loss"]) & np.all(m["grads_finite"]))
            flags.append((finite, bool(m.get("skipped", False)), np.asarray(m["grads_finite"])))
            if not skip and not finite:
                return flags
    return flags


@pytest.mark.parametrize("metrics", ["norms", "full"])
def test_fit_stops_at_the_first_non_finite_step_keeping_the_last_finite_checkpoint(
    digits, tmp_path, metrics
):
    # "norms" steps compute no flags: the guard replays the chunk that went bad with them
    flags = _replay(digits, lr=50.0, skip=False)  # SGD at lr 50 diverges within an epoch
    first, layers = len(flags), [int(l) + 1 for l in np.flatnonzero(~flags[-1][2])]
    assert not flags[-1][0] and first > 10
    with pytest.raises(train.NonFiniteError) as e:
        _fit(digits, tmp_path, optimizer=optax.sgd(50.0, momentum=0.9), metrics=metrics)
    err = e.value
    assert (err.step, err.epoch, err.layers, err.layer) == (first, 1, layers, layers[0])
    assert f"step {first} (epoch 1)" in str(err) and f"layer {layers[0]}" in str(err)
    last = (first - 1) // 10 * 10  # the chunk boundary before it
    assert err.checkpoint.name == f"ckpt-{last:09d}.npz"
    c = fnbp.checkpoint.load_checkpoint(err.checkpoint, optax.sgd(50.0, momentum=0.9))
    assert c.step == last
    assert all(np.isfinite(v).all() for v in jax.tree.leaves((c.params, c.opt_state)))
    assert max(p.name for p in tmp_path.iterdir()) == f"ckpt-{last:09d}.npz"


def test_fit_skip_mode_skips_and_counts_exactly_the_non_finite_steps(digits, tmp_path):
    params, _, history = _fit(digits, tmp_path, optimizer=optax.sgd(50.0, momentum=0.9),
                              on_nonfinite="skip")  # fmt: skip
    flags = _replay(digits, lr=50.0, skip=True)
    expected = [sum(f[1] for f in flags[e * 44 : (e + 1) * 44]) for e in range(3)]
    assert [r["skipped_steps"] for r in history] == expected and sum(expected) > 10
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(params))


DEEP = fnbp.MLP((64,) + (64,) * 29 + (10,))  # 30 ReLU layers


def _adam_overflow_numpy(ds):
    """The layers (1-based) whose Adam ν holds an Inf after one plain optax step (jax.grad of
    fnbp.loss, no fnbp training code) of DEEP from N(0, 1) weights: the witness."""
    params = fnbp.init_params(jax.random.key(0), DEEP, fnbp.normal_scheme(1.0))
    optimizer = optax.adam(1e-3)
    x, y = ds.x_train[:32], ds.y_train[:32]
    loss, g = jax.value_and_grad(lambda p: fnbp.loss(p, DEEP, x, y))(params)
    _, opt_state = optimizer.update(g, optimizer.init(params), params)
    nu = opt_state[0].nu
    return float(loss), [i + 1 for i, v in enumerate(nu) if not np.isfinite(v["W"]).all()]


def test_fit_stops_when_adams_second_moment_overflows_though_loss_and_params_stay_finite(digits):
    loss, layers = _adam_overflow_numpy(digits)
    assert 1e20 < loss < 1e30 and len(layers) >= 20  # finite, huge; ν of most layers Inf
    params = fnbp.init_params(jax.random.key(0), DEEP, fnbp.normal_scheme(1.0))
    ds = digits._replace(x_train=digits.x_train[:32], y_train=digits.y_train[:32])
    with pytest.raises(train.NonFiniteError, match="optimizer state of layer 1 is non-finite") as e:
        train.fit(DEEP, optax.adam(1e-3), params, ds.x_train, ds.y_train, key=jax.random.key(1),
                  epochs=3, batch_size=32, progress=False)  # fmt: skip
    assert (e.value.step, e.value.what, e.value.layers) == (1, "optimizer state", layers)
    chex.assert_trees_all_close(e.value.loss, loss, rtol=1e-5)


def test_fit_skip_mode_skips_steps_that_overflow_the_optimizer_state(digits):
    params = fnbp.init_params(jax.random.key(0), DEEP, fnbp.normal_scheme(1.0))
    x, y = digits.x_train[:64], digits.y_train[:64]
    out, _, history = train.fit(DEEP, optax.adam(1e-3), params, x, y, key=jax.random.key(1),
                                epochs=2, batch_size=32, on_nonfinite="skip", progress=False)  # fmt: skip
    # every step from the initial weights overflows ν: all are skipped, nothing changes
    assert [r["skipped_steps"] for r in history] == [2, 2]
    chex.assert_trees_all_equal(out, params)


def test_fit_with_loss_metrics_keeps_records_without_grad_norms(digits):
    _, _, history = _fit(digits, epochs=1, metrics="loss")
    _, _, reference = _fit(digits, epochs=1)
    assert "grad_norms" not in history[0] and len(reference[0]["grad_norms"]) == 2
    # the same steps: the metrics change what is reported, not the training
    chex.assert_trees_all_close(history[0]["train_loss"], reference[0]["train_loss"], rtol=1e-6)


def test_fit_refuses_data_holding_nan_naming_the_rows(digits):
    x = digits.x_train.copy()
    x[[3, 700]] = np.nan
    with pytest.raises(ValueError, match=r"x_train holds 128 NaN or Inf values \(rows \[3, 700\]"):
        _fit(digits._replace(x_train=x))


def test_skipping_step_returns_its_inputs_unchanged():
    model, x, y = _toy()
    optimizer = optax.adam(1e-2)
    params = fnbp.init_params(jax.random.key(1), model)
    state = optimizer.init(params)
    step = train.make_train_step(model, optimizer, skip_nonfinite=True, metrics="full")
    bad_x = x.at[3, 2].set(jnp.inf)
    new_params, new_state, metrics = step(params, state, bad_x, y)
    assert bool(metrics["skipped"]) and not bool(metrics["grads_finite"].all())
    chex.assert_trees_all_equal((new_params, new_state), (params, state))
    _, _, metrics = step(params, state, x, y)
    assert not bool(metrics["skipped"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"on_nonfinite": "ignore"}, "on_nonfinite must be one of"),
        ({"every": 0}, "checkpoint_every must be a positive int"),
        ({"keep_checkpoints": 0}, "keep_checkpoints must be a positive int"),
        ({"resume": True, "folder": None}, "resume=True needs the checkpoint_dir"),
    ],
)
def test_fit_refuses_bad_checkpoint_and_guard_settings(digits, tmp_path, kwargs, match):
    folder = kwargs.pop("folder", tmp_path / "ckpt")
    with pytest.raises(ValueError, match=match):
        _fit(digits, folder, epochs=1, **kwargs)
    assert not (tmp_path / "ckpt").exists()


# ----------------------------------------------------------------------------------------------
# fit: early stopping on a validation set

ES_NET = fnbp.Net(64, [fnbp.layers.Dense(32), fnbp.layers.BatchNorm(activation="relu"),
                       fnbp.layers.Dense(10)])  # fmt: skip


def _es_fit(ds, folder=None, *, model=DIGITS_MODEL, lr=0.1, epochs=20, patience=3, every=None,
            **kwargs):  # fmt: skip
    """fit on 64 digits (4 steps of 16 per epoch) at a high lr, watching 200 other training
    examples: it overfits within a few epochs, so the val loss turns up long before ``epochs``."""
    params = fnbp.init_params(jax.random.key(0), model)
    state = {} if isinstance(model, fnbp.MLP) else {"state": fnbp.init_state(model)}
    return train.fit(
        model, optax.sgd(lr, momentum=0.9), params, ds.x_train[:64], ds.y_train[:64],
        key=jax.random.key(1), epochs=epochs, batch_size=16, x_val=ds.x_train[1000:1200],
        y_val=ds.y_train[1000:1200], early_stopping=patience, checkpoint_dir=folder,
        checkpoint_every=every, progress=False, **state, **kwargs,
    )  # fmt: skip


def _without(history, *keys):
    return [{k: v for k, v in r.items() if k not in keys} for r in history]


@pytest.fixture(scope="module")
def es_reference(digits, tmp_path_factory):
    """An uninterrupted early-stopped run (patience 3), checkpointed every 2 steps (2 chunks
    per epoch)."""
    return _es_fit(digits, tmp_path_factory.mktemp("es") / "ref", every=2)


def test_early_stopping_stops_p_epochs_after_the_lowest_val_loss_and_returns_its_params(
    digits, es_reference
):
    params, _, history = es_reference
    # the witness: the best epoch and the stop from the history's val losses alone
    val = np.array([r["val_loss"] for r in history])
    best = int(np.argmin(val)) + 1
    assert len(history) == best + 3 < 20  # it stopped early: the val loss really turned up
    assert val[-1] > val[best - 1] and 0 < history[-1]["val_accuracy"] <= 1
    assert [r["best_epoch"] for r in history] == [
        int(np.argmin(val[:e])) + 1 for e in range(1, len(val) + 1)
    ]
    # the same run without early stopping, cut at the best epoch (epoch e shuffles with
    # fold_in(key, e) either way): the params returned, bit for bit
    cut, _, _ = _es_fit(digits, epochs=best, patience=None, every=2)
    chex.assert_trees_all_equal(params, cut)


def test_early_stopping_returns_the_optimizer_state_at_the_stop_and_without_restore_best_its_params(
    digits, es_reference
):
    params, opt_state, history = es_reference
    stop = len(history)
    last, last_opt_state, full = _es_fit(digits, epochs=stop, patience=None, every=2)
    chex.assert_trees_all_equal(opt_state, last_opt_state)
    assert _without(history, "seconds", "best_epoch") == _without(full, "seconds")
    assert not np.array_equal(params[0]["W"], last[0]["W"])
    unrestored, _, again = _es_fit(digits, every=2, restore_best=False)
    chex.assert_trees_all_equal(unrestored, last)
    assert _without(again, "seconds") == _without(history, "seconds")


def test_an_infinite_val_loss_never_improves_so_the_initial_params_come_back():
    model = fnbp.MLP((6, 16, 2), "tanh", "mse")
    _, x, _ = _toy(n=32)
    y = jnp.tanh(x[:, :2])
    params = fnbp.init_params(jax.random.key(1), model)
    y_far = jnp.full((16, 2), 1e30, jnp.float32)  # finite, but (ŷ − 1e30)² overflows to inf
    out, _, history = train.fit(
        model, optax.sgd(0.1), params, x, y, key=jax.random.key(0), epochs=10, batch_size=8,
        x_val=x[:16], y_val=y_far, early_stopping=2, progress=False,
    )  # fmt: skip
    assert [r["val_loss"] for r in history] == [math.inf, math.inf]
    assert [r["best_epoch"] for r in history] == [0, 0]  # "epoch 0": the initial params
    chex.assert_trees_all_equal(out, params)
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # it did train meanwhile


def test_only_a_finite_strictly_lower_val_loss_makes_a_new_best():
    best = train._Best(2, 0.5, "params of epoch 2", None)
    for loss in (math.nan, -math.inf, math.inf, 0.5, 0.7):
        assert train._better(best, 3, loss, "params of epoch 3", None) is best
    assert train._better(best, 3, 0.4999, "p3", "s3") == train._Best(3, 0.4999, "p3", "s3")


@pytest.mark.parametrize(
    "where", ["mid-epoch-before-the-best", "mid-epoch-after-the-best", "at-the-stop"]
)
def test_an_early_stopped_fit_interrupted_and_resumed_ends_bitwise_identical(
    digits, tmp_path, es_reference, where
):
    ref_params, ref_opt_state, ref_history = es_reference
    best, stop = ref_history[-1]["best_epoch"], len(ref_history)
    assert 2 <= best < stop < 20
    calls = {"mid-epoch-before-the-best": 2 * best - 3, "mid-epoch-after-the-best": 2 * best + 1,
             "at-the-stop": 2 * stop}[where]  # fmt: skip
    with pytest.raises(train.Interrupted) as e:
        _es_fit(digits, tmp_path, every=2, should_stop=_stop_after(calls))
    assert e.value.step == 2 * calls
    c = fnbp.checkpoint.load_checkpoint(e.value.checkpoint, optax.sgd(0.1, momentum=0.9))
    kept = ref_history[calls // 2 - 1]["best_epoch"]  # the best of the epochs completed
    assert c.loop["best"] == {"epoch": kept, "val_loss": ref_history[kept - 1]["val_loss"]}
    if kept == best:
        chex.assert_trees_all_equal(c.best_params, ref_params)
    params, opt_state, history = _es_fit(digits, tmp_path, every=2, resume=True)
    chex.assert_trees_all_equal((params, opt_state), (ref_params, ref_opt_state))  # bit for bit
    assert _without(history, "seconds") == _without(ref_history, "seconds")


def test_a_nets_early_stopped_fit_returns_and_resumes_the_best_epochs_running_statistics(
    digits, tmp_path
):
    ref = _es_fit(digits, tmp_path / "ref", model=ES_NET, lr=0.3, patience=2)
    params, state, _, history = ref
    best = history[-1]["best_epoch"]
    assert best < len(history) < 20 and not np.allclose(state[1]["mean"], 0.0)
    # they are the best epoch's params and statistics: in eval mode they give its val loss
    # (the same function of the same arrays; the tolerance allows only another fusion, while
    # the next epoch's val loss is 30% off)
    val = fnbp.loss(params, ES_NET, digits.x_train[1000:1200], digits.y_train[1000:1200],
                    state=state, train=False)  # fmt: skip
    np.testing.assert_allclose(float(val), history[best - 1]["val_loss"], rtol=1e-6)
    with pytest.raises(train.Interrupted):
        _es_fit(digits, tmp_path / "run", model=ES_NET, lr=0.3, patience=2,
                should_stop=_stop_after(best + 1))  # fmt: skip
    resumed = _es_fit(digits, tmp_path / "run", model=ES_NET, lr=0.3, patience=2, resume=True)
    chex.assert_trees_all_equal(resumed[:3], ref[:3])  # params, statistics, optimizer state
    assert _without(resumed[3], "seconds") == _without(history, "seconds")


@pytest.mark.parametrize(
    "first, then, match",
    [
        ({"patience": 3}, {"patience": 4}, "early_stopping 3 there, 4 here"),
        ({"patience": 3}, {"restore_best": False}, "restore_best True there, False here"),
        ({"patience": None}, {"patience": 3}, "early_stopping None there, 3 here"),
    ],
    ids=["patience", "restore-best", "early-stopping-added"],
)
def test_fit_resume_with_other_early_stopping_settings_is_refused(digits, tmp_path, first, then,
                                                                   match):  # fmt: skip
    _es_fit(digits, tmp_path, epochs=1, **first)
    with pytest.raises(ValueError, match=rf"ckpt-000000004.npz: .*other settings.*{match}"):
        _es_fit(digits, tmp_path, epochs=2, resume=True, **{"patience": 3, **then})


# ----------------------------------------------------------------------------------------------
# instruments and DP-SGD in fit: checkpointed with the run, resumed bit for bit


@pytest.mark.parametrize(
    "extra", [{"instruments": 16}, {"dp_clip": 1.0, "dp_noise": 0.5}], ids=["instruments", "dp"]
)
def test_fit_with_instruments_or_dp_stopped_mid_epoch_and_resumed_ends_bitwise_identical(
    digits, tmp_path, extra
):
    # chunks of 22 steps (two per 44-step epoch): the 3rd ends at step 66, mid-epoch 2; one
    # optimizer object, so the three fits share one compiled program
    run = functools.partial(_fit, digits, every=22, optimizer=optax.sgd(0.02, momentum=0.9),
                            **extra)  # fmt: skip
    ref_params, _, ref_history = run(tmp_path / "ref")
    with pytest.raises(train.Interrupted):
        run(tmp_path / "run", should_stop=_stop_after(3))
    params, _, history = run(tmp_path / "run", resume=True)
    chex.assert_trees_all_equal(params, ref_params)  # bit for bit
    assert _without_seconds(history) == _without_seconds(ref_history)  # the instruments too
    if "instruments" in extra:  # steps 0, 16, 32 of each epoch, numbered 1-based in the run
        steps = [r["step"] for record in history for r in record["instruments"]]
        assert steps == [1, 17, 33, 45, 61, 77, 89, 105, 121]
        assert history[0]["instruments"][0]["dead_fraction"][1] is None  # no ReLU: the output
    else:
        assert all(0 < r["dp_clipped_fraction"] <= 1 for r in history)
    name = "instruments" if "instruments" in extra else "dp_clip"
    with pytest.raises(ValueError, match=f"other settings.*{name} .* there, None here"):
        _fit(digits, tmp_path / "run", every=22, resume=True)


def _dp_nets():
    """An MLP (its DP step takes a key for the noise) and a net with dropout (the same key
    draws its masks)."""
    from fnbp.layers import Dense, Dropout

    return [fnbp.MLP((6, 16, 3), "tanh"), fnbp.Net(6, [Dense(16, "relu"), Dropout(0.3), Dense(3)])]


def _call(step, model, params, opt_state, key, x, y):
    """``(params, metrics)`` of a step, an MLP's (key or not) or a net's."""
    if isinstance(model, fnbp.MLP):
        args = (params, opt_state, x, y) if key is None else (params, opt_state, key, x, y)
        out = step(*args)
        return out[0], out[2]
    out = step(params, fnbp.init_state(model), opt_state, key, x, y)
    return out[0], out[3]


@pytest.mark.parametrize("which", [0, 1], ids=["mlp", "net-with-dropout"])
def test_a_dp_step_without_noise_and_with_a_huge_clip_is_the_plain_step(which):
    model = _dp_nets()[which]
    params = fnbp.init_params(jax.random.key(0), model)
    _, x, y = _toy(32)
    opt, key = optax.sgd(0.1, momentum=0.9), jax.random.key(4)
    plain = train.make_train_step(model, opt, l2=0.01)
    private = train.make_train_step(model, opt, l2=0.01, dp_clip=1e9, dp_noise=0.0)
    want, m_plain = _call(plain, model, params, opt.init(params), None if which == 0 else key,
                          x, y)  # fmt: skip
    got, m = _call(private, model, params, opt.init(params), key, x, y)
    # Σᵢ cᵢ δᵢaᵢᵀ with every cᵢ = 1 from the factors against δᵀa: float32 rounding apart
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-8)
    assert float(m["dp_clipped"]) == 0.0 and float(m["loss"]) == float(m_plain["loss"])


def test_a_dp_step_is_dp_grads_with_its_key_then_the_optimizer():
    model = _dp_nets()[0]
    params = fnbp.init_params(jax.random.key(0), model)
    _, x, y = _toy(32)
    opt, key = optax.adam(1e-2), jax.random.key(4)
    step = train.make_train_step(model, opt, l2=0.01, dp_clip=0.5, dp_noise=1.0)
    got, m = _call(step, model, params, opt.init(params), key, x, y)
    dp = fnbp.instruments.dp_grads(params, model, x, y, clip_norm=0.5, noise_multiplier=1.0,
                                   key=key, l2=0.01)  # fmt: skip
    want = optax.apply_updates(params, opt.update(dp.grads, opt.init(params), params)[0])
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-8)  # two jits of one program
    assert float(m["dp_clipped"]) == pytest.approx(float(jnp.mean(dp.norms > 0.5)))


def test_a_dp_population_trains_each_member_with_its_own_noise():
    model, x, y = _toy(40)
    params = fnbp.init_params(jax.random.key(0), model)
    pop = jax.tree.map(lambda v: jnp.stack([v, v]), params)  # one member twice
    opt, keys = optax.sgd(0.1), jax.random.split(jax.random.key(2), 2)
    dp = {"dp_clip": 0.5, "dp_noise": 1.0}
    epoch = train.make_population_epoch(model, opt, batch_size=8, **dp)
    p, _, m = epoch(pop, jax.vmap(opt.init)(pop), keys, x, y)
    assert m["dp_clipped"].shape == (2, 5)
    alone = train.make_train_epoch(model, opt, batch_size=8, **dp)
    for i in range(2):
        q = alone(params, opt.init(params), keys[i], x, y)[0]
        chex.assert_trees_all_close(
            jax.tree.map(lambda v, i=i: v[i], p), q, rtol=1e-5, atol=1e-7
        )  # fmt: skip  (vmap: float32 rounding)
    assert not np.allclose(p[0]["W"][0], p[0]["W"][1])  # other keys, other noise


# ----------------------------------------------------------------------------------------------
# data parallel over 4 (forced) CPU devices, in a fresh process: XLA_FLAGS must be set before
# JAX starts.

_DATA_PARALLEL = r"""
import json, jax, numpy as np, optax, fnbp
from fnbp import data, train
ds = data.load_digits(seed=0)
model = fnbp.MLP((64, 64, 10))
params = fnbp.init_params(jax.random.key(0), model)
out = {"devices": jax.device_count()}
for n in (1, 4):
    mesh = None if n == 1 else train.data_mesh(n)
    p, _, h = train.fit(model, optax.sgd(0.05, momentum=0.9), params, ds.x_train, ds.y_train,
                        key=jax.random.key(1), epochs=2, batch_size=32, mesh=mesh,
                        progress=False)
    out[n] = {"W": [np.asarray(l["W"]).tolist() for l in p], "loss": h[-1]["train_loss"],
              "devices_holding_W": len(p[0]["W"].sharding.device_set)}
run = jax.jit(train._steps_fn(model, optax.sgd(0.05), 32, "manual", 0.0, batch_sharding=
              jax.sharding.NamedSharding(train.data_mesh(4), jax.sharding.PartitionSpec("data"))),
              static_argnums=7)
rep = jax.sharding.NamedSharding(train.data_mesh(4), jax.sharding.PartitionSpec())
args = jax.device_put((params, optax.sgd(0.05).init(params), ds.x_train, ds.y_train), rep)
hlo = run.lower(args[0], None, args[1], jax.random.key(0), args[2], args[3], 0, 2).compile().as_text()
out["all_reduce"] = "all-reduce" in hlo
for bad in (5, 3):
    try:
        train.fit(model, optax.sgd(0.1), params, ds.x_train, ds.y_train, key=jax.random.key(1),
                  epochs=1, batch_size=32, mesh=train.data_mesh(bad), progress=False)
    except ValueError as e:
        out[f"error{bad}"] = str(e)
print(json.dumps(out))
"""


def test_data_parallel_fit_on_4_devices_matches_one_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS=forced_devices_flags(4))
    result = subprocess.run(
        [sys.executable, "-c", _DATA_PARALLEL], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    assert out["4"]["devices_holding_W"] == 4 and out["1"]["devices_holding_W"] == 1
    assert out["all_reduce"]  # the gradient sum over the split batch is an XLA all-reduce
    # 88 steps: the 4-way split sums each gradient in another order, float32 rounding only
    chex.assert_trees_all_close(out["4"]["W"], out["1"]["W"], rtol=1e-4, atol=1e-5)
    assert out["4"]["loss"] == pytest.approx(out["1"]["loss"], rel=1e-5)
    assert "devices must be 1 to 4" in out["error5"] and "device_count=5" in out["error5"]
    assert "batch_size 32 must be divisible by the 3 devices" in out["error3"]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # 1e39 → float32 inf, meant
def test_a_finite_step_that_overflows_the_params_is_caught_too(digits, tmp_path):
    """lr 1e39 is past float32's range: the gradient of step 1 is finite, the update it makes
    is not. The guard names it; skip mode skips it."""
    huge = optax.sgd(1e39)
    with pytest.raises(train.NonFiniteError) as e:
        _fit(digits, tmp_path / "stop", optimizer=huge)
    assert (e.value.step, e.value.what) == (1, "params") and np.isfinite(e.value.loss)
    assert f"the update made the params of layer {e.value.layer} non-finite" in str(e.value)
    params, _, history = _fit(digits, tmp_path / "skip", optimizer=huge, on_nonfinite="skip")
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(params))
    assert history[0]["skipped_steps"] > 0


# ----------------------------------------------------------------------------------------------
# Nets: a 1-D CNN with BatchNorm, dropout and a residual block (state and masks in every step)


def _net():
    from fnbp.layers import BatchNorm, Conv, Dense, Dropout, Flatten, Residual

    return fnbp.Net((8, 1), [
        Conv(4, (3,), activation="tanh"),
        BatchNorm(activation="relu"),
        Residual((Conv(4, (3,), activation="relu"), BatchNorm(momentum=0.8), Dropout(0.25)),
                 alpha=0.5),
        Flatten(),
        Dropout(0.2),
        Dense(3),
    ])  # fmt: skip


NET = _net()
NET_OPTIMIZER = optax.sgd(0.05, momentum=0.9)


def _net_data(n=48):
    """Learnable labels from a random linear teacher (NumPy: no threefry compilation)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8, 1)).astype(np.float32)
    y = np.argmax(x[:, :, 0] @ rng.normal(size=(8, 3)), axis=1)
    return jnp.asarray(x), jnp.asarray(y)


def _net_start():
    params = fnbp.init_params(jax.random.key(1), NET)
    return params, fnbp.init_state(NET), NET_OPTIMIZER.init(params)


# One jitted step and epoch per setting, shared by the tests below (each compile costs seconds).
_net_step = functools.cache(
    lambda grads: train.make_train_step(NET, NET_OPTIMIZER, grads=grads, l2=1e-3)
)
_net_epoch = functools.cache(
    lambda: train.make_train_epoch(NET, NET_OPTIMIZER, batch_size=8, l2=1e-3)
)


def test_a_nets_manual_and_autodiff_steps_take_the_same_path_for_20_steps():
    x, y = _net_data()
    paths = {}
    for grads in ("manual", "autodiff"):
        params, state, opt_state = _net_start()
        losses = []
        for i in range(20):
            batch = slice(8 * i % 40, 8 * i % 40 + 8)
            params, state, opt_state, m = _net_step(grads)(
                params, state, opt_state, jax.random.fold_in(jax.random.key(5), i), x[batch],
                y[batch],
            )  # fmt: skip
            losses.append(m["loss"])
        paths[grads] = (params, state, jnp.stack(losses))
    # float32: each step's grads and batch statistics agree to ~1e-6 relative (BatchNorm's
    # 1/σ amplifies rounding a little); 20 momentum steps carry it forward, hence 1e-4.
    chex.assert_trees_all_close(paths["manual"], paths["autodiff"], rtol=1e-4, atol=1e-5)
    start, state0, _ = _net_start()
    assert float(paths["manual"][2][-5:].mean()) < float(paths["manual"][2][:5].mean())
    # the running statistics moved from their start (0, 1) in both BatchNorm layers
    assert not np.allclose(paths["manual"][1][1]["mean"], state0[1]["mean"])
    assert not np.allclose(paths["manual"][1][2]["branch"][1]["var"], 1.0)


def test_a_nets_scan_fused_epoch_equals_a_python_loop_of_steps_over_the_same_batches_and_keys():
    x, y = _net_data(n=45)  # 5 steps of 8, 5 examples sit out
    key = jax.random.key(7)
    p_scan, s_scan, _, metrics = _net_epoch()(*_net_start(), key, x, y)
    assert metrics["loss"].shape == (5,) and metrics["grad_norms"].shape == (5, 3)
    params, state, opt_state = _net_start()
    losses, mask_key = [], jax.random.fold_in(key, 1)  # step s: masks from fold_in(mask_key, s)
    for s, (xb, yb) in enumerate(data.batches(key, x, y, 8)):
        params, state, opt_state, m = _net_step("manual")(
            params, state, opt_state, jax.random.fold_in(mask_key, s), xb, yb
        )
        losses.append(m["loss"])
    # Same arithmetic, different fusion: float32 rounding only.
    chex.assert_trees_all_close((p_scan, s_scan), (params, state), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(metrics["loss"], jnp.stack(losses), rtol=1e-5)


def test_a_population_of_3_nets_trains_each_member_as_if_alone():
    x, y = _net_data(n=45)  # the shapes of the test above: its compiled epoch serves here too
    params, state, opt_state = _net_start()
    # three members: init moved by NumPy noise (vmapping init_params would compile a program)
    rng = np.random.default_rng(1)
    members = [
        jax.tree.map(lambda v: v + rng.normal(0, 0.1, v.shape).astype(np.float32), params)
        for _ in range(3)
    ]
    stack = lambda *trees: jax.tree.map(lambda *v: jnp.asarray(np.stack(v)), *trees)  # noqa: E731
    epoch_keys = jax.random.split(jax.random.key(9), 3)
    pop_epoch = train.make_population_epoch(NET, NET_OPTIMIZER, batch_size=8, l2=1e-3)
    pop_params, pop_states, _, pop_metrics = pop_epoch(
        stack(*members), stack(state, state, state), stack(opt_state, opt_state, opt_state),
        epoch_keys, x, y,
    )  # fmt: skip
    assert pop_metrics["loss"].shape == (3, 5)
    for member in range(3):
        p, s, _, m = _net_epoch()(members[member], state, opt_state, epoch_keys[member], x, y)
        theirs = jax.tree.map(lambda v, i=member: v[i], (pop_params, pop_states))
        # vmap batches the convolutions and matmuls differently: float32 rounding only.
        chex.assert_trees_all_close((p, s), theirs, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(m["loss"], pop_metrics["loss"][member], rtol=1e-5)
    assert not np.allclose(pop_params[0]["W"][0], pop_params[0]["W"][1])  # three members


def _net_fit(folder=None, *, optimizer=NET_OPTIMIZER, epochs=2, **kwargs):
    """fit of NET: 6 steps of 8 per epoch, a checkpoint every 3 (chunks of one length, so
    each fit compiles one program)."""
    x, y = _net_data()
    params = fnbp.init_params(jax.random.key(1), NET)
    return train.fit(
        NET, optimizer, params, x, y, key=jax.random.key(2), epochs=epochs, batch_size=8,
        x_test=x[:16], y_test=y[:16], checkpoint_dir=folder, checkpoint_every=3,
        progress=False, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def net_reference(tmp_path_factory):
    return _net_fit(tmp_path_factory.mktemp("net") / "ref")


def test_a_net_fit_stopped_mid_epoch_and_resumed_ends_bitwise_identical(tmp_path, net_reference):
    with pytest.raises(train.Interrupted) as e:
        _net_fit(tmp_path, should_stop=_stop_after(3))
    assert (e.value.step, e.value.epoch) == (9, 1)  # halfway through epoch 2
    c = fnbp.checkpoint.load_checkpoint(e.value.checkpoint, NET_OPTIMIZER, NET)
    assert c.step == 9 and c.state[1]["mean"].shape == (4,)
    resumed = _net_fit(tmp_path, resume=True)
    # params, running statistics and optimizer state bit for bit: the masks of steps 10-12
    # are drawn from the key and the step, not from anything the interrupted process held
    chex.assert_trees_all_equal(resumed[:3], net_reference[:3])
    assert _without_seconds(resumed[3]) == _without_seconds(net_reference[3])
    record = net_reference[3][-1]
    assert len(record["grad_norms"]) == 3 and 0 <= record["test_accuracy"] <= 1  # eval mode ran
    assert not np.allclose(net_reference[1][1]["var"], 1.0)  # the state trained


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # 1e39 → float32 inf, meant
def test_the_guard_names_each_layer_of_a_net_by_number_and_kind(tmp_path):
    """lr 1e39 is inf in float32: step 1's gradient is finite, its update is not, in every
    layer with params: 1 (conv), 2 (batch_norm), 3 (residual) and 6 (dense), not the
    flatten (4) or dropout (5) between them."""
    with pytest.raises(train.NonFiniteError) as e:
        _net_fit(tmp_path, optimizer=optax.sgd(1e39), epochs=1)
    assert (e.value.step, e.value.what, e.value.layers) == (1, "params", [1, 2, 3, 6])
    assert e.value.layer == 1
    assert (
        "the update made the params of layer 1 (conv) non-finite (non-finite in layers 1 (conv), "
        "2 (batch_norm), 3 (residual), 6 (dense) of the model)"
    ) in str(e.value)


def test_fit_refuses_a_state_for_an_mlp_and_a_state_that_does_not_fit_a_net():
    model, x, y = _toy()
    params = fnbp.init_params(jax.random.key(1), model)
    with pytest.raises(ValueError, match="an MLP keeps no state"):
        train.fit(model, optax.sgd(0.1), params, x, y, key=jax.random.key(0), epochs=1,
                  batch_size=8, state=[{"mean": 0}] * 2)  # fmt: skip
    state = fnbp.init_state(NET)
    state[1] = {"mean": jnp.zeros(5), "var": jnp.ones(5)}
    x, y = _net_data()
    with pytest.raises(ValueError, match=r"state\[1\]\['mean'\] \(layer 2, batch_norm\)"):
        train.fit(NET, optax.sgd(0.1), fnbp.init_params(jax.random.key(1), NET), x, y,
                  key=jax.random.key(0), epochs=1, batch_size=8, state=state)  # fmt: skip


_NET_DATA_PARALLEL = r"""
import json, jax, numpy as np, optax, fnbp
from fnbp import train
from fnbp.layers import BatchNorm, Conv, Dense, Dropout, Flatten, Residual
net = fnbp.Net((8, 1), [Conv(4, (3,), activation="tanh"), BatchNorm(activation="relu"),
    Residual((Conv(4, (3,), activation="relu"), BatchNorm(momentum=0.8), Dropout(0.25)),
             alpha=0.5), Flatten(), Dropout(0.2), Dense(3)])
rng = np.random.default_rng(0)
x = rng.normal(size=(48, 8, 1)).astype(np.float32)
y = np.argmax(x[:, :, 0] @ rng.normal(size=(8, 3)), axis=1)
params = fnbp.init_params(jax.random.key(1), net)
out = {"devices": jax.device_count()}
for n in (1, 4):
    mesh = None if n == 1 else train.data_mesh(n)
    p, s, _, h = train.fit(net, optax.sgd(0.05, momentum=0.9), params, x, y,
                           key=jax.random.key(2), epochs=1, batch_size=16, mesh=mesh,
                           progress=False)
    out[n] = {"params": jax.tree.map(lambda v: np.asarray(v).tolist(), p),
              "state": jax.tree.map(lambda v: np.asarray(v).tolist(), s),
              "loss": h[-1]["train_loss"],
              "devices_holding_state": len(s[1]["mean"].sharding.device_set)}
print(json.dumps(out))
"""


def test_a_nets_data_parallel_fit_on_4_devices_matches_one_device():
    """BatchNorm's statistics are those of the global batch of 16 (not of each device's 4),
    and the dropout masks those one device draws (partitionable threefry)."""
    env = dict(os.environ, XLA_FLAGS=forced_devices_flags(4))
    result = subprocess.run(
        [sys.executable, "-c", _NET_DATA_PARALLEL], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4 and out["4"]["devices_holding_state"] == 4
    # 3 steps: the 4-way split sums each statistic and gradient in another order, float32
    # rounding only (per-device statistics or masks would differ at ~1e-2)
    chex.assert_trees_all_close(
        (out["4"]["params"], out["4"]["state"]), (out["1"]["params"], out["1"]["state"]),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip
    assert out["4"]["loss"] == pytest.approx(out["1"]["loss"], rel=1e-5)


def test_the_guard_reports_the_chunks_end_when_its_replay_finds_no_bad_step():
    # a replay that computes otherwise than the run (it should not) must not hide a failure
    ok = np.ones((3, 2), bool)
    full = {"loss": np.ones(3), "grads_finite": ok, "params_finite": ok,
            "opt_state_finite": np.ones((3, 3), bool)}  # fmt: skip
    saver = train._Saver(None, 1, DIGITS_MODEL, None, None, {}, [])
    lean = {"loss": np.ones(3), "end_finite": np.asarray(False)}
    with pytest.raises(train.NonFiniteError, match="at the end of its chunk") as e:
        train._check_chunk(lean, lambda: full, DIGITS_MODEL, 10, 1, saver)
    assert (e.value.step, e.value.what) == (13, "end")
    lean = {"loss": np.array([1.0, np.nan, 1.0]), "end_finite": np.asarray(True)}
    with pytest.raises(train.NonFiniteError, match="step 12 .*the loss is nan") as e:
        train._check_chunk(lean, lambda: full, DIGITS_MODEL, 10, 1, saver)
    # nothing non-finite anywhere: no replay at all
    train._check_chunk({"loss": np.ones(3), "end_finite": np.asarray(True)}, None, DIGITS_MODEL,
                       10, 1, saver)  # fmt: skip
