"""Normalization at initialization: the per-layer growth of E‖δ‖² through LayerNorm and BatchNorm.

Wide stacks (width n → ∞) with ``W ~ (0, σ_w²/n)``, no biases, γ = 1, β = 0. The error signal
is δ = ∂L/∂z at each dense layer's output z; the factor is E‖δ⁽ˡ⁻¹⁾‖² / E‖δ⁽ˡ⁾‖² in the steady
state (the gradient-independence assumption of mean-field theory: the backward pass's Wᵀ drawn
afresh, so ``g = Wᵀδ`` is Gaussian with covariance σ_w² times δ's).

**LayerNorm** normalizes each example over its n features: ``LN(z) = (z − μ)/s``, backward
``(1/s)(I − 11ᵀ/n − ẑẑᵀ/n)``, whose two projections remove O(1/n) of a vector's norm:

* ``"before"`` the activation (Dense → LN → φ): the LN output is u ~ N(0, 1) whatever σ_w²,
  ``s² = σ_w² E[φ(u)²]``, so ``factor = E[φ′(u)²] / E[φ(u)²]``: 1 for ReLU, > 1 for tanh;
* ``"after"`` it (Dense → φ → LN): z ~ N(0, σ_w²) at every layer and ``s² = Var φ(z)`` (the
  mean over features is removed), so ``factor = σ_w² E[φ′(z)²] / Var φ(z)``: π/(π − 1) for
  ReLU with He init, the same explosion as BatchNorm's infinite-batch limit.

**BatchNorm** (Dense → BN → φ, train mode) normalizes each feature over the B examples of the
batch: ``u = √B·Pz/‖Pz‖`` with ``P = I − 11ᵀ/B``, backward ``J = (1/s)(P − uuᵀ/B)``, which
removes 2 of B directions: at a real batch size that is not small. At the forward fixed point
each feature's batch vector z is Gaussian with covariance ``c·I + d·11ᵀ`` (examples are
exchangeable), so u is uniform on the sphere of radius √B in 1⊥, whatever the weight scale,
and ``‖Pz‖²/(σ_w² c)`` is χ² with B − 1 degrees of freedom, independent of u; here
``c = E‖Pφ(u)‖²/(B − 1)``. The steady-state Gram matrix of δ over the batch is then ∝ P (the
one exchangeable direction BN's backward leaves), and with ``f = φ′(u)``::

    factor = B / (c (B − 1)(B − 3)) · E[ tr((diag(f²) − ffᵀ/B)(P − uuᵀ/B)) ]

(E[1/χ²_{B−1}] = 1/(B − 3)), estimated by Monte Carlo over u (Yang et al. 2019 derive the
same explosion). As B → ∞ it tends to ``E[φ′(u)²] / Var φ(u)``: π/(π − 1) ≈ 1.47 for ReLU, the
rate usually quoted. Linear activation: ``(B − 2)/(B − 3)`` exactly, so a linear BatchNorm
stack explodes too (1.2 per layer at B = 8).
"""

from __future__ import annotations

import math

import numpy as np

from fnbp.theory.mean_field import _phi, gaussian_expectation

POSITIONS = ("before", "after")
"""Where :func:`layernorm_factor`'s LayerNorm sits: before or after the activation."""


def layernorm_factor(activation: str, position: str, sigma_w2: float = 2.0) -> float:
    """Per-layer E‖δ‖² growth of a wide Dense → LayerNorm → φ (``"before"``) or Dense → φ →
    LayerNorm (``"after"``) stack (module docstring)."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    if not sigma_w2 > 0:
        raise ValueError(f"sigma_w2 must be > 0, got {sigma_w2!r}")
    f, df = _phi(activation)
    if position == "before":  # u ~ N(0, 1): E[φ′(u)²] / E[φ(u)²]
        return gaussian_expectation(lambda u: df(u) ** 2, 1.0) / gaussian_expectation(
            lambda u: f(u) ** 2, 1.0
        )
    mean = gaussian_expectation(f, sigma_w2)
    var = gaussian_expectation(lambda z: f(z) ** 2, sigma_w2) - mean**2  # Var φ(z), z ~ N(0, σ_w²)
    return sigma_w2 * gaussian_expectation(lambda z: df(z) ** 2, sigma_w2) / var


def _sphere(batch: int, count: int, rng) -> np.ndarray:
    """``(count, batch)`` points uniform on the sphere of radius √batch inside 1⊥."""
    xi = rng.standard_normal((count, batch))
    xi -= xi.mean(axis=1, keepdims=True)  # Pξ
    return math.sqrt(batch) * xi / np.linalg.norm(xi, axis=1, keepdims=True)


def batchnorm_factor(
    activation: str, batch: int, *, samples: int = 200_000, seed: int = 0
) -> float:
    """Per-layer E‖δ‖² growth of a wide Dense → BatchNorm → φ stack in train mode at batch
    size ``batch`` (≥ 4), by Monte Carlo over the batch's directions (module docstring); it
    does not depend on σ_w²."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 4:
        raise ValueError(f"batch must be an int >= 4 (the factor is infinite below), got {batch!r}")
    f, df = _phi(activation)
    rng = np.random.default_rng(seed)
    B, c_sum, t_sum, done = batch, 0.0, 0.0, 0
    chunk = max(1, 4_000_000 // B)
    while done < samples:
        u = _sphere(B, min(chunk, samples - done), rng)
        a = f(u)
        c_sum += float(np.sum((a - a.mean(axis=1, keepdims=True)) ** 2))  # ‖Pφ(u)‖²
        g = df(u)
        g2 = g**2
        # tr(diag(f²)Q) − fᵀQf/B with Q = P − uuᵀ/B
        tr_diag = np.sum(g2 * (1 - 1 / B - u**2 / B), axis=1)
        fqf = np.sum(g2, axis=1) - np.sum(g, axis=1) ** 2 / B - np.sum(g * u, axis=1) ** 2 / B
        t_sum += float(np.sum(tr_diag - fqf / B))
        done += u.shape[0]
    c = c_sum / samples / (B - 1)
    return B / (c * (B - 1) * (B - 3)) * (t_sum / samples)
