"""Optimizers from optax on fnbp's hand-written gradients: the two-variable demo of the classic
backprop tutorials, the single-neuron chain rule, and a depth-10 digits net.

1. ``f(x, y) = x² + y² + 2x + 2`` (minimum 1 at (−1, 0)) from (1, 4): plain gradient descent
   at learning rate 0.01 for 4000 steps with the hand-written gradient ``(2x + 2, 2y)``
   (checked against ``jax.grad`` at every visited point), then each optimizer; trajectories
   over the contour plot.
2. One sigmoid neuron, ``C = (a − y)²``, ``a = σ(w·a_prev + b)``: ``∂C/∂w = a_prev·σ′(z)·2(a − y)``
   by hand, beside :func:`fnbp.backprop` of the same neuron (fnbp's ``mse`` is ½(a − y)², so
   its gradient is half).
3. A ReLU MLP of 10 hidden layers of 128 on digits, He init, ``--seeds`` seeds per optimizer,
   all seeds of one optimizer in one vmapped scan-fused program per epoch
   (:func:`fnbp.make_population_epoch`); Lookahead needs optax's ``LookaheadParams`` (fast and
   slow weights), so its loop is written out here: fnbp's gradient at the fast weights, then
   optax's update.

Every optimizer is optax's: SGD, momentum, Nesterov, Adam, AdaBelief, Lookahead(Adam).

    python experiments/optimizers.py [--quick] [--out DIR]
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
from fnbp import data, report, train
from fnbp.layers import Dense

START, MINIMUM = (1.0, 4.0), (-1.0, 0.0)


def f(p):
    """The demo's bowl: x² + y² + 2x + 2."""
    x, y = p[0], p[1]
    return x**2 + y**2 + 2 * x + 2


def grad_f(p):
    """By hand: ∂f/∂x = 2x + 2, ∂f/∂y = 2y."""
    return jnp.stack([2 * p[0] + 2, 2 * p[1]])


# the digits net's learning rates: each family's usual one (momentum's effective step is
# lr/(1 − 0.9) = 0.1, twice plain SGD's)
DIGITS_LR = {"SGD": 0.05, "momentum 0.9": 0.01, "Nesterov 0.9": 0.01, "Adam": 1e-3,
             "AdaBelief": 1e-3, "Lookahead(Adam)": 1e-3}  # fmt: skip


def optimizers(lr: dict[str, float] | float) -> dict[str, optax.GradientTransformation]:
    """The six optimizers, at one learning rate or one each (Lookahead: Adam, 5 fast steps,
    α = 0.5)."""
    lr = dict.fromkeys(DIGITS_LR, lr) if isinstance(lr, float) else lr
    return {
        "SGD": optax.sgd(lr["SGD"]),
        "momentum 0.9": optax.sgd(lr["momentum 0.9"], momentum=0.9),
        "Nesterov 0.9": optax.sgd(lr["Nesterov 0.9"], momentum=0.9, nesterov=True),
        "Adam": optax.adam(lr["Adam"]),
        "AdaBelief": optax.adabelief(lr["AdaBelief"]),
        "Lookahead(Adam)": optax.lookahead(
            optax.adam(lr["Lookahead(Adam)"]), sync_period=5, slow_step_size=0.5
        ),
    }


def _is_lookahead(name: str) -> bool:
    return name.startswith("Lookahead")


def bowl(steps: int, lr: float) -> dict:
    """Each optimizer's path on f from START, the hand-written gradient at every point."""
    out = {}
    for name, opt in optimizers(lr).items():
        p0 = jnp.array(START, jnp.float64)
        params = optax.LookaheadParams.init_synced(p0) if _is_lookahead(name) else p0

        def step(carry, _, opt=opt, name=name):
            params, state = carry
            here = params.fast if _is_lookahead(name) else params
            g = grad_f(here)
            gap = jnp.max(jnp.abs(g - jax.grad(f)(here)))  # the hand rule against autodiff
            updates, state = opt.update(g, state, params)
            return (optax.apply_updates(params, updates), state), (here, gap)

        (params, _), (path, gaps) = jax.lax.scan(step, (params, opt.init(params)), None, steps)
        final = params.slow if _is_lookahead(name) else params
        out[name] = {
            "path": np.asarray(jnp.concatenate([path, final[None]])),
            "final": np.asarray(final),
            "f_final": float(f(final)),
            "max_grad_gap": float(jnp.max(gaps)),
        }
    return out


