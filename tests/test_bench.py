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

import chex
import jax

ROOT = Path(__file__).resolve().parents[1]
HAS_TORCH = importlib.util.find_spec("torch") is not None
sys.path.insert(0, str(ROOT / "scripts"))  # the bench package

from bench.common import paired  # noqa: E402

NETS = ("digits CNN", "MNIST-1D CNN", "residual MLP, BatchNorm")
# The MNIST-1D CNN's parameter count by hand: Conv 5·1·25 + 25, two Conv 3·25·25 + 25, then a
# 40 → 19 → 10 → 5 positions (stride 2, padding 1) × 25 channels = 125 → Dense 10.
MNIST1D_CNN_PARAMS = (5 * 1 * 25 + 25) + 2 * (3 * 25 * 25 + 25) + (125 * 10 + 10)


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _assert_control_and_ops(r):
    """The A/A control (the hand-written step over itself built twice) and the op counts of
    the manual and Flax programs, in every ratio row that has a Flax peer."""
    a = r["same_step"]
    assert _positive(a["ratio"]) and a["paired_iqr"][0] <= a["ratio"] <= a["paired_iqr"][1], r
    assert a["cpu_paired_iqr"][0] <= a["cpu_ratio"] <= a["cpu_paired_iqr"][1], r
    for hlo in (r["manual_hlo"], r["flax_hlo"]):  # every step has fusions and matmuls
        assert hlo["fusion"] > 0 and hlo["dot"] + hlo["convolution"] > 0, r


