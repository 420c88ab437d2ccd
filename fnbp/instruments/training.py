"""Instruments in training: per-layer statistics of a training step, read off the step's own
forward and backward pass (no second backward), on every K-th step of an epoch.

For every layer with params (:func:`fnbp.instruments.layer_names`, nested layers included, in
params order), with θ the layer's own params before the step, ḡ the batch gradient of θ (the
L2 term λW included, as the optimizer sees it), Δθ the change the step made to θ (the
optimizer's update, zero for a skipped step), z and
a = f(z) the layer's output before and after its activation, and δᵢ = B·∂L/∂zᵢ example i's own
error signal (the mean loss's δ carries 1/B):

=====================  ==========================================================================
``grad_norm``          ‖ḡ‖ over every own leaf (W and b, a residual block's P and α)
``update_norm``        ‖Δθ‖
``update_ratio``       ‖Δθ‖ / ‖θ‖
``delta_norm``         (1/B) Σᵢ ‖δᵢ‖, the norm over every non-batch axis
``activation_std``     the standard deviation of a over the batch and the layer's units
``dead_fraction``      a ReLU layer's fraction of dead units: entries of an example's output
                       (features; positions × channels for a convolution) whose a is 0 for
                       every example of the batch. ``None`` on the host for other activations
``example_norms``      ``(4,)`` per layer: the 10 %, 50 %, 90 % quantiles and the max over the
                       batch of ‖gᵢ‖, gᵢ = ∂ℓᵢ/∂θ + λW example i's gradient of its own loss term
                       (:func:`fnbp.per_example_grad_norms`), from the factors of
                       :func:`fnbp.instruments.factors.example_factors`
=====================  ==========================================================================

and for the whole model: ``total_example_norms`` (the same quantiles of ‖gᵢ‖ over every param),
``grad_norm_sq`` ‖ḡ‖², ``trace_cov`` ``tr Σ = (Σᵢ ‖gᵢ‖² − B‖ḡ‖²)/(B − 1)`` (the trace of the
per-example gradients' sample covariance: the sum of :class:`fnbp.GradientStats`'s
``variance``, from the per-example norms alone) and ``b_simple`` ``tr Σ / ‖ḡ‖²``, the gradient
noise scale of McCandlish et al. (2018) (a per-step plug-in estimate: averaging ``trace_cov``
and ``grad_norm_sq`` over steps before dividing, as they do, is the reader's choice).

Under train-mode BatchNorm one example's loss depends on the whole batch, so gᵢ is not defined:
there the per-example fields (``example_norms``, ``total_example_norms``, ``trace_cov``,
``b_simple``; ``grad_norm_sq`` is kept) are left out, and :func:`left_out` says why. Every
other field is computed as everywhere.

Cost: the statistics run inside the jitted step under ``lax.cond``, so the other steps compute
none of them; they pay for keeping the trace and deltas alive to the cond (the backward pass
made them anyway), for the optimizer's update Δθ written out instead of fused into the params'
update, and for the cond itself (a few µs). The cond reads neither the params before the
step (updated in place: XLA would copy them on every step) nor the gradient (only its
per-layer sums of squares, :func:`layer_grad_sq`). An instrumented step adds the per-example
factors (an ``O(batch · width)`` pass for a dense layer; a convolution's windows once more)
and a few reductions. Measured with ``python scripts/bench/instruments_training.py --repeats
15`` on 2 shared CPU cores, every 16 steps over a plain epoch: 1.024× for a 784-1024-1024-10
MLP at batch 256, 1.005× for the digits CNN at batch 32, 1.09× for a 64-128-128-10 MLP at
batch 32 (a 0.1 ms step); every step: 1.12×, 1.07×, 1.6×.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fnbp.instruments import factors as fx
from fnbp.instruments.per_example import layer_entries, layer_sq_norms

Array = jax.Array
DEFAULT_EVERY = 16
QUANTILES = (0.1, 0.5, 0.9)  # then the max: example_norms[..., 3]
QUANTILE_NAMES = ("p10", "p50", "p90", "max")
PER_LAYER = (
    "grad_norm", "update_norm", "update_ratio", "delta_norm", "activation_std", "dead_fraction",
)  # fmt: skip
PER_EXAMPLE = ("example_norms", "total_example_norms", "trace_cov", "b_simple")
ORDER = (*PER_LAYER, "example_norms", "total_example_norms", "grad_norm_sq", "trace_cov",
         "b_simple")  # fmt: skip


def check_every(every, name: str = "instruments") -> int | None:
    """``every`` (instrument every K steps) checked: ``None`` or a positive int.

    Raises:
        TypeError: for a bool or a non-int (``True`` would read as "every step").
        ValueError: for K < 1.
    """
    if every is None:
        return None
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)):
        raise TypeError(
            f"{name} must be None or a positive int K (instrument every K-th step), got {every!r}"
        )
    if every < 1:
        raise ValueError(f"{name} must be a positive int K (every K-th step), got {every}")
    return int(every)


def left_out(model) -> str | None:
    """Why the per-example fields are left out for ``model`` in training (train-mode BatchNorm
    couples the examples, naming its layer), or ``None`` when they are computed."""
    if not model.couples_examples:
        return None
    layer = model.find(lambda l: l.couples_examples)
    return (
        f"per-example gradient norms and the noise scale are left out: the net's {layer} "
        "couples the examples of a batch in train mode (its statistics come from the whole "
        "batch), so per-example gradients are not defined"
    )


def relu_layers(model) -> list[bool]:
    """For each layer of :func:`fnbp.instruments.layer_names`: its activation is ReLU (so
    ``dead_fraction`` means something)."""
    out = []

    def walk(layers, params):
        for layer, p in zip(layers, params, strict=True):
            if any(k != "branch" for k in p):
                out.append(layer.act.name == "relu")
            if layer.sublayers():
                walk(layer.sublayers(), p["branch"])

    from fnbp.model import _expected_params

    walk(model.layers, _expected_params(model))
    return out


def _signals(layers, params, trace, deltas) -> list:
    """``(layer, a, δ)`` of every layer with params, nested ones too, in params order: its
    output after its activation and its δ = ∂L/∂z (a residual block's: the stream's)."""
    out = []
    for i, (layer, p) in enumerate(zip(layers, params, strict=True)):
        d = deltas[i]
        if any(k != "branch" for k in p):
            out.append((layer, trace.a[i + 1], d["out"] if isinstance(d, dict) else d))
        if layer.sublayers():
            out.extend(_signals(layer.sublayers(), p["branch"], trace.cache[i], d["branch"]))
    return out


def _wide(v: Array) -> Array:
    return v.astype(jnp.promote_types(v.dtype, jnp.float32))


def _norm(leaves: dict) -> Array:
    """‖·‖ over every leaf of a layer's own params, in at least float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(_wide(v))) for v in leaves.values()))


