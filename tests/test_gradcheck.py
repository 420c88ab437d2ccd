"""Tests of fnbp/gradcheck.py: the fast check passes on correct nets, and names exactly the
block or the layer's δ that an injected fault breaks, in every layer kind."""

import importlib

import jax
import numpy as np
import pytest
from helpers import (
    FAULT_SCALE,
    FAULTS,
    INPUT_FAULTS,
    SIGNAL,
    VEC,
    every_kind_net,
    fault_back,
    fault_grad,
    faulty,
    nets,
    perturbed,
    random_data,
    random_net_data,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import fnbp
from fnbp.layers import BatchNorm, Conv, Dense, Flatten, LayerNorm, MaxPool, Residual

gradcheck_module = importlib.import_module("fnbp.gradcheck")

K = 3  # directions per block: enough to name a fault, few enough to keep the programs small


def _modes(net, state, train):
    modes = {"train": True, "key": jax.random.key(1)} if train else {"train": False}
    return modes | ({"state": state} if net.needs_state else {})


# ----------------------------------------------------------------------------------------------
# Correct nets pass.


def test_the_784_16_16_10_network_passes_and_prints_a_table_naming_every_block():
    model = fnbp.MLP((784, 16, 16, 10))
    params = fnbp.init_params(jax.random.key(1), model)
    x, y = random_data(jax.random.key(2), model, 32)
    report = fnbp.gradcheck(params, model, x, y, l2=1e-3)
    assert report.passed and report.failures == () and report.broken_layer is None, str(report)
    assert [c.name for c in report.blocks] == [
        f"layer {l} (dense) {leaf}" for l in (1, 2, 3) for leaf in ("W", "b")
    ]
    assert [c.name for c in report.deltas] == [f"layer {l} (dense) δ" for l in (1, 2, 3)]
    for c in (*report.blocks, *report.deltas):
        assert c.autodiff_error < 1e-10 and c.fd_error < 1e-6 and c.slope > 0, c
    text = str(report)
    assert text.splitlines()[0].startswith("fnbp gradcheck: MLP 784-16-16-10, relu")
    assert "4 random directions per block" in text and text.splitlines()[-1] == "PASSED"


def test_a_net_of_every_kind_passes_in_train_mode_and_names_branch_layers_as_errors_do(x64):
    net = every_kind_net()
    params, state = perturbed(3, net, np.float64)
    x, y = random_net_data(3, net, 6, np.float64)
    report = fnbp.gradcheck(params, net, x, y, l2=0.01, directions=K, **_modes(net, state, True))
    assert report.passed, str(report)
    assert len(report.blocks) == len(jax.tree.leaves(params))
    assert len(report.deltas) == len(net.layers)
    names = [c.name for c in report.blocks]
    assert "layer 9 (residual) alpha" in names and "layer 9 (residual) P" in names
    assert "layer 9 (residual) branch layer 1 (conv) W" in names
    assert "layer 13 (residual) branch layer 3 (residual) branch layer 1 (dense) b" in names
    assert "layer 4 (batch_norm) gamma" in names and "layer 8 (layer_norm) beta" in names


@settings(max_examples=2)
@given(nets(max_blocks=3), st.integers(0, 99), st.booleans())
def test_random_nets_pass(net, seed, train):
    with jax.enable_x64(True):
        params, state = perturbed(seed, net, np.float64)
        x, y = random_net_data(seed, net, 7, np.float64)
        modes = _modes(net, state, train) if net.needs_train else {}
        if net.needs_state:
            modes["state"] = state
        report = fnbp.gradcheck(params, net, x, y, l2=0.05, directions=2, seed=seed, **modes)
    assert report.passed, str(report)


# ----------------------------------------------------------------------------------------------
# Faults in every layer kind are named: exactly the broken block, or the δ below a broken ∂L/∂x.

# Of helpers.FAULTS (the cross-check's: (kind, fault, input shape, the layers before, the faulty
# layer's arguments, the layers after, train)) one per rule a kind adds: the ∂L/∂x of BatchNorm
# (train mode), LayerNorm, dropout and max-pool, each parameter leaf; and the leaves it leaves
# out. Residual branches below.
MORE_FAULTS = {
    "dense-b": (Dense, fault_grad("b"), VEC, [Dense(6, "tanh")], (4, "tanh"), [Dense(3)], False),
    "conv-b": (Conv, fault_grad("b"), SIGNAL, [Conv(3, (2,), activation="tanh")], (2, (3,)),
               [Flatten(), Dense(3)], False),
    "batch_norm-beta": (BatchNorm, fault_grad("beta"), VEC, [Dense(6, "tanh")], (), [Dense(3)],
                        True),
    "layer_norm-gamma": (LayerNorm, fault_grad("gamma"), VEC, [Dense(6, "tanh")], (),
                         [Dense(3)], False),
    "residual-P": (Residual, fault_grad("P"), VEC, [Dense(6, "tanh")], ((Dense(4, "tanh"),), 0.5),
                   [Dense(3)], False),
}  # fmt: skip
KINDS = ("dense-W", "conv-W", "batch_norm", "batch_norm-gamma", "layer_norm", "dropout",
         "max_pool", "residual-alpha")  # fmt: skip
ALL_FAULTS = {name: FAULTS[name] for name in KINDS} | MORE_FAULTS


@pytest.mark.parametrize("name", sorted(ALL_FAULTS))
def test_a_fault_in_any_layer_kind_is_named_with_its_leaf_or_delta(x64, name):
    cls, fault, shape, before, args, after, train = ALL_FAULTS[name]
    net = fnbp.Net(shape, [*before, faulty(cls, fault)(*args), *after])
    params, state = perturbed(8, net, np.float64)
    x, y = random_net_data(8, net, 8, np.float64)
    report = fnbp.gradcheck(params, net, x, y, directions=K, **_modes(net, state, train))
    assert not report.passed and report.broken_layer == f"layer 2 ({cls.kind})", str(report)
    failed = [c.name for c in report.failures]
    if fault in INPUT_FAULTS:  # ∂L/∂x of layer 2 is off: layer 1's δ, then its own grads
        assert "backward rule" in report.broken_rule
        assert [c.name for c in report.deltas if not c.passed] == [f"layer 1 ({before[0].kind}) δ"]
        assert set(failed) <= {f"layer 1 ({before[0].kind}) {k}" for k in ("W", "b", "δ")}
        bad = report.deltas[0]
    else:  # one leaf of layer 2 is off, by exactly the fault's factor
        leaf = name.split("-")[1]
        assert "parameter gradient" in report.broken_rule
        assert failed == [f"layer 2 ({cls.kind}) {leaf}"], str(report)
        (bad,) = report.failures
        # both references see the factor: jax.grad to rounding, finite differences to their
        # truncation and rounding (~1e-8 relative here, 1% of the 1e-4 measured)
        assert bad.autodiff_error == pytest.approx(FAULT_SCALE - 1, rel=1e-6)
        assert bad.fd_error == pytest.approx(FAULT_SCALE - 1, rel=1e-2)
    assert bad.autodiff_error > 1e3 * report.rtol_autodiff  # far outside the tolerance
    assert bad.fd_error > 10 * report.rtol_finite_differences
    lines = str(report).splitlines()
    assert any(
        l.startswith(bad.layer) and f" {bad.leaf} " in l and l.endswith("FAIL") for l in lines
    )
    assert f"disagrees: {bad.name}: relative error" in str(report)


@pytest.mark.parametrize("fault, leaf", [(fault_grad("W"), "W"), (fault_back, None)])
def test_a_fault_inside_a_residual_branch_names_the_branch_layer(x64, fault, leaf):
    """A wrong grad of a branch layer is named with its path; a wrong ∂L/∂x of the branch's
    second layer breaks the first's grads and, through the block's ∂L/∂x, the δ below it."""
    branch = (Dense(6, "tanh"), faulty(Dense, fault)(6, "tanh"))
    net = fnbp.Net(VEC, [Dense(6, "tanh"), Residual(branch, 0.5), Dense(3)])
    params, _ = perturbed(4, net, np.float64)
    x, y = random_net_data(4, net, 8, np.float64)
    report = fnbp.gradcheck(params, net, x, y, directions=K)
    failed = [c.name for c in report.failures]
    inner = "layer 2 (residual) branch layer"
    if leaf is not None:
        assert failed == [f"{inner} 2 (dense) W"], str(report)
        assert report.broken_layer == "layer 2 (residual)"
        assert report.broken_rule == f"its parameter gradient: {inner} 2 (dense) W"
    else:
        assert f"{inner} 1 (dense) W" in failed and "layer 1 (dense) δ" in failed, str(report)
        assert f"{inner} 2 (dense) W" not in failed and "layer 2 (residual) δ" not in failed
        assert report.broken_layer == "layer 2 (residual)"  # the block; the rule is a guess:
        assert report.broken_rule.startswith(f"its parameter gradient: {inner} 1 (dense) W")
        assert "or ∂L/∂x of a later layer of that branch: branch δs" in report.broken_rule


def test_a_wrong_output_delta_is_named_as_the_loss(monkeypatch, x64):
    net = fnbp.Net(4, [Dense(5, "tanh"), Dense(3)])
    params, _ = perturbed(9, net, np.float64)
    x, y = random_net_data(9, net, 6, np.float64)
    real = gradcheck_module._backprop_jit

    def wrong_output_delta(*args):
        result = real(*args)
        return result._replace(deltas=[*result.deltas[:-1], result.deltas[-1] * FAULT_SCALE])

    monkeypatch.setattr(gradcheck_module, "_backprop_jit", wrong_output_delta)
    report = fnbp.gradcheck(params, net, x, y, directions=K)
    assert [c.name for c in report.failures] == ["layer 2 (dense) δ"]
    assert report.broken_layer == "loss (softmax_cross_entropy)"


# ----------------------------------------------------------------------------------------------
# Why per block: one global direction dilutes a bug in a small block.


def test_a_global_direction_dilutes_a_wrong_output_bias_that_per_block_directions_expose(
    monkeypatch,
):
    """The 10 output biases of 784-16-16-10 hold √(10/13002) ≈ 2.8% of a unit direction over
    all parameters: their gradient off by 1% moves the global directional derivative by far
    less than 1% (here under PyTorch's default rtol of 1e-3), while their own directions
    measure the 1% exactly."""
    model = fnbp.MLP((784, 16, 16, 10))
    params = fnbp.init_params(jax.random.key(1), model)
    x, y = random_data(jax.random.key(2), model, 32)
    real = gradcheck_module._backprop_jit

    def wrong_output_bias(*args):
        result = real(*args)
        grads = [dict(g) for g in result.grads]
        grads[2]["b"] = grads[2]["b"] * 1.01
        return result._replace(grads=grads)

    monkeypatch.setattr(gradcheck_module, "_backprop_jit", wrong_output_bias)
    per_block = fnbp.gradcheck(params, model, x, y)
    assert [c.name for c in per_block.failures] == ["layer 3 (dense) b"], str(per_block)
    assert per_block.failures[0].autodiff_error == pytest.approx(0.01, rel=1e-6)
    assert per_block.failures[0].fd_error == pytest.approx(0.01, rel=1e-3)

    whole = fnbp.gradcheck(params, model, x, y, per_block=False)
    (check,) = whole.blocks
    assert check.name == "all parameters" and check.shape == (model.num_params,)
    assert check.autodiff_error < 1e-3 < 0.01  # diluted more than tenfold
    assert not check.passed and whole.broken_layer is None  # seen at 1e-10, but named nowhere
    # the share of the output biases in the global directions
    U, _ = gradcheck_module._directions(jax.tree.leaves(params), [], 4, False, 0)
    share = np.sqrt(np.sum(U[5] ** 2, axis=-1))
    np.testing.assert_allclose(share, np.sqrt(10 / model.num_params), rtol=0.5)


# ----------------------------------------------------------------------------------------------
# Kinks and tiny batch variances, as the exhaustive check handles them.


def test_directions_across_a_relu_kink_are_counted_and_left_out(x64):
    """Hidden unit 0 gets W = 0 and b = 0, so z = 0 on every example: every direction of layer
    1's W and b, and of its z, moves it off the kink, and the quotient mixes two slopes."""
    model = fnbp.MLP((3, 4, 2))
    params = fnbp.init_params(jax.random.key(0), model, dtype=np.float64)
    params[0]["W"] = params[0]["W"].at[0].set(0.0)
    params[0]["b"] = params[0]["b"].at[0].set(0.0)
    x, y = random_data(jax.random.key(1), model, 6, np.float64)
    report = fnbp.gradcheck(params, model, x, y, directions=K)
    assert report.passed, str(report)
    W, b = report.blocks[0], report.blocks[1]
    assert W.kinks == b.kinks == report.deltas[0].kinks == K
    assert np.isnan(W.fd_error) and np.isnan(report.deltas[0].fd_error)
    assert all(c.kinks == 0 for c in report.blocks[2:])
    assert report.kinks == 3 * K and f"{3 * K} directions straddle a kink" in str(report)


def test_max_pool_ties_are_kinks(x64):
    """Tied max-pool windows (equal pairs in an input channel of a 1×1 conv with a zero kernel
    column): a step of the conv's kernel breaks the tie one way or the other."""
    net = fnbp.Net((8, 2), [Conv(2, (1,)), MaxPool((2,)), Flatten(), Dense(3)])
    params, _ = perturbed(5, net, np.float64)
    params[0]["W"] = params[0]["W"].at[:, 0, :].set(0.0)  # channel 0 in: no effect
    x, y = random_net_data(5, net, 6, np.float64)
    x = x.at[:, 1::2, 1].set(x[:, 0::2, 1])  # pairs of equal entries in channel 1
    report = fnbp.gradcheck(params, net, x, y, directions=K)
    assert report.passed, str(report)
    assert report.blocks[0].kinks == K and report.blocks[2].kinks == 0  # conv W; dense W


def test_tiny_batch_variance_under_batch_norm_is_warned_about(x64):
    net = fnbp.Net(4, [Dense(3), BatchNorm(), Dense(2)])
    params, state = perturbed(6, net, np.float64)
    params[0]["W"] = params[0]["W"].at[1].set(0.0)  # feature 1 of the BN input is constant
    x, y = random_net_data(6, net, 8, np.float64)
    report = fnbp.gradcheck(params, net, x, y, directions=2, train=True, state=state)
    assert len(report.warnings) == 1 and report.warnings[0].startswith(
        "layer 2 (batch_norm): 1 of 3 features have batch variance"
    )


# ----------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "kw, error, match",
    [
        ({"directions": 0}, ValueError, "directions must be a positive int, got 0"),
        ({"directions": 2.0}, ValueError, "directions must be a positive int"),
        ({"fd_step": 0.0}, ValueError, r"fd_step must be a number in \(0, 1\)"),
        ({"per_block": "yes"}, TypeError, "per_block must be True or False"),
        ({"seed": -1}, ValueError, "seed must be an int >= 0"),
    ],
)
def test_bad_arguments_are_named(kw, error, match):
    model = fnbp.MLP((3, 2))
    params = fnbp.init_params(jax.random.key(0), model)
    x, y = random_data(jax.random.key(1), model, 4)
    with pytest.raises(error, match=match):
        fnbp.gradcheck(params, model, x, y, **kw)


