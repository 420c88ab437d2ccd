"""Instruments in training: a plain scan-fused epoch beside the same epoch with
``instruments=16`` (every 16th step computes the per-layer statistics of
``fnbp.instruments.training`` inside a ``lax.cond``) and ``instruments=1`` (every step), paired
per round. Goal: ≤ 1.10× a plain epoch at K = 16.

A section of ``scripts/bench.py``; alone: ``python scripts/bench/instruments_training.py
[--quick] [--repeats N]`` prints its rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__":  # run alone: the bench package is scripts/bench
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import optax

import fnbp
from bench.common import LR, MOMENTUM, interleaved, log, paired, paired_cpu
from bench.nets import digits_cnn, toy_cnn
from fnbp.train import make_train_epoch

PERIODS = (16, 1)  # the goal's, and every step


def _cases(quick: bool) -> list[dict]:
    """The goal's nets: a 784-1024-1024-10 MLP at batch 256 and the digits CNN at batch 32, and
    a small MLP whose 0.1 ms step shows the fixed cost of the cond (in --quick: toy epochs,
    whose per-call overheads swamp every ratio, and a one-conv net in place of the digits CNN,
    whose three instrumented programs take ~10 s to compile)."""
    if quick:
        return [
            {"name": "MLP 64-128-128-10", "model": fnbp.MLP((64, 128, 128, 10)), "batch": 32,
             "steps": 32},
            {"name": "toy CNN", "model": toy_cnn(), "batch": 32, "steps": 32},
        ]  # fmt: skip
    return [
        {"name": "MLP 784-1024-1024-10", "model": fnbp.MLP((784, 1024, 1024, 10)),
         "batch": 256, "steps": 64},
        {"name": "digits CNN", "model": digits_cnn(), "batch": 32, "steps": 128},
        {"name": "MLP 64-128-128-10", "model": fnbp.MLP((64, 128, 128, 10)), "batch": 32,
         "steps": 256},
    ]  # fmt: skip


def _runner(model, batch, steps, instruments):
    """``run(n)``: ``n`` epochs of ``steps`` steps, the params carried from one to the next."""
    opt = optax.sgd(LR, momentum=MOMENTUM)
    params = fnbp.init_params(jax.random.key(0), model, "he_normal")
    n = batch * steps
    x = jax.random.normal(jax.random.key(1), (n, *model.input_shape), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (n,), 0, model.output_size)
    epoch = make_train_epoch(model, opt, batch_size=batch, instruments=instruments)
    net = isinstance(model, fnbp.Net)
    carry = (
        [params, fnbp.init_state(model), opt.init(params)] if net else [params, opt.init(params)]
    )
    key = [jax.random.key(3)]

    def run(k):
        c = carry
        for _ in range(k):
            key[0], sub = jax.random.split(key[0])
            *c, metrics = epoch(*c, sub, x, y)
        jax.block_until_ready((c, metrics))
        carry[:] = c

    run(1)  # compile
    return {"run": run}


def instruments_training_section(args) -> list[dict]:
    """One row per net: seconds per epoch plain and instrumented every K steps, the paired
    ratios (wall and CPU) and the steps per epoch."""
    out = []
    for case in _cases(args.quick):
        name, model, batch, steps = case["name"], case["model"], case["batch"], case["steps"]
        log(f"instruments in training: {name}, batch {batch}, {steps} steps per epoch")
        runners = {"plain": _runner(model, batch, steps, None)}
        for k in PERIODS:
            runners[f"every {k}"] = _runner(model, batch, steps, k)
        cpu = {}
        times = interleaved(runners, args.repeats, args.target_s, cpu)
        row = {"net": name, "batch": batch, "steps_per_epoch": steps,
               "plain_epoch_ms": 1e3 * sorted(times["plain"])[len(times["plain"]) // 2]}  # fmt: skip
        for k in PERIODS:
            r = paired(times[f"every {k}"], times["plain"]) | paired_cpu(cpu, f"every {k}",
                                                                           "plain")  # fmt: skip
            row[f"every_{k}"] = r
            log(f"  every {k:2d} steps: {r['ratio']:.3f}× a plain epoch (CPU time "
                f"{r['cpu_ratio']:.3f}×; IQR {r['paired_iqr'][0]:.3f}–{r['paired_iqr'][1]:.3f})")  # fmt: skip
        out.append(row)
    return out


def target(rows: list[dict]) -> dict:
    """The goal: every 16 steps ≤ 1.10× a plain epoch, on the 784-1024-1024-10 MLP and the
    digits CNN (those of them measured; the small MLP is shown, not judged)."""
    goal = [r for r in rows if r["net"] in ("MLP 784-1024-1024-10", "digits CNN")] or rows
    worst = max(goal, key=lambda r: r["every_16"]["ratio"])
    return {
        "target": "instruments every 16 steps ≤ 1.10× a plain epoch (MLP and digits CNN)",
        "measured": "; ".join(
            f"{r['net']} batch {r['batch']}: {r['every_16']['ratio']:.3f}×" for r in rows
        ),  # fmt: skip
        "met": worst["every_16"]["ratio"] <= 1.10,
    }


def markdown(rows: list[dict]) -> list[str]:
    """The section's table for the bench report."""
    from fnbp.report import markdown_table

    table = [
        [r["net"], r["batch"], r["steps_per_epoch"], r["plain_epoch_ms"]]
        + [
            f"{r[f'every_{k}']['ratio']:.3f} ({r[f'every_{k}']['paired_iqr'][0]:.3f}–"
            f"{r[f'every_{k}']['paired_iqr'][1]:.3f}); CPU {r[f'every_{k}']['cpu_ratio']:.3f}"
            for k in PERIODS
        ]  # fmt: skip
        for r in rows
    ]
    head = ["net", "batch", "steps/epoch", "plain epoch ms"] + [f"every {k} steps" for k in PERIODS]
    return [
        "## Instruments in training",
        "",
        "A scan-fused epoch with fnbp.instruments.training's statistics every K steps "
        "(lax.cond inside the step) over a plain epoch: the median of per-round ratios (IQR), "
        "wall time and CPU time.",
        "",
        markdown_table(head, table),
        "",
    ]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--target-s", type=float, default=0.5)
    print(json.dumps(instruments_training_section(p.parse_args()), indent=1))
