"""Residual blocks at initialization: the stream's second moment and the growth of E‖δ‖² per block.

A block of width n has weights ``W ~ (0, σ_w²/n)``, no biases, a scalar ``α`` and one of three
orderings (``x`` the stream entering the block, ``x'`` the stream leaving it)::

    "linear"  x' = x + α·W₂ φ(W₁ x)          no activation on the stream
    "pre"     x' = x + α·W₂ φ(W₁ φ(x))       full pre-activation (He et al. 2016b)
    "post"    x' = φ(x + α·W₂ φ(W₁ x))       post-activation, the original ResNet
    "pre_ln"  x' = x + α·W₂ φ(W₁ LN(x))      pre-LayerNorm, as in transformers
    "bn"      x' = x + α·BN(W₂ φ(BN(W₁ x)))  BatchNorm in the branch (De & Smith 2020)

Forward, with ``m = E[x²]`` per coordinate and ``h = W₁x`` (or ``W₁φ(x)``) Gaussian over the
draw of W₁ with variance ``v_h = σ_w² m`` (or ``σ_w² E[φ(x)²]``), the branch ``α·W₂φ(h)`` is a
fresh zero-mean Gaussian of variance ``α² σ_w² E[φ(h)²]``, uncorrelated with x, so::

    linear, pre:  m' = m + α² σ_w² E[φ(h)²]
    post:         m' = E[φ(x + g)²],  g ~ N(0, α² σ_w² E[φ(h)²])   (x and g independent)

Backward, with the gradient-independence assumption of mean-field theory (the weights of the
backward pass drawn afresh), ``∂L/∂x = J_Fᵀ d + d`` for the branch Jacobian ``J_F`` and the
error ``d`` at the block's sum, whose cross term has mean 0::

    linear:  E‖∂L/∂x‖² = E‖d‖² · (1 + α² σ_w² χ(h))                 χ(h) = σ_w² E[φ′(h)²]
    pre:     E‖∂L/∂x‖² = E‖d‖² · (1 + α² σ_w² χ(h) E[φ′(x)²])
    post:    d = φ′(x + g) ⊙ ∂L/∂x', so the factor is E[φ′(x + g)²] · (1 + α² σ_w² χ(h))

For "linear" and "pre" a stream that enters Gaussian stays Gaussian (a sum of independent
Gaussians), so ``m`` is the whole story and the expectations are one-dimensional quadratures.
The "post" stream is ``φ`` of a Gaussian sum, not Gaussian (for ReLU it is half zeros): no
closed one-dimensional recursion exists, so :func:`residual_chain` simulates the mean-field
chain of one coordinate, a large sample of ``x`` carried through ``x' = φ(x + g)`` with ``g``
drawn afresh each block (``g``'s variance still needs only ``E[x²]``).

The same chain carries the error back: on one coordinate, ``∂L/∂x = d + J_Fᵀd`` with
``d = φ′(z) ⊙ ∂L/∂x'`` on the identity path (the same coordinate, so ``φ′(z)`` meets an error
that already passed through the same coordinate's ``φ′`` of later blocks: a unit that is off
stays off, which no independence assumption sees) and ``J_Fᵀd`` a fresh Gaussian of variance
``α² σ_w² χ(h) E[d²]``, the weights' part of the gradient-independence assumption.

The normalized branches see the stream only through a normalization (wide limit, BatchNorm at
an infinite batch; γ = 1, β = 0). "pre_ln": LN(x) ~ N(0, 1) whatever m, so the branch adds a
constant ``α² σ_w² E[φ(h)²]``, h ~ N(0, σ_w²), and m grows linearly with depth; LN's backward
divides by √m, so the factor is ``1 + α² σ_w² χ(h)/m``. "bn": the branch ends in a BatchNorm,
so it adds exactly α² (m grows linearly, De & Smith 2020), and its backward passes
``α² (E[φ′(u)²]/Var φ(u))/m`` of the error, u ~ N(0, 1), the first BatchNorm dividing by
σ_w²·m and the second by σ_w² Var φ(u) (it removes the batch mean of W₂φ(u) too). Both
factors fall as 1/m ∝ 1/l, so the total over L blocks grows like a power of L, not
exponentially: for ReLU with He init exactly ``2L + 1`` (pre_ln, m₀ = 1, α = 1), and
``Π (1 + c α²/(m₀ + α² l))``, c = π/(π − 1), about ``(1 + α² L/m₀)^c`` (bn). At a real batch size BatchNorm's
backward also drops ~2/B of the branch's error (:mod:`fnbp.theory.normalization`), a
correction to the small branch term that this leaves out.

For ReLU with He init (σ_w² = 2) the factors are closed: ``1 + 2α²`` (linear), ``1 + α²``
(pre), and the total over L blocks ``(1 + 2α²)ᴸ``: it explodes as ``3ᴸ`` at α = 1, tends to
``e²`` at α = 1/√L, and is 1 at α = 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from fnbp.theory.mean_field import _phi, gaussian_expectation

ORDERINGS = ("linear", "pre", "post", "pre_ln", "bn")
"""The residual-block orderings :func:`residual_chain` knows (the module docstring derives each)."""
_SAMPLES = 400_000  # the simulated "post" stream: ~0.2% Monte-Carlo error per expectation


class ResidualChain(NamedTuple):
    """Mean-field predictions for ``blocks`` residual blocks.

    Attributes:
        m: ``(blocks + 1,)`` E[x²] of the stream entering each block, then leaving the last.
        growth: ``(blocks,)`` E‖∂L/∂x‖² / E‖∂L/∂x'‖² across each block, stream to stream.
        total: the product of ``growth``: E‖δ‖² at the first block's input over the last's output.
        delta_sq: ``(blocks,)`` E‖δ‖² at each block's sum ``z = x + α·F(x)`` (what
            :class:`fnbp.Backprop` holds for a residual block), relative to the last block's:
            ``delta_sq[l − 1]/delta_sq[l]`` is the measurable factor of block l. Except for
            "post" (where δ at z meets φ′(z) before the stream) it is the product of
            ``growth`` over the blocks above.
    """

    m: np.ndarray
    growth: np.ndarray
    total: float
    delta_sq: np.ndarray


def _check(ordering: str, sigma_w2: float, alpha: float, blocks: int, m0: float) -> None:
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering must be one of {ORDERINGS}, got {ordering!r}")
    if not sigma_w2 > 0:
        raise ValueError(f"sigma_w2 must be > 0, got {sigma_w2!r}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks must be an int >= 1, got {blocks!r}")
    if not m0 > 0:
        raise ValueError(f"m0 (E[x²] of the stream entering block 1) must be > 0, got {m0!r}")


def _gaussian_block(ordering, f, df, sigma_w2, alpha, m):
    """``(m', growth)`` of one block (any ordering but "post") on a Gaussian stream N(0, m)."""
    if ordering == "pre_ln":  # h = W₁ LN(x) ~ N(0, σ_w²); LN's backward divides by √m
        branch = alpha**2 * sigma_w2 * gaussian_expectation(lambda h: f(h) ** 2, sigma_w2)
        chi_h = sigma_w2 * gaussian_expectation(lambda h: df(h) ** 2, sigma_w2)
        return m + branch, 1.0 + alpha**2 * sigma_w2 * chi_h / m
    if ordering == "bn":  # u = BN(W₁x) ~ N(0, 1); the branch's last BN makes it add α²
        mean = gaussian_expectation(f, 1.0)  # the second BN removes W₂φ(u)'s batch mean
        var = gaussian_expectation(lambda u: f(u) ** 2, 1.0) - mean**2
        return m + alpha**2, 1.0 + alpha**2 * gaussian_expectation(
            lambda u: df(u) ** 2, 1.0
        ) / var / m
    if ordering == "linear":
        v_h, stream_gain = sigma_w2 * m, 1.0
    else:  # "pre": the branch reads φ(x)
        v_h = sigma_w2 * gaussian_expectation(lambda x: f(x) ** 2, m)
        stream_gain = gaussian_expectation(lambda x: df(x) ** 2, m)  # E[φ′(x)²]
    branch = alpha**2 * sigma_w2 * gaussian_expectation(lambda h: f(h) ** 2, v_h)
    chi_h = sigma_w2 * gaussian_expectation(lambda h: df(h) ** 2, v_h)
    return m + branch, 1.0 + alpha**2 * sigma_w2 * chi_h * stream_gain


def residual_chain(
    ordering: str,
    activation: str,
    sigma_w2: float,
    alpha: float,
    blocks: int,
    m0: float = 1.0,
    *,
    samples: int = _SAMPLES,
    seed: int = 0,
) -> ResidualChain:
    """Predict the stream's E[x²] and the per-block growth of E‖δ‖² for ``blocks`` blocks.

    Args:
        ordering: one of :data:`ORDERINGS` (module docstring).
        activation: a name of :mod:`fnbp.activations` (φ inside and, for "pre"/"post", on the
            stream).
        sigma_w2: σ_w² of both branch layers (He: 2).
        alpha: the branch scale α (1, 1/√L, 0 ...).
        blocks: L, the number of blocks.
        m0: E[x²] of the stream entering block 1, which is N(0, m0) (a dense layer with no
            activation before the blocks).
        samples, seed: the simulated coordinate of the "post" chain (ignored otherwise).

    Returns:
        A :class:`ResidualChain`.
    """
    _check(ordering, sigma_w2, alpha, blocks, m0)
    f, df = _phi(activation)
    m, growth = [float(m0)], []
    if ordering != "post":
        for _ in range(blocks):
            m_next, g = _gaussian_block(ordering, f, df, sigma_w2, alpha, m[-1])
            m.append(m_next)
            growth.append(g)
        # δ at block l's sum is the stream's error leaving it: the growth of the blocks above
        delta_sq = np.append(np.cumprod(np.array(growth[:0:-1]))[::-1], 1.0)
    else:
        m, growth, delta_sq = _post_chain(f, df, sigma_w2, alpha, blocks, m0, samples, seed)
    growth = np.array(growth)
    return ResidualChain(np.array(m), growth, float(np.prod(growth)), np.asarray(delta_sq))


def _post_chain(f, df, sigma_w2, alpha, blocks, m0, samples, seed):
    """``(m, growth, delta_sq)`` of the "post" ordering by simulating one coordinate's
    mean-field chain, forward (``x' = φ(x + g)``) then backward (module docstring)."""
    rng = np.random.default_rng(seed)
    x = math.sqrt(m0) * rng.standard_normal(samples)
    m, zs, chis = [float(m0)], [], []
    for _ in range(blocks):
        v_h = sigma_w2 * float(np.mean(x**2))  # h = W₁x ~ N(0, σ_w² E[x²])
        branch = alpha**2 * sigma_w2 * gaussian_expectation(lambda h: f(h) ** 2, v_h)
        chis.append(sigma_w2 * gaussian_expectation(lambda h: df(h) ** 2, v_h))  # χ(h)
        z = x + math.sqrt(branch) * rng.standard_normal(samples)  # x + α·W₂φ(W₁x)
        zs.append(z)
        x = f(z)
        m.append(float(np.mean(x**2)))
    s = rng.standard_normal(samples)  # ∂L/∂x' of the last block: independent of the stream
    e_out, growth, d_sq = float(np.mean(s**2)), [], []
    for z, chi_h in zip(reversed(zs), reversed(chis), strict=True):
        d = df(z) * s  # ∂L/∂z = φ′(z) ⊙ ∂L/∂x'
        d_sq.append(float(np.mean(d**2)))
        fresh = math.sqrt(alpha**2 * sigma_w2 * chi_h * float(np.mean(d**2)))
        s = d + fresh * rng.standard_normal(samples)  # ∂L/∂x = d + J_Fᵀd
        e_in = float(np.mean(s**2))
        growth.append(e_in / e_out if e_out > 0 else 0.0)
        e_out = e_in
    d_sq = np.array(d_sq[::-1])
    return m, growth[::-1], d_sq / d_sq[-1] if d_sq[-1] > 0 else d_sq
