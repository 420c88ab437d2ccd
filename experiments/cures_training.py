"""Which cures make which depths trainable: plain, residual and normalized ReLU nets, trained.

On digits and MNIST-1D, at ``--depths`` hidden dense layers of ``--width`` units: a plain ReLU
stack, residual MLPs (``--depth``/2 blocks x + α·W₂φ(W₁x), :func:`fnbp.presets.resmlp`) at
α = 1 and α = 1/√blocks, Dense→BatchNorm→ReLU and Dense→LayerNorm→ReLU stacks, and residual
blocks with BatchNorm in the branch at α = 1; each from He and from naive N(0, 0.01²) weights,
with plain SGD and with Adam, ``--seeds`` seeds each. For one data set and depth every variant,
init, optimizer and seed trains in ONE jitted XLA program per epoch: each (variant, optimizer)
population (inits × seeds on a leading axis) is a :func:`fnbp.make_population_epoch`, a
``vmap`` over members of a ``lax.scan`` over mini-batches, and all of them are traced into one
``jax.jit``. After every epoch the test accuracy of every member is computed (eval mode:
BatchNorm's running statistics). At init, on a probe batch, the hand-written backprop gives
each weight layer's ‖∂L/∂W⁽ˡ⁾‖ (train mode), which the report sets beside who trained.

    python experiments/cures_training.py [--quick] [--datasets digits,mnist1d] [--depths 30,100]
"""

from __future__ import annotations

import math
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import fnbp
from fnbp import data, diagnostics, presets, report, theory, train
from fnbp.layers import BatchNorm, Dense, LayerNorm

TRAINED = 0.5  # a run "trained" when its final test accuracy exceeds this
INITS = {"he": fnbp.SCHEMES["he_normal"], "naive": fnbp.SCHEMES["naive"]}  # naive: N(0, 0.01²)
INIT_LABELS = {"he": "He", "naive": "naive N(0, 0.01²)"}
VARIANTS = {
    "plain": "plain ReLU",
    "res_1": "residual, α = 1",
    "res_sqrt": "residual, α = 1/√L",
    "batchnorm": "Dense→BN→ReLU",
    "layernorm": "Dense→LN→ReLU",
    "res_bn": "residual + BN, α = 1",
}
DATASETS = {"digits": data.load_digits, "mnist1d": data.load_mnist1d}


def build(variant: str, depth: int, width: int, features: int, classes: int) -> fnbp.Net:
    """The ``variant`` net with ``depth`` hidden dense layers (residual nets: ``depth // 2``
    blocks of two, after one Dense(width)) of ``width`` units."""

    def stack(body):
        return fnbp.Net(
            features, [layer for _ in range(depth) for layer in body] + [Dense(classes)]
        )

    blocks = depth // 2
    return {
        "plain": lambda: stack([Dense(width, "relu")]),
        "batchnorm": lambda: stack([Dense(width, use_bias=False), BatchNorm(activation="relu")]),
        "layernorm": lambda: stack([Dense(width, use_bias=False), LayerNorm(activation="relu")]),
        "res_1": lambda: presets.resmlp(features, classes, depth=blocks, width=width, alpha=1.0),
        "res_sqrt": lambda: presets.resmlp(features, classes, depth=blocks, width=width),
        "res_bn": lambda: presets.resmlp(
            features, classes, depth=blocks, width=width, norm="batch", alpha=1.0
        ),
    }[variant]()


def optimizers(args) -> dict[str, optax.GradientTransformation]:
    made = {"sgd": lambda: optax.sgd(args.sgd_lr), "adam": lambda: optax.adam(args.adam_lr)}
    return {name: made[name]() for name in args.optimizers}


def _population(net, seed_keys, P: int):
    """Params for every init × seed (init-major) and a state per member."""
    params = train.init_population(seed_keys, net, list(INITS.values()))
    states = jax.vmap(lambda _: fnbp.init_state(net))(jnp.arange(P))
    return params, states