def test_bench_quick_writes_every_section_with_positive_numbers(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    stem = jax.devices()[0].device_kind.lower().replace(" ", "-") + "-quick"
    result = json.loads((tmp_path / f"{stem}.json").read_text())
    table = (tmp_path / f"{stem}.md").read_text()

    sections = ("meta", "matmul_ceiling", "train_step", "ratios", "net_steps", "net_ratios")
    for section in (*sections, "sweep", "per_example"):
        assert section in result, section
    assert {"crosscheck", "targets", "notes"} <= set(result)
    assert "fnbp manual (again)" not in {
        s["impl"] for s in result["train_step"] + result["net_steps"]
    }
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
        assert _positive(r["ratio"]) and _positive(r["cpu_ratio"])
        f = r["vs_flax"]  # the hand-written step against Flax's, paired per round
        assert f["paired_iqr"][0] <= f["ratio"] <= f["paired_iqr"][1] and _positive(f["cpu_ratio"])
        assert _positive(r["manual_peak_bytes"]) and _positive(r["autodiff_peak_bytes"])
        _assert_control_and_ops(r)

    net_rows = [s for s in result["net_steps"] if s.get("median_ms") is not None]
    for name in NETS:
        impls = {s["impl"] for s in net_rows if s["net"].startswith(name)}
        assert impls == {"fnbp manual", "fnbp autodiff", "flax + optax"}, (name, impls)
    for s in net_rows:
        assert _positive(s["median_ms"]) and _positive(s["compile_s"]), s
        assert _positive(s["peak_bytes"]) and _positive(s["num_params"]), s
    assert len(result["net_ratios"]) == len(NETS)
    assert all(r["net"].startswith(n) for r, n in zip(result["net_ratios"], NETS, strict=True))
    for r in result["net_ratios"]:
        assert _positive(r["ratio"]) and r["paired_iqr"][0] <= r["ratio"] <= r["paired_iqr"][1]
        assert r["cpu_paired_iqr"][0] <= r["cpu_ratio"] <= r["cpu_paired_iqr"][1]
        cnn = "CNN" in r["net"]  # convolutions in both programs, none in the residual MLP's
        for hlo in (r["manual_hlo"], r["autodiff_hlo"]):
            assert (hlo["convolution"] > 0) == cnn and hlo["fusion"] > 0, r
        assert (
            r["vs_flax"]["paired_iqr"][0] <= r["vs_flax"]["ratio"] <= r["vs_flax"]["paired_iqr"][1]
        )
        _assert_control_and_ops(r)
        assert (r["flax_hlo"]["convolution"] > 0) == cnn, r

    sweep = result["sweep"]
    for method in (
        "python_loop",
        "scan_epoch",
        "vmap_population_scan",
        "vmap_population_plain_sgd",
    ):
        assert _positive(sweep[method]["model_steps_per_s"]), method
    assert _positive(sweep["speedup_population_over_loop"])
    assert _positive(sweep["max_speedup_over_loop"])
    lo, hi = sweep["floor_fraction_iqr"]  # paired per round: the median inside its IQR
    assert _positive(lo) and lo <= sweep["floor_fraction"] <= hi
    chex.assert_trees_all_close(  # of the medians: the ratio of the two speedups
        sweep["floor_fraction_of_medians"],
        sweep["speedup_population_over_loop"] / sweep["max_speedup_over_loop"],
        rtol=1e-12,
    )
    assert list(sweep["us_per_model_step"]) == [
        "matmuls alone",
        "population, plain SGD",
        "population",
    ]

    for r in result["per_example"]:
        assert _positive(r["manual"]["samples_per_s"]) and _positive(r["speedup_manual"])
        assert _positive(r["vmap(jax.grad)"]["samples_per_s"])

    o = result["instruments"]["overhead"]
    assert _positive(o["plain_ms"]) and _positive(o["with_norms_ratio"]["ratio"])
    for r in result["instruments"]["memory"]:  # the materialised grads need batch × params floats
        assert 0 < r["with_norms"] < r["vmap(jax.grad)"], r
    assert "Per-example gradient norms from one backward pass" in table

    pv = result["privacy"]
    for r in pv["time"]:
        assert _positive(r["one_backward_ms"]) and _positive(r["vmap_ms"]), r
        assert _positive(r["vmap_vs_one_backward"]["ratio"]), r
    for r in pv["memory"]:  # vmap-and-clip forms batch × params floats; one backward does not
        assert 0 < r["one backward"] < r["vmap-and-clip"], r
    assert pv["opacus"] is None  # --quick leaves the optional peer out
    assert "Private SGD's gradient from one backward pass" in table

    cc = result["crosscheck"]
    assert cc["passed"] is True and _positive(cc["fnbp_first_s"]) and _positive(cc["num_params"])
    assert ("torch_gradcheck_s" in cc) == HAS_TORCH
    (cnn,) = cc["nets"]
    assert cnn["name"] == "MNIST-1D CNN" and "note" not in cnn, cnn
    assert cnn["passed"] is True and cnn["num_params"] == MNIST1D_CNN_PARAMS
    assert _positive(cnn["fnbp_first_s"]) and _positive(cnn["vs_mlp"])
    fast = cc["fast"]  # fnbp.gradcheck beside each exhaustive check
    assert [r["name"] for r in fast["rows"]] == ["64-8-8-10", "MNIST-1D CNN"]
    for r in fast["rows"]:
        assert r["passed"] is True and _positive(r["fnbp_first_s"]) and _positive(r["speedup"]), r
    assert ("torch_gradcheck_fast_s" in fast) == HAS_TORCH
    assert "large" not in fast  # --quick leaves the 1.9 M-parameter MLP out
    assert "The fast check, `fnbp.gradcheck`" in table

    assert all(t["met"] in (True, False, None) and t["target"] for t in result["targets"])
    headings = ("## Targets", "## Train step (", "## Train step of nets", "## Sweep")
    for heading in (*headings, "## Per-example", "## Cross-check"):
        assert heading in table, heading
    assert meta["device"] in table


def test_paired_ratio_is_the_median_of_per_round_ratios_not_the_ratio_of_medians():
    # Round 2 is slowed for both (another process on the cores): per-round ratios 0.5, 0.5,
    # 2.0 have median 0.5, while the medians 4 / 4 would say 1.0.
    got = paired([1.0, 4.0, 8.0], [2.0, 8.0, 4.0])
    assert got["ratio"] == 0.5 and got["ratio_of_medians"] == 1.0
    assert got["paired_iqr"] == [0.5, 1.25]  # numpy's linear interpolation between 0.5 and 2.0
