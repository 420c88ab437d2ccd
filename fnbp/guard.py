"""What a training step reports about itself, and the divergence guard that reads it.

A step's metrics come in three sizes (``metrics=`` of :func:`fnbp.make_train_step`,
:func:`fnbp.make_train_epoch`, :func:`fnbp.fit`):

* ``"loss"``: the loss before the update, nothing else: the step computes what a plain
  ``jax.value_and_grad`` + optax step computes.
* ``"norms"``: also ``grad_norms``, ‖∂L/∂W‖_F of each layer with weights
  (:func:`fnbp.train.weight_layers`).
* ``"full"``: also, one flag per layer with params (:func:`fnbp.train.param_layers`),
  ``grads_finite`` (every entry of the layer's gradient is finite), ``params_finite`` (of the
  updated params) and ``opt_state_finite`` (of the optimizer state's entries shaped like the
  layer's params, e.g. Adam's μ and ν; one last entry for the leaves tied to no layer, such as
  injected hyperparameters).

Measured (``python scripts/bench.py``, 2-core CPU), the per-layer flags are what cost: one
reduction per leaf of the gradient, the params and the optimizer state, 9% of a 64-128-128-10
MLP's scan-fused step at batch 32 and 2% at batch 128, while the norms cost 4% and 0%. So the
guard of :func:`fnbp.fit` reads only the losses of a chunk of steps and, once at the chunk's
end, whether its params, state and optimizer state are finite (:func:`all_finite`): a NaN or
Inf that enters the params shows in the next step's loss (a matmul spreads it to every unit,
0 · Inf = NaN), or at the chunk's end. When either is non-finite the chunk is replayed from its
start, the same batches and keys, with ``"full"`` metrics, and :func:`first_nonfinite` names
the step and the layer exactly as a step checked every time would have. The optimizer state
counts: Adam started from N(0, 1) weights in a 30-layer ReLU net keeps a finite loss (~5e27)
and finite params while its second moment ν overflows to Inf, after which every update is
exactly 0 and nothing changes.

Every flag is ``isfinite(Σ v)`` over the leaf: a sum is finite exactly when its entries are,
unless it overflows (|Σ| past the dtype's range, entries ~1e32 in float32: a blown-up run
either way); it fuses into passes XLA makes anyway, where ``isfinite(v).all()`` cost ~10% of a
784-1024-1024-10 step on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fnbp.diagnostics import _weight_grad_norm

Array = jax.Array
METRICS = ("loss", "norms", "full")


def check_metrics(metrics, allowed=METRICS) -> str:
    """``metrics`` if it is one of ``allowed``; a ``ValueError`` naming them otherwise."""
    if not isinstance(metrics, str) or metrics not in allowed:
        raise ValueError(f"metrics must be one of {allowed}, got {metrics!r}")
    return metrics


def finite(tree) -> Array:
    """Whether every floating entry of ``tree`` is finite (a scalar bool; ``True`` for a
    tree without floating leaves)."""
    sums = [jnp.sum(v) for v in jax.tree.leaves(tree) if jnp.issubdtype(v.dtype, jnp.inexact)]
    if not sums:
        return jnp.asarray(True)
    # isfinite of the stacked sums, not a chain of ``&``: XLA copies a chain of scalar ops into
    # every fusion that reads its result, and the skip mode's selects read it once per leaf (a
    # 30-layer MLP with Adam compiled 143k lines of HLO in 10 s; stacked, 12k in 1.1 s)
    return jnp.all(jnp.isfinite(jnp.stack(sums)))


def grad_norms(model, grads, with_weights: list[int]) -> Array:
    """``(len(with_weights),)``: ‖∂L/∂W‖_F of each layer with weights (a residual block's
    all together), in at least float32."""
    return jnp.stack([_weight_grad_norm(model.layers[i], grads[i]) for i in with_weights])


def layer_flags(tree, with_params: list[int]) -> Array:
    """``(len(with_params),)`` bool: :func:`finite` of each listed layer's entry of ``tree``
    (params or a gradient: one entry per layer)."""
    return jnp.stack([finite(tree[i]) for i in with_params])


def opt_state_flags(opt_state, params, with_params: list[int]) -> Array:
    """``(len(with_params) + 1,)`` bool: for each listed layer, :func:`finite` of every
    subtree of ``opt_state`` shaped like ``params`` (optax's momentum, Adam's μ and ν), at that
    layer; last, :func:`finite` of the leaves outside such subtrees (step counts, injected
    hyperparameters)."""
    shape = jax.tree.structure(params)
    like = lambda node: jax.tree.structure(node) == shape  # noqa: E731
    parts = jax.tree.leaves(opt_state, is_leaf=like)
    mirrors = [p for p in parts if like(p)]
    rest = [p for p in parts if not like(p)]
    per_layer = [finite([m[i] for m in mirrors]) for i in with_params]
    return jnp.stack([*per_layer, finite(rest)])


def full(grads, new_params, new_opt_state, with_params: list[int]) -> dict:
    """The ``"full"`` metrics' three per-layer flags of one step."""
    return {
        "grads_finite": layer_flags(grads, with_params),
        "params_finite": layer_flags(new_params, with_params),  # a finite step can overflow
        "opt_state_finite": opt_state_flags(new_opt_state, new_params, with_params),
    }


