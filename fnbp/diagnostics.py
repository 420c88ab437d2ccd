"""Per-layer signal statistics: how δ, gradients and activations change with depth.

:func:`layer_stats` runs the hand-written :func:`fnbp.backprop` once and summarizes every
layer, the raw material of the gradient-stability and initialization studies. It is pure and
jit/vmap-friendly: ``jax.vmap(lambda p: layer_stats(p, model, x, y))(population)`` measures a
whole population at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fnbp.backprop import _keyed_backprop
from fnbp.model import MLP, Params, check_inputs, check_mode, check_params

Array = jax.Array


def _sum_sq(v: Array) -> Array:
    """Σ v², accumulated in at least float32."""
    return jnp.sum(jnp.square(v.astype(jnp.promote_types(v.dtype, jnp.float32))))


def _stream(v):
    """A layer's own value: for a residual block, that of the stream (``"out"``), not of its
    branch."""
    return v["out"] if isinstance(v, dict) else v


def _example_norms(d: Array) -> Array:
    """‖dₙ‖ of each example ``n``, over every axis but the batch axis: shape ``(batch,)``."""
    return jnp.linalg.norm(d.reshape(d.shape[0], -1), axis=1)


def _weight_grad_norm(layer, g) -> Array:
    """‖∂L/∂W‖_F over the layer's weights (a residual block's all together); NaN for a layer
    without weights."""
    ws = layer.weights(g)
    if not ws:
        return jnp.asarray(jnp.nan, jnp.float32)
    return jnp.sqrt(_sum_sq(ws[0]) if len(ws) == 1 else sum(_sum_sq(w) for w in ws))


def _layer_stats(params: Params, model, x: Array, y: Array, state=None, key=None, train=False):
    r = _keyed_backprop(params, model, x, y, 0.0, state=state, key=key, train=train)
    deltas = [_stream(d) for d in r.deltas]
    return {
        "loss": r.loss,
        "delta_sq": jnp.stack([_sum_sq(d) for d in deltas]),
        "delta_norm": jnp.stack([jnp.mean(_example_norms(d)) for d in deltas]),
        "weight_grad_norm": jnp.stack(
            [_weight_grad_norm(layer, g) for layer, g in zip(model.layers, r.grads, strict=True)]
        ),
        "preactivation_q": jnp.stack([jnp.mean(jnp.square(_stream(z))) for z in r.preactivations]),
        "activation_std": jnp.stack([jnp.std(_stream(a)) for a in r.activations]),
    }


_layer_stats_jit = jax.jit(_layer_stats, static_argnames="train")


def layer_stats(
    params: Params, model, x: Array, y: Array, *, state=None, key=None, train=None
) -> dict[str, Array]:
    """Summaries of every layer ``i = 1..L`` of ``model.layers`` (index ``i − 1``), each an
    array of shape ``(L,)``.

    Arguments:
        params, model, x, y: as in :func:`fnbp.backprop` (an :class:`fnbp.MLP` or
            :class:`fnbp.Net`; ``x`` of shape ``(batch, *input_shape)``).
        state, key, train: as in :func:`fnbp.backprop`: a net with BatchNorm needs ``state``,
            one with BatchNorm or Dropout ``train``, train-mode dropout a ``key`` for its
            masks.

    Returns a dict with:
        ``loss``: the scalar mean loss (no penalty);
        ``delta_sq``: ‖δ⁽ⁱ⁾‖², summed over the batch and the layer's units (every non-batch
            axis: features, positions, channels);
        ``delta_norm``: the mean over examples of ‖δ⁽ⁱ⁾ₙ‖, the norm over every non-batch axis;
        ``weight_grad_norm``: ‖∂L/∂W⁽ⁱ⁾‖ (Frobenius; a residual block's weights together, NaN
            for a layer without weights: pooling, normalization, dropout, reshapes);
        ``preactivation_q``: the mean of z⁽ⁱ⁾², the empirical q⁽ⁱ⁾ of mean-field theory;
        ``activation_std``: the standard deviation of a⁽ⁱ⁾ over batch and units.

    A residual block is summarized by its stream (``z = x + α·F(x)`` and its δ, the
    ``"out"`` entries of :class:`fnbp.Backprop`), not by its branch.

    The ratio ``delta_sq[l − 1] / delta_sq[l]`` is the measured χ of layer ``l``
    (:func:`fnbp.theory.chi`).
    """
    check_params(params, model)
    check_inputs(model, x, y)
    train = check_mode(model, state=state, train=train, key=key, what="layer_stats")
    if isinstance(model, MLP):
        return _layer_stats_jit(params, model, x, y)
    return _layer_stats_jit(params, model, x, y, state, key, train=train)
