"""Residual blocks: ``z = x + α·F(x)``, the branch ``F`` a sequence of layers run by the same
engine (its last activation included), or ``z = P x + α·F(x)`` when ``F`` changes the number
of features (``P`` a learned ``(C_out, C_in)`` projection on the last axis).

Local rule (δ = ∂L/∂z; the stream fans out to the skip and the branch, so their grads add)::

    δ_F      = f′_last ⊙ (α δ)                the branch's last z, then backward through F
    ∂L/∂x    = δ + ∂L/∂x|_F                   (P⊤δ + ∂L/∂x|_F with a projection)
    ∂L/∂α    = Σ ⟨δ, F(x)⟩                    when α is learned
    ∂L/∂P    = Σₙ δ xᵀ + λP

α = 0 passes δ back unchanged, exactly.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from fnbp.engine import act_backward, backward_seq, draw_masks, forward_seq, no_masks
from fnbp.initializers import draw_matrix, init_layers
from fnbp.layers.base import Layer, LayerError, Outer, sequence_shapes
from fnbp.layers.dense import decay


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Residual(Layer):
    """A residual block around ``branch`` (a tuple of layers).

    Arguments:
        branch: the layers of F.
        alpha: the branch's scale α (1, 1/√L, 0, …).
        learn_alpha: make α a param (``{"alpha": ()}``, initialised to ``alpha``).
        activation: applied to ``x + α·F(x)`` (post-activation blocks); identity by default.

    Params ``{"branch": [...], "alpha"?: (), "P"?: (C_out, C_in)}``; state ``{"branch": [...]}``.
    """

    branch: tuple
    alpha: float = 1.0
    learn_alpha: bool = False
    activation: str = "identity"
    kind = "residual"

    def normalize(self):
        if isinstance(self.branch, list):
            self._set("branch", tuple(self.branch))

    def check(self):
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise LayerError(f"alpha must be a finite number, got {a!r}")
        if not isinstance(self.learn_alpha, bool):
            raise LayerError(f"learn_alpha must be True or False, got {self.learn_alpha!r}")

    def shapes(self, in_shape):
        try:
            return sequence_shapes(self.branch, in_shape)
        except LayerError as e:
            raise LayerError(f"branch {e}") from None

    def projects(self, in_shape) -> bool:
        return self.shapes(in_shape)[1] != in_shape

    def out_shape(self, in_shape):
        out = self.shapes(in_shape)[1]
        if out != in_shape and out[:-1] != in_shape[:-1]:
            raise LayerError(
                f"the branch maps per-example shape {in_shape} to {out}; a projection can only "
                "change the last axis (features or channels), so the other axes must agree"
            )
        return out

    def sublayers(self):
        return self.branch

    def to_dict(self):
        return {**super().to_dict(), "branch": [layer.to_dict() for layer in self.branch]}

    @property
    def needs_state(self):
        return any(layer.needs_state for layer in self.branch)

    @property
    def needs_train(self):
        return any(layer.needs_train for layer in self.branch)

    @property
    def couples_examples(self):
        return any(layer.couples_examples for layer in self.branch)

    def init(self, key, in_shape, scheme, dtype):
        k_branch, k_p = jax.random.split(key)
        in_shapes, out = self.shapes(in_shape)
        p = {"branch": init_layers(k_branch, self.branch, in_shapes, scheme, dtype)}
        if self.learn_alpha:
            p["alpha"] = jnp.asarray(self.alpha, dtype)
        if out != in_shape:
            p["P"] = draw_matrix(k_p, scheme, out[-1], in_shape[-1], dtype)
        return p

    def init_state(self, in_shape):
        in_shapes = self.shapes(in_shape)[0]
        return {
            "branch": [layer.init_state(s) for layer, s in zip(self.branch, in_shapes, strict=True)]
        }

    def draw_mask(self, key, in_shape, batch):
        return draw_masks(self.branch, key, self.shapes(in_shape)[0], batch)

    def no_mask(self):
        return no_masks(self.branch)

    def weights(self, p):
        own = [p["P"]] if "P" in p else []
        return own + [
            w for layer, q in zip(self.branch, p["branch"], strict=True) for w in layer.weights(q)
        ]

    def _alpha(self, p, dtype):
        return p["alpha"].astype(dtype) if self.learn_alpha else self.alpha

    def forward(self, p, s, x, mask, train):
        tr = forward_seq(self.branch, p["branch"], s["branch"], x, mask, train)
        F = tr.a[-1]
        skip = x if "P" not in p else x @ p["P"].T  # x, or P x
        return skip + self._alpha(p, F.dtype) * F, tr, {"branch": tr.state}  # x + α F(x)

    def backward(self, p, x, tr, delta, l2):
        F, last = tr.a[-1], self.branch[-1]
        d_F = act_backward(last.act, tr.z[-1], F, self._alpha(p, delta.dtype) * delta)  # f′ ⊙ αδ
        g_branch, d_branch, back_F = backward_seq(self.branch, p["branch"], tr, d_F, l2)
        grads = {"branch": g_branch}
        if self.learn_alpha:
            grads["alpha"] = jnp.sum(delta * F, dtype=p["alpha"].dtype)  # Σ ⟨δ, F(x)⟩
        if "P" in p:
            P = p["P"]
            rows_d, rows_x = delta.reshape(-1, delta.shape[-1]), x.reshape(-1, x.shape[-1])
            grads["P"] = decay(jnp.matmul(rows_d.T, rows_x, preferred_element_type=P.dtype), P, l2)
            return grads, delta @ P.astype(delta.dtype) + back_F, d_branch  # P⊤δ + ∂L/∂x|_F
        return grads, delta + back_F, d_branch  # δ + ∂L/∂x|_F

    def example_grads(self, p, x, tr, delta):
        """The block's own leaves; its branch's layers give theirs from the branch's trace."""
        g, B = {}, x.shape[0]
        if self.learn_alpha:  # ∂ℓᵢ/∂α = ⟨δᵢ, F(xᵢ)⟩
            g["alpha"] = jnp.sum((delta * tr.a[-1]).reshape(B, -1), axis=1)
        if "P" in p:  # ∂ℓᵢ/∂P = Σₜ δᵢ[t] xᵢ[t]ᵀ over the positions t
            g["P"] = Outer(delta.reshape(B, -1, delta.shape[-1]), x.reshape(B, -1, x.shape[-1]))
        return g

    def regions(self, x, tr):
        from fnbp.engine import trace_regions

        return trace_regions(self.branch, tr)
