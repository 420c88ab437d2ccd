"""Smoke test of scripts/bench.py: ``--quick`` runs every section and writes a sane JSON and table.

It asserts structure and positive, finite numbers, never timings (a shared machine is noisy).
PyTorch is optional: without it the torch rows and gradcheck are left out, and so are their
assertions.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_bench_quick_writes_every_section_with_positive_numbers(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    stem = jax.devices()[0].device_kind.lower().replace(" ", "-") + "-quick"
    result = json.loads((tmp_path / f"{stem}.json").read_text())
    table = (tmp_path / f"{stem}.md").read_text()

    for section in ("meta", "matmul_ceiling", "train_step", "ratios", "sweep", "per_example"):
        assert section in result, section
    assert {"crosscheck", "targets", "notes"} <= set(result)
    meta = result["meta"]
    assert meta["quick"] is True and meta["device"] and meta["jax_version"] == jax.__version__
    assert meta["date"] and "git_commit" in meta

    assert {"float32", "bfloat16"} <= set(result["matmul_ceiling"])  # bf16 runs in --quick
    assert all(_positive(c["tflops"]) for c in result["matmul_ceiling"].values())

    timed = [s for s in result["train_step"] if s.get("median_ms") is not None]
    impls = {s["impl"] for s in timed}
    assert {"fnbp manual", "fnbp autodiff", "flax + optax"} <= impls
    assert ("torch eager" in impls) == HAS_TORCH
    assert {s["dtype"] for s in timed} == {"float32", "bfloat16"}
    for s in timed:
        assert _positive(s["median_ms"]) and _positive(s["tflops"]), s
        assert _positive(s["ceiling_fraction"]) and _positive(s["compile_s"]), s
    for r in result["ratios"]:
        assert _positive(r["ratio"])
        assert _positive(r["manual_peak_bytes"]) and _positive(r["autodiff_peak_bytes"])

    sweep = result["sweep"]
    for method in ("python_loop", "scan_epoch", "vmap_population_scan"):
        assert _positive(sweep[method]["model_steps_per_s"]), method
    assert _positive(sweep["speedup_population_over_loop"])
    assert _positive(sweep["max_speedup_over_loop"])

    for r in result["per_example"]:
        assert _positive(r["manual"]["samples_per_s"]) and _positive(r["speedup_manual"])
        assert _positive(r["vmap(jax.grad)"]["samples_per_s"])

    cc = result["crosscheck"]
    assert cc["passed"] is True and _positive(cc["fnbp_first_s"]) and _positive(cc["num_params"])
    assert ("torch_gradcheck_s" in cc) == HAS_TORCH

    assert all(t["met"] in (True, False, None) and t["target"] for t in result["targets"])
    for heading in ("## Targets", "## Train step", "## Sweep", "## Per-example", "## Cross-check"):
        assert heading in table, heading
    assert meta["device"] in table