def neuron(a_prev=0.8, w=0.6, b=-0.3, y=1.0) -> dict:
    """The single-neuron chain: ∂C/∂w and ∂C/∂b by hand and by fnbp."""
    z = w * a_prev + b
    a = 1 / (1 + np.exp(-z))
    sp = a * (1 - a)  # σ′(z)
    by_hand = {"dC_dw": a_prev * sp * 2 * (a - y), "dC_db": sp * 2 * (a - y)}
    net = fnbp.Net(1, [Dense(1, "sigmoid")], loss="mse")
    params = [{"W": jnp.array([[w]], jnp.float64), "b": jnp.array([b], jnp.float64)}]
    r = fnbp.backprop(
        params, net, jnp.array([[a_prev]], jnp.float64), jnp.array([[y]], jnp.float64)
    )
    by_fnbp = {"dC_dw": 2 * float(r.grads[0]["W"][0, 0]), "dC_db": 2 * float(r.grads[0]["b"][0])}
    return {"a_prev": a_prev, "w": w, "b": b, "y": y, "a": float(a), "C": float((a - y) ** 2),
            "by_hand": by_hand, "by_fnbp": by_fnbp}  # fmt: skip


def _lookahead_epoch(model, opt, batch_size):
    """One epoch of Lookahead for a population: fnbp's gradient at the fast weights."""

    def one(params, state, key, x, y):
        n = x.shape[0] // batch_size
        order = jax.random.permutation(key, x.shape[0])[: n * batch_size].reshape(n, batch_size)

        def step(carry, idx):
            params, state = carry
            g = fnbp.backprop(params.fast, model, x[idx], y[idx]).grads
            loss = fnbp.loss(params.fast, model, x[idx], y[idx])
            updates, state = opt.update(g, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (params, state), losses = jax.lax.scan(step, (params, state), order)
        return params, state, losses

    return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None, None)))


def digits_net(args) -> dict:
    """Every optimizer on the depth-10 digits net: loss curves, final test accuracy."""
    ds = data.load_digits(seed=args.seed)
    model = fnbp.MLP((ds.num_features, *[args.width] * args.depth, ds.num_classes), "relu")
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    seed_keys = jax.random.split(jax.random.key(args.seed), args.seeds)
    out = {}
    for name, opt in tqdm(optimizers(DIGITS_LR).items(), desc="optimizers", unit="opt"):
        params = train.init_population(seed_keys, model, ["he_normal"])
        look = _is_lookahead(name)
        if look:
            params = jax.vmap(optax.LookaheadParams.init_synced)(params)
            epoch = _lookahead_epoch(model, opt, args.batch_size)
        else:
            epoch = train.make_population_epoch(model, opt, batch_size=args.batch_size)
        states = jax.vmap(opt.init)(params)
        curve = []
        for e in range(args.epochs):
            keys = jax.random.split(jax.random.fold_in(seed_keys[0], e), args.seeds)
            if look:
                params, states, losses = epoch(params, states, keys, x, y)
            else:
                params, states, metrics = epoch(params, states, keys, x, y)
                losses = metrics["loss"]
            curve.append(np.mean(np.asarray(losses), axis=1))  # (seeds,)
        final = params.slow if look else params
        acc = jax.vmap(lambda p: fnbp.accuracy(p, model, ds.x_test, ds.y_test))(final)
        out[name] = {"train_loss": np.stack(curve, axis=1), "test_accuracy": np.asarray(acc)}
    return out


