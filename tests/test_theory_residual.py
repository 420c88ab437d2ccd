"""Tests of fnbp/theory/residual.py: closed forms for ReLU, and a witness that shares nothing
with it: wide random residual networks in NumPy, run forward and backward by hand."""

import math

import numpy as np
import pytest
from oracles import NP_ACTS, np_normalize, np_normalize_backward

from fnbp import theory


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 2.0])
@pytest.mark.parametrize("sigma_w2", [1.0, 2.0, 3.0])
def test_relu_linear_and_pre_blocks_have_closed_form_factors(alpha, sigma_w2):
    # linear: m' = m(1 + α²σ⁴/2), factor 1 + α²σ⁴/2; pre: both 1 + α²σ⁴/4
    for ordering, c in [("linear", sigma_w2**2 / 2), ("pre", sigma_w2**2 / 4)]:
        r = theory.residual_chain(ordering, "relu", sigma_w2, alpha, 5, m0=0.7)
        np.testing.assert_allclose(r.growth, 1 + alpha**2 * c, rtol=1e-12)
        np.testing.assert_allclose(r.m, 0.7 * (1 + alpha**2 * c) ** np.arange(6), rtol=1e-12)
        assert r.total == pytest.approx((1 + alpha**2 * c) ** 5, rel=1e-12)


@pytest.mark.parametrize("L", [10, 30, 100])
def test_he_relu_total_at_alpha_one_over_sqrt_depth_is_one_plus_two_over_l_to_the_l(L):
    r = theory.residual_chain("linear", "relu", 2.0, 1 / math.sqrt(L), L)
    assert r.total == pytest.approx((1 + 2 / L) ** L, rel=1e-10)
    assert (1 + 2 / L) ** L < r.total * 1.0000001 < math.e**2  # tends to e² from below


@pytest.mark.parametrize("L", [1, 10, 100])
def test_normalized_branches_grow_the_stream_linearly_and_the_total_polynomially(L):
    # pre-LN, ReLU, He, α = 1, m₀ = 1: m grows by 2 a block, factor 1 + 2/m, total 2L + 1
    r = theory.residual_chain("pre_ln", "relu", 2.0, 1.0, L)
    np.testing.assert_allclose(r.m, 1 + 2 * np.arange(L + 1), rtol=1e-12)
    assert r.total == pytest.approx(2 * L + 1, rel=1e-10)
    # BatchNorm branch: m grows by α² a block; factor 1 + α² c/m, c = E[φ′²]/Var φ = π/(π − 1)
    b = theory.residual_chain("bn", "relu", 2.0, 0.5, L)
    np.testing.assert_allclose(b.m, 1 + 0.25 * np.arange(L + 1), rtol=1e-12)
    c = 0.5 / (0.5 - 1 / (2 * math.pi))
    np.testing.assert_allclose(
        b.growth, 1 + 0.25 * c / b.m[:-1], rtol=5e-3
    )  # E[relu] by quadrature


def test_post_activation_at_alpha_zero_loses_only_the_units_of_the_first_relu():
    # x' = relu(x): the dead half stays dead, so only the top block (reached first by δ) halves
    # E‖δ‖²; an independence assumption would halve it at every block
    r = theory.residual_chain("post", "relu", 2.0, 0.0, 6)
    np.testing.assert_allclose(r.growth[:-1], 1.0, rtol=1e-12)
    assert r.growth[-1] == pytest.approx(0.5, abs=0.005)
    np.testing.assert_allclose(r.m[1:], 0.5, rtol=0.01)