def step_ok(loss, grads, new_params, new_opt_state) -> Array:
    """Whether a step's loss, gradient, updated params and new optimizer state are all finite:
    :func:`finite` of them together (one stack of sums: the skip mode's selects read it once
    per leaf)."""
    return finite((loss, grads, new_params, new_opt_state))


def all_finite(params, state, opt_state) -> Array:
    """Whether the params, model state and optimizer state are finite (one scalar bool)."""
    return finite(params) & finite(state) & finite(opt_state)


def first_nonfinite(metrics: dict, with_params: list[int]) -> tuple[int, str, list[int]] | None:
    """``(index in chunk, what, layers)`` of the first step of a chunk's ``"full"`` metrics
    (host arrays, a leading axis of steps) whose loss, gradient, updated params or optimizer
    state are non-finite, or ``None``.

    ``what`` is the first of ``"gradient"``, ``"params"``, ``"optimizer state"`` that is
    non-finite at that step, or ``"loss"``; ``layers`` are 1-based model layers (flag ``k``
    is about layer ``with_params[k] + 1``), empty for ``"loss"`` and for an optimizer state
    whose non-finite leaves are tied to no layer."""
    flags = {
        "gradient": metrics["grads_finite"],
        "params": metrics["params_finite"],
        "optimizer state": metrics["opt_state_finite"],
    }
    ok = np.isfinite(metrics["loss"])
    for f in flags.values():
        ok = ok & f.all(axis=1)
    if ok.all():
        return None
    j = int(np.argmin(ok))
    for what, f in flags.items():
        bad = np.flatnonzero(~f[j])
        if bad.size:
            return j, what, [with_params[int(k)] + 1 for k in bad if k < len(with_params)]
    return j, "loss", []


class NonFiniteError(FloatingPointError):
    """Training met a non-finite loss, gradient, updated params or optimizer state
    (``on_nonfinite="stop"``).

    Attributes:
        step: the 1-based number of the first step whose loss, gradient, update or optimizer
            state was non-finite.
        epoch: the 1-based epoch it belongs to.
        what: ``"gradient"`` (some gradient entry is NaN or Inf), ``"params"`` (the gradient
            is finite but the update made some params non-finite), ``"optimizer state"``
            (gradient and params finite, the optimizer's state not: Adam's ν overflowing makes
            every later update 0) or ``"loss"`` (only the loss is); ``"end"``: the state at
            the end of a chunk was non-finite and no step of its replay was (``step`` is then
            the chunk's last).
        layer: the first layer (1-based, in ``params`` order) with that non-finite quantity;
            ``None`` for ``"loss"`` (and an optimizer state non-finite outside any layer).
        layers: every such layer at that step.
        loss: that step's loss.
        checkpoint: the last checkpoint written (all finite), or ``None``.

    The message names each layer by number, and for a :class:`fnbp.Net` by kind too
    (``layer 3 (conv)``), from ``kinds``: the kind of every layer, in order.
    """

    def __init__(self, step, epoch, what, layers, loss, checkpoint, checkpointing=True,
                 kinds=None):  # fmt: skip
        self.step, self.epoch, self.what, self.layers, self.loss = step, epoch, what, layers, loss
        self.layer = layers[0] if layers else None
        self.checkpoint = checkpoint
        name = (lambda l: str(l)) if kinds is None else (lambda l: f"{l} ({kinds[l - 1]})")
        listed = (
            f"(non-finite in layers {', '.join(map(name, layers))} of the model), loss {loss:g}"
        )
        if what == "gradient":
            what = f"the gradient of layer {name(self.layer)} is non-finite {listed}"
        elif what == "params":
            what = f"the update made the params of layer {name(self.layer)} non-finite {listed}"
        elif what == "optimizer state" and layers:
            what = (f"the optimizer state of layer {name(self.layer)} is non-finite {listed}; "
                    "its updates are 0 or NaN from here on")  # fmt: skip
        elif what == "optimizer state":
            what = f"the optimizer state (outside any layer) is non-finite, loss {loss:g}"
        elif what == "end":
            what = (
                "the params, model state or optimizer state at the end of its chunk are "
                f"non-finite (a replay of the chunk did not pin the step), loss {loss:g}"
            )
        else:
            what = f"the loss is {loss:g} (gradients, params and optimizer state finite)"
        if checkpoint:
            kept = f"the last finite checkpoint is {checkpoint}"
        elif checkpointing:
            kept = "it came before the first checkpoint"
        else:
            kept = "no checkpoints were kept (give a checkpoint folder to keep the last finite one)"
        super().__init__(
            f"training diverged at step {step} (epoch {epoch}): {what}; {kept}. Lower the "
            "learning rate, or skip such steps (on_nonfinite='skip', --on-nonfinite skip)"
        )
