"""The gradient noise scale and the critical batch size: does B_simple predict where larger
batches stop paying? (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training")

On digits (MLP 64-128-128-10) and MNIST-1D (MLP 40-256-256-10), ReLU, He init, SGD with
momentum ``--momentum``; every step draws its ``B`` examples i.i.d. (with replacement) from the
training set, the sampling the model assumes.

1. Steps to target. For each batch size of ``--batch-sizes`` every learning rate of ``--lrs``
   × ``--seeds`` seeds trains as one vmapped population (one ``lax.scan`` of
   :func:`fnbp.make_train_step` per chunk of steps, then the test accuracy of every member).
   A member's steps-to-target is the first step its test accuracy reaches the data set's
   target, interpolated linearly between evaluations. The learning rate is tuned per batch
   size, as McCandlish et al. do: the one whose median over seeds (the upper median for an
   even count) is smallest; the sweep stops once that is decided and all its seeds are
   there. S(B) is the median over seeds at that rate, E(B) = B·S(B) the examples it took.
2. The fit. S = S_min + E_min/B, i.e. (S/S_min − 1)(E/E_min − 1) = 1, fitted by least squares
   on log S; B_crit = E_min/S_min (interval: bootstrap over seeds).
3. The noise scale. A reference run at ``--ref-batch`` with its tuned rate (same inits and
   batches as in the sweep) is stopped at ``--checkpoints`` evenly spaced steps up to
   ``--ref-factor`` × its steps-to-target; at each, :func:`fnbp.gradient_stats` gives
   B_simple = tr Σ / |G|² on the whole training set (Σ the per-example gradient covariance of
   the empirical distribution SGD samples, G its mean gradient: no estimation noise) and, as
   McCandlish et al. estimate it, from ``--noise-batches`` batches of ``--noise-batch``
   examples drawn with replacement: tr Σ and |G|² averaged over the batches before dividing,
   |G|² corrected for its bias E‖ḡ_B‖² = |G|² + tr Σ / B. B_simple where the reference run
   reaches the target, and its time average over the steps to there, are set beside B_crit.

    python experiments/gradient_noise.py [--quick] [--datasets digits,mnist1d] [--out DIR]
"""

from __future__ import annotations

import functools
import math
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import least_squares
from tqdm.auto import tqdm

import fnbp
from fnbp import data, report, train
from fnbp.layers import Dense

MNIST1D_DATA_SEED = 42  # make_dataset's default: the published mnist1d_data.pkl
DATASETS = {
    # name: (loader(seed), hidden width, default target test accuracy)
    "digits": (lambda seed: data.load_digits(seed), 128, 0.95),
    "mnist1d": (lambda seed: data.load_mnist1d(MNIST1D_DATA_SEED), 256, 0.60),
}
BATCH_SIZES = "16,32,64,128,256,512,1024"
LRS = ",".join(f"{0.005 * 2**k:g}" for k in range(9))  # 0.005 … 1.28, factors of 2


def build(features: int, width: int, classes: int) -> fnbp.Net:
    return fnbp.Net(features, [Dense(width, "relu"), Dense(width, "relu"), Dense(classes)])


def optimizer(momentum: float) -> optax.GradientTransformation:
    """SGD whose learning rate sits in the optimizer state, so each member of a vmapped
    population can have its own."""
    return optax.inject_hyperparams(optax.sgd)(learning_rate=1.0, momentum=momentum)


def with_lrs(opt_states, lrs: np.ndarray):
    """The population's optimizer states with learning rate ``lrs[m]`` for member ``m``."""
    hyper = {**opt_states.hyperparams, "learning_rate": jnp.asarray(lrs, jnp.float32)}
    return opt_states._replace(hyperparams=hyper)


def make_chunk(net: fnbp.Net, opt, batch_size: int, steps: int):
    """``chunk(params, opt_states, batch_keys, start, x, y, x_test, y_test) -> (params,
    opt_states, loss (P, steps), test_accuracy (P,))``: steps ``start … start+steps−1`` of
    every member of the population (leading axis P), then its test accuracy. Step ``t`` of a
    member draws its batch from ``fold_in(batch_key, t)``, so a trajectory does not depend on
    how it is cut into chunks."""
    step = train.make_train_step(net, opt)
    state = fnbp.init_state(net)

    def member(params, opt_state, key, start, x, y, x_test, y_test):
        def body(carry, t):
            p, o = carry
            idx = jax.random.randint(jax.random.fold_in(key, t), (batch_size,), 0, x.shape[0])
            p, _, o, m = step(p, state, o, None, x[idx], y[idx])
            return (p, o), m["loss"]

        (p, o), loss = jax.lax.scan(body, (params, opt_state), start + jnp.arange(steps))
        return p, o, loss, fnbp.model._accuracy_jit(p, net, x_test, y_test, state)

    return jax.jit(jax.vmap(member, in_axes=(0, 0, 0, None, None, None, None, None)))


