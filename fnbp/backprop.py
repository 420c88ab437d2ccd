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
activation its ``f′`` (:mod:`fnbp.activations`), the loss its output δ (:mod:`fnbp.losses`),
and every other kind of :mod:`fnbp.layers` (convolution, pooling, normalization, dropout,
residual blocks) its own rule beside its forward. One loop (:func:`fnbp.engine.backward_seq`)
runs them from the last layer to the first; an MLP is the special case of Dense layers only.

Nothing here uses JAX's automatic differentiation (no grad, vjp, jvp, linearize or custom
derivative rules): this module is the independent computation that :func:`fnbp.crosscheck`
compares with JAX's autodiff (``tests/test_backprop.py`` proves it).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fnbp.engine import backward_seq, nested
from fnbp.layers.dense import dense_backward  # noqa: F401  (re-exported: the MLP's rule)
from fnbp.losses import to_targets
from fnbp.model import (
    MLP,
    Params,
    check_compute_dtype,
    check_inputs,
    check_l2,
    check_mode,
    check_params,
    draw_batch_masks,
    l2_penalty,
    output_for_loss,
    run,
)

Array = jax.Array


class Backprop(NamedTuple):
    """What :func:`backprop` returns (a pytree: it passes through ``jit`` and ``vmap``).

    Attributes:
        loss: the scalar mean loss, penalty included, in the params' dtype.
        grads: ``∂L/∂params``, same structure, shapes and dtypes as ``params``.
        deltas: ``deltas[i] = δ = ∂L/∂z`` of layer ``model.layers[i]`` (its output before its
            activation), shape ``(batch, *out_shape)``, in the compute dtype (like
            ``preactivations`` and ``activations``). For a residual block the entry is
            ``{"out": δ of the stream, "branch": [the branch's deltas]}``.
        preactivations: ``preactivations[i] = z`` of layer ``i`` (nested like ``deltas``).
        activations: ``activations[i] = a = f(z)``, the output of layer ``i``; the input of
            layer ``i`` is ``activations[i − 1]`` (``x`` for the first).
        state: the new state (BatchNorm running statistics after this batch in train mode);
            ``None`` for an MLP.
    """

    loss: Array
    grads: Params
    deltas: list
    preactivations: list
    activations: list
    state: list | None = None


class _Backward(NamedTuple):
    """Everything one forward and backward pass computed (internal: the instruments read it)."""

    loss: Array
    grads: Params
    trace: object  # fnbp.engine.Trace: z, a and each layer's cache
    deltas: list  # δ of every layer, nested {"out", "branch"} for residual blocks
    input_grad: Array  # ∂L/∂x, shape (batch, *input_shape)


def _backward(
    params, model, x, y, l2, compute_dtype=None, state=None, masks=None, train=False
) -> _Backward:
    layers, loss_fn = model.layers, model.loss_fn
    # z⁽ⁱ⁾ = op_i(a⁽ⁱ⁻¹⁾), a⁽ⁱ⁾ = f_i(z⁽ⁱ⁾); a⁽⁰⁾ = x; in compute_dtype when given
    tr = run(params, model, x, state=state, masks=masks, train=train, compute_dtype=compute_dtype)
    z_out, a_out = output_for_loss(params, tr.z[-1], tr.a[-1])  # float32 logits if mixed
    t = to_targets(loss_fn, y, model.output_size, z_out.dtype)
    loss = jnp.mean(loss_fn.value(z_out, a_out, t)) + l2_penalty(params, model, l2)

    g_prime = layers[-1].act.df(z_out, a_out)
    delta = loss_fn.delta(z_out, a_out, t, g_prime) / x.shape[0]  # δ⁽ᴸ⁾ = (p − y)/B, …
    delta = delta.astype(tr.z[-1].dtype)  # back to the compute dtype for the matmuls
    # for i = L…1: ∂L/∂θ⁽ⁱ⁾ and ∂L/∂a⁽ⁱ⁻¹⁾ by layer i's rule, then δ⁽ⁱ⁻¹⁾ = f′(z⁽ⁱ⁻¹⁾) ⊙ ∂L/∂a⁽ⁱ⁻¹⁾
    grads, deltas, back = backward_seq(layers, params, tr, delta, l2)
    return _Backward(loss, grads, tr, deltas, back)


def _backprop(
    params, model, x, y, l2, compute_dtype=None, state=None, masks=None, train=False
) -> Backprop:
    out = _backward(params, model, x, y, l2, compute_dtype, state, masks, train)
    loss, grads, tr, deltas = out.loss, out.grads, out.trace, out.deltas
    if isinstance(model, MLP):
        return Backprop(loss, grads, deltas, tr.z, tr.a[1:])
    return Backprop(
        loss, grads, deltas, nested(model.layers, tr, "z"), nested(model.layers, tr, "a"), tr.state
    )


