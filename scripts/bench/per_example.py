"""Per-example gradients: the hand-written ``fnbp.per_example_grads`` program beside
``vmap(jax.grad)`` of the same loss, both jitted and bare."""

from __future__ import annotations

import statistics

import jax
import numpy as np

from bench.common import interleaved, log, mlp_case, sizes_name
from fnbp.backprop import _per_example_grads_jit
from fnbp.model import _loss


def per_example_section(args, on_gpu: bool) -> list[dict]:

    cases = [((64, 128, 128, 10), 32 if args.quick else 128)]
    if not args.quick:
        cases.append(((784, 1024, 1024, 10), 256 if on_gpu else 32))
    out = []
    for sizes, batch in cases:
        log(f"per-example grads: {sizes_name(sizes)} batch {batch}")
        model, params, x, y = mlp_case(sizes, batch)

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
        times = interleaved(runners, args.repeats, args.target_s)
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