def _spread(norms: Array) -> Array:
    """``(n, 4)``: the 10/50/90 % quantiles and the max of each row of an ``(n, batch)`` array
    (one sort for all rows; linear interpolation between order statistics, as ``jnp.quantile``
    and ``np.quantile`` by default)."""
    s = jnp.sort(norms, axis=1)
    B = s.shape[1]
    cols = []
    for q in QUANTILES:
        pos = q * (B - 1)
        lo = math.floor(pos)
        hi, w = min(lo + 1, B - 1), pos - lo
        cols.append(s[:, lo] * (1 - w) + s[:, hi] * w)
    return jnp.stack([*cols, s[:, -1]], axis=1)


def layer_grad_sq(grads) -> Array:
    """``(n,)``: ‖ḡ‖² of each layer of :func:`fnbp.instruments.layer_names` (every own leaf),
    in at least float32. The training step computes it on every step, outside the
    instruments' ``lax.cond``: the weights' sums are those of its ``grad_norms`` metric (XLA
    computes them once), and a cond that reads the gradient itself costs a conv net's step a
    tenth of its wall time on a 2-core CPU (XLA then runs the step on fewer threads)."""
    return jnp.stack([sum(jnp.sum(jnp.square(_wide(v))) for v in own.values())
                      for own in layer_entries(grads)])  # fmt: skip