def _keyed_backprop(params, model, x, y, l2, compute_dtype=None, state=None, key=None, train=False):
    masks = draw_batch_masks(model, key, x.shape[0], train)
    return _backprop(params, model, x, y, l2, compute_dtype, state, masks, train)


_backprop_jit = jax.jit(_keyed_backprop, static_argnames=("compute_dtype", "train"))


def backprop(
    params: Params,
    model,
    x: Array,
    y: Array,
    *,
    l2=0.0,
    compute_dtype=None,
    state=None,
    key=None,
    train=None,
) -> Backprop:
    """Loss, gradients and per-layer error signals by the hand-written backward pass.

    Arguments:
        params: from :func:`fnbp.init_params` (for an MLP one ``{"W", "b"}`` dict per layer).
        model: an :class:`fnbp.MLP` or :class:`fnbp.Net`.
        x: inputs, shape ``(batch, *input_shape)``.
        y: class indices ``(batch,)`` or targets ``(batch, output_size)``.
        l2: L2 strength λ ≥ 0; the loss gains (λ/2)Σ‖W‖² and ∂L/∂W gains λW.
        compute_dtype: ``None`` (compute in the params' dtype), or a dtype for mixed
            precision, e.g. ``jnp.bfloat16`` with float32 params: the params and x are cast to it
            for the matmuls and activations, the logits are upcast so the loss, softmax and
            δ⁽ᴸ⁾ run in float32, δ goes back to bfloat16 for the backward matmuls, and the
            weight-gradient sums accumulate in float32 (normalization statistics run in
            float32 too). The loss and the grads come back in the params' dtype; deltas,
            preactivations and activations in ``compute_dtype``.
        state, key, train: as in :func:`fnbp.loss`: a net with BatchNorm or Dropout needs
            ``train``, BatchNorm needs ``state``, train-mode dropout a ``key`` (each layer's
            mask from ``fold_in(key, i)``).

    Returns:
        A :class:`Backprop` with ``.loss``, ``.grads``, ``.deltas``, ``.preactivations``,
        ``.activations`` and ``.state``.

    Raises:
        ValueError, TypeError: for arguments that do not fit the model (see
            :func:`fnbp.model.check_inputs`), a missing mode, state or key (naming the layer
            that needs it) and a ``compute_dtype`` that is not floating.
    """
    check_params(params, model)
    check_inputs(model, x, y)
    check_l2(l2)
    train = check_mode(model, state=state, train=train, key=key, what="backprop")
    compute_dtype = check_compute_dtype(compute_dtype)
    return _backprop_jit(
        params, model, x, y, l2, compute_dtype=compute_dtype, state=state, key=key, train=train
    )


def _per_example_grads(params, model, x, y, l2, state=None, key=None, train=False):
    masks = draw_batch_masks(model, key, x.shape[0], train)  # the batch's masks, one row each

    def one(xi, yi, mi):
        return _backprop(params, model, xi[None], yi[None], l2, None, state, _rows(mi), train).grads

    return jax.vmap(one)(x, y, masks)


def _rows(masks):
    """One example's masks, with its batch axis of one restored."""
    return jax.tree.map(lambda m: m[None], masks)


_per_example_grads_jit = jax.jit(_per_example_grads, static_argnames="train")


def per_example_grads(
    params: Params, model, x: Array, y: Array, *, l2=0.0, state=None, key=None, train=None
) -> Params:
    """Each example's gradient, from ``jax.vmap`` of the hand-written backprop of one example.

    Defined where examples are independent: dense, convolution, pooling, LayerNorm, residual
    blocks, dropout (each example keeps its row of the batch's masks, so the mean of the
    per-example grads is the batch grad), and BatchNorm in eval mode.

    Returns:
        Grads like ``params`` with a leading batch axis: ``W`` leaves of shape
        ``(batch, n_l, n_{l−1})``. Their mean over the batch is ``backprop(...).grads``.

    Raises:
        ValueError: for train-mode BatchNorm, naming the layer: it couples the examples of a
            batch, and a batch of one has zero variance (every gradient before it would be 0).
    """
    check_params(params, model)
    check_inputs(model, x, y)
    check_l2(l2)
    train = check_mode(model, state=state, train=train, key=key, what="per_example_grads")
    check_independent(model, train, "per_example_grads")
    return _per_example_grads_jit(params, model, x, y, l2, state, key, train=train)


def check_independent(model, train: bool, what: str) -> None:
    """Refuse per-example quantities where the examples of a batch are coupled.

    Raises:
        ValueError: naming the layer, for train-mode BatchNorm (its statistics come from the
            whole batch, so one example's loss depends on every other example).
    """
    if train and model.couples_examples:
        layer = model.find(lambda l: l.couples_examples)
        raise ValueError(
            f"{what}: the net's {layer} couples the examples of a batch in train mode (its "
            "statistics come from the whole batch), so per-example gradients are not defined; "
            "use train=False (running statistics) instead"
        )
