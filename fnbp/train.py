"""Jitted training: one step, one whole epoch in one XLA program, and populations of models.

* :func:`make_train_step` — ``step(params, opt_state, x, y) -> (params, opt_state, metrics)``
  for an MLP, ``step(params, state, opt_state, key, x, y) -> (params, state, opt_state,
  metrics)`` for an :class:`fnbp.Net` (``state``: BatchNorm statistics; ``key``: dropout masks).
* :func:`make_train_epoch` — ``epoch(params, opt_state, key, x, y)`` (a Net: ``epoch(params,
  state, opt_state, key, x, y)``) runs every mini-batch step of an epoch inside one
  ``lax.scan``: one dispatch per epoch instead of one per step.
* :func:`make_population_epoch` — the same epoch ``vmap``-ed over a leading population axis
  of params, optimizer states and keys: many models (seeds, init schemes) in one XLA program.
  :func:`init_population` draws such a population.
* :func:`fit` — a Python loop over epochs with a progress bar and per-epoch evaluation.

Gradients come from the hand-written :func:`fnbp.backprop` (``grads="manual"``) or from
``jax.value_and_grad(fnbp.loss)`` (``grads="autodiff"``); the optimizer is any optax
``GradientTransformation``. What each step reports is chosen by ``metrics=``
(:mod:`fnbp.guard`): ``"loss"`` (a scalar; the default of :func:`make_train_step`),
``"norms"`` (also ``grad_norms``, the Frobenius norm ‖∂L/∂W‖ of each layer's weight
gradient, one per layer with weights: :func:`weight_layers`; the default of the epochs and
:func:`fit`) or ``"full"`` (also per-layer finiteness flags of the gradient, the updated
params and the optimizer state, one per layer with params: :func:`param_layers`).

:func:`fit` also checkpoints and resumes (:mod:`fnbp.checkpoint`), guards against divergence
(a non-finite loss, gradient, update or optimizer state stops the run with
:class:`NonFiniteError`, or is skipped),
stops cleanly when asked (:class:`Interrupted`), stops early when a validation loss stops
improving (``early_stopping=``), and splits each batch over several devices (:func:`data_mesh`),
those of several processes too (:mod:`fnbp.distributed`).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fnbp import checkpoint as ckpt
from fnbp import distributed
from fnbp import guard as _guard
from fnbp.backprop import _backward, check_independent
from fnbp.data import _check_batch_size, epoch_indices
from fnbp.guard import NonFiniteError
from fnbp.initializers import InitScheme, init_params
from fnbp.instruments import privacy as _privacy
from fnbp.instruments import training as _instr
from fnbp.model import (
    MLP,
    Params,
    _expected_params,
    _loss_and_state,
    accuracy,
    check_compute_dtype,
    check_inputs,
    check_l2,
    check_mode,
    check_model,
    check_params,
    draw_batch_masks,
    init_state,
)
from fnbp.model import loss as model_loss

Array = jax.Array
GRADS = ("manual", "autodiff")


def _value_and_grads(model, grads: str, l2, compute_dtype=None) -> Callable:
    """``(params, state, x, y, masks) -> (loss, grads, new state, backward)`` in train mode, by
    the chosen method; ``backward`` is the hand-written pass's :class:`fnbp.backprop._Backward`
    (its trace and deltas: what the instruments read), ``None`` for autodiff."""
    mlp = isinstance(model, MLP)
    if grads == "manual":

        def manual(params, state, x, y, masks):
            out = _backward(params, model, x, y, l2, compute_dtype, state, masks, True)
            return out.loss, out.grads, None if mlp else out.trace.state, out

        return manual

    def autodiff(params, state, x, y, masks):
        (loss, new_state), g = jax.value_and_grad(_loss_and_state, has_aux=True)(
            params, model, x, y, l2, compute_dtype, state, masks, True
        )
        return loss, g, None if mlp else new_state, None

    return autodiff


def _check_config(model, optimizer, grads, l2, instruments=None):
    check_model(model)
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation (e.g. optax.sgd(0.1)), got "
            f"{type(optimizer).__name__}"
        )
    if grads not in GRADS:
        raise ValueError(f"grads must be one of {GRADS}, got {grads!r}")
    check_l2(l2)
    if instruments is not None and instruments is not False and grads != "manual":
        raise ValueError(
            f"instruments={instruments!r} read the hand-written backward pass's a and δ, so they "
            f"need grads='manual', got grads={grads!r}"
        )


def _check_dp(model, grads, compute_dtype, dp_clip, dp_noise, instruments=None):
    """``None`` (no DP-SGD) or ``(clip_norm, noise_multiplier)`` as floats, checked.

    Raises:
        ValueError, TypeError: for one of ``dp_clip``/``dp_noise`` without the other, a clip
            that is not a finite number > 0, a noise multiplier that is not a finite number
            ≥ 0, ``grads="autodiff"``, a ``compute_dtype``, instruments, or train-mode
            BatchNorm (naming the layer).
    """
    if dp_clip is None and dp_noise is None:
        return None
    if dp_clip is None or dp_noise is None:
        given, missing = ("dp_clip", "dp_noise") if dp_noise is None else ("dp_noise", "dp_clip")
        raise ValueError(
            f"{given} is given without {missing}: DP-SGD needs both, the clip norm C and the "
            "noise multiplier σ (σ = 0: clipping only, no privacy)"
        )
    _privacy._check_number("dp_clip", dp_clip, positive=True)
    _privacy._check_number("dp_noise", dp_noise, positive=False)
    if grads != "manual":
        raise ValueError(
            f"dp_clip={dp_clip!r} clips each example's gradient from the hand-written backward "
            f"pass's factors, so it needs grads='manual', got grads={grads!r}"
        )
    if compute_dtype is not None:
        raise ValueError(
            f"dp_clip={dp_clip!r}: DP-SGD's step computes in the params' dtype; leave "
            f"compute_dtype unset, got {compute_dtype!r}"
        )
    if instruments:
        raise ValueError(
            f"dp_clip={dp_clip!r} and instruments={instruments!r} do not go together (yet): the "
            "private step does not keep the trace the instruments read"
        )
    check_independent(model, True, f"dp_clip={dp_clip!r} (DP-SGD)")
    return float(dp_clip), float(dp_noise)


def param_layers(model) -> list[int]:
    """The (0-based) indices of the layers that have params: the layers the step's
    ``grads_finite``/``params_finite`` flags are about (every layer of an MLP)."""
    if isinstance(model, MLP):
        return list(range(model.num_layers))
    return [i for i, p in enumerate(_expected_params(model)) if jax.tree.leaves(p)]


def weight_layers(model) -> list[int]:
    """The (0-based) indices of the layers with weight matrices (dense, conv, residual blocks):
    the layers ``grad_norms`` measures (every layer of an MLP)."""
    if isinstance(model, MLP):
        return list(range(model.num_layers))
    shapes = _expected_params(model)
    return [
        i for i, (layer, p) in enumerate(zip(model.layers, shapes, strict=True)) if layer.weights(p)
    ]


def _step_fn(model, optimizer, grads, l2, compute_dtype=None, skip_nonfinite=False,
             instruments=None, dp=None, metrics="norms"):  # fmt: skip
    """``step(params, state, opt_state, key, x, y, s=None) -> (params, state, opt_state,
    metrics)``, for every model (an MLP's state and key are ``None``).

    ``metrics``: ``"loss"``, ``"norms"`` or ``"full"`` (:mod:`fnbp.guard`). With
    ``skip_nonfinite`` the step decides by :func:`fnbp.guard.step_ok` and reports
    ``metrics["skipped"]``.

    ``instruments``: ``None`` (none), or K: ``metrics["instruments"]`` holds
    :func:`fnbp.instruments.training.step_stats` of this step when ``s`` (the step's index in
    its epoch) is a multiple of K, NaN otherwise (a ``lax.cond``: the other steps compute
    nothing), packed in one vector (:func:`fnbp.instruments.training.pack`; ``step.unpack``
    turns a stack of them back into the dict once the step has been traced), and
    ``metrics["instrumented"]`` says which; with ``s=None`` every step is instrumented (the
    dict itself).

    ``dp``: ``None``, or ``(C, σ)``: the gradient is DP-SGD's
    (:func:`fnbp.instruments.privacy._dp_grads`: each example's clipped to norm C, noise
    N(0, σ²C²) on the sum, drawn from :func:`fnbp.instruments.privacy.noise_key` of the step's
    ``key``), and ``metrics["dp_clipped"]`` is the fraction of the batch's examples whose
    gradient norm exceeded C."""
    value_and_grads = _value_and_grads(model, grads, l2, compute_dtype)
    if dp is not None:
        clip, sigma = dp

        def value_and_grads(params, state, x, y, masks, key=None):  # noqa: F811
            nk = None if sigma == 0 else _privacy.noise_key(key)
            g, norms, loss = _privacy._dp_grads(params, model, x, y, l2, state, masks, True,
                                                clip, sigma, nk)  # fmt: skip
            return loss, g, state, jnp.mean(norms > clip)  # no BatchNorm: the state stays

    with_params, with_weights = param_layers(model), weight_layers(model)
    per_example = instruments is not None and _instr.left_out(model) is None

    def instrument(new_params, updates, out, s):
        def stats(new_params, updates, grad_sq, trace, deltas):
            return _instr.step_stats(model, new_params, updates, grad_sq, trace, deltas, l2,
                                     per_example)  # fmt: skip

        # Only what the statistics read (∂L/∂x, say, is left for XLA to drop); not the params
        # before the step (they are updated in place: XLA would copy them every step), nor the
        # gradient (its per-layer sums of squares instead: see layer_grad_sq).
        grad_sq = _instr.layer_grad_sq(out.grads)
        operands = (new_params, updates, grad_sq, out.trace, out.deltas)
        if s is None:
            return stats(*operands), jnp.asarray(True)
        on = s % instruments == 0
        shapes["stats"] = jax.eval_shape(stats, *operands)
        packed = jax.eval_shape(lambda *o: _instr.pack(stats(*o)), *operands)
        blank = lambda *_: jnp.full(packed.shape, jnp.nan, packed.dtype)  # noqa: E731
        return jax.lax.cond(on, lambda *o: _instr.pack(stats(*o)), blank, *operands), on

    shapes = {}  # the fields' shapes, known once the step is traced

    def step(params, state, opt_state, key, x, y, s=None):
        masks = draw_batch_masks(model, key, x.shape[0], True)
        if dp is None:
            loss, g, new_state, out = value_and_grads(params, state, x, y, masks)
        else:
            loss, g, new_state, clipped = value_and_grads(params, state, x, y, masks, key)
        updates, new_opt_state = optimizer.update(g, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        out_metrics = {"loss": loss}
        if metrics != "loss":
            out_metrics["grad_norms"] = _guard.grad_norms(model, g, with_weights)
        if metrics == "full":
            out_metrics.update(_guard.full(g, new_params, new_opt_state, with_params))
        if dp is not None:
            out_metrics["dp_clipped"] = clipped
        if skip_nonfinite:  # keep the old state unless loss, grads, params, opt state are finite
            ok = _guard.step_ok(loss, g, new_params, new_opt_state)
            new_params, new_state, new_opt_state = jax.tree.map(
                lambda new, old: jnp.where(ok, new, old),
                (new_params, new_state, new_opt_state),
                (params, state, opt_state),
            )
            out_metrics["skipped"] = ~ok
        if instruments is not None:
            if skip_nonfinite:  # a skipped step changes nothing
                updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
            out_metrics["instruments"], out_metrics["instrumented"] = instrument(
                new_params, updates, out, s
            )
        return new_params, new_state, new_opt_state, out_metrics

    step.unpack = lambda flat: _instr.unpack(flat, shapes["stats"])
    return step


def make_train_step(
    model,
    optimizer: optax.GradientTransformation,
    *,
    grads: str = "manual",
    l2=0.0,
    compute_dtype=None,
    skip_nonfinite: bool = False,
    instruments: bool = False,
    dp_clip=None,
    dp_noise=None,
    metrics: str = "loss",
) -> Callable:
    """A jitted training step (train mode: batch statistics, dropout on).

    Arguments:
        model: an :class:`fnbp.MLP` or :class:`fnbp.Net`.
        optimizer: any optax ``GradientTransformation``; initialize its state with
            ``optimizer.init(params)``.
        grads: ``"manual"`` (hand-written backprop) or ``"autodiff"`` (``jax.grad``).
        l2: L2 strength λ ≥ 0, part of the loss (not the optimizer's weight decay).
        compute_dtype: ``None``, or e.g. ``jnp.bfloat16`` for mixed precision: the params
            stay the (float32) master copy the optimizer updates, the gradients are computed
            in ``compute_dtype`` as in :func:`fnbp.backprop`.
        skip_nonfinite: a step whose loss, gradient, updated params or new optimizer state
            hold a NaN or Inf returns the params, state and optimizer state it was given,
            unchanged, and says so in ``metrics["skipped"]`` (``optax.apply_if_finite`` looks
            at the gradient only, so it lets through a finite step that overflows the params
            or the optimizer state).
        instruments: also return ``metrics["instruments"]``, the per-layer statistics of
            :mod:`fnbp.instruments.training` (gradient, update and δ norms, activation std,
            dead-ReLU fraction, per-example gradient-norm quantiles, noise scale) computed
            from this step's own backward pass (needs ``grads="manual"``). For every K-th
            step only, use :func:`make_train_epoch` or :func:`fit` with ``instruments=K``.
        dp_clip, dp_noise: DP-SGD (Abadi et al. 2016) in place of the plain gradient, then
            ``optimizer`` on it: each example's gradient of its own loss term clipped to norm
            ``dp_clip`` = C > 0, Gaussian noise of standard deviation ``dp_noise·C`` (σ ≥ 0)
            added to their sum, divided by the batch size, plus λW unclipped
            (:func:`fnbp.instruments.dp_grads`, from the one backward pass's factors). Both
            or neither; needs ``grads="manual"``, no ``compute_dtype``, no instruments, no
            train-mode BatchNorm. The step then takes a ``key`` for an MLP too (the noise is
            drawn from :func:`fnbp.instruments.privacy.noise_key` of it, a net's dropout masks
            as before), and ``metrics["dp_clipped"]`` is the fraction of the batch clipped.
            ε is :func:`fnbp.instruments.privacy.epsilon`'s, for the steps taken.
        metrics: what the step reports beside its loss (:mod:`fnbp.guard`): ``"loss"``
            (nothing: the step a plain ``jax.value_and_grad`` + optax loop runs; a NaN or Inf
            that enters the params shows in the next step's loss), ``"norms"`` (the weight
            gradients' norms) or ``"full"`` (the norms and per-layer finiteness flags of the
            gradient, the updated params and the optimizer state).

    Returns:
        For an MLP ``step(params, opt_state, x, y) -> (params, opt_state, metrics)``; for a
        Net ``step(params, state, opt_state, key, x, y) -> (params, state, opt_state,
        metrics)``, ``state`` from :func:`fnbp.init_state` and ``key`` drawing this step's
        dropout masks. ``metrics`` holds ``loss`` (the loss before the update); with
        ``metrics="norms"`` also ``grad_norms`` (one per layer with weights,
        :func:`weight_layers`); with ``"full"`` also ``grads_finite``, ``params_finite`` (one
        per layer with params, :func:`param_layers`; of the updated params) and
        ``opt_state_finite`` (one more: the leaves tied to no layer; see
        :func:`fnbp.guard.opt_state_flags`). With ``dp_clip`` an MLP's step is
        ``step(params, opt_state, key, x, y)``. Shapes are checked when the step is traced (once
        per input shape), not on every call. Inputs laid out over several devices
        (``jax.device_put(x, NamedSharding(mesh, P("data")))``, params replicated) run
        data-parallel as they are: XLA splits the batch and all-reduces the gradient sums
        (BatchNorm statistics are then those of the global batch).
    """
    if not isinstance(instruments, bool):
        raise TypeError(f"instruments must be True or False, got {instruments!r}")
    _check_config(model, optimizer, grads, l2, instruments)
    compute_dtype = check_compute_dtype(compute_dtype)
    dp = _check_dp(model, grads, compute_dtype, dp_clip, dp_noise, instruments)
    step = _step_fn(model, optimizer, grads, l2, compute_dtype, skip_nonfinite,
                    1 if instruments else None, dp, _guard.check_metrics(metrics))  # fmt: skip

    if isinstance(model, MLP) and dp is not None:

        @jax.jit
        def private_step(params, opt_state, key, x, y):
            check_params(params, model)
            check_inputs(model, x, y)
            params, _, opt_state, metrics = step(params, None, opt_state, key, x, y)
            return params, opt_state, metrics

        return private_step

    if isinstance(model, MLP):

        @jax.jit
        def train_step(params, opt_state, x, y):
            check_params(params, model)
            check_inputs(model, x, y)
            params, _, opt_state, metrics = step(params, None, opt_state, None, x, y)
            return params, opt_state, metrics

        return train_step

    @jax.jit
    def net_step(params, state, opt_state, key, x, y):
        check_params(params, model)
        check_inputs(model, x, y)
        check_mode(model, state=state, train=True, key=key, what="train step")
        return step(params, state, opt_state, key, x, y)

    return net_step


def _steps_fn(
    model, optimizer, batch_size, grads, l2, compute_dtype=None, batch_sharding=None,
    skip_nonfinite=False, instruments=None, dp=None, metrics="norms", end_check=False,
):  # fmt: skip
    """``run(params, state, opt_state, key, x, y, start, length)``: steps ``start …
    start+length−1`` of the epoch whose ``key`` draws the shuffle (and, through
    ``fold_in(fold_in(key, 1), s)``, step ``s``'s dropout masks), in one ``lax.scan``; each
    batch is gathered from the whole training set ``x, y`` as its step comes (and laid out by
    ``batch_sharding``); with ``instruments`` K, step ``s`` is instrumented when K divides
    it; with ``dp`` every step (an MLP's too) gets the key ``fold_in(fold_in(key, 1), s)``,
    DP-SGD's noise drawn from it; ``metrics`` as in :func:`_step_fn`; with ``end_check``,
    ``metrics["end_finite"]`` (a scalar, no steps axis) says whether the params, state and
    optimizer state at the end are finite (:func:`fnbp.guard.all_finite`)."""
    step = _step_fn(model, optimizer, grads, l2, compute_dtype, skip_nonfinite, instruments, dp,
                    metrics)  # fmt: skip
    keyed = dp is not None or not isinstance(model, MLP)

    def run(params, state, opt_state, key, x, y, start, length):
        idx = epoch_indices(key, x.shape[0], batch_size)  # (steps, batch) row indices
        idx = jax.lax.dynamic_slice_in_dim(idx, start, length)
        mask_key = jax.random.fold_in(key, 1)

        def body(carry, i_s):
            params, state, opt_state = carry
            i, s = i_s
            xb, yb = x[i], y[i]
            if batch_sharding is not None:  # split the batch over the mesh's "data" axis
                xb = jax.lax.with_sharding_constraint(xb, batch_sharding)
                yb = jax.lax.with_sharding_constraint(yb, batch_sharding)
            step_key = jax.random.fold_in(mask_key, s) if keyed else None
            params, state, opt_state, out = step(
                params, state, opt_state, step_key, xb, yb, None if instruments is None else s
            )
            return (params, state, opt_state), out

        steps = start + jnp.arange(length)
        (params, state, opt_state), out = jax.lax.scan(
            body, (params, state, opt_state), (idx, steps)
        )
        if instruments is not None:  # one vector per step in the scan: the fields again
            out["instruments"] = step.unpack(out["instruments"])
        if end_check:  # once per chunk: what a non-finite step leaves behind
            out["end_finite"] = _guard.all_finite(params, state, opt_state)
        return params, state, opt_state, out

    return run


def _epoch_fn(model, optimizer, batch_size, grads, l2, compute_dtype=None, instruments=None,
              dp=None, metrics="norms"):  # fmt: skip
    """``epoch(params, state, opt_state, key, x, y)``: every step of one epoch."""
    run = _steps_fn(model, optimizer, batch_size, grads, l2, compute_dtype,
                    instruments=instruments, dp=dp, metrics=metrics)  # fmt: skip
    return lambda params, state, opt_state, key, x, y: run(
        params, state, opt_state, key, x, y, 0, x.shape[0] // batch_size
    )


def make_train_epoch(
    model,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    grads: str = "manual",
    l2=0.0,
    compute_dtype=None,
    instruments: int | None = None,
    dp_clip=None,
    dp_noise=None,
    metrics: str = "norms",
) -> Callable:
    """A jitted whole epoch: shuffle, then every mini-batch step in one ``lax.scan``.

    Arguments:
        instruments: ``None``, or K: steps ``s = 0, K, 2K, …`` of the epoch (0-based) also
            compute the statistics of :mod:`fnbp.instruments.training` from their own
            backward pass, inside a ``lax.cond`` (the other steps compute none of it):
            ``metrics["instruments"]`` (NaN on the other steps) and
            ``metrics["instrumented"]`` (which steps). Needs ``grads="manual"``.
        dp_clip, dp_noise: DP-SGD, as in :func:`make_train_step`; step ``s``'s noise comes
            from ``fold_in(fold_in(key, 1), s)`` (a net's dropout masks too).
        metrics: ``"norms"`` (the loss and ``grad_norms`` of every step), ``"loss"`` or
            ``"full"`` (also the per-layer finiteness flags), as in :func:`make_train_step`.
        model, optimizer, grads, l2, compute_dtype: as in :func:`make_train_step`.

    Returns:
        For an MLP ``epoch(params, opt_state, key, x, y) -> (params, opt_state, metrics)``;
        for a Net ``epoch(params, state, opt_state, key, x, y) -> (params, state, opt_state,
        metrics)``. ``x, y`` are the whole training set, ``key`` draws this epoch's shuffle
        and its dropout masks, and every entry of ``metrics`` has a leading axis of
        ``len(x) // batch_size`` steps. The last ``len(x) mod batch_size`` shuffled examples
        sit out the epoch.
    """
    instruments = _instr.check_every(instruments)
    _check_config(model, optimizer, grads, l2, instruments)
    _check_batch_size(batch_size)
    compute_dtype = check_compute_dtype(compute_dtype)
    dp = _check_dp(model, grads, compute_dtype, dp_clip, dp_noise, instruments)
    epoch = _epoch_fn(model, optimizer, batch_size, grads, l2, compute_dtype, instruments, dp,
                      _guard.check_metrics(metrics))  # fmt: skip

    if isinstance(model, MLP):

        @jax.jit
        def train_epoch(params, opt_state, key, x, y):
            check_params(params, model)
            check_inputs(model, x, y)
            params, _, opt_state, metrics = epoch(params, None, opt_state, key, x, y)
            return params, opt_state, metrics

        return train_epoch

    @jax.jit
    def net_epoch(params, state, opt_state, key, x, y):
        check_params(params, model)
        check_inputs(model, x, y)
        check_mode(model, state=state, train=True, key=key, what="train epoch")
        return epoch(params, state, opt_state, key, x, y)

    return net_epoch


def make_population_epoch(
    model,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    grads: str = "manual",
    l2=0.0,
    compute_dtype=None,
    instruments: int | None = None,
    dp_clip=None,
    dp_noise=None,
    metrics: str = "norms",
) -> Callable:
    """:func:`make_train_epoch` vmapped over a population: one XLA program trains them all.

    ``instruments`` K: as in :func:`make_train_epoch`, for every member (the statistics are
    pure functions of each member's step, vmapped with it; the steps they run on are the same
    for all, so the ``lax.cond`` stays one branch per step). ``dp_clip``, ``dp_noise``: DP-SGD
    for every member, as in :func:`make_train_epoch` (each member's noise from its own key).
    ``metrics``: as in :func:`make_train_epoch`.

    Returns:
        For an MLP ``epoch(params, opt_states, keys, x, y) -> (params, opt_states, metrics)``;
        for a Net ``epoch(params, states, opt_states, keys, x, y) -> (params, states,
        opt_states, metrics)``. ``params``, ``states`` and ``opt_states`` carry a leading
        population axis of size ``P`` (from :func:`init_population`,
        ``jax.vmap(lambda _: fnbp.init_state(net))(jnp.arange(P))`` and
        ``jax.vmap(optimizer.init)``), ``keys`` has shape ``(P,)`` (one shuffle per member),
        and the data ``x, y`` is shared. ``metrics`` entries have shape ``(P, steps, …)``.
    """
    instruments = _instr.check_every(instruments)
    _check_config(model, optimizer, grads, l2, instruments)
    _check_batch_size(batch_size)
    compute_dtype = check_compute_dtype(compute_dtype)
    dp = _check_dp(model, grads, compute_dtype, dp_clip, dp_noise, instruments)
    metrics = _guard.check_metrics(metrics)
    one = _epoch_fn(
        model, optimizer, batch_size, grads, l2, compute_dtype, instruments, dp, metrics
    )
    epoch = jax.vmap(one, in_axes=(0, 0, 0, 0, None, None))
    first = lambda tree: jax.tree.map(lambda v: v[0], tree)  # noqa: E731

    if isinstance(model, MLP):

        @jax.jit
        def population_epoch(params, opt_states, keys, x, y):
            check_params(first(params), model)
            check_inputs(model, x, y)
            params, _, opt_states, metrics = epoch(params, None, opt_states, keys, x, y)
            return params, opt_states, metrics

        return population_epoch

    @jax.jit
    def net_population_epoch(params, states, opt_states, keys, x, y):
        check_params(first(params), model)
        check_inputs(model, x, y)
        return epoch(params, states, opt_states, keys, x, y)

    return net_population_epoch


def init_population(
    keys: Array,
    model: MLP,
    schemes: str | InitScheme | Sequence[str | InitScheme] = "he_normal",
    *,
    dtype=jnp.float32,
) -> Params:
    """Draw a population: one network per (scheme, key), stacked on a leading axis.

    Arguments:
        keys: PRNG keys of shape ``(S,)`` (``jax.random.split(key, S)``), one per seed.
        model: the spec shared by all members.
        schemes: one scheme or a sequence of ``K`` schemes.

    Returns:
        Params whose leaves have a leading axis of ``K·S``, scheme-major: member ``k·S + s`` is
        scheme ``k`` with key ``s``.
    """
    if isinstance(schemes, (str, InitScheme)):
        schemes = [schemes]
    pops = [jax.vmap(lambda k, s=s: init_params(k, model, s, dtype=dtype))(keys) for s in schemes]
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *pops)


def _is_classification(model, y) -> bool:
    """Softmax classifiers, one-output binary classifiers, and class indices under mse."""
    if model.loss == "softmax_cross_entropy":
        return True
    if model.loss == "sigmoid_binary_cross_entropy":
        return model.output_size == 1
    return model.output_size > 1 and jnp.issubdtype(jnp.asarray(y).dtype, jnp.integer)


# ----------------------------------------------------------------------------------------------
# Devices, divergence and interruption.


def data_mesh(devices: int | str | Sequence[jax.Device] | None = "all") -> jax.sharding.Mesh:
    """A one-axis :class:`jax.sharding.Mesh` named ``"data"`` for data-parallel training.

    Arguments:
        devices: ``"all"`` (every device of the default backend), a count ``N`` (the first
            ``N``), or a sequence of devices.

    On one host with several accelerators this is all there is to it. With several processes
    (one per host: :func:`fnbp.distributed.initialize` first, in every process),
    ``jax.devices()`` lists the devices of all of them, ``"all"`` takes every one and a count
    ``N`` the first ``N/P`` of each of the ``P`` processes: each takes part alike. On CPU, test
    with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` set before JAX starts.

    Raises:
        ValueError: if ``N`` is not a positive int, exceeds the devices available, or (several
            processes) is not a multiple of their number.
    """
    available = jax.devices()
    if devices == "all" or devices is None:
        chosen = available
    elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"devices must be 1 to {len(available)} (the {jax.default_backend()} devices "
                f"available), got {devices}; on CPU, set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={max(int(devices), 2)} before JAX starts "
                "for more"
            )
        chosen = _of_each_process(available, int(devices))
    elif (
        isinstance(devices, Sequence)
        and devices
        and all(isinstance(d, jax.Device) for d in devices)
    ):
        chosen = list(devices)
    else:
        raise ValueError(
            f"devices must be 'all', a positive int or a list of devices, got {devices!r}"
        )
    return jax.sharding.Mesh(np.array(chosen), ("data",))


def _of_each_process(available: list, n: int) -> list:
    """The first ``n`` of the ``available`` devices; with ``P`` processes the first ``n/P`` of
    each process's, in process order."""
    p = jax.process_count()
    if p == 1:
        return available[:n]
    if n % p:
        raise ValueError(
            f"devices must be a multiple of the {p} processes (each gives the mesh as many of "
            f"its own devices), got {n}"
        )
    return [d for i in range(p) for d in [d for d in available if d.process_index == i][: n // p]]


def _check_processes(mesh) -> int:
    """The number of processes training together, ``jax.process_count()``; with more than one,
    a ValueError unless ``mesh`` holds devices of each of them."""
    p = jax.process_count()
    if p == 1:
        return 1
    if mesh is None:
        raise ValueError(
            f"jax runs {p} processes (jax.distributed), so fit needs a mesh over their devices "
            "(mesh=fnbp.data_mesh()) to train one model together, got mesh=None"
        )
    counts = np.bincount([d.process_index for d in mesh.devices.flat], minlength=p)
    if not counts.all():
        raise ValueError(
            f"mesh must hold devices of each of the {p} processes (every one runs the steps), "
            f"but it holds none of process {int(np.argmin(counts))}: use fnbp.data_mesh()"
        )
    return p


def _together(should_stop):
    """``should_stop`` asked in every process after each chunk: true everywhere when it is
    in any one (a SIGTERM to one host stops them all at the same chunk); as given in a
    single process."""
    if should_stop is None or jax.process_count() == 1:
        return should_stop
    return lambda: bool(distributed.gathered(bool(should_stop())).any())


class Interrupted(KeyboardInterrupt):
    """Training stopped early, on request (``should_stop``) or by ``KeyboardInterrupt``.

    Attributes:
        step: optimizer steps completed; the state after them is what was saved.
        epoch: epochs completed.
        checkpoint: the checkpoint holding that state, or ``None`` without a checkpoint folder.
    """

    def __init__(self, step, epoch, checkpoint):
        self.step, self.epoch, self.checkpoint = step, epoch, checkpoint
        super().__init__(
            f"training interrupted after step {step} (epoch {epoch} complete)"
            + (f"; checkpoint {checkpoint}" if checkpoint else "")
        )


ON_NONFINITE = ("stop", "skip")


# ----------------------------------------------------------------------------------------------
# fit: the public loop, then its pieces (settings and data, checkpoints, one chunk, the guard,
# evaluation, the epoch records).


def fit(
    model,
    optimizer: optax.GradientTransformation,
    params: Params,
    x_train,
    y_train,
    *,
    key: Array,
    epochs: int,
    batch_size: int,
    state: list | None = None,
    grads: str = "manual",
    l2=0.0,
    compute_dtype=None,
    instruments: int | None = None,
    dp_clip=None,
    dp_noise=None,
    metrics: str = "norms",
    x_test=None,
    y_test=None,
    x_val=None,
    y_val=None,
    early_stopping: int | None = None,
    restore_best: bool = True,
    on_nonfinite: str = "stop",
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 2,
    resume: bool = False,
    config: dict | None = None,
    mesh: jax.sharding.Mesh | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple:
    """Train for ``epochs`` epochs (fewer with ``early_stopping``) of jitted, scan-fused
    steps, evaluating after each one.

    Each epoch shuffles with ``fold_in(key, epoch)`` and runs in chunks: one ``lax.scan`` over
    the steps up to the next multiple of ``checkpoint_every`` within the epoch, or to the
    epoch's end (the whole epoch when ``checkpoint_every`` is ``None``). Between chunks, and
    only there, the host reads the chunk's metrics (one transfer per chunk), checks them, saves
    a checkpoint and asks ``should_stop``. Step ``s = 0, 1, …`` of an epoch draws its dropout
    masks from ``fold_in(fold_in(fold_in(key, epoch), 1), s)``: a pure function of the key,
    the epoch and the step, so a resumed run draws the masks the uninterrupted one drew.

    Arguments:
        model, optimizer, params: the spec (an :class:`fnbp.MLP` or :class:`fnbp.Net`), any
            optax transformation, the initial params.
        x_train, y_train: the training set, ``x`` of shape ``(N, *input_shape)``;
            ``N mod batch_size`` examples, a different few each epoch, sit out each epoch.
        key: the PRNG key the epoch shuffles (and a net's dropout masks) are drawn from.
        epochs, batch_size, grads, l2, compute_dtype: as in :func:`make_train_epoch`.
        state: a net's initial state (BatchNorm running statistics); ``None`` starts from
            :func:`fnbp.init_state`. An MLP keeps none: leave it ``None``.
        instruments: ``None``, or K (16 is a good start): steps ``0, K, 2K, …`` of every
            epoch (0-based within the epoch) also compute, inside the jitted step and from its
            own backward pass, the per-layer statistics of :mod:`fnbp.instruments.training`
            (gradient norm, update size and update/param ratio, δ norm, activation std,
            dead-ReLU fraction, per-example gradient-norm quantiles, the noise scale
            B_simple); each epoch's record gets them as ``"instruments"``, one dict per
            instrumented step (``step``: its 1-based number in the run; per-layer lists
            aligned with :func:`fnbp.instruments.layer_names`). Under train-mode BatchNorm the
            per-example fields are left out (:func:`fnbp.instruments.training.left_out` says
            why). Needs ``grads="manual"``; checkpoints keep them, so a resumed run's history
            equals an uninterrupted one's.
        dp_clip, dp_noise: DP-SGD in place of the plain gradient (see
            :func:`make_train_step`): every example's gradient clipped to norm ``dp_clip``,
            noise ``N(0, (dp_noise·dp_clip)²)`` on their sum, then ``optimizer``; each record
            gets ``dp_clipped_fraction``, the mean over its steps of the fraction of the
            batch that was clipped. ε for the steps taken: :func:`fnbp.instruments.privacy.
            epsilon` with sampling rate ``batch_size / len(x_train)`` (an accountant for
            Poisson sampling; these batches are shuffled and of fixed size, the usual
            approximation, as in Opacus and TF-Privacy). Both or neither.
        metrics: ``"norms"`` (each step's loss and weight-gradient norms: the records'
            ``train_loss`` and ``grad_norms``), ``"loss"`` (the loss only; records without
            ``grad_norms``) or ``"full"`` (also every step's finiteness flags, which the guard
            then reads directly): :mod:`fnbp.guard`.
        x_test, y_test: evaluated after every epoch when given, in eval mode (a net's
            running statistics, no dropout).
        x_val, y_val: a validation set, evaluated after every epoch like ``x_test`` (both or
            neither); it adds ``val_loss`` (the loss of :func:`fnbp.loss`, ``l2`` included)
            and, for classifiers, ``val_accuracy`` to each record. Early stopping watches it.
        early_stopping: the patience ``p`` in epochs (a positive int), or ``None``: train all
            ``epochs``. After each epoch, an epoch whose ``val_loss`` is finite and strictly
            below every earlier finite one becomes the best epoch (before any does, the best is
            "epoch 0": the initial params); training stops after epoch ``best_epoch + p``
            (``p`` epochs without improvement) or after ``epochs``, whichever comes first.
            Each record gets ``best_epoch``, the best epoch so far. Needs ``x_val, y_val``.
        restore_best: with ``early_stopping``, return the best epoch's params and state
            (``True``) or the last epoch's (``False``); the optimizer state is the last
            epoch's either way. Ignored without ``early_stopping``. The best params and state,
            epoch and ``val_loss`` are checkpointed, so a resumed run stops, and returns, as
            an uninterrupted one.
        on_nonfinite: ``"stop"``: a step whose loss, any gradient entry, any updated
            parameter or any entry of the new optimizer state is non-finite ends the run with
            :class:`NonFiniteError` (naming the step and layer; the last checkpoint, all
            finite, is kept). The steps themselves compute no flags: the host reads a chunk's
            losses and whether its end state is finite, and replays a chunk that failed either
            with per-step flags to name the step (:mod:`fnbp.guard`). ``"skip"``: such steps
            leave params, state and optimizer state unchanged and are counted in
            ``skipped_steps`` (``train_loss`` and ``grad_norms`` average the others); each step
            then computes its flags.
        checkpoint_dir: save a :class:`fnbp.checkpoint.Checkpoint` after every chunk, as
            ``ckpt-<step>.npz``, keeping the newest ``keep_checkpoints``.
        checkpoint_every: chunk length in steps (see above); ``None``: one chunk per epoch.
        resume: continue from the newest checkpoint in ``checkpoint_dir`` (if there is none,
            start afresh). The run must have the same settings (``early_stopping`` and
            ``restore_best`` among them, and as many validation examples); it then ends with
            the same params and state, bit for bit, as a run never stopped. Without
            ``resume``, a ``checkpoint_dir`` that already holds checkpoints is refused.
        config: JSON-able settings stored in every checkpoint (the CLI stores its arguments).
        mesh: a :func:`data_mesh`: params, state and data are replicated over its devices and
            each batch is split over its ``"data"`` axis (``batch_size`` must be divisible by
            its size); gradients are all-reduced by XLA, BatchNorm statistics are those of the
            global batch. With several processes (:func:`fnbp.distributed.initialize`), every
            process calls ``fit`` with the same arguments and a mesh holding devices of each
            (``data_mesh()``): each process holds the whole training set (replicated on each
            of its devices), each device gathers and computes only its rows of every global
            batch, and only the gradient all-reduce crosses between processes. Process 0
            alone writes the checkpoints (the others wait at a barrier after each one), so
            ``checkpoint_dir`` must be a folder every process sees; all of them read it on
            ``resume``, which refuses a checkpoint of another layout of processes and
            devices. Every process returns the same params and history; ``should_stop`` is
            asked in each, and stops them all when it is true in any; the progress bar shows
            in process 0 only.
        should_stop: asked after every chunk; when it returns true the state is checkpointed
            and :class:`Interrupted` raised. A ``KeyboardInterrupt`` does the same with the
            state after the last completed chunk.
        progress: show a tqdm progress bar with epoch, loss and accuracy.
        on_epoch: called with each epoch's record.

    Returns:
        For an MLP ``(params, opt_state, history)``, for a Net ``(params, state, opt_state,
        history)``: the params and state after the last epoch run, or with ``early_stopping``
        and ``restore_best`` those of the best epoch; the optimizer state after the last epoch
        run. ``history`` has one record per epoch run (fewer than ``epochs`` when training
        stopped early); ``history[e]`` is a dict with ``epoch``, ``step`` (steps taken at its
        end), ``train_loss`` (mean over the epoch's steps), ``grad_norms`` (their mean, one
        per layer with weights: :func:`weight_layers`), ``seconds`` (training time so far),
        with ``skipped_steps`` under ``on_nonfinite="skip"``, with test data ``test_loss``
        and (for classifiers) ``test_accuracy``, with validation data ``val_loss`` and
        ``val_accuracy``, with ``early_stopping`` ``best_epoch``, and with ``instruments``
        the list of that epoch's instrumented steps (last).

    Raises:
        NonFiniteError: see ``on_nonfinite``.
        Interrupted: see ``should_stop``.
        ValueError, TypeError: for bad arguments (``early_stopping`` not a positive int or
            without ``x_val, y_val``; an ``x`` without its ``y`` or the other way round),
            empty data or data holding NaN or Inf or not fitting the model (naming the
            argument), a checkpoint folder in use, or a checkpoint that is corrupt or does not
            fit (naming the file; of another layout of processes and devices too), before any
            training; with several processes, no ``mesh`` or one without devices of each, or
            a ``checkpoint_dir`` in which the processes find different checkpoints.
    """
    from tqdm.auto import tqdm

    instruments = _instr.check_every(instruments)
    compute_dtype = _check_fit(
        model, optimizer, grads, l2, compute_dtype, epochs, batch_size, on_nonfinite,
        checkpoint_every, keep_checkpoints, mesh, instruments,
    )  # fmt: skip
    dp = _check_dp(model, grads, compute_dtype, dp_clip, dp_noise, instruments)
    _guard.check_metrics(metrics)
    _check_early_stopping(early_stopping, restore_best, x_val, y_val)
    processes = _check_processes(mesh)
    state = _initial_state(model, state, key)
    (x_train, y_train), test, val = _fit_data(
        model, params, (x_train, y_train), (x_test, y_test), (x_val, y_val)
    )
    schedule = _schedule(epochs, batch_size, checkpoint_every, len(x_train))
    settings = {  # a resumed run must agree on all of these to continue bit for bit
        "batch_size": batch_size, "steps_per_epoch": schedule.steps_per_epoch,
        "chunk": schedule.every, "grads": grads, "l2": float(l2), "on_nonfinite": on_nonfinite,
        "compute_dtype": None if compute_dtype is None else jnp.dtype(compute_dtype).name,
        "n_train": len(x_train), "devices": 1 if mesh is None else mesh.size,
    }  # fmt: skip
    if early_stopping is not None:  # only then: runs checkpointed before it existed resume
        settings.update(early_stopping=early_stopping, restore_best=restore_best,
                        n_val=len(val[0]))  # fmt: skip
    if instruments is not None:  # likewise
        settings["instruments"] = instruments
    if dp is not None:
        settings.update(dp_clip=dp[0], dp_noise=dp[1])
    if metrics != "norms":
        settings["metrics"] = metrics
    if processes > 1:  # likewise: a resume must run the same layout
        settings["processes"] = processes
    folder, found = _open_folder(checkpoint_dir, resume)
    if found:
        at = _resume(found, optimizer, model, params, key, settings)
    else:
        n_norms = 0 if metrics == "loss" else len(weight_layers(model))
        empty = _empty_partial(n_norms, instruments is not None, dp is not None)
        best = None if early_stopping is None else _Best(0, math.inf, params, state)
        at = _Progress(params, state, optimizer.init(params), 0, [], empty, 0.0, best)
    saver = _Saver(folder, keep_checkpoints, model, key, config, settings, found)
    at, x_train, y_train, batch_sharding = _on_mesh(mesh, at, x_train, y_train)
    stop = on_nonfinite == "stop"
    run = _jitted_steps(model, optimizer, batch_size, grads, l2, compute_dtype, batch_sharding,
                        not stop, instruments, dp, metrics, stop)  # fmt: skip
    replay = functools.partial(_jitted_steps, model, optimizer, batch_size, grads, l2,
                               compute_dtype, batch_sharding, False, None, dp, "full")  # fmt: skip
    relu = _instr.relu_layers(model) if instruments is not None else None
    chunk = functools.partial(_chunk, run, replay, model, key, x_train, y_train, on_nonfinite,
                              saver, relu)  # fmt: skip
    evaluate = functools.partial(_evaluate_all, model, {"test": test, "val": val}, l2,
                                 compute_dtype)  # fmt: skip
    bar = tqdm(total=epochs, initial=at.step // schedule.steps_per_epoch, desc="train",
               unit="epoch", disable=not progress or not distributed.is_main())  # fmt: skip
    try:
        at = _loop(at, schedule, chunk, evaluate, saver, on_nonfinite, _together(should_stop),
                   functools.partial(_show, bar, on_epoch), early_stopping)  # fmt: skip
    finally:
        bar.close()
    params, state = at.params, at.state
    if at.best is not None and restore_best:
        params, state = at.best.params, at.best.state
    if isinstance(model, MLP):
        return params, at.opt_state, at.history
    return params, state, at.opt_state, at.history


def _jitted_steps(*settings):
    """``jax.jit`` of :func:`_steps_fn` (the chunk length static), the same one for the same
    settings (the same optimizer object among them): a second :func:`fit` of a model, a
    resumed run in the same process, compiles nothing again."""
    try:
        return _jitted_steps_cached(*settings)
    except TypeError:  # an unhashable setting (an l2 array): no cache
        return jax.jit(_steps_fn(*settings), static_argnums=7)


@functools.lru_cache(maxsize=16)
def _jitted_steps_cached(*settings):
    return jax.jit(_steps_fn(*settings), static_argnums=7)


class _Progress(NamedTuple):
    """Where a run stands after a whole number of chunks; assigned in one statement, so an
    interrupt never sees half of it."""

    params: Params
    state: list | None  # the model state (BatchNorm running statistics); None for an MLP
    opt_state: optax.OptState
    step: int  # optimizer steps taken
    history: list  # one record per completed epoch
    partial: dict  # sums over the steps of the epoch in progress
    seconds: float  # training time before this process started (resumed runs)
    best: _Best | None = None  # early stopping's best epoch so far; None without it


class _Best(NamedTuple):
    """Early stopping's best epoch so far: the 1-based ``epoch`` with the lowest finite
    ``val_loss`` (0, loss ``inf``: none yet, the initial params), and its params and state.
    They are the device arrays the epoch ended with; nothing donates or mutates them."""

    epoch: int
    val_loss: float
    params: Params
    state: list | None


def _better(best: _Best, epoch: int, val_loss: float, params, state) -> _Best:
    """``best`` after ``epoch``: that epoch, if its ``val_loss`` is finite and strictly lower
    (a NaN or Inf never improves), else ``best`` unchanged."""
    if math.isfinite(val_loss) and val_loss < best.val_loss:
        return _Best(epoch, val_loss, params, state)
    return best


class _Schedule(NamedTuple):
    """``epochs`` epochs of ``steps_per_epoch`` steps, run in chunks of at most ``every``
    steps that never cross an epoch's end."""

    epochs: int
    steps_per_epoch: int
    every: int

    def chunks(self, step: int):
        """``(epoch, pos, length)`` of each chunk left after ``step`` steps: the chunk runs
        steps ``pos … pos+length−1`` of the 1-based ``epoch``."""
        per_epoch = self.steps_per_epoch
        for epoch in range(step // per_epoch + 1, self.epochs + 1):
            pos = step - (epoch - 1) * per_epoch  # ≠ 0 only when resumed mid-epoch
            while pos < per_epoch:
                length = min(self.every - pos % self.every, per_epoch - pos)
                yield epoch, pos, length
                pos += length
            step = epoch * per_epoch


def _loop(at, schedule, chunk, evaluate, saver, on_nonfinite, should_stop, show,
          patience=None) -> _Progress:  # fmt: skip
    """Run the chunks left after ``at``, checkpointing after each; the :class:`_Progress` at
    the end.

    ``chunk(at, epoch, pos, length)`` runs one (guarded) chunk, ``evaluate(params, state)``
    gives an epoch's test and validation metrics, ``show(record)`` reports a finished epoch.
    With a ``patience`` (early stopping), ``at.best`` follows the best epoch, and no chunk
    runs once ``patience`` completed epochs have passed since it.
    """
    before, start = at.seconds, time.perf_counter()
    clock = lambda: before + time.perf_counter() - start  # noqa: E731 (training time so far)
    per_epoch = schedule.steps_per_epoch
    try:
        for epoch, pos, length in schedule.chunks(at.step):
            if patience is not None and epoch - 1 - at.best.epoch >= patience:
                break  # stopped early (a resumed run: it had stopped)
            params, state, opt_state, metrics = chunk(at, epoch, pos, length)
            partial, history, best = _add_chunk(at.partial, metrics), at.history, at.best
            done = pos + length == per_epoch  # the chunk ends its epoch
            if done:
                record = _epoch_record(epoch, at.step + length, partial, on_nonfinite, clock())
                record.update(evaluate(params, state))
                if patience is not None:
                    best = _better(best, epoch, record["val_loss"], params, state)
                    record["best_epoch"] = best.epoch
                if "instruments" in partial:  # last: the long field
                    record["instruments"] = partial["instruments"]
                history = [*history, record]
                partial = _empty_partial(len(partial["grad_norm_sums"]), "instruments" in partial,
                                         "clipped_sum" in partial)  # fmt: skip
            at = at._replace(
                params=params, state=state, opt_state=opt_state, step=at.step + length,
                history=history, partial=partial, best=best,
            )  # fmt: skip
            saver.save(at, clock())
            if done:
                show(history[-1])
            if should_stop is not None and should_stop():
                raise Interrupted(at.step, at.step // per_epoch, saver.last)
    except KeyboardInterrupt as e:
        if isinstance(e, Interrupted):
            raise
        raise Interrupted(at.step, at.step // per_epoch, saver.save(at, clock())) from None
    return at


def _chunk(run, replay, model, key, x, y, on_nonfinite, saver, relu, at: _Progress, epoch, pos,
           length):  # fmt: skip
    """Steps ``pos … pos+length−1`` of ``epoch`` from ``at``: ``(params, state, opt_state,
    metrics)``, the metrics on the host (the chunk's one sync), checked by the guard (which
    may call ``replay()`` for a ``"full"`` run of the same steps); with instruments,
    ``metrics["instrument_records"]`` holds the instrumented steps' records (``relu``:
    :func:`fnbp.instruments.training.relu_layers`)."""
    args = (jax.random.fold_in(key, epoch), x, y, pos, length)
    params, state, opt_state, metrics = run(at.params, at.state, at.opt_state, *args)
    metrics = jax.device_get(metrics)
    if on_nonfinite == "stop":

        def rerun():  # the same steps from the chunk's start, with per-step flags
            return jax.device_get(replay()(at.params, at.state, at.opt_state, *args)[3])

        _check_chunk(metrics, rerun, model, at.step, epoch, saver)
    if "instruments" in metrics:
        metrics["instrument_records"] = _instr.records(
            metrics.pop("instruments"), metrics.pop("instrumented"), at.step + 1, epoch, relu
        )
    return params, state, opt_state, metrics


def _show(bar, on_epoch, record: dict) -> None:
    """Report a finished epoch: the progress bar, then ``on_epoch``."""
    bar.update(1)
    shown = ("train_loss", "val_loss", "test_accuracy")
    bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k in shown})
    if on_epoch is not None:
        on_epoch(record)


# Settings and data.


def _check_fit(model, optimizer, grads, l2, compute_dtype, epochs, batch_size, on_nonfinite,
               checkpoint_every, keep_checkpoints, mesh, instruments=None):  # fmt: skip
    """Raise for a bad setting of :func:`fit`; returns the checked ``compute_dtype``."""
    _check_batch_size(epochs, "epochs")
    _check_config(model, optimizer, grads, l2, instruments)
    _check_batch_size(batch_size)
    compute_dtype = check_compute_dtype(compute_dtype)
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
    if checkpoint_every is not None:
        _check_batch_size(checkpoint_every, "checkpoint_every")
    _check_batch_size(keep_checkpoints, "keep_checkpoints")
    if mesh is not None and batch_size % mesh.size:
        raise ValueError(
            f"batch_size {batch_size} must be divisible by the {mesh.size} devices of the mesh"
        )
    return compute_dtype


def _check_early_stopping(early_stopping, restore_best, x_val, y_val) -> None:
    """Raise for a bad ``early_stopping`` (the patience: a positive int) or ``restore_best``,
    or for early stopping without a validation set."""
    if early_stopping is None:
        return
    _check_batch_size(early_stopping, "early_stopping")
    if not isinstance(restore_best, bool):
        raise TypeError(f"restore_best must be True or False, got {restore_best!r}")
    if x_val is None and y_val is None:
        raise ValueError(
            f"early_stopping={early_stopping} watches the validation loss: pass x_val and y_val "
            "(examples held out of x_train, y_train)"
        )


def _initial_state(model, state, key):
    """The model state training starts from: ``None`` for an MLP, for a net ``state`` (checked)
    or :func:`fnbp.init_state`."""
    if isinstance(model, MLP):
        check_mode(model, state=state, train=True, key=None, what="fit")  # refuses a state
        return None
    state = init_state(model) if state is None else state
    check_mode(model, state=state, train=True, key=key, what="fit")
    return state


def _fit_data(model, params, train, test, val) -> tuple:
    """The ``(x, y)`` pairs ``train``, ``test`` and ``val`` as arrays, each checked against
    the model (a pair not given stays ``(None, None)``)."""
    check_params(params, model)
    names = (("x_train", "y_train"), ("x_test", "y_test"), ("x_val", "y_val"))
    return tuple(
        _data_pair(model, x_name, x, y_name, y)
        for (x_name, y_name), (x, y) in zip(names, (train, test, val), strict=True)
    )


def _data_pair(model, x_name: str, x, y_name: str, y) -> tuple:
    """``(x, y)`` as arrays, checked: both given (or neither: ``(None, None)``), of the shapes
    the model takes (errors prefixed by the names), non-empty and finite."""
    if (x is None) != (y is None):
        given, missing = (x_name, y_name) if y is None else (y_name, x_name)
        raise ValueError(f"{given} is given without {missing}: pass both or neither")
    if x is None:
        return None, None
    x, y = jnp.asarray(x), jnp.asarray(y)
    try:
        check_inputs(model, x, y)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{x_name}, {y_name}: {e}") from None
    _check_data(x_name, x, y_name, y)
    return x, y


def _check_data(x_name: str, x: Array, y_name: str, y: Array) -> None:
    """Raise unless the data set is non-empty and finite (one reduction per array, once)."""
    if x.shape[0] == 0:
        raise ValueError(f"{x_name} is empty: it has shape {x.shape}")
    for name, v in ((x_name, x), (y_name, y)):
        if jnp.issubdtype(v.dtype, jnp.floating) and not bool(jnp.isfinite(v).all()):
            bad = int(jnp.sum(~jnp.isfinite(v)))
            rows = np.flatnonzero(~np.isfinite(np.asarray(v)).reshape(len(v), -1).all(1))
            raise ValueError(
                f"{name} holds {bad} NaN or Inf values (rows {rows[:5].tolist()}"
                f"{', …' if len(rows) > 5 else ''}); clean or drop them before training"
            )


def _schedule(epochs, batch_size, checkpoint_every, n_train) -> _Schedule:
    steps_per_epoch = n_train // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {n_train} training examples")
    return _Schedule(epochs, steps_per_epoch, min(checkpoint_every or steps_per_epoch,
                                                  steps_per_epoch))  # fmt: skip


def _on_mesh(mesh, at: _Progress, x, y):
    """``(at, x, y, batch_sharding)``: without a mesh as given (sharding ``None``); with one,
    params, state, optimizer state and data replicated over its devices, and the sharding
    that splits a batch over its ``"data"`` axis."""
    if mesh is None:
        return at, x, y, None
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    at = at._replace(
        params=jax.device_put(at.params, replicated),
        state=jax.device_put(at.state, replicated),
        opt_state=jax.device_put(at.opt_state, replicated),
        best=None if at.best is None else at.best._replace(
            params=jax.device_put(at.best.params, replicated),
            state=jax.device_put(at.best.state, replicated),
        ),
    )  # fmt: skip
    x, y = jax.device_put((x, y), replicated)
    return at, x, y, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


# Checkpoints.


def _open_folder(checkpoint_dir, resume) -> tuple[Path | None, list[Path]]:
    """The checkpoint folder (made, and cleared of the temporary files a kill -9 mid-write
    leaves) and the checkpoints already in it, oldest first."""
    if checkpoint_dir is None:
        if resume:
            raise ValueError("resume=True needs the checkpoint_dir to resume from")
        return None, []
    folder = Path(checkpoint_dir)
    found = ckpt.list_checkpoints(folder)
    _check_same_folder(folder, found)
    if found and not resume:
        raise ValueError(
            f"checkpoint_dir {folder} already holds checkpoints (newest {found[-1].name}); "
            "pass resume=True to continue that run, or use an empty folder"
        )
    if distributed.is_main():  # with several processes, process 0 alone writes there
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".ckpt-*.tmp-*"):
            stale.unlink(missing_ok=True)
    distributed.barrier("fnbp.fit: checkpoint folder")
    return folder, found


def _check_same_folder(folder: Path, found: list[Path]) -> None:
    """With several processes, a ValueError (in every one) unless each finds the same
    checkpoints: they must all see one folder, process 0's writes."""
    newest = int(found[-1].stem[5:]) if found else -1
    seen = distributed.gathered([len(found), newest])
    if (seen != seen[0]).any():
        each = ", ".join(f"process {i}: {n} (newest step {s})" for i, (n, s) in enumerate(seen))
        raise ValueError(
            f"checkpoint_dir {folder}: the processes find different checkpoints ({each}); give "
            "a folder that every process sees (a shared file system): process 0 writes it, "
            "all of them read it"
        )


class _Saver:
    """Writes fit's checkpoints into ``folder`` (nothing when it is ``None``), keeping the
    newest ``keep``; ``last`` is the newest written (or found on resume)."""

    def __init__(self, folder, keep, model, key, config, settings, found: list[Path]):
        self.folder, self.keep, self.model, self.key = folder, keep, model, key
        self.config, self.settings = config, settings
        self.last = found[-1] if found else None

    def save(self, at: _Progress, seconds: float) -> Path | None:
        """Checkpoint ``at`` (unless it is the newest already); returns the newest file."""
        if self.folder is None:
            return self.last
        path = ckpt.checkpoint_path(self.folder, at.step)
        if path != self.last:
            loop = {"settings": self.settings, "history": at.history, "partial": at.partial,
                    "seconds": seconds}  # fmt: skip
            best = {}
            if at.best is not None:  # the epoch and loss here, its params and state as arrays
                loop["best"] = {"epoch": at.best.epoch, "val_loss": at.best.val_loss}
                best = {"best_params": at.best.params, "best_state": at.best.state}
            epoch = at.step // self.settings["steps_per_epoch"]
            if distributed.is_main():  # the others wait: the file is whole when they go on
                ckpt.save_checkpoint(
                    path,
                    ckpt.Checkpoint(at.params, at.opt_state, at.step, epoch, self.key,
                                    self.model, self.config, loop, at.state, **best),
                )  # fmt: skip
                ckpt.prune_checkpoints(self.folder, self.keep)
            distributed.barrier(f"fnbp.fit: {path.name}")
            self.last = path
        return path


def _resume(found: list[Path], optimizer, model, params, key, settings) -> _Progress:
    """The :class:`_Progress` stored in the newest checkpoint of ``found``."""
    path = found[-1]
    try:
        c = ckpt.load_checkpoint(path, optimizer, model)
    except ValueError as e:
        hint = f"; move it aside to resume from {found[-2].name} instead" if len(found) > 1 else ""
        raise ValueError(f"{e}{hint}") from None
    loop = c.loop or {}
    _check_layout(path, loop.get("settings") or {}, settings)
    if loop.get("settings") != settings:
        theirs = loop.get("settings") or {}
        keys = [*settings, *(k for k in theirs if k not in settings)]  # either side's
        diff = [f"{k} {theirs.get(k)!r} there, {settings.get(k)!r} here" for k in keys
                if theirs.get(k) != settings.get(k)]  # fmt: skip
        raise ValueError(
            f"{path}: the checkpoint was written by a run with other settings ("
            f"{'; '.join(diff) or 'none recorded'}); resume with the same settings"
        )
    if not np.array_equal(jax.random.key_data(c.key), jax.random.key_data(key)):
        raise ValueError(f"{path}: the checkpoint was written by a run with another key")
    for leaf, want in zip(jax.tree.leaves(c.params), jax.tree.leaves(params), strict=True):
        if leaf.dtype != want.dtype:
            raise ValueError(
                f"{path}: params of dtype {leaf.dtype}, but this run's are {want.dtype}"
            )
    mlp = isinstance(model, MLP)
    best = None
    if "early_stopping" in settings:  # the settings agree, so the run that wrote it kept a best
        if c.best_params is None or "best" not in loop:
            raise ValueError(f"{path}: the checkpoint holds no best params for early stopping")
        best = _Best(int(loop["best"]["epoch"]), float(loop["best"]["val_loss"]),
                     c.best_params, None if mlp else c.best_state)  # fmt: skip
    return _Progress(
        c.params, None if mlp else c.state, c.opt_state, c.step, loop["history"],
        loop["partial"], loop["seconds"], best,
    )  # fmt: skip


def _check_layout(path: Path, theirs: dict, ours: dict) -> None:
    """A ValueError unless the checkpoint's run had this run's processes and devices."""
    layout = lambda s: (s.get("processes", 1), s.get("devices"))  # noqa: E731
    if "devices" not in theirs or layout(theirs) == layout(ours):
        return

    def said(p, d):
        return f"{p} process{'es' if p > 1 else ''} with {d} device{'s' if d != 1 else ''} in all"

    raise ValueError(
        f"{path}: the checkpoint was written by {said(*layout(theirs))}, this run has "
        f"{said(*layout(ours))}; resume with the same layout (the order of the gradient "
        "all-reduce, and so the result bit for bit, depends on it)"
    )


# The guard.


def _check_chunk(metrics: dict, rerun, model, step: int, epoch: int, saver: _Saver) -> None:
    """Raise :class:`NonFiniteError` for the first non-finite step of a chunk that began after
    ``step`` steps, if any: read from its ``"full"`` metrics, which ``rerun()`` computes (a
    replay from the chunk's start) when the chunk itself computed less and one of its losses,
    or its end state (``metrics["end_finite"]``), is non-finite."""
    end_ok = bool(metrics.pop("end_finite"))
    loss_ok = np.isfinite(metrics["loss"])
    if "grads_finite" not in metrics and loss_ok.all() and end_ok:
        return
    full = metrics if "grads_finite" in metrics else rerun()
    bad = _guard.first_nonfinite(full, param_layers(model))
    if bad is None and loss_ok.all() and end_ok:
        return
    if bad is None:  # the replay found nothing (it should not): report what the chunk saw
        j = len(loss_ok) - 1 if loss_ok.all() else int(np.argmin(loss_ok))
        bad = (j, "loss" if not loss_ok[j] else "end", [])
    j, what, layers = bad
    kinds = None if isinstance(model, MLP) else [layer.kind for layer in model.layers]
    raise NonFiniteError(  # the loss the run itself saw (the replay's may round otherwise)
        step + j + 1, epoch, what, layers, float(metrics["loss"][j]), saver.last,
        saver.folder is not None, kinds,
    )  # fmt: skip


# Evaluation and the epoch records.


def _evaluate(model, x, y, l2, compute_dtype, params, state, name: str = "test") -> dict:
    """``{name}_loss`` (and, for classifiers, ``{name}_accuracy``) of the data set ``x, y`` in
    eval mode; ``{}`` without data."""
    if x is None:
        return {}
    out = {f"{name}_loss": float(model_loss(params, model, x, y, l2=l2,
                                      compute_dtype=compute_dtype, state=state, train=False))}  # fmt: skip
    if _is_classification(model, y):
        out[f"{name}_accuracy"] = float(accuracy(params, model, x, y, state=state))
    return out


def _evaluate_all(model, sets: dict, l2, compute_dtype, params, state) -> dict:
    """:func:`_evaluate` of each ``name: (x, y)`` of ``sets`` (``test``, ``val``), merged."""
    out = {}
    for name, (x, y) in sets.items():
        out.update(_evaluate(model, x, y, l2, compute_dtype, params, state, name))
    return out


def _empty_partial(n: int, instruments: bool = False, dp: bool = False) -> dict:
    """The sums of an epoch before its first step, over ``n`` weight layers (with
    ``instruments`` the list of its instrumented steps' records, with ``dp`` the sum of the
    clipped fractions)."""
    out = {"steps": 0, "loss_sum": 0.0, "grad_norm_sums": [0.0] * n, "skipped": 0}
    return out | ({"instruments": []} if instruments else {}) | ({"clipped_sum": 0.0} if dp else {})


def _add_chunk(partial: dict, metrics: dict) -> dict:
    """The epoch's running sums after one more chunk (float64, host, in step order), over the
    steps that were not skipped (and the chunk's instrument records appended)."""
    taken = ~metrics["skipped"] if "skipped" in metrics else np.ones(len(metrics["loss"]), bool)
    norms = metrics.get("grad_norms", np.zeros((len(taken), 0)))  # none with metrics="loss"
    out = {
        "steps": partial["steps"] + int(np.sum(taken)),
        "loss_sum": partial["loss_sum"] + float(np.sum(metrics["loss"][taken], dtype=np.float64)),
        "grad_norm_sums": [
            s + float(v)
            for s, v in zip(
                partial["grad_norm_sums"], np.sum(norms[taken], 0, dtype=np.float64), strict=True
            )
        ],
        "skipped": partial["skipped"] + int(np.sum(~taken)),
    }
    if "instruments" in partial:
        out["instruments"] = partial["instruments"] + metrics["instrument_records"]
    if "clipped_sum" in partial:
        out["clipped_sum"] = partial["clipped_sum"] + float(
            np.sum(metrics["dp_clipped"][taken], dtype=np.float64)
        )
    return out


def _epoch_record(epoch, step, partial, on_nonfinite, seconds) -> dict:
    n = partial["steps"] or math.nan  # every step skipped: nothing to average
    record = {
        "epoch": epoch,
        "step": step,
        "train_loss": partial["loss_sum"] / n,
        "grad_norms": [s / n for s in partial["grad_norm_sums"]],
        "seconds": round(seconds, 3),
    }
    if not record["grad_norms"]:  # metrics="loss"
        del record["grad_norms"]
    if on_nonfinite == "skip":
        record["skipped_steps"] = partial["skipped"]
    if "clipped_sum" in partial:
        record["dp_clipped_fraction"] = partial["clipped_sum"] / n
    return record
