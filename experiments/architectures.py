"""Beyond the MLP: CNNs and 100-block residual MLPs trained with fnbp's hand-written backward.

Three studies, every gradient from :func:`fnbp.backprop`'s hand-written rules (``grads="manual"``):

* ``digits_cnn``: a small 2-D CNN on digits (8×8 images) against the README's MLP recipe. Seed
  ``s`` draws the train/test split (``fnbp.data.load_digits(s)``), the init and the shuffles,
  as ``fnbp train --seed s`` does for the MLP's published mean.
* ``mnist1d``: the MLP and the CNN of the MNIST-1D table (Greydanus, 2020) on the dataset
  ``make_dataset`` builds with the package's default seed 42 (the repository's
  ``mnist1d_data.pkl``, 4000 train / 1000 test), with the reference's recipe: Adam 1e-2,
  batch 100, 8000 steps, PyTorch's default init. Seeds change the init and the shuffles.
* ``resmlp``: 100 residual blocks of width 128 (He init) on digits, with and without
  BatchNorm in the branch, beside the plain 100-layer ReLU MLP under the same optimizer.

Each seed trains alone, one scan-fused XLA program per epoch (:func:`fnbp.make_train_epoch`;
the seeds of a recipe share its compiled program); test accuracy is measured in eval mode
every few epochs. The time of a seed is its training time (compilation included for the
first seed of each recipe, evaluation excluded), with the machine's load average beside it.

    python experiments/architectures.py [--quick] [--recipes NAME,...] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import fnbp
from fnbp import data, report
from fnbp.layers import (
    Activation,
    BatchNorm,
    Conv,
    Dense,
    Dropout,
    Flatten,
    MaxPool,
    Reshape,
    Residual,
)

MNIST1D_DATA_SEED = 42  # make_dataset's default: the published mnist1d_data.pkl
STUDIES = {
    "digits_cnn": "Digits: a small 2-D CNN",
    "mnist1d": "MNIST-1D: the published MLP and CNN",
    "resmlp": "Digits: 100 residual blocks",
}
NOTES = {
    "digits_cnn": "The MLP row is the README's `fnbp train --sizes 64,128,128,10 --optimizer sgd "
    "--lr 0.02 --momentum 0.9 --l2 1e-3 --epochs 30` recipe under the same seeds (the README "
    "quotes a mean of 98.1% over seeds 0–7). No augmentation.",
    "mnist1d": "The reference (greydanus/mnist1d, `notebooks/models.py` and `train.py`): the "
    "README's table says MLP 68%, CNN 94%; the repository's own notebooks, running these models "
    "with this recipe for 6000 steps in PyTorch, print final test accuracies of 92.3% and 92.5% "
    "(CNN) and 64.6% to 66.0% (MLP). Its MLP adds its second layer residually. Differences of "
    "this loop: fnbp reshuffles every epoch (the reference cycles through the training set in "
    "a fixed order) and takes 8000 steps (the reference 8001). The He-init row shows what the "
    "init changes.",
    "resmlp": "Same optimizer, init and epochs for the three nets. A final train loss of "
    "ln 10 ≈ 2.303 is a net whose output no longer depends on its input.",
}


class Recipe(NamedTuple):
    """One architecture and how it is trained.

    ``optimizer(steps)`` builds the optax optimizer for a run of ``steps`` steps (schedules
    need it); ``init`` is a scheme name or ``"torch"`` (:func:`torch_default_init`);
    ``goal`` is ``None`` for reference rows.
    """

    name: str
    study: str
    label: str
    dataset: str  # "digits" or "mnist1d"
    net: fnbp.Net
    optimizer: Callable[[int], optax.GradientTransformation]
    init: str
    epochs: int
    batch_size: int
    seeds: int
    eval_every: int = 1
    l2: float = 0.0
    goal: tuple | None = None  # (target, None): mean ≥ target; (target, tol): |mean − target| ≤ tol
    recipe_text: str = ""


def goal_met(goal: tuple, mean: float) -> bool:
    target, tol = goal
    return mean >= target if tol is None else abs(mean - target) <= tol


def goal_text(goal: tuple) -> str:
    target, tol = goal
    return f"≥ {target:.1%}" if tol is None else f"{target:.0%} ± {100 * tol:g} points"


def digits_cnn_net() -> fnbp.Net:
    """8×8×1 → conv 3×3 16 → max-pool 2 → conv 3×3 32 → max-pool 2 → dropout ¼ → dense 10."""
    return fnbp.Net(64, [
        Reshape((8, 8, 1)),
        Conv(16, (3, 3), activation="relu"), MaxPool((2, 2)),   # (8, 8, 16) → (4, 4, 16)
        Conv(32, (3, 3), activation="relu"), MaxPool((2, 2)),   # (4, 4, 32) → (2, 2, 32)
        Flatten(), Dropout(0.25), Dense(10),
    ])  # fmt: skip


def mnist1d_cnn_net() -> fnbp.Net:
    """The reference ``ConvBase``: three Conv1d of 25 channels, kernels 5/3/3, stride 2,
    padding 1, ReLU (40 → 19 → 10 → 5 positions), then a linear layer on the 125 features."""
    conv = lambda k: Conv(25, (k,), strides=2, padding=((1, 1),), activation="relu")  # noqa: E731
    return fnbp.Net((40, 1), [conv(5), conv(3), conv(3), Flatten(), Dense(10)])


def mnist1d_mlp_net() -> fnbp.Net:
    """The reference ``MLPBase``: h = relu(W₁x + b₁); h = h + relu(W₂h + b₂); W₃h + b₃, width 100
    (its second layer is a residual one)."""
    return fnbp.Net(40, [Dense(100, "relu"), Residual((Dense(100, "relu"),)), Dense(10)])


def resmlp_net(depth: int, width: int, norm: bool) -> fnbp.Net:
    """x → W₀x + b₀ → ``depth`` × [h + α·F(h)] → relu → dense 10, α = 1/√depth, with
    F(h) = W₂ relu(W₁h + b₁) + b₂, or with ``norm`` F(h) = BN(W₂ relu(BN(W₁h + b₁)) + b₂)."""
    if norm:
        branch = (Dense(width), BatchNorm(activation="relu"), Dense(width), BatchNorm())
    else:
        branch = (Dense(width, "relu"), Dense(width))
    block = Residual(branch, alpha=1 / math.sqrt(depth))
    return fnbp.Net(64, [Dense(width), *[block] * depth, Activation("relu"), Dense(10)])


def plain_net(depth: int, width: int) -> fnbp.Net:
    return fnbp.Net(64, [*[Dense(width, "relu")] * depth, Dense(10)])


RECIPES = ("digits_cnn", "digits_mlp", "mnist1d_mlp", "mnist1d_cnn", "mnist1d_mlp_he", "resmlp",
           "resmlp_bn", "plain")  # fmt: skip
QUICK_RECIPES = ("digits_cnn", "mnist1d_cnn", "resmlp_bn")  # one per study: every layer kind


def recipes(quick: bool = False, num_seeds: int | None = None) -> dict[str, Recipe]:
    """Every recipe; ``quick`` shrinks epochs, seeds and depth, ``num_seeds`` overrides the
    seeds of each."""
    q = quick
    seeds = lambda n: num_seeds or (2 if q else n)  # noqa: E731
    cnn_epochs, mlp_epochs, m1d_epochs, res_epochs = (2, 2, 2, 2) if q else (40, 30, 200, 10)
    depth, width = (3, 32) if q else (100, 128)
    adam_cosine = lambda lr: lambda steps: optax.adam(optax.cosine_decay_schedule(lr, steps))  # noqa: E731
    adam = lambda lr: lambda steps: optax.adam(lr)  # noqa: E731
    sgd = lambda steps: optax.sgd(0.02, momentum=0.9)  # noqa: E731
    res = dict(study="resmlp", dataset="digits", optimizer=adam_cosine(1e-3), init="he_normal",
               epochs=res_epochs, batch_size=32, seeds=seeds(3))  # fmt: skip
    res_text = f"Adam 1e-3, cosine decay to 0, batch 32, {res_epochs} epochs, He normal"
    m1d = dict(study="mnist1d", dataset="mnist1d", optimizer=adam(1e-2), epochs=m1d_epochs,
               batch_size=100, eval_every=1 if q else 5)  # fmt: skip
    m1d_text = f"Adam 1e-2, batch 100, {m1d_epochs} epochs"
    out = [
        Recipe("digits_cnn", "digits_cnn", "CNN conv16-pool-conv32-pool-drop¼-dense10", "digits",
               digits_cnn_net(), adam_cosine(3e-3), "he_normal", cnn_epochs, 32, seeds(8),
               goal=(0.985, None),
               recipe_text=f"Adam 3e-3, cosine decay to 0, batch 32, {cnn_epochs} epochs, He normal"),
        Recipe("digits_mlp", "digits_cnn", "MLP 64-128-128-10 (the README's recipe)", "digits",
               fnbp.Net(64, [Dense(128, "relu"), Dense(128, "relu"), Dense(10)]), sgd,
               "he_normal", mlp_epochs, 32, seeds(8), l2=1e-3,
               recipe_text=f"SGD 0.02, momentum 0.9, l2 1e-3, batch 32, {mlp_epochs} epochs, He normal"),
        Recipe("mnist1d_mlp", label="MLP 40-100-(+100)-10, PyTorch init", net=mnist1d_mlp_net(),
               init="torch", seeds=seeds(8), goal=(0.68, 0.03),
               recipe_text=m1d_text + ", PyTorch default init", **m1d),
        Recipe("mnist1d_cnn", label="CNN 3×conv25 (k 5/3/3, stride 2)-dense10, PyTorch init",
               net=mnist1d_cnn_net(), init="torch", seeds=seeds(8), goal=(0.94, 0.015),
               recipe_text=m1d_text + ", PyTorch default init", **m1d),
        Recipe("mnist1d_mlp_he", label="MLP 40-100-(+100)-10, He normal init",
               net=mnist1d_mlp_net(), init="he_normal", seeds=seeds(8),
               recipe_text=m1d_text + ", He normal, zero biases", **m1d),
        Recipe("resmlp", label=f"ResMLP {depth}×[h + F(h)/√{depth}], width {width}",
               net=resmlp_net(depth, width, norm=False), goal=(0.95, None),
               recipe_text=res_text, **res),
        Recipe("resmlp_bn", label=f"ResMLP {depth}×[h + BN-branch/√{depth}], width {width}",
               net=resmlp_net(depth, width, norm=True), goal=(0.95, None),
               recipe_text=res_text, **res),
        Recipe("plain", label=f"plain MLP {depth}×dense{width} relu", net=plain_net(depth, width),
               recipe_text=res_text, **res),
    ]  # fmt: skip
    assert tuple(r.name for r in out) == RECIPES
    return {r.name: r for r in out}


# ----------------------------------------------------------------------------------------------
# Initialization and data.


def _uniform_biases(key, layers, params) -> list:
    """Replace every Dense/Conv bias by U(±1/√fan_in) draws (residual branches included)."""
    out = []
    for i, (layer, p) in enumerate(zip(layers, params, strict=True)):
        k = jax.random.fold_in(key, i)
        if layer.sublayers():
            p = {**p, "branch": _uniform_biases(k, layer.sublayers(), p["branch"])}
        elif "b" in p:
            W = p["W"]  # Dense (out, in); Conv (*kernel, C_in, C_out)
            fan_in = W.shape[1] if isinstance(layer, Dense) else math.prod(W.shape[:-1])
            bound = 1 / math.sqrt(fan_in)
            p = {**p, "b": jax.random.uniform(k, p["b"].shape, p["b"].dtype, -bound, bound)}
        out.append(p)
    return out


def torch_default_init(key, net: fnbp.Net) -> list:
    """PyTorch's default init of ``nn.Linear`` and ``nn.Conv1d`` (``kaiming_uniform_(a=√5)``):
    W and b both ~ U(±1/√fan_in), fan_in = C_in·prod(kernel). fnbp's ``standard_uniform``
    draws the same W but zero biases, so the biases are drawn here."""
    k_w, k_b = jax.random.split(key)
    return _uniform_biases(k_b, net.layers, fnbp.init_params(k_w, net, "standard_uniform"))


def init_params(recipe: Recipe, key) -> list:
    if recipe.init == "torch":
        return torch_default_init(key, recipe.net)
    return fnbp.init_params(key, recipe.net, recipe.init)


def start(recipe: Recipe, optimizer, key) -> tuple:
    """``(params, state, opt_state)`` of a fresh run."""
    params = init_params(recipe, key)
    return params, fnbp.init_state(recipe.net), optimizer.init(params)


def load(recipe: Recipe, seed: int, args) -> data.Dataset:
    if recipe.dataset == "digits":
        return data.load_digits(seed)
    return _mnist1d(200 if args.quick else 5000)


_MNIST1D = {}


def _mnist1d(num_samples):
    """Generated once per run (5000 samples take ~10 s)."""
    if num_samples not in _MNIST1D:
        _MNIST1D[num_samples] = data.load_mnist1d(MNIST1D_DATA_SEED, num_samples)
    return _MNIST1D[num_samples]


def _inputs(net, x):
    return jnp.asarray(np.reshape(x, (x.shape[0], *net.input_shape)))


# ----------------------------------------------------------------------------------------------
# Training.


def train_seed(recipe: Recipe, start_fn, epoch_fn, seed: int, ds, bar) -> dict:
    """Train one seed; test accuracy every ``eval_every`` epochs and after the last."""
    net = recipe.net
    k_init, k_data = jax.random.split(jax.random.key(seed))
    x, y = _inputs(net, ds.x_train), jnp.asarray(ds.y_train)
    x_test, y_test = _inputs(net, ds.x_test), jnp.asarray(ds.y_test)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    params, state, opt_state = jax.block_until_ready(start_fn(k_init))
    init_seconds = time.perf_counter() - t0
    epoch_seconds, losses, evals = [], [], []
    for epoch in range(1, recipe.epochs + 1):
        t0 = time.perf_counter()
        params, state, opt_state, metrics = epoch_fn(
            params, state, opt_state, jax.random.fold_in(k_data, epoch), x, y
        )
        jax.block_until_ready(params)
        epoch_seconds.append(time.perf_counter() - t0)
        losses.append(float(np.mean(np.asarray(metrics["loss"]))))
        if epoch % recipe.eval_every == 0 or epoch == recipe.epochs:
            acc = float(fnbp.accuracy(params, net, x_test, y_test, state=state))
            evals.append((epoch, acc))
        bar.update(1)
        bar.set_postfix(recipe=recipe.name, seed=seed, epoch=epoch)
    return {
        "seed": seed,
        "eval_epochs": [e for e, _ in evals],
        "test_accuracy": [a for _, a in evals],
        "final_accuracy": evals[-1][1],
        "train_loss": losses,  # mean over the epoch's steps, NaN if it diverged
        "init_seconds": init_seconds,
        "epoch_seconds": epoch_seconds,
        "seconds": init_seconds + float(np.sum(epoch_seconds)),  # init and training
        "load_average": [load_before, os.getloadavg()[0]],
    }


def run_recipe(recipe: Recipe, args, bar) -> dict:
    """Every seed of one recipe, one after the other, sharing one compiled epoch."""
    seeds = list(range(args.seed, args.seed + recipe.seeds))
    n_train = len(load(recipe, seeds[0], args).x_train)
    steps = recipe.epochs * (n_train // recipe.batch_size)
    optimizer = recipe.optimizer(steps)
    epoch_fn = fnbp.make_train_epoch(
        recipe.net, optimizer, batch_size=recipe.batch_size, grads="manual", l2=recipe.l2
    )
    # Eager: a 100-block net's init compiles op by op once per shape (~13 s here), where one
    # jitted program of its 200 draws took ~100 s to compile.
    start_fn = functools.partial(start, recipe, optimizer)
    runs = [train_seed(recipe, start_fn, epoch_fn, s, load(recipe, s, args), bar) for s in seeds]
    final = np.array([r["final_accuracy"] for r in runs])
    first_epochs = runs[0]["epoch_seconds"]
    steady = float(np.median(first_epochs[1:])) if len(first_epochs) > 1 else 0.0
    out = {
        "name": recipe.name,
        "study": recipe.study,
        "label": recipe.label,
        "recipe": recipe.recipe_text,
        "num_params": recipe.net.num_params,
        "steps": steps,
        "seeds": seeds,
        "final_accuracy_mean": float(final.mean()),
        "final_accuracy_std": float(final.std()),
        "final_accuracy_min": float(final.min()),
        "final_accuracy_max": float(final.max()),
        "seconds_per_seed": [r["seconds"] for r in runs],
        "final_train_loss_mean": float(np.mean([r["train_loss"][-1] for r in runs])),
        "load_average_range": [
            min(min(r["load_average"]) for r in runs),
            max(max(r["load_average"]) for r in runs),
        ],  # fmt: skip
        # the first seed's init and first epoch beyond a steady epoch: the compilation
        "compile_seconds": max(runs[0]["init_seconds"] + first_epochs[0] - steady, 0.0),
        "runs": runs,
    }
    if recipe.goal is not None:
        out["goal"], out["goal_target"] = goal_text(recipe.goal), recipe.goal[0]
        out["goal_met"] = goal_met(recipe.goal, out["final_accuracy_mean"])
    return out


def run(args) -> dict:
    chosen = [recipes(args.quick, args.seeds)[n] for n in args.recipes]
    total = sum(r.epochs * r.seeds for r in chosen)
    results = {}
    with tqdm(total=total, desc="architectures", unit="epoch") as bar:
        for recipe in chosen:
            results[recipe.name] = run_recipe(recipe, args, bar)
    return results


# ----------------------------------------------------------------------------------------------
# Report.


def _pct(v):
    return f"{100 * v:.2f}%"


def _acc_cell(r):
    return (
        f"{_pct(r['final_accuracy_mean'])} ± {100 * r['final_accuracy_std']:.2f} "
        f"[{_pct(r['final_accuracy_min'])}, {_pct(r['final_accuracy_max'])}]"
    )


def _goal_cell(r):
    if "goal" not in r:
        return "reference"
    return f"{r['goal']}: {'met' if r['goal_met'] else 'NOT met'}"


def _time_cell(r):
    t = r["seconds_per_seed"]
    return f"{t[0]:.1f} / {np.median(t[1:]) if len(t) > 1 else t[0]:.1f} / {max(t):.1f}"


def plots(results, run_dir) -> dict[str, str]:
    """One figure per study: test accuracy against steps, mean over seeds, band min to max."""
    names = {}
    for study, title in STUDIES.items():
        rows = [r for r in results.values() if r["study"] == study]
        if not rows:
            continue
        fig, axes = report.figure(1, 1, (6.0, 4.0))
        ax = axes[0][0]
        for i, r in enumerate(rows):
            steps_per_epoch = r["steps"] // len(r["runs"][0]["train_loss"])
            x = np.array(r["runs"][0]["eval_epochs"]) * steps_per_epoch
            acc = np.array([run["test_accuracy"] for run in r["runs"]])  # (S, evals)
            ax.plot(x, acc.mean(0), color=f"C{i}", label=f"{r['label']} ({len(r['runs'])} seeds)")
            ax.fill_between(x, acc.min(0), acc.max(0), color=f"C{i}", alpha=0.2)
            if "goal" in r:
                ax.axhline(r["goal_target"], color=f"C{i}", ls=":", lw=0.8)
        ax.set(xlabel="training step", ylabel="test accuracy", title=title)
        lo = min(np.min([run["test_accuracy"] for run in r["runs"]]) for r in rows)
        ax.set_ylim(max(lo - 0.02, 0.0), 1.0)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
        names[study] = report.save_figure(fig, run_dir / f"{study}.png")
    return names


def write_report(results, run_dir, args, figures, seconds, loads):
    command = "python experiments/architectures.py " + " ".join(args.argv)
    headers = ["recipe", "architecture", "params", "training", "steps", "seeds", "final test accuracy: mean ± std [min, max]", "goal", "final train loss", "s per seed: first (compile incl.) / median / max", "load (1 min)"]  # fmt: skip
    sections = []
    for study, title in STUDIES.items():
        rows = [r for r in results.values() if r["study"] == study]
        if not rows:
            continue
        table = report.markdown_table(
            headers,
            [[r["name"], r["label"], r["num_params"], r["recipe"], r["steps"], f"{r['seeds'][0]}–{r['seeds'][-1]}",
              _acc_cell(r), _goal_cell(r), f"{r['final_train_loss_mean']:.3g}", _time_cell(r),
              "{:.1f}–{:.1f}".format(*r["load_average_range"])] for r in rows],
        )  # fmt: skip
        per_seed = report.markdown_table(
            ["recipe", *[f"seed {s}" for s in rows[0]["seeds"]]],
            [[r["name"], *[f"{_pct(run['final_accuracy'])} ({run['seconds']:.0f} s)" for run in r["runs"]]] for r in rows],
        )  # fmt: skip
        figure = f"![{title}]({figures[study]})" if study in figures else ""
        sections.append(
            f"## {title}\n\n{NOTES[study]}\n\n{table}\n\nPer seed (final test accuracy, "
            f"seconds of init and training):\n\n{per_seed}\n\n{figure}\n"
        )
    compile_note = ", ".join(f"{r['name']} {r['compile_seconds']:.0f} s" for r in results.values())
    text = f"""# Architectures trained with the hand-written backward