def step_stats(model, new_params, updates, grad_sq, trace, deltas, l2, per_example: bool) -> dict:
    """The instruments of one step (module docstring), from what its backward pass kept.

    Arguments:
        model: the MLP or Net.
        new_params, updates: the params after the step and Δθ, what the step added to them
            (zeros for a skipped step); θ is ``new_params − updates`` (to float rounding).
            Not the params before the step: in a training scan the update is in place, and a
            ``lax.cond`` that might read the old params after it makes XLA copy every param
            on every step, instrumented or not.
        grad_sq: :func:`layer_grad_sq` of the batch gradient.
        trace, deltas: the :class:`fnbp.engine.Trace` and the deltas of
            :func:`fnbp.backprop._backward` on this step's batch.
        l2: the step's L2 strength (gᵢ includes λW as ḡ does).
        per_example: compute the per-example fields (``False`` under train-mode BatchNorm).

    Returns:
        A dict of float32 (or wider) arrays: each :data:`PER_LAYER` field ``(n,)`` for the
        ``n`` layers of :func:`layer_names`, ``example_norms`` ``(n, 4)``,
        ``total_example_norms`` ``(4,)``, and the scalars ``grad_norm_sq``, ``trace_cov`` and
        ``b_simple``. Pure: it ``vmap``s over a population.
    """
    B = trace.a[0].shape[0]
    params = jax.tree.map(lambda new, u: new - u.astype(new.dtype), new_params, updates)
    own_p, update = layer_entries(params), layer_entries(updates)
    signals = _signals(model.layers, params, trace, deltas)
    stack = lambda vs: jnp.stack([_wide(jnp.asarray(v)) for v in vs])  # noqa: E731
    update_norm = stack([_norm(u) for u in update])
    out = {
        "grad_norm": jnp.sqrt(grad_sq),
        "update_norm": update_norm,
        "update_ratio": update_norm / stack([_norm(p) for p in own_p]),
        "delta_norm": stack(
            [jnp.mean(jnp.linalg.norm(_wide(d).reshape(B, -1), axis=1)) * B for _, _, d in signals]
        ),
        "activation_std": stack([jnp.std(_wide(a)) for _, a, _ in signals]),
        "dead_fraction": stack(
            [
                jnp.mean(jnp.all(a == 0, axis=0), dtype=_wide(a).dtype)
                if layer.act.name == "relu"
                else jnp.nan
                for layer, a, _ in signals
            ]
        ),
    }
    g2 = jnp.sum(grad_sq)
    out["grad_norm_sq"] = g2
    if not per_example:
        return out
    factors = fx.example_factors(model.layers, params, trace, deltas, B)
    sq = layer_sq_norms(factors, params, l2)  # ‖gᵢ‖² per layer, (B,) each
    total = sum(sq)
    spread = _spread(jnp.sqrt(jnp.stack([*sq, total]))).astype(g2.dtype)
    out["example_norms"], out["total_example_norms"] = spread[:-1], spread[-1]
    if B > 1:  # tr Σ = Σ_entries (Σᵢ gᵢ² − Bḡ²)/(B − 1) = (Σᵢ ‖gᵢ‖² − B‖ḡ‖²)/(B − 1)
        trace_cov = (jnp.sum(total).astype(g2.dtype) - B * g2) / (B - 1)
    else:  # a batch of one has no sample variance
        trace_cov = jnp.asarray(jnp.nan, g2.dtype)
    out["trace_cov"] = trace_cov
    out["b_simple"] = trace_cov / g2
    return out


def pack(stats: dict) -> Array:
    """Every field of :func:`step_stats` in one flat vector, in ``jax.tree.leaves`` order: one
    output of the step's ``lax.cond`` and one row of the scan's stacked metrics, where a dozen
    small arrays would cost a dozen copies on every step (a few µs each: a tenth of a small
    net's step)."""
    leaves = jax.tree.leaves(stats)
    dtype = jnp.result_type(*leaves)
    return jnp.concatenate([jnp.ravel(v).astype(dtype) for v in leaves])


def unpack(flat: Array, shapes) -> dict:
    """:func:`pack`'s inverse for ``flat`` of shape ``(..., D)``: the fields of ``shapes``
    (``jax.eval_shape`` of :func:`step_stats`) with the same leading axes."""
    leaves, treedef = jax.tree.flatten(shapes)
    out, i = [], 0
    for s in leaves:
        n = math.prod(s.shape)
        out.append(flat[..., i : i + n].reshape(*flat.shape[:-1], *s.shape).astype(s.dtype))
        i += n
    return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------------------------
