"""Per-layer signal statistics: how δ, gradients and activations change with depth.

:func:`layer_stats` runs the hand-written :func:`fnbp.backprop` once and summarizes every
layer, the raw material of the gradient-stability and initialization studies. It is pure and
jit/vmap-friendly: ``jax.vmap(lambda p: layer_stats(p, model, x, y))(population)`` measures a
whole population at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fnbp.backprop import _backprop
from fnbp.model import MLP, Params, check_inputs, check_params

Array = jax.Array


def _sum_sq(v: Array) -> Array:
    """Σ v², accumulated in at least float32."""
    return jnp.sum(jnp.square(v.astype(jnp.promote_types(v.dtype, jnp.float32))))


def _layer_stats(params: Params, model: MLP, x: Array, y: Array) -> dict[str, Array]:
    r = _backprop(params, model, x, y, 0.0)
    return {
        "loss": r.loss,
        "delta_sq": jnp.stack([_sum_sq(d) for d in r.deltas]),
        "delta_norm": jnp.stack([jnp.mean(jnp.linalg.norm(d, axis=1)) for d in r.deltas]),
        "weight_grad_norm": jnp.stack([jnp.sqrt(_sum_sq(g["W"])) for g in r.grads]),
        "preactivation_q": jnp.stack([jnp.mean(jnp.square(z)) for z in r.preactivations]),
        "activation_std": jnp.stack([jnp.std(a) for a in r.activations]),
    }


_layer_stats_jit = jax.jit(_layer_stats)


def layer_stats(params: Params, model: MLP, x: Array, y: Array) -> dict[str, Array]:
    """Summaries of every layer ``l = 1..L`` (index ``l − 1``), each an array of shape ``(L,)``.

    Returns a dict with:
        ``loss``: the scalar mean loss (no penalty);
        ``delta_sq``: ‖δ⁽ˡ⁾‖², summed over the batch and the layer's units;
        ``delta_norm``: the mean over examples of ‖δ⁽ˡ⁾ₙ‖;
        ``weight_grad_norm``: ‖∂L/∂W⁽ˡ⁾‖ (Frobenius);
        ``preactivation_q``: the mean of z⁽ˡ⁾², the empirical q⁽ˡ⁾ of mean-field theory;
        ``activation_std``: the standard deviation of a⁽ˡ⁾ over batch and units.

    The ratio ``delta_sq[l − 1] / delta_sq[l]`` is the measured χ of layer ``l``
    (:func:`fnbp.theory.chi`).
    """
    check_params(params, model)
    check_inputs(model, x, y)
    return _layer_stats_jit(params, model, x, y)