def plots(results, run_dir) -> list[str]:
    fig, axes = report.figure(1, 2, size=(6.0, 4.6))
    ax = axes[0, 0]
    g = np.linspace(-2.5, 2.5, 200), np.linspace(-1.5, 4.5, 200)
    X, Y = np.meshgrid(*g)
    ax.contour(X, Y, X**2 + Y**2 + 2 * X + 2, levels=20, cmap="Greys", linewidths=0.6)
    for i, (name, r) in enumerate(results["bowl"].items()):
        ax.plot(r["path"][:, 0], r["path"][:, 1], color=f"C{i}", label=name, linewidth=1)
    ax.plot(*START, "ko")
    ax.plot(*MINIMUM, "k*", markersize=10)
    ax.set_title("f(x, y) = x² + y² + 2x + 2 from (1, 4), lr 0.01")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    for i, (name, r) in enumerate(results["digits"].items()):
        m = r["train_loss"].mean(axis=0)
        ax.plot(np.arange(1, len(m) + 1), m, color=f"C{i}", label=name)
        lo, hi = r["train_loss"].min(axis=0), r["train_loss"].max(axis=0)
        ax.fill_between(np.arange(1, len(m) + 1), lo, hi, color=f"C{i}", alpha=0.15)
    ax.set_yscale("log")
    ax.set_title("digits, 10 ReLU layers of 128: train loss (band: min–max over seeds)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean train loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return [report.save_figure(fig, run_dir / "optimizers.png")]


def write_report(results, run_dir, args, figures, seconds) -> None:
    bowl_rows = [[name, f"({r['final'][0]:.4f}, {r['final'][1]:.4f})",
                  f"{np.hypot(r['final'][0] - MINIMUM[0], r['final'][1] - MINIMUM[1]):.1e}",
                  f"{r['f_final']:.6f}", f"{r['max_grad_gap']:.1e}"]
                 for name, r in results["bowl"].items()]  # fmt: skip
    digit_rows = [[name, f"{DIGITS_LR[name]:g}",
                   f"{100 * r['test_accuracy'].mean():.2f}% ± {100 * r['test_accuracy'].std():.2f}",
                   f"{100 * np.median(r['test_accuracy']):.2f}%", f"{r['train_loss'][:, -1].mean():.3g}"]
                  for name, r in results["digits"].items()]  # fmt: skip
    n = results["neuron"]
    text = f"""# Optimizers on fnbp's hand-written gradients

Command: `python experiments/optimizers.py {" ".join(args.argv)}` ({seconds:.0f} s).

## The two-variable bowl

f(x, y) = x² + y² + 2x + 2, minimum 1 at (−1, 0), from (1, 4), learning rate 0.01,
{args.bowl_steps} steps. The gradient is the hand-written (2x + 2, 2y); the last column is its
largest gap to `jax.grad` over every point visited.

{report.markdown_table(["optimizer", "final (x, y)", "distance to (−1, 0)", "f", "max |hand − jax.grad|"], bowl_rows)}

## One sigmoid neuron

C = (a − y)², a = σ(w·a_prev + b) with a_prev = {n["a_prev"]}, w = {n["w"]}, b = {n["b"]},
y = {n["y"]}: a = {n["a"]:.6f}. ∂C/∂w = a_prev·σ′(z)·2(a − y) = {n["by_hand"]["dC_dw"]:.12f} by
hand, {n["by_fnbp"]["dC_dw"]:.12f} from `fnbp.backprop` (twice its ½(a − y)² gradient);
∂C/∂b = {n["by_hand"]["dC_db"]:.12f} and {n["by_fnbp"]["dC_db"]:.12f}.

## Digits, 10 hidden ReLU layers of {args.width}

He init, each optimizer at its family's usual learning rate, batch {args.batch_size},
{args.epochs} epochs, {args.seeds} seeds each.

{report.markdown_table(["optimizer", "lr", "test accuracy, mean ± std", "median", "final train loss"], digit_rows)}

![optimizers]({figures[0]})
"""
    (run_dir / "report.md").write_text(text)


def parse_args(argv):
    p = report.experiment_parser("optimizers", __doc__)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    args.argv = list(argv)
    args.width, args.depth, args.bowl_steps = 128, 10, 4000
    if args.quick:
        args.seeds, args.epochs, args.width = 2, 3, 32
    for name in ("seeds", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    run_dir = report.start_run("optimizers", args)
    start = time.perf_counter()
    with jax.enable_x64(True):
        results = {"bowl": bowl(args.bowl_steps, 0.01), "neuron": neuron()}
    results["digits"] = digits_net(args)
    seconds = time.perf_counter() - start
    figures = plots(results, run_dir)
    report.save_json(run_dir / "results.json", results | {"seconds": seconds})
    write_report(results, run_dir, args, figures, seconds)
    print(f"optimizers ({seconds:.0f} s):")
    for name, r in results["bowl"].items():
        print(f"  bowl     {name:<16} f = {r['f_final']:.6f} at ({r['final'][0]:.4f}, {r['final'][1]:.4f})")  # fmt: skip
    for name, r in results["digits"].items():
        print(f"  digits   {name:<16} test accuracy {100 * r['test_accuracy'].mean():.2f}%")
    print(f"report: {run_dir / 'report.md'}")
    return str(run_dir)


if __name__ == "__main__":
    main()
