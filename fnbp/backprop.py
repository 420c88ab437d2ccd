"""The hand-written backward pass: the error signal δ layer by layer, as the textbook writes it.

With ``z⁽ˡ⁾ = W⁽ˡ⁾a⁽ˡ⁻¹⁾ + b⁽ˡ⁾``, ``a⁽ˡ⁾ = f(z⁽ˡ⁾)`` and the mean loss ``L`` over a batch of ``B``
rows, the error signal ``δ⁽ˡ⁾ = ∂L/∂z⁽ˡ⁾`` obeys::

    δ⁽ᴸ⁾ = (p − y) / B                         softmax + cross-entropy, sigmoid + binary CE
    δ⁽ᴸ⁾ = (a⁽ᴸ⁾ − y) ⊙ g′(z⁽ᴸ⁾) / B            squared error with output activation g
    δ⁽ˡ⁾ = f′(z⁽ˡ⁾) ⊙ (W⁽ˡ⁺¹⁾ᵀ δ⁽ˡ⁺¹⁾)            l = L−1, …, 1
    ∂L/∂W⁽ˡ⁾ = Σₙ δ⁽ˡ⁾ a⁽ˡ⁻¹⁾ᵀ + λW⁽ˡ⁾          ∂L/∂b⁽ˡ⁾ = Σₙ δ⁽ˡ⁾

Rows are examples, so ``Wᵀδ`` is ``δ @ W`` in code and ``Σₙ δ aᵀ`` is ``δ.T @ a``.

A unit whose slope is exactly 0 (a dead ReLU, a sigmoid saturated to 0 or 1) passes back
exactly 0, even where ``W⁽ˡ⁺¹⁾ᵀ δ⁽ˡ⁺¹⁾`` has overflowed to ±∞: the product would be 0·∞ = NaN,
while autodiff selects 0 for the ReLU's dead side. The output δ of the cross-entropies is
``p − y`` from a stable softmax or sigmoid (:mod:`fnbp.losses`), never a derivative of a
``log p`` that could be ``log 0``.

Mixed precision (``compute_dtype=jnp.bfloat16`` with float32 master params) changes only
dtypes, never the equations: the forward pass runs in bfloat16, the logits are upcast so the
loss and δ⁽ᴸ⁾ are float32, δ⁽ᴸ⁾ goes back to bfloat16 so that every backward matmul runs in
bfloat16 too (a float32 δ would silently promote them all to float32), and ``Σₙ δ aᵀ`` and
``Σₙ δ`` accumulate in float32 (``preferred_element_type``), so the grads are float32.

Each layer kind contributes a local rule: the affine map its :func:`dense_backward`, the
activation its ``f′`` (:mod:`fnbp.activations`), the loss its output δ (:mod:`fnbp.losses`). A
new kind of layer is a new local rule beside these, not a rewrite of the loop.

Nothing here uses JAX's automatic differentiation (no grad, vjp, jvp, linearize or custom
derivative rules): this module is the independent computation that :func:`fnbp.crosscheck`
compares with JAX's autodiff (``tests/test_backprop.py`` proves it).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fnbp.losses import to_targets
from fnbp.model import (
    MLP,
    Params,
    check_compute_dtype,
    check_inputs,
    check_l2,
    check_params,
    forward_trace,
    l2_penalty,
    no_l2,
    output_for_loss,
)

Array = jax.Array


class Backprop(NamedTuple):
    """What :func:`backprop` returns (a pytree: it passes through ``jit`` and ``vmap``).

    Attributes:
        loss: the scalar mean loss, penalty included, in the params' dtype.
        grads: ``∂L/∂params``, same structure, shapes and dtypes as ``params``.
        deltas: ``deltas[l] = δ = ∂L/∂z`` of the layer ``params[l]``, shape ``(batch, n)``, in
            the compute dtype (like ``preactivations`` and ``activations``).
        preactivations: ``preactivations[l] = z`` of the layer ``params[l]``.
        activations: ``activations[l] = a = f(z)``, the output of layer ``params[l]``.
    """

    loss: Array
    grads: Params
    deltas: list[Array]
    preactivations: list[Array]
    activations: list[Array]


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
    W, b = p["W"], p["b"]
    dW = jnp.matmul(delta.T, a_prev, preferred_element_type=W.dtype)  # Σₙ δaᵀ
    grads = {
        "W": dW if no_l2(l2) else dW + jnp.asarray(l2, W.dtype) * W,  # + λW
        "b": jnp.sum(delta, axis=0, dtype=b.dtype),  # Σₙ δ
    }
    return grads, delta @ W.astype(delta.dtype)  # Wᵀδ, one row per example


def _backprop(params: Params, model: MLP, x: Array, y: Array, l2, compute_dtype=None) -> Backprop:
    L, loss_fn = model.num_layers, model.loss_fn
    # z[l] = W⁽ˡ⁾a[l−1] + b⁽ˡ⁾, a[l] = f(z[l]); a[0] = x; in compute_dtype when given
    z, a = forward_trace(params, model, x, compute_dtype)
    z_out, a_out = output_for_loss(params, z[L], a[L])  # float32 logits under mixed precision
    t = to_targets(loss_fn, y, model.sizes[-1], z_out.dtype)
    loss = jnp.mean(loss_fn.value(z_out, a_out, t)) + l2_penalty(params, l2)

    delta, grads = [None] * (L + 1), [None] * (L + 1)
    g_prime = model.layer_activation(L).df(z_out, a_out)
    delta[L] = loss_fn.delta(z_out, a_out, t, g_prime) / x.shape[0]  # δ⁽ᴸ⁾ = (p − y)/B, …
    delta[L] = delta[L].astype(z[L].dtype)  # back to the compute dtype for the matmuls
    for l in range(L, 0, -1):
        # ∂L/∂W⁽ˡ⁾ = Σₙ δ⁽ˡ⁾a⁽ˡ⁻¹⁾ᵀ + λW⁽ˡ⁾,  ∂L/∂b⁽ˡ⁾ = Σₙ δ⁽ˡ⁾,  back = W⁽ˡ⁾ᵀδ⁽ˡ⁾
        grads[l], back = dense_backward(params[l - 1], a[l - 1], delta[l], l2)
        if l > 1:
            f_prime = model.layer_activation(l - 1).df(z[l - 1], a[l - 1])
            # δ⁽ˡ⁻¹⁾ = f′(z⁽ˡ⁻¹⁾) ⊙ (W⁽ˡ⁾ᵀ δ⁽ˡ⁾); a unit of slope 0 passes back 0, even ∞
            delta[l - 1] = jnp.where(f_prime == 0, 0, f_prime * back)
    return Backprop(loss, grads[1:], delta[1:], z[1:], a[1:])


_backprop_jit = jax.jit(_backprop, static_argnames="compute_dtype")


def backprop(
    params: Params, model: MLP, x: Array, y: Array, *, l2=0.0, compute_dtype=None
) -> Backprop:
    """Loss, gradients and per-layer error signals by the hand-written backward pass.

    Arguments:
        params: one ``{"W": (n_l, n_{l−1}), "b": (n_l,)}`` dict per layer.
        model: the :class:`fnbp.MLP` spec.
        x: inputs, shape ``(batch, sizes[0])``.
        y: class indices ``(batch,)`` or targets ``(batch, sizes[-1])``.
        l2: L2 strength λ ≥ 0; the loss gains (λ/2)Σ‖W‖² and ∂L/∂W gains λW.
        compute_dtype: ``None`` (compute in the params' dtype), or a dtype for mixed
            precision, e.g. ``jnp.bfloat16`` with float32 params: W, b and x are cast to it
            for the matmuls and activations, the logits are upcast so the loss, softmax and
            δ⁽ᴸ⁾ run in float32, δ goes back to bfloat16 for the backward matmuls, and the
            weight-gradient sums accumulate in float32. The loss and the grads come back in
            the params' dtype; deltas, preactivations and activations in ``compute_dtype``.

    Returns:
        A :class:`Backprop` with ``.loss``, ``.grads``, ``.deltas``, ``.preactivations`` and
        ``.activations``.

    Raises:
        ValueError, TypeError: for arguments that do not fit the model (see
            :func:`fnbp.model.check_inputs`) and a ``compute_dtype`` that is not floating.
    """
    check_params(params, model)
    check_inputs(model, x, y)
    check_l2(l2)
    compute_dtype = check_compute_dtype(compute_dtype)
    return _backprop_jit(params, model, x, y, l2, compute_dtype=compute_dtype)


def _per_example_grads(params, model, x, y, l2):
    one = lambda xi, yi: _backprop(params, model, xi[None], yi[None], l2).grads  # noqa: E731
    return jax.vmap(one)(x, y)


_per_example_grads_jit = jax.jit(_per_example_grads)


def per_example_grads(params: Params, model: MLP, x: Array, y: Array, *, l2=0.0) -> Params:
    """Each example's gradient, from ``jax.vmap`` of the hand-written backprop of one example.

    Returns:
        Grads like ``params`` with a leading batch axis: ``W`` leaves of shape
        ``(batch, n_l, n_{l−1})``. Their mean over the batch is ``backprop(...).grads``.
    """
    check_params(params, model)
    check_inputs(model, x, y)
    check_l2(l2)
    return _per_example_grads_jit(params, model, x, y, l2)
