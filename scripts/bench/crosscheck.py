"""The cost of ``fnbp.crosscheck`` with finite differences of every parameter (float64,
batch 32), each run in a fresh process so that compilation is included: the 784-16-16-10 MLP
(beside ``torch.autograd.gradcheck``, timed by :mod:`bench.torch_peer`) and the MNIST-1D CNN
of :mod:`bench.nets`, whose goal is relative to the MLP's in the same run."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from bench.common import ROOT, log, sizes_name
from bench.nets import mnist1d_cnn

CROSSCHECK_SIZES = (784, 16, 16, 10)
QUICK_CROSSCHECK_SIZES = (64, 8, 8, 10)  # --quick: the same code, a network 20× smaller
BATCH = 32

# One fresh process: build the model (an MLP from its sizes or a Net from its JSON), draw
# float64 params and a batch, and time the first check (compilation included) and a second.
_CHILD = """
import json, sys, time
import jax, jax.numpy as jnp
import fnbp
spec = json.loads(sys.argv[1])
with jax.enable_x64(True):
    model = fnbp.MLP(tuple(spec["mlp"])) if "mlp" in spec else fnbp.Net.from_json(spec["net"])
    params = fnbp.init_params(jax.random.key(1), model, dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(2), (spec["batch"], *model.input_shape), jnp.float64)
    y = jax.random.randint(jax.random.key(3), (spec["batch"],), 0, model.output_size)
    jax.block_until_ready((params, x, y))
    t0 = time.perf_counter()
    report = fnbp.crosscheck(params, model, x, y)
    t1 = time.perf_counter()
    fnbp.crosscheck(params, model, x, y)
    t2 = time.perf_counter()
print(json.dumps({"first_s": t1 - t0, "second_s": t2 - t1, "passed": bool(report.passed),
                  "kinks": int(report.kinks), "num_params": int(model.num_params)}))
"""


def _fresh_run(spec: dict) -> dict:
    """One fresh process checking the model of ``spec``: ``first_s`` (compile included),
    ``second_s``, ``passed``, ``kinks``, ``num_params``."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(spec | {"batch": BATCH})],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict]) -> dict:
    """The median first check (compile included), each run's, the median second check."""
    return {
        "batch": BATCH,
        "num_params": runs[0]["num_params"],
        "fnbp_first_s": statistics.median(r["first_s"] for r in runs),
        "fnbp_first_s_runs": [r["first_s"] for r in runs],
        "fnbp_compiled_s": statistics.median(r["second_s"] for r in runs),
        "passed": all(r["passed"] for r in runs),
        "kinks": runs[0]["kinks"],
    }


def _failure(e: subprocess.CalledProcessError) -> str:
    return "failed: " + (e.stderr.strip().splitlines() or ["?"])[-1][:300]


def crosscheck_section(torch_results, args) -> dict:
    """The MLP's check (and torch's gradcheck of it) with the CNN's under ``"nets"``: a list of
    ``{"name", "net", …, "vs_mlp"}`` rows, or ``{"name", "net", "note"}`` where the check
    raised. The fresh processes take turns (MLP, CNN, MLP, CNN, …) so that both see the same
    load, and ``vs_mlp`` is the median over rounds of the CNN's time over the MLP's."""
    sizes = QUICK_CROSSCHECK_SIZES if args.quick else CROSSCHECK_SIZES
    nets = {"MNIST-1D CNN": mnist1d_cnn()}
    log(f"cross-check cost: {sizes_name(sizes)} and {', '.join(nets)}, batch {BATCH}, float64")
    mlp_runs, net_runs, notes = [], {name: [] for name in nets}, {}
    for _ in range(1 if args.quick else 3):  # each in a fresh process: compilation included
        mlp_runs.append(_fresh_run({"mlp": list(sizes)}))
        for name, net in nets.items():
            if name in notes:
                continue
            try:
                net_runs[name].append(_fresh_run({"net": net.to_json()}))
            except subprocess.CalledProcessError as e:  # a result to report, not a crash
                notes[name] = _failure(e)
                log(f"  {name}: {notes[name]}")
    result = {"sizes": list(sizes)} | _summary(mlp_runs)
    log(f"  {sizes_name(sizes)}: fnbp.crosscheck {result['fnbp_first_s']:.2f} s (compile included)")
    if torch_results is not None:
        gradchecks = torch_results["gradcheck_s_runs"]
        result["torch_gradcheck_s"] = statistics.median(gradchecks)
        result["torch_gradcheck_s_runs"] = gradchecks
        log(f"  torch.autograd.gradcheck {result['torch_gradcheck_s']:.2f} s")
    result["nets"] = []
    for name, net in nets.items():
        row = {"name": name, "net": net.to_json()}
        if name in notes:
            row["note"] = notes[name]
        else:
            row |= _summary(net_runs[name])
            per_round = [n["first_s"] / m["first_s"] for n, m in zip(net_runs[name], mlp_runs, strict=True)]  # fmt: skip
            row["vs_mlp"] = statistics.median(per_round)
            log(f"  {name}: fnbp.crosscheck {row['fnbp_first_s']:.2f} s ({row['vs_mlp']:.2f}× the MLP's)")  # fmt: skip
        result["nets"].append(row)
    return result
