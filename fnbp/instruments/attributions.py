"""Input attributions from the hand-written backward pass: input gradients, integrated gradients
and Grad-CAM.

Each attributes a scalar ``Fᵢ`` of example ``i``'s output ``z = z⁽ᴸ⁾(xᵢ)`` (the last layer's
output before its activation; the logits under the cross-entropies) to the input or to a feature
map. The backward pass (:func:`fnbp.engine.backward_seq`) takes any output error signal
``∂F/∂z``; one row per example and no 1/B, so what comes back at the input is each example's own
``∂Fᵢ/∂xᵢ`` (examples do not mix: train-mode BatchNorm, which mixes them, is refused):

====================  =================================  ========================================
``target``            ``Fᵢ``                             output δ = ∂Fᵢ/∂z
====================  =================================  ========================================
``"loss"``            ℓᵢ, the example's own loss term    the loss's δ (``p − t`` for softmax CE)
``"logit"``           ``Σₖ wᵢₖ zₖ`` = z_{yᵢ}              ``wᵢ``: one-hot of the class ``yᵢ``
====================  =================================  ========================================

(``wᵢ`` is ``y``'s row itself when ``y`` holds target rows, and 1 for a one-output net.)

* :func:`input_gradients` — ``∂ℓᵢ/∂xᵢ`` (or ``∂z_{yᵢ}/∂xᵢ``, the saliency map of Simonyan et
  al. 2014). It is B times the ∂L/∂x of the batch's mean loss L = (1/B) Σᵢ ℓᵢ.
* :func:`integrated_gradients` (Sundararajan et al. 2017) — along the straight path
  ``x(α) = x′ + α(x − x′)`` from a baseline ``x′``::

      IGⱼ = (xⱼ − x′ⱼ) ∫₀¹ ∂F(x(α))/∂xⱼ dα  ≈  (xⱼ − x′ⱼ) (1/m) Σₖ ∂F(x(αₖ))/∂xⱼ,  αₖ = (k + ½)/m

  (the midpoint rule over ``m = steps`` points, error O(1/m²) for a smooth F, half the
  trapezoid's; it never evaluates the gradient at the baseline itself, where an all-zero input
  can sit every unit of a bias-free ReLU net on its kink). Completeness: the exact integral
  gives ``Σⱼ IGⱼ = F(x) − F(x′)``; the returned ``gap`` is the quadrature's miss.
* :func:`grad_cam` (Selvaraju et al. 2017) — for a conv net, a layer's feature maps ``A``
  (its output ``a = f(z)``, shape ``(*spatial, C)`` per example) weighted by the class logit's
  gradient averaged over positions::

      α_c = mean over positions of ∂z_y/∂A[…, c],    map = ReLU(Σ_c α_c A[…, c])

  ``∂z_y/∂A`` is the ``∂/∂a`` the *next* layer's local rule returns (the backward loop over the
  layers after it), not that layer's δ = ∂/∂z, which carries an extra factor ``f′(z)``.

Nothing here uses JAX's automatic differentiation; ``tests/test_instruments_attributions.py``
checks all three against ``jax.grad``, finite differences and closed forms.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnbp.engine import Trace, backward_seq
from fnbp.instruments.per_example import check_per_example
from fnbp.losses import to_targets
from fnbp.model import MLP, draw_batch_masks, output_for_loss, run

Array = jax.Array

TARGETS = ("logit", "loss")


class IntegratedGradients(NamedTuple):
    """What :func:`integrated_gradients` returns.

    Attributes:
        attributions: ``(batch, *input_shape)``, IG of every input entry.
        values: ``(batch,)``, F(x) of each example.
        baseline_values: ``(batch,)``, F(x′) of each example's baseline.
        gap: ``(batch,)``, the completeness gap ``Σⱼ IGⱼ − (F(x) − F(x′))`` (0 for the exact
            integral; Captum's "convergence delta").
    """

    attributions: Array
    values: Array
    baseline_values: Array
    gap: Array


class GradCAM(NamedTuple):
    """What :func:`grad_cam` returns.

    Attributes:
        map: ``(batch, *spatial)``, ``ReLU(Σ_c α_c A[…, c])`` at the layer's resolution.
        weights: ``(batch, C)``, the channel weights α_c.
        layer: the index into ``model.layers`` (and ``params``) of the layer whose output ``A``
            was weighted.
    """

    map: Array
    weights: Array
    layer: int


# ----------------------------------------------------------------------------------------------
# The unchecked internals.


def _head(model, z: Array, a: Array, y: Array, target: str) -> tuple[Array, Array]:
    """``(Fᵢ, ∂Fᵢ/∂z)`` per example from the output layer's ``(z, a)``: ``(batch,)`` and
    ``(batch, n_out)`` (the table in the module docstring)."""
    loss_fn, n_out = model.loss_fn, model.output_size
    if target == "loss":
        t = to_targets(loss_fn, y, n_out, z.dtype)
        g_prime = model.layers[-1].act.df(z, a)
        return loss_fn.value(z, a, t), loss_fn.delta(z, a, t, g_prime)  # ℓᵢ, ∂ℓᵢ/∂z (no 1/B)
    if y.ndim == 2:
        w = y.astype(z.dtype)
    elif n_out == 1:
        w = jnp.ones_like(z)
    else:
        w = jax.nn.one_hot(y, n_out, dtype=z.dtype)
    return jnp.sum(w * z, axis=-1), w  # Σₖ wₖ zₖ, and its ∂/∂z = w


def _forward(params, model, x, y, target, state, masks, train):
    """The forward pass, F and the output δ ∂F/∂z (in the compute dtype)."""
    tr = run(params, model, x, state=state, masks=masks, train=train)
    z, a = output_for_loss(params, tr.z[-1], tr.a[-1])
    value, delta = _head(model, z, a, y, target)
    return tr, value, delta.astype(tr.z[-1].dtype)


def _attribute(params, model, x, y, target, state, masks, train) -> tuple[Array, Array]:
    """``(Fᵢ, ∂Fᵢ/∂xᵢ)``: the hand-written backward pass from the output δ ∂F/∂z back to x."""
    tr, value, delta = _forward(params, model, x, y, target, state, masks, train)
    _, _, back = backward_seq(model.layers, params, tr, delta, 0.0)  # ∂F/∂x, one row each
    return value, back


@functools.partial(jax.jit, static_argnames=("target", "train"))
def _input_gradients_jit(params, model, x, y, state, key, target, train):
    masks = draw_batch_masks(model, key, x.shape[0], train)
    return _attribute(params, model, x, y, target, state, masks, train)[1]


def _midpoints(steps: int, dtype) -> tuple[Array, Array]:
    """The midpoint rule on [0, 1]: nodes ``αₖ = (k + ½)/m`` and weights ``1/m``."""
    alphas = (jnp.arange(steps, dtype=dtype) + 0.5) / steps
    return alphas, jnp.full((steps,), 1.0 / steps, dtype)


@functools.partial(jax.jit, static_argnames=("steps", "chunk", "target", "train"))
def _integrated_jit(params, model, x, y, baseline, state, key, steps, chunk, target, train):
    masks = draw_batch_masks(model, key, x.shape[0], train)  # the same masks at every α
    diff = x - baseline
    alphas, weights = _midpoints(steps, x.dtype)

    def grad_at(alpha):  # ∂F/∂x at x(α) = x′ + α(x − x′), for the whole batch
        return _attribute(params, model, baseline + alpha * diff, y, target, state, masks, train)[1]

    if chunk is None:
        grads = jax.vmap(grad_at)(alphas)  # (steps, batch, *input_shape)
    else:  # vmapped chunks of points, one after the other: memory O(chunk · batch · activations)
        grads = jax.lax.map(grad_at, alphas, batch_size=chunk)
    attributions = diff * jnp.tensordot(weights, grads, axes=1)  # (x − x′) ⊙ Σₖ wₖ ∂F(x(αₖ))/∂x
    values = _forward(params, model, x, y, target, state, masks, train)[1]
    baseline_values = _forward(params, model, baseline, y, target, state, masks, train)[1]
    total = jnp.sum(attributions.reshape(x.shape[0], -1), axis=1)
    return IntegratedGradients(
        attributions, values, baseline_values, total - (values - baseline_values)
    )


@functools.partial(jax.jit, static_argnames="layer")
def _grad_cam_jit(params, model, x, y, state, layer):
    tr, _, delta = _forward(params, model, x, y, "logit", state, None, False)
    after = slice(layer + 1, None)  # the layers after the chosen one, their trace from A on
    sub = Trace(tr.z[after], tr.a[after], tr.cache[after], tr.state[after])
    # ∂z_y/∂A = the ∂/∂a that layer (layer + 1)'s rule returns, at the end of the loop over them
    _, _, dA = backward_seq(model.layers[after], params[after], sub, delta, 0.0)
    A = tr.a[layer + 1]  # the layer's output a = f(z): (batch, *spatial, C)
    weights = jnp.mean(dA, axis=tuple(range(1, dA.ndim - 1)))  # α_c: (batch, C)
    cam = jnp.sum(A * weights.reshape(weights.shape[0], *[1] * (A.ndim - 2), -1), axis=-1)
    return jnp.maximum(cam, 0), weights  # ReLU(Σ_c α_c A_c)


# ----------------------------------------------------------------------------------------------
# Checks at the boundary.


def _check_target(target, what: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"{what}: target must be one of {TARGETS}, got {target!r}")


def _positive_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= 1


def _check_steps(steps, chunk) -> tuple[int, int | None]:
    if not _positive_int(steps):
        raise ValueError(
            f"integrated_gradients: steps must be a positive int (the path points), got {steps!r}"
        )
    if chunk is not None and not _positive_int(chunk):
        raise ValueError(
            "integrated_gradients: chunk must be None (every path point at once) or a positive "
            f"int (path points per vmapped chunk), got {chunk!r}"
        )
    return int(steps), None if chunk is None or chunk >= steps else int(chunk)


def _check_baseline(model, x, baseline) -> Array:
    """The baseline as an array of x's shape and dtype (zeros for ``None``)."""
    if baseline is None:
        return jnp.zeros_like(x)
    if not hasattr(baseline, "shape") or not hasattr(baseline, "dtype"):
        raise TypeError(
            f"integrated_gradients: baseline must be None or an array, got {type(baseline).__name__}"
        )
    if not jnp.issubdtype(baseline.dtype, jnp.floating):
        raise TypeError(
            f"integrated_gradients: baseline must be a floating array, got dtype {baseline.dtype}"
        )
    shape = tuple(baseline.shape)
    if shape not in (tuple(x.shape), tuple(model.input_shape)):
        raise ValueError(
            f"integrated_gradients: baseline must have x's shape {tuple(x.shape)} (one per "
            f"example) or the input shape {tuple(model.input_shape)} (one for all), got {shape}"
        )
    return jnp.broadcast_to(jnp.asarray(baseline, x.dtype), x.shape)


def _has_conv(layer) -> bool:
    return layer.kind == "conv" or any(_has_conv(s) for s in layer.sublayers())


def _cam_layer(model, layer) -> int:
    """The index of the layer whose output Grad-CAM weighs (see :func:`grad_cam`)."""
    if isinstance(model, MLP):
        raise ValueError(
            "grad_cam needs a conv net (an fnbp.Net with a Conv layer); an fnbp.MLP has only "
            "dense layers: use input_gradients or integrated_gradients instead"
        )
    layers, n = model.layers, len(model.layers)
    convs = [i for i, l in enumerate(layers) if _has_conv(l)]
    if not convs:
        kinds = ", ".join(l.kind for l in layers)
        raise ValueError(
            f"grad_cam needs a conv net: the net's layers ({kinds}) hold no Conv, so there are "
            "no feature maps to weigh; use input_gradients or integrated_gradients instead"
        )
    if layer is None:
        return convs[-1]
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise TypeError(
            f"grad_cam: layer must be None (the last conv layer) or an int index into "
            f"model.layers, got {layer!r}"
        )
    if not -n <= layer < n:
        raise ValueError(
            f"grad_cam: layer must index the net's {n} layers (0 to {n - 1}, or negative from "
            f"the end), got {layer}"
        )
    i = int(layer) % n
    out = model.in_shapes[i + 1] if i + 1 < n else model.output_shape
    if len(out) < 2:
        raise ValueError(
            f"grad_cam: layer={layer} is the net's layer {i + 1} ({layers[i].kind}), whose output "
            f"has per-example shape {out}, not a feature map (*spatial, channels); choose a conv "
            f"layer, e.g. layer={convs[-1]} (the last conv, the default)"
        )
    return i


# ----------------------------------------------------------------------------------------------
# Public API.


def input_gradients(
    params, model, x: Array, y: Array, *, l2=0.0, state=None, key=None, train=None, target="loss"
) -> Array:
    """Each example's gradient of its own loss term with respect to its own input, ∂ℓᵢ/∂xᵢ.

    One hand-written backward pass with the per-example output δ (no 1/B), so it equals B times
    the ∂L/∂x of the batch's mean loss (:func:`fnbp.backprop`'s input gradient).

    Arguments:
        params, model, x, y: as for :func:`fnbp.backprop` (``x`` of shape
            ``(batch, *input_shape)``).
        l2, state, key, train: as for :func:`fnbp.backprop`. The penalty (λ/2)Σ‖W‖² does not
            depend on x, so ``l2`` changes nothing here (it is checked and accepted for the
            keywords every instrument shares). Train-mode dropout uses the batch's masks (from
            ``key``), each example its own row.
        target: ``"loss"`` (ℓᵢ) or ``"logit"`` (``z_{yᵢ}``, the class score's saliency map;
            the module docstring gives the output δ of each).

    Returns:
        ``(batch, *input_shape)``, in the params' dtype.

    Raises:
        ValueError, TypeError: as :func:`fnbp.backprop`; for a ``target`` not in
            :data:`TARGETS`; for train-mode BatchNorm (naming the layer): it couples the
            examples, so one example's loss depends on the others' inputs.
    """
    _check_target(target, "input_gradients")
    train = check_per_example(
        params, model, x, y, l2=l2, state=state, key=key, train=train, what="input_gradients"
    )
    return _input_gradients_jit(params, model, x, y, state, key, target=target, train=train)


def integrated_gradients(
    params,
    model,
    x: Array,
    y: Array,
    *,
    baseline=None,
    steps: int = 50,
    chunk: int | None = None,
    target="logit",
    l2=0.0,
    state=None,
    key=None,
    train=None,
) -> IntegratedGradients:
    """Integrated gradients (Sundararajan et al. 2017) of the class logit (or the loss) along
    the straight path from ``baseline`` to ``x``, midpoint rule over ``steps`` points.

    The hand-written backward pass runs at every path point for the whole batch, vmapped over
    the points: one jitted call, extra memory ``O(steps · batch · activations)`` (with
    ``chunk``, ``O(chunk · batch · activations)``).

    Arguments:
        params, model, x, y: as for :func:`fnbp.backprop`.
        baseline: ``None`` (zeros), or an array of ``x``'s shape (one baseline per example) or
            of ``model.input_shape`` (one for every example).
        steps: ``m ≥ 1``, the number of path points ``αₖ = (k + ½)/m``.
        chunk: ``None`` (vmap over all the points at once), or how many points each vmapped
            chunk holds (``jax.lax.map`` with ``batch_size``: the chunks run one after the
            other, the same numbers in less memory).
        target: ``"logit"`` (default; Captum's convention: F = ``z_{yᵢ}``, the class-y logit,
            so ``y`` picks the class explained) or ``"loss"`` (F = ℓᵢ). Module docstring.
        l2, state, key, train: as for :func:`input_gradients`; train-mode dropout uses the
            same masks at every path point, so F is one fixed function along the path.

    Returns:
        An :class:`IntegratedGradients`: ``.attributions`` ``(batch, *input_shape)``, ``.values``
        F(x) and ``.baseline_values`` F(x′) ``(batch,)``, and ``.gap`` ``(batch,)``
        = Σⱼ IGⱼ − (F(x) − F(x′)), which shrinks as ``steps`` grows (O(1/m²) for a smooth
        F; a ReLU net's kinks along the path make it slower).

    Raises:
        ValueError, TypeError: as :func:`input_gradients`, and for a bad ``baseline``,
            ``steps`` or ``chunk``.
    """
    _check_target(target, "integrated_gradients")
    steps, chunk = _check_steps(steps, chunk)
    train = check_per_example(
        params, model, x, y, l2=l2, state=state, key=key, train=train, what="integrated_gradients"
    )
    baseline = _check_baseline(model, x, baseline)
    return _integrated_jit(
        params,
        model,
        x,
        y,
        baseline,
        state,
        key,
        steps=steps,
        chunk=chunk,
        target=target,
        train=train,
    )


def grad_cam(params, model, x: Array, y: Array, *, layer=None, state=None) -> GradCAM:
    """Grad-CAM (Selvaraju et al. 2017) of the class-``y`` logit at a conv layer's feature maps,
    in eval mode (running statistics, no dropout).

    With ``A`` the layer's output ``a = f(z)`` (per example ``(*spatial, C)``) and ``∂z_y/∂A``
    from the hand-written backward pass over the layers after it::

        α_c = mean over positions of ∂z_y/∂A[…, c],    map = ReLU(Σ_c α_c A[…, c])

    Arguments:
        params, model, x: as for :func:`fnbp.forward`.
        y: the class explained per example: indices ``(batch,)`` (or target rows
            ``(batch, n_out)``, weighing the logits).
        layer: ``None`` (the last top-level layer that is a Conv or holds one, e.g. a residual
            block of convolutions), or an index into ``model.layers`` (0-based, as
            ``params[layer]``; negative counts from the end) of any layer whose output is a
            feature map (a conv, a pool or norm after one).
        state: the running statistics, for a net with BatchNorm.

    Returns:
        A :class:`GradCAM`: ``.map`` ``(batch, *spatial)`` at the layer's resolution (upsample
        it to the input's yourself, e.g. ``jax.image.resize``), ``.weights`` ``(batch, C)``,
        ``.layer`` the index used.

    Raises:
        ValueError, TypeError: as :func:`fnbp.backprop`; for an :class:`fnbp.MLP` or a net
            without a Conv layer; for a ``layer`` that is not an int, is out of range, or
            names a layer whose output is not a feature map.
    """
    check_per_example(
        params, model, x, y, l2=0.0, state=state, key=None, train=False, what="grad_cam"
    )
    i = _cam_layer(model, layer)
    cam, weights = _grad_cam_jit(params, model, x, y, state, layer=i)
    return GradCAM(cam, weights, i)
