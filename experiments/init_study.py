"""Initialization study: why "small random" weights do not train a deep ReLU net, and He does.

Trains the same MLP (``--width`` units, ReLU, softmax cross-entropy) on digits under several
init schemes at several depths, ``--seeds`` seeds each, with plain SGD (``--optimizer adam`` as
an option). Every seed and scheme of one depth trains in ONE XLA program: the population is
stacked on a leading axis and each epoch is :func:`fnbp.train.make_population_epoch`, a
``vmap`` over members of a ``lax.scan`` over mini-batches. After every epoch the whole
population is evaluated at once (vmapped): test accuracy, and on a fixed probe batch each
layer's ‖∂L/∂W⁽ˡ⁾‖, mean ‖δ⁽ˡ⁾‖ and activation std (:func:`fnbp.diagnostics.layer_stats`).
Non-finite values are recorded, not fatal: an exploding run is a result.

    python experiments/init_study.py [--quick] [--depths 5,10,20,30] [--optimizer adam] [--out DIR]
"""

from __future__ import annotations

import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import fnbp
from fnbp import data, diagnostics, report, train

SCHEMES = {
    "naive": fnbp.SCHEMES["naive"],  # N(0, 0.01²)
    "naive_unit": fnbp.normal_scheme(1.0, name="naive_unit"),  # N(0, 1)
    "lecun_normal": fnbp.SCHEMES["lecun_normal"],
    "glorot_normal": fnbp.SCHEMES["glorot_normal"],
    "he_normal": fnbp.SCHEMES["he_normal"],
}
LABELS = {
    "naive": "naive N(0, 0.01²)",
    "naive_unit": "naive N(0, 1)",
    "lecun_normal": "LeCun normal",
    "glorot_normal": "Glorot normal",
    "he_normal": "He normal",
}
TRAINED = 0.5  # a run "trained" when its test accuracy exceeds this


def _finite_or_nan(v):
    return np.where(np.isfinite(v), v, np.nan)


def nudge(params, ulps: int):
    """Every parameter moved ``ulps`` units in the last place towards +∞: a perturbation the
    size of one rounding, the kind another host's instruction set or thread split makes."""
    for _ in range(ulps):
        params = jax.tree.map(lambda v: jnp.nextafter(v, jnp.asarray(jnp.inf, v.dtype)), params)
    return params


