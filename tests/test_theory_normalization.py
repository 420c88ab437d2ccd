"""Tests of fnbp/theory/normalization.py: closed forms and limits, and a witness that shares
nothing with it: wide random normalized stacks in NumPy, run forward and backward by hand."""

import math

import numpy as np
import pytest
from oracles import NP_ACTS, np_normalize, np_normalize_backward

from fnbp.theory.normalization import batchnorm_factor, layernorm_factor


def _measured_factor(kind, activation, batch, seed, width=512, depth=20, sigma_w2=2.0, skip=5):
    """Geometric mean of ‖δ⁽ˡ⁻¹⁾‖²/‖δ⁽ˡ⁾‖² (δ at each dense output) over a random stack's
    layers, leaving out the ``skip`` nearest the top (where δ has not reached its steady
    direction yet) and the first. ``kind``: "bn" (Dense → BN → φ, normalized over the batch),
    "ln-before" (Dense → LN → φ) or "ln-after" (Dense → φ → LN), LN over the features."""
    f, df = NP_ACTS[activation]
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((batch, width))
    Ws, tape = [], []
    for _ in range(depth):
        W = math.sqrt(sigma_w2 / width) * rng.standard_normal((width, width))
        z = a @ W.T
        if kind == "bn":
            u, s = np_normalize(z, 0)
            a = f(u)
        elif kind == "ln-before":
            u, s = np_normalize(z, 1)
            a = f(u)
        else:  # ln-after
            u, s = np_normalize(f(z), 1)
            a = u
        Ws.append(W)
        tape.append((z, u, s))
    delta = rng.standard_normal((batch, width))  # δ at the last dense output
    norms = [np.sum(delta**2)]
    for l in range(depth - 1, 0, -1):  # δ⁽ˡ⁻¹⁾ from δ⁽ˡ⁾
        g = delta @ Ws[l]  # ∂L/∂a⁽ˡ⁻¹⁾
        z, u, s = tape[l - 1]
        if kind == "bn":
            delta = np_normalize_backward(df(u) * g, u, s, 0)
        elif kind == "ln-before":
            delta = np_normalize_backward(df(u) * g, u, s, 1)
        else:
            delta = df(z) * np_normalize_backward(g, u, s, 1)
        norms.append(np.sum(delta**2))
    ratios = np.array(norms[1:]) / np.array(norms[:-1])
    return np.exp(np.mean(np.log(ratios[skip:-1])))  # the last: layer 1, fed the raw input


def test_layernorm_before_relu_is_neutral_and_after_relu_explodes_at_pi_over_pi_minus_one():
    assert layernorm_factor("relu", "before") == pytest.approx(1.0, rel=1e-12)
    # Gauss–Hermite is not exact for E[relu(z)] (|z| is not polynomial): 0.2% here
    assert layernorm_factor("relu", "after") == pytest.approx(math.pi / (math.pi - 1), rel=5e-3)


@pytest.mark.parametrize("batch", [4, 5, 8, 64, 256])
def test_linear_batchnorm_factor_is_b_minus_2_over_b_minus_3(batch):
    assert batchnorm_factor("identity", batch, samples=2000) == pytest.approx(
        (batch - 2) / (batch - 3), rel=1e-9
    )


def test_relu_batchnorm_factor_falls_towards_pi_over_pi_minus_one_as_the_batch_grows():
    rates = [batchnorm_factor("relu", b, samples=40_000) for b in (8, 64, 256, 2048)]
    assert rates[0] > rates[1] > rates[2] > rates[3] > math.pi / (math.pi - 1)
    assert rates[-1] == pytest.approx(math.pi / (math.pi - 1), rel=0.01)
    assert rates[0] > 1.7  # at batch 8 it is far above the infinite-batch rate


@pytest.mark.parametrize(
    "kind, activation, batch, predict",
    [
        ("bn", "relu", 8, lambda: batchnorm_factor("relu", 8)),
        ("bn", "relu", 64, lambda: batchnorm_factor("relu", 64)),
        ("bn", "identity", 8, lambda: batchnorm_factor("identity", 8)),
        ("bn", "tanh", 16, lambda: batchnorm_factor("tanh", 16)),
        ("ln-before", "relu", 32, lambda: layernorm_factor("relu", "before")),
        ("ln-before", "tanh", 32, lambda: layernorm_factor("tanh", "before")),
        ("ln-after", "relu", 32, lambda: layernorm_factor("relu", "after")),
        ("ln-after", "tanh", 32, lambda: layernorm_factor("tanh", "after", 2.0)),
    ],
)
def test_predictions_match_wide_random_numpy_stacks(kind, activation, batch, predict):
    """Width 512, depth 20, He init, 3 seeds: the measured per-layer factor (geometric mean
    over 13 layers and the seeds) within 5% of the prediction."""
    measured = np.exp(np.mean([np.log(_measured_factor(kind, activation, batch, s)) for s in range(3)]))  # fmt: skip
    assert measured == pytest.approx(predict(), rel=0.05)


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="position must be one of"):
        layernorm_factor("relu", "inside")
    with pytest.raises(ValueError, match="sigma_w2 must be > 0"):
        layernorm_factor("relu", "after", 0.0)
    with pytest.raises(ValueError, match="batch must be an int >= 4"):
        batchnorm_factor("relu", 3)
