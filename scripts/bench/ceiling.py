"""The matmul ceiling: the best square XLA matmul of a dtype, and the matmuls of one MLP step
alone (what the step's matmuls can reach, and the population's floor in the sweep)."""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp

from bench.common import time_calls, weights


def matmul_ceiling(dtype: str, sizes, repeats: int) -> dict:
    """The best TFLOP/s of a square ``a @ b`` over ``sizes``, each the median of ``repeats``."""
    dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    f = jax.jit(jnp.matmul)
    out = {}
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), dt)
        b = jax.random.normal(jax.random.key(1), (n, n), dt)
        f(a, b).block_until_ready()
        call = lambda a=a, b=b: f(a, b).block_until_ready()  # noqa: E731
        reps = max(1, int(0.05 / max(time_calls(call), 1e-6)))
        ts = [time_calls(call, reps) for _ in range(repeats)]
        out[str(n)] = 2 * n**3 / statistics.median(ts) / 1e12
    return {"tflops_by_size": out, "tflops": max(out.values())}


def step_matmuls_program(sizes, batch: int, dtype: str, population: int = 0):
    """The matmuls of one train step alone (forward z = aWᵀ, Σδaᵀ for every layer, Wᵀδ for
    every layer but the first), as one jitted program: what the step's matmuls can reach.
    With ``population`` > 0, the same for that many models at once (``vmap``, as in
    :func:`fnbp.make_population_epoch`).

    Returns ``(call, flops)``: ``call()`` runs the compiled program once and waits for it;
    ``flops`` is what one call computes."""
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
    call = lambda: jax.block_until_ready(matmuls(acts, Ws))  # noqa: E731
    call()  # compile
    return call, 2 * batch * (3 * weights(sizes) - sizes[0] * sizes[1]) * max(population, 1)


def step_matmuls(sizes, batch: int, dtype: str, repeats: int) -> dict:
    """:func:`step_matmuls_program` of one model timed: the median of ``repeats`` rounds."""
    call, flops = step_matmuls_program(sizes, batch, dtype)
    t = statistics.median(time_calls(call, 3) for _ in range(repeats))
    return {
        "sizes": list(sizes),
        "batch": batch,
        "dtype": dtype,
        "ms": 1e3 * t,
        "tflops": flops / t / 1e12,
    }
