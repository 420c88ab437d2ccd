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


def _fresh_runs(spec: dict, runs: int) -> dict:
    """``runs`` fresh processes checking the model of ``spec``: the median first check
    (compile included), each run's, the median second check, passed and kinks."""
    out = []
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(spec | {"batch": BATCH})],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {
        "batch": BATCH,
        "num_params": out[0]["num_params"],
        "fnbp_first_s": statistics.median(r["first_s"] for r in out),
        "fnbp_first_s_runs": [r["first_s"] for r in out],
        "fnbp_compiled_s": statistics.median(r["second_s"] for r in out),
        "passed": all(r["passed"] for r in out),
        "kinks": out[0]["kinks"],
    }


def crosscheck_section(torch_results, args) -> dict:
    """The MLP's check (and torch's gradcheck of it) with the CNN's under ``"nets"``: a list of
    ``{"name", "net", …}`` rows, or ``{"name", "note"}`` where the check raised."""
    sizes = QUICK_CROSSCHECK_SIZES if args.quick else CROSSCHECK_SIZES
    runs = 1 if args.quick else 3
    log(f"cross-check cost: {sizes_name(sizes)}, batch {BATCH}, float64")
    result = {"sizes": list(sizes)} | _fresh_runs({"mlp": list(sizes)}, runs)
    log(f"  fnbp.crosscheck {result['fnbp_first_s']:.2f} s (compile included)")
    if torch_results is not None:
        gradchecks = torch_results["gradcheck_s_runs"]
        result["torch_gradcheck_s"] = statistics.median(gradchecks)
        result["torch_gradcheck_s_runs"] = gradchecks
        log(f"  torch.autograd.gradcheck {result['torch_gradcheck_s']:.2f} s")
    result["nets"] = []
    for name, net in (("MNIST-1D CNN", mnist1d_cnn()),):
        log(f"cross-check cost: {name}, batch {BATCH}, float64")
        row = {"name": name, "net": net.to_json()}
        try:
            row |= _fresh_runs({"net": net.to_json()}, runs)
        except subprocess.CalledProcessError as e:  # a result to report, not a crash
            row["note"] = "failed: " + (e.stderr.strip().splitlines() or ["?"])[-1][:300]
            log(f"  {row['note']}")
        else:
            row["vs_mlp"] = row["fnbp_first_s"] / result["fnbp_first_s"]
            log(f"  fnbp.crosscheck {row['fnbp_first_s']:.2f} s ({row['vs_mlp']:.2f}× the MLP's)")
        result["nets"].append(row)
    return result