def _numpy_residual_net(ordering, activation, sigma_w2, alpha, blocks, width, batch, seed):
    """Per-block E[x²] of the stream, E‖∂L/∂x‖²/E‖∂L/∂x'‖² and ‖∂L/∂z‖² at each block's sum,
    measured on one random net."""
    f, df = NP_ACTS[activation]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, width))  # N(0, 1): m0 = 1
    std = math.sqrt(sigma_w2 / width)
    weights, tape, m = [], [], [np.mean(x**2)]
    for _ in range(blocks):
        W1, W2 = std * rng.standard_normal((2, width, width))
        norms = {}
        if ordering == "pre_ln":
            norms["ln"] = np_normalize(x, 1)  # (u, s) over each example's features
            a = norms["ln"][0]
        else:
            a = f(x) if ordering == "pre" else x
        h = a @ W1.T
        if ordering == "bn":  # h → BN → φ → W₂ → BN, over the batch
            norms["bn1"] = np_normalize(h, 0)
            h = norms["bn1"][0]
            norms["bn2"] = np_normalize(f(h) @ W2.T, 0)
            out = norms["bn2"][0]
        else:
            out = f(h) @ W2.T
        z = x + alpha * out
        weights.append((W1, W2))
        tape.append((x, h, z, norms))
        x = f(z) if ordering == "post" else z
        m.append(np.mean(x**2))
    s = rng.standard_normal((batch, width))  # ∂L/∂x of the last stream
    growth, d_sq = [], []
    for (W1, W2), (x_in, h, z, norms) in zip(reversed(weights), reversed(tape), strict=True):
        d = df(z) * s if ordering == "post" else s  # ∂L/∂z
        d_sq.append(np.sum(d**2))
        g = alpha * d
        if ordering == "bn":
            g = np_normalize_backward(g, *norms["bn2"], 0)
        g = df(h) * (g @ W2)
        if ordering == "bn":
            g = np_normalize_backward(g, *norms["bn1"], 0)
        branch = g @ W1  # J_Fᵀ d up to the branch's input
        if ordering == "pre":
            branch = df(x_in) * branch
        if ordering == "pre_ln":
            branch = np_normalize_backward(branch, *norms["ln"], 1)
        s_in = d + branch
        growth.append(np.sum(s_in**2) / np.sum(s**2))
        s = s_in
    return np.array(m), np.array(growth[::-1]), np.array(d_sq[::-1])


def _geomean_ratio(values):
    return float(np.exp(np.mean(np.log(values[..., 1:] / values[..., :-1]))))


@pytest.mark.parametrize("ordering", theory.ORDERINGS)
@pytest.mark.parametrize("activation, alpha", [("relu", 1.0), ("relu", 0.4), ("tanh", 1.0)])
def test_predictions_match_wide_random_numpy_nets(ordering, activation, alpha):
    """Width 512, 6 blocks, He init, batch 64, 6 seeds: the geometric means over blocks and
    seeds of the stream's E[x²] ratio and of the δ factor within 4% of the prediction's, and
    each block's δ factor (geometric mean over seeds) within 5%. (A
    product over blocks of one net's factors spreads by ~9% per block at this width, so the
    geometric mean is the statistic that 36 blocks pin down to ~2%.)"""
    blocks = 6
    runs = [_numpy_residual_net(ordering, activation, 2.0, alpha, blocks, 512, 64, s) for s in range(6)]  # fmt: skip
    want = theory.residual_chain(ordering, activation, 2.0, alpha, blocks)
    m = np.array([r[0] for r in runs])
    assert _geomean_ratio(m) == pytest.approx(_geomean_ratio(want.m), rel=0.04)
    growth = np.exp(np.mean(np.log([r[1] for r in runs]), axis=0))  # per block, over seeds
    np.testing.assert_allclose(growth, want.growth, rtol=0.05)
    d_sq = np.array([r[2] for r in runs])  # δ at each block's sum: what fnbp.Backprop holds
    np.testing.assert_allclose(np.exp(np.mean(np.log(d_sq[:, :-1] / d_sq[:, 1:]), axis=0)),
                               want.delta_sq[:-1] / want.delta_sq[1:], rtol=0.05)  # fmt: skip
    assert np.exp(np.mean(np.log(growth))) == pytest.approx(np.exp(np.mean(np.log(want.growth))), rel=0.04)  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ordering": "middle"}, "ordering must be one of"),
        ({"sigma_w2": 0.0}, "sigma_w2 must be > 0"),
        ({"alpha": math.nan}, "alpha must be finite"),
        ({"blocks": 0}, "blocks must be an int >= 1"),
        ({"m0": -1.0}, "m0"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, match):
    args = {"ordering": "linear", "activation": "relu", "sigma_w2": 2.0, "alpha": 1.0, "blocks": 3}
    with pytest.raises(ValueError, match=match):
        theory.residual_chain(**(args | kwargs))
