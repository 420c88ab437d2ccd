"""Layers that only rearrange: ``Flatten`` and ``Reshape``. Their rule reshapes δ back."""

from __future__ import annotations

import dataclasses
import math

import jax

from fnbp.layers.base import Layer, LayerError, int_tuple


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Flatten(Layer):
    """``(batch, *shape) -> (batch, prod(shape))``."""

    activation: str = "identity"
    kind = "flatten"

    def out_shape(self, in_shape):
        return (math.prod(in_shape),)

    def forward(self, p, s, x, mask, train):
        return x.reshape(x.shape[0], -1), None, {}

    def backward(self, p, x, cache, delta, l2):
        return {}, delta.reshape(x.shape), None


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Reshape(Layer):
    """``(batch, *in_shape) -> (batch, *shape)``, e.g. ``Reshape((8, 8, 1))`` for 8×8 images."""

    shape: tuple[int, ...]
    activation: str = "identity"
    kind = "reshape"

    def normalize(self):
        if isinstance(self.shape, list):
            self._set("shape", tuple(self.shape))
        if isinstance(self.shape, int) and not isinstance(self.shape, bool):
            self._set("shape", (self.shape,))

    def check(self):
        int_tuple("shape", self.shape)

    def out_shape(self, in_shape):
        if math.prod(self.shape) != math.prod(in_shape):
            raise LayerError(
                f"cannot reshape per-example shape {in_shape} ({math.prod(in_shape)} entries) to "
                f"{self.shape} ({math.prod(self.shape)} entries)"
            )
        return self.shape

    def forward(self, p, s, x, mask, train):
        return x.reshape(x.shape[0], *self.shape), None, {}

    def backward(self, p, x, cache, delta, l2):
        return {}, delta.reshape(x.shape), None
