"""Train steps of nets beyond the MLP: the hand-written step (``grads="manual"``) against the
``jax.grad`` step of the same forward (``grads="autodiff"``), and a Flax Linen peer
(``fnbp.to_flax``'s module with the same initial weights, ``jax.value_and_grad`` + Optax), timed
in interleaved rounds like the MLP rows of :mod:`bench.train_steps`.

The nets (float32, random inputs of the net's input shape, random labels):

* the digits CNN, batch 32, SGD + momentum 0.9: 8×8 images, two 3×3 convolutions (16, 32
  channels, ReLU) each followed by a 2×2 max-pool, then a dense layer;
* the MNIST-1D CNN of the dataset's paper (``fnbp.presets.mnist1d_cnn``), batch 100, Adam
  1e-2: three 1-D convolutions of 25 channels, kernels 5/3/3, stride 2, padding 1, ReLU, then
  a dense layer;
* a residual MLP with BatchNorm (``fnbp.presets.resmlp``, ``norm="batch"``), batch 64, SGD +
  momentum 0.9: 64 → 128, 10 blocks ``x + α·F(x)`` with ``F = Dense(128) → BatchNorm → ReLU →
  Dense(128) → BatchNorm`` (no bias before a BatchNorm, α = 1/√10), → 10 (2 blocks in
  ``--quick``).
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import optax

import fnbp
from bench.common import (
    AGAIN,
    LR,
    MOMENTUM,
    hlo_counts,
    interleaved,
    jax_runner,
    log,
    paired,
    paired_cpu,
    same_step,
    vs_flax,
)
from fnbp import presets
from fnbp.layers import Conv, Dense, Flatten, MaxPool, Reshape

BLOCKS, QUICK_BLOCKS = 10, 2


def digits_cnn() -> fnbp.Net:
    return fnbp.Net(64, [
        Reshape((8, 8, 1)),
        Conv(16, (3, 3), activation="relu"), MaxPool((2, 2)),
        Conv(32, (3, 3), activation="relu"), MaxPool((2, 2)),
        Flatten(), Dense(10),
    ])  # fmt: skip


def toy_cnn() -> fnbp.Net:
    """One small convolution on the digits' 8×8 images: a net for ``--quick``'s code paths."""
    return fnbp.Net(64, [Reshape((8, 8, 1)), Conv(4, (3, 3), activation="relu"), Flatten(),
                         Dense(10)])  # fmt: skip


def mnist1d_cnn() -> fnbp.Net:
    return presets.mnist1d_cnn(40, 10)


def resmlp_bn(blocks: int) -> fnbp.Net:
    return presets.resmlp(64, 10, depth=blocks, width=128, norm="batch")


def net_cases(quick: bool) -> list[dict]:
    """``{"name", "net", "batch", "optimizer": (transformation, its name)}`` for every net."""
    sgd = optax.sgd(LR, momentum=MOMENTUM), f"SGD {LR} + momentum {MOMENTUM}"
    blocks = QUICK_BLOCKS if quick else BLOCKS
    return [
        {"name": "digits CNN", "net": digits_cnn(), "batch": 32, "optimizer": sgd},
        {"name": "MNIST-1D CNN", "net": mnist1d_cnn(), "batch": 100,
         "optimizer": (optax.adam(1e-2), "Adam 1e-2")},
        {"name": f"residual MLP, BatchNorm, {blocks} blocks", "net": resmlp_bn(blocks),
         "batch": 64, "optimizer": sgd},
    ]  # fmt: skip


def _inputs(net, batch):
    params = fnbp.init_params(jax.random.key(0), net, "he_normal")
    x = jax.random.normal(jax.random.key(1), (batch, *net.input_shape), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (batch,), 0, net.output_size)
    return params, fnbp.init_state(net), x, y


def make_fnbp_net(case, grads) -> dict:
    net, optimizer = case["net"], case["optimizer"][0]
    params, state, x, y = _inputs(net, case["batch"])
    step = fnbp.make_train_step(net, optimizer, grads=grads)
    args = (params, state, optimizer.init(params), jax.random.key(3), x, y)
    runner = jax_runner(step, *args, n_carry=3)
    return runner | {"hlo": hlo_counts(runner["compiled"])}


def make_flax_net(case) -> dict:
    """The Linen module of ``fnbp.to_flax`` in train mode (batch statistics carried as Flax
    carries them, ``mutable=["batch_stats"]``), ``jax.value_and_grad`` and the same Optax
    optimizer."""
    net, optimizer = case["net"], case["optimizer"][0]
    params, state, x, y = _inputs(net, case["batch"])
    module, variables = fnbp.to_flax(params, net, state)  # the same initial weights

    def loss_fn(p, stats, x, y):
        logits, new = module.apply(
            {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, new["batch_stats"]

    @jax.jit
    def step(p, stats, opt_state, x, y):
        (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(p, stats, x, y)
        updates, opt_state = optimizer.update(g, opt_state, p)
        return optax.apply_updates(p, updates), stats, opt_state, loss

    p, stats = variables["params"], variables.get("batch_stats", {})
    return jax_runner(step, p, stats, optimizer.init(p), x, y, n_carry=3)


def net_step_section(args) -> tuple[list[dict], list[dict]]:
    """``(rows, ratios)``: a row per net and implementation, and each net's manual/autodiff
    ratio (:func:`bench.common.paired`) with both steps' peak memory and op counts, the A/A
    control (``same_step``: :func:`bench.common.same_step`) and, where Flax runs, the
    manual/Flax ratio and the Flax program's op counts."""
    rows, ratios = [], []
    for case in net_cases(args.quick):
        net, name, batch = case["net"], case["name"], case["batch"]
        log(f"net train step: {name}, batch {batch}, {net.num_params} params")
        runners = {
            "fnbp manual": make_fnbp_net(case, "manual"),
            AGAIN: make_fnbp_net(case, "manual"),
            "fnbp autodiff": make_fnbp_net(case, "autodiff"),
        }
        notes = {}
        try:
            runners["flax + optax"] = make_flax_net(case)
        except (TypeError, ValueError) as e:  # a kind fnbp.to_flax does not cover: a result
            notes["flax + optax"] = f"not run: {type(e).__name__}: {str(e)[:200]}"
        cpu = {}
        times = interleaved(runners, args.repeats, args.target_s, cpu)
        row = {"net": name, "layers": net.to_json(), "batch": batch, "dtype": "float32",
               "optimizer": case["optimizer"][1], "num_params": net.num_params}  # fmt: skip
        for impl, ts in times.items():
            if impl == AGAIN:  # a control for the ratios, not an implementation
                continue
            t = statistics.median(ts)
            rows.append(
                row
                | {
                    "impl": impl,
                    "median_ms": 1e3 * t,
                    "times_ms": [1e3 * v for v in ts],
                    "compile_s": runners[impl]["compile_s"],
                    "peak_bytes": runners[impl]["peak_bytes"],
                }
            )
            log(f"  {impl:14s} {1e3 * t:9.3f} ms")
        for impl, note in notes.items():
            rows.append(row | {"impl": impl, "median_ms": None, "note": note})
        m, a = runners["fnbp manual"], runners["fnbp autodiff"]
        ratios.append(
            {"net": name, "batch": batch, "dtype": "float32"}
            | paired(times["fnbp manual"], times["fnbp autodiff"])
            | paired_cpu(cpu, "fnbp manual", "fnbp autodiff")
            | {"manual_peak_bytes": m["peak_bytes"], "autodiff_peak_bytes": a["peak_bytes"]}
            | {"manual_hlo": m["hlo"], "autodiff_hlo": a["hlo"]}
            | {"same_step": same_step(times, cpu)}
            | ({"vs_flax": vs_flax(times, cpu),
                "flax_hlo": hlo_counts(runners["flax + optax"]["compiled"])}
               if "flax + optax" in times else {})
        )  # fmt: skip
        log(f"  manual/autodiff {ratios[-1]['ratio']:.3f} (per-round IQR "
            f"{ratios[-1]['paired_iqr'][0]:.3f}–{ratios[-1]['paired_iqr'][1]:.3f}); the same "
            f"step built twice (A/A) {ratios[-1]['same_step']['ratio']:.3f}")  # fmt: skip
        del runners
    return rows, ratios
