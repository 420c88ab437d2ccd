"""The cost of ``fnbp.crosscheck`` with finite differences of every parameter (float64,
batch 32), each run in a fresh process so that compilation is included: the 784-16-16-10 MLP
(beside ``torch.autograd.gradcheck``, timed by :mod:`bench.torch_peer`) and the MNIST-1D CNN
of :mod:`bench.nets`, whose goal is relative to the MLP's in the same run. Beside each, the
fast check ``fnbp.gradcheck`` (4 random directions per parameter block and per layer's z) in
its own fresh processes, taking turns with the exhaustive ones (beside
``torch.autograd.gradcheck(fast_mode=True)`` of the same MLP), and, outside ``--quick``, the
fast check alone on the 784-1024-1024-10 MLP (1.9 M parameters), where the exhaustive one would
need 3.7 M reruns.

Run alone: ``cd scripts && ../.venv/bin/python -m bench.crosscheck [--quick] [--no-torch]
[--json FILE]`` (prints the section's tables)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from bench.common import ROOT, log, sizes_name
from bench.nets import mnist1d_cnn
from fnbp.report import markdown_table

CROSSCHECK_SIZES = (784, 16, 16, 10)
QUICK_CROSSCHECK_SIZES = (64, 8, 8, 10)  # --quick: the same code, a network 20× smaller
LARGE_SIZES = (784, 1024, 1024, 10)  # the fast check alone (not in --quick)
BATCH = 32

# One fresh process: build the model (an MLP from its sizes or a Net from its JSON), draw
# float64 params and a batch, and time the first check (compilation included) and a second:
# fnbp.crosscheck, or fnbp.gradcheck when spec["check"] says so.
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
    check = fnbp.gradcheck if spec.get("check") == "gradcheck" else fnbp.crosscheck
    t0 = time.perf_counter()
    report = check(params, model, x, y)
    t1 = time.perf_counter()
    check(params, model, x, y)
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


def _fast_run(spec: dict) -> dict:
    """:func:`_fresh_run` of ``fnbp.gradcheck``."""
    return _fresh_run(spec | {"check": "gradcheck"})


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
    fast_mlp, fast_nets = [], {name: [] for name in nets}
    for _ in range(1 if args.quick else 3):  # each in a fresh process: compilation included
        mlp_runs.append(_fresh_run({"mlp": list(sizes)}))
        fast_mlp.append(_fast_run({"mlp": list(sizes)}))
        for name, net in nets.items():
            if name in notes:
                continue
            try:
                net_runs[name].append(_fresh_run({"net": net.to_json()}))
                fast_nets[name].append(_fast_run({"net": net.to_json()}))
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
    result["fast"] = _fast_section(sizes, mlp_runs, fast_mlp, net_runs, fast_nets, notes,
                                   torch_results, args)  # fmt: skip
    return result


def _fast_row(name: str, exhaustive: list[dict], fast: list[dict]) -> dict:
    """The fast check's summary, and ``speedup``: the median over rounds of the exhaustive
    check's time over the fast one's (fresh processes, compile included)."""
    per_round = [e["first_s"] / f["first_s"] for e, f in zip(exhaustive, fast, strict=True)]
    row = {"name": name} | _summary(fast) | {"speedup": statistics.median(per_round)}
    log(f"  {name}: fnbp.gradcheck {row['fnbp_first_s']:.2f} s, the exhaustive check "
        f"{row['speedup']:.1f}× that")  # fmt: skip
    return row


def _fast_section(sizes, mlp_runs, fast_mlp, net_runs, fast_nets, notes, torch_results,
                  args) -> dict:  # fmt: skip
    """``fnbp.gradcheck`` beside the exhaustive check of each model (``rows``), beside torch's
    fast gradcheck of the MLP, and alone on :data:`LARGE_SIZES` (``large``, not in --quick)."""
    rows = [_fast_row(sizes_name(sizes), mlp_runs, fast_mlp)]
    rows += [_fast_row(name, net_runs[name], fast_nets[name]) for name in fast_nets
             if name not in notes]  # fmt: skip
    fast = {"directions": 4, "rows": rows}
    if torch_results is not None and "gradcheck_fast_s_runs" in torch_results:
        runs = torch_results["gradcheck_fast_s_runs"]
        fast["torch_gradcheck_fast_s"] = statistics.median(runs)
        fast["torch_gradcheck_fast_s_runs"] = runs
        log(f"  torch.autograd.gradcheck(fast_mode=True) {fast['torch_gradcheck_fast_s']:.2f} s")
    if not args.quick:
        large = [_fast_run({"mlp": list(LARGE_SIZES)}) for _ in range(3)]
        fast["large"] = {"sizes": list(LARGE_SIZES)} | _summary(large)
        log(f"  {sizes_name(LARGE_SIZES)}: fnbp.gradcheck {fast['large']['fnbp_first_s']:.2f} s")
    return fast


def fast_markdown(cc: dict) -> list[str]:
    """The fast check's table, for the cross-check section of the report."""
    fast = cc.get("fast")
    if not fast:
        return []
    head = ["model", "parameters", "fnbp.gradcheck, fresh process s (compile included)",
            "again, compiled s", "exhaustive / fast", "check"]  # fmt: skip

    def cells(r, speedup):
        runs = ", ".join(f"{v:.2f}" for v in r["fnbp_first_s_runs"])
        verdict = f"{'passed' if r['passed'] else 'FAILED'}, {r['kinks']} kinked directions"
        return [r["num_params"], f"{r['fnbp_first_s']:.2f} (runs: {runs})",
                f"{r['fnbp_compiled_s']:.2f}", speedup, verdict]  # fmt: skip

    rows = [[r["name"], *cells(r, f"{r['speedup']:.1f}×")] for r in fast["rows"]]
    if "large" in fast:
        rows.append([sizes_name(fast["large"]["sizes"]), *cells(fast["large"], "not run")])
    lines = [
        f"The fast check, `fnbp.gradcheck` ({fast['directions']} random directions per "
        "parameter block and per layer's z, against `jax.grad` and central differences, "
        f"batch {cc['batch']}, float64), in fresh processes taking turns with the exhaustive "
        "ones; exhaustive / fast: the median over rounds of the two times in the same round:",
        "",
        markdown_table(head, rows),
        "",
    ]
    if "torch_gradcheck_fast_s" in fast:
        lines += [
            f"`torch.autograd.gradcheck(fast_mode=True)` of the {sizes_name(cc['sizes'])} MLP "
            f"(float64, one random direction per parameter tensor; eager, in the worker process "
            f"after its full gradcheck): {fast['torch_gradcheck_fast_s']:.3f} s.",
            "",
        ]  # fmt: skip
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="the cross-check cost bench section alone")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-torch", action="store_true", help="leave torch.autograd.gradcheck out")
    p.add_argument("--json", default=None, help="also write the section's numbers here")
    args = p.parse_args(argv)
    from bench.report import _crosscheck
    from bench.torch_peer import run_torch_worker
    from fnbp.report import save_json

    args.torch_compile, args.repeats, args.target_s = False, 1, 0.0  # no train steps: []
    t0 = time.perf_counter()
    sizes = QUICK_CROSSCHECK_SIZES if args.quick else CROSSCHECK_SIZES
    section = crosscheck_section(run_torch_worker([], args, sizes), args)
    section["wall_s"] = time.perf_counter() - t0
    if args.json:
        save_json(args.json, section)
    print("\n".join(_crosscheck({"crosscheck": section})))
    log(f"done in {section['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