# The host side: records of the instrumented steps, and the report page.


def records(stats: dict, taken: np.ndarray, first_step: int, epoch: int, relu: list[bool]) -> list:
    """One JSON-able dict per instrumented step of a chunk.

    Arguments:
        stats: the chunk's instrument metrics on the host, each with a leading steps axis.
        taken: ``(steps,)`` bool, the steps that were instrumented.
        first_step: the 1-based number of the chunk's first step in the whole run.
        epoch: the chunk's 1-based epoch.
        relu: :func:`relu_layers`: ``dead_fraction`` is ``None`` for the other layers.

    Returns:
        Dicts ``{"step", "epoch", <field>: list or float}``, in step order; floats are Python
        floats (float64 of the stored float32), so checkpoints store them exactly.
    """
    out = []
    for j in np.flatnonzero(taken):
        r = {"step": first_step + int(j), "epoch": epoch}
        for k in sorted(stats, key=lambda k: ORDER.index(k) if k in ORDER else len(ORDER)):
            v = np.asarray(stats[k][j], np.float64)
            r[k] = float(v) if v.ndim == 0 else v.tolist()
        r["dead_fraction"] = [d if on else None for d, on in zip(r["dead_fraction"], relu,
                                                                  strict=True)]  # fmt: skip
        out.append(r)
    return out


def _series(rows: list, key: str):
    """``(steps, values)`` of one field over the records that hold it: values ``(T, ...)``."""
    rows = [r for r in rows if key in r]
    steps = np.array([r["step"] for r in rows])
    vals = np.array([[np.nan if v is None else v for v in np.atleast_1d(r[key]).tolist()]
                     if np.ndim(r[key]) else r[key] for r in rows], dtype=float)  # fmt: skip
    return steps, vals


