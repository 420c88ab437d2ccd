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
vs finite differences, float64  1e-6        truncation ε²·L‴/6 plus rounding ~1e-16·|L|/ε
==============================  ==========  ==========================================

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

_value_and_grad_jit = jax.jit(jax.value_and_grad(_loss))


def autodiff_grads(params: Params, model: MLP, x: Array, y: Array, *, l2=0.0):
    """``(loss, grads)`` from ``jax.value_and_grad(fnbp.loss)``: the reference for backprop."""
    check_params(params, model)
    check_inputs(model, x, y)
    check_l2(l2)
    return _value_and_grad_jit(params, model, x, y, l2)


# ----------------------------------------------------------------------------------------------
# Finite differences, every parameter at once (float64).


def _finite_differences(params, model, x, y, l2, step, chunk):
    """Central differences of the loss for every W and b, and which ones straddle a kink.

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
            """(L(z⁽ˡ⁾ + c eᵢ) − L(z⁽ˡ⁾ − c eᵢ)) / 2ε for a column shift c of shape (batch,)."""
            shift = c[:, None] * jax.nn.one_hot(i, z[l].shape[1], dtype=c.dtype)[None, :]
            up, up_pieces = tail(z[l] + shift)
            down, down_pieces = tail(z[l] - shift)
            crossed = jnp.zeros((), bool)
            for p0, p1, p2 in zip(base, up_pieces, down_pieces, strict=True):
                crossed |= jnp.any(p1 != p0) | jnp.any(p2 != p0)
            return (up - down) / (2 * step), crossed

        n_out, n_in = params[l - 1]["W"].shape
        a_prev = a[l - 1]
        # W⁽ˡ⁾ᵢⱼ ± ε moves z⁽ˡ⁾ᵢ by ±ε·a⁽ˡ⁻¹⁾ⱼ; b⁽ˡ⁾ᵢ ± ε moves it by ±ε.
        w_fd, w_kink = jax.lax.map(
            lambda k, n_in=n_in, a_prev=a_prev: central(k // n_in, step * a_prev[:, k % n_in]),
            jnp.arange(n_out * n_in),
            batch_size=chunk,
        )
        b_fd, b_kink = jax.lax.map(
            lambda i: central(i, jnp.full(x.shape[:1], step, x.dtype)),
            jnp.arange(n_out),
            batch_size=chunk,
        )
        W = params[l - 1]["W"]
        penalty_fd = 0.5 * l2 * ((W + step) ** 2 - (W - step) ** 2) / (2 * step)  # (λ/2)Σ‖W‖²
        fd.append({"W": w_fd.reshape(n_out, n_in) + penalty_fd, "b": b_fd})
        kinked.append({"W": w_kink.reshape(n_out, n_in), "b": b_kink})
    return fd, kinked


_finite_differences_jit = jax.jit(_finite_differences, static_argnames="chunk")


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

    @property
    def kinks(self) -> int:
        return sum(leaf.kinks for leaf in self.leaves)

    def __str__(self) -> str:
        m = self.model
        head = (
            f"fnbp crosscheck: MLP {'-'.join(map(str, m.sizes))}, {m.activation}, {m.loss}, "
            f"batch {self.batch}, {self.dtype}"
        )
        cols = f"{'leaf':<10} {'shape':<12} {'‖grad‖':>9}  {'vs jax.grad (' + self.dtype + ')':>24}"
        cols += f"  {'(float64)':>9}"
        if self.finite_differences:
            cols += f"  {'vs finite diff (float64)':>24}  {'kinks':>6}"
        lines = [head, cols, "-" * len(cols)]
        for leaf in self.leaves:
            row = f"{leaf.name:<10} {str(leaf.shape):<12} {leaf.grad_norm:>9.2e}"
            row += f"  {leaf.autodiff_error:>24.1e}  {leaf.autodiff64_error:>9.1e}"
            if self.finite_differences:
                row += f"  {leaf.fd_error:>24.1e}  {leaf.kinks:>6d}"
            lines.append(row + ("" if leaf.passed else "   FAIL"))
        lines.append("-" * len(cols))
        tol = (
            f"rtol: jax.grad {self.rtol_autodiff:g} ({self.dtype}), {self.rtol_autodiff64:g} "
            f"(float64)"
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
) -> CrosscheckReport:
    """Compare the hand-written gradients with ``jax.grad`` and with finite differences.

    Arguments:
        params, model, x, y, l2: as in :func:`fnbp.backprop`.
        finite_differences: also compare with central differences of every parameter
            (float64). Their cost is one forward pass from layer ``l`` on per parameter of
            layer ``l``: seconds for ~10⁴ parameters, impractical for ~10⁶.
        fd_step: the step ε.

    Returns:
        A :class:`CrosscheckReport`; ``.passed`` is true when every leaf is within tolerance in
        every comparison (see the module docstring for the tolerances).
    """
    check_params(params, model)
    check_inputs(model, x, y)
    check_l2(l2)
    if not (isinstance(fd_step, (int, float)) and 0 < fd_step < 1):
        raise ValueError(f"fd_step must be a number in (0, 1), got {fd_step!r}")
    dtype = jnp.result_type(*jax.tree.leaves(params), x)
    dtype_name = jnp.dtype(dtype).name
    rtol = RTOL_AUTODIFF.get(dtype_name, 1e-2)

    manual = _backprop_jit(params, model, x, y, l2).grads
    _, auto = _value_and_grad_jit(params, model, x, y, l2)
    ad_err = _errors(manual, auto, rtol)

    # float64 copies (numpy, so nothing is silently truncated back to float32 outside x64).
    params64 = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    x64 = np.asarray(x, np.float64)
    y64 = np.asarray(y) if jnp.issubdtype(y.dtype, jnp.integer) else np.asarray(y, np.float64)
    with jax.enable_x64(True):
        loss64, manual64 = jax.device_get(_backprop_jit(params64, model, x64, y64, float(l2))[:2])
        _, auto64 = jax.device_get(_value_and_grad_jit(params64, model, x64, y64, float(l2)))
        if finite_differences:
            per_perturbation = x.shape[0] * sum(model.sizes[1:]) * 4
            chunk = max(1, min(model.num_params, 2**27 // per_perturbation))
            fd, kinked = jax.device_get(
                _finite_differences_jit(
                    params64, model, x64, y64, float(l2), float(fd_step), chunk=chunk
                )
            )
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
    )
