"""Cross-validation of the hand-written backprop against ``jax.grad`` and finite differences.

:func:`crosscheck` computes every parameter's gradient three independent ways and compares
them leaf by leaf (each ``W⁽ˡ⁾`` and ``b⁽ˡ⁾``) by the relative error ‖g_manual − g_ref‖/‖g_ref‖:

1. ``jax.grad`` of :func:`fnbp.loss` in the parameters' own dtype, and again in float64;
2. central finite differences ``(L(θ + εeᵢ) − L(θ − εeᵢ)) / 2ε`` in float64 for *every*
   parameter, all at once (``vmap``/``lax.map``, not a Python loop).

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
is judged against a floor of 1e-3 × the norm of the whole gradient instead of its own norm.
Finite differences also carry a rounding floor that no step removes: each quotient is off by
about ``eps₆₄·|L|/ε``, so a leaf of ``n`` entries may differ by a further
``√n · 10·eps₆₄·max(|L|, 1)/ε`` (≈ 5e-9 per entry for a loss near 2), reported as ``fd_noise``.

The finite-difference step is ε = 1e-6 (float64 rounding makes the error grow as ε shrinks,
truncation as it grows; 1e-6 keeps both under 1e-8 for well-scaled networks). Perturbing
``W⁽ˡ⁾ᵢⱼ`` by ±ε moves only the pre-activation column ``z⁽ˡ⁾ᵢ``, by ±ε·a⁽ˡ⁻¹⁾ⱼ, so each
finite difference reruns the network from layer ``l`` on rather than from the input: the loss
is exactly the one the full forward pass would compute at ``θ ± εeᵢ``, at a fraction of the
cost. ReLU-family networks are piecewise linear: where ±ε moves any pre-activation across a
kink, the difference quotient mixes two slopes and says nothing about the derivative. Those
parameters are detected (the piece of every pre-activation at θ ± ε is compared with its piece
at θ), excluded from the comparison and reported as ``kinks``.

Cost: a cross-check compiles two XLA programs, one per dtype, each computing everything it
compares (hand-written grads, ``jax.grad``'s and, in float64, every finite difference), at
LLVM -O0 since each runs once. The full check of a 784-16-16-10 network (13,002 parameters,
batch 32) takes about 0.65 s on a 2-core CPU in a fresh process, compilation included. Within
one program XLA merges identical subcomputations, so where the hand-written pass builds the
same expression as ``jax.grad`` the two agree bitwise (error 0); anything else stays separate.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fnbp.backprop import _backprop_jit
from fnbp.losses import to_targets
from fnbp.model import (
    MLP,
    Params,
    _loss,
    check_compute_dtype,
    check_inputs,
    check_l2,
    check_params,
    dense,
    forward_trace,
)

Array = jax.Array

RTOL_AUTODIFF = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 5e-2, "float16": 1e-2}
RTOL_FINITE_DIFFERENCES = 1e-6
FD_STEP = 1e-6
_FLOOR = 1e-3  # a leaf's error is judged against max(‖g_leaf‖, _FLOOR·‖g_all‖)

_value_and_grad_jit = jax.jit(jax.value_and_grad(_loss), static_argnames="compute_dtype")


def autodiff_grads(params: Params, model: MLP, x: Array, y: Array, *, l2=0.0, compute_dtype=None):
    """``(loss, grads)`` from ``jax.value_and_grad(fnbp.loss)``: the reference for backprop.

    ``compute_dtype`` as in :func:`fnbp.backprop`: the reference for mixed precision is
    ``jax.grad`` of the same mixed-precision loss.
    """
    check_params(params, model)
    check_inputs(model, x, y)
    check_l2(l2)
    compute_dtype = check_compute_dtype(compute_dtype)
    return _value_and_grad_jit(params, model, x, y, l2, compute_dtype=compute_dtype)


# ----------------------------------------------------------------------------------------------
# Finite differences, every parameter at once (float64).


def _finite_differences(params, model, x, y, l2, step, chunk):
    """Central differences of the loss for every W and b, and which ones straddle a kink.

    ``chunk`` bounds how many perturbations are evaluated at once (memory).

    Returns ``(fd, kinked)``: two lists like ``params``, of difference quotients and of bools.
    """
    L, loss_fn = model.num_layers, model.loss_fn
    t = to_targets(loss_fn, y, model.sizes[-1], x.dtype)
    z, a = forward_trace(params, model, x)

    fd, kinked = [], []
    for l in range(1, L + 1):

        def tail(z_l, l=l):
            """Mean data loss from z⁽ˡ⁾ on, and the linear piece of every pre-activation."""
            pieces, z_m = [], z_l
            for m in range(l, L + 1):
                act = model.layer_activation(m)
                if act.region is not None:
                    pieces.append(act.region(z_m))
                a_m = act.f(z_m)
                if m < L:
                    z_m = dense(params[m], a_m)
            return jnp.mean(loss_fn.value(z_m, a_m, t)), pieces

        base = tail(z[l])[1]

        def central(i, c, l=l, tail=tail, base=base):
            """(L(z⁽ˡ⁾ + c eᵢ) − L(z⁽ˡ⁾ − c eᵢ)) / 2ε for a column shift c of shape (batch,), and
            whether either step moves a pre-activation onto another linear piece."""
            shift = c[:, None] * jax.nn.one_hot(i, z[l].shape[1], dtype=c.dtype)[None, :]
            (up, down), pieces = jax.vmap(lambda s: tail(z[l] + s * shift))(
                jnp.array([1.0, -1.0], c.dtype)
            )
            crossed = jnp.zeros((), bool)
            for p0, p in zip(base, pieces, strict=True):
                crossed |= jnp.any(p != p0[None])
            return (up - down) / (2 * step), crossed

        n_out, n_in = params[l - 1]["W"].shape
        # W⁽ˡ⁾ᵢⱼ ± ε moves z⁽ˡ⁾ᵢ by ±ε·a⁽ˡ⁻¹⁾ⱼ and b⁽ˡ⁾ᵢ ± ε moves it by ±ε, so row i of [W | b]
        # is column i of z⁽ˡ⁾ shifted by each row of ε·[a⁽ˡ⁻¹⁾ | 1]ᵀ: one program for W and b.
        shifts = step * jnp.concatenate([a[l - 1], jnp.ones_like(a[l - 1][:, :1])], axis=1).T
        quotients, crossed = jax.lax.map(
            lambda i, shifts=shifts, central=central: jax.vmap(lambda c: central(i, c))(shifts),
            jnp.arange(n_out),
            batch_size=max(1, chunk // (n_in + 1)),
        )  # each (n_out, n_in + 1)
        W = params[l - 1]["W"]
        penalty_fd = 0.5 * l2 * ((W + step) ** 2 - (W - step) ** 2) / (2 * step)  # (λ/2)Σ‖W‖²
        fd.append({"W": quotients[:, :n_in] + penalty_fd, "b": quotients[:, n_in]})
        kinked.append({"W": crossed[:, :n_in], "b": crossed[:, n_in]})
    return fd, kinked


_finite_differences_jit = jax.jit(_finite_differences, static_argnames="chunk")


# ----------------------------------------------------------------------------------------------
# The two programs a cross-check compiles: one per dtype, each computing everything it compares.


def _gradients(params, model, x, y, l2, compute_dtype, *, manual):
    """The hand-written grads (by ``manual``, :func:`fnbp.backprop`'s internals) and
    ``jax.grad``'s, in the working dtype."""
    grads = manual(params, model, x, y, l2, compute_dtype).grads
    return grads, jax.grad(_loss)(params, model, x, y, l2, compute_dtype)


def _gradients64(params, model, x, y, l2, step, *, manual, chunk):
    """The same in float64, with the loss, and finite differences unless ``chunk`` is 0."""
    result = manual(params, model, x, y, l2, None)
    fd = _finite_differences(params, model, x, y, l2, step, chunk) if chunk else None
    return result.loss, result.grads, jax.grad(_loss)(params, model, x, y, l2), fd


# A cross-check runs each of its programs once or twice, so LLVM's optimizations cost more
# compile time than they save: on a 2-core CPU at -O0 the float64 program of a 784-16-16-10
# network compiles in about half the time (0.5 → 0.25 s) and runs 10–20% slower (0.12 → 0.14 s).
_QUICK_COMPILE = {"xla_backend_optimization_level": 0}
_gradients_jit = jax.jit(
    _gradients, static_argnames=("compute_dtype", "manual"), compiler_options=_QUICK_COMPILE
)
_gradients64_jit = jax.jit(
    _gradients64, static_argnames=("manual", "chunk"), compiler_options=_QUICK_COMPILE
)


# ----------------------------------------------------------------------------------------------
# The report.


@dataclasses.dataclass(frozen=True)
class LeafCheck:
    """The comparison for one leaf (``W`` or ``b`` of one layer).

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
class CrosscheckReport:
    """Result of :func:`crosscheck`. ``str(report)`` is a readable table."""

    leaves: tuple[LeafCheck, ...]
    model: MLP
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

    @property
    def kinks(self) -> int:
        return sum(leaf.kinks for leaf in self.leaves)

    def __str__(self) -> str:
        m = self.model
        head = (
            f"fnbp crosscheck: MLP {'-'.join(map(str, m.sizes))}, {m.activation}, {m.loss}, "
            f"batch {self.batch}, {self.dtype}"
        )
        working = self.dtype if self.compute_dtype is None else f"{self.compute_dtype} compute"
        if self.compute_dtype is not None:
            head += f" params, {working}"
        label = f"vs jax.grad ({working})"
        width = max(24, len(label))
        cols = f"{'leaf':<10} {'shape':<12} {'‖grad‖':>9}  {label:>{width}}"
        cols += f"  {'(float64)':>9}"
        if self.finite_differences:
            cols += f"  {'vs finite diff (float64)':>24}  {'kinks':>6}"
        lines = [head, cols, "-" * len(cols)]
        for leaf in self.leaves:
            row = f"{leaf.name:<10} {str(leaf.shape):<12} {leaf.grad_norm:>9.2e}"
            row += f"  {leaf.autodiff_error:>{width}.1e}  {leaf.autodiff64_error:>9.1e}"
            if self.finite_differences:
                row += f"  {leaf.fd_error:>24.1e}  {leaf.kinks:>6d}"
            lines.append(row + ("" if leaf.passed else "   FAIL"))
        lines.append("-" * len(cols))
        tol = (
            f"rtol: jax.grad {self.rtol_autodiff:g} ({working}), {self.rtol_autodiff64:g} (float64)"
        )
        if self.finite_differences:
            tol += (
                f", finite differences {self.rtol_finite_differences:g} + {self.fd_noise:.0e}·√n "
                f"(step {self.fd_step:g}; "
                f"{self.kinks} of {m.num_params} parameters straddle a kink and are excluded)"
            )
        lines.append(tol)
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def _errors(manual, ref, rtol, mask=None, atol_entry=0.0):
    """Per-leaf (relative error, passed) of manual against ref, over the entries in mask.

    A leaf passes when ‖Δ‖ ≤ rtol·max(‖g_ref‖, _FLOOR·‖g_ref_all‖) + ‖atol‖, where ``atol`` is
    ``atol_entry`` for every entry (so ‖atol‖ = atol_entry·√entries), or, when ``atol_entry``
    is a tree like ``ref``, each entry's own tolerance.
    """
    leaves_m, leaves_r = jax.tree.leaves(manual), jax.tree.leaves(ref)
    masks = jax.tree.leaves(mask) if mask is not None else [None] * len(leaves_m)
    atols = [atol_entry] * len(leaves_r) if np.isscalar(atol_entry) else jax.tree.leaves(atol_entry)
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
    for d, n, a in zip(diffs, norms, slack, strict=True):
        rel = d / n if n > 0 else (0.0 if d == 0 else math.inf)
        out.append((rel, bool(d <= rtol * max(n, _FLOOR * total) + a)))
    return out


def crosscheck(
    params: Params,
    model: MLP,
    x: Array,
    y: Array,
    *,
    l2=0.0,
    finite_differences: bool = True,
    fd_step: float = FD_STEP,
    compute_dtype=None,
) -> CrosscheckReport:
    """Compare the hand-written gradients with ``jax.grad`` and with finite differences.

    Arguments:
        params, model, x, y, l2: as in :func:`fnbp.backprop`.
        finite_differences: also compare with central differences of every parameter
            (float64). Their cost is one forward pass from layer ``l`` on per parameter of
            layer ``l``: seconds for ~10⁴ parameters, impractical for ~10⁶.
        fd_step: the step ε.
        compute_dtype: compare in mixed precision (see :func:`fnbp.backprop`): the first
            comparison is then the mixed-precision backprop against ``jax.grad`` of the same
            mixed-precision loss, at the compute dtype's tolerance. The float64 and
            finite-difference comparisons check the math and do not change.

    Returns:
        A :class:`CrosscheckReport`; ``.passed`` is true when every leaf is within tolerance in
        every comparison (see the module docstring for the tolerances).
    """
    check_params(params, model)
    check_inputs(model, x, y)
    check_l2(l2)
    if not (isinstance(fd_step, (int, float)) and 0 < fd_step < 1):
        raise ValueError(f"fd_step must be a number in (0, 1), got {fd_step!r}")
    compute_dtype = check_compute_dtype(compute_dtype)
    dtype = jnp.result_type(*jax.tree.leaves(params), x)
    dtype_name = jnp.dtype(dtype).name
    rtol = RTOL_AUTODIFF.get(jnp.dtype(compute_dtype or dtype).name, 1e-2)

    # Each program takes the hand-written pass as a (static) argument, so a test can swap in a
    # broken one; all its grads, jax.grad's and the finite differences share one compilation.
    manual, auto = _gradients_jit(
        params, model, x, y, l2, compute_dtype=compute_dtype, manual=_backprop_jit
    )
    ad_err = _errors(manual, auto, rtol)

    # float64 copies (numpy, so nothing is silently truncated back to float32 outside x64).
    params64 = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    x64 = np.asarray(x, np.float64)
    y64 = np.asarray(y) if jnp.issubdtype(y.dtype, jnp.integer) else np.asarray(y, np.float64)
    per_perturbation = x.shape[0] * sum(model.sizes[1:]) * 4
    chunk = max(1, min(model.num_params, 2**27 // per_perturbation)) if finite_differences else 0
    with jax.enable_x64(True):
        loss64, manual64, auto64, fd = jax.device_get(
            _gradients64_jit(
                params64,
                model,
                x64,
                y64,
                float(l2),
                float(fd_step),
                manual=_backprop_jit,
                chunk=chunk,
            )
        )
    if finite_differences:
        fd, kinked = fd
    ad64_err = _errors(manual64, auto64, RTOL_AUTODIFF["float64"])
    fd_noise = 10 * np.finfo(np.float64).eps * max(abs(float(loss64)), 1.0) / fd_step
    if finite_differences:
        keep = jax.tree.map(np.logical_not, kinked)
        fd_err = _errors(manual64, fd, RTOL_FINITE_DIFFERENCES, keep, fd_noise)
        kinks = [int(np.sum(k)) for k in jax.tree.leaves(kinked)]
    else:
        fd_err = [(math.nan, True)] * len(ad_err)
        kinks = [0] * len(ad_err)

    leaves = []
    names = [f"layer {l} {k}" for l in range(1, model.num_layers + 1) for k in ("W", "b")]
    for i, (name, g) in enumerate(zip(names, jax.tree.leaves(auto), strict=True)):
        leaves.append(
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
        )
    return CrosscheckReport(
        leaves=tuple(leaves),
        model=model,
        batch=int(x.shape[0]),
        dtype=dtype_name,
        rtol_autodiff=rtol,
        rtol_autodiff64=RTOL_AUTODIFF["float64"],
        rtol_finite_differences=RTOL_FINITE_DIFFERENCES,
        fd_step=float(fd_step),
        fd_noise=float(fd_noise),
        finite_differences=finite_differences,
        passed=all(leaf.passed for leaf in leaves),
        compute_dtype=None if compute_dtype is None else compute_dtype.name,
    )
