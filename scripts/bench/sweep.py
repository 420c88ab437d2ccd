"""Sweep throughput: 64 small models (64-128-128-10, batch 32) on digits by a Python loop of
jitted steps, a scan-fused epoch per model, and the vmapped population + scan; and the
population's matmul floor, the real upper bound of any fused form."""

from __future__ import annotations

import random
import statistics

import jax
import jax.numpy as jnp
import optax

import fnbp
from bench.ceiling import step_matmuls_program
from bench.common import LR, MOMENTUM, log, paired, time_calls
from fnbp import data


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
    # every form reports the loss alone (the loop's step by default): the same work
    step = fnbp.make_train_step(model, optimizer)
    epoch = fnbp.make_train_epoch(model, optimizer, batch_size=batch, metrics="loss")
    pop_epoch = fnbp.make_population_epoch(model, optimizer, batch_size=batch, metrics="loss")
    # the same population under plain SGD (no momentum buffer): what the momentum costs
    plain = optax.sgd(LR)
    pop_plain = fnbp.make_population_epoch(model, plain, batch_size=batch, metrics="loss")
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

    def population_scan(fn=pop_epoch, opt=optimizer):
        p, s = population, jax.vmap(opt.init)(population)
        for e in range(epochs):
            p, s, m = fn(p, s, jax.vmap(lambda k, e=e: jax.random.fold_in(k, e))(keys), x, y)
        jax.block_until_ready(p)

    # The floor: the population's matmuls alone, vmapped like its step, as many model-steps
    # per call of the round as the population's epochs take (steps × epochs calls).
    floor_call, floor_flops = step_matmuls_program((64, 128, 128, 10), batch, "float32", P)

    def floor():
        for _ in range(steps * epochs):
            floor_call()

    result = {"models": P, "batch": batch, "steps_per_epoch": steps, "epochs": epochs}
    fns = {"python_loop": loop, "scan_epoch": scan, "vmap_population_scan": population_scan,
           "vmap_population_plain_sgd": lambda: population_scan(pop_plain, plain),
           "matmul_floor": floor}  # fmt: skip
    for fn in fns.values():  # warm-up: compile each program once
        fn()
    # Every form and the floor in the same rounds, each round in a new order: the floor
    # fraction is then paired per round, as the step ratios are (robust to the machine's
    # load drifting between rounds).
    times = {name: [] for name in fns}
    order = random.Random(0)
    for _ in range(max(2, 2 * args.repeats // 3)):
        for name in order.sample(list(fns), len(fns)):
            times[name].append(time_calls(fns[name]))
    model_steps = P * steps * epochs
    for name, ts in times.items():
        t = statistics.median(ts)
        if name != "matmul_floor":
            result[name] = {"seconds": t, "model_steps_per_s": model_steps / t}
            log(f"  {name:22s} {model_steps / t:12.0f} model-steps/s")
    result["speedup_population_over_loop"] = (
        result["vmap_population_scan"]["model_steps_per_s"]
        / result["python_loop"]["model_steps_per_s"]
    )
    t_floor = statistics.median(times["matmul_floor"])
    result["matmul_floor_us_per_model_step"] = 1e6 * t_floor / model_steps
    result["matmul_floor_tflops"] = floor_flops * steps * epochs / t_floor / 1e12
    result["max_speedup_over_loop"] = (1e6 / result["python_loop"]["model_steps_per_s"]) / result[
        "matmul_floor_us_per_model_step"
    ]
    # the floor's time over the population's, per round: the fraction of the floor reached
    f = paired(times["matmul_floor"], times["vmap_population_scan"])
    result["floor_fraction"] = f["ratio"]
    result["floor_fraction_iqr"] = f["paired_iqr"]
    result["floor_fraction_of_medians"] = f["ratio_of_medians"]
    us = lambda name: 1e6 / result[name]["model_steps_per_s"]  # noqa: E731
    result["us_per_model_step"] = {
        "matmuls alone": result["matmul_floor_us_per_model_step"],
        "population, plain SGD": us("vmap_population_plain_sgd"),
        "population": us("vmap_population_scan"),
    }
    log(
        f"  matmuls alone: {result['matmul_floor_us_per_model_step']:.1f} µs per model-step, "
        f"at most {result['max_speedup_over_loop']:.1f}× the loop; the population reaches "
        f"{100 * result['floor_fraction']:.0f}% of that (per-round IQR "
        f"{100 * f['paired_iqr'][0]:.0f}–{100 * f['paired_iqr'][1]:.0f}%)"
    )
    return result
