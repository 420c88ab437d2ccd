"""Overfitting and its controls: dropout, L2 and early stopping on a small slice of digits.

A wide ReLU MLP (``--hidden`` layers of ``--width`` units, He init) trains on ``--train``
digits (a seeded subset of the training split) with Adam (``--optimizer``, ``--lr``); ``--val``
other training examples are the
validation set and the 360 test digits the test set. Variants: no regularization, dropout
after every hidden layer at each of ``--dropouts``, L2 (λ/2)‖W‖² at each of ``--l2s``, and
early stopping: the unregularized run stopped once its validation loss has not improved for
``--patience`` epochs, its params restored to the best epoch (what ``fnbp.fit(...,
early_stopping=patience)`` and ``fnbp train --early-stopping`` do). Every variant × seed trains
in ONE jitted XLA program per epoch (each variant's seeds are a
:func:`fnbp.make_population_epoch`); after every epoch train, validation and test loss and
accuracy are measured for every member in eval mode (no dropout).

    python experiments/overfitting.py [--quick] [--epochs 150] [--out DIR]
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import fnbp
from fnbp import data, presets, report, train

SPLITS = ("train", "val", "test")
OPTIMIZERS = {"adam": optax.adam, "momentum": lambda lr: optax.sgd(lr, momentum=0.9)}


def variants(args) -> dict[str, tuple[fnbp.Net, float]]:
    """``name -> (net, λ)``; every net has the same Dense layers, so one init fits all."""
    sizes = (64, *[args.width] * args.hidden, 10)
    out = {"none": (presets.mlp(sizes), 0.0)}
    out |= {f"dropout {r:g}": (presets.mlp(sizes, dropout=r), 0.0) for r in args.dropouts}
    out |= {f"L2 {lam:g}": (presets.mlp(sizes), lam) for lam in args.l2s}
    return out


def split(ds, args):
    """``{split: (x, y)}``: ``args.train`` and ``args.val`` disjoint training examples drawn by
    a seeded permutation, and the whole test split."""
    order = np.random.default_rng(args.seed).permutation(len(ds.x_train))
    tr, va = order[: args.train], order[args.train : args.train + args.val]
    return {
        "train": (ds.x_train[tr], ds.y_train[tr]),
        "val": (ds.x_train[va], ds.y_train[va]),
        "test": (ds.x_test, ds.y_test),
    }


def early_stop(val_loss: np.ndarray, patience: int) -> tuple[int, int]:
    """``(best, stop)`` 1-based epochs of a run stopped with ``patience`` on ``val_loss``
    (shape ``(epochs,)``): the best is the epoch of the lowest validation loss seen up to the
    stop, which is ``patience`` epochs after it, or the last epoch. A non-finite loss never
    counts as an improvement."""
    best, best_loss = 0, np.inf
    for e, v in enumerate(val_loss, start=1):
        if np.isfinite(v) and v < best_loss:
            best, best_loss = e, v
        if e - best >= patience:
            return best, e
    return best, len(val_loss)


def _same_dense(params: list, net: fnbp.Net) -> list:
    """The unregularized net's ``params`` laid out for ``net``: ``{}`` at each Dropout, so
    every variant starts from the same weights."""
    dense = iter(params)
    return [{} if layer.kind == "dropout" else next(dense) for layer in net.layers]


def run(args) -> dict:
    sets = split(data.load_digits(seed=args.seed), args)
    x, y = (jnp.asarray(v) for v in sets["train"])
    evals = {s: tuple(jnp.asarray(v) for v in sets[s]) for s in SPLITS}
    nets = variants(args)
    seed_keys = jax.random.split(jax.random.key(args.seed), args.seeds)
    optimizer = OPTIMIZERS[args.optimizer](args.lr)
    fns = [train.make_population_epoch(net, optimizer, batch_size=args.batch_size, l2=lam)
           for net, lam in nets.values()]  # fmt: skip
    plain = train.init_population(seed_keys, nets["none"][0], "he_normal")
    carries = []
    for net, _ in nets.values():
        params = _same_dense(plain, net)
        carries.append((params, fnbp.init_state(net), jax.vmap(optimizer.init)(params)))

    @jax.jit
    def epoch_all(carries, keys):
        return [fn(*c, keys, x, y) for fn, c in zip(fns, carries, strict=True)]

    def measure(p, net):  # eval mode: no dropout, no penalty in the reported loss
        out = {}
        for s, (xs, ys) in evals.items():
            out[f"{s}_loss"] = fnbp.model._keyed_loss(p, net, xs, ys, 0.0)
            out[f"{s}_accuracy"] = fnbp.model._accuracy_jit(p, net, xs, ys)
        return out

    @jax.jit
    def evaluate_all(carries):
        return [jax.vmap(lambda p, net=net: measure(p, net))(c[0])
                for (net, _), c in zip(nets.values(), carries, strict=True)]  # fmt: skip

    curves = []
    for epoch in tqdm(range(1, args.epochs + 1), desc="overfitting", unit="epoch"):
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(seed_keys, epoch)
        carries = [o[:3] for o in epoch_all(carries, keys)]
        curves.append(jax.tree.map(np.asarray, evaluate_all(carries)))
    # curves[e][v][metric] -> history[v][metric] of shape (seeds, epochs)
    history = {
        name: {m: np.stack([c[i][m] for c in curves], axis=-1) for m in curves[0][i]}
        for i, name in enumerate(nets)
    }
    history["early stopping"] = _early_stopped(history["none"], args.patience)
    return history


def _early_stopped(h: dict, patience: int) -> dict:
    """The unregularized run, stopped by :func:`early_stop` per seed: its curves end at the
    stop (NaN after), and ``final_*`` entries hold the restored best epoch's values."""
    out = {m: v.copy() for m, v in h.items()}
    best_stop = [early_stop(v, patience) for v in h["val_loss"]]
    out["best_epoch"] = np.array([b for b, _ in best_stop])
    out["stop_epoch"] = np.array([s for _, s in best_stop])
    for m, v in h.items():
        out[m] = np.array([np.where(np.arange(1, v.shape[1] + 1) <= s, row, np.nan)
                           for row, (_, s) in zip(v, best_stop, strict=True)])  # fmt: skip
        out[f"final_{m}"] = np.array([row[b - 1] for row, (b, _) in zip(v, best_stop, strict=True)])
    return out