def _at_init(net, params, states, x, y) -> tuple[np.ndarray, np.ndarray]:
    """From the hand-written backprop on the probe batch ``x, y`` (train mode: batch
    statistics), per member: the first weight layer's ‖∂L/∂W⁽¹⁾‖, and the mean per-example
    ‖δ‖ there over ‖δ‖ at the last weight layer below the output (the top residual block for
    residual nets): ≪ 1 when the gradient vanishes toward the input, ≫ 1 when it explodes."""
    stats = jax.jit(jax.vmap(
        lambda p, s: diagnostics._layer_stats(p, net, x, y, s, None, net.needs_train)
    ))(params, states)  # fmt: skip
    g, d = np.asarray(stats["weight_grad_norm"]), np.asarray(stats["delta_norm"])
    weighted = np.flatnonzero(~np.isnan(g).any(0))  # normalization layers have no weights
    with np.errstate(all="ignore"):  # 0/0 where both underflowed
        return g[:, weighted[0]], d[:, weighted[0]] / d[:, weighted[-2]]


def predicted_ratio(variant: str, depth: int, init: str, width: int, probe_x) -> float:
    """Mean-field's ‖δ⁽¹⁾‖/‖δ⁽ᴸ⁻¹⁾‖ at init, the square root of :mod:`fnbp.theory`'s E‖δ‖²
    ratio over the ``depth − 1`` dense layers (``depth/2`` blocks) between the two: σ_w² = 2
    (He) or 10⁻⁴·width (naive), the stream entering the first block E[x²] = σ_w²(first)·
    mean(x²) from the probe inputs."""
    features = probe_x.shape[1]
    s2 = 2.0 if init == "he" else 1e-4 * width
    m0 = float(np.mean(np.square(probe_x))) * (2.0 if init == "he" else 1e-4 * features)
    blocks, n = depth // 2, depth - 1
    if variant == "plain":
        per_layer = theory.chi1("relu", s2)
    elif variant == "batchnorm":
        per_layer = theory.batchnorm_factor("relu", probe_x.shape[0])
    elif variant == "layernorm":
        per_layer = theory.layernorm_factor("relu", "before", s2)
    else:
        ordering, alpha = {"res_1": ("linear", 1.0), "res_sqrt": ("linear", blocks**-0.5),
                           "res_bn": ("bn", 1.0)}[variant]  # fmt: skip
        return math.sqrt(theory.residual_chain(ordering, "relu", s2, alpha, blocks, m0).total)
    return math.sqrt(per_layer**n)


def train_depth(name: str, ds, depth: int, args, bar) -> dict:
    """Every variant × optimizer × init × seed at one depth: one XLA program per epoch."""
    K, S = len(INITS), args.seeds
    P = K * S
    seed_keys = jax.random.split(jax.random.fold_in(jax.random.key(args.seed), depth), S)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    x_test, y_test = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    probe_x, probe_y = x[: args.probe], y[: args.probe]
    runs, carries, epochs_fns, nets = [], [], [], []
    for variant in args.variants:
        net = build(variant, depth, args.width, ds.num_features, ds.num_classes)
        params, states = _population(net, seed_keys, P)
        at_init = _at_init(net, params, states, probe_x, probe_y)
        predicted = [
            predicted_ratio(variant, depth, i, args.width, np.asarray(probe_x)) for i in INITS
        ]
        for opt_name, opt in optimizers(args).items():
            runs.append((variant, opt_name, at_init, predicted))
            carries.append((params, states, jax.vmap(opt.init)(params)))
            epochs_fns.append(train.make_population_epoch(net, opt, batch_size=args.batch_size))
            nets.append(net)

    @jax.jit
    def epoch_all(carries, keys):
        return [fn(*c, keys, x, y) for fn, c in zip(epochs_fns, carries, strict=True)]

    @jax.jit
    def evaluate_all(carries):
        return [
            jax.vmap(lambda p, s, net=net: fnbp.model._accuracy_jit(p, net, x_test, y_test, s))(
                c[0], c[1]
            )
            for net, c in zip(nets, carries, strict=True)
        ]

    acc, loss = [], []
    for epoch in range(1, args.epochs + 1):
        # One shuffle per seed, shared by the inits: every init sees the same batches.
        keys = jnp.tile(jax.random.split(jax.random.fold_in(seed_keys[0], epoch), S), K)
        out = epoch_all(carries, keys)
        carries = [o[:3] for o in out]
        losses = [np.asarray(o[3]["loss"]).reshape(K, S, -1) for o in out]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a seed whose every step is NaN
            loss.append([np.nanmean(np.where(np.isfinite(v), v, np.nan), axis=2) for v in losses])
        acc.append([np.asarray(a).reshape(K, S) for a in evaluate_all(carries)])
        bar.update(1)
        bar.set_postfix(data=name, depth=depth, epoch=epoch)
    results = []
    for i, (variant, opt_name, (grad_first, delta_ratio), predicted) in enumerate(runs):
        a = np.stack([e[i] for e in acc], axis=-1)  # (K, S, E)
        crossed = np.where((a > TRAINED).any(-1), np.argmax(a > TRAINED, axis=-1) + 1, -1)
        results.append({
            "dataset": name, "depth": depth, "variant": variant, "optimizer": opt_name,
            "test_accuracy": a, "train_loss": np.stack([e[i] for e in loss], axis=-1),
            "crossed_epoch": crossed,
            "grad_first_at_init": grad_first.reshape(K, S),
            "delta_ratio_at_init": delta_ratio.reshape(K, S),
            "delta_ratio_predicted": predicted,  # (K,): per init
        })  # fmt: skip
    return results