def train_depth(depth, args, ds, bar) -> dict:
    """Train every scheme × seed at one depth in one vmapped, scan-fused program per epoch."""
    names = args.schemes
    K, S = len(names), args.seeds
    model = fnbp.MLP((ds.num_features, *([args.width] * depth), ds.num_classes), "relu")
    seed_keys = jax.random.split(jax.random.fold_in(jax.random.key(args.seed), depth), S)
    params = train.init_population(seed_keys, model, [SCHEMES[n] for n in names])
    params = nudge(params, args.init_ulps)
    optimizer = optax.sgd(args.lr) if args.optimizer == "sgd" else optax.adam(args.lr)
    opt_states = jax.vmap(optimizer.init)(params)
    epoch_fn = train.make_population_epoch(model, optimizer, batch_size=args.batch_size)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    x_test, y_test = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    probe_x, probe_y = x[: args.probe], y[: args.probe]

    @jax.jit
    def evaluate(params):
        acc = jax.vmap(lambda p: fnbp.model._accuracy_jit(p, model, x_test, y_test))(params)
        stats = jax.vmap(lambda p: diagnostics._layer_stats(p, model, probe_x, probe_y))(params)
        return acc, stats

    def record(acc, stats):
        return {
            "test_accuracy": np.asarray(acc).reshape(K, S),
            "weight_grad_norm": np.asarray(stats["weight_grad_norm"]).reshape(K, S, -1),
            "delta_norm": np.asarray(stats["delta_norm"]).reshape(K, S, -1),
            "activation_std": np.asarray(stats["activation_std"]).reshape(K, S, -1),
        }

    history = {"train_loss": [], "nonfinite_steps": []}
    at_init = record(*evaluate(params))
    epochs = []
    for epoch in range(1, args.epochs + 1):
        # One shuffle per seed, shared by the schemes: every scheme sees the same batches.
        keys = jnp.tile(jax.random.split(jax.random.fold_in(seed_keys[0], epoch), S), K)
        params, opt_states, metrics = epoch_fn(params, opt_states, keys, x, y)
        losses = np.asarray(metrics["loss"]).reshape(K, S, -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a seed whose every step is NaN
            history["train_loss"].append(np.nanmean(_finite_or_nan(losses), axis=2))
        history["nonfinite_steps"].append(np.sum(~np.isfinite(losses), axis=2))
        epochs.append(record(*evaluate(params)))
        bar.update(1)
        bar.set_postfix(depth=depth, epoch=epoch)
    stack = lambda key: np.stack([e[key] for e in epochs], axis=-1 if key == "test_accuracy" else 2)  # noqa: E731
    acc = stack("test_accuracy")  # (K, S, E)
    crossed = np.where((acc > TRAINED).any(-1), np.argmax(acc > TRAINED, axis=-1) + 1, -1)
    return {
        "depth": depth,
        "schemes": names,
        "train_loss": np.stack(history["train_loss"], axis=-1),  # (K, S, E), NaN where non-finite
        "nonfinite_steps": np.stack(history["nonfinite_steps"], axis=-1),  # (K, S, E)
        "test_accuracy": acc,
        "crossed_epoch": crossed,  # (K, S): first epoch above 50%, −1 if never
        "init": at_init,
        "final": epochs[-1],
        "weight_grad_norm": stack("weight_grad_norm"),  # (K, S, E, L)
        "delta_norm": stack("delta_norm"),
        "activation_std": stack("activation_std"),
    }


def run(args) -> dict:
    ds = data.load_digits(seed=args.seed)
    results = {}
    with tqdm(total=args.epochs * len(args.depths), desc="init study", unit="epoch") as bar:
        for depth in args.depths:
            results[depth] = train_depth(depth, args, ds, bar)
    return results


def summary_rows(results, args):
    rows = []
    for depth, r in results.items():
        for k, name in enumerate(r["schemes"]):
            final = r["test_accuracy"][k, :, -1]
            crossed = r["crossed_epoch"][k]
            ok = crossed > 0
            rows.append(
                {
                    "depth": depth,
                    "scheme": name,
                    "final_accuracy_mean": float(np.mean(final)),
                    "final_accuracy_std": float(np.std(final)),
                    # what survives a host's rounding: the median and the spread (docs/experiments/init_study.md)
                    "final_accuracy_median": float(np.median(final)),
                    "final_accuracy_min": float(np.min(final)),
                    "final_accuracy_max": float(np.max(final)),
                    "trained_seeds": int(np.sum(final > TRAINED)),
                    "seeds": int(len(final)),
                    "median_crossing_epoch": float(np.median(crossed[ok])) if ok.any() else None,
                    "nonfinite_seeds": int(np.sum(r["nonfinite_steps"][k].sum(-1) > 0)),
                    "first_layer_grad_at_init": float(
                        np.nanmean(r["init"]["weight_grad_norm"][k, :, 0])
                    ),
                    "last_layer_grad_at_init": float(
                        np.nanmean(r["init"]["weight_grad_norm"][k, :, -1])
                    ),
                }
            )
    return rows


def plots(results, run_dir, args) -> list[str]:
    names = []
    depths = list(results)
    colors = {n: f"C{i}" for i, n in enumerate(SCHEMES)}
    epochs = np.arange(1, args.epochs + 1)

    fig, axes = report.figure(1, len(depths), (4.2, 3.6))
    for ax, depth in zip(axes[0], depths, strict=True):
        r = results[depth]
        for k, name in enumerate(r["schemes"]):
            loss = r["train_loss"][k]  # (S, E), NaN once a seed went non-finite
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # epochs where every seed is NaN
                m, lo, hi = np.nanmean(loss, 0), np.nanmin(loss, 0), np.nanmax(loss, 0)
            ax.plot(epochs, m, color=colors[name], label=LABELS[name])
            ax.fill_between(epochs, lo, hi, color=colors[name], alpha=0.15)
        ax.set(title=f"{depth} hidden layers", xlabel="epoch", ylabel="train loss", yscale="log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    names.append(report.save_figure(fig, run_dir / "loss_curves.png"))

    fig, axes = report.figure(1, 1, (5.5, 4.0))
    ax = axes[0][0]
    for name in args.schemes:
        means = [
            np.mean(results[d]["test_accuracy"][args.schemes.index(name), :, -1]) for d in depths
        ]
        stds = [
            np.std(results[d]["test_accuracy"][args.schemes.index(name), :, -1]) for d in depths
        ]
        ax.errorbar(
            depths, means, yerr=stds, marker="o", capsize=3, color=colors[name], label=LABELS[name]
        )
    ax.axhline(TRAINED, color="k", lw=0.8, ls=":")
    ax.set(
        xlabel="hidden layers",
        ylabel="final test accuracy",
        title=f"digits, width {args.width}, {args.optimizer}",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    names.append(report.save_figure(fig, run_dir / "accuracy_vs_depth.png"))

    fig, axes = report.figure(2, len(depths), (4.2, 3.4))
    for col, depth in enumerate(depths):
        r = results[depth]
        for row, (key, when) in enumerate(
            (("init", "at init"), ("final", f"after {args.epochs} epochs"))
        ):
            ax = axes[row][col]
            for k, name in enumerate(r["schemes"]):
                g = _finite_or_nan(r[key]["weight_grad_norm"][k])  # (S, L)
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter(
                        "ignore", RuntimeWarning
                    )  # all-NaN layers of exploded runs
                    mean = np.nanmean(g, 0)
                ax.plot(
                    np.arange(1, g.shape[1] + 1),
                    mean,
                    marker=".",
                    color=colors[name],
                    label=LABELS[name],
                )
            ax.set(
                yscale="log", title=f"{depth} layers, {when}", xlabel="layer l", ylabel="‖∂L/∂W⁽ˡ⁾‖"
            )
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    names.append(report.save_figure(fig, run_dir / "grad_profiles.png"))
    return names


def verdict(rows, deepest):
    """Does this setting replay He et al. (2015): Xavier/Glorot stalls at 30 layers, He trains?"""
    by = {(r["depth"], r["scheme"]): r for r in rows}
    he, glorot = by.get((deepest, "he_normal")), by.get((deepest, "glorot_normal"))
    if he is None or glorot is None:
        return (
            "He or Glorot was not in this run, so the comparison with He et al. (2015) is not made."
        )
    he_text = f"He trained {he['trained_seeds']}/{he['seeds']} seeds (final accuracy {he['final_accuracy_mean']:.3f})"
    gl_text = f"Glorot trained {glorot['trained_seeds']}/{glorot['seeds']} (final accuracy {glorot['final_accuracy_mean']:.3f})"
    crossing = lambda r: r["median_crossing_epoch"] or float("inf")  # noqa: E731
    if (
        glorot["trained_seeds"] <= glorot["seeds"] // 4
        and he["trained_seeds"] >= 3 * he["seeds"] / 4
    ):
        return f"Yes: at {deepest} hidden layers {he_text}, while {gl_text}: Glorot stalls, as He et al. saw."
    if glorot["final_accuracy_mean"] < he["final_accuracy_mean"] - 0.05 or crossing(
        glorot
    ) > crossing(he):
        return (
            f"Partly: at {deepest} hidden layers {he_text} and {gl_text}; Glorot is behind "
            f"(it crosses 50% at epoch {crossing(glorot):g} against He's {crossing(he):g}) but does not stall "
            f"outright. With σ_w² = 1 its ‖δ‖² halves per layer, 2^-{deepest} over the net, which slows the "
            "early layers without freezing them."
        )
    return (
        f"No: at {deepest} hidden layers {he_text} and {gl_text}: in this MLP setting Glorot trains "
        "about as well as He (He et al.'s 30-layer net was convolutional, on ImageNet)."
    )


def write_report(results, rows, run_dir, args, figures, seconds):
    table = report.markdown_table(
        ["depth", "scheme", "final test acc.", "median [min, max]", "trained seeds", "crossed 50% (median epoch)", "non-finite seeds", "‖∂L/∂W⁽¹⁾‖ at init", "‖∂L/∂W⁽ᴸ⁾‖ at init"],
        [
            [
                r["depth"], LABELS[r["scheme"]], f"{r['final_accuracy_mean']:.3f} ± {r['final_accuracy_std']:.3f}",
                f"{r['final_accuracy_median']:.3f} [{r['final_accuracy_min']:.3f}, {r['final_accuracy_max']:.3f}]",
                f"{r['trained_seeds']}/{r['seeds']}", "never" if r["median_crossing_epoch"] is None else f"{r['median_crossing_epoch']:g}",
                r["nonfinite_seeds"], r["first_layer_grad_at_init"], r["last_layer_grad_at_init"],
            ]
            for r in rows
        ],
    )  # fmt: skip
    deepest = max(results)
    by = {(r["depth"], r["scheme"]): r for r in rows}
    scale_text = " ".join(
        f"At {d} layers the first layer's gradient at init is {by[(d, n)]['first_layer_grad_at_init'] / by[(d, 'he_normal')]['first_layer_grad_at_init']:.1e} × He's for {LABELS[n]}."
        for d in sorted(results)
        for n in ("lecun_normal", "naive")
        if (d, n) in by
        and (d, "he_normal") in by
        and by[(d, "he_normal")]["first_layer_grad_at_init"] > 0
    )
    adam_note = (
        "Adam rescales every parameter's step by its own gradient history, so a vanishing ‖∂L/∂W⁽ˡ⁾‖ no "
        "longer means a vanishing step: compare this run with the SGD one to see which failures are about "
        "gradient scale (Adam rescues them) and which are about the signal itself (dead or saturated units, "
        "non-finite values, which it cannot)."
        if args.optimizer == "adam"
        else "Run with `--optimizer adam` to see what an adaptive optimizer changes: it rescales each "
        "parameter's step by its own gradient history, which undoes vanishing gradient *scale* but not a "
        "dead or non-finite forward signal."
    )
    text = f"""# Initialization study

Digits (1437 train / 360 test), ReLU MLPs of width {args.width}, {args.seeds} seeds per scheme, {args.epochs} epochs of
{args.optimizer} (lr {args.lr:g}, batch {args.batch_size}). "Trained" means test accuracy above {TRAINED:.0%}; a run is
recorded, not stopped, when its loss turns non-finite. Each depth trains all {len(args.schemes)} schemes × {args.seeds} seeds in one
vmapped, scan-fused XLA program per epoch.

{table}

**He et al. (2015) at {deepest} layers.** {verdict(rows, deepest)}

![loss curves]({figures[0]})

Train loss per epoch, mean over seeds, band from min to max.

How to read it. In a ReLU net every layer scales the forward signal ‖a‖² and the backward signal ‖δ‖² by
the same factor σ_w²/2, so ‖∂L/∂W⁽ˡ⁾‖ ∝ ‖δ⁽ˡ⁾‖·‖a⁽ˡ⁻¹⁾‖ is about the same for every layer (the flat lines of
the gradient profiles below) while its overall size goes as (σ_w²/2)^(L/2). {scale_text}
He (σ_w² = 2, factor 1) keeps the scale at every depth; LeCun and Glorot (σ_w² = 1 for the square hidden
layers, factor ½) lose 2^(−L/2) in gradient size, about 3·10⁻⁵ at 30 layers; naive N(0, 0.01²)
(σ_w² = 10⁻⁴·{args.width}) shrinks ‖a‖² and ‖δ‖² by {1e-4 * args.width / 2:.2g} per layer, so even 5 layers leave SGD almost nothing,
and deeper nets underflow float32 to exactly 0. Naive N(0, 1) (σ_w² = {args.width}) multiplies the signal by
{args.width // 2} per layer instead (in ‖a‖²), and overflows.

![accuracy vs depth]({figures[1]})

![gradient profiles]({figures[2]})

Per-layer ‖∂L/∂W⁽ˡ⁾‖ on a probe batch of {args.probe}, mean over seeds: at init (top) and after training (bottom).

{adam_note}

Run time: {seconds:.1f} s.
"""
    (run_dir / "report.md").write_text(text)


def parse_args(argv):
    p = report.experiment_parser("init_study", __doc__)
    p.add_argument(
        "--depths", default="5,10,20,30", help="comma-separated numbers of hidden layers"
    )
    p.add_argument(
        "--schemes", default=",".join(SCHEMES), help=f"comma-separated, from {', '.join(SCHEMES)}"
    )
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lr", type=float, help="default 0.01 for sgd, 1e-3 for adam")
    p.add_argument("--probe", type=int, default=256, help="probe batch for per-layer statistics")
    p.add_argument(
        "--init-ulps", type=int, default=0,
        help="move every initial parameter this many ulps up: a perturbation the size of one "
        "rounding, to see how far the results would move between hosts",
    )  # fmt: skip
    args = p.parse_args(argv)
    try:
        args.depths = [int(d) for d in args.depths.split(",")]
    except ValueError:
        p.error(f"--depths must be comma-separated integers, got {args.depths!r}")
    args.schemes = args.schemes.split(",")
    unknown = [s for s in args.schemes if s not in SCHEMES]
    if unknown:
        p.error(f"unknown scheme(s) {unknown}; choose from {list(SCHEMES)}")
    if args.lr is None:
        args.lr = 0.01 if args.optimizer == "sgd" else 1e-3
    if args.quick:
        args.depths, args.width, args.seeds, args.epochs, args.probe = [2, 8], 32, 2, 3, 64
    for name in ("width", "seeds", "epochs", "batch_size", "probe"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.init_ulps < 0:
        p.error(f"--init-ulps must be >= 0, got {args.init_ulps}")
    if min(args.depths) < 1 or not args.lr > 0:
        p.error("depths must be >= 1 and --lr > 0")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    run_dir = report.start_run("init_study", args)
    start = time.perf_counter()
    results = run(args)
    seconds = time.perf_counter() - start
    rows = summary_rows(results, args)
    figures = plots(results, run_dir, args)
    report.save_json(
        run_dir / "results.json",
        {"summary": rows, "runs": {str(d): r for d, r in results.items()}, "seconds": seconds},
    )
    write_report(results, rows, run_dir, args, figures, seconds)
    print(
        f"init study ({args.optimizer}, width {args.width}, {args.seeds} seeds, {args.epochs} epochs, {seconds:.0f} s):"
    )
    print(f"  {'depth':>5}  {'scheme':<20} {'final test acc':>15}  {'median':>6}  {'trained':>7}")
    for r in rows:
        print(
            f"  {r['depth']:>5}  {LABELS[r['scheme']]:<20} {r['final_accuracy_mean']:>8.3f} ± {r['final_accuracy_std']:.3f}"
            f"  {r['final_accuracy_median']:>6.3f}  {r['trained_seeds']:>3}/{r['seeds']}"
        )
    print(f"  He et al. (2015): {verdict(rows, max(results))}")
    print(f"report: {run_dir / 'report.md'}")
    return str(run_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