Every gradient here comes from fnbp's hand-written backward pass (`grads="manual"`); each seed is
trained alone by `fnbp.make_train_epoch` (one scan-fused XLA program per epoch) and its test
accuracy is measured in eval mode (running BatchNorm statistics, no dropout) after the last
epoch. Digits seeds draw the train/test split as well as the init (as `fnbp train --seed`);
MNIST-1D uses the one dataset `make_dataset` builds with its default seed
{MNIST1D_DATA_SEED} (the published `mnist1d_data.pkl`), the seeds drawing the init and the shuffles.

Command: `{command}`. Total time {seconds:.0f} s. Load average (1 min) at start {loads[0]:.1f}, at
end {loads[1]:.1f}, on {os.cpu_count()} CPUs: times measured under load are upper bounds.
Seconds per seed are its init and training (evaluation excluded); the first seed of each recipe
also pays the compilation (about {compile_note}).

{chr(10).join(sections)}
Bands: min to max over seeds; dotted lines: the goals.
"""
    (run_dir / "report.md").write_text(text)


def parse_args(argv):
    names = list(RECIPES)
    p = report.experiment_parser("architectures", __doc__)
    p.add_argument(
        "--recipes",
        help=f"comma-separated, from {', '.join(names)} (default: all; with --quick "
        f"{','.join(QUICK_RECIPES)})",
    )
    p.add_argument("--seeds", type=int, help="seeds per recipe (default: each recipe's own)")
    args = p.parse_args(argv)
    args.argv = list(argv)
    args.recipes = (
        args.recipes.split(",") if args.recipes else list(QUICK_RECIPES if args.quick else names)
    )
    unknown = [n for n in args.recipes if n not in names]
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; choose from {names}")
    if args.seeds is not None and args.seeds < 1:
        p.error("--seeds must be >= 1")
    return args


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    run_dir = report.start_run("architectures", args)
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    results = run(args)
    seconds = time.perf_counter() - start
    figures = plots(results, run_dir)
    loads = (load_start, os.getloadavg()[0])
    report.save_json(
        run_dir / "results.json", {"results": results, "seconds": seconds, "load_average": loads}
    )
    write_report(results, run_dir, args, figures, seconds, loads)
    print(f"architectures ({seconds:.0f} s, load {loads[0]:.1f} → {loads[1]:.1f}):")
    for r in results.values():
        print(f"  {r['name']:<15} {_acc_cell(r):<40} {_goal_cell(r):<32} s/seed {_time_cell(r)}")
    print(f"report: {run_dir / 'report.md'}")
    return str(run_dir)


if __name__ == "__main__":
    main()
