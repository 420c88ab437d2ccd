"""A fast gradient check that names the broken layer: directional derivatives of every
parameter block and of every layer's error signal, three ways.

:func:`fnbp.crosscheck` compares every entry of every gradient with a finite difference: ``2n``
reruns of the tail of the net for ``n`` parameters, seconds for 10⁴ parameters and out of
reach for 10⁶. :func:`gradcheck` (in the spirit of PyTorch's ``gradcheck(fast_mode=True)``)
compares projections instead. For every parameter **block** ``b`` separately (each leaf of each
layer: ``W``, ``b``, ``gamma``, ``beta``, ``alpha``, ``P``, those of residual branches
included) it draws ``K`` random unit directions ``uₖ`` (Gaussian, normalised over the block,
zero elsewhere) and compares the directional derivative three ways, in float64:

    ⟨g_manual_b, uₖ⟩        the hand-written gradient (:func:`fnbp.backprop`), projected
    ⟨g_jax_b, uₖ⟩           ``jax.grad`` of the same forward pass, projected
    (L(θ + εuₖ) − L(θ − εuₖ)) / 2ε     a central finite difference along that block only

and, for the error signal δ⁽ⁱ⁾ = ∂L/∂z⁽ⁱ⁾ of every top-level layer ``i``, ``⟨δ_manual, vₖ⟩``
for ``K`` random unit ``vₖ`` of z⁽ⁱ⁾'s shape ``(batch, *out)`` against ``jax.grad`` with
respect to an offset added to z⁽ⁱ⁾ and against the finite difference of the loss along
``±εvₖ`` added to z⁽ⁱ⁾ (the ``offsets`` of :func:`fnbp.engine.forward_seq`). The ``K``
relative errors ‖m − r‖/‖r‖ of a block (over its ``K`` directions) say by how much its
gradient is off: a gradient scaled by 1.01 gives exactly 0.01.

Why per block: a single direction over all parameters dilutes a bug in a small block. The 10
output biases of 784-16-16-10 hold √(10/13002) ≈ 3% of a unit direction's norm: their
gradient scaled by 1.01 moves the global directional derivative by only 3e-4 relative (seeds
0–2: 2.9e-4, 4.3e-4, 3.0e-4), under PyTorch's default rtol of 1e-3, while their own
directions measure 1.00e-2 (``per_block=False`` draws the global direction, for comparison;
``tests/test_gradcheck.py`` checks both). PyTorch's fast mode draws one direction per input
tensor; here each block gets ``K``, and each layer's δ is checked as well.

Naming: a block is named as errors name its layer, ``layer 2 (residual) branch layer 1
(conv)``, with its leaf (``W``). :attr:`GradcheckReport.broken_layer` names the first broken
local rule from the output down, as :func:`fnbp.crosscheck` does: the first layer ``i`` whose
δ disagrees means the rule above it (``∂L/∂x`` of layer ``i + 1``, or ``f′`` of layer ``i``)
is wrong; if every δ agrees but a block of layer ``i`` does not, its parameter formula is. δ is
checked for top-level layers only: a wrong ``∂L/∂x`` inside a residual branch shows as wrong
grads of the branch layers before it (named as the block's rule, with a note that a later
branch layer's ∂L/∂x may be at fault) and a wrong δ below the block.

Everything is compared in float64 (the math); the working dtype and mixed precision are the
exhaustive check's (:func:`fnbp.crosscheck`).

Tolerances (float64, the same as the exhaustive check's, relative to the norm of the ``K``
reference values): 1e-10 against ``jax.grad``; 1e-6 against finite differences, plus the
rounding floor ``fd_noise`` = 10·eps₆₄·max(|L|, 1)/ε per quotient. A block (or δ) whose
reference values are (nearly) zero is judged against 1e-3 × the norm of all blocks' (or all
δs'). Kinks are handled as the exhaustive check handles them: a direction whose ±ε step moves
any piecewise-linear unit (ReLU-family activations, max-pool winners, inside residual
branches too; :func:`fnbp.engine.trace_regions`) to another linear piece straddles a kink; it
is left out of the finite-difference comparison and counted in ``kinks``. Train-mode
BatchNorm features of tiny batch variance are warned about.

Cost: one compiled program runs the hand-written pass, ``jax.grad`` and ``2K`` full forward
passes per block and per layer (a ``lax.map`` over them, in steps that hold at most
:data:`fnbp.crosscheck.FD_VALUES` float64 values), at LLVM -O0 since it runs once: the number
of forwards grows with the number of blocks and layers, not of parameters.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fnbp.crosscheck import (
    _QUICK_COMPILE,
    FD_STEP,
    FD_VALUES,
    RTOL_AUTODIFF,
    RTOL_FINITE_DIFFERENCES,
    _backprop_jit,
    _batch_variances,
    _broken,
    _by_patches,
    _errors,
    _fd_noise,
    _float64,
    _kinds,
    _labels64,
    _layer_name,
    _leaf_layers,
    _masks_and_state,
    _reference,
    _sizes,
    _top,
    _variance_warnings,
)
from fnbp.engine import trace_regions
from fnbp.losses import to_targets
from fnbp.model import (
    MLP,
    Params,
    check_inputs,
    check_l2,
    check_mode,
    check_params,
    l2_penalty,
    output_for_loss,
    run,
)
from fnbp.net import Net

Array = jax.Array

DIRECTIONS = 4  # random directions per block and per layer


def _block_names(model, params) -> list[tuple[str, str]]:
    """``(layer, leaf)`` of every leaf of ``params``, in leaf order, the layer named as errors
    name it: ``("layer 2 (residual) branch layer 1 (conv)", "W")``."""
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        layers, layer, leaf = model.layers, "", ""
        for k in path:
            if isinstance(k, jax.tree_util.SequenceKey):
                layer += f"layer {k.idx + 1} ({layers[k.idx].kind})"
                layers = layers[k.idx].sublayers()
            elif k.key == "branch":
                layer += " branch "
            else:
                leaf = str(k.key)
        names.append((layer, leaf))
    return names


def _directions(leaves, shapes_z, k: int, per_block: bool, seed: int):
    """``(U, V)``, drawn on the host (NumPy: no random-number program to compile). ``U[j]``:
    ``(K, *leaf j)``, Gaussian, each direction a unit vector over its block (the leaf, or all
    leaves together when not ``per_block``); ``V[i]``: ``(K, *z⁽ⁱ⁾)``, each a unit vector."""
    rng = np.random.default_rng(seed)
    U = [rng.standard_normal((k, *np.shape(v))) for v in leaves]
    V = [rng.standard_normal((k, *shape)) for shape in shapes_z]

    def sq(u):
        return np.sum(np.square(u.reshape(k, -1)), axis=1)

    if per_block:
        U = [u / np.sqrt(sq(u)).reshape(k, *(1,) * (u.ndim - 1)) for u in U]
    else:
        norm = np.sqrt(sum(sq(u) for u in U))
        U = [u / norm.reshape(k, *(1,) * (u.ndim - 1)) for u in U]
    V = [v / np.sqrt(sq(v)).reshape(k, *(1,) * (v.ndim - 1)) for v in V]
    return U, V


def _lanes(n_blocks: int, n_layers: int, k: int) -> np.ndarray:
    """One row ``(block, layer, direction, sign)`` per loss the finite differences need:
    ``+`` then ``−`` for each direction of each block (layer −1), then of each layer's z
    (block −1)."""
    rows = [(b, -1, d, s) for b in range(n_blocks) for d in range(k) for s in (1, -1)]
    rows += [(-1, i, d, s) for i in range(n_layers) for d in range(k) for s in (1, -1)]
    return np.asarray(rows, np.int32)


def _gradcheck64(params, model, x, y, l2, step, state, masks, U, V, train, *, manual, per_block,
                 budget):  # fmt: skip
    """Everything compared, in float64: ``(loss, blocks, deltas, variances)``; ``blocks`` and
    ``deltas`` are each ``(manual, jax.grad, finite differences, kinked)``, arrays of shape
    ``(blocks or layers, K)``."""
    result = manual(params, model, x, y, l2, None, state, masks, train)
    _, _, ref_grads, ref_deltas = _reference(params, model, x, y, l2, None, state, masks, train)
    mine_deltas = _top(result.deltas)
    leaves, tree = jax.tree.flatten(params)
    n_blocks, k = len(leaves) if per_block else 1, V[0].shape[0]

    def along_blocks(grads):  # ⟨g_b, u_bk⟩: (blocks, K)
        dots = jnp.stack([jnp.tensordot(u, g, g.ndim) for u, g in
                          zip(U, jax.tree.leaves(grads), strict=True)])  # fmt: skip
        return dots if per_block else jnp.sum(dots, axis=0, keepdims=True)

    def along_layers(deltas):  # ⟨δ⁽ⁱ⁾, v_ik⟩: (layers, K)
        return jnp.stack([jnp.tensordot(v, d, d.ndim) for v, d in zip(V, deltas, strict=True)])

    # the forward passes of the finite differences: every Conv as one matmul of its patches
    # (float64 convolutions are plain loops on XLA's CPU backend), the loss from their trace
    fd_model = (
        model
        if isinstance(model, MLP)
        else dataclasses.replace(model, layers=_by_patches(model.layers))
    )
    t = to_targets(model.loss_fn, y, model.output_size, x.dtype)
    tr0 = run(params, fd_model, x, state=state, masks=masks, train=train)
    base = trace_regions(fd_model.layers, tr0)

    def loss_at(lane):  # L at θ ± εu_bk (block b), or with ±εv_ik added to z⁽ⁱ⁾ (layer i)
        b, i, d, s = lane[0], lane[1], lane[2], lane[3]
        # the step of each block's and each layer's K directions: ±ε at (b, d) or (i, d), else 0
        # (one-hot weights: a contraction per leaf, where an index would gather)
        one = s * step * (jnp.arange(k) == d)
        by_block = (jnp.arange(n_blocks) == b)[:, None] * one[None, :]
        by_layer = (jnp.arange(len(V)) == i)[:, None] * one[None, :]
        p = jax.tree.unflatten(tree, [
            v + jnp.tensordot(by_block[j if per_block else 0], u, 1)
            for j, (v, u) in enumerate(zip(leaves, U, strict=True))
        ])  # fmt: skip
        offsets = [jnp.tensordot(by_layer[j], v, 1) for j, v in enumerate(V)]
        tr = run(p, fd_model, x, state=state, masks=masks, train=train, offsets=offsets)
        z_out, a_out = output_for_loss(p, tr.z[-1], tr.a[-1])
        loss = jnp.mean(model.loss_fn.value(z_out, a_out, t)) + l2_penalty(p, model, l2)
        crossed = jnp.zeros((), bool)  # any unit on another linear piece than at θ: a kink
        for piece, piece0 in zip(trace_regions(fd_model.layers, tr), base, strict=True):
            crossed |= jnp.any(piece != piece0)
        return loss, crossed

    lanes = _lanes(n_blocks, len(model.layers), k)
    per_lane = 2 * sum(v.size for v in leaves) + x.shape[0] * _sizes(model.layers, model.in_shapes)
    batch = max(1, budget // per_lane)
    if batch >= len(lanes):
        losses, crossed = jax.vmap(loss_at)(lanes)
    else:
        losses, crossed = jax.lax.map(loss_at, lanes, batch_size=batch)
    losses, crossed = losses.reshape(-1, k, 2), crossed.reshape(-1, k, 2)
    fd = (losses[..., 0] - losses[..., 1]) / (2 * step)
    kinked = crossed[..., 0] | crossed[..., 1]
    variances = {}
    if train and model.couples_examples:
        variances = _batch_variances(fd_model.layers, tr0)
    blocks = (along_blocks(result.grads), along_blocks(ref_grads), fd[:n_blocks], kinked[:n_blocks])
    deltas = (along_layers(mine_deltas), along_layers(ref_deltas), fd[n_blocks:], kinked[n_blocks:])
    return result.loss, blocks, deltas, variances


_gradcheck64_jit = jax.jit(
    _gradcheck64,
    static_argnames=("train", "manual", "per_block", "budget"),
    compiler_options=_QUICK_COMPILE,
)


@dataclasses.dataclass(frozen=True)
class DirectionCheck:
    """The comparison of one parameter block (a leaf of a layer) or one layer's δ along ``K``
    random directions.

    ``slope`` is the root mean square of ``jax.grad``'s directional derivatives; ``*_error``
    fields are relative errors ‖m − r‖/‖r‖ over the directions of the hand-written ``m``
    against the reference ``r`` (``nan`` where every direction straddles a kink, ``inf`` where
    ‖r‖ = 0 but they differ); ``kinks`` counts the directions left out of ``fd_error``.
    """

    layer: str  # "layer 2 (residual) branch layer 1 (conv)"; "all parameters" (per_block=False)
    leaf: str  # "W", "b", "gamma", …, or "δ" for the layer's error signal
    shape: tuple[int, ...]
    slope: float
    autodiff_error: float
    fd_error: float
    kinks: int
    passed: bool

    @property
    def name(self) -> str:
        return f"{self.layer} {self.leaf}" if self.leaf else self.layer


@dataclasses.dataclass(frozen=True)
class GradcheckReport:
    """Result of :func:`gradcheck`. ``str(report)`` is a readable table.

    ``passed`` when every block and every δ agree in both comparisons; ``failures`` lists the
    checks that do not; ``broken_layer`` and ``broken_rule`` name the first broken local rule
    from the output down (as :class:`fnbp.CrosscheckReport`'s do), ``None`` when all passed.
    """

    blocks: tuple[DirectionCheck, ...]
    deltas: tuple[DirectionCheck, ...]  # one per top-level layer
    model: MLP | Net
    batch: int
    train: bool
    directions: int
    seed: int
    per_block: bool
    fd_step: float
    fd_noise: float
    rtol_autodiff: float
    rtol_finite_differences: float
    passed: bool
    broken_layer: str | None = None
    broken_rule: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def failures(self) -> tuple[DirectionCheck, ...]:
        return tuple(c for c in (*self.blocks, *self.deltas) if not c.passed)

    @property
    def kinks(self) -> int:
        """Directions (of all blocks and layers) left out of the finite-difference comparison."""
        return sum(c.kinks for c in (*self.blocks, *self.deltas))

    def _header(self) -> str:
        m = self.model
        if isinstance(m, MLP):
            net = f"MLP {'-'.join(map(str, m.sizes))}, {m.activation}, {m.loss}"
        else:
            net = f"Net {m.input_shape} -> {m.output_size}: {_kinds(m.layers)}; {m.loss}"
        per = "per block" if self.per_block else "over all parameters"
        return (
            f"fnbp gradcheck: {net}, batch {self.batch}, float64, "
            f"{'train' if self.train else 'eval'} mode; {self.directions} random directions "
            f"{per} and per layer's z (seed {self.seed})"
        )

    def __str__(self) -> str:
        rows = [*self.blocks, *self.deltas]
        layer_w = max([5] + [len(r.layer) for r in rows])
        leaf_w = max([4] + [len(r.leaf) for r in rows])
        shape_w = max([5] + [len(str(r.shape)) for r in rows])
        cols = (
            f"{'layer':<{layer_w}} {'leaf':<{leaf_w}} {'shape':<{shape_w}} {'rms ⟨g,u⟩':>10}"
            f"  {'vs jax.grad':>11}  {'vs finite diff':>14}  {'kinks':>5}"
        )
        lines = [self._header(), cols, "-" * len(cols)]

        def row(r):
            text = (
                f"{r.layer:<{layer_w}} {r.leaf:<{leaf_w}} {str(r.shape):<{shape_w}} "
                f"{r.slope:>10.2e}  {r.autodiff_error:>11.1e}  {r.fd_error:>14.1e}  {r.kinks:>5d}"
            )
            return text + ("" if r.passed else "   FAIL")

        lines += [row(r) for r in self.blocks]
        lines += ["-" * len(cols), "δ = ∂L/∂z of each layer, along random perturbations v of z"]
        lines += [row(r) for r in self.deltas]
        lines.append("-" * len(cols))
        lines.append(
            f"rtol: jax.grad {self.rtol_autodiff:g}, finite differences "
            f"{self.rtol_finite_differences:g} + {self.fd_noise:.0e}·√K (step {self.fd_step:g}; "
            f"{self.kinks} directions straddle a kink and are excluded)"
        )
        lines += [f"warning: {w}" for w in self.warnings]
        for c in self.failures:
            lines.append(
                f"disagrees: {c.name}: relative error {c.autodiff_error:.1e} vs jax.grad, "
                f"{c.fd_error:.1e} vs finite differences"
            )
        if self.broken_layer is not None:
            lines.append(f"first broken local rule: {self.broken_layer}, {self.broken_rule}")
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def _checks(names, shapes, mine, ref, fd, kinked, fd_noise) -> tuple[DirectionCheck, ...]:
    """One :class:`DirectionCheck` per row of the ``(rows, K)`` arrays."""
    ad = _errors(list(mine), list(ref), RTOL_AUTODIFF["float64"])
    keep = list(~kinked)
    fd_err = _errors(list(mine), list(fd), RTOL_FINITE_DIFFERENCES, keep, fd_noise)
    out = []
    for (layer, leaf), shape, r, c, a, f in zip(names, shapes, ref, kinked, ad, fd_err,
                                               strict=True):  # fmt: skip
        kinks = int(np.sum(c))
        out.append(
            DirectionCheck(
                layer=layer,
                leaf=leaf,
                shape=tuple(shape),
                slope=float(np.sqrt(np.mean(np.square(r)))),
                autodiff_error=a[0],
                fd_error=math.nan if kinks == len(c) else f[0],
                kinks=kinks,
                passed=a[1] and f[1],
            )
        )
    return tuple(out)


def _branch_hint(model, broken, deltas):
    """``broken`` with a hint when the rule named is a residual block's branch parameters but
    the δ below the block disagrees too: the branch's own δ is not checked, so a wrong ∂L/∂x of
    a later branch layer looks the same."""
    layer, rule = broken
    names = [_layer_name(model, i) for i in range(len(model.layers))]
    if layer not in names:  # the loss, or nothing named
        return broken
    i = names.index(layer)
    if i > 0 and not deltas[i - 1].passed and " branch " in rule:
        rule += " (or ∂L/∂x of a later layer of that branch: branch δs are not checked)"
    return layer, rule


def gradcheck(
    params: Params,
    model,
    x: Array,
    y: Array,
    *,
    directions: int = DIRECTIONS,
    fd_step: float = FD_STEP,
    per_block: bool = True,
    seed: int = 0,
    l2=0.0,
    state=None,
    key=None,
    train=None,
) -> GradcheckReport:
    """Check the hand-written gradients along random directions of each parameter block and of
    each layer's z, against ``jax.grad`` and finite differences (see the module docstring).

    Arguments:
        params, model, x, y, l2: as in :func:`fnbp.backprop` (an :class:`fnbp.MLP` or
            :class:`fnbp.Net`); everything is compared in float64.
        directions: ``K``, the random unit directions per block and per layer (≥ 1).
        fd_step: the step ε of the central differences, in (0, 1).
        per_block: ``True`` (each leaf of each layer its own directions); ``False`` draws
            directions over all parameters at once, as one block named ``all parameters``
            (for comparison: it dilutes a bug in a small block, and names no layer).
        seed: the directions are drawn by ``numpy.random.default_rng(seed)``.
        state, key, train: as in :func:`fnbp.backprop`: a net with BatchNorm or Dropout needs
            ``train``, BatchNorm needs ``state``, train-mode dropout a ``key``. The masks are
            drawn once from ``key`` and shared by every computation compared.

    Returns:
        A :class:`GradcheckReport`: one :class:`DirectionCheck` per block (``blocks``, in
        params order) and per top-level layer's δ (``deltas``), ``passed``, ``failures`` and
        ``broken_layer``/``broken_rule``.

    Raises:
        ValueError, TypeError: as :func:`fnbp.backprop` does, and for a bad ``directions``,
            ``fd_step``, ``per_block`` or ``seed``.
    """
    check_params(params, model)
    check_inputs(model, x, y)
    check_l2(l2)
    train = check_mode(model, state=state, train=train, key=key, what="gradcheck")
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
        raise ValueError(f"gradcheck: directions must be a positive int, got {directions!r}")
    if not (isinstance(fd_step, (int, float)) and 0 < fd_step < 1):
        raise ValueError(f"gradcheck: fd_step must be a number in (0, 1), got {fd_step!r}")
    if not isinstance(per_block, bool):
        raise TypeError(f"gradcheck: per_block must be True or False, got {per_block!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"gradcheck: seed must be an int >= 0, got {seed!r}")
    batch = int(x.shape[0])
    masks, state = _masks_and_state(model, key, batch, train, state)
    params64, x64, state64 = _float64((params, x, state))
    z = jax.eval_shape(lambda: run(params, model, x, state=state, masks=masks, train=train).z)
    leaves = jax.tree.leaves(params)
    U, V = _directions(leaves, [v.shape for v in z], directions, per_block, seed)
    with jax.enable_x64(True):
        loss, blocks, deltas, variances = jax.device_get(
            _gradcheck64_jit(
                params64, model, x64, _labels64(y), float(l2), float(fd_step), state64, masks,
                U, V, train=train, manual=_backprop_jit,
                per_block=per_block, budget=FD_VALUES,
            )
        )  # fmt: skip
    fd_noise = _fd_noise(loss, fd_step)
    if per_block:
        names, shapes = _block_names(model, params), [v.shape for v in leaves]
    else:
        names, shapes = [("all parameters", "")], [(sum(v.size for v in leaves),)]
    block_checks = _checks(names, shapes, *blocks, fd_noise)
    layer_names = [(_layer_name(model, i), "δ") for i in range(len(model.layers))]
    delta_checks = _checks(layer_names, [v.shape for v in z], *deltas, fd_noise)
    passed = all(c.passed for c in (*block_checks, *delta_checks))
    broken = (None, None)
    if not passed:
        leaf_layers = _leaf_layers(params) if per_block else [-1]
        broken = _broken(model, block_checks, leaf_layers, delta_checks, (), [])
        broken = _branch_hint(model, broken, delta_checks)
    return GradcheckReport(
        blocks=block_checks,
        deltas=delta_checks,
        model=model,
        batch=batch,
        train=train,
        directions=directions,
        seed=seed,
        per_block=per_block,
        fd_step=float(fd_step),
        fd_noise=float(fd_noise),
        rtol_autodiff=RTOL_AUTODIFF["float64"],
        rtol_finite_differences=RTOL_FINITE_DIFFERENCES,
        passed=passed,
        broken_layer=broken[0],
        broken_rule=broken[1],
        warnings=_variance_warnings(variances, fd_step),
    )
