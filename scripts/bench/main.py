"""The command line: parse the options, run every section in order, write the JSON and the
markdown table, and print each target's verdict."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import flax
import jax
import optax

import bench
from bench.ceiling import matmul_ceiling, step_matmuls
from bench.common import CONFIGS, GPU_ONLY, ROOT, log, sizes_name
from bench.crosscheck import CROSSCHECK_SIZES, QUICK_CROSSCHECK_SIZES, crosscheck_section
from bench.instruments import instruments_section
from bench.instruments_training import instruments_training_section
from bench.nets import net_step_section
from bench.per_example import per_example_section
from bench.privacy import privacy_section
from bench.report import markdown
from bench.sweep import sweep_section
from bench.targets import closing_notes, mark, targets
from bench.torch_peer import run_torch_worker, torch_worker
from bench.train_steps import train_step_section
from fnbp.report import environment, save_json


def _git_dirty() -> bool | None:
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":!benchmarks"],
            cwd=ROOT, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=bench.__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every section at toy sizes (seconds)")
    p.add_argument("--out", default=str(ROOT / "benchmarks"), help="folder for the JSON and table")
    p.add_argument("--configs", default=None, help="comma list of small, medium, large")
    p.add_argument("--dtypes", default=None, help="comma list of float32, bfloat16")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out even if installed")
    p.add_argument("--no-torch-compile", action="store_true", help="eager PyTorch only")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per implementation")
    p.add_argument("--target-s", type=float, default=None, help="seconds per timed repeat")
    p.add_argument("--torch-worker", metavar="SPEC", help=argparse.SUPPRESS)  # internal
    return p


def _cases(p, args, on_gpu: bool) -> tuple[list, list]:
    """``(cases, dtypes)``: the MLP train-step cases ``(config, sizes, batch, dtype)``."""
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
    return cases, dtypes


def _ceilings(cases, dtypes, args, on_gpu: bool) -> dict:
    """Per dtype, the matmul ceiling and the matmuls of one large step alone."""
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
        log(f"  a {sizes_name(big[0])} batch {big[1]} step's matmuls alone: "
            f"{mm['tflops'] * 1e3:.1f} GFLOP/s")  # fmt: skip
    return ceilings


def _meta(args, argv, kind, backend, torch_results, start, load_start) -> dict:
    env = environment()
    return {
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


def main(argv=None) -> int:
    p = _parser()
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
    cases, dtypes = _cases(p, args, on_gpu)
    log(f"device {kind} ({backend}); {len(cases)} step cases; load average {load_start:.1f}")
    gradcheck_sizes = QUICK_CROSSCHECK_SIZES if args.quick else CROSSCHECK_SIZES
    # first, so that its process is gone before ours times anything
    torch_results = run_torch_worker(cases, args, gradcheck_sizes)
    log(f"torch: {'off' if torch_results is None else torch_results['version']}")

    ceilings = _ceilings(cases, dtypes, args, on_gpu)
    result = {"matmul_ceiling": ceilings}
    result["train_step"], result["ratios"] = train_step_section(
        cases, torch_results, args, ceilings
    )
    result["net_steps"], result["net_ratios"] = net_step_section(args)
    result["sweep"] = sweep_section(args)
    result["per_example"] = per_example_section(args, on_gpu)
    result["instruments"] = instruments_section(args)
    result["instruments_training"] = instruments_training_section(args)
    result["privacy"] = privacy_section(args)
    result["crosscheck"] = crosscheck_section(torch_results, args)
    result["meta"] = _meta(args, argv, kind, backend, torch_results, start, load_start)
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
        log(f"  {mark(t['met']):>12}  {t['target']}: {t['measured']}")
    return 0