def summary_rows(history: dict) -> list[dict]:
    rows = []
    for name, h in history.items():
        final = {m: h.get(f"final_{m}", h[m][:, -1]) for m in
                 [f"{s}_{k}" for s in SPLITS for k in ("loss", "accuracy")]}  # fmt: skip
        row = {"variant": name}
        for m, v in final.items():
            row[f"{m}_mean"], row[f"{m}_std"] = float(np.mean(v)), float(np.std(v))
        row["gap_mean"] = float(np.mean(final["train_accuracy"] - final["test_accuracy"]))
        best_val = np.nanmin(h["val_loss"], axis=1)
        row["best_val_loss_mean"] = float(np.mean(best_val))
        if "best_epoch" in h:
            row["best_epoch_median"] = float(np.median(h["best_epoch"]))
            row["stop_epoch_median"] = float(np.median(h["stop_epoch"]))
        rows.append(row)
    return rows


def plots(history, run_dir, args) -> list[str]:
    """Loss and accuracy per epoch for train, validation and test, median over seeds; one
    panel pair per variant."""
    names = list(history)
    fig, axes = report.figure(2, len(names), (3.2, 2.8))
    epochs = np.arange(1, args.epochs + 1)
    for col, name in enumerate(names):
        h = history[name]
        for row, kind in enumerate(("loss", "accuracy")):
            ax = axes[row][col]
            for i, s in enumerate(SPLITS):
                v = h[f"{s}_{kind}"]
                with np.errstate(all="ignore"):
                    ax.plot(epochs, np.nanmedian(v, 0), color=f"C{i}", label=s)
            if "best_epoch" in h:
                ax.axvline(np.median(h["best_epoch"]), color="k", ls=":", lw=0.8)
            ax.set(
                title=name,
                xlabel="epoch",
                ylabel=kind,
                yscale="log" if kind == "loss" else "linear",
            )
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return [report.save_figure(fig, run_dir / "curves.png")]


def _helps(rows, epochs: int) -> str:
    """Each control's test accuracy against no regularization, from the rows."""
    base = next(r for r in rows if r["variant"] == "none")
    lines = []
    for r in sorted(rows, key=lambda r: -r["test_accuracy_mean"]):
        d = r["test_accuracy_mean"] - base["test_accuracy_mean"]
        lines.append(
            f"- {r['variant']}: test accuracy {r['test_accuracy_mean']:.3f} ± {r['test_accuracy_std']:.3f} "
            f"({'+' if d >= 0 else '−'}{abs(d):.3f} against none), train − test gap {r['gap_mean']:.3f}, "
            f"test loss {r['test_loss_mean']:.3f}"
            + (f"; best epoch {r['best_epoch_median']:g}, stopped at {r['stop_epoch_median']:g} (medians)"
               if "best_epoch_median" in r else "")
            + "."
        )  # fmt: skip
    es = next((r for r in rows if "stop_epoch_median" in r), None)
    if es is not None and es["stop_epoch_median"] == epochs and es["best_epoch_median"] == epochs:
        lines.append(
            f"- Early stopping did not stop most seeds: their validation loss was still at its lowest "
            f"at epoch {epochs}, so it returned the unregularized net."
        )
    return "\n".join(lines)


