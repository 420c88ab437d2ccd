"""MLP train steps: fnbp ``grads="manual"`` and ``grads="autodiff"`` beside a Flax Linen
``Dense`` stack with Optax (here) and PyTorch (:mod:`bench.torch_peer`, its own process), the
same ReLU MLP, batch and optimizer (SGD, momentum 0.9).

A section of ``scripts/bench.py``; alone: ``cd scripts && ../.venv/bin/python -m
bench.train_steps [--configs small,medium]`` prints each case's ratios as JSON."""

from __future__ import annotations

import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import fnbp
from bench.common import (
    AGAIN,
    LR,
    MOMENTUM,
    case_label,
    hlo_counts,
    interleaved,
    jax_runner,
    log,
    mlp_case,
    paired,
    paired_cpu,
    same_step,
    vs_flax,
    weights,
)


def make_fnbp(sizes, batch, dtype, grads):
    model, params, x, y = mlp_case(sizes, batch)
    optimizer = optax.sgd(LR, momentum=MOMENTUM)
    compute = jnp.bfloat16 if dtype == "bfloat16" else None
    step = fnbp.make_train_step(model, optimizer, grads=grads, compute_dtype=compute)
    return jax_runner(step, params, optimizer.init(params), x, y, n_carry=2)


class FlaxMLP(nn.Module):
    """A ``Dense`` stack computing in ``dtype`` with float32 params, named like fnbp.to_flax."""

    sizes: tuple[int, ...]
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        L = len(self.sizes) - 1
        for l, width in enumerate(self.sizes[1:], start=1):
            x = nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32, name=f"layer{l}")(x)
            if l < L:
                x = nn.relu(x)
        return x


def make_flax(sizes, batch, dtype):
    model, params, x, y = mlp_case(sizes, batch)
    net = FlaxMLP(sizes, jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    variables = fnbp.to_flax(params, model)[1]["params"]  # the same initial weights
    optimizer = optax.sgd(LR, momentum=MOMENTUM)

    def loss_fn(p, x, y):
        logits = net.apply({"params": p}, x).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, opt_state, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        updates, opt_state = optimizer.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    return jax_runner(step, variables, optimizer.init(variables), x, y, n_carry=2)


def train_step_section(cases, torch_results, args, ceilings) -> tuple[list[dict], list[dict]]:
    """``(rows, ratios)``: a row per case and implementation, and the manual/autodiff ratio of
    each case (:func:`bench.common.paired`, with both steps' peak memory) with the manual/Flax
    one (``vs_flax``: :func:`bench.common.vs_flax`), the A/A control (``same_step``:
    :func:`bench.common.same_step`) and the op counts of the manual and Flax programs
    (:func:`bench.common.hlo_counts`).

    JAX implementations are timed here, interleaved with each other; PyTorch's come from
    :func:`bench.torch_peer.torch_worker` (its own process: with torch loaded, its OpenMP
    workers slowed the XLA steps of this process by ~10% on a 2-core CPU, even between torch's
    runs)."""
    rows, ratios = [], []
    for config, sizes, batch, dtype in cases:
        label = case_label(config, sizes, batch, dtype)
        log(f"train step: {label}")
        runners = {
            "fnbp manual": make_fnbp(sizes, batch, dtype, "manual"),
            AGAIN: make_fnbp(sizes, batch, dtype, "manual"),
            "fnbp autodiff": make_fnbp(sizes, batch, dtype, "autodiff"),
            "flax + optax": make_flax(sizes, batch, dtype),
        }
        cpu = {}
        times = interleaved(runners, args.repeats, args.target_s, cpu)
        compile_s = {k: r["compile_s"] for k, r in runners.items()}
        peak = {k: r["peak_bytes"] for k, r in runners.items()}
        notes = {}
        for impl, got in (torch_results or {}).get("cases", {}).get(label, {}).items():
            if "note" in got:
                notes[impl] = got["note"]
            else:
                times[impl], compile_s[impl], peak[impl] = got["times"], got["compile_s"], None
        case = {"config": config, "sizes": list(sizes), "batch": batch, "dtype": dtype}
        flops = 6 * weights(sizes) * batch
        for impl, ts in times.items():
            if impl == AGAIN:  # a control for the ratios, not an implementation
                continue
            t = statistics.median(ts)
            rows.append(
                case
                | {
                    "impl": impl,
                    "median_ms": 1e3 * t,
                    "times_ms": [1e3 * v for v in ts],
                    "tflops": flops / t / 1e12,
                    "ceiling_fraction": flops / t / 1e12 / ceilings[dtype]["tflops"],
                    "compile_s": compile_s[impl],
                    "peak_bytes": peak[impl],
                }
            )
            log(f"  {impl:14s} {1e3 * t:9.3f} ms  {flops / t / 1e12:8.4f} TFLOP/s")
        for impl, note in notes.items():
            rows.append(case | {"impl": impl, "median_ms": None, "note": note})
        ratios.append(
            {"config": config, "batch": batch, "dtype": dtype}
            | paired(times["fnbp manual"], times["fnbp autodiff"])
            | paired_cpu(cpu, "fnbp manual", "fnbp autodiff")
            | {
                "manual_peak_bytes": peak["fnbp manual"],
                "autodiff_peak_bytes": peak["fnbp autodiff"],
                "vs_flax": vs_flax(times, cpu),
                "same_step": same_step(times, cpu),
                "manual_hlo": hlo_counts(runners["fnbp manual"]["compiled"]),
                "flax_hlo": hlo_counts(runners["flax + optax"]["compiled"]),
            }
        )
        log(f"  manual/Flax {ratios[-1]['vs_flax']['ratio']:.3f}; the same step built twice "
            f"(A/A) {ratios[-1]['same_step']['ratio']:.3f}")  # fmt: skip
        del runners
    return rows, ratios


if __name__ == "__main__":  # the section alone, e.g. pinned to one core with taskset -c 0
    import argparse
    import json

    from bench.ceiling import matmul_ceiling
    from bench.common import CONFIGS, GPU_ONLY

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="small", help="comma list of small, medium, large")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--target-s", type=float, default=0.15)
    args = p.parse_args()
    names = [
        n for n in args.configs.split(",") if jax.default_backend() == "gpu" or n not in GPU_ONLY
    ]
    cases = [(n, CONFIGS[n][0], b, "float32") for n in names for b in CONFIGS[n][1]]
    ceilings = {"float32": matmul_ceiling("float32", (1024,), 3)}
    print(json.dumps(train_step_section(cases, None, args, ceilings)[1], indent=1))
