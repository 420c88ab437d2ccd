"""Pooling, 1-D and 2-D, channels last: the max or the mean over each window.

A window ``w`` moved by stride ``s`` along each spatial axis must tile the input exactly
(``(n − w) mod s = 0``), so no input is silently dropped. With ``K = prod(w)`` entries per
window, ``win[n, o, k, c] = x[n, o·s + k, c]``::

    AvgPool:  z = (1/K) Σₖ win[…, k, …]          ∂L/∂x = Σ over windows of δ/K
    MaxPool:  z = maxₖ win[…, k, …]              ∂L/∂x = Σ over windows of δ·1[win = z]/#{win = z}

Ties in a max window share δ equally, as autodiff of ``jnp.max`` does (``lax.reduce_window``
would give it all to one entry). Windows are strided slices; their transpose is ``lax.pad``
with interior padding, so the backward pass is as cheap as the forward.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax

from fnbp.layers.base import Layer, LayerError, int_tuple

Array = jax.Array


def _offsets(window):
    return list(itertools.product(*(range(w) for w in window)))


def windows(x: Array, window, strides) -> Array:
    """``(B, *spatial, C) -> (B, *out, K, C)``: every window's K entries."""
    out = [(n - w) // s + 1 for n, w, s in zip(x.shape[1:-1], window, strides, strict=True)]
    parts = []
    for off in _offsets(window):
        idx = tuple(
            slice(k, k + (o - 1) * s + 1, s) for k, o, s in zip(off, out, strides, strict=True)
        )
        parts.append(x[(slice(None), *idx, slice(None))])
    return jnp.stack(parts, axis=-2)


def unwindows(g: Array, in_shape, window, strides) -> Array:
    """The transpose of :func:`windows`: ``(B, *out, K, C) -> (B, *spatial, C)``, summing
    every window's entries back onto the input positions they came from."""
    out = g.shape[1:-2]
    total = None
    for j, off in enumerate(_offsets(window)):
        config = [(0, 0, 0)]
        for k, o, s, n in zip(off, out, strides, in_shape[1:-1], strict=True):
            config.append((k, n - k - (o - 1) * s - 1, s - 1))  # (lo, hi, interior)
        part = lax.pad(g[..., j, :], jnp.zeros((), g.dtype), [*config, (0, 0, 0)])
        total = part if total is None else total + part
    return total


@dataclasses.dataclass(frozen=True)
class _Pool(Layer):
    window: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    activation: str = "identity"

    def normalize(self):
        for name in ("window", "strides"):
            v = getattr(self, name)
            if isinstance(v, list):
                self._set(name, tuple(v))
        if isinstance(self.window, int) and not isinstance(self.window, bool):
            self._set("window", (self.window,))

    @property
    def steps(self) -> tuple[int, ...]:
        return self.window if self.strides is None else self.strides

    def check(self):
        if not isinstance(self.window, tuple) or len(self.window) not in (1, 2):
            raise LayerError(f"window must be a tuple of 1 or 2 positive ints, got {self.window!r}")
        int_tuple("window", self.window)
        if self.strides is not None:
            int_tuple("strides", self.strides, len(self.window))

    def out_shape(self, in_shape):
        d = len(self.window)
        if len(in_shape) != d + 1:
            raise LayerError(
                f"a {d}-D pool needs per-example inputs of {d} spatial axes and channels, got "
                f"{in_shape}"
            )
        out = []
        for n, w, s in zip(in_shape[:-1], self.window, self.steps, strict=True):
            if n < w or (n - w) % s:
                raise LayerError(
                    f"window {w} with stride {s} does not divide the input size {n} "
                    f"((size − window) must be a multiple of the stride)"
                )
            out.append((n - w) // s + 1)
        return (*out, in_shape[-1])


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class AvgPool(_Pool):
    """The mean over each window (``strides`` default to the window: non-overlapping)."""

    kind = "avg_pool"

    def forward(self, p, s, x, mask, train):
        return jnp.mean(windows(x, self.window, self.steps), axis=-2), None, {}

    def backward(self, p, x, cache, delta, l2):
        K = math.prod(self.window)
        share = jnp.broadcast_to((delta / K)[..., None, :], (*delta.shape[:-1], K, delta.shape[-1]))
        return {}, unwindows(share, x.shape, self.window, self.steps), None  # Σ δ/K per window


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class MaxPool(_Pool):
    """The max over each window; ties share the gradient equally."""

    kind = "max_pool"

    def forward(self, p, s, x, mask, train):
        return jnp.max(windows(x, self.window, self.steps), axis=-2), None, {}

    def backward(self, p, x, cache, delta, l2):
        win = windows(x, self.window, self.steps)
        hit = win == jnp.max(win, axis=-2, keepdims=True)  # 1[win = z]
        count = jnp.sum(hit, axis=-2, keepdims=True).astype(delta.dtype)
        share = jnp.where(hit, delta[..., None, :] / count, 0)  # δ/#{win = z} to each max
        return {}, unwindows(share, x.shape, self.window, self.steps), None

    def regions(self, x, cache):
        return [jnp.argmax(windows(x, self.window, self.steps), axis=-2)]  # which entry wins