def _turn(h: dict, n: int) -> str:
    """Whether the unregularized run's validation loss turned up (median over seeds)."""
    final, best = np.median(h["val_loss"][:, -1]), np.median(np.min(h["val_loss"], axis=1))
    text = f"The unregularized net memorizes its {n} examples (train accuracy {np.median(h['train_accuracy'][:, -1]):.3f}); "
    if final > 1.05 * best:
        return (
            text
            + f"its validation loss turned up, from {best:.3f} at its lowest to {final:.3f} at the end (medians)."
        )
    return text + (
        f"its validation loss ended at {final:.3f} against {best:.3f} at its lowest (medians): still falling or flat, so"
        " here overfitting shows in the train − test gap, not in a rising validation loss."
    )


def write_report(history, rows, run_dir, args, figures, seconds):
    table = report.markdown_table(
        ["variant", "train acc.", "val acc.", "test acc.", "train − test", "test loss", "best val loss"],
        [[r["variant"], *[f"{r[f'{s}_accuracy_mean']:.3f} ± {r[f'{s}_accuracy_std']:.3f}" for s in SPLITS],
          f"{r['gap_mean']:.3f}", f"{r['test_loss_mean']:.3f} ± {r['test_loss_std']:.3f}",
          f"{r['best_val_loss_mean']:.3f}"] for r in rows],
    )  # fmt: skip
    text = f"""# Overfitting: dropout, L2 and early stopping

{args.train} training digits, {args.val} validation digits, 360 test digits. A ReLU MLP of {args.hidden} hidden layers of
{args.width} units (He init), {args.optimizer} (lr {args.lr:g}, batch {args.batch_size}) for {args.epochs} epochs,
{args.seeds} seeds; every variant starts from the same {args.seeds} initial nets and sees the same batches. Mean ± std over
seeds of the final epoch (early stopping: the restored best epoch, patience {args.patience}). Losses are the
cross-entropy alone, in eval mode (no dropout, no penalty).

{table}

{_helps(rows, args.epochs)}

![curves]({figures[0]})

Median over seeds of the loss (top) and accuracy (bottom) on the train, validation and test sets;
the dotted line is early stopping's median best epoch.

How to read it. {_turn(history["none"], args.train)} Dropout and L2 act on the train − test gap; early
stopping keeps the params of the epoch of lowest validation loss, so it only differs from no regularization when
the validation loss turns up before the last epoch.

Run time: {seconds:.0f} s.
"""
    (run_dir / "report.md").write_text(text)


def _floats(p, flag, text):
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        p.error(f"{flag} must be comma-separated numbers, got {text!r}")


def parse_args(argv):
    p = report.experiment_parser("overfitting", __doc__)
    p.add_argument("--train", type=int, default=200, help="training examples")
    p.add_argument("--val", type=int, default=200, help="validation examples")
    p.add_argument("--hidden", type=int, default=2, help="hidden layers")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--dropouts", default="0.1,0.3,0.5", help="comma-separated dropout rates")
    p.add_argument("--l2s", default="1e-3,1e-2", help="comma-separated L2 strengths λ")
    p.add_argument("--patience", type=int, default=10, help="early stopping's patience, epochs")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    args.dropouts = _floats(p, "--dropouts", args.dropouts)
    args.l2s = _floats(p, "--l2s", args.l2s)
    if args.quick:
        args.width, args.seeds, args.epochs, args.patience = 64, 2, 30, 5
    for name in ("train", "val", "hidden", "width", "patience", "seeds", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.train + args.val > 1437:
        p.error(
            f"--train + --val must be at most digits' 1437 training examples, got {args.train + args.val}"
        )
    if args.batch_size > args.train:
        p.error(f"--batch-size {args.batch_size} is larger than --train {args.train}")
    if not all(0 < r < 1 for r in args.dropouts) or not all(lam > 0 for lam in args.l2s):
        p.error("dropout rates must be in (0, 1) and L2 strengths > 0")
    if not args.lr > 0:
        p.error("--lr must be > 0")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    run_dir = report.start_run("overfitting", args)
    start = time.perf_counter()
    history = run(args)
    seconds = time.perf_counter() - start
    rows = summary_rows(history)
    figures = plots(history, run_dir, args)
    report.save_json(
        run_dir / "results.json", {"summary": rows, "history": history, "seconds": seconds}
    )
    write_report(history, rows, run_dir, args, figures, seconds)
    print(
        f"overfitting ({args.train} train digits, {args.seeds} seeds, {args.epochs} epochs, {seconds:.0f} s):"
    )
    print(f"  {'variant':<16} {'train acc':>9} {'test acc':>15} {'gap':>6} {'test loss':>9}")
    for r in rows:
        print(f"  {r['variant']:<16} {r['train_accuracy_mean']:>9.3f} {r['test_accuracy_mean']:>8.3f} ± "
              f"{r['test_accuracy_std']:.3f} {r['gap_mean']:>6.3f} {r['test_loss_mean']:>9.3f}")  # fmt: skip
    print(f"report: {run_dir / 'report.md'}")
    return str(run_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