def run(args) -> list[dict]:
    results = []
    total = args.epochs * len(args.depths) * len(args.datasets)
    with tqdm(total=total, desc="cures, trained", unit="epoch") as bar:
        for name in args.datasets:
            ds = DATASETS[name](seed=args.seed)
            for depth in args.depths:
                results += train_depth(name, ds, depth, args, bar)
    return results


def summary_rows(results) -> list[dict]:
    rows = []
    for r in results:
        for k, init in enumerate(INITS):
            final = r["test_accuracy"][k, :, -1]
            crossed = r["crossed_epoch"][k]
            ok = crossed > 0
            with np.errstate(all="ignore"):
                g1 = np.exp(np.mean(np.log(r["grad_first_at_init"][k])))
                ratio = np.exp(np.mean(np.log(r["delta_ratio_at_init"][k])))
            rows.append({
                "dataset": r["dataset"], "depth": r["depth"], "variant": r["variant"],
                "optimizer": r["optimizer"], "init": init,
                "final_accuracy_mean": float(np.mean(final)),
                "final_accuracy_std": float(np.std(final)),
                "final_accuracy_median": float(np.median(final)),
                "trained_seeds": int(np.sum(final > TRAINED)), "seeds": int(len(final)),
                "median_crossing_epoch": float(np.median(crossed[ok])) if ok.any() else None,
                "grad_first_at_init": float(g1), "delta_ratio_at_init": float(ratio),
                "delta_ratio_predicted": float(r["delta_ratio_predicted"][k]),
            })  # fmt: skip
    return rows


def _cell(r) -> str:
    cross = "" if r["median_crossing_epoch"] is None else f", ep {r['median_crossing_epoch']:g}"
    return f"{r['final_accuracy_median']:.2f} ({r['trained_seeds']}/{r['seeds']}{cross})"


def _optimizers_in(rows) -> list[str]:
    return [o for o in ("sgd", "adam") if any(r["optimizer"] == o for r in rows)]


def grid_table(rows, dataset: str, depth: int) -> str:
    """One row per variant, one column per optimizer × init: median final accuracy (trained
    seeds, median epoch of crossing 50%), and the init gradient of He and naive."""
    by = {(r["variant"], r["optimizer"], r["init"]): r for r in rows
          if r["dataset"] == dataset and r["depth"] == depth}  # fmt: skip
    cols = [(o, i) for o in _optimizers_in(rows) for i in INITS]
    header = ["variant"] + [f"{o.upper()}, {INIT_LABELS[i]}" for o, i in cols]
    header += [
        "‖∂L/∂W⁽¹⁾‖ at init, He / naive",
        "‖δ⁽¹⁾‖/‖δ⁽ᴸ⁻¹⁾‖ at init, He / naive",
        "predicted, He / naive",
    ]
    body = []
    for v in VARIANTS:
        if (v, cols[0][0], "he") not in by:
            continue
        he, naive = by[(v, cols[0][0], "he")], by[(v, cols[0][0], "naive")]
        body.append(
            [VARIANTS[v], *[_cell(by[(v, o, i)]) for o, i in cols],
             f"{he['grad_first_at_init']:.2g} / {naive['grad_first_at_init']:.2g}",
             f"{he['delta_ratio_at_init']:.2g} / {naive['delta_ratio_at_init']:.2g}",
             f"{he['delta_ratio_predicted']:.2g} / {naive['delta_ratio_predicted']:.2g}"]
        )  # fmt: skip
    return report.markdown_table(header, body)


