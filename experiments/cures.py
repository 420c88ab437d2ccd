"""The cures for unstable gradients at initialization, measured beside mean-field theory.

No training. For each cure (dropout, BatchNorm at three batch sizes, LayerNorm before and after
the activation, residual blocks in five orderings at α = 1, 1/√L and 0) draw ``--seeds``
networks of width ``--width`` in float64 (He init, ReLU unless named), run the hand-written
:func:`fnbp.backprop` on one batch of digits (through :func:`fnbp.diagnostics.layer_stats`) and
record ‖δ‖² at every dense output (stacks) or on the residual stream (residual blocks: δ at
each block's sum). The measured factor, ‖δ‖² of a layer over the one above it, is the geometric
mean over the layers past the first ``--skip`` (and short of the top ``--skip``, where δ still
turns towards its steady direction) and over seeds; beside it the prediction of
:mod:`fnbp.theory` over the same layers, and the totals over that window.

    python experiments/cures.py [--quick] [--out DIR]
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import fnbp
from fnbp import data, diagnostics, report, theory
from fnbp.layers import Activation, BatchNorm, Dense, Dropout, LayerNorm, Residual

GOAL = 0.05  # allowed relative error of every measured per-layer (per-block) factor


class Variant(NamedTuple):
    """One network to measure: ``layers`` is where δ is read (indices into ``net.layers``,
    bottom to top), ``predicted`` the factor of each of those layers but the top one (δ there
    over δ one measured layer up), ``batch`` the batch size."""

    family: str
    name: str
    net: fnbp.Net
    layers: list[int]
    predicted: np.ndarray
    batch: int
    scheme: object = "he_normal"


def _stack(body, depth: int, out: int = 10) -> list:
    return [layer for _ in range(depth) for layer in body] + [Dense(out)]


def stack_variants(width: int, depth: int, batches) -> list[Variant]:
    """Plain, dropout, BatchNorm and LayerNorm stacks of ``depth`` dense layers."""
    w, n = width, depth
    dense = list(range(0, 2 * n, 2))  # the dense layers of a two-layer body
    const = lambda c: np.full(n - 1, c)  # noqa: E731
    rows = [
        Variant("plain", "ReLU, He", fnbp.Net(64, _stack([Dense(w, "relu")], n)), list(range(n)),
                const(theory.chi1("relu", 2.0)), batches[1]),
    ]  # fmt: skip
    for s2 in (2.0, 1.6):
        net = fnbp.Net(64, _stack([Dense(w, "relu"), Dropout(0.2)], n))
        rows.append(Variant("dropout", f"ReLU, keep 0.8, σ_w² = {s2:g}", net, dense,
                            const(theory.chi1("relu", s2, keep=0.8)), batches[1],
                            fnbp.variance_scaling_scheme(s2, "normal")))  # fmt: skip
    for b in batches:
        net = fnbp.Net(64, _stack([Dense(w, use_bias=False), BatchNorm(activation="relu")], n))
        rows.append(Variant("batchnorm", f"Dense→BN→ReLU, batch {b}", net, dense,
                            const(theory.batchnorm_factor("relu", b)), b))  # fmt: skip
    b = batches[0]
    net = fnbp.Net(64, _stack([Dense(w, use_bias=False), BatchNorm()], n))
    rows.append(Variant("batchnorm", f"Dense→BN (linear), batch {b}", net, dense,
                        const(theory.batchnorm_factor("identity", b)), b))  # fmt: skip
    for act in ("relu", "tanh"):
        net = fnbp.Net(64, _stack([Dense(w, use_bias=False), LayerNorm(activation=act)], n))
        rows.append(Variant("layernorm", f"Dense→LN→{act}", net, dense,
                            const(theory.layernorm_factor(act, "before")), batches[1]))  # fmt: skip
    net = fnbp.Net(64, _stack([Dense(w, "relu", use_bias=False), LayerNorm()], n))
    rows.append(Variant("layernorm", "Dense→ReLU→LN", net, dense,
                        const(theory.layernorm_factor("relu", "after")), batches[1]))  # fmt: skip
    return rows


def residual_block(ordering: str, width: int, alpha: float) -> Residual:
    """One block of :mod:`fnbp.theory.residual`'s ``ordering`` as fnbp layers."""
    w = width
    branch = {
        "linear": (Dense(w, "relu", use_bias=False), Dense(w, use_bias=False)),
        "pre": (Activation("relu"), Dense(w, "relu", use_bias=False), Dense(w, use_bias=False)),
        "post": (Dense(w, "relu", use_bias=False), Dense(w, use_bias=False)),
        "pre_ln": (LayerNorm(), Dense(w, "relu", use_bias=False), Dense(w, use_bias=False)),
        "bn": (Dense(w, use_bias=False), BatchNorm(activation="relu"),
               Dense(w, use_bias=False), BatchNorm()),
    }[ordering]  # fmt: skip
    return Residual(branch, alpha=alpha, activation="relu" if ordering == "post" else "identity")