def test_a_net_with_batch_norm_needs_its_mode_and_state():
    net = fnbp.Net(4, [Dense(3), BatchNorm(), Dense(2)])
    params, state = perturbed(6, net)
    x, y = random_net_data(6, net, 8)
    with pytest.raises(ValueError, match="gradcheck: the net's layer 2 .batch_norm.*train=True"):
        fnbp.gradcheck(params, net, x, y, state=state)


def test_the_finite_differences_in_steps_of_lax_map_equal_one_vmap(x64):
    """A budget of 410 values splits the 48 losses of this net into steps of ``lax.map``, 5 a
    step (each holds 2·26 params and 5·6 z values) and a remainder; the quotients are the same
    computations, batched otherwise."""
    model = fnbp.MLP((3, 4, 2), "tanh")
    params = fnbp.init_params(jax.random.key(0), model, dtype=np.float64)
    x, y = random_data(jax.random.key(1), model, 5, np.float64)
    z = [(5, 4), (5, 2)]
    U, V = gradcheck_module._directions(jax.tree.leaves(params), z, 4, True, 0)

    def fd(budget):
        _, blocks, deltas, _ = gradcheck_module._gradcheck64_jit(
            params, model, x, y, 0.0, 1e-6, None, None, U, V,
            train=False, manual=gradcheck_module._backprop_jit, per_block=True, budget=budget,
        )  # fmt: skip
        return np.concatenate([blocks[2], deltas[2]])

    # the same quotients, to the rounding of the loss in them (~1e-16·|L|/ε ≈ 1e-10)
    np.testing.assert_allclose(fd(410), fd(10**9), rtol=0, atol=1e-9)
