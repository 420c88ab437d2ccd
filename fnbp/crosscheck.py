"""Cross-validation of the hand-written backprop against ``jax.grad`` and finite differences.

:func:`crosscheck` computes every parameter's gradient three independent ways and compares
them leaf by leaf (each ``W⁽ˡ⁾`` and ``b⁽ˡ⁾``; for a :class:`fnbp.Net` every leaf of every layer,
named by its tree path) by the relative error ‖g_manual − g_ref‖/‖g_ref‖:

1. ``jax.grad`` of the same forward pass (:func:`fnbp.model._loss_and_state`, with the same
   dropout masks, state and mode) in the parameters' own dtype, and again in float64;
2. central finite differences ``(L(θ + εeᵢ) − L(θ − εeᵢ)) / 2ε`` in float64 for *every*
   parameter, all at once (``vmap``/``lax.map``, not a Python loop).

It also compares, in both dtypes, the **error signal of every layer**
δ⁽ⁱ⁾ = ∂L/∂z⁽ⁱ⁾ (a residual block's stream δ) with ``jax.grad`` with respect to zero offsets
added to each z⁽ⁱ⁾, and the **new state** (BatchNorm running statistics, a forward quantity)
with the reference forward's. The δ check names the first broken local rule
(:attr:`CrosscheckReport.broken_layer`): going from the output down, the first layer ``i`` whose
δ disagrees means the rule above it (``∂L/∂x`` of layer ``i + 1``, or the ``f′`` of layer
``i``) is wrong; if every δ agrees but layer ``i``'s parameter grads do not, its parameter
formula is. A wrong δ of the last layer is the loss's output δ. (An MLP's report lists only
its leaves, as it always has, and the first broken rule when one is.) For nets whose every
parameter is too many to difference, :func:`fnbp.gradcheck` compares random directions of each
parameter block and of each layer's z instead.

Tolerances (``rtol``, relative to the leaf's gradient norm):

==============================  ==========  ==========================================
comparison                      rtol        why
==============================  ==========  ==========================================
vs ``jax.grad``, float64        1e-10       same math, rounding of ~2e-16 per op
vs ``jax.grad``, float32        1e-5        rounding of ~6e-8 per op, summed over depth
vs ``jax.grad``, bfloat16       5e-2        8-bit mantissa (~4e-3 per op)
vs ``jax.grad``, mixed bf16     5e-2        see below; measured worst 2.1e-2
vs finite differences, float64  1e-6        truncation ε²·L‴/6 plus rounding ~1e-16·|L|/ε
==============================  ==========  ==========================================

The δ and state checks use the ``jax.grad`` tolerances of their dtype.

Mixed precision (``compute_dtype=jnp.bfloat16``; the reference is ``jax.grad`` of the same
mixed-precision loss) uses the compute dtype's tolerance. Both sides round every matmul and
activation to bfloat16, but not at the same places: ``jax.grad`` rounds ``Σₙ δaᵀ`` to bfloat16
before casting it to the float32 params, where the hand-written pass accumulates it in float32,
and ``f′`` comes from the stored activation (``1 − a²``, ``a(1 − a)``) rather than from
differentiating ``f``, each rounded separately. Measured errors: 2e-3–7e-3 per leaf on the
ReLU 784-16-16-10 and 64-128-128-10 digits networks, at most 2.1e-2 over 80 random networks
of depth ≤ 5 with every activation and loss (softplus, sigmoid and GELU stacks are the worst),
so 5e-2 leaves a margin of 2.4 and still catches a wrong factor of 1.1. The float64 and
finite-difference comparisons check the math and ignore ``compute_dtype``.

A leaf whose gradient is (nearly) zero, such as a dead ReLU unit or a bias sum that cancels,
is judged against a floor of 1e-3 × the norm of the whole gradient instead of its own norm
(the same for δ and state: 1e-3 × the norm of all of them). A leaf that is 0 in exact
arithmetic (its float64 gradient under 1e-10 of the whole) is judged in the working dtype
against the whole gradient's norm: the bias of a layer before a train-mode BatchNorm, a sum
over the batch of terms that cancel, keeps float32 rounding noise of about 2e-8 of the whole
gradient (bfloat16: 1e-3), on the scale of the terms, not of their sum.
Finite differences also carry a rounding floor that no step removes: each quotient is off by
about ``eps₆₄·|L|/ε``, so a leaf of ``n`` entries may differ by a further
``√n · 10·eps₆₄·max(|L|, 1)/ε`` (≈ 5e-9 per entry for a loss near 2), reported as ``fd_noise``.

The finite-difference step is ε = 1e-6 (float64 rounding makes the error grow as ε shrinks,
truncation as it grows; 1e-6 keeps both under 1e-8 for well-scaled networks). Every quotient
needs the loss at θ ± εeₖ, on the whole batch, with the dropout masks and the state fixed: the
loss the full forward pass computes there (to rounding), at a fraction of its cost. All 2n
directions θ ± εeₖ of the n parameters go through *one* forward pass over a batch of
directions that grows at each layer, as the directions of that layer's params join it (so the
program grows linearly with depth, not quadratically as one rerun per layer would). Where they
join:

- **Dense** (top level): ``W⁽ˡ⁾ᵢⱼ ± ε`` moves only the column ``z⁽ˡ⁾ᵢ``, by ``±ε·a⁽ˡ⁻¹⁾ⱼ``
  (``b⁽ˡ⁾ᵢ`` by ``±ε``): they join at ``z⁽ˡ⁾`` shifted by that column.
- **Conv** (top level): ``W[k, i, c] ± ε`` moves only output channel ``c``, by ``±ε`` times the
  input patches ``x̃[n, o·s + k, i]`` (``b[c]`` by ``±ε``): they join at the shifted ``z``. When
  channel-local layers (pools, activations, dropout) and then a layer linear in their output
  (a Conv, or Flatten and Dense) follow, only channel ``c`` runs through the channel-local
  layers, and the directions join at that linear layer's z, moved by its linear map of the one
  moved channel (a one-channel convolution, or the dense columns of that channel): C_in times
  cheaper than rerunning the convolution, and exact.
- **Every other layer with params** (BatchNorm, LayerNorm, residual blocks with their
  branches, α and projection, and Dense or Conv subclasses, whose forward may differ): its
  params are ravelled, each entry is moved by ±ε, and the layer is rerun on its input: they
  join at its z. Under train-mode BatchNorm one example's perturbation moves every example's
  output; the rerun recomputes the batch statistics, so the quotient is a derivative of the
  *batch* loss, which is what backprop computes: no special case.

XLA's CPU backend runs float64 convolutions as plain loops (at -O0 about 100× slower than its
float32 library call), so the reruns compute each Conv as one matmul of its input patches
(im2col): the same function, by another route. The L2 penalty's part of each quotient is the
exact central difference of (λ/2)W², added per entry. Piecewise-linear units (ReLU-family
activations, max-pool winners, inside residual branches too) make a difference quotient that
straddles a kink mix two slopes and say nothing about the derivative. Those parameters are
detected (the piece of every unit on the way, what :func:`fnbp.engine.trace_regions` collects,
at θ ± ε against its piece at θ), excluded from the comparison and reported as ``kinks``. A
train-mode BatchNorm feature whose batch variance is tiny (σ² < 100·ε) has huge third
derivatives, so truncation breaks the 1e-6 budget there: the report warns.

Cost: a cross-check compiles two XLA programs, one per dtype (one when the params are already
float64), each computing everything it compares (hand-written grads, δ and state,
``jax.grad``'s and, in float64, every finite difference), at LLVM -O0 since each runs once;
compilation dominates, and grows with the number of layers (and of kernels in them: each
BatchNorm, residual block or float64 convolution adds several). The full check of the
784-16-16-10 MLP (13,002 parameters, batch 32) takes about 0.65 s on a 2-core CPU in a fresh
process, compilation included; the MNIST-1D CNN's (three Conv1d of 25 channels and a Dense,
5,210 parameters) about 1.5× that. Finite differences need memory for the batch of directions
at the widest layer; they are split into steps of ``lax.map`` to hold at most
:data:`FD_VALUES` float64 values. Within one program XLA merges identical subcomputations, so
where the hand-written pass builds the same expression as ``jax.grad`` the two agree bitwise
(error 0); anything else stays separate.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from fnbp.backprop import _backprop
from fnbp.engine import forward_seq, no_masks
from fnbp.layers.conv import Conv
from fnbp.layers.dense import Activation, Dense
from fnbp.layers.dropout import Dropout
from fnbp.layers.pool import AvgPool, MaxPool, windows
from fnbp.layers.reshape import Flatten
from fnbp.losses import to_targets
from fnbp.model import (
    MLP,
    Params,
    _loss_and_state,
    blank_state,
    check_compute_dtype,
    check_inputs,
    check_l2,
    check_mode,
    check_params,
    draw_batch_masks,
    run,
)
from fnbp.net import Net

Array = jax.Array

RTOL_AUTODIFF = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 5e-2, "float16": 1e-2}
RTOL_FINITE_DIFFERENCES = 1e-6
FD_STEP = 1e-6
FD_VALUES = 2**26  # float64 values (512 MiB) the batch of directions may hold at any layer
_FLOOR = 1e-3  # a leaf's error is judged against max(‖g_leaf‖, _FLOOR·‖g_all‖)
_EXACT_ZERO = 1e-10  # a leaf whose float64 gradient is below this fraction of the whole
_TINY_VARIANCE = 100  # warn for a train-mode BatchNorm feature with σ² < _TINY_VARIANCE·ε

# A cross-check runs each of its programs once or twice, so LLVM's optimizations cost more
# compile time than they save: on a 2-core CPU at -O0 the float64 program of a 784-16-16-10
# network compiles in about half the time (0.5 → 0.25 s) and runs 10–20% slower (0.12 → 0.14 s).
_QUICK_COMPILE = {"xla_backend_optimization_level": 0}

# Drawn once, outside the programs, and shared by everything compared (jitted: eagerly, each
# PRNG op compiles on its own, seconds per net).
_draw_masks_jit = jax.jit(
    draw_batch_masks, static_argnums=(0, 2, 3), compiler_options=_QUICK_COMPILE
)

# The hand-written pass a cross-check runs: a static argument of its programs, so a test can
# swap in a broken one.
_backprop_jit = jax.jit(_backprop, static_argnames=("compute_dtype", "train"))


def _reference(params, model, x, y, l2, compute_dtype=None, state=None, masks=None, train=False):
    """``(loss, new state, ∂L/∂params, δ)`` by ``jax.grad`` of the same forward pass; δ is the
    gradient with respect to zero offsets added to each top-level z⁽ⁱ⁾."""
    z = jax.eval_shape(
        lambda p, x, s, m: (
            run(p, model, x, state=s, masks=m, train=train, compute_dtype=compute_dtype).z
        ),
        params,
        x,
        state,
        masks,
    )
    offsets = [jnp.zeros(v.shape, v.dtype) for v in z]
    (loss, new_state), (grads, deltas) = jax.value_and_grad(
        _loss_and_state, argnums=(0, 9), has_aux=True
    )(params, model, x, y, l2, compute_dtype, state, masks, train, offsets)
    return loss, new_state, grads, deltas


def _top(deltas) -> list:
    """The top-level δ of each layer (a residual block's stream δ, ``"out"``)."""
    return [d["out"] if isinstance(d, dict) else d for d in deltas]


def autodiff_grads(
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
):
    """``(loss, grads)`` from ``jax.value_and_grad`` of the forward pass: the reference for
    backprop.

    Keywords as in :func:`fnbp.backprop` (the same masks from ``key``); ``compute_dtype``: the
    reference for mixed precision is ``jax.grad`` of the same mixed-precision loss.
    """
    check_params(params, model)
    check_inputs(model, x, y)
    check_l2(l2)
    train = check_mode(model, state=state, train=train, key=key, what="autodiff_grads")
    compute_dtype = check_compute_dtype(compute_dtype)
    return _value_and_grad_jit(
        params, model, x, y, l2, compute_dtype=compute_dtype, state=state, key=key, train=train
    )


@functools.partial(jax.jit, static_argnames=("compute_dtype", "train"))
def _value_and_grad_jit(params, model, x, y, l2, compute_dtype, state, key, train):
    masks = draw_batch_masks(model, key, x.shape[0], train)
    (loss, _), grads = jax.value_and_grad(_loss_and_state, has_aux=True)(
        params, model, x, y, l2, compute_dtype, state, masks, train
    )
    return loss, grads


# ----------------------------------------------------------------------------------------------
# Finite differences, every parameter at once (float64).


def _penalty_fd(W, l2, step):
    """The central difference of (λ/2)W², entry by entry (exactly λW up to rounding)."""
    return 0.5 * l2 * ((W + step) ** 2 - (W - step) ** 2) / (2 * step)


def _patches(layer: Conv, x: Array) -> Array:
    """Every input patch of a convolution, ``(B, *spatial, C_in) -> (B, *out, F)``:
    ``x̃[n, o·s + k, i]`` at ``F`` index ``(k, i)``, the order of ``W``'s first axes."""
    padded = jnp.pad(x, [(0, 0), *layer.pads(x.shape[1:-1]), (0, 0)])
    win = windows(padded, layer.kernel_size, layer.strides)  # (B, *out, K, C_in)
    return win.reshape(*win.shape[:-2], -1)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _PatchConv(Conv):
    """:class:`fnbp.layers.Conv`'s forward as one matmul of its input patches (im2col), for the
    finite-difference reruns: XLA's CPU backend runs float64 convolutions as plain loops (at
    -O0 about 100× slower than the float32 library call) but float64 matmuls in a library."""

    def forward(self, p, s, x, mask, train):
        P = _patches(self, x)  # z[n, o, c] = Σ_f P[n, o, f] W[f, c] + b[c]
        W = p["W"].reshape(-1, self.features)
        z = jax.lax.dot_general(P, W, (((P.ndim - 1,), (0,)), ((), ())))
        if "b" in p:
            z = z + p["b"].reshape((1,) * (z.ndim - 1) + (-1,))
        return z, None, {}


def _by_patches(layers) -> tuple:
    """``layers`` with every :class:`Conv` (nested ones too) computed by :class:`_PatchConv`."""
    out = []
    for layer in layers:
        if type(layer) is Conv:
            layer = _PatchConv(
                **{f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)}
            )
        elif layer.sublayers():
            layer = dataclasses.replace(layer, branch=_by_patches(layer.sublayers()))
        out.append(layer)
    return tuple(out)