def residual_variants(width: int, blocks: int, batch: int, m0: float) -> list[Variant]:
    """Dense(width) then ``blocks`` residual blocks of each ordering and α, then Dense(10)."""
    rows = []
    for ordering in theory.ORDERINGS:
        for label, alpha in (("1", 1.0), ("1/√L", 1 / math.sqrt(blocks)), ("0", 0.0)):
            block = residual_block(ordering, width, alpha)
            net = fnbp.Net(64, [Dense(width, use_bias=False), *[block] * blocks, Dense(10)])
            chain = theory.residual_chain(ordering, "relu", 2.0, alpha, blocks, m0)
            ratios = chain.delta_sq[:-1] / chain.delta_sq[1:]  # block l's δ over block l + 1's
            rows.append(Variant("residual", f"{ordering}, α = {label}", net,
                                list(range(1, blocks + 1)), ratios, batch))  # fmt: skip
    return rows


def measure(v: Variant, x, y, keys) -> np.ndarray:
    """‖δ‖² at ``v.layers`` for one network per key: ``(seeds, len(v.layers))``. Params are
    drawn eagerly, one seed at a time (a jitted init of a hundred layers compiles for longer
    than it runs), then every seed's statistics in one vmapped program."""
    net = v.net
    split = [jax.random.split(k) for k in keys]
    params = [fnbp.init_params(k_init, net, v.scheme, dtype=jnp.float64) for k_init, _ in split]
    params = jax.tree.map(lambda *leaves: jnp.stack(leaves), *params)
    mask_keys = jnp.stack([k_mask for _, k_mask in split])
    state = fnbp.init_state(net) if net.needs_state else None

    def one(p, k):  # train mode where it matters: batch statistics, dropout masks from the key
        return diagnostics._layer_stats(p, net, x, y, state, k, net.needs_train)["delta_sq"]

    d2 = np.asarray(jax.jit(jax.vmap(one))(params, mask_keys))
    return d2[:, v.layers]


def first_moment(x, keys, width: int) -> float:
    """E[x²] of the stream entering the first residual block (the first Dense's output)."""
    net = fnbp.Net(64, [Dense(width, use_bias=False), Dense(10)])

    def one(k):
        params = fnbp.init_params(k, net, "he_normal", dtype=jnp.float64)
        return jnp.mean(jnp.square(x @ params[0]["W"].T))

    return float(np.mean(jax.vmap(one)(keys)))


def summarize(v: Variant, d2: np.ndarray, skip: int) -> dict:
    """Measured and predicted factors over the window, per layer and in total."""
    log_r = np.log(d2[:, :-1]) - np.log(d2[:, 1:])  # (seeds, layers − 1)
    n = log_r.shape[1]
    window = slice(min(skip, n - 1), max(n - skip, min(skip, n - 1) + 1))
    measured = float(np.exp(np.mean(log_r[:, window])))
    predicted = float(np.exp(np.mean(np.log(v.predicted[window]))))
    total_m = float(np.exp(np.mean(np.sum(log_r[:, window], axis=1))))
    total_p = float(np.prod(v.predicted[window]))
    err = abs(measured / predicted - 1)
    return {
        "family": v.family, "name": v.name, "batch": v.batch,
        "layers_in_window": window.stop - window.start,
        "factor_predicted": predicted, "factor_measured": measured, "relative_error": err,
        "within_goal": bool(err <= GOAL),
        "total_predicted": total_p, "total_measured": total_m,
        "total_relative_error": abs(total_m / total_p - 1),
        "log10_delta_sq_mean": np.mean(np.log10(d2), axis=0),
        "log10_delta_sq_predicted": np.log10(np.append(np.cumprod(v.predicted[::-1])[::-1], 1.0))
        + float(np.mean(np.log10(d2[:, -1]))),
    }  # fmt: skip