def report_section(
    folder: str | os.PathLike, history: list[dict], names: list[str], *, every: int,
    note: str | None = None,
) -> str:  # fmt: skip
    """The instruments' part of a run's ``report.md`` (markdown, returned), its PNGs written
    into ``folder``.

    Arguments:
        folder: the run folder.
        history: :func:`fnbp.fit`'s records (each epoch's ``"instruments"`` list).
        names: :func:`fnbp.instruments.layer_names` of the model.
        every: K, the instruments' period.
        note: a line said beside the figures (e.g. :func:`left_out`'s reason).

    Figures: ``gradient_flow.png`` (‖ḡ‖ of every layer against the step, log scale),
    ``update_ratio.png`` (‖Δθ‖/‖θ‖ per layer), ``noise_scale.png`` (B_simple per step and
    Σ tr Σ / Σ ‖ḡ‖² over a window of the last :data:`WINDOW` instrumented steps) and ``example_norms.png`` (the 10–90 % band,
    median and max of the per-example gradient norms over the steps, over all params and for
    the first and last layers); the last two only where the per-example fields exist. Then a
    table of every layer at the last instrumented step.
    """
    from fnbp.report import (
        figure,
        layer_colors,
        log_axes,
        log_positive,
        markdown_table,
        save_figure,
    )

    folder = Path(folder)
    rows = [r for rec in history for r in rec.get("instruments", [])]
    lines = [
        "## Instruments",
        "",
        f"Every {every}-th step of each epoch (its steps 1, {every + 1}, {2 * every + 1}, …), "
        f"{len(rows)} instrumented steps, computed inside the jitted step from its own "
        "backward pass (fnbp.instruments.training); per layer as fnbp.instruments.layer_names "
        "names them.",
        "",
    ]
    if note:
        lines += [f"Note: {note}.", ""]
    if not rows:
        return "\n".join([*lines, "No instrumented step was recorded.", ""])
    cmap = layer_colors(len(names))
    step, g = _series(rows, "grad_norm")
    fig, ax = figure(size=(7.0, 4.5))
    for i, name in enumerate(names):
        ax[0, 0].plot(step, log_positive(g[:, i]), color=cmap[i], lw=1.2, label=name)
    log_axes(ax[0, 0], "gradient flow: ‖ḡ‖ per layer", "step", "‖∂L/∂θ‖ of the layer", names)
    lines += [f"![gradient flow]({save_figure(fig, folder / 'gradient_flow.png')})", ""]

    step, r = _series(rows, "update_ratio")
    fig, ax = figure(size=(7.0, 4.5))
    for i, name in enumerate(names):
        ax[0, 0].plot(step, log_positive(r[:, i]), color=cmap[i], lw=1.2, label=name)
    log_axes(ax[0, 0], "update size: ‖Δθ‖ / ‖θ‖ per layer", "step", "‖Δθ‖ / ‖θ‖", names)
    lines += [f"![update ratio]({save_figure(fig, folder / 'update_ratio.png')})", ""]

    if any("b_simple" in r for r in rows):
        step, b = _series(rows, "b_simple")
        _, tr = _series(rows, "trace_cov")
        _, g2 = _series(rows, "grad_norm_sq")
        running = _window_ratio(tr, g2)
        fig, ax = figure(size=(7.0, 4.0))
        ax[0, 0].plot(step, log_positive(b), ".", ms=3, alpha=0.6, label="B_simple of the step")
        ax[0, 0].plot(step, log_positive(running), lw=1.5,
                      label=f"Σ tr Σ / Σ ‖ḡ‖² over the last {WINDOW} of them")  # fmt: skip
        log_axes(ax[0, 0], "gradient noise scale B_simple = tr Σ / ‖ḡ‖²", "step", "examples")
        lines += [f"![noise scale]({save_figure(fig, folder / 'noise_scale.png')})", ""]

        step, tot = _series(rows, "total_example_norms")
        _, per = _series(rows, "example_norms")
        per = per.reshape(len(rows), len(names), 4)
        shown = [("all params", tot)] + [(names[i], per[:, i]) for i in sorted({0, len(names) - 1})]
        fig, ax = figure(1, len(shown), size=(4.5, 3.8))
        for a, (title, q) in zip(ax[0], shown, strict=True):
            a.fill_between(step, q[:, 0], q[:, 2], alpha=0.3, label="10–90 %")
            a.plot(step, q[:, 1], lw=1.5, label="median")
            a.plot(step, q[:, 3], ":", lw=1.2, label="max")
            log_axes(a, f"‖gᵢ‖: {title}", "step", "per-example gradient norm")
        lines += [f"![per-example norms]({save_figure(fig, folder / 'example_norms.png')})", ""]

    last = rows[-1]
    table = []
    for i, name in enumerate(names):
        row = [name, last["grad_norm"][i], last["update_ratio"][i], last["delta_norm"][i],
               last["activation_std"][i]]  # fmt: skip
        d = last["dead_fraction"][i]
        row.append("–" if d is None else d)
        if "example_norms" in last:
            row += [last["example_norms"][i][1], last["example_norms"][i][3]]
        table.append(row)
    headers = ["layer", "‖ḡ‖", "‖Δθ‖/‖θ‖", "mean ‖δᵢ‖", "std a", "dead ReLU"]
    if "example_norms" in last:
        headers += ["median ‖gᵢ‖", "max ‖gᵢ‖"]
    lines += [f"At the last instrumented step ({last['step']}):", "",
              markdown_table(headers, table), ""]  # fmt: skip
    if "b_simple" in last:
        lines += [f"B_simple at that step: {last['b_simple']:.4g} examples; "
                  f"Σ tr Σ / Σ ‖ḡ‖² over the last {WINDOW} instrumented steps "
                  f"(McCandlish et al. average both before dividing): {running[-1]:.4g}.",
                  ""]  # fmt: skip
    return "\n".join(lines)


WINDOW = 8  # instrumented steps in the noise scale's running ratio


def _window_ratio(num, den, window: int = WINDOW) -> np.ndarray:
    """``Σ num / Σ den`` over the last ``window`` entries up to each one (NaN entries left
    out)."""
    num, den = np.nan_to_num(num), np.nan_to_num(den)
    c_num, c_den = np.cumsum(num), np.cumsum(den)
    lag = lambda c: np.concatenate([np.zeros(window), c[:-window]])[: len(c)]  # noqa: E731
    with np.errstate(invalid="ignore", divide="ignore"):
        return (c_num - lag(c_num)) / (c_den - lag(c_den))
