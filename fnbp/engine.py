"""The generic engine: a forward pass that stores what each layer's local rule needs, and one
backward loop over the layers.

Every layer ``i`` of a sequence computes the textbook pair

    z⁽ⁱ⁾ = op_i(θ_i, a⁽ⁱ⁻¹⁾),    a⁽ⁱ⁾ = f_i(z⁽ⁱ⁾),    a⁽⁰⁾ = x

(a dense layer's op is ``W a + b``; a convolution's, a normalization's, a pool's … are others)
and contributes one local backward rule ``(θ_i, a⁽ⁱ⁻¹⁾, cache_i, δ⁽ⁱ⁾) -> (∂L/∂θ_i, ∂L/∂a⁽ⁱ⁻¹⁾)``,
kept beside its forward in the module of its kind (:mod:`fnbp.layers`). The loop never
branches on a kind. Nothing here uses JAX's automatic differentiation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fnbp.activations import Activation

Array = jax.Array


class Trace(NamedTuple):
    """What :func:`forward_seq` stores for the backward pass (lists aligned with the layers).

    Attributes:
        z: ``z[i]`` = z⁽ⁱ⁾, layer ``i``'s output before its activation.
        a: ``a[0] = x`` and ``a[i + 1] = f_i(z[i])``: one longer than the layers.
        cache: whatever each layer's forward kept for its backward rule.
        state: each layer's new state (BatchNorm running statistics; ``{}`` elsewhere).
    """

    z: list
    a: list
    cache: list
    state: list


def forward_seq(layers, params, state, x, masks, train: bool, offsets=None) -> Trace:
    """Run ``layers`` on ``x``, keeping z⁽ⁱ⁾, a⁽ⁱ⁾ and each layer's cache.

    ``params``, ``state`` and ``masks`` are lists aligned with ``layers`` (a mask is ``None``
    except for a train-mode dropout layer). ``offsets`` (a list of arrays shaped like each z⁽ⁱ⁾,
    or ``None``) is added to every z⁽ⁱ⁾: ``jax.grad`` with respect to zero offsets is the
    autodiff reference for the deltas.
    """
    z, a, cache, new_state = [], [x], [], []
    for i, layer in enumerate(layers):
        zi, ci, si = layer.forward(params[i], state[i], a[i], masks[i], train)  # z⁽ⁱ⁾ = op(a⁽ⁱ⁻¹⁾)
        if offsets is not None:
            zi = zi + offsets[i]
        z.append(zi)
        cache.append(ci)
        new_state.append(si)
        a.append(layer.act.f(zi))  # a⁽ⁱ⁾ = f(z⁽ⁱ⁾)
    return Trace(z, a, cache, new_state)


def act_backward(act: Activation, z: Array, a: Array, back: Array) -> Array:
    """δ = f′(z) ⊙ ∂L/∂a; a unit of slope exactly 0 passes back exactly 0, even where ∂L/∂a
    has overflowed to ±∞ (0·∞ would be NaN). The identity passes ``back`` on untouched."""
    if act.name == "identity":
        return back
    f_prime = act.df(z, a)
    return jnp.where(f_prime == 0, 0, f_prime * back)


def backward_seq(layers, params, trace: Trace, delta: Array, l2):
    """From δ of the last layer's z back to the input: ``(grads, deltas, ∂L/∂x)``.

    ``params`` are the master parameters (each rule returns its grads in their dtypes);
    ``deltas[i]`` = δ⁽ⁱ⁾ = ∂L/∂z⁽ⁱ⁾, or for a residual block ``{"out": δ, "branch": [...]}``.
    """
    grads, deltas = [None] * len(layers), [None] * len(layers)
    for i in reversed(range(len(layers))):
        # ∂L/∂θ⁽ⁱ⁾ and back = ∂L/∂a⁽ⁱ⁻¹⁾ from δ⁽ⁱ⁾: layer i's local rule
        grads[i], back, inner = layers[i].backward(params[i], trace.a[i], trace.cache[i], delta, l2)
        deltas[i] = delta if inner is None else {"out": delta, "branch": inner}
        if i > 0:  # δ⁽ⁱ⁻¹⁾ = f′(z⁽ⁱ⁻¹⁾) ⊙ back
            delta = act_backward(layers[i - 1].act, trace.z[i - 1], trace.a[i], back)
    return grads, deltas, back


def draw_masks(layers, key, in_shapes, batch: int) -> list:
    """Dropout masks for one batch, a list aligned with ``layers``: layer ``i`` draws from
    ``fold_in(key, i)`` (``None`` for layers that draw nothing). A pure function of the key,
    so the forward pass, the hand-written backward, ``jax.grad`` and finite differences all
    see the same masks."""
    return [
        layer.draw_mask(jax.random.fold_in(key, i), shape, batch)
        for i, (layer, shape) in enumerate(zip(layers, in_shapes, strict=True))
    ]


def no_masks(layers) -> list:
    """The masks of eval mode (or of a net without dropout): ``None`` for every layer,
    nested for residual branches."""
    return [layer.no_mask() for layer in layers]


def trace_regions(layers, trace: Trace) -> list:
    """The linear piece of every piecewise-linear unit in a trace (activations, max-pool
    winners, nested branches): a finite-difference step that changes any of them straddles a
    kink."""
    pieces = []
    for i, layer in enumerate(layers):
        if layer.act.region is not None:
            pieces.append(layer.act.region(trace.z[i]))
        pieces.extend(layer.regions(trace.a[i], trace.cache[i]))
    return pieces


def nested(layers, trace: Trace, field: str) -> list:
    """``trace.z`` (``field="z"``) or the outputs ``trace.a[1:]`` (``field="a"``), with each
    residual block's entry replaced by ``{"out": value, "branch": [...]}``, the branch's own
    values from its trace."""
    values = trace.z if field == "z" else trace.a[1:]
    out = []
    for layer, v, cache in zip(layers, values, trace.cache, strict=True):
        if layer.sublayers():
            v = {"out": v, "branch": nested(layer.sublayers(), cache, field)}
        out.append(v)
    return out