def plots(results, run_dir, args) -> list[str]:
    """Test accuracy per epoch (median over seeds, band min–max), one panel per data set ×
    depth × optimizer, He solid and naive dashed."""
    keys = [(d, n, o) for d in args.datasets for n in args.depths for o in args.optimizers]
    fig, axes = report.figure(
        len(args.datasets) * len(args.depths), len(args.optimizers), (4.4, 3.2)
    )
    epochs = np.arange(1, args.epochs + 1)
    colors = {v: f"C{i}" for i, v in enumerate(VARIANTS)}
    for ax, (d, n, o) in zip([a for row in axes for a in row], keys, strict=True):
        for r in results:
            if (r["dataset"], r["depth"], r["optimizer"]) != (d, n, o):
                continue
            for k, (init, style) in enumerate(zip(INITS, ("-", "--"), strict=True)):
                a = r["test_accuracy"][k]
                label = f"{VARIANTS[r['variant']]}, {INIT_LABELS[init]}"
                ax.plot(epochs, np.median(a, 0), style, color=colors[r["variant"]], label=label)
                ax.fill_between(epochs, a.min(0), a.max(0), color=colors[r["variant"]], alpha=0.1)
        ax.axhline(TRAINED, color="k", lw=0.8, ls=":")
        ax.set(title=f"{d}, {n} layers, {o}", xlabel="epoch", ylabel="test accuracy", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2)
    return [report.save_figure(fig, run_dir / "accuracy_curves.png")]


def _trained(rows, **where) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def findings(rows) -> str:
    """Which cures trained at the deepest depth, from the rows (not from a script)."""
    deepest = max(r["depth"] for r in rows)
    lines = []
    for d in sorted({r["dataset"] for r in rows}):
        for o in _optimizers_in(rows):
            for i in INITS:
                got = _trained(rows, dataset=d, depth=deepest, optimizer=o, init=i)
                ok = [VARIANTS[r["variant"]] for r in got if 2 * r["trained_seeds"] > r["seeds"]]
                lines.append(
                    f"- {d}, {deepest} layers, {o.upper()}, {INIT_LABELS[i]}: "
                    + (", ".join(ok) if ok else "none") + " trained (most seeds above 50%)."
                )  # fmt: skip
    return "\n".join(lines)


def write_report(results, rows, run_dir, args, figures, seconds):
    tables = "\n\n".join(
        f"### {d}, {n} hidden layers\n\n{grid_table(rows, d, n)}"
        for d in args.datasets for n in args.depths
    )  # fmt: skip
    text = f"""# The cures, trained

ReLU nets of width {args.width}, {args.seeds} seeds per cell, {args.epochs} epochs of SGD (lr {args.sgd_lr:g}) or Adam
(lr {args.adam_lr:g}), batch {args.batch_size}. Residual nets have L/2 blocks x + α·W₂φ(W₁x) (two dense layers each) after
one Dense; α = 1/√L means 1/√(L/2), one over the square root of the number of blocks. Each cell: median final test
accuracy over seeds (seeds above {TRAINED:.0%}, median epoch at which they first crossed it). The last two columns are
the gradients at init (geometric mean over seeds, probe batch of {args.probe}, train mode, from the hand-written backprop):
the first weight layer's ‖∂L/∂W⁽¹⁾‖, and the mean per-example ‖δ‖ there over ‖δ‖ at the last weight layer below the
output (the top residual block for residual nets), beside mean-field theory's prediction (`fnbp.theory`: χ₁ for the
plain stack, the finite-batch BatchNorm factor at batch {args.probe}, the LayerNorm factor, the residual chain of the
"linear" and "bn" orderings). 0 means the backward signal underflowed float32; nan, 0/0.

{tables}

{findings(rows)}

![accuracy curves]({figures[0]})

Test accuracy per epoch, median over seeds (band: min to max); He solid, naive dashed.

How to read it. The δ ratio is how much the backward signal grows from the top of the stack to its bottom at
init (≪ 1: vanishing toward the input, ≫ 1: exploding). A plain ReLU stack from He weights keeps ‖δ‖² level
on average (χ₁ = 1), but its per-layer fluctuations compound with depth at finite width (Hanin 2018). From
naive N(0, 0.01²) weights every layer shrinks the forward and the backward signal by 10⁻⁴·width/2, so
‖∂L/∂W⁽¹⁾‖ underflows toward 0 and no optimizer can move the first layers. Residual blocks at α = 1 from He
weights double the stream's variance per block (its scale grows as 2^(blocks/2)), so the logits at init are huge;
from naive weights the branches are tiny and the identity path carries signal and gradient, which is why those
train. α = 1/√L bounds the stream's growth by e at any depth. BatchNorm divides the weight scale out, so naive
weights do not handicap it, but a Dense→BN→ReLU stack's δ grows toward the input at init (Yang et al. 2019;
experiments/cures.py measures the rate beside theory), and that growth compounds with depth. Inside residual
branches BatchNorm's explosion is tamed: the stream's variance grows only linearly with depth (De & Smith 2020),
which shrinks each branch's share. Adam rescales each parameter's step by its own gradient history, so a small but
non-zero gradient no longer means a small step; it does not help where the signal itself is lost.

Where measured and predicted ratios differ: theory's rates are the steady ones of infinitely wide nets, applied to
every layer. Near the output δ has not yet turned to its steady direction, and a BatchNorm stack's top layers grow
it less than the steady rate (experiments/cures.py measures the rate away from both ends, within 5% of theory); and
at width n LayerNorm's Jacobian projects out two of the n directions (the mean and the scale), shrinking ‖δ‖² by
about (n − 2)/n per layer, a finite-width factor the infinite-width prediction leaves out.

Run time: {seconds:.0f} s.
"""
    (run_dir / "report.md").write_text(text)