def _columns(layer, p, x):
    """``(C, cols)``: the perturbation of the layer's z by each entry of its weight matrix and
    bias, as a column shift: entry ``(c, f)`` adds ``ε·cols[f]`` to output channel ``c``.

    Dense: ``cols = [a | 1]`` (``(F + 1, B)``); Conv: every input patch entry ``x̃[n, o·s + k, i]``
    and a 1 (``(F + 1, B, *out)``, F = prod(kernel)·C_in in the order of ``W``'s axes).
    """
    if isinstance(layer, Conv):
        x = _patches(layer, x)
    if "b" in p:
        x = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)
    return layer.features, jnp.moveaxis(x, -1, 0)


def _from_columns(layer, p, q):
    """Quotients ``q`` of shape ``(C, F [+ 1])`` back into the layout of ``p``."""
    n_in = q.shape[1] - ("b" in p)
    W = q[:, :n_in] if isinstance(layer, Dense) else q[:, :n_in].T.reshape(p["W"].shape)
    return {"W": W, "b": q[:, n_in]} if "b" in p else {"W": W}


class _Entry(NamedTuple):
    """How the ``2n`` directions θ ± εeₖ of one layer's ``n`` params enter the forward pass.

    ``start(d)`` gives direction ``d``'s z of layer ``at`` (k = d mod n, the sign + for
    d < n) and whether it already crossed a kink on the way; from there on every direction
    runs the same layers. ``unpack`` turns ``n`` values into a tree like the layer's params.
    """

    layer: int
    at: int
    n: int
    start: Callable
    unpack: Callable
    copies: int = 0  # values each direction holds besides the activations (perturbed params)


