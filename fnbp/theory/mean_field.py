"""Mean-field theory of signal propagation at initialization (Poole et al. 2016; Schoenholz et al. 2017).

For a layer with weights ``W_ij ~ (0, σ_w²/fan_in)`` and biases of variance ``σ_b²``, wide
networks carry a pre-activation variance ``q⁽ˡ⁾`` that follows the *length map*::

    q⁽ˡ⁺¹⁾ = σ_w² E[φ(h)²] + σ_b²,        h ~ N(0, q⁽ˡ⁾)

towards its fixed point ``q*``, and the back-propagated error signal changes by::

    ‖δ⁽ˡ⁾‖² / ‖δ⁽ˡ⁺¹⁾‖² = χ⁽ˡ⁾ = σ_w² E[φ′(h)²],   h ~ N(0, q⁽ˡ⁾)     (summed over units)

per layer (times ``n_{l+1}/n_l`` for the per-unit mean square), so ``‖δ⁽ˡ⁾‖² ∝ χ₁^(L−l)`` once
``q⁽ˡ⁾ = q*``, with ``χ₁ = σ_w² E[φ′(h)²], h ~ N(0, q*)``. Gradients vanish for χ₁ < 1 and
explode for χ₁ > 1 over the depth scale ``ξ = −1/ln χ₁``. For ReLU ``E[φ′(h)²] = 1/2`` for every
``q``: He init (σ_w² = 2) gives χ₁ = 1, LeCun (σ_w² = 1) 1/2, and the naive N(0, 0.01²)
``10⁻⁴·fan_in/2``.

Gaussian expectations use Gauss–Hermite quadrature with an even number of nodes: no node sits
at h = 0, and the node set is symmetric, so the ReLU-family expectations χ and the length map
need (E[relu(h)²] = q/2, E[1(h > 0)] = 1/2) come out exact despite the kink. An expectation odd
on one side of the kink is not polynomial there and is only close: E[relu(h)] = √(q/2π) comes
out 0.2% off (it enters :mod:`fnbp.theory.normalization`'s LayerNorm-after-ReLU factor).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fnbp.activations import get_activation

_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(200)  # ∫ e^(−x²/2) f(x) dx ≈ Σ wᵢ f(xᵢ)
_WEIGHTS = _WEIGHTS / math.sqrt(2 * math.pi)  # now Σ wᵢ f(xᵢ) ≈ E[f(x)], x ~ N(0, 1)
_Q_TINY = 1e-200  # below this a variance counts as 0 (its square root is still a normal float)


def gaussian_expectation(fn: Callable, q: float) -> float:
    """E[fn(h)] for h ~ N(0, q), by 200-node Gauss–Hermite quadrature (q ≥ 0)."""
    if not q >= 0:
        raise ValueError(f"q must be a variance >= 0, got {q!r}")
    h = math.sqrt(q) * _NODES
    return float(np.sum(_WEIGHTS * np.asarray(fn(h), np.float64)))


@functools.cache
def _phi(activation: str):
    """φ and φ′ of a named activation as float64 NumPy functions (fnbp's own definitions),
    each one jitted program: the fixed-point iterations call them thousands of times, and
    op-by-op dispatch cost ~0.2 ms a call."""
    act = get_activation(activation)
    f64 = lambda fn: jax.jit(lambda h: fn(jnp.asarray(h, jnp.float64)))  # noqa: E731
    f_jit = f64(act.f)
    df_jit = f64(lambda z: act.df(z, act.f(z)))

    def f(h):
        with jax.enable_x64(True):
            return np.asarray(f_jit(np.asarray(h, np.float64)))

    def df(h):
        with jax.enable_x64(True):
            return np.asarray(df_jit(np.asarray(h, np.float64)))

    return f, df


def _check_keep(keep: float) -> None:
    if not 0 < keep <= 1:
        raise ValueError(f"keep (the dropout keep probability ρ) must be in (0, 1], got {keep!r}")


def length_map(
    activation: str, sigma_w2: float, q: float, sigma_b2: float = 0.0, keep: float = 1.0
) -> float:
    """One step of the variance map: σ_w² E[φ(h)²]/ρ + σ_b², h ~ N(0, q).

    ``keep`` = ρ, the keep probability of an (inverted) dropout after the activation: a unit
    kept with probability ρ and scaled by 1/ρ has E[a²] = E[φ(h)²]/ρ (Schoenholz et al. 2017).
    """
    _check_keep(keep)
    f, _ = _phi(activation)
    return sigma_w2 * gaussian_expectation(lambda h: f(h) ** 2, q) / keep + sigma_b2


def q_trajectory(
    activation: str,
    sigma_w2: float,
    q1: float,
    depth: int,
    sigma_b2: float = 0.0,
    keep: float = 1.0,
) -> np.ndarray:
    """``q⁽¹⁾ … q⁽ᵈᵉᵖᵗʰ⁾``: the pre-activation variance of each layer, starting from ``q1``."""
    qs = [float(q1)]
    for _ in range(depth - 1):
        qs.append(length_map(activation, sigma_w2, qs[-1], sigma_b2, keep))
    return np.array(qs)


def fixed_point(
    activation: str,
    sigma_w2: float,
    sigma_b2: float = 0.0,
    q0: float = 1.0,
    iters: int = 5000,
    keep: float = 1.0,
) -> float:
    """q*, the limit of the length map from ``q0`` (``inf`` if it diverges, as ReLU's does
    for σ_w² > 2; for ReLU with σ_w² = 2 and σ_b² = 0 every q is a fixed point and ``q0`` is
    returned)."""
    q = float(q0)
    for _ in range(iters):
        new = length_map(activation, sigma_w2, q, sigma_b2, keep)
        if not math.isfinite(new) or new > 1e12:
            return math.inf
        if new < _Q_TINY:  # collapsed onto q* = 0 (e.g. ReLU below σ_w² = 2, tanh below 1)
            return 0.0
        if abs(new - q) <= 1e-13 * max(q, 1e-300):
            return new
        q = new
    return q


def chi(activation: str, sigma_w2: float, q: float, keep: float = 1.0) -> float:
    """σ_w² E[φ′(h)²]/ρ, h ~ N(0, q): the per-layer factor of ‖δ‖² at variance q (with
    dropout of keep probability ρ after the activation, δ meets the same mask scaled by 1/ρ)."""
    _check_keep(keep)
    _, df = _phi(activation)
    return sigma_w2 * gaussian_expectation(lambda h: df(h) ** 2, q) / keep


def chi1(
    activation: str, sigma_w2: float, sigma_b2: float = 0.0, q0: float = 1.0, keep: float = 1.0
) -> float:
    """χ₁ = σ_w² E[φ′(h)²]/ρ at the fixed point q* (reached from ``q0``). With dropout the
    critical init moves: for ReLU χ₁ = σ_w²/(2ρ), so σ_w² = 2ρ, not He's 2."""
    q_star = fixed_point(activation, sigma_w2, sigma_b2, q0, keep=keep)
    if math.isinf(q_star):
        q_star = 1e12  # ReLU-like growth: χ is scale-free there, any large q gives it
    # At q* = 0 take the limit q → 0⁺: at q = 0 exactly every node sits on ReLU's kink.
    return chi(activation, sigma_w2, max(q_star, _Q_TINY), keep)


def depth_scale(chi_1: float) -> float:
    """ξ = 1/|ln χ₁|: the depth over which ‖δ‖² shrinks (χ₁ < 1, where ξ = −1/ln χ₁) or grows
    (χ₁ > 1) by a factor e; ``inf`` at χ₁ = 1."""
    if not chi_1 > 0:
        raise ValueError(f"chi_1 must be > 0, got {chi_1!r}")
    return math.inf if chi_1 == 1 else 1.0 / abs(math.log(chi_1))
