"""Losses: each carries its per-example value and its output error signal δ⁽ᴸ⁾.

For one example with output pre-activation ``z = z⁽ᴸ⁾``, output ``a = a⁽ᴸ⁾ = g(z)`` and target
``t`` (a row of :func:`to_targets`):

============================  ===========================================  =====================
name                          per-example loss ℓ                           δ⁽ᴸ⁾ = ∂ℓ/∂z
============================  ===========================================  =====================
``softmax_cross_entropy``     ``Σₖtₖ·logsumexp(z) − Σₖ tₖ zₖ``             ``p·Σₖtₖ − t`` (= p − t)
``mse``                       ``½ Σₖ (aₖ − tₖ)²``                          ``(a − t) ⊙ g′(z)``
``sigmoid_binary_cross_entropy``  ``Σₖ softplus(zₖ) − tₖ zₖ``              ``σ(z) − t``
============================  ===========================================  =====================

``p = softmax(z)``. The model's loss is the mean of ℓ over the batch, so the backward pass
divides δ⁽ᴸ⁾ by the batch size. ``mse`` is the textbook quadratic cost ½‖a − y‖² (Nielsen,
ch. 2), summed over outputs; PyTorch's ``MSELoss`` instead averages over outputs and omits the ½.
Both cross-entropies are computed from logits in the numerically stable forms above
(``logsumexp`` subtracts the max; ``softplus(z) = max(z, 0) + log1p(e^(−|z|))``), so their
output activation ``g`` must be the identity. For targets that sum to one (one-hot labels or
probability rows) the softmax δ is the familiar ``p − t``; the ``Σₖtₖ`` factor keeps it exact
for any target row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Loss(NamedTuple):
    """A loss on the network output.

    Attributes:
        name: the name used in :class:`fnbp.MLP`.
        value: ``value(z, a, t) -> ℓ`` of shape ``(batch,)``; ``z, a, t`` have shape
            ``(batch, outputs)``.
        delta: ``delta(z, a, t, g_prime) -> δ⁽ᴸ⁾`` of shape ``(batch, outputs)`` for the
            per-example loss (not yet divided by the batch size); ``g_prime`` is ``g′(z)``.
        from_logits: the loss applies its own squashing (softmax or sigmoid) to ``z``, so the
            model's output activation must be ``"identity"``.
        integer_labels_are_classes: a 1-D integer ``y`` holds class indices even when the
            network has one output.
    """

    name: str
    value: Callable[[Array, Array, Array], Array]
    delta: Callable[[Array, Array, Array, Array], Array]
    from_logits: bool
    integer_labels_are_classes: bool


def _softmax_ce_value(z, a, t):
    return jnp.sum(t, axis=-1) * jax.nn.logsumexp(z, axis=-1) - jnp.sum(
        t * z, axis=-1
    )  # −Σ t log p


def _softmax_ce_delta(z, a, t, g_prime):
    return jax.nn.softmax(z, axis=-1) * jnp.sum(t, axis=-1, keepdims=True) - t  # p − t


def _mse_value(z, a, t):
    return 0.5 * jnp.sum((a - t) ** 2, axis=-1)


def _mse_delta(z, a, t, g_prime):
    return (a - t) * g_prime  # (a − t) ⊙ g′(z)


def _sigmoid_bce_value(z, a, t):
    return jnp.sum(jax.nn.softplus(z) - t * z, axis=-1)


def _sigmoid_bce_delta(z, a, t, g_prime):
    return jax.nn.sigmoid(z) - t  # p − t


LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in [
        Loss("softmax_cross_entropy", _softmax_ce_value, _softmax_ce_delta, True, True),
        Loss("mse", _mse_value, _mse_delta, False, False),
        Loss("sigmoid_binary_cross_entropy", _sigmoid_bce_value, _sigmoid_bce_delta, True, False),
    ]
}
"""Every loss by name, each a :class:`Loss` with its value and its output δ."""


def get_loss(name: str) -> Loss:
    """Look up a loss by name.

    Raises:
        ValueError: if ``name`` is not one of :data:`LOSSES`.
    """
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}") from None


def to_targets(loss: Loss, y: Array, num_outputs: int, dtype) -> Array:
    """Turn labels ``y`` into a target matrix ``t`` of shape ``(batch, num_outputs)``.

    * ``y`` of shape ``(batch, num_outputs)`` is used as it is (one-hot rows, probabilities,
      regression targets or 0/1 multi-label targets).
    * a 1-D integer ``y`` holds class indices and becomes one-hot rows, when the loss is
      softmax cross-entropy or the network has more than one output (e.g. the quadratic cost
      on digits).
    * any other 1-D ``y`` is the single target column of a one-output network.
    """
    if y.ndim == 2:
        return y.astype(dtype)
    if jnp.issubdtype(y.dtype, jnp.integer) and (
        loss.integer_labels_are_classes or num_outputs > 1
    ):
        return jax.nn.one_hot(y, num_outputs, dtype=dtype)
    return y[:, None].astype(dtype)
