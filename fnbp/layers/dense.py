"""Dense layers: ``z = W a + b``, and the activation-only layer.

Forward ``z = a Wᵀ + b`` for a batch of rows ``a`` of shape ``(batch, fan_in)``; local rule::

    ∂L/∂W = Σₙ δ aᵀ + λW,    ∂L/∂b = Σₙ δ,    ∂L/∂a = Wᵀ δ   (``δ @ W``, one row per example)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fnbp.initializers import draw_bias, draw_matrix
from fnbp.layers.base import Layer, LayerError, Outer, positive_int

Array = jax.Array


def no_l2(l2) -> bool:
    """λ is a literal 0 (a Python number, not traced): the penalty and its λW are left out
    instead of computed as 0·Σ‖W‖² and 0·W, two passes over every weight that XLA keeps (0·W is
    NaN for an infinite W)."""
    return isinstance(l2, (int, float)) and l2 == 0


def decay(grad: Array, W: Array, l2) -> Array:
    """∂/∂W of (λ/2)‖W‖² added to ``grad``: ``grad + λW`` (nothing for a literal λ = 0)."""
    return grad if no_l2(l2) else grad + jnp.asarray(l2, W.dtype) * W


def dense(p: dict[str, Array], a_prev: Array) -> Array:
    """z⁽ˡ⁾ = W⁽ˡ⁾ a⁽ˡ⁻¹⁾ + b⁽ˡ⁾ for a batch of rows: ``(batch, fan_in) -> (batch, fan_out)``."""
    z = a_prev @ p["W"].T
    return z + p["b"][None, :] if "b" in p else z


def dense_backward(p: dict[str, Array], a_prev: Array, delta: Array, l2) -> tuple[dict, Array]:
    """Local backward rule of the affine map ``z = W a_prev + b``.

    Arguments:
        p: ``{"W": (n_out, n_in), "b": (n_out,)}``, the (master) parameters.
        a_prev: the layer's input a⁽ˡ⁻¹⁾, shape ``(batch, n_in)``.
        delta: δ⁽ˡ⁾ = ∂L/∂z⁽ˡ⁾, shape ``(batch, n_out)``, in the compute dtype.
        l2: the L2 strength λ.

    Returns:
        ``(grads, back)``: ``{"W": Σₙ δ aᵀ + λW, "b": Σₙ δ}`` in the parameters' dtypes (the
        sums accumulated in them: float32 under bfloat16 mixed precision), and
        ``back = W⁽ˡ⁾ᵀ δ⁽ˡ⁾ = ∂L/∂a⁽ˡ⁻¹⁾`` of shape ``(batch, n_in)`` in δ's dtype.
    """
    W = p["W"]
    dW = jnp.matmul(delta.T, a_prev, preferred_element_type=W.dtype)  # Σₙ δaᵀ
    grads = {"W": decay(dW, W, l2)}  # + λW
    if "b" in p:
        grads["b"] = jnp.sum(delta, axis=0, dtype=p["b"].dtype)  # Σₙ δ
    return grads, delta @ W.astype(delta.dtype)  # Wᵀδ, one row per example


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Dense(Layer):
    """Fully connected: ``z = W a + b`` on a vector input; params ``{"W": (features, fan_in),
    "b": (features,)}`` (no ``"b"`` with ``use_bias=False``)."""

    features: int
    activation: str = "identity"
    use_bias: bool = True
    kind = "dense"

    def check(self):
        positive_int("features", self.features)
        if not isinstance(self.use_bias, bool):
            raise LayerError(f"use_bias must be True or False, got {self.use_bias!r}")

    def out_shape(self, in_shape):
        if len(in_shape) != 1:
            raise LayerError(
                f"needs a vector input (batch, features), got per-example shape {in_shape}; "
                "put a Flatten() before it"
            )
        return (self.features,)

    def init(self, key, in_shape, scheme, dtype):
        k_w, k_b = jax.random.split(key)
        p = {"W": draw_matrix(k_w, scheme, self.features, in_shape[0], dtype)}
        if self.use_bias:
            p["b"] = draw_bias(k_b, scheme, self.features, dtype)
        return {"W": p["W"], "b": p["b"]} if self.use_bias else p

    def forward(self, p, s, x, mask, train):
        return dense(p, x), None, {}

    def backward(self, p, x, cache, delta, l2):
        grads, back = dense_backward(p, x, delta, l2)
        return grads, back, None

    def example_grads(self, p, x, cache, delta):
        g = {"W": Outer(delta[:, None], x[:, None])}  # ∂ℓᵢ/∂W = δᵢ aᵢᵀ
        return g | ({"b": delta} if "b" in p else {})  # ∂ℓᵢ/∂b = δᵢ

    def weights(self, p):
        return [p["W"]]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Activation(Layer):
    """An activation on its own: ``z = x``, ``a = f(z)``; no params. Its rule passes δ on."""

    activation: str = "identity"
    kind = "activation"

    def forward(self, p, s, x, mask, train):
        return x, None, {}

    def backward(self, p, x, cache, delta, l2):
        return {}, delta, None
