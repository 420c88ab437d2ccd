"""What every section shares: the configs, the timer, interleaved rounds, paired ratios, the
MLP cases and a runner for a jitted JAX step."""

from __future__ import annotations

import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fnbp

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "scripts" / "bench.py"  # the command line: the PyTorch worker runs it again
LR, MOMENTUM = 0.01, 0.9
CONFIGS = {  # name: (sizes, batches)
    "small": ((64, 128, 128, 10), (32, 128)),
    "medium": ((784, 1024, 1024, 10), (256, 4096)),
    "large": ((4096, 4096, 4096, 4096, 4096, 10), (8192,)),
}
GPU_ONLY = {"large"}


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the torch worker's JSON)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def weights(sizes) -> int:
    """The weight count of an MLP with layer widths ``sizes`` (biases left out)."""
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def sizes_name(sizes) -> str:
    return "-".join(map(str, sizes))


def case_label(config, sizes, batch, dtype) -> str:
    """One MLP train-step case, named the same in this process and in the torch worker."""
    return f"{config} {sizes_name(sizes)} batch {batch} {dtype}"


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


def time_calls(fn, n: int = 1) -> float:
    """Seconds per call of ``fn`` over ``n`` calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def interleaved(
    runners: dict, repeats: int, target_s: float, cpu: dict | None = None
) -> dict[str, list[float]]:
    """Seconds per step of each runner, over ``repeats`` rounds, each in a random order.

    A runner is a dict with ``run(n)`` (n steps, waited for) and optionally ``settle_s`` (a
    pause after each of its rounds). Each round times about ``target_s`` seconds of steps.
    With ``cpu`` (a dict), the same rounds' CPU seconds per step of this process (every thread,
    XLA's workers included) go into it, by runner: on a machine shared with other processes
    they do not count the time spent waiting for a core, which wall time does.
    """
    inner = {}
    for name, r in runners.items():
        t0 = time.perf_counter()
        r["run"](1)
        one = time.perf_counter() - t0
        time.sleep(r.get("settle_s", 0.0))
        inner[name] = int(min(1000, max(1, round(target_s / max(one, 1e-6)))))
    names, times = list(runners), {name: [] for name in runners}
    cpu = {} if cpu is None else cpu
    cpu.update({name: [] for name in runners})
    order = np.random.default_rng(0)  # a fresh order every round: no runner always follows another
    for _ in range(repeats):
        for name in order.permutation(names):
            t0, c0 = time.perf_counter(), time.process_time()
            runners[name]["run"](inner[name])
            times[name].append((time.perf_counter() - t0) / inner[name])
            cpu[name].append((time.process_time() - c0) / inner[name])
            time.sleep(runners[name].get("settle_s", 0.0))
    return times


def paired_cpu(cpu: dict, numerator: str, denominator: str) -> dict:
    """:func:`paired` of the CPU times of two runners, as ``cpu_ratio`` and ``cpu_paired_iqr``."""
    got = paired(cpu[numerator], cpu[denominator])
    return {"cpu_ratio": got["ratio"], "cpu_paired_iqr": got["paired_iqr"]}


def vs_flax(times: dict, cpu: dict) -> dict:
    """:func:`paired` and :func:`paired_cpu` of the hand-written step over the Flax + Optax
    peer's, timed in the same rounds."""
    return paired(times["fnbp manual"], times["flax + optax"]) | paired_cpu(
        cpu, "fnbp manual", "flax + optax"
    )


AGAIN = "fnbp manual (again)"  # the hand-written step built a second time: the A/A control


def same_step(times: dict, cpu: dict) -> dict:
    """:func:`paired` and :func:`paired_cpu` of the hand-written step over itself built and
    compiled a second time (:data:`AGAIN`), timed in the same rounds: an A/A control, whose
    distance from 1 is what this machine's noise alone does to a ratio of two equal steps."""
    return paired(times["fnbp manual"], times[AGAIN]) | paired_cpu(cpu, "fnbp manual", AGAIN)


def paired(numerator: list[float], denominator: list[float]) -> dict:
    """The ratio of two runners timed in the same rounds: the median of the per-round ratios
    (robust to other processes slowing the machine between rounds), the ratio of the two
    medians, and the interquartile range of the per-round ratios."""
    per_round = [u / v for u, v in zip(numerator, denominator, strict=True)]
    q = np.percentile(per_round, [25, 75])
    return {
        "ratio": float(np.median(per_round)),
        "ratio_of_medians": statistics.median(numerator) / statistics.median(denominator),
        "paired_iqr": [float(q[0]), float(q[1])],
    }


def mlp_case(sizes, batch):
    """The MLP ``sizes`` with He-normal params (key 0), a float32 batch and labels."""
    model = fnbp.MLP(sizes)
    params = fnbp.init_params(jax.random.key(0), model, "he_normal")
    x = jax.random.normal(jax.random.key(1), (batch, sizes[0]), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (batch,), 0, sizes[-1])
    return model, params, x, y


def hlo_counts(compiled) -> dict:
    """Ops of a compiled program by opcode (fusions, copies, transposes, convolutions, dots,
    top level and inside fusions alike): where two steps differ, this says how."""
    text = compiled.as_text()
    ops = re.findall(r"= \S+ (fusion|copy|transpose|convolution|dot)\(", text)
    return {op: ops.count(op) for op in ("fusion", "copy", "transpose", "convolution", "dot")}


def jax_runner(step, *carry_and_inputs, n_carry: int) -> dict:
    """A runner of the jitted ``step``: its first ``n_carry`` arguments are carried from one
    step's outputs to the next (params, optimizer state, …), the others passed unchanged.

    Returns ``{"run", "compile_s", "peak_bytes", "compiled"}``: ``compile_s`` is the first
    call's time after lowering and compiling once for the memory analysis and ``compiled``
    (``jax.stages.Compiled``, whose ``as_text()`` is the optimized program).
    """
    compiled = step.lower(*carry_and_inputs).compile()
    carry, inputs = list(carry_and_inputs[:n_carry]), carry_and_inputs[n_carry:]

    def run(n):
        c = carry
        for _ in range(n):
            *c, metrics = step(*c, *inputs)
        jax.block_until_ready((c, metrics))
        carry[:] = c

    t0 = time.perf_counter()
    run(1)
    return {
        "run": run,
        "compile_s": time.perf_counter() - t0,
        "peak_bytes": peak_bytes(compiled),
        "compiled": compiled,
    }
