"""Tests of fnbp/instruments/training.py: the statistics a training step computes from its own
backward pass, against witnesses computed another way (jax.grad, per-example gradients formed
one example at a time, NumPy reductions of the activations), every K-th step only, for a
vmapped population, and without a second backward pass."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnbp
from fnbp import train
from fnbp.instruments import training as instr
from fnbp.instruments.per_example import layer_entries
from fnbp.layers import (
    BatchNorm,
    Conv,
    Dense,
    Dropout,
    Flatten,
    Reshape,
    Residual,
)
from tests.helpers import random_data


def _net():
    """Layers whose per-example gradients take each path of the factors: a convolution (ReLU;
    an Outer over positions), a residual block with a projection and a learned α around a
    conv, dense layers and dropout, nested residual blocks without params of their own (which
    layer_names skips). LayerNorm's γ, β take the biases' path."""
    return fnbp.Net(
        12,
        [
            Reshape((2, 3, 2)),
            Conv(3, (2, 2), padding="SAME", activation="relu"),
            Residual((Conv(4, (2, 2), padding="SAME"),), 0.7, learn_alpha=True),
            Flatten(),
            Dense(6, "relu"),
            Dropout(0.5),
            Residual(
                (Dense(6, "silu"), Residual((Dense(6, "relu"),), alpha=0.5)),
                alpha=0.5,
            ),
            Dense(3),
        ],
        "softmax_cross_entropy",
    )


NAMES = [
    "layer 2 (conv)", "layer 3 (residual)", "layer 3 (residual) branch layer 1 (conv)",
    "layer 5 (dense)", "layer 7 (residual) branch layer 1 (dense)",
    "layer 7 (residual) branch layer 2 (residual) branch layer 1 (dense)", "layer 8 (dense)",
]  # fmt: skip


def _sq(tree_rows) -> np.ndarray:
    """``(B,)``: Σ over every leaf of a dict of per-example leaves of the squared entries."""
    return sum(np.sum(np.square(np.asarray(v)).reshape(len(v), -1), 1) for v in tree_rows.values())


def test_layer_names_of_the_test_net_skip_layers_without_params_of_their_own():
    assert fnbp.instruments.layer_names(_net()) == NAMES
    assert instr.relu_layers(_net()) == [True, False, False, True, False, True, False]


def test_a_steps_instruments_equal_witnesses_computed_another_way(x64):
    """float64, L2 on (gᵢ includes λW): every field against an independent computation."""
    model, l2, lr, B = _net(), 0.01, 0.1, 16
    params = jax.jit(  # one compile, not one per eager op; biases, γ, β, α moved off 0 and 1
        lambda k: jax.tree.map(lambda v: v + 0.3 * (v.ndim < 2), fnbp.init_params(k, model,
                                                                          dtype=jnp.float64))
    )(jax.random.key(0))  # fmt: skip
    state, key = fnbp.init_state(model), jax.random.key(3)
    x, y = random_data(jax.random.key(1), model, B, jnp.float64)
    opt = optax.sgd(lr, momentum=0.9)
    step = train.make_train_step(model, opt, l2=l2, instruments=True)
    new, _, _, m = step(params, state, opt.init(params), key, x, y)
    got = m["instruments"]
    assert bool(m["instrumented"])
    modes = dict(l2=l2, state=state, key=key, train=True)
    # per_example_grads: vmap of one-example backprop (no factors, no batch), λW included
    pe = layer_entries(fnbp.per_example_grads(params, model, x, y, **modes))

    # ‖ḡ‖ per layer, ḡ the mean of the per-example gradients
    want = [np.sqrt(sum(np.sum(np.square(np.mean(v, 0))) for v in own.values())) for own in pe]
    chex.assert_trees_all_close(got["grad_norm"], np.array(want), rtol=1e-10)  # float64 sums
    # ‖Δθ‖ and ‖Δθ‖/‖θ‖: the params the step returned, minus those it was given
    delta = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new, params)
    dnorm = [np.sqrt(sum(np.sum(np.square(v)) for v in own.values()))
             for own in layer_entries(delta)]  # fmt: skip
    pnorm = [np.sqrt(sum(np.sum(np.square(v)) for v in own.values()))
             for own in layer_entries(params)]  # fmt: skip
    chex.assert_trees_all_close(got["update_norm"], np.array(dnorm), rtol=1e-10)
    chex.assert_trees_all_close(got["update_ratio"], np.array(dnorm) / pnorm, rtol=1e-10)
    # per-example norms
    sq = [_sq(own) for own in pe]
    q = lambda v: np.concatenate([np.quantile(v, [0.1, 0.5, 0.9]), [v.max()]])  # noqa: E731
    chex.assert_trees_all_close(
        got["example_norms"], np.stack([q(np.sqrt(s)) for s in sq]), rtol=1e-9
    )  # fmt: skip  (quantiles interpolate; float64)
    chex.assert_trees_all_close(got["total_example_norms"], q(np.sqrt(sum(sq))), rtol=1e-9)
    flat = np.concatenate(
        [np.asarray(v).reshape(B, -1) for v in jax.tree.leaves(pe)], axis=1
    )  # (B, params): every gᵢ, λW included
    trace_cov = np.sum(np.var(flat, axis=0, ddof=1))
    g2 = np.sum(np.square(flat.mean(0)))
    chex.assert_trees_all_close(got["grad_norm_sq"], g2, rtol=1e-10)
    chex.assert_trees_all_close(got["trace_cov"], trace_cov, rtol=1e-9)  # Σ‖gᵢ‖² − B‖ḡ‖²
    chex.assert_trees_all_close(got["b_simple"], trace_cov / g2, rtol=1e-9)
    # the activations and δ: NumPy reductions of what fnbp.backprop returns
    r = fnbp.backprop(params, model, x, y, **modes)
    a = [r.activations[1], r.activations[2]["out"], r.activations[2]["branch"][0],
         r.activations[4], r.activations[6]["branch"][0],
         r.activations[6]["branch"][1]["branch"][0], r.activations[7]]  # fmt: skip
    d = [r.deltas[1], r.deltas[2]["out"], r.deltas[2]["branch"][0], r.deltas[4],
         r.deltas[6]["branch"][0], r.deltas[6]["branch"][1]["branch"][0], r.deltas[7]]  # fmt: skip
    chex.assert_trees_all_close(got["activation_std"], np.array([np.std(v) for v in a]),
                                rtol=1e-10)  # fmt: skip
    want = [np.mean(np.linalg.norm(B * np.asarray(v).reshape(B, -1), axis=1)) for v in d]
    chex.assert_trees_all_close(got["delta_norm"], np.array(want), rtol=1e-10)
    dead = np.array([np.mean(np.all(np.asarray(v) == 0, axis=0)) for v in a])
    relu = np.array(instr.relu_layers(model))
    np.testing.assert_array_equal(np.asarray(got["dead_fraction"])[relu], dead[relu])
    assert np.isnan(np.asarray(got["dead_fraction"])[~relu]).all()


def test_dead_fraction_counts_exactly_the_units_dead_for_the_whole_batch():
    model = fnbp.MLP((5, 8, 3))
    params = fnbp.init_params(jax.random.key(0), model)
    params[0]["b"] = params[0]["b"].at[jnp.array([1, 4, 6])].set(-100.0)  # 3 of 8 always ≤ 0
    x, y = random_data(jax.random.key(1), model, 32)
    step = train.make_train_step(model, optax.sgd(0.1), instruments=True)
    m = step(params, optax.sgd(0.1).init(params), x, y)[2]["instruments"]
    assert float(m["dead_fraction"][0]) == 3 / 8
    assert np.isnan(float(m["dead_fraction"][1]))  # the output layer is no ReLU


def test_the_instrumented_step_runs_one_backward_pass(monkeypatch):
    calls = []
    real = train._backward
    monkeypatch.setattr(train, "_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = fnbp.MLP((5, 8, 3))
    params = fnbp.init_params(jax.random.key(0), model)
    x, y = random_data(jax.random.key(1), model, 8)
    epoch = train.make_train_epoch(model, optax.sgd(0.1), batch_size=4, instruments=1)
    jax.eval_shape(epoch, params, optax.sgd(0.1).init(params), jax.random.key(2), x, y)
    assert len(calls) == 1  # traced once: the scan's one step, statistics from its trace


# An MLP, an optimizer and 10 steps of 4, shared by the next two tests (one compile of the
# instrumented epoch for both).
MLP = fnbp.MLP((6, 16, 3))
OPT = optax.adam(1e-2)
X, Y = random_data(jax.random.key(1), MLP, 40)
EPOCH = train.make_train_epoch(MLP, OPT, batch_size=4, instruments=4)


def test_only_every_kth_step_of_an_epoch_is_instrumented_and_training_is_unchanged():
    params = fnbp.init_params(jax.random.key(0), MLP)
    plain = train.make_train_epoch(MLP, OPT, batch_size=4)
    ref, _, ref_m = plain(params, OPT.init(params), jax.random.key(2), X, Y)
    p, _, m = EPOCH(params, OPT.init(params), jax.random.key(2), X, Y)
    np.testing.assert_array_equal(m["instrumented"], np.arange(10) % 4 == 0)
    g = np.asarray(m["instruments"]["grad_norm"])
    assert np.isfinite(g[[0, 4, 8]]).all() and np.isnan(g[[1, 2, 3, 5, 6, 7, 9]]).all()
    # the same steps: XLA may fuse the two programs differently, so rounding apart at most
    chex.assert_trees_all_close(p, ref, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(m["loss"], ref_m["loss"], rtol=1e-6)


def test_a_populations_instruments_are_each_members_own():
    pop = train.init_population(jax.random.split(jax.random.key(0), 2), MLP)
    epoch = train.make_population_epoch(MLP, OPT, batch_size=4, instruments=4)
    shuffles = jax.random.split(jax.random.key(2), 2)
    _, _, m = epoch(pop, jax.vmap(OPT.init)(pop), shuffles, X, Y)
    assert m["instruments"]["example_norms"].shape == (2, 10, 2, 4)  # (P, steps, layers, 4)
    for i in range(2):
        p = jax.tree.map(lambda v, i=i: v[i], pop)
        mi = EPOCH(p, OPT.init(p), shuffles[i], X, Y)[2]
        on = np.asarray(mi["instrumented"])
        np.testing.assert_array_equal(m["instrumented"][i], on)
        got = jax.tree.map(lambda v, i=i, on=on: np.asarray(v[i])[on], m["instruments"])
        want = jax.tree.map(lambda v, on=on: np.asarray(v)[on], mi["instruments"])
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)  # vmap: float32 rounding


def test_train_mode_batchnorm_leaves_out_the_per_example_fields_and_says_which_layer():
    net = fnbp.Net(6, [Dense(8, use_bias=False), BatchNorm(activation="relu"), Dense(3)])
    assert "layer 2 (batch_norm)" in instr.left_out(net)
    assert instr.left_out(fnbp.MLP((6, 3))) is None
    params, state = fnbp.init_params(jax.random.key(0), net), fnbp.init_state(net)
    x, y = random_data(jax.random.key(1), net, 8)
    step = train.make_train_step(net, optax.sgd(0.1), instruments=True)
    m = step(params, state, optax.sgd(0.1).init(params), None, x, y)[3]["instruments"]
    assert not set(instr.PER_EXAMPLE) & set(m)
    assert set(instr.PER_LAYER) <= set(m) and m["grad_norm"].shape == (3,)


def test_records_keep_the_instrumented_steps_numbered_in_the_run():
    stats = {"grad_norm": np.array([[1.0, 2.0], [np.nan, np.nan], [3.0, 4.0]]),
             "dead_fraction": np.array([[0.5, 0.0], [np.nan, np.nan], [0.25, 0.0]]),
             "b_simple": np.array([7.0, np.nan, 8.0])}  # fmt: skip
    out = instr.records(stats, np.array([True, False, True]), 11, 2, [True, False])
    assert out == [
        {"step": 11, "epoch": 2, "grad_norm": [1.0, 2.0], "dead_fraction": [0.5, None],
         "b_simple": 7.0},
        {"step": 13, "epoch": 2, "grad_norm": [3.0, 4.0], "dead_fraction": [0.25, None],
         "b_simple": 8.0},
    ]  # fmt: skip


@pytest.mark.parametrize("bad, error", [(0, ValueError), (True, TypeError), (2.0, TypeError)])
def test_a_bad_period_is_refused_naming_instruments(bad, error):
    with pytest.raises(error, match="instruments must be"):
        train.make_train_epoch(fnbp.MLP((3, 2)), optax.sgd(0.1), batch_size=2, instruments=bad)


def test_instruments_need_the_hand_written_backward():
    with pytest.raises(ValueError, match="instruments=16 .* need grads='manual'"):
        train.make_train_epoch(fnbp.MLP((3, 2)), optax.sgd(0.1), batch_size=2, grads="autodiff",
                               instruments=16)  # fmt: skip


def test_the_noise_scales_running_ratio_sums_the_last_window_of_both():
    ratio = instr._window_ratio(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 1.0, 2.0, 0.0]), 2)
    np.testing.assert_allclose(ratio, [1.0, 3 / 2, 5 / 3, 7 / 2])  # exact sums of 1 or 2 terms