def width_sweep(args, x, y, keys, name: str = "post, α = 1") -> list[dict]:
    """The residual variant ``name`` at each of ``args.sweep_widths``: where finite width
    breaks the infinite-width prediction, the error shrinks as the width grows."""
    rows = []
    for width in tqdm(args.sweep_widths, desc=f"width sweep ({name})", unit="width"):
        m0 = first_moment(x, keys, width)
        v = next(v for v in residual_variants(width, args.blocks, x.shape[0], m0) if v.name == name)
        r = summarize(v, measure(v, x, y, keys), args.skip)
        rows.append({"width": width} | {k: r[k] for k in ("name", "factor_predicted", "factor_measured", "relative_error")})  # fmt: skip
    return rows


def run(args) -> dict:
    ds = data.load_digits(seed=args.seed)
    keys = jax.random.split(jax.random.key(args.seed), args.seeds)
    rows = []
    with jax.enable_x64(True):
        xs = {b: jnp.asarray(ds.x_train[:b], jnp.float64) for b in args.batches}
        ys = {b: jnp.asarray(ds.y_train[:b]) for b in args.batches}
        m0 = first_moment(xs[args.batches[1]], keys, args.width)
        variants = stack_variants(args.width, args.depth, args.batches)
        variants += residual_variants(args.width, args.blocks, args.batches[1], m0)
        for v in tqdm(variants, desc="cures", unit="net"):
            d2 = measure(v, xs[v.batch], ys[v.batch], keys)
            rows.append(summarize(v, d2, args.skip))
        b = args.batches[1]
        sweep = width_sweep(args, xs[b], ys[b], keys)
    return {"rows": rows, "width_sweep": sweep}


def _table(rows) -> str:
    return report.markdown_table(
        ["family", "network", "batch", "layers", "factor predicted", "factor measured", "error",
         "total predicted", "total measured", "total error"],
        [[r["family"], r["name"], r["batch"], r["layers_in_window"], f"{r['factor_predicted']:.4g}",
          f"{r['factor_measured']:.4g}", f"{100 * r['relative_error']:.2f}%",
          f"{r['total_predicted']:.4g}", f"{r['total_measured']:.4g}",
          f"{100 * r['total_relative_error']:.1f}%"] for r in rows],
    )  # fmt: skip


def plots(results, run_dir) -> list[str]:
    """One panel per family (measured solid, predicted dotted), and the width sweep."""
    rows = results["rows"]
    families = list(dict.fromkeys(r["family"] for r in rows))
    fig, axes = report.figure(2, 3, size=(5.0, 3.8))
    axes = np.ravel(axes)
    for ax, family in zip(axes, families, strict=False):
        for i, r in enumerate(x for x in rows if x["family"] == family):
            color = f"C{i % 10}"
            ax.plot(r["log10_delta_sq_mean"], color=color, label=r["name"])
            ax.plot(r["log10_delta_sq_predicted"], color=color, linestyle=":")
        ax.set_title(family)
        ax.set_xlabel("layer (block) from the input")
        ax.set_ylabel("log₁₀ ‖δ‖²")
        ax.legend(fontsize=6)
    ax = axes[len(families)]
    sweep = results["width_sweep"]
    if not sweep:
        ax.axis("off")
    else:
        _sweep_panel(ax, sweep)
    for ax in axes[len(families) + 1 :]:
        ax.axis("off")
    fig.suptitle("‖δ‖² at initialization: measured (solid) and predicted (dotted)")
    fig.tight_layout()
    return [report.save_figure(fig, run_dir / "cures_delta.png")]


def _sweep_panel(ax, sweep) -> None:
    ax.plot([r["width"] for r in sweep], [100 * r["relative_error"] for r in sweep], "o-")
    ax.set_xscale("log", base=2)
    ax.set_title(f"finite width: {sweep[0]['name']}")
    ax.set_xlabel("width")
    ax.set_ylabel("error of the measured factor (%)")


def _sweep_text(sweep: str, args) -> str:
    return f"""Where finite width breaks the theory (the mean-field chain is the infinite-width limit): the
post-activation block at α = 1, whose stream grows ~3× a block, measured at several widths
({args.blocks} blocks, the same seeds):

{sweep}
"""


