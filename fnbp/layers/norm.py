"""Normalization: BatchNorm over every axis but the last, LayerNorm over the last axis.

Both standardize ``x̂ = (x − μ)·r`` with ``r = (σ² + ε)^(−½)`` (biased variance) and output
``z = γ ⊙ x̂ + β``. With ``m`` the number of entries each statistic averages over, the local
rules are (δ = ∂L/∂z)::

    ∂L/∂β = Σ δ,    ∂L/∂γ = Σ δ ⊙ x̂
    BatchNorm, train:  ∂L/∂x = γ r (δ − (1/m)Σ δ − x̂·(1/m)Σ δ⊙x̂)      sums over the batch (and space)
    BatchNorm, eval:   ∂L/∂x = γ r δ                                   running statistics: constants
    LayerNorm:         ∂L/∂x = r (g − mean(g) − x̂·mean(g ⊙ x̂)),  g = γ ⊙ δ    means over features

In LayerNorm γ varies along the axis the means run over, so it belongs inside them; the
BatchNorm-shaped formula with γ outside is exact only at γ = 1. Statistics, ``x̂`` and these
sums run in at least float32 (mixed precision casts ``z`` back to the compute dtype).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from fnbp.layers.base import Layer, LayerError

Array = jax.Array


def _wide(v):
    return v.astype(jnp.promote_types(v.dtype, jnp.float32))


def _channels(v: Array, ndim: int) -> Array:
    """A ``(C,)`` vector shaped to broadcast over ``ndim``-dimensional ``(…, C)`` arrays."""
    return v.reshape((1,) * (ndim - 1) + (-1,))


def _check_eps(eps):
    if (
        isinstance(eps, bool)
        or not isinstance(eps, (int, float))
        or not eps > 0
        or not math.isfinite(eps)
    ):
        raise LayerError(f"eps must be a finite number > 0, got {eps!r}")


def _affine_example_grads(xhat: Array, delta: Array) -> dict:
    """Per-example ``∂ℓᵢ/∂γ = Σ δᵢ ⊙ x̂ᵢ`` and ``∂ℓᵢ/∂β = Σ δᵢ`` (sums over positions): ``(B, C)``."""
    d = delta.astype(xhat.dtype)
    space = tuple(range(1, d.ndim - 1))
    return {"gamma": jnp.sum(d * xhat, axis=space), "beta": jnp.sum(d, axis=space)}


def _affine_params(in_shape, dtype):
    c = in_shape[-1]
    return {"gamma": jnp.ones((c,), dtype), "beta": jnp.zeros((c,), dtype)}


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class BatchNorm(Layer):
    """Batch normalization over every axis but the last (channels).

    Train mode (``train=True``) uses the batch's mean and biased variance and returns the new
    running statistics ``new = momentum·old + (1 − momentum)·batch`` in ``state`` (PyTorch
    stores the unbiased variance, B/(B−1)·σ²; fnbp, Flax and Haiku the biased one). Eval mode
    uses the running statistics. Params ``{"gamma", "beta"}`` (C,), state ``{"mean", "var"}``
    (C,) starting at 0 and 1.
    """

    momentum: float = 0.9
    eps: float = 1e-5
    activation: str = "identity"
    kind = "batch_norm"

    def check(self):
        m = self.momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
            raise LayerError(f"momentum must be a number in [0, 1), got {m!r}")
        _check_eps(self.eps)

    @property
    def needs_state(self):
        return True

    @property
    def needs_train(self):
        return True

    @property
    def couples_examples(self):
        return True

    def init(self, key, in_shape, scheme, dtype):
        return _affine_params(in_shape, dtype)

    def init_state(self, in_shape):
        c = in_shape[-1]
        return {"mean": jnp.zeros((c,), jnp.float32), "var": jnp.ones((c,), jnp.float32)}

    def forward(self, p, s, x, mask, train):
        xf, axes = _wide(x), tuple(range(x.ndim - 1))
        if train:  # μ, σ² of this batch; the running statistics move towards them
            mu = jnp.mean(xf, axis=axes, keepdims=True)
            var = jnp.mean(jnp.square(xf - mu), axis=axes, keepdims=True)
            m = self.momentum
            new = {k: (m * s[k] + (1 - m) * v.reshape(-1)).astype(s[k].dtype)
                   for k, v in (("mean", mu), ("var", var))}  # fmt: skip
        else:
            mu, var, new = (
                _channels(s["mean"], x.ndim).astype(xf.dtype),
                _channels(s["var"], x.ndim).astype(xf.dtype),
                s,
            )
        r = jax.lax.rsqrt(var + self.eps)  # r = (σ² + ε)^(−½)
        xhat = (xf - mu) * r  # x̂ = (x − μ) r
        z = _channels(p["gamma"], x.ndim).astype(xf.dtype) * xhat + _channels(
            p["beta"], x.ndim
        ).astype(xf.dtype)
        return z.astype(x.dtype), (xhat, r, train), new

    def backward(self, p, x, cache, delta, l2):
        xhat, r, train = cache
        d, axes = delta.astype(xhat.dtype), tuple(range(delta.ndim - 1))
        d_beta = jnp.sum(d, axis=axes, keepdims=True)  # Σ δ
        d_gamma = jnp.sum(d * xhat, axis=axes, keepdims=True)  # Σ δ ⊙ x̂
        g = _channels(p["gamma"], delta.ndim).astype(xhat.dtype)
        if train:  # γ r (δ − Σδ/m − x̂ Σ(δ⊙x̂)/m)
            m = math.prod(delta.shape[:-1])
            back = g * r * (d - d_beta / m - xhat * (d_gamma / m))
        else:  # γ r δ
            back = g * r * d
        grads = {
            "gamma": d_gamma.reshape(-1).astype(p["gamma"].dtype),
            "beta": d_beta.reshape(-1).astype(p["beta"].dtype),
        }
        return grads, back.astype(delta.dtype), None

    def example_grads(self, p, x, cache, delta):
        return _affine_example_grads(cache[0], delta)  # eval mode only: train couples examples


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LayerNorm(Layer):
    """Layer normalization over the last axis of each example; params ``{"gamma", "beta"}``."""

    eps: float = 1e-5
    activation: str = "identity"
    kind = "layer_norm"

    def check(self):
        _check_eps(self.eps)

    def init(self, key, in_shape, scheme, dtype):
        return _affine_params(in_shape, dtype)

    def forward(self, p, s, x, mask, train):
        xf = _wide(x)
        mu = jnp.mean(xf, axis=-1, keepdims=True)
        r = jax.lax.rsqrt(jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True) + self.eps)
        xhat = (xf - mu) * r  # x̂ = (x − μ) r, per example
        z = _channels(p["gamma"], x.ndim).astype(xf.dtype) * xhat + _channels(
            p["beta"], x.ndim
        ).astype(xf.dtype)
        return z.astype(x.dtype), (xhat, r), {}

    def backward(self, p, x, cache, delta, l2):
        xhat, r = cache
        d, axes = delta.astype(xhat.dtype), tuple(range(delta.ndim - 1))
        g = _channels(p["gamma"], delta.ndim).astype(xhat.dtype) * d  # g = γ ⊙ δ
        # r (g − mean(g) − x̂ mean(g ⊙ x̂)), the means over the features of each example
        back = r * (
            g
            - jnp.mean(g, axis=-1, keepdims=True)
            - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)
        )
        grads = {
            "gamma": jnp.sum(d * xhat, axis=axes).astype(p["gamma"].dtype),  # Σ δ ⊙ x̂
            "beta": jnp.sum(d, axis=axes).astype(p["beta"].dtype),  # Σ δ
        }
        return grads, back.astype(delta.dtype), None

    def example_grads(self, p, x, cache, delta):
        return _affine_example_grads(cache[0], delta)