def eval_every(batch_size: int, n_test: int) -> int:
    """Steps between evaluations: about a quarter of the test set's size in training
    examples, so that evaluating costs about as much as training (a forward pass is ~⅓ of a
    step per example) and small batches are still resolved to a few percent of their steps."""
    return max(1, round(n_test / (4 * batch_size)))


def steps_to_target(acc: np.ndarray, steps: np.ndarray, target: float) -> np.ndarray:
    """The first step at which each curve of ``acc`` (shape ``(P, T)``, measured at
    ``steps``, shape ``(T,)``) reaches ``target``, interpolated linearly between the two
    evaluations around the crossing; ``inf`` where it never does."""
    out = np.full(acc.shape[0], np.inf)
    for m, a in enumerate(acc):
        hit = np.flatnonzero(a >= target)
        if not hit.size:
            continue
        j = hit[0]
        if j == 0:
            out[m] = steps[0]
            continue
        frac = (target - a[j - 1]) / (a[j] - a[j - 1])
        out[m] = steps[j - 1] + frac * (steps[j] - steps[j - 1])
    return out


def upper_median(v: np.ndarray, axis: int = -1) -> np.ndarray:
    """The ``⌈n/2⌉``-th smallest of ``n`` values along ``axis`` (the median for odd ``n``):
    finite exactly when more than half are, and never below a value not yet seen."""
    return np.sort(v, axis=axis).take(v.shape[axis] // 2, axis=axis)


@functools.partial(jax.jit, static_argnames=("net", "opt", "G", "seeds"))
def _build(net, opt, G, seeds, seed_keys, batch_keys, lrs, x_test, y_test):
    params = train.init_population(seed_keys, net, "he_normal")
    params = jax.tree.map(lambda v: jnp.concatenate([v] * G), params)
    opt_states = with_lrs(jax.vmap(opt.init)(params), jnp.repeat(lrs, seeds))
    state = fnbp.init_state(net)
    acc = jax.vmap(lambda p: fnbp.model._accuracy_jit(p, net, x_test, y_test, state))(params)
    return params, opt_states, jnp.concatenate([batch_keys] * G), acc


def start(net, opt, seed: int, seeds: int, lrs: np.ndarray, x_test, y_test):
    """A population of ``len(lrs)`` × ``seeds`` members (lr-major: member ``g·seeds + s``
    has learning rate ``lrs[g]`` and seed ``s``; every lr starts from the same ``seeds``
    inits and sees the same batches): ``(params, opt_states, batch_keys, test accuracy)``,
    in one jitted program (op by op, it compiled some forty small ones)."""
    seed_keys = jax.random.split(jax.random.key(seed), seeds)
    batch_keys = jax.random.split(jax.random.key(seed + 1), seeds)
    lrs = jnp.asarray(lrs, jnp.float32)
    return _build(net, opt, len(lrs), seeds, seed_keys, batch_keys, lrs, x_test, y_test)


def sweep(net, opt, sets, batch_size: int, lrs: np.ndarray, target: float, args, bar) -> dict:
    """Steps to target at one batch size for every lr × seed, stopped once the tuned lr is
    decided and each of its seeds has reached the target (or after ``--max-steps``)."""
    (x, y), (x_test, y_test) = sets["train"], sets["test"]
    G, S = len(lrs), args.seeds
    params, opt_states, batch_keys, acc0 = start(net, opt, args.seed, S, lrs, x_test, y_test)
    k = eval_every(batch_size, len(y_test))
    chunk = make_chunk(net, opt, batch_size, k)
    accs, steps, t, chosen = [np.asarray(acc0)], [0], 0, None
    while t < args.max_steps:
        params, opt_states, _, acc = chunk(params, opt_states, batch_keys, t, x, y, x_test, y_test)
        t += k
        accs.append(np.asarray(acc))
        steps.append(t)
        cross = steps_to_target(np.stack(accs, 1), np.array(steps), target).reshape(G, S)
        score = upper_median(cross)
        if chosen is None and np.isfinite(score).any():
            chosen = int(np.argmin(score))  # exact: no other lr can still get below it
        bar.set_postfix(batch=batch_size, step=t)
        if chosen is not None and np.isfinite(cross[chosen]).all():
            break
    acc = np.stack(accs, 1).reshape(G, S, -1)
    cross = steps_to_target(acc.reshape(G * S, -1), np.array(steps), target).reshape(G, S)
    if chosen is None:  # nothing reached the target: report the lr of the best final accuracy
        chosen = int(np.argmax(np.median(acc[:, :, -1], 1)))
    S_B = float(np.median(cross[chosen]))
    return {
        "batch_size": batch_size, "eval_every": k, "steps_run": t, "lrs": lrs,
        "chosen_lr": float(lrs[chosen]), "chosen_index": chosen,
        "lr_at_grid_edge": chosen in (0, G - 1),
        "steps_per_seed": cross[chosen], "steps": S_B, "examples": batch_size * S_B,
        "reached_seeds": int(np.isfinite(cross[chosen]).sum()),
        "steps_all": cross,  # (G, S): inf where a member had not reached it when the sweep stopped
        "final_accuracy": acc[:, :, -1],
    }  # fmt: skip


def fit_tradeoff(batch_sizes, steps) -> tuple[float, float]:
    """``(S_min, E_min)`` of S = S_min + E_min/B, least squares on log S (the steps span
    orders of magnitude, so relative misfit is what counts). Equivalent to McCandlish et
    al.'s (S/S_min − 1)(E/E_min − 1) = 1 with E = B·S. Needs two or more finite points."""
    B, S = np.asarray(batch_sizes, float), np.asarray(steps, float)
    ok = np.isfinite(S) & (S > 0)
    B, S = B[ok], S[ok]
    if len(B) < 2:
        raise ValueError(f"fit_tradeoff needs at least 2 finite (B, S) points, got {len(B)}")
    # start from the linear least squares of S on (1, 1/B), weighted by 1/S (relative errors)
    A = np.stack([np.ones_like(B), 1 / B], 1) / S[:, None]
    s0, e0 = np.linalg.lstsq(A, np.ones_like(S), rcond=None)[0]
    start = np.log([max(s0, 1e-3 * S.min()), max(e0, 1e-3 * S.max() * B.min())])

    def residual(theta):
        s_min, e_min = np.exp(theta)
        return np.log(S) - np.log(s_min + e_min / B)

    s_min, e_min = np.exp(least_squares(residual, start, method="lm", xtol=1e-14).x)
    return float(s_min), float(e_min)


def bootstrap_bcrit(rows, reps: int, seed: int) -> tuple[float, float]:
    """The 16th and 84th percentiles of B_crit over ``reps`` refits, each on the median of
    seeds resampled with replacement at every batch size."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(reps):
        med = [np.median(rng.choice(r["steps_per_seed"], len(r["steps_per_seed"]))) for r in rows]
        try:
            s_min, e_min = fit_tradeoff([r["batch_size"] for r in rows], med)
        except ValueError:
            continue
        out.append(e_min / s_min)
    return (float(np.percentile(out, 16)), float(np.percentile(out, 84))) if out else (np.nan,) * 2


def noise_scale(params, net, x, y, rng: np.random.Generator, args) -> dict:
    """tr Σ, |G|² and B_simple at ``params``: on the whole training set ``x, y`` (NumPy
    arrays), and averaged over ``--noise-batches`` batches of ``--noise-batch`` examples
    drawn with replacement by ``rng``."""
    n = x.shape[0]
    whole = fnbp.gradient_stats(params, net, x, y)
    tr_whole = float(whole.trace_cov) * (n - 1) / n  # the empirical distribution's Σ: over n
    g2_whole = float(whole.grad_norm_sq)
    tr, g2 = [], []
    for _ in range(args.noise_batches):
        idx = rng.integers(0, n, args.noise_batch)
        s = fnbp.gradient_stats(params, net, x[idx], y[idx])
        tr.append(float(s.trace_cov))
        g2.append(float(s.grad_norm_sq))
    tr_b, g2_b = float(np.mean(tr)), float(np.mean(g2))
    g2_unbiased = g2_b - tr_b / args.noise_batch
    return {
        "trace_cov": tr_whole, "grad_norm_sq": g2_whole, "b_simple": tr_whole / g2_whole,
        "trace_cov_batches": tr_b, "grad_norm_sq_batches": g2_unbiased,
        "b_simple_batches": tr_b / g2_unbiased if g2_unbiased > 0 else math.inf,
        "b_simple_plug_in": tr_b / g2_b,
    }  # fmt: skip


def reference_run(net, opt, sets, row: dict, args, bar) -> dict:
    """The tuned run at ``--ref-batch`` again, every seed, stopped at evenly spaced steps up
    to ``--ref-factor`` × its steps-to-target for :func:`noise_scale` and the test accuracy."""
    (x, y), (x_test, y_test) = sets["train"], sets["test"]
    S, B = args.seeds, row["batch_size"]
    # the sweep's inits and batches, at the sweep's tuned lr: the sweep's runs again
    params, opt_states, batch_keys, a = start(
        net, opt, args.seed, S, np.array([row["chosen_lr"]]), x_test, y_test
    )
    horizon = args.ref_factor * (row["steps"] if math.isfinite(row["steps"]) else args.max_steps)
    k = max(1, math.ceil(horizon / args.checkpoints))
    chunk = make_chunk(net, opt, B, k)
    rng = np.random.default_rng(args.seed + 2)
    x_host, y_host = np.asarray(x), np.asarray(y)
    points, steps, acc = [], [], []
    for c in range(args.checkpoints + 1):
        if c:
            params, opt_states, _, a = chunk(
                params, opt_states, batch_keys, (c - 1) * k, x, y, x_test, y_test
            )
        steps.append(c * k)
        acc.append(np.asarray(a))
        host = jax.device_get(params)  # slicing members on the host compiles nothing
        points.append([noise_scale(jax.tree.map(lambda v, s=s: v[s], host), net, x_host, y_host,
                                   rng, args) for s in range(S)])  # fmt: skip
        bar.set_postfix(reference=B, step=c * k)
    curves = {m: np.array([[p[s][m] for s in range(S)] for p in points]).T for m in points[0][0]}
    return {"batch_size": B, "lr": row["chosen_lr"], "steps": np.array(steps),
            "test_accuracy": np.stack(acc, 1), **curves}  # fmt: skip


def at_step(steps: np.ndarray, values: np.ndarray, step: float) -> float:
    """``values`` (shape ``(seeds, T)``, positive) at ``step``: the median over seeds of
    log-linear interpolation between checkpoints."""
    if not math.isfinite(step):
        return math.nan
    logs = np.log(np.where(np.isfinite(values) & (values > 0), values, np.nan))
    return float(np.exp(np.nanmedian([np.interp(step, steps, v) for v in logs])))


def mean_until(steps: np.ndarray, values: np.ndarray, step: float) -> float:
    """The time average of ``values`` (shape ``(seeds, T)``) from step 0 to ``step``: the
    trapezoid rule over the checkpoints, the last one interpolated at ``step``; the median
    over seeds."""
    if not math.isfinite(step) or step <= 0:
        return math.nan
    out = []
    for v in values:
        ok = np.isfinite(v)
        t, w = steps[ok], v[ok]
        inside = t < step
        t = np.append(t[inside], step)
        w = np.append(w[inside], np.interp(step, steps[ok], v[ok]))
        out.append(np.sum((w[1:] + w[:-1]) * np.diff(t)) / 2 / step)
    return float(np.median(out))


def run_dataset(name: str, args, bar) -> dict:
    load, width, default_target = DATASETS[name]
    ds = load(args.seed)
    target = args.targets.get(name, default_target)
    sets = {"train": (jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)),
            "test": (jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))}  # fmt: skip
    net = build(ds.num_features, width, ds.num_classes)
    lrs = np.asarray(args.lrs, float)
    opt = optimizer(args.momentum)  # one object: the jitted programs that take it are reused
    rows = []
    for B in args.batch_sizes:  # B may exceed the training set: batches are drawn with replacement
        rows.append(sweep(net, opt, sets, B, lrs, target, args, bar))
        bar.update(1)
    fitted = [r for r in rows if math.isfinite(r["steps"])]
    s_min, e_min = fit_tradeoff([r["batch_size"] for r in fitted], [r["steps"] for r in fitted])
    ref_row = min(rows, key=lambda r: abs(math.log(r["batch_size"] / args.ref_batch)))
    ref = reference_run(net, opt, sets, ref_row, args, bar)
    bar.update(1)
    S_ref = ref_row["steps"]
    noise = {
        "b_simple_at_target": at_step(ref["steps"], ref["b_simple"], S_ref),
        "b_simple_batches_at_target": at_step(ref["steps"], ref["b_simple_batches"], S_ref),
        "b_simple_mean_to_target": mean_until(ref["steps"], ref["b_simple"], S_ref),
        "b_simple_at_init": float(np.median(ref["b_simple"][:, 0])),
        "b_simple_at_end": float(np.median(ref["b_simple"][:, -1])),
        "target_step": S_ref,
    }
    lo, hi = bootstrap_bcrit(fitted, args.bootstrap, args.seed)
    return {
        "dataset": name, "target": target, "width": width,
        "train_examples": len(ds.y_train), "test_examples": len(ds.y_test),
        "sweep": rows, "reference": ref,
        "fit": {"S_min": s_min, "E_min": e_min, "B_crit": e_min / s_min,
                "B_crit_16": lo, "B_crit_84": hi, "points": len(fitted)},
        "noise": noise,
    }  # fmt: skip


def run(args) -> dict:
    total = len(args.datasets) * (len(args.batch_sizes) + 1)  # every sweep, then the reference
    out = {}
    with tqdm(total=total, desc="gradient noise", unit="run") as bar:
        for name in args.datasets:
            out[name] = run_dataset(name, args, bar)
    return out


def summary_rows(results) -> list[dict]:
    rows = []
    for name, r in results.items():
        f, n = r["fit"], r["noise"]
        rows.append({
            "dataset": name, "target": r["target"], "S_min": f["S_min"], "E_min": f["E_min"],
            "B_crit": f["B_crit"], "B_crit_16": f["B_crit_16"], "B_crit_84": f["B_crit_84"],
            "ref_batch": r["reference"]["batch_size"], "target_step": n["target_step"],
            "b_simple_at_init": n["b_simple_at_init"],
            "b_simple_at_target": n["b_simple_at_target"],
            "b_simple_batches_at_target": n["b_simple_batches_at_target"],
            "b_simple_mean_to_target": n["b_simple_mean_to_target"],
            "b_simple_at_end": n["b_simple_at_end"],
            "ratio": n["b_simple_at_target"] / f["B_crit"],
            "ratio_mean": n["b_simple_mean_to_target"] / f["B_crit"],
        })  # fmt: skip
    return rows


def _curve(s_min, e_min, B):
    return s_min + e_min / np.asarray(B, float)


def plots(results, run_dir) -> list[str]:
    names = list(results)
    # 1. steps vs batch, the S–E front, the tuned lr
    fig, axes = report.figure(3, len(names), (4.4, 3.3))
    for col, name in enumerate(names):
        r = results[name]
        f, n = r["fit"], r["noise"]
        Bs = np.array([row["batch_size"] for row in r["sweep"]], float)
        S = np.array([row["steps"] for row in r["sweep"]])
        grid = np.geomspace(Bs.min() / 1.5, Bs.max() * 1.5, 200)
        ax = axes[0][col]
        for row in r["sweep"]:
            v = row["steps_per_seed"][np.isfinite(row["steps_per_seed"])]
            ax.plot([row["batch_size"]] * len(v), v, ".", color="0.6", ms=4)
        ax.plot(Bs, S, "o", color="k", label="measured S(B), median over seeds")
        ax.plot(grid, _curve(f["S_min"], f["E_min"], grid), "-", color="C0",
                label=f"S_min + E_min/B (S_min {f['S_min']:.3g}, E_min {f['E_min']:.3g})")  # fmt: skip
        ax.axhline(f["S_min"], color="C0", ls=":", lw=0.8)
        ax.axvline(f["B_crit"], color="C3", ls="--", label=f"B_crit = {f['B_crit']:.0f}")
        ax.axvspan(f["B_crit_16"], f["B_crit_84"], color="C3", alpha=0.1)
        ax.axvline(n["b_simple_at_target"], color="C2", ls="-.",
                   label=f"B_simple at target = {n['b_simple_at_target']:.0f}")  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="batch size B",
               ylabel=f"steps to {r['target']:.0%} test accuracy", title=name)  # fmt: skip
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3, which="both")
        ax = axes[1][col]
        ax.plot(S, Bs * S, "o-", color="k", label="measured (S, E)")
        for b, s in zip(Bs, S, strict=True):
            if math.isfinite(s):
                ax.annotate(f"{b:g}", (s, b * s), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
        c = _curve(f["S_min"], f["E_min"], grid)
        ax.plot(c, grid * c, "-", color="C0", label="(S/S_min − 1)(E/E_min − 1) = 1")
        ax.axvline(f["S_min"], color="C0", ls=":", lw=0.8)
        ax.axhline(f["E_min"], color="C0", ls=":", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="steps S", ylabel="examples E = B·S",
               title=f"{name}: the S–E front")  # fmt: skip
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3, which="both")
        ax = axes[2][col]
        ax.plot(Bs, [row["chosen_lr"] for row in r["sweep"]], "o-", color="k")
        lrs = r["sweep"][0]["lrs"]
        ax.axhline(min(lrs), color="0.6", lw=0.8)
        ax.axhline(max(lrs), color="0.6", lw=0.8)
        ax.axvline(f["B_crit"], color="C3", ls="--")
        ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="tuned learning rate",
               title=f"{name}: tuned lr (grey: the grid's ends)")  # fmt: skip
        ax.grid(alpha=0.3, which="both")
    steps_png = report.save_figure(fig, run_dir / "steps.png")
    # 2. B_simple, tr Σ and |G|², test accuracy across the reference run
    fig, axes = report.figure(3, len(names), (4.4, 3.0))
    for col, name in enumerate(names):
        r = results[name]
        ref, f, n = r["reference"], r["fit"], r["noise"]
        t = ref["steps"]
        ax = axes[0][col]
        for key, style, label in (("b_simple", "-", "whole training set"),
                                  ("b_simple_batches", "--", "batches, averaged, bias-corrected")):  # fmt: skip
            v = np.where(np.isfinite(ref[key]), ref[key], np.nan)
            with np.errstate(all="ignore"):
                ax.plot(t, np.nanmedian(v, 0), style, color="C2", label=label)
                ax.fill_between(t, np.nanmin(v, 0), np.nanmax(v, 0), color="C2", alpha=0.1)
        ax.axhline(f["B_crit"], color="C3", ls="--", label=f"B_crit (fit) = {f['B_crit']:.0f}")
        ax.axhspan(f["B_crit_16"], f["B_crit_84"], color="C3", alpha=0.1)
        ax.axvline(n["target_step"], color="k", ls=":", label="target reached")
        ax.set(yscale="log", xlabel="step", ylabel="B_simple = tr Σ / |G|²",
               title=f"{name}: batch {ref['batch_size']}, lr {ref['lr']:g}")  # fmt: skip
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3, which="both")
        ax = axes[1][col]
        for key, color, label in (("trace_cov", "C1", "tr Σ"), ("grad_norm_sq", "C0", "|G|²")):
            ax.plot(t, np.median(ref[key], 0), color=color, label=label)
            ax.fill_between(t, ref[key].min(0), ref[key].max(0), color=color, alpha=0.1)
        ax.axvline(n["target_step"], color="k", ls=":")
        ax.set(yscale="log", xlabel="step", ylabel="whole training set")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3, which="both")
        ax = axes[2][col]
        a = ref["test_accuracy"]
        ax.plot(t, np.median(a, 0), color="k")
        ax.fill_between(t, a.min(0), a.max(0), color="k", alpha=0.1)
        ax.axhline(r["target"], color="k", ls=":")
        ax.axvline(n["target_step"], color="k", ls=":")
        ax.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1))
        ax.grid(alpha=0.3)
    noise_png = report.save_figure(fig, run_dir / "bsimple.png")
    return [steps_png, noise_png]


def _fmt_steps(row) -> str:
    v = row["steps_per_seed"]
    if not np.isfinite(v).any():
        return "not reached"
    return f"{row['steps']:.4g} [{np.min(v):.4g}, {np.max(v):.4g}]" + (
        "" if np.isfinite(v).all() else f" ({int(np.isfinite(v).sum())}/{len(v)} seeds)"
    )


def sweep_table(r) -> str:
    f = r["fit"]
    body = [[row["batch_size"], f"{row['chosen_lr']:g}" + (" (grid end)" if row["lr_at_grid_edge"] else ""),
             _fmt_steps(row), f"{row['examples']:.4g}",
             f"{_curve(f['S_min'], f['E_min'], row['batch_size']):.4g}", row["eval_every"]]
            for row in r["sweep"]]  # fmt: skip
    return report.markdown_table(
        ["batch B", "tuned lr", "steps S: median [min, max]", "examples E = B·S", "fit S_min + E_min/B",
         "eval every"],
        body,
    )  # fmt: skip


def summary_table(rows) -> str:
    return report.markdown_table(
        ["data", "target", "S_min", "E_min", "B_crit = E_min/S_min [16%, 84%]", "ref. batch",
         "B_simple at init", "B_simple at target (whole set / batches)",
         "B_simple averaged to target", "B_simple at end", "at target / B_crit", "averaged / B_crit"],
        [[r["dataset"], f"{r['target']:.0%}", f"{r['S_min']:.3g}", f"{r['E_min']:.3g}",
          f"{r['B_crit']:.3g} [{r['B_crit_16']:.3g}, {r['B_crit_84']:.3g}]", r["ref_batch"],
          f"{r['b_simple_at_init']:.3g}",
          f"{r['b_simple_at_target']:.3g} / {r['b_simple_batches_at_target']:.3g}",
          f"{r['b_simple_mean_to_target']:.3g}", f"{r['b_simple_at_end']:.3g}",
          f"{r['ratio']:.2f}", f"{r['ratio_mean']:.2f}"] for r in rows],
    )  # fmt: skip


def _verdict(r) -> str:
    ratio = r["ratio"]
    inside = r["B_crit_16"] <= r["b_simple_at_target"] <= r["B_crit_84"]
    how = "inside" if inside else "outside"
    return (
        f"- {r['dataset']}: B_simple where the reference run reaches {r['target']:.0%} is "
        f"{r['b_simple_at_target']:.3g}, {ratio:.2f}× the fitted B_crit {r['B_crit']:.3g} ({how} its "
        f"16–84% bootstrap interval); averaged over the steps to the target it is "
        f"{r['b_simple_mean_to_target']:.3g}, {r['ratio_mean']:.2f}× B_crit; across the run it grows from "
        f"{r['b_simple_at_init']:.3g} at init to {r['b_simple_at_end']:.3g}."
    )


def write_report(results, rows, run_dir, args, figures, seconds, argv):
    sections = "\n\n".join(
        f"### {name}: target {r['target']:.0%} test accuracy ({r['train_examples']} train, "
        f"{r['test_examples']} test examples; MLP {r['width']}-{r['width']})\n\n{sweep_table(r)}"
        for name, r in results.items()
    )
    edges = [f"{name} at batch {row['batch_size']}" for name, r in results.items()
             for row in r["sweep"] if row["lr_at_grid_edge"]]  # fmt: skip
    edge_text = (
        f"The tuned lr sat at an end of the grid for {', '.join(edges)}: there the steps are an upper "
        "bound on what a wider grid would give."
        if edges else "No tuned lr sat at an end of the grid."
    )  # fmt: skip
    command = "python experiments/gradient_noise.py " + shlex.join(argv)
    text = f"""# The gradient noise scale and the critical batch size

`{command.strip()}`

ReLU MLPs (two hidden layers, He init), SGD with momentum {args.momentum:g}, constant learning rate, every step
drawing its batch i.i.d. with replacement from the training set, {args.seeds} seeds. For each batch size the learning rate
is tuned on the grid {", ".join(f"{v:g}" for v in args.lrs)}: the one with the smallest median steps-to-target over
seeds (McCandlish et al. tune per batch size too). Steps-to-target: the first step the test accuracy reaches the
target, interpolated between evaluations (every "eval every" steps). The same test set measures the target and picks
the lr: this measures optimization speed, it selects no model.

Fit (least squares on log S): S(B) = S_min + E_min/B, equivalently (S/S_min − 1)(E/E_min − 1) = 1 with E = B·S;
B_crit = E_min/S_min, the batch at which a run takes 2·S_min steps and 2·E_min examples. Interval: 16th–84th
percentile over {args.bootstrap} bootstrap refits (seeds resampled at every batch size).

The noise scale B_simple = tr Σ / |G|² (McCandlish et al.'s "simple" noise scale, which equals their B_noise when
the Hessian is a multiple of the identity) is measured with `fnbp.gradient_stats` along a reference run (batch
closest to {args.ref_batch}, its tuned lr, the sweep's inits and batches) at {args.checkpoints} evenly spaced steps up to
{args.ref_factor:g}× its steps-to-target. Whole set: Σ and G of the training set itself (the distribution SGD samples),
exact. Batches: {args.noise_batches} batches of {args.noise_batch} drawn with replacement; tr Σ and ‖ḡ‖² averaged over
them before dividing, as McCandlish et al. recommend (the ratio of averages, not the average of ratios, which a
small noisy denominator would blow up), and |G|² estimated as mean ‖ḡ‖² − tr Σ/{args.noise_batch} (unbiased). "At target":
interpolated at the reference run's steps-to-target. "Averaged to target": its mean over the steps from 0 to
there (trapezoid rule over the checkpoints, whole-set values). Why both: if each stretch of training obeys the model
with its own noise scale, dS = dS_min·(1 + B_noise(t)/B), then integrating along the run gives S = S_min + E_min/B with
E_min = ∫ B_noise dS_min, so B_crit = E_min/S_min is B_noise averaged over the run (weighted by where the minimal
steps are spent), not its value at the end. The reference run's time average is a proxy for that weighting, not the
same thing.

{summary_table(rows)}

{chr(10).join(_verdict(r) for r in rows)}

{edge_text}

{sections}

![steps to target]({figures[0]})

Top: steps to the target against batch size (grey: seeds at the tuned lr; black: median), the fit, B_crit (dashed,
band: bootstrap interval) and B_simple at the target (dash-dot). Middle: the same runs as steps against examples,
with the fitted hyperbola. Bottom: the tuned learning rate (the model predicts ε_opt ∝ B below B_noise, flat above).

![noise scale]({figures[1]})

The reference run: B_simple (median over seeds, band min–max) from the whole training set and from the averaged
batches; tr Σ and |G|² on the whole set; the test accuracy. B_simple grows as |G|² falls.

How to read it. Below B_crit doubling the batch nearly halves the steps (perfect scaling, E ≈ E_min); above it the
steps approach S_min and each doubling of the batch mostly doubles the examples spent. McCandlish et al. find the
measured noise scale tracks B_crit across tasks (roughly, not exactly), both growing as the loss falls; the ratio
columns say how close it comes here. B_simple is a property of the parameters reached, measured at one point of one
run; B_crit summarizes whole runs to the target, so they need not agree exactly.

Run time: {seconds:.0f} s.
"""
    (run_dir / "report.md").write_text(text)


def _numbers(p, flag, text, kind):
    try:
        return [kind(v) for v in text.split(",") if v]
    except ValueError:
        p.error(f"{flag} must be comma-separated numbers, got {text!r}")


def parse_args(argv):
    p = report.experiment_parser("gradient_noise", __doc__)
    p.add_argument(
        "--datasets", default="digits,mnist1d", help=f"comma-separated, from {', '.join(DATASETS)}"
    )
    p.add_argument("--batch-sizes", default=BATCH_SIZES, help="comma-separated")
    p.add_argument("--lrs", default=LRS, help="comma-separated learning-rate grid")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--targets", default="", help="e.g. digits=0.95,mnist1d=0.6 (these are the defaults)"
    )
    p.add_argument("--max-steps", type=int, default=5000, help="a batch size's sweep stops here")
    p.add_argument(
        "--ref-batch", type=int, default=128, help="the reference run's batch (nearest swept)"
    )
    p.add_argument(
        "--ref-factor", type=float, default=2.0, help="reference run: this × its steps-to-target"
    )
    p.add_argument("--checkpoints", type=int, default=30, help="noise-scale checkpoints")
    p.add_argument("--noise-batch", type=int, default=1024)
    p.add_argument("--noise-batches", type=int, default=4)
    p.add_argument("--bootstrap", type=int, default=200, help="refits for B_crit's interval")
    args = p.parse_args(argv)
    args.datasets = [d for d in args.datasets.split(",") if d]
    unknown = [d for d in args.datasets if d not in DATASETS]
    if unknown or not args.datasets:
        p.error(f"--datasets: unknown {unknown}; choose from {list(DATASETS)}")
    args.batch_sizes = _numbers(p, "--batch-sizes", args.batch_sizes, int)
    args.lrs = _numbers(p, "--lrs", args.lrs, float)
    targets = {}
    for item in [t for t in args.targets.split(",") if t]:
        name, _, value = item.partition("=")
        if name not in DATASETS:
            p.error(f"--targets: unknown data set {name!r}; choose from {list(DATASETS)}")
        try:
            targets[name] = float(value)
        except ValueError:
            p.error(f"--targets: {item!r} must read NAME=ACCURACY, e.g. digits=0.95")
    args.targets = targets
    if args.quick:
        args.datasets, args.batch_sizes, args.lrs = (
            ["digits"],
            [16, 64, 256],
            [0.01, 0.04, 0.16, 0.64],
        )
        args.seeds, args.checkpoints, args.noise_batches, args.bootstrap = 2, 4, 2, 50
        args.noise_batch = 1437  # digits' training set: the whole-set shape, one compile fewer
        args.targets = {"digits": 0.9, **targets}
    if len(args.batch_sizes) < 2 or min(args.batch_sizes) < 1:
        p.error(f"--batch-sizes needs at least two sizes >= 1, got {args.batch_sizes}")
    if not args.lrs or min(args.lrs) <= 0:
        p.error(f"--lrs must be positive, got {args.lrs}")
    if not all(0 < t <= 1 for t in args.targets.values()):
        p.error(f"--targets: accuracies must lie in (0, 1], got {args.targets}")
    if not 0 <= args.momentum < 1:
        p.error(f"--momentum must lie in [0, 1), got {args.momentum}")
    for name in ("seeds", "max_steps", "ref_batch", "checkpoints", "noise_batches", "bootstrap"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.noise_batch < 2:
        p.error(f"--noise-batch must be >= 2 (a sample variance), got {args.noise_batch}")
    if not args.ref_factor > 0:
        p.error(f"--ref-factor must be > 0, got {args.ref_factor}")
    return args


def main(argv=None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    run_dir = report.start_run("gradient_noise", args)
    start = time.perf_counter()
    results = run(args)
    seconds = time.perf_counter() - start
    rows = summary_rows(results)
    figures = plots(results, run_dir)
    report.save_json(
        run_dir / "results.json", {"summary": rows, "datasets": results, "seconds": seconds}
    )
    write_report(results, rows, run_dir, args, figures, seconds, argv)
    print(f"gradient noise ({args.seeds} seeds, {seconds:.0f} s):")
    for r in rows:
        print(f"  {r['dataset']:<8} target {r['target']:.0%}: S_min {r['S_min']:.3g}, E_min {r['E_min']:.3g}, "
              f"B_crit {r['B_crit']:.3g} [{r['B_crit_16']:.3g}, {r['B_crit_84']:.3g}]; B_simple at target "
              f"{r['b_simple_at_target']:.3g} (batches {r['b_simple_batches_at_target']:.3g}), "
              f"init {r['b_simple_at_init']:.3g}, end {r['b_simple_at_end']:.3g}")  # fmt: skip
        for row in results[r["dataset"]]["sweep"]:
            print(
                f"    B {row['batch_size']:>5}  lr {row['chosen_lr']:<6g} steps {_fmt_steps(row)}"
            )
    print(f"report: {run_dir / 'report.md'}")
    return str(run_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
