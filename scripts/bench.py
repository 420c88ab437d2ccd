"""Benchmark harness: fnbp's hand-written and autodiff train steps beside Flax + Optax and PyTorch.

One run measures, on whatever device JAX has (a benchmark, not a test: nothing here asserts):

* train-step time (median of interleaved timed repeats after warm-up, ``block_until_ready``)
  of the same ReLU MLP, batch and optimizer (SGD, momentum 0.9) by fnbp ``grads="manual"``,
  fnbp ``grads="autodiff"``, a Flax Linen ``Dense`` stack with Optax, and PyTorch
  (``nn.Sequential`` + ``torch.optim.SGD``, eager and ``torch.compile``) when it is installed;
  model FLOP/s (6 · weights · batch per step) and its fraction of a matmul ceiling measured in
  the same run (the best of a few large square XLA matmuls of the same dtype);
* sweep throughput of 64 small models on digits: a Python loop of jitted steps, a scan-fused
  epoch per model, and the vmapped population + scan;
* per-example gradients: hand-written (``fnbp.per_example_grads``) vs ``vmap(jax.grad)``;
* the cost of ``fnbp.crosscheck`` with finite differences (784-16-16-10, batch 32, float64,
  each in a fresh process so compilation is included) beside ``torch.autograd.gradcheck``;
* peak memory of the compiled manual and autodiff steps (XLA's memory analysis).

Configs: small 64-128-128-10 (batch 32, 128), medium 784-1024-1024-10 (batch 256, 4096) and,
on a GPU only, large 4096×4 hidden-10 (batch 8192). dtypes: float32 everywhere, bfloat16
(fnbp ``compute_dtype``, Flax ``dtype``, torch autocast; float32 master params) on a GPU, and
on a CPU in ``--quick`` so the code path runs. On a GPU torch float32 matmuls use TF32, as
XLA's default precision does.

Usage::

    .venv/bin/python scripts/bench.py                  # the full run (~8 min on a 2-core CPU)
    .venv/bin/python scripts/bench.py --quick          # every section at toy sizes, for tests
    .venv/bin/python scripts/bench.py --configs small --no-torch

Writes ``benchmarks/<device-kind>.json`` and ``.md`` (``<device-kind>-quick.*`` in quick mode).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fnbp
from fnbp import data
from fnbp.report import environment, markdown_table, save_json

ROOT = Path(__file__).resolve().parents[1]
LR, MOMENTUM = 0.01, 0.9
CONFIGS = {  # name: (sizes, batches)
    "small": ((64, 128, 128, 10), (32, 128)),
    "medium": ((784, 1024, 1024, 10), (256, 4096)),
    "large": ((4096, 4096, 4096, 4096, 4096, 10), (8192,)),
}
GPU_ONLY = {"large"}
CROSSCHECK_SIZES = (784, 16, 16, 10)
QUICK_CROSSCHECK_SIZES = (64, 8, 8, 10)  # --quick: the same code, a network 20× smaller


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the torch worker's JSON)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def weights(sizes) -> int:
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def peak_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries − aliased, from the compiled executable."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


# ----------------------------------------------------------------------------------------------
# Implementations of one train step. Each maker returns a dict with run(n) (n steps, waited
# for), compile_s (the first call) and, for the JAX ones, peak_bytes.


def _case_data(sizes, batch):
    model = fnbp.MLP(sizes)
    params = fnbp.init_params(jax.random.key(0), model, "he_normal")
    x = jax.random.normal(jax.random.key(1), (batch, sizes[0]), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (batch,), 0, sizes[-1])
    return model, params, x, y


def _jax_runner(step, params, opt_state, x, y):
    compiled = step.lower(params, opt_state, x, y).compile()
    state = [params, opt_state]

    def run(n):
        p, s = state
        for _ in range(n):
            p, s, m = step(p, s, x, y)
        jax.block_until_ready((p, s, m))
        state[:] = p, s

    t0 = time.perf_counter()
    run(1)
    return {"run": run, "compile_s": time.perf_counter() - t0, "peak_bytes": peak_bytes(compiled)}


def make_fnbp(sizes, batch, dtype, grads):
    model, params, x, y = _case_data(sizes, batch)
    optimizer = optax.sgd(LR, momentum=MOMENTUM)
    compute = jnp.bfloat16 if dtype == "bfloat16" else None
    step = fnbp.make_train_step(model, optimizer, grads=grads, compute_dtype=compute)
    return _jax_runner(step, params, optimizer.init(params), x, y)


class _FlaxMLP(nn.Module):
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
    model, params, x, y = _case_data(sizes, batch)
    net = _FlaxMLP(sizes, jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
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

    return _jax_runner(step, variables, optimizer.init(variables), x, y)


def make_torch(torch, sizes, batch, dtype, compiled):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, params, x, y = _case_data(sizes, batch)
    layers = []
    for l, p in enumerate(params, start=1):
        linear = torch.nn.Linear(p["W"].shape[1], p["W"].shape[0])
        with torch.no_grad():  # the same initial weights
            linear.weight.copy_(torch.from_numpy(np.array(p["W"])))
            linear.bias.copy_(torch.from_numpy(np.array(p["b"])))
        layers += [linear] + ([torch.nn.ReLU()] if l < len(params) else [])
    net = torch.nn.Sequential(*layers).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    xt = torch.from_numpy(np.array(x)).to(device)
    yt = torch.from_numpy(np.asarray(y).astype(np.int64)).to(device)
    autocast = dtype == "bfloat16"

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            logits = net(xt)
        loss = torch.nn.functional.cross_entropy(logits.float(), yt)
        loss.backward()
        optimizer.step()
        return loss

    step = torch.compile(train_step) if compiled else train_step
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(n):
        for _ in range(n):
            step()
        sync()

    t0 = time.perf_counter()
    run(2)  # torch.compile traces on the first call and may recompile once on the second
    # On a CPU, torch's OpenMP workers spin for a while after each op: whatever runs next would
    # share the cores with them, so the timer waits for them to go idle.
    settle = 0.0 if device == "cuda" else 0.2
    return {
        "run": run,
        "compile_s": time.perf_counter() - t0,
        "peak_bytes": None,
        "settle_s": settle,
    }


# ----------------------------------------------------------------------------------------------
# Sections.


def _interleaved(runners: dict, repeats: int, target_s: float) -> dict[str, list[float]]:
    """Seconds per step of each runner, over ``repeats`` rounds, each in a random order."""
    inner = {}
    for name, r in runners.items():
        t0 = time.perf_counter()
        r["run"](1)
        one = time.perf_counter() - t0
        time.sleep(r.get("settle_s", 0.0))
        inner[name] = int(min(1000, max(1, round(target_s / max(one, 1e-6)))))
    names, times = list(runners), {name: [] for name in runners}
    order = np.random.default_rng(0)  # a fresh order every round: no runner always follows another
    for _ in range(repeats):
        for name in order.permutation(names):
            t0 = time.perf_counter()
            runners[name]["run"](inner[name])
            times[name].append((time.perf_counter() - t0) / inner[name])
            time.sleep(runners[name].get("settle_s", 0.0))
    return times


def matmul_ceiling(dtype: str, sizes, repeats: int) -> dict:
    """The best TFLOP/s of a square ``a @ b`` over ``sizes``, each the median of ``repeats``."""
    dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    f = jax.jit(jnp.matmul)
    out = {}
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), dt)
        b = jax.random.normal(jax.random.key(1), (n, n), dt)
        f(a, b).block_until_ready()
        reps = max(1, int(0.05 / max(_time(lambda a=a, b=b: f(a, b).block_until_ready()), 1e-6)))
        ts = [_time(lambda a=a, b=b: f(a, b).block_until_ready(), reps) for _ in range(repeats)]
        out[str(n)] = 2 * n**3 / statistics.median(ts) / 1e12
    return {"tflops_by_size": out, "tflops": max(out.values())}


def step_matmuls(sizes, batch: int, dtype: str, repeats: int, population: int = 0) -> dict:
    """The matmuls of one train step alone (forward z = aWᵀ, Σδaᵀ for every layer, Wᵀδ for
    every layer but the first), as one jitted program: what the step's matmuls can reach.
    With ``population`` > 0, the same for that many models at once (``vmap``, as in
    :func:`fnbp.make_population_epoch`)."""
    dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    lead = (population,) if population else ()
    keys = iter(jax.random.split(jax.random.key(0), 3 * len(sizes)))
    acts = [jax.random.normal(next(keys), (*lead, batch, n), dt) for n in sizes]
    Ws = [
        jax.random.normal(next(keys), (*lead, o, i), dt)
        for i, o in zip(sizes[:-1], sizes[1:], strict=True)
    ]

    def one(acts, Ws):
        out = [acts[l] @ W.T for l, W in enumerate(Ws)]  # forward
        out += [acts[l + 1].T @ acts[l] for l in range(len(Ws))]  # Σδaᵀ (δ has z's shape)
        out += [acts[l + 1] @ W for l, W in enumerate(Ws) if l > 0]  # Wᵀδ
        return out

    matmuls = jax.jit(jax.vmap(one) if population else one)
    jax.block_until_ready(matmuls(acts, Ws))
    t = statistics.median(
        _time(lambda: jax.block_until_ready(matmuls(acts, Ws)), 3) for _ in range(repeats)
    )
    flops = 2 * batch * (3 * weights(sizes) - sizes[0] * sizes[1]) * max(population, 1)
    return {
        "sizes": list(sizes),
        "batch": batch,
        "dtype": dtype,
        "population": population,
        "ms": 1e3 * t,
        "tflops": flops / t / 1e12,
    }


def _time(fn, n: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def _case_label(config, sizes, batch, dtype) -> str:
    return f"{config} {'-'.join(map(str, sizes))} batch {batch} {dtype}"


def train_step_section(cases, torch_results, args, ceilings) -> list[dict]:
    """JAX implementations timed here, interleaved with each other; PyTorch's come from
    :func:`torch_worker` (its own process: with torch loaded, its OpenMP workers slowed the
    XLA steps of this process by ~10% on a 2-core CPU, even between torch's runs)."""
    rows = []
    for config, sizes, batch, dtype in cases:
        label = _case_label(config, sizes, batch, dtype)
        log(f"train step: {label}")
        runners = {
            "fnbp manual": make_fnbp(sizes, batch, dtype, "manual"),
            "fnbp autodiff": make_fnbp(sizes, batch, dtype, "autodiff"),
            "flax + optax": make_flax(sizes, batch, dtype),
        }
        times = _interleaved(runners, args.repeats, args.target_s)
        compile_s = {k: r["compile_s"] for k, r in runners.items()}
        peak = {k: r["peak_bytes"] for k, r in runners.items()}
        notes = {}
        for impl, got in (torch_results or {}).get("cases", {}).get(label, {}).items():
            if "note" in got:
                notes[impl] = got["note"]
            else:
                times[impl], compile_s[impl], peak[impl] = got["times"], got["compile_s"], None
        flops = 6 * weights(sizes) * batch
        for impl, ts in times.items():
            t = statistics.median(ts)
            rows.append(
                {
                    "config": config,
                    "sizes": list(sizes),
                    "batch": batch,
                    "dtype": dtype,
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
            rows.append(
                {"config": config, "sizes": list(sizes), "batch": batch, "dtype": dtype}
                | {"impl": impl, "median_ms": None, "note": note}
            )
        m, a = times["fnbp manual"], times["fnbp autodiff"]
        paired = [u / v for u, v in zip(m, a, strict=True)]
        rows[-len(times) - len(notes)]["paired_ratios"] = paired
        del runners
    return rows


def ratios(rows) -> list[dict]:
    """manual/autodiff step-time ratio per case: the median over rounds of the two timed in the
    same round (robust to other processes slowing the machine between rounds), the ratio of
    the two medians, and the interquartile range of the per-round ratios."""
    out = []
    for r in rows:
        if r["impl"] != "fnbp manual":
            continue
        a = next(
            s
            for s in rows
            if s["impl"] == "fnbp autodiff"
            and (s["config"], s["batch"], s["dtype"]) == (r["config"], r["batch"], r["dtype"])
        )
        q = np.percentile(r["paired_ratios"], [25, 75])
        out.append(
            {
                "config": r["config"],
                "batch": r["batch"],
                "dtype": r["dtype"],
                "ratio": float(np.median(r["paired_ratios"])),
                "ratio_of_medians": r["median_ms"] / a["median_ms"],
                "paired_iqr": [float(q[0]), float(q[1])],
                "manual_peak_bytes": r["peak_bytes"],
                "autodiff_peak_bytes": a["peak_bytes"],
            }
        )
    return out


def sweep_section(args) -> dict:
    """model-steps/s for 64 (quick: 8) models 64-128-128-10, batch 32, on digits."""
    log("sweep: 64 small models on digits")
    P, batch, epochs = (8 if args.quick else 64), 32, (1 if args.quick else 2)
    ds = data.load_digits(seed=0)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    model = fnbp.MLP((64, 128, 128, 10))
    optimizer = optax.sgd(LR, momentum=MOMENTUM)
    keys = jax.random.split(jax.random.key(0), P)
    population = fnbp.init_population(keys, model)
    members = [jax.tree.map(lambda v, i=i: v[i], population) for i in range(P)]
    steps = len(x) // batch
    step = fnbp.make_train_step(model, optimizer)
    epoch = fnbp.make_train_epoch(model, optimizer, batch_size=batch)
    pop_epoch = fnbp.make_population_epoch(model, optimizer, batch_size=batch)
    # The loop's batches are shuffled and split before the clock starts (the two fused
    # programs shuffle inside): the loop is timed on its steps alone.
    batches = []
    for i in range(P):
        xb, yb = data.epoch_batches(keys[i], x, y, batch)
        batches.append(list(zip(list(xb), list(yb), strict=True)))

    def loop():
        out = []
        for i in range(P):
            p, s = members[i], optimizer.init(members[i])
            for _ in range(epochs):
                for xb, yb in batches[i]:
                    p, s, m = step(p, s, xb, yb)
            out.append(p)
        jax.block_until_ready(out)

    def scan():
        out = []
        for i in range(P):
            p, s = members[i], optimizer.init(members[i])
            for e in range(epochs):
                p, s, m = epoch(p, s, jax.random.fold_in(keys[i], e), x, y)
            out.append(p)
        jax.block_until_ready(out)

    def population_scan():
        p, s = population, jax.vmap(optimizer.init)(population)
        for e in range(epochs):
            p, s, m = pop_epoch(p, s, jax.vmap(lambda k, e=e: jax.random.fold_in(k, e))(keys), x, y)
        jax.block_until_ready(p)

    result = {"models": P, "batch": batch, "steps_per_epoch": steps, "epochs": epochs}
    fns = {"python_loop": loop, "scan_epoch": scan, "vmap_population_scan": population_scan}
    for fn in fns.values():  # warm-up: compile each program once
        fn()
    times = {name: [] for name in fns}
    for _ in range(max(1, args.repeats // 2)):
        for name, fn in fns.items():
            times[name].append(_time(fn))
    for name, ts in times.items():
        t = statistics.median(ts)
        result[name] = {"seconds": t, "model_steps_per_s": P * steps * epochs / t}
        log(f"  {name:22s} {P * steps * epochs / t:12.0f} model-steps/s")
    result["speedup_population_over_loop"] = (
        result["vmap_population_scan"]["model_steps_per_s"]
        / result["python_loop"]["model_steps_per_s"]
    )
    # A floor no fused form can beat: the population's matmuls alone, vmapped like its step.
    floor = step_matmuls((64, 128, 128, 10), batch, "float32", max(3, args.repeats), P)
    result["matmul_floor_us_per_model_step"] = 1e3 * floor["ms"] / P
    result["matmul_floor_tflops"] = floor["tflops"]
    result["max_speedup_over_loop"] = (1e6 / result["python_loop"]["model_steps_per_s"]) / result[
        "matmul_floor_us_per_model_step"
    ]
    log(
        f"  matmuls alone: {result['matmul_floor_us_per_model_step']:.1f} µs per model-step, "
        f"at most {result['max_speedup_over_loop']:.1f}× the loop"
    )
    return result


def per_example_section(args, on_gpu: bool) -> list[dict]:
    from fnbp.backprop import _per_example_grads_jit
    from fnbp.model import _loss

    cases = [((64, 128, 128, 10), 32 if args.quick else 128)]
    if not args.quick:
        cases.append(((784, 1024, 1024, 10), 256 if on_gpu else 32))
    out = []
    for sizes, batch in cases:
        log(f"per-example grads: {'-'.join(map(str, sizes))} batch {batch}")
        model, params, x, y = _case_data(sizes, batch)

        def reference(p, x, y, model=model):
            one = lambda xi, yi: jax.grad(_loss)(p, model, xi[None], yi[None], 0.0)  # noqa: E731
            return jax.vmap(one)(x, y)

        # Both jitted programs, bare: fnbp.per_example_grads also checks its arguments in
        # Python first (shapes, label range), which the reference would not pay.
        fns = {
            "manual": lambda p, x, y, model=model: _per_example_grads_jit(p, model, x, y, 0.0),
            "vmap(jax.grad)": jax.jit(reference),
        }
        runners = {}
        for name, f in fns.items():
            jax.block_until_ready(f(params, x, y))
            runners[name] = {
                "run": lambda n, f=f, a=(params, x, y): [
                    jax.block_until_ready(f(*a)) for _ in range(n)
                ]
            }
        times = _interleaved(runners, args.repeats, args.target_s)
        row = {"sizes": list(sizes), "batch": batch}
        for name, ts in times.items():
            row[name] = {
                "median_ms": 1e3 * statistics.median(ts),
                "samples_per_s": batch / statistics.median(ts),
            }
            log(f"  {name:16s} {batch / statistics.median(ts):12.0f} samples/s")
        # The median over rounds of the two timed in the same round: these programs are
        # dominated by writing batch × parameters floats, and page faults of fresh buffers
        # make single timings swing by 2× on a CPU.
        paired = [a / m for m, a in zip(times["manual"], times["vmap(jax.grad)"], strict=True)]
        row["speedup_manual"] = float(np.median(paired))
        row["speedup_iqr"] = [float(v) for v in np.percentile(paired, [25, 75])]
        out.append(row)
    return out


_CROSSCHECK_CHILD = """
import json, time
import jax, jax.numpy as jnp
import fnbp
with jax.enable_x64(True):
    model = fnbp.MLP({sizes})
    params = fnbp.init_params(jax.random.key(1), model, dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(2), (32, model.sizes[0]), jnp.float64)
    y = jax.random.randint(jax.random.key(3), (32,), 0, model.sizes[-1])
    jax.block_until_ready((params, x, y))
    t0 = time.perf_counter()
    report = fnbp.crosscheck(params, model, x, y)
    t1 = time.perf_counter()
    fnbp.crosscheck(params, model, x, y)
    t2 = time.perf_counter()
print(json.dumps({{"first_s": t1 - t0, "second_s": t2 - t1, "passed": report.passed,
                  "kinks": report.kinks, "num_params": model.num_params}}))
"""


def crosscheck_section(torch_results, args) -> dict:
    sizes = QUICK_CROSSCHECK_SIZES if args.quick else CROSSCHECK_SIZES
    log(f"cross-check cost: {'-'.join(map(str, sizes))}, batch 32, float64")
    runs = []
    for _ in range(1 if args.quick else 3):  # each in a fresh process: compilation included
        out = subprocess.run(
            [sys.executable, "-c", _CROSSCHECK_CHILD.format(sizes=sizes)],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = {
        "sizes": list(sizes),
        "batch": 32,
        "num_params": runs[0]["num_params"],
        "fnbp_first_s": statistics.median(r["first_s"] for r in runs),
        "fnbp_first_s_runs": [r["first_s"] for r in runs],
        "fnbp_compiled_s": statistics.median(r["second_s"] for r in runs),
        "passed": all(r["passed"] for r in runs),
        "kinks": runs[0]["kinks"],
    }
    log(f"  fnbp.crosscheck {result['fnbp_first_s']:.2f} s (compile included)")
    if torch_results is not None:
        runs = torch_results["gradcheck_s_runs"]
        result["torch_gradcheck_s"] = statistics.median(runs)
        result["torch_gradcheck_s_runs"] = runs
        log(f"  torch.autograd.gradcheck {result['torch_gradcheck_s']:.2f} s")
    return result


def torch_worker(spec: dict) -> dict:
    """The PyTorch peers, in a process of their own (``--torch-worker``): every case's eager
    and ``torch.compile`` steps (interleaved with each other) and ``gradcheck`` runs."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls as XLA runs them on GPUs
        torch.backends.cudnn.allow_tf32 = True
    out = {"version": torch.__version__, "cases": {}}
    for config, sizes, batch, dtype in spec["cases"]:
        label = _case_label(config, sizes, batch, dtype)
        log(f"torch train step: {label}")
        runners, got = {"torch eager": make_torch(torch, sizes, batch, dtype, compiled=False)}, {}
        if spec["torch_compile"]:
            try:
                runners["torch.compile"] = make_torch(torch, sizes, batch, dtype, True)
            except Exception as e:  # noqa: BLE001  (any compile failure is a result)
                got["torch.compile"] = {"note": f"failed: {type(e).__name__}: {str(e)[:200]}"}
                log(f"  torch.compile {got['torch.compile']['note']}")
        else:
            got["torch.compile"] = {"note": "not run (--quick or --no-torch-compile)"}
        for impl, ts in _interleaved(runners, spec["repeats"], spec["target_s"]).items():
            got[impl] = {"times": ts, "compile_s": runners[impl]["compile_s"]}
            log(f"  {impl:14s} {1e3 * statistics.median(ts):9.3f} ms")
        out["cases"][label] = got
    sizes = tuple(spec["crosscheck_sizes"])
    out["gradcheck_s_runs"] = [_torch_gradcheck(torch, sizes) for _ in range(spec["gradchecks"])]
    return out


def _run_torch_worker(cases, args) -> dict | None:
    """:func:`torch_worker` in a subprocess, or ``None`` when torch is not installed."""
    if args.no_torch or importlib.util.find_spec("torch") is None:
        return None
    spec = {
        "cases": cases, "torch_compile": args.torch_compile, "repeats": args.repeats,
        "target_s": args.target_s, "gradchecks": 1 if args.quick else 3,
        "crosscheck_sizes": QUICK_CROSSCHECK_SIZES if args.quick else CROSSCHECK_SIZES,
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, __file__, "--torch-worker", json.dumps(spec)],
        stdout=subprocess.PIPE, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def _torch_gradcheck(torch, sizes) -> float:
    """``torch.autograd.gradcheck`` (full mode, float64) of the loss w.r.t. all parameters."""
    with jax.enable_x64(True):
        model = fnbp.MLP(sizes)
        params = fnbp.init_params(jax.random.key(1), model, dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(2), (32, model.sizes[0]), jnp.float64)
        y = jax.random.randint(jax.random.key(3), (32,), 0, model.sizes[-1])
    leaves = [
        torch.tensor(np.asarray(p[k]), dtype=torch.float64, requires_grad=True)
        for p in params
        for k in ("W", "b")
    ]
    xt = torch.tensor(np.asarray(x), dtype=torch.float64)
    yt = torch.tensor(np.asarray(y), dtype=torch.int64)

    def loss(*leaves):
        a = xt
        for l in range(0, len(leaves), 2):
            a = a @ leaves[l].T + leaves[l + 1]
            if l + 2 < len(leaves):
                a = torch.relu(a)
        return torch.nn.functional.cross_entropy(a, yt)

    t0 = time.perf_counter()
    torch.autograd.gradcheck(loss, tuple(leaves), eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=False)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# Targets and the report.


def targets(result, on_gpu: bool, kind: str) -> list[dict]:
    rows, t = [], []
    h100 = "H100" in kind
    for r in result["ratios"]:
        lo, hi = r["paired_iqr"]
        t.append(
            {
                "target": f"manual/autodiff step time ≤ 1.00: {r['config']} batch {r['batch']} {r['dtype']}",
                "measured": f"{r['ratio']:.3f} (per-round IQR {lo:.3f}–{hi:.3f})",
                "met": r["ratio"] <= 1.0,
            }
        )
    steps = result["train_step"]
    large = [s for s in steps if s["config"] == "large" and s.get("median_ms")]
    for dtype, goal in (("bfloat16", 700), ("float32", 300)):
        sel = [s for s in large if s["dtype"] == dtype]
        if not sel:
            t.append({"target": f"H100 large {dtype}: ahead of every peer, ≥ {goal} TFLOP/s",
                      "measured": "not measured (no GPU in this run)", "met": None})  # fmt: skip
            continue
        mine = next(s for s in sel if s["impl"] == "fnbp manual")
        ahead = all(
            mine["median_ms"] <= s["median_ms"] for s in sel if s["impl"] != "fnbp autodiff"
        )
        t.append(
            {
                "target": f"H100 large {dtype}: ahead of every peer, ≥ {goal} TFLOP/s",
                "measured": f"{1e3 * mine['tflops']:.0f} TFLOP/s, "
                f"{'ahead of' if ahead else 'behind'} the fastest peer",
                "met": (ahead and mine["tflops"] * 1e3 >= goal) if h100 else None,
            }
        )
    med = [
        s
        for s in steps
        if (s["config"], s["batch"], s["dtype"], s["impl"])
        == ("medium", 256, "float32", "fnbp manual")
    ]
    if not on_gpu and med:
        f = med[0]["ceiling_fraction"]
        alone = result["matmul_ceiling"]["float32"]["step_matmuls_alone"]["ceiling_fraction"]
        t.append(
            {
                "target": "CPU medium batch 256 float32: ≥ 85% of the matmul ceiling",
                "measured": f"{100 * f:.1f}% (the step's matmuls alone: {100 * alone:.1f}%)",
                "met": f >= 0.85,
            }
        )
    sw = result["sweep"]["speedup_population_over_loop"]
    goal = 1000 if on_gpu else 5
    t.append({"target": f"sweep: vmapped population + scan ≥ {goal}× the Python loop",
              "measured": f"{sw:.1f}×", "met": sw >= goal})  # fmt: skip
    for r in result["per_example"]:
        t.append(
            {
                "target": f"per-example grads {'-'.join(map(str, r['sizes']))} batch {r['batch']}: manual ≥ vmap(jax.grad)",
                "measured": f"{r['speedup_manual']:.3f}× (per-round IQR "
                f"{r['speedup_iqr'][0]:.2f}–{r['speedup_iqr'][1]:.2f})",
                "met": r["speedup_manual"] >= 1.0,
            }
        )
    cc = result["crosscheck"]
    net = "-".join(map(str, cc["sizes"]))
    t.append({"target": f"full FD cross-check of {net} ≤ 1 s, compile included",
              "measured": f"{cc['fnbp_first_s']:.2f} s (median of {len(cc['fnbp_first_s_runs'])} fresh processes)",
              "met": cc["fnbp_first_s"] <= 1.0})  # fmt: skip
    if "torch_gradcheck_s" in cc:
        t.append({"target": "cross-check faster than torch.autograd.gradcheck (full, float64)",
                  "measured": f"{cc['fnbp_first_s']:.2f} s vs {cc['torch_gradcheck_s']:.2f} s",
                  "met": cc["fnbp_first_s"] < cc["torch_gradcheck_s"]})  # fmt: skip
    else:
        t.append({"target": "cross-check faster than torch.autograd.gradcheck (full, float64)",
                  "measured": "not measured (PyTorch not installed or --no-torch)", "met": None})  # fmt: skip
    for r in result["ratios"]:
        m, a = r["manual_peak_bytes"], r["autodiff_peak_bytes"]
        t.append(
            {
                "target": f"peak memory manual ≤ autodiff: {r['config']} batch {r['batch']} {r['dtype']}",
                "measured": f"{m / 2**20:.2f} vs {a / 2**20:.2f} MiB" if m and a else "n/a",
                "met": (m <= a) if m and a else None,
            }
        )
    rows.extend(t)
    return rows


def _mark(met) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[met]


def markdown(result) -> str:
    meta = result["meta"]
    lines = [
        f"# fnbp benchmark: {meta['device']} ({meta['backend']})",
        "",
        f"{meta['date']}, git {str(meta['git_commit'])[:12]}{' (dirty)' if meta['git_dirty'] else ''}, "
        f"jax {meta['jax_version']}, flax {meta['flax_version']}, optax {meta['optax_version']}, "
        f"torch {meta['torch_version'] or 'not installed'}, Python {meta['python']}, "
        f"{meta['cpu_count']} CPU cores{', quick mode' if meta['quick'] else ''}. "
        f"`{meta['command']}`, {meta['wall_s']:.0f} s; 1-minute load average "
        f"{meta['load_average'][0]:.1f} at the start, {meta['load_average'][1]:.1f} at the end.",
        "",
        "## Targets",
        "",
        markdown_table(
            ["target", "measured", "result"],
            [[t["target"], t["measured"], _mark(t["met"])] for t in result["targets"]],
        ),  # fmt: skip
        "",
        "## Train step (SGD + momentum 0.9, ReLU MLP, softmax cross-entropy)",
        "",
        "Median of interleaved timed repeats after warm-up (the JAX implementations interleaved "
        "with each other, then PyTorch's, whose spinning OpenMP workers would slow whatever runs "
        "beside them). TFLOP/s counts 6 · weights · batch per "
        "step; the ceiling is the best large square XLA matmul of the same dtype in this run: "
        + ", ".join(
            f"{d} {c['tflops'] * 1e3:.1f} GFLOP/s" for d, c in result["matmul_ceiling"].items()
        )
        + ". The matmuls of one step alone (forward, Σδaᵀ and Wᵀδ, one jitted program): "
        + ", ".join(
            f"{'-'.join(map(str, m['sizes']))} batch {m['batch']} {d} "
            f"{m['tflops'] * 1e3:.1f} GFLOP/s ({100 * m['ceiling_fraction']:.1f}% of the ceiling)"
            for d, m in ((d, c["step_matmuls_alone"]) for d, c in result["matmul_ceiling"].items())
        )
        + ".",
        "",
    ]
    rows = []
    for s in result["train_step"]:
        case = f"{s['config']} {'-'.join(map(str, s['sizes']))} b{s['batch']} {s['dtype']}"
        if s.get("median_ms") is None:
            rows.append([case, s["impl"], "–", "–", "–", "–", s.get("note", "")])
            continue
        rows.append([case, s["impl"], f"{s['median_ms']:.4g}", f"{s['tflops'] * 1e3:.4g}",
                     f"{100 * s['ceiling_fraction']:.1f}%", f"{s['compile_s']:.2f}",
                     "" if s["peak_bytes"] is None else f"{s['peak_bytes'] / 2**20:.2f} MiB"])  # fmt: skip
    lines += [
        markdown_table(
            [
                "case",
                "implementation",
                "ms/step",
                "GFLOP/s",
                "of ceiling",
                "first call s",
                "peak memory",
            ],
            rows,
        ),
        "",
        "manual/autodiff step-time ratio: the median over rounds of the two timed in the same "
        "round, then the ratio of the two medians and the interquartile range of the per-round "
        "ratios:",
        "",
        markdown_table(
            ["case", "manual/autodiff", "ratio of medians", "per-round IQR"],
            [
                [
                    f"{r['config']} b{r['batch']} {r['dtype']}",
                    f"{r['ratio']:.3f}",
                    f"{r['ratio_of_medians']:.3f}",
                    f"{r['paired_iqr'][0]:.3f}–{r['paired_iqr'][1]:.3f}",
                ]
                for r in result["ratios"]
            ],
        ),  # fmt: skip
        "",
    ]
    sw = result["sweep"]
    lines += [
        f"## Sweep: {sw['models']} models 64-128-128-10, batch 32, digits ({sw['steps_per_epoch']} steps per epoch, {sw['epochs']} epochs)",
        "",
        markdown_table(
            ["method", "seconds", "model-steps/s"],
            [
                [k, f"{sw[k]['seconds']:.3f}", f"{sw[k]['model_steps_per_s']:.0f}"]
                for k in ("python_loop", "scan_epoch", "vmap_population_scan")
            ],
        ),  # fmt: skip
        "",
        f"vmapped population + scan: {sw['speedup_population_over_loop']:.1f}× the Python loop. "
        f"The population's matmuls alone (forward, Σδaᵀ, Wᵀδ of all {sw['models']} models, "
        f"vmapped, nothing else) take {sw['matmul_floor_us_per_model_step']:.1f} µs per "
        f"model-step ({1e3 * sw['matmul_floor_tflops']:.0f} GFLOP/s), so no program that "
        f"does them can beat the loop by more than {sw['max_speedup_over_loop']:.1f}× here.",
        "",
        "## Per-example gradients",
        "",
        markdown_table(
            [
                "network",
                "batch",
                "manual samples/s",
                "vmap(jax.grad) samples/s",
                "manual / vmap(jax.grad)",
            ],
            [
                [
                    "-".join(map(str, r["sizes"])),
                    r["batch"],
                    f"{r['manual']['samples_per_s']:.0f}",
                    f"{r['vmap(jax.grad)']['samples_per_s']:.0f}",
                    f"{r['speedup_manual']:.3f}×",
                ]
                for r in result["per_example"]
            ],
        ),  # fmt: skip
        "",
    ]
    cc = result["crosscheck"]
    lines += [
        f"## Cross-check cost ({'-'.join(map(str, cc['sizes']))}, {cc['num_params']} parameters, batch 32, float64)",
        "",
        markdown_table(
            ["check", "seconds"],
            [
                [
                    "fnbp.crosscheck, finite differences of every parameter, fresh process (compile included)",
                    f"{cc['fnbp_first_s']:.2f} (runs: {', '.join(f'{v:.2f}' for v in cc['fnbp_first_s_runs'])})",
                ],
                ["fnbp.crosscheck again, compiled", f"{cc['fnbp_compiled_s']:.2f}"],
            ]
            + (
                [
                    [
                        "torch.autograd.gradcheck (full mode, float64)",
                        f"{cc['torch_gradcheck_s']:.2f}",
                    ]
                ]
                if "torch_gradcheck_s" in cc
                else []
            ),
        ),  # fmt: skip
        "",
        f"fnbp's check {'passed' if cc['passed'] else 'FAILED'} ({cc['kinks']} parameters straddle a ReLU kink).",
        "",
    ]
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def closing_notes(result, on_gpu: bool) -> list[str]:
    notes = []
    if result["meta"]["quick"]:
        return [
            "--quick: toy sizes and one or two repeats, to exercise every code path; these "
            "timings are not measurements and the targets are not judged by them."
        ]
    if not on_gpu:
        notes.append(
            "No GPU in this run: the large config, bfloat16 and the H100 targets were not "
            "measured (the bfloat16 path runs here only in --quick). Run this script on a GPU "
            "(README: Performance) to fill them in."
        )
    for t in result["targets"]:
        if t["met"] is False and t["target"].startswith("manual/autodiff"):
            r = next(r for r in result["ratios"] if t["target"].endswith(
                f"{r['config']} batch {r['batch']} {r['dtype']}"))  # fmt: skip
            spread = (
                "inside the spread of the paired per-repeat ratios, i.e. within this run's noise"
                if r["paired_iqr"][0] <= 1.0
                else "outside the spread of the paired per-repeat ratios, so a real gap in this run"
            )
            notes.append(
                f"{t['target']}: missed at {t['measured']}, {spread}. The two steps compile to "
                "the same matmuls and nearly the same fusions (the hand-written one has fewer "
                "and a smaller temporary buffer)."
            )
        elif t["met"] is False and t["target"].startswith("per-example"):
            notes.append(
                f"{t['target']}: missed at {t['measured']}. Both compile to the same program "
                "(the same dots and fusions; a per-example step is one outer product per layer "
                "and example, memory-bound), so the ratio is noise around 1."
            )
        elif t["met"] is False and t["target"].startswith("CPU medium"):
            peers = ", ".join(
                f"{r['impl']} {100 * r['ceiling_fraction']:.1f}%"
                for r in result["train_step"]
                if r["config"] == "medium" and r["batch"] == 256 and r["dtype"] == "float32"
                and r.get("median_ms") is not None and r["impl"] != "fnbp manual"
            )  # fmt: skip
            notes.append(
                f"{t['target']}: missed at {t['measured']}; in the same run {peers}. The "
                "ceiling is a square matmul; a batch-256 step's matmuls are thinner (K = 256 "
                "in Σδaᵀ, which XLA's CPU backend hands to Eigen as a transposed-operand dot "
                "rather than to YNNPACK) and reach only the fraction shown when run alone, and "
                "the step adds memory-bound passes (ReLU masks, softmax, the momentum update). "
                "Both fnbp steps also make one pass over the gradients for the per-layer norms "
                "and finiteness flags that fnbp's logging and divergence guard read, which the "
                "Flax peer does not compute."
            )
        elif t["met"] is False and t["target"].startswith("sweep") and not on_gpu:
            sw = result["sweep"]
            notes.append(
                f"{t['target']}: missed at {t['measured']}. On this CPU a small model's step "
                "is not dispatch-bound: inside the scan-fused epoch one model-step takes "
                f"{1e6 / sw['scan_epoch']['model_steps_per_s']:.0f} µs of compute (matmuls of "
                "32 rows run far below the matmul ceiling), against "
                f"{1e6 / sw['python_loop']['model_steps_per_s']:.0f} µs per step in the Python "
                f"loop; the population's matmuls alone, vmapped, take "
                f"{sw['matmul_floor_us_per_model_step']:.1f} µs per model-step, so no fused form "
                f"can beat the loop by more than {sw['max_speedup_over_loop']:.1f}× on this "
                "CPU. On a GPU, where a small step is almost all dispatch, it is the other way "
                "round."
            )
        elif t["met"] is False and t["target"].startswith("full FD"):
            notes.append(
                f"{t['target']}: missed at {t['measured']}. Most of it is XLA compiling the two "
                "programs (about 0.5 s on an idle 2-core CPU); with other processes on the "
                f"cores (load average {result['meta']['load_average'][0]:.1f} at the start) "
                "compilation slows with them."
            )
        elif t["met"] is False:
            notes.append(f"{t['target']}: missed ({t['measured']}).")
    return notes


def _git_dirty() -> bool | None:
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":!benchmarks"],
            cwd=ROOT, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every section at toy sizes (seconds)")
    p.add_argument("--out", default=str(ROOT / "benchmarks"), help="folder for the JSON and table")
    p.add_argument("--configs", default=None, help="comma list of small, medium, large")
    p.add_argument("--dtypes", default=None, help="comma list of float32, bfloat16")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out even if installed")
    p.add_argument("--no-torch-compile", action="store_true", help="eager PyTorch only")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per implementation")
    p.add_argument("--target-s", type=float, default=None, help="seconds per timed repeat")
    p.add_argument("--torch-worker", metavar="SPEC", help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    if args.torch_worker:
        print(json.dumps(torch_worker(json.loads(args.torch_worker))))
        return 0
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    backend = jax.default_backend()
    on_gpu = backend == "gpu"
    kind = str(jax.devices()[0].device_kind)
    args.repeats = args.repeats or (2 if args.quick else 15)
    args.target_s = args.target_s or (0.005 if args.quick else 0.15)
    args.torch_compile = not (args.quick or args.no_torch_compile)

    names = (
        args.configs.split(",") if args.configs else (["small"] if args.quick else list(CONFIGS))
    )
    for name in names:
        if name not in CONFIGS:
            p.error(f"--configs: unknown config {name!r}; expected some of {sorted(CONFIGS)}")
    names = [n for n in names if on_gpu or n not in GPU_ONLY]
    dtypes = args.dtypes.split(",") if args.dtypes else (
        ["float32", "bfloat16"] if (on_gpu or args.quick) else ["float32"]
    )  # fmt: skip
    cases = [
        (n, CONFIGS[n][0], b, d)
        for n in names
        for b in (CONFIGS[n][1][:1] if args.quick else CONFIGS[n][1])
        for d in dtypes
    ]
    log(f"device {kind} ({backend}); {len(cases)} step cases")
    torch_results = _run_torch_worker(cases, args)  # first, so its process is gone before ours
    log(f"torch: {'off' if torch_results is None else torch_results['version']}")

    sizes = (256, 512) if args.quick else ((4096, 8192, 16384) if on_gpu else (1024, 2048, 4096))
    ceilings = {}
    for d in dtypes:
        log(f"matmul ceiling {d}")
        ceilings[d] = matmul_ceiling(d, sizes, 3 if args.quick else 7)
        log(f"  {ceilings[d]['tflops'] * 1e3:.1f} GFLOP/s")
        if args.quick:
            big = (cases[-1][1], cases[-1][2])
        else:
            big = (CONFIGS["large"][0], 8192) if on_gpu else (CONFIGS["medium"][0], 256)
        mm = step_matmuls(*big, d, 3 if args.quick else 9)
        mm["ceiling_fraction"] = mm["tflops"] / ceilings[d]["tflops"]
        ceilings[d]["step_matmuls_alone"] = mm
        log(f"  a {'-'.join(map(str, big[0]))} batch {big[1]} step's matmuls alone: "
            f"{mm['tflops'] * 1e3:.1f} GFLOP/s")  # fmt: skip

    result = {"matmul_ceiling": ceilings}
    result["train_step"] = train_step_section(cases, torch_results, args, ceilings)
    result["ratios"] = ratios(result["train_step"])
    for s in result["train_step"]:
        s.pop("paired_ratios", None)
    result["sweep"] = sweep_section(args)
    result["per_example"] = per_example_section(args, on_gpu)
    result["crosscheck"] = crosscheck_section(torch_results, args)
    env = environment()
    result["meta"] = {
        "device": kind,
        "backend": backend,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "optax_version": optax.__version__,
        "torch_version": None if torch_results is None else torch_results["version"],
        "python": env["python"],
        "git_commit": env["git_commit"],
        "git_dirty": _git_dirty(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": args.quick,
        "command": "scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "wall_s": time.perf_counter() - start,
        "load_average": [load_start, os.getloadavg()[0]],  # other processes share the cores
    }
    result["targets"] = targets(result, on_gpu, kind)
    if args.quick:
        for t in result["targets"]:
            t["measured"] += " (quick)"
    result["notes"] = closing_notes(result, on_gpu)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or backend
    stem += "-quick" if args.quick else ""
    save_json(out / f"{stem}.json", result)
    (out / f"{stem}.md").write_text(markdown(result))
    log(f"wrote {out / stem}.json and .md ({time.perf_counter() - start:.0f} s)")
    for t in result["targets"]:
        log(f"  {_mark(t['met']):>12}  {t['target']}: {t['measured']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
