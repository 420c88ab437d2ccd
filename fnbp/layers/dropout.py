"""Dropout with inverted scaling: ``z = m ⊙ x / q``, ``q = 1 − rate`` the keep probability.

The mask ``m ~ Bernoulli(q)`` is drawn from an explicit key (:func:`fnbp.engine.draw_masks`)
and stored, so the local rule uses the very mask of the forward pass::

    ∂L/∂x = m ⊙ δ / q

(rebuilding ``m`` from the output's zeros, as BackPACK does, is wrong wherever an input is
exactly 0). Eval mode, or ``rate = 0``, is the identity.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fnbp.layers.base import Layer, LayerError


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Dropout(Layer):
    """Drop each entry with probability ``rate`` in train mode (not the keep rate)."""

    rate: float
    activation: str = "identity"
    kind = "dropout"

    def check(self):
        r = self.rate
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise LayerError(f"rate (the drop probability) must be a number in [0, 1), got {r!r}")

    @property
    def needs_train(self):
        return True

    def draw_mask(self, key, in_shape, batch):
        if self.rate == 0:
            return None
        return jax.random.bernoulli(key, 1.0 - self.rate, (batch, *in_shape))  # m ~ Bernoulli(q)

    def forward(self, p, s, x, mask, train):
        if mask is None:  # eval mode or rate 0
            return x, None, {}
        return jnp.where(mask, x / (1.0 - self.rate), 0), mask, {}  # m ⊙ x / q

    def backward(self, p, x, cache, delta, l2):
        if cache is None:
            return {}, delta, None
        return {}, jnp.where(cache, delta / (1.0 - self.rate), 0), None  # m ⊙ δ / q