def _direction(d, n):
    """Direction ``d`` of ``2n``: the entry ``k`` it perturbs and its sign ±1."""
    return d % n, jnp.where(d < n, 1.0, -1.0)


def _differs(pieces, base) -> Array:
    """Per direction (the leading axis of each piece): whether any unit is on another linear
    piece than at θ."""
    out = jnp.zeros(pieces[0].shape[:1], bool) if pieces else None
    for p, p0 in zip(pieces, base, strict=True):
        out = out | jnp.any(p != p0[None], axis=tuple(range(1, p.ndim)))
    return out


def _shift_entry(layers, params, tr, i, step) -> _Entry:
    """A top-level Dense or Conv: perturbation ``k = (c, f)`` moves channel ``c`` of z⁽ⁱ⁾ by
    ``±ε·cols[f]`` (:func:`_columns`)."""
    layer, p, z = layers[i], params[i], tr.z[i]
    C, cols = _columns(layer, p, tr.a[i])
    shifts, F = step * cols, cols.shape[0]  # ε·[a | 1] per column
    hot = jnp.eye(C, dtype=z.dtype).reshape(C, *(1,) * (z.ndim - 1), C)

    def start(d):
        k, s = _direction(d, C * F)
        return z + s * (shifts[k % F][..., None] * hot[k // F]), jnp.zeros((), bool)

    return _Entry(i, i, C * F, start, lambda q: _from_columns(layer, p, q.reshape(C, F)))


_CHANNEL_LOCAL = (MaxPool, AvgPool, Activation, Dropout)  # channel c out from channel c in


def _linear_after(layers, params, tr, i):
    """``(local, at, move)`` when, past the channel-local layers ``local`` (pools,
    activations, dropout) after the Conv ``i``, the z of layer ``at`` is linear in their output
    (a Conv, or Flatten and Dense): ``move(c, Δ)`` is that z when channel ``c`` of its input
    moves by Δ. ``None`` otherwise."""
    j, local = i + 1, []
    while j < len(layers) and type(layers[j]) in _CHANNEL_LOCAL:
        local, j = [*local, j], j + 1
    nxt = layers[j] if j < len(layers) else None
    if type(nxt) is _PatchConv:  # z + W[:, c, :] ⋆ Δ, a one-channel convolution
        W = params[j]["W"]
        W_c = jnp.moveaxis(W, -2, 0).reshape(W.shape[-2], -1, W.shape[-1])  # (C, K, C_out)

        def into_conv(c, d):
            P = _patches(nxt, d[..., None])  # Δ's patches, (B, *out′, K)
            return tr.z[j] + jax.lax.dot_general(P, W_c[c], (((P.ndim - 1,), (0,)), ((), ())))

        return local, j, into_conv
    flat = type(nxt) is Flatten and nxt.activation == "identity" and j + 1 < len(layers)
    if flat and type(layers[j + 1]) is Dense:  # z + Σ_o Δ[·, o] W[:, o·C + c] (position o)
        j += 1
        W = params[j]["W"]
        W_c = jnp.moveaxis(W.reshape(W.shape[0], -1, tr.z[i].shape[-1]), -1, 0)  # (C, n, O)

        def into_dense(c, d):
            return tr.z[j] + d.reshape(d.shape[0], -1) @ W_c[c].T

        return local, j, into_dense
    return None


def _channel(v: Array) -> Array:
    """``(B, *spatial, C) -> (C, B, *spatial)``: channel ``c`` is ``v[c]``."""
    return jnp.moveaxis(v, -1, 0)


def _channel_entry(layers, params, state, masks, train, tr, i, step, linear) -> _Entry:
    """A top-level Conv before channel-local layers and a layer linear in their output
    (:func:`_linear_after`): as :func:`_shift_entry`, but only channel ``c`` of a⁽ⁱ⁾ moves, so
    only that channel runs through the channel-local layers, and the directions enter at the
    linear layer's z, moved by its linear map of that channel's Δ alone: C_in times cheaper
    than rerunning a convolution, and exact."""
    layer, p = layers[i], params[i]
    local, at, move = linear
    C, cols = _columns(layer, p, tr.a[i])
    shifts, F = step * cols, cols.shape[0]
    z_c = _channel(tr.z[i])

    def pieces_at(j, x, cache, z):  # kink indicators of layer j: its own, then its activation's
        act = layers[j].act
        return [*layers[j].regions(x, cache), *([] if act.region is None else [act.region(z)])]

    # at θ, channel by channel: layer i's pieces (a Conv's: its activation's), then each
    # channel-local layer's
    base = [[_channel(r) for r in pieces_at(j, tr.a[j], tr.cache[j], tr.z[j])] for j in [i, *local]]
    a_out = _channel(tr.a[local[-1] + 1 if local else i + 1])

    def start(d):
        k, s = _direction(d, C * F)
        c = k // F
        z = z_c[c] + s * shifts[k % F]  # channel c of z⁽ⁱ⁾
        pieces = [[] if layer.act.region is None else [layer.act.region(z)]]
        a = layer.act.f(z)
        for j in local:  # a channel-local layer on channel c alone
            mask = None if masks[j] is None else _channel(masks[j])[c][..., None]
            z, cache, _ = layers[j].forward({}, state[j], a[..., None], mask, train)
            pieces.append([r[..., 0] for r in pieces_at(j, a[..., None], cache, z)])
            a = layers[j].act.f(z[..., 0])
        crossed = jnp.zeros((), bool)
        for now, then in zip(pieces, base, strict=True):
            for piece, piece0 in zip(now, then, strict=True):
                crossed |= jnp.any(piece != piece0[c])
        return move(c, a - a_out[c]), crossed

    return _Entry(i, at, C * F, start, lambda q: _from_columns(layer, p, q.reshape(C, F)))


def _generic_entry(layers, params, state, masks, train, tr, i, step) -> _Entry:
    """Any layer: each entry of its ravelled params moved by ±ε, the layer rerun on its input
    (the whole batch: train-mode BatchNorm recomputes its statistics)."""
    layer = layers[i]
    flat, unravel = jax.flatten_util.ravel_pytree(params[i])
    base = layer.regions(tr.a[i], tr.cache[i])

    def start(d):
        k, s = _direction(d, flat.size)
        p = unravel(flat + s * (step * jax.nn.one_hot(k, flat.size, dtype=flat.dtype)))
        z, cache, _ = layer.forward(p, state[i], tr.a[i], masks[i], train)
        pieces = layer.regions(tr.a[i], cache)
        crossed = _differs([v[None] for v in pieces], base)
        return z, jnp.zeros((), bool) if crossed is None else crossed[0]

    return _Entry(i, i, flat.size, start, unravel, flat.size)


def _entries(layers, params, state, masks, train, tr, step) -> list[_Entry]:
    """One entry per layer with params: the column-shift fast paths for top-level Dense and
    Conv (exact kinds only: a subclass may compute something else), the generic one else."""
    out = []
    for i, layer in enumerate(layers):
        if not jax.tree.leaves(params[i]):
            continue
        linear = (
            _linear_after(layers, params, tr, i) if type(layer) in (Dense, _PatchConv) else None
        )
        if linear is not None:
            out.append(_channel_entry(layers, params, state, masks, train, tr, i, step, linear))
        elif type(layer) in (Dense, _PatchConv):
            out.append(_shift_entry(layers, params, tr, i, step))
        else:
            out.append(_generic_entry(layers, params, state, masks, train, tr, i, step))
    return sorted(out, key=lambda e: e.at)  # stable: the order directions join the batch


def _run(layers, params, state, masks, train, tr, t, loss_fn, entries, directions):
    """The loss of every direction and whether it crossed a kink: one forward pass over a batch
    of directions that grows at each layer, as the directions of that layer's params join.

    ``directions`` holds each entry's direction indices; the outputs are in entry order.
    """
    a, crossed = None, None
    for j, layer in enumerate(layers):
        z = []
        if a is not None:  # directions that joined earlier: through layer j as it is
            z_j, cache, _ = jax.vmap(
                lambda a, j=j: layers[j].forward(params[j], state[j], a, masks[j], train)
            )(a)
            pieces = jax.vmap(layer.regions)(a, cache)
            if pieces:
                crossed = crossed | _differs(pieces, layer.regions(tr.a[j], tr.cache[j]))
            z.append(z_j)
        for e, d in zip(entries, directions, strict=True):
            if e.at == j:
                z_e, crossed_e = jax.vmap(e.start)(d)
                z.append(z_e)
                crossed = crossed_e if crossed is None else jnp.concatenate([crossed, crossed_e])
        if not z:
            continue
        z = z[0] if len(z) == 1 else jnp.concatenate(z)
        if layer.act.region is not None:
            crossed = crossed | _differs([layer.act.region(z)], [layer.act.region(tr.z[j])])
        a = layer.act.f(z)
    loss = jax.vmap(lambda z, a: jnp.mean(loss_fn.value(z, a, t)))(z, a)
    return loss, crossed


def _finite_differences(params, model, x, y, l2, step, budget, state=None, masks=None, train=False):
    """Central differences of the loss for every parameter, and which ones straddle a kink.

    ``budget`` bounds the memory: the directions are split into equal steps of ``lax.map``
    (each layer's ``2n`` over all steps) so that the batch of directions at any layer holds at
    most ``budget`` values (see :func:`_steps`).

    Returns ``(fd, kinked)``: two lists like ``params``, of difference quotients and of bools.
    """
    layers, loss_fn = _by_patches(model.layers), model.loss_fn
    state = blank_state(model) if state is None else state
    masks = no_masks(layers) if masks is None else masks
    t = to_targets(loss_fn, y, model.output_size, x.dtype)
    tr = forward_seq(layers, params, state, x, masks, train)
    entries = _entries(layers, params, state, masks, train, tr, step)
    steps = _steps(
        entries,
        [x.shape[0] * _sizes([l], [s]) for l, s in zip(layers, model.in_shapes, strict=True)],
        budget,
    )
    sizes = [-(-2 * e.n // steps) for e in entries]  # each step: sizes[e] of e's directions

    def one(s):
        d = [
            (s * size + jnp.arange(size)) % (2 * e.n)
            for e, size in zip(entries, sizes, strict=True)
        ]
        return _run(layers, params, state, masks, train, tr, t, loss_fn, entries, d)

    if steps == 1:  # (a while loop costs compile time: about 2× for the MNIST-1D CNN)
        loss, crossed = jax.tree.map(lambda v: v[None], one(0))
    else:
        loss, crossed = jax.lax.map(one, jnp.arange(steps))  # each (steps, Σ sizes)
    fd, kinked = [{} for _ in layers], [{} for _ in layers]
    offset = 0
    for e, size in zip(entries, sizes, strict=True):
        L = loss[:, offset : offset + size].reshape(-1)[: 2 * e.n]  # directions 0 … 2n − 1
        c = crossed[:, offset : offset + size].reshape(-1)[: 2 * e.n]
        offset += size
        fd[e.layer] = e.unpack((L[: e.n] - L[e.n :]) / (2 * step))
        kinked[e.layer] = jax.tree.map(lambda v: v != 0, e.unpack((c[: e.n] | c[e.n :]) * 1.0))
        fd[e.layer] = _add_penalty(layers[e.layer], params[e.layer], fd[e.layer], l2, step)
    return fd, kinked


def _steps(entries, values, budget: int) -> int:
    """How many steps keep every layer's batch of directions under ``budget`` values: at layer
    ``j`` the directions joined so far each hold ``values[j]`` (its z for the whole batch,
    nested branches included), and a generic entry's directions their perturbed params."""
    joined, peak = 0, 0
    for j, v in enumerate(values):
        new = [e for e in entries if e.at == j]
        joined += sum(2 * e.n for e in new)
        peak = max(peak, joined * v + sum(2 * e.n * e.copies for e in new))
    return max(1, -(-peak // budget))


def _add_penalty(layer, p, fd, l2, step):
    """The L2 penalty's part of the quotients, on the leaves the layer decays (found by passing
    leaf numbers through its ``weights``)."""
    leaves, tree = jax.tree.flatten(p)
    decayed = set(layer.weights(jax.tree.unflatten(tree, list(range(len(leaves))))))
    fd_leaves = jax.tree.leaves(fd)
    return jax.tree.unflatten(
        tree,
        [q + _penalty_fd(v, l2, step) if k in decayed else q
         for k, (q, v) in enumerate(zip(fd_leaves, leaves, strict=True))],
    )  # fmt: skip


_finite_differences_jit = jax.jit(
    _finite_differences, static_argnames=("budget", "train"), compiler_options=_QUICK_COMPILE
)


def _sizes(layers, in_shapes) -> int:
    total = 0
    for layer, shape in zip(layers, in_shapes, strict=True):
        total += math.prod(layer.out_shape(shape))
        if layer.sublayers():
            total += _sizes(layer.sublayers(), layer.shapes(shape)[0])
    return total


def _batch_variances(layers, trace, prefix="") -> dict:
    """``{name: σ²}`` of every train-mode BatchNorm's input features (nested ones too)."""
    out = {}
    for i, layer in enumerate(layers):
        name = f"{prefix}layer {i + 1} ({layer.kind})"
        if layer.sublayers():
            out.update(_batch_variances(layer.sublayers(), trace.cache[i], f"{name} branch "))
        elif layer.couples_examples:
            a = trace.a[i]
            out[name] = jnp.var(a.reshape(-1, a.shape[-1]), axis=0)
    return out


# ----------------------------------------------------------------------------------------------
# The two programs a cross-check compiles: one per dtype, each computing everything it compares.


def _gradients(params, model, x, y, l2, compute_dtype, state, masks, train, *, manual):
    """The hand-written grads, δ and state (by ``manual``, :func:`fnbp.backprop`'s internals)
    and ``jax.grad``'s, in the working dtype."""
    result = manual(params, model, x, y, l2, compute_dtype, state, masks, train)
    _, ref_state, ref_grads, ref_deltas = _reference(
        params, model, x, y, l2, compute_dtype, state, masks, train
    )
    mine = (result.grads, _top(result.deltas), result.state)
    ref = (ref_grads, ref_deltas, ref_state if isinstance(model, Net) else None)
    return result.loss, mine, ref


def _gradients64(params, model, x, y, l2, step, state, masks, train, *, manual, budget):
    """The same in float64, with the loss, finite differences unless ``budget`` is 0, and the
    batch variance of every train-mode BatchNorm's features."""
    loss, mine, ref = _gradients(params, model, x, y, l2, None, state, masks, train, manual=manual)
    fd = (
        _finite_differences(params, model, x, y, l2, step, budget, state, masks, train)
        if budget
        else None
    )
    variances = {}
    if budget and train and model.couples_examples:
        tr = run(params, model, x, state=state, masks=masks, train=True)
        variances = _batch_variances(model.layers, tr)
    return loss, mine, ref, fd, variances


_gradients_jit = jax.jit(
    _gradients,
    static_argnames=("compute_dtype", "train", "manual"),
    compiler_options=_QUICK_COMPILE,
)
_gradients64_jit = jax.jit(
    _gradients64, static_argnames=("train", "manual", "budget"), compiler_options=_QUICK_COMPILE
)


# ----------------------------------------------------------------------------------------------
# The report.


@dataclasses.dataclass(frozen=True)
class LeafCheck:
    """The comparison for one leaf (``W`` or ``b`` of one layer, ``gamma`` of a BatchNorm, …).

    ``*_error`` fields are relative errors ‖g_manual − g_ref‖/‖g_ref‖ (``nan`` when not computed;
    ``inf`` when ‖g_ref‖ = 0 but the gradients differ).
    """

    name: str
    shape: tuple[int, ...]
    grad_norm: float
    autodiff_error: float  # in the parameters' dtype
    autodiff64_error: float  # in float64
    fd_error: float  # against finite differences, kinks excluded (float64)
    kinks: int  # parameters whose ±ε step crosses a kink (excluded from fd_error)
    passed: bool


@dataclasses.dataclass(frozen=True)
class SignalCheck:
    """The comparison of one layer's δ = ∂L/∂z (against ``jax.grad`` of zero offsets) or of one
    leaf of its new state (against the reference forward): relative errors in the working
    dtype and in float64."""

    name: str
    shape: tuple[int, ...]
    norm: float
    autodiff_error: float
    autodiff64_error: float
    passed: bool


@dataclasses.dataclass(frozen=True)
class CrosscheckReport:
    """Result of :func:`crosscheck`. ``str(report)`` is a readable table.

    ``broken_layer`` names the first broken local rule (``"layer 3 (batch_norm)"``, or
    ``"loss (mse)"`` for the output δ), ``broken_rule`` says which part of it; both ``None``
    when every check passed.
    """

    leaves: tuple[LeafCheck, ...]
    model: MLP | Net
    batch: int
    dtype: str
    rtol_autodiff: float
    rtol_autodiff64: float
    rtol_finite_differences: float
    fd_step: float
    fd_noise: float  # per-entry rounding floor of the finite differences
    finite_differences: bool
    passed: bool
    compute_dtype: str | None = None  # mixed precision: the dtype the first comparison ran in
    deltas: tuple[SignalCheck, ...] = ()  # one per top-level layer
    state: tuple[SignalCheck, ...] = ()  # one per state leaf (nets with BatchNorm)
    train: bool = False
    broken_layer: str | None = None
    broken_rule: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def kinks(self) -> int:
        return sum(leaf.kinks for leaf in self.leaves)

    def _header(self, working: str) -> str:
        m = self.model
        dtype = self.dtype if self.compute_dtype is None else f"{self.dtype} params, {working}"
        if isinstance(m, MLP):
            return (
                f"fnbp crosscheck: MLP {'-'.join(map(str, m.sizes))}, {m.activation}, {m.loss}, "
                f"batch {self.batch}, {dtype}"
            )
        return (
            f"fnbp crosscheck: Net {m.input_shape} -> {m.output_size}: {_kinds(m.layers)}; "
            f"{m.loss}, batch {self.batch}, {dtype}, {'train' if self.train else 'eval'} mode"
        )

    def __str__(self) -> str:
        working = self.dtype if self.compute_dtype is None else f"{self.compute_dtype} compute"
        label = f"vs jax.grad ({working})"
        width = max(24, len(label))
        net = isinstance(self.model, Net)
        rows = [*self.leaves, *self.deltas, *self.state] if net else self.leaves
        name_w = max([10] + [len(r.name) for r in rows])
        shape_w = max([12] + [len(str(r.shape)) for r in rows])
        cols = f"{'leaf':<{name_w}} {'shape':<{shape_w}} {'‖grad‖':>9}  {label:>{width}}"
        cols += f"  {'(float64)':>9}"
        if self.finite_differences:
            cols += f"  {'vs finite diff (float64)':>24}  {'kinks':>6}"
        lines = [self._header(working), cols, "-" * len(cols)]

        def row(r, norm):
            text = f"{r.name:<{name_w}} {str(r.shape):<{shape_w}} {norm:>9.2e}"
            return text + f"  {r.autodiff_error:>{width}.1e}  {r.autodiff64_error:>9.1e}"

        for leaf in self.leaves:
            text = row(leaf, leaf.grad_norm)
            if self.finite_differences:
                text += f"  {leaf.fd_error:>24.1e}  {leaf.kinks:>6d}"
            lines.append(text + ("" if leaf.passed else "   FAIL"))
        if net:
            for title, checks in (
                ("δ = ∂L/∂z of each layer, vs jax.grad of zero offsets added to z", self.deltas),
                ("new state, vs the reference forward pass", self.state),
            ):
                if checks:
                    lines += ["-" * len(cols), title]
                    lines += [row(c, c.norm) + ("" if c.passed else "   FAIL") for c in checks]
        lines.append("-" * len(cols))
        tol = (
            f"rtol: jax.grad {self.rtol_autodiff:g} ({working}), {self.rtol_autodiff64:g} (float64)"
        )
        if self.finite_differences:
            tol += (
                f", finite differences {self.rtol_finite_differences:g} + {self.fd_noise:.0e}·√n "
                f"(step {self.fd_step:g}; "
                f"{self.kinks} of {self.model.num_params} parameters straddle a kink and are excluded)"
            )
        lines.append(tol)
        lines += [f"warning: {w}" for w in self.warnings]
        if self.broken_layer is not None:
            lines.append(f"first broken local rule: {self.broken_layer}, {self.broken_rule}")
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def _kinds(layers) -> str:
    return ", ".join(
        f"{layer.kind}[{_kinds(layer.sublayers())}]" if layer.sublayers() else layer.kind
        for layer in layers
    )


def _errors(manual, ref, rtol, mask=None, atol_entry=0.0, floors=None):
    """Per-leaf (relative error, passed) of manual against ref, over the entries in mask.

    A leaf passes when ‖Δ‖ ≤ rtol·max(‖g_ref‖, floor·‖g_ref_all‖) + ‖atol‖, where ``floor`` is
    :data:`_FLOOR` (or the leaf's entry of ``floors``) and ``atol`` is ``atol_entry`` for every
    entry (so ‖atol‖ = atol_entry·√entries), or, when ``atol_entry`` is a tree like ``ref``,
    each entry's own tolerance.
    """
    leaves_m, leaves_r = jax.tree.leaves(manual), jax.tree.leaves(ref)
    masks = jax.tree.leaves(mask) if mask is not None else [None] * len(leaves_m)
    atols = [atol_entry] * len(leaves_r) if np.isscalar(atol_entry) else jax.tree.leaves(atol_entry)
    floors = [_FLOOR] * len(leaves_r) if floors is None else floors
    diffs, norms, slack = [], [], []
    for gm, gr, keep, atol in zip(leaves_m, leaves_r, masks, atols, strict=True):
        gm, gr = np.asarray(gm, np.float64), np.asarray(gr, np.float64)
        atol = np.broadcast_to(np.asarray(atol, np.float64), gr.shape)
        if keep is not None:
            gm, gr, atol = gm[np.asarray(keep)], gr[np.asarray(keep)], atol[np.asarray(keep)]
        diffs.append(float(np.linalg.norm(gm - gr)))
        norms.append(float(np.linalg.norm(gr)))
        slack.append(float(np.linalg.norm(atol)))
    total = math.sqrt(sum(n * n for n in norms))
    out = []
    for d, n, a, floor in zip(diffs, norms, slack, floors, strict=True):
        rel = d / n if n > 0 else (0.0 if d == 0 else math.inf)
        out.append((rel, bool(d <= rtol * max(n, floor * total) + a)))
    return out


def _exact_zeros(ref64) -> list[float]:
    """The floor of each leaf in the working-dtype comparison: the whole gradient's norm for a
    leaf that is 0 in exact arithmetic (its float64 gradient under :data:`_EXACT_ZERO` of the
    whole: the bias of a layer before a train-mode BatchNorm, a sum of terms that cancel), whose
    low-precision value is rounding noise on the scale of those terms; :data:`_FLOOR` else."""
    norms = [float(np.linalg.norm(np.asarray(g, np.float64))) for g in jax.tree.leaves(ref64)]
    total = math.sqrt(sum(n * n for n in norms))
    return [1.0 if n <= _EXACT_ZERO * total else _FLOOR for n in norms]


def _layer_name(model, i: int) -> str:
    return f"layer {i + 1} ({model.layers[i].kind})"


def _leaf_names(model, params) -> list[str]:
    """``layer 1 W`` for an MLP; for a net the tree path, ``layer 3 (batch_norm) gamma``,
    ``layer 5 (residual) branch.2.W`` (branch layers 1-based, like top-level ones)."""
    if isinstance(model, MLP):
        return [f"layer {l} {k}" for l in range(1, model.num_layers + 1) for k in ("W", "b")]
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        parts = [str(k.key) if hasattr(k, "key") else str(k.idx + 1) for k in path[1:]]
        names.append(f"{_layer_name(model, path[0].idx)} {'.'.join(parts)}")
    return names


def _leaf_layers(params) -> list[int]:
    """The top-level layer of each leaf of ``params``, in leaf order."""
    return [path[0].idx for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _broken(model, leaves, leaf_layers, deltas, state, state_layers):
    """``(broken_layer, broken_rule)``: the first failing local rule from the output down."""
    for i in reversed(range(len(model.layers))):
        if not deltas[i].passed:
            if i == len(model.layers) - 1:
                return f"loss ({model.loss})", "its output δ (or the last activation's g′)"
            below = model.layers[i]
            return (
                _layer_name(model, i + 1),
                f"its backward rule ∂L/∂x (or f′ = {below.activation}′ of {_layer_name(model, i)})",
            )
        bad = [leaf.name for leaf, j in zip(leaves, leaf_layers, strict=True)
               if j == i and not leaf.passed]  # fmt: skip
        if bad:
            return _layer_name(model, i), "its parameter gradient: " + ", ".join(bad)
        bad = [c.name for c, j in zip(state, state_layers, strict=True) if j == i and not c.passed]
        if bad:
            return _layer_name(model, i), "its new state: " + ", ".join(bad)
    return None, None


def _signal_checks(names, manual, ref, manual64, ref64, rtol):
    """One :class:`SignalCheck` per leaf of ``ref`` (δ per layer, or state leaves)."""
    err, err64 = _errors(manual, ref, rtol), _errors(manual64, ref64, RTOL_AUTODIFF["float64"])
    return tuple(
        SignalCheck(
            name=name,
            shape=tuple(np.shape(r)),
            norm=float(np.linalg.norm(np.asarray(r, np.float64))),
            autodiff_error=e[0],
            autodiff64_error=e64[0],
            passed=e[1] and e64[1],
        )
        for name, r, e, e64 in zip(names, jax.tree.leaves(ref64), err, err64, strict=True)
    )


def _state_names(model, state) -> tuple[list[str], list[int]]:
    """``layer 3 (batch_norm) mean`` for every state leaf, and its top-level layer."""
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]:
        parts = [str(k.key) if hasattr(k, "key") else str(k.idx + 1) for k in path[1:]]
        names.append(f"{_layer_name(model, path[0].idx)} {'.'.join(parts)}")
    return names, _leaf_layers(state)


def _float64(tree):
    """float64 numpy copies of every floating leaf (nothing is silently truncated back to
    float32 outside x64); other leaves (masks, integer labels) as they are."""
    return jax.tree.map(
        lambda v: np.asarray(v, np.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v, tree
    )


def _masks_and_state(model, key, batch: int, train: bool, state):
    """``(masks, state)``: the dropout masks, drawn once from ``key`` and shared by every
    computation compared, and the state (blank for a net that keeps none, ``None`` for an
    MLP)."""
    dropout = train and key is not None and model.find(lambda l: getattr(l, "rate", 0) > 0)
    masks = _draw_masks_jit(model, key, batch, train) if dropout else no_masks(model.layers)
    if state is None:
        state = blank_state(model) if isinstance(model, Net) else None
    return masks, state


def _labels64(y):
    """``y`` on the host: integer class indices as they are, targets in float64."""
    return np.asarray(y) if jnp.issubdtype(y.dtype, jnp.integer) else np.asarray(y, np.float64)


def _fd_noise(loss, step: float) -> float:
    """The rounding floor of one float64 difference quotient, ``10·eps₆₄·max(|L|, 1)/ε``."""
    return 10 * np.finfo(np.float64).eps * max(abs(float(loss)), 1.0) / step


def _variance_warnings(variances: dict, step: float) -> tuple[str, ...]:
    """A warning for each train-mode BatchNorm with features of batch variance under
    :data:`_TINY_VARIANCE`·ε (``variances`` from :func:`_batch_variances`)."""
    return tuple(
        f"{name}: {int(np.sum(var < _TINY_VARIANCE * step))} of {var.size} features have "
        f"batch variance below {_TINY_VARIANCE * step:g} (= {_TINY_VARIANCE}·ε; smallest "
        f"{float(np.min(var)):.1e}): finite differences are inaccurate there"
        for name, var in variances.items()
        if np.any(var < _TINY_VARIANCE * step)
    )


def crosscheck(
    params: Params,
    model,
    x: Array,
    y: Array,
    *,
    l2=0.0,
    finite_differences: bool = True,
    fd_step: float = FD_STEP,
    compute_dtype=None,
    state=None,
    key=None,
    train=None,
) -> CrosscheckReport:
    """Compare the hand-written gradients with ``jax.grad`` and with finite differences.

    Arguments:
        params, model, x, y, l2: as in :func:`fnbp.backprop` (an :class:`fnbp.MLP` or
            :class:`fnbp.Net`).
        finite_differences: also compare with central differences of every parameter
            (float64). Their cost is one rerun of the net from layer ``l`` on per parameter of
            layer ``l``: seconds for ~10⁴ parameters, impractical for ~10⁶.
        fd_step: the step ε.
        compute_dtype: compare in mixed precision (see :func:`fnbp.backprop`): the first
            comparison is then the mixed-precision backprop against ``jax.grad`` of the same
            mixed-precision loss, at the compute dtype's tolerance. The float64 and
            finite-difference comparisons check the math and do not change.
        state, key, train: as in :func:`fnbp.backprop`: a net with BatchNorm or Dropout needs
            ``train``, BatchNorm needs ``state``, train-mode dropout a ``key``. The masks are
            drawn once from ``key`` and shared by every computation compared.

    Returns:
        A :class:`CrosscheckReport`; ``.passed`` is true when every leaf, every layer's δ and
        every state leaf are within tolerance in every comparison (see the module docstring
        for the tolerances); ``.broken_layer`` names the first broken rule otherwise.

    Raises:
        ValueError, TypeError: as :func:`fnbp.backprop` does, and for a bad ``fd_step``.
    """
    check_params(params, model)
    check_inputs(model, x, y)
    check_l2(l2)
    train = check_mode(model, state=state, train=train, key=key, what="crosscheck")
    if not (isinstance(fd_step, (int, float)) and 0 < fd_step < 1):
        raise ValueError(f"fd_step must be a number in (0, 1), got {fd_step!r}")
    compute_dtype = check_compute_dtype(compute_dtype)
    dtype = jnp.result_type(*jax.tree.leaves(params), x)
    dtype_name = jnp.dtype(dtype).name
    rtol = RTOL_AUTODIFF.get(jnp.dtype(compute_dtype or dtype).name, 1e-2)
    batch = int(x.shape[0])
    masks, state = _masks_and_state(model, key, batch, train, state)

    # float64 copies; the float64 program computes everything, with finite differences
    params64, x64, state64 = _float64((params, x, state))
    y64 = _labels64(y)
    with jax.enable_x64(True):
        loss64, mine64, ref64, fd, variances = jax.device_get(
            _gradients64_jit(
                params64, model, x64, y64, float(l2), float(fd_step), state64, masks,
                train=train, manual=_backprop_jit, budget=FD_VALUES if finite_differences else 0,
            )
        )  # fmt: skip
    # The working dtype's program (the same as the float64 one when the params are float64).
    if dtype_name == "float64" and compute_dtype is None:
        mine, ref = mine64, ref64
    else:
        _, mine, ref = jax.device_get(
            _gradients_jit(
                params, model, x, y, l2, compute_dtype, state, masks,
                train=train, manual=_backprop_jit,
            )
        )  # fmt: skip
    ad_err = _errors(mine[0], ref[0], rtol, floors=_exact_zeros(ref64[0]))
    ad64_err = _errors(mine64[0], ref64[0], RTOL_AUTODIFF["float64"])
    fd_noise = _fd_noise(loss64, fd_step)
    if finite_differences:
        fd, kinked = fd
        keep = jax.tree.map(np.logical_not, kinked)
        fd_err = _errors(mine64[0], fd, RTOL_FINITE_DIFFERENCES, keep, fd_noise)
        kinks = [int(np.sum(k)) for k in jax.tree.leaves(kinked)]
    else:
        fd_err = [(math.nan, True)] * len(ad_err)
        kinks = [0] * len(ad_err)

    leaves = tuple(
        LeafCheck(
            name=name,
            shape=tuple(g.shape),
            grad_norm=float(np.linalg.norm(np.asarray(g, np.float64))),
            autodiff_error=ad_err[i][0],
            autodiff64_error=ad64_err[i][0],
            fd_error=fd_err[i][0],
            kinks=kinks[i],
            passed=ad_err[i][1] and ad64_err[i][1] and fd_err[i][1],
        )
        for i, (name, g) in enumerate(
            zip(_leaf_names(model, params), jax.tree.leaves(ref64[0]), strict=True)
        )
    )
    names = [_layer_name(model, i) for i in range(len(model.layers))]
    deltas = _signal_checks(names, mine[1], ref[1], mine64[1], ref64[1], rtol)
    states, state_layers = (), []
    if isinstance(model, Net) and jax.tree.leaves(state):
        state_names, state_layers = _state_names(model, state)
        states = _signal_checks(state_names, mine[2], ref[2], mine64[2], ref64[2], rtol)
    warnings = _variance_warnings(variances, fd_step) if finite_differences else ()
    passed = all(c.passed for c in (*leaves, *deltas, *states))
    broken = (None, None)
    if not passed:
        broken = _broken(model, leaves, _leaf_layers(params), deltas, states, state_layers)
    return CrosscheckReport(
        leaves=leaves,
        model=model,
        batch=batch,
        dtype=dtype_name,
        rtol_autodiff=rtol,
        rtol_autodiff64=RTOL_AUTODIFF["float64"],
        rtol_finite_differences=RTOL_FINITE_DIFFERENCES,
        fd_step=float(fd_step),
        fd_noise=float(fd_noise),
        finite_differences=finite_differences,
        passed=passed,
        compute_dtype=None if compute_dtype is None else compute_dtype.name,
        deltas=deltas,
        state=states,
        train=train,
        broken_layer=broken[0],
        broken_rule=broken[1],
        warnings=warnings,
    )