def write_report(results, run_dir, args, figures, seconds) -> None:
    rows = results["rows"]
    ok = sum(r["within_goal"] for r in rows)
    sweep = report.markdown_table(
        ["width", "factor predicted", "factor measured", "error"],
        [[r["width"], f"{r['factor_predicted']:.4g}", f"{r['factor_measured']:.4g}",
          f"{100 * r['relative_error']:.2f}%"] for r in results["width_sweep"]],
    )  # fmt: skip
    text = f"""# The cures at initialization, beside mean-field theory

Command: `python experiments/cures.py {shlex.join(args.argv)}` ({seconds:.0f} s). Width
{args.width}, float64, {args.seeds} seeds, He init (dropout rows name their σ_w²), one batch of
digits; stacks of {args.depth} dense layers, residual nets of {args.blocks} blocks. Factor: ‖δ‖²
of a layer over the one above, geometric mean over the {args.skip}th layer from the bottom to
the {args.skip}th from the top and over seeds; the total is the product over that window.

{ok} of {len(rows)} measured factors lie within {100 * GOAL:.0f}% of the prediction.

{_table(rows)}

![‖δ‖² across depth]({Path(figures[0]).name})

{_sweep_text(sweep, args) if results["width_sweep"] else "No width sweep in this run (`--sweep-widths`)."}

How to read it: a factor above 1 is a gradient that grows towards the input (explodes), below
1 one that vanishes. BatchNorm explodes at every batch size, fastest at the smallest (the
π/(π−1) ≈ 1.47 often quoted is its infinite-batch limit), and a linear BatchNorm stack explodes
too; LayerNorm before a ReLU is neutral, after it explodes like BatchNorm; dropout makes He's
σ_w² = 2 explode (χ₁ = σ_w²/(2ρ)), σ_w² = 2ρ is critical. Residual blocks grow as (1 + 2α²)
per block (stream without activation), 1 + α² (pre-activation); α = 1/√L bounds the total by
e²; with a normalization in the branch the factor falls like 1/depth, so the total grows
polynomially; post-activation blocks at α = 0 lose half of δ once, at the top block.
"""
    (run_dir / "report.md").write_text(text)


def parse_args(argv):
    p = report.experiment_parser("cures", __doc__)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=50, help="dense layers of the stacks")
    p.add_argument("--blocks", type=int, default=30, help="blocks of the residual nets")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--skip", type=int, default=5, help="layers left out at each end")
    p.add_argument(
        "--sweep-widths", default="128,256,512,1024",
        help="comma-separated widths of the finite-width sweep; empty for none",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.argv = list(argv)
    try:
        args.sweep_widths = tuple(int(w) for w in args.sweep_widths.split(",") if w.strip())
    except ValueError:
        p.error(f"--sweep-widths must be comma-separated integers, got {args.sweep_widths!r}")
    if any(w < 1 for w in args.sweep_widths):
        p.error(f"--sweep-widths must be positive, got {args.sweep_widths}")
    args.batches = (8, 64, 256)
    if args.quick:
        args.width, args.depth, args.blocks, args.seeds, args.skip = 128, 12, 10, 3, 3
        args.batches, args.sweep_widths = (8, 32, 64), (64, 128)
    for name in ("width", "depth", "blocks", "seeds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= 2 * args.skip < min(args.depth, args.blocks) - 1:
        p.error(f"--skip must leave layers between the two ends, got {args.skip}")
    return args


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    run_dir = report.start_run("cures", args)
    start = time.perf_counter()
    results = run(args)
    rows = results["rows"]
    seconds = time.perf_counter() - start
    figures = plots(results, run_dir)
    report.save_json(run_dir / "results.json", results | {"seconds": seconds})
    write_report(results, run_dir, args, figures, seconds)
    print(f"cures at init (width {args.width}, {args.seeds} seeds, {seconds:.0f} s): "
          f"{sum(r['within_goal'] for r in rows)}/{len(rows)} factors within {100 * GOAL:.0f}%")  # fmt: skip
    for r in rows:
        print(f"  {r['family']:<10} {r['name']:<32} predicted {r['factor_predicted']:.4g}  "
              f"measured {r['factor_measured']:.4g}  ({100 * r['relative_error']:.2f}%)")  # fmt: skip
    print(f"report: {run_dir / 'report.md'}")
    return str(run_dir)


if __name__ == "__main__":
    main()