def parse_args(argv):
    p = report.experiment_parser("cures_training", __doc__)
    p.add_argument(
        "--datasets", default="digits,mnist1d", help=f"comma-separated, from {', '.join(DATASETS)}"
    )
    p.add_argument("--depths", default="30,100", help="comma-separated hidden dense layers (even)")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)}",
    )
    p.add_argument("--optimizers", default="sgd,adam", help="comma-separated, from sgd, adam")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sgd-lr", type=float, default=0.01)
    p.add_argument("--adam-lr", type=float, default=1e-3)
    p.add_argument("--probe", type=int, default=256, help="probe batch for the gradients at init")
    args = p.parse_args(argv)
    try:
        args.depths = [int(d) for d in args.depths.split(",")]
    except ValueError:
        p.error(f"--depths must be comma-separated integers, got {args.depths!r}")
    args.datasets, args.variants = args.datasets.split(","), args.variants.split(",")
    args.optimizers = args.optimizers.split(",")
    for flag, got, known in (
        ("datasets", args.datasets, DATASETS),
        ("variants", args.variants, VARIANTS),
        ("optimizers", args.optimizers, ("sgd", "adam")),
    ):
        unknown = [g for g in got if g not in known]
        if unknown:
            p.error(f"--{flag}: unknown {unknown}; choose from {list(known)}")
    if args.quick:
        args.datasets, args.depths, args.width, args.seeds, args.epochs = ["digits"], [8], 32, 2, 3
    if any(d < 2 or d % 2 for d in args.depths):
        p.error(
            f"--depths must be even and >= 2 (residual nets have depth/2 blocks), got {args.depths}"
        )
    for name in ("width", "seeds", "epochs", "batch_size", "probe"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not (args.sgd_lr > 0 and args.adam_lr > 0):
        p.error("--sgd-lr and --adam-lr must be > 0")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    run_dir = report.start_run("cures_training", args)
    start = time.perf_counter()
    results = run(args)
    seconds = time.perf_counter() - start
    rows = summary_rows(results)
    figures = plots(results, run_dir, args)
    report.save_json(
        run_dir / "results.json", {"summary": rows, "runs": results, "seconds": seconds}
    )
    write_report(results, rows, run_dir, args, figures, seconds)
    print(
        f"cures, trained (width {args.width}, {args.seeds} seeds, {args.epochs} epochs, {seconds:.0f} s):"
    )
    heads = "".join(f" {o + ' ' + i:>10}" for o in args.optimizers for i in INITS)
    print(f"  {'data':<8} {'depth':>5}  {'variant':<22}{heads}")
    by = {(r["dataset"], r["depth"], r["variant"], r["optimizer"], r["init"]): r for r in rows}
    for d in args.datasets:
        for n in args.depths:
            for v in args.variants:
                cells = [by[(d, n, v, o, i)] for o in args.optimizers for i in INITS]
                print(
                    f"  {d:<8} {n:>5}  {VARIANTS[v]:<22}"
                    + "".join(
                        f" {c['trained_seeds']:>2}/{c['seeds']} {c['final_accuracy_median']:.2f}"
                        for c in cells
                    )
                )
    print(f"report: {run_dir / 'report.md'}")
    return str(run_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
