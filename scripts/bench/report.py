"""The markdown table of one run (``benchmarks/<device-kind>.md``), a section per part of the
result; the JSON beside it holds every number."""

from __future__ import annotations

from bench.common import sizes_name
from bench.crosscheck import fast_markdown
from bench.instruments import markdown as instruments_markdown
from bench.instruments_training import markdown as instruments_training_markdown
from bench.privacy import markdown as privacy_markdown
from bench.targets import mark
from fnbp.report import markdown_table


def _mib(v) -> str:
    return "" if v is None else f"{v / 2**20:.2f} MiB"


def _iqr(r) -> str:
    return f"{r['paired_iqr'][0]:.3f}–{r['paired_iqr'][1]:.3f}"


def _cpu(r) -> str:
    lo, hi = r["cpu_paired_iqr"]
    return f"{r['cpu_ratio']:.3f} ({lo:.3f}–{hi:.3f})"


def _header(result) -> list[str]:
    meta = result["meta"]
    return [
        f"# fnbp benchmark: {meta['device']} ({meta['backend']})",
        "",
        f"{meta['date']}, git {str(meta['git_commit'])[:12]}{' (dirty)' if meta['git_dirty'] else ''}, "
        f"jax {meta['jax_version']}, flax {meta['flax_version']}, optax {meta['optax_version']}, "
        f"torch {meta['torch_version'] or 'not installed'}, Python {meta['python']}, "
        f"{meta['cpu_count']} CPU cores{', quick mode' if meta['quick'] else ''}. "
        f"`{meta['command']}`, {meta['wall_s']:.0f} s; 1-minute load average "
        f"{meta['load_average'][0]:.1f} at the start, {meta['load_average'][1]:.1f} at the end.",
        "",
        "## Targets",
        "",
        markdown_table(
            ["target", "measured", "result"],
            [[t["target"], t["measured"], mark(t["met"])] for t in result["targets"]],
        ),
        "",
    ]


def _train_steps(result) -> list[str]:
    ceilings = result["matmul_ceiling"]
    lines = [
        "## Train step (SGD + momentum 0.9, ReLU MLP, softmax cross-entropy)",
        "",
        "Median of interleaved timed repeats after warm-up (the JAX implementations interleaved "
        "with each other, then PyTorch's, whose spinning OpenMP workers would slow whatever runs "
        "beside them). TFLOP/s counts 6 · weights · batch per "
        "step; the ceiling is the best large square XLA matmul of the same dtype in this run: "
        + ", ".join(f"{d} {c['tflops'] * 1e3:.1f} GFLOP/s" for d, c in ceilings.items())
        + ". The matmuls of one step alone (forward, Σδaᵀ and Wᵀδ, one jitted program): "
        + ", ".join(
            f"{sizes_name(m['sizes'])} batch {m['batch']} {d} "
            f"{m['tflops'] * 1e3:.1f} GFLOP/s ({100 * m['ceiling_fraction']:.1f}% of the ceiling)"
            for d, m in ((d, c["step_matmuls_alone"]) for d, c in ceilings.items())
        )
        + ".",
        "",
    ]
    rows = []
    for s in result["train_step"]:
        case = f"{s['config']} {sizes_name(s['sizes'])} b{s['batch']} {s['dtype']}"
        if s.get("median_ms") is None:
            rows.append([case, s["impl"], "–", "–", "–", "–", s.get("note", "")])
            continue
        rows.append([case, s["impl"], f"{s['median_ms']:.4g}", f"{s['tflops'] * 1e3:.4g}",
                     f"{100 * s['ceiling_fraction']:.1f}%", f"{s['compile_s']:.2f}",
                     _mib(s["peak_bytes"])])  # fmt: skip
    head = ["case", "implementation", "ms/step", "GFLOP/s", "of ceiling", "first call s",
            "peak memory"]  # fmt: skip
    return lines + [
        markdown_table(head, rows),
        "",
        "manual/autodiff step-time ratio: the median over rounds of the two timed in the same "
        "round, then the ratio of the two medians and the interquartile range of the per-round "
        "ratios; beside them the same median and IQR of the per-round ratios of CPU time (this "
        "process, every thread), which leave out the waits for a core that other processes "
        "on the machine cause:",
        "",
        markdown_table(
            ["case", "manual/autodiff", "ratio of medians", "per-round IQR", "CPU time (IQR)"],
            [
                [
                    f"{r['config']} b{r['batch']} {r['dtype']}",
                    f"{r['ratio']:.3f}",
                    f"{r['ratio_of_medians']:.3f}",
                    _iqr(r),
                    _cpu(r),
                ]
                for r in result["ratios"]
            ],
        ),  # fmt: skip
        "",
        *_vs_flax(result["ratios"], lambda r: f"{r['config']} b{r['batch']} {r['dtype']}"),
    ]


OPS = ("fusion", "copy", "transpose", "convolution", "dot")


def _ops(counts: dict) -> str:
    return " / ".join(str(counts[k]) for k in OPS)


def _vs_flax(ratios, label) -> list[str]:
    """The hand-written step against the Flax + Optax peer, paired per round, beside the A/A
    control (the hand-written step over itself built a second time, in the same rounds)."""
    rows = [[label(r), f"{r['vs_flax']['ratio']:.3f}", f"{r['vs_flax']['ratio_of_medians']:.3f}",
             _iqr(r["vs_flax"]), _cpu(r["vs_flax"]),
             f"{r['same_step']['ratio']:.3f} ({_iqr(r['same_step'])})",
             f"{_ops(r['manual_hlo'])} vs {_ops(r['flax_hlo'])}"]
            for r in ratios if "vs_flax" in r]  # fmt: skip
    if not rows:
        return []
    return [
        "fnbp's hand-written step over the Flax + Optax step, paired per round the same way "
        "(both report only the loss); A/A: the hand-written step over itself, built and "
        "compiled a second time and timed in the same rounds, i.e. how far from 1 this "
        "machine's noise alone moves a ratio of two equal steps; ops: the compiled programs' "
        "op counts, manual vs Flax (" + ", ".join(OPS) + "):",
        "",
        markdown_table(
            [
                "case",
                "manual/Flax",
                "ratio of medians",
                "per-round IQR",
                "CPU time (IQR)",
                "A/A (IQR)",
                "ops",
            ],
            rows,
        ),  # fmt: skip
        "",
    ]


def _net_steps(result) -> list[str]:
    rows = []
    for s in result["net_steps"]:
        case = f"{s['net']} b{s['batch']} ({s['num_params']} params, {s['optimizer']})"
        if s.get("median_ms") is None:
            rows.append([case, s["impl"], "–", "–", s.get("note", "")])
            continue
        rows.append([case, s["impl"], f"{s['median_ms']:.4g}", f"{s['compile_s']:.2f}",
                     _mib(s["peak_bytes"])])  # fmt: skip
    return [
        "## Train step of nets (float32, softmax cross-entropy)",
        "",
        'The hand-written step (`grads="manual"`) against the `jax.grad` step of the same '
        'forward (`grads="autodiff"`) and a Flax Linen peer (`fnbp.to_flax`\'s module, the '
        "same initial weights, `jax.value_and_grad` + Optax), timed in interleaved rounds as "
        "above. Nets: the digits CNN (8×8×1 → Conv 16 3×3 ReLU → MaxPool 2×2 → Conv 32 3×3 "
        "ReLU → MaxPool 2×2 → Dense 10), the MNIST-1D CNN (40×1 → 3 × Conv1d 25, kernels "
        "5/3/3, stride 2, padding 1, ReLU → Dense 10) and a residual MLP (64 → 128, blocks "
        "x + α·F(x) with F = Dense 128 → BatchNorm → ReLU → Dense 128 → BatchNorm, no bias "
        "before a BatchNorm, α = 1/√blocks, → 10).",
        "",
        markdown_table(["net", "implementation", "ms/step", "first call s", "peak memory"], rows),
        "",
        "manual/autodiff step-time ratio (paired per round, as above), and the compiled "
        "programs' op counts, manual vs autodiff (" + ", ".join(OPS) + "):",
        "",
        markdown_table(
            [
                "net",
                "manual/autodiff",
                "ratio of medians",
                "per-round IQR",
                "CPU time (IQR)",
                "ops manual",
                "ops autodiff",
            ],
            [
                [
                    f"{r['net']} b{r['batch']} {r['dtype']}",
                    f"{r['ratio']:.3f}",
                    f"{r['ratio_of_medians']:.3f}",
                    _iqr(r),
                    _cpu(r),
                    _ops(r["manual_hlo"]),
                    _ops(r["autodiff_hlo"]),
                ]
                for r in result["net_ratios"]
            ],
        ),  # fmt: skip
        "",
        *_vs_flax(result["net_ratios"], lambda r: f"{r['net']} b{r['batch']} {r['dtype']}"),
    ]


def _sweep(result) -> list[str]:
    sw = result["sweep"]
    return [
        f"## Sweep: {sw['models']} models 64-128-128-10, batch 32, digits ({sw['steps_per_epoch']} steps per epoch, {sw['epochs']} epochs)",
        "",
        markdown_table(
            ["method", "seconds", "model-steps/s"],
            [
                [k, f"{sw[k]['seconds']:.3f}", f"{sw[k]['model_steps_per_s']:.0f}"]
                for k in (
                    "python_loop",
                    "scan_epoch",
                    "vmap_population_scan",
                    "vmap_population_plain_sgd",
                )
                if k in sw
            ],
        ),  # fmt: skip
        "",
        f"vmapped population + scan: {sw['speedup_population_over_loop']:.1f}× the Python loop "
        "(every form reports the loss alone). "
        f"The population's matmuls alone (forward, Σδaᵀ, Wᵀδ of all {sw['models']} models, "
        f"vmapped, nothing else) take {sw['matmul_floor_us_per_model_step']:.1f} µs per "
        f"model-step ({1e3 * sw['matmul_floor_tflops']:.0f} GFLOP/s), so no program that "
        f"does them can beat the loop by more than {sw['max_speedup_over_loop']:.1f}× here"
        + (
            f"; the population reaches {100 * sw['floor_fraction']:.0f}% of that (the floor's "
            "time over the population's, paired per round: the two are timed in the same "
            f"rounds; per-round IQR {100 * sw['floor_fraction_iqr'][0]:.0f}–"
            f"{100 * sw['floor_fraction_iqr'][1]:.0f}%). Where a "
            "model-step's time goes (µs): "
            + ", ".join(f"{k} {v:.1f}" for k, v in sw["us_per_model_step"].items())
            + " (plain SGD: the same program without the momentum buffer's pass)."
            if "floor_fraction" in sw
            else "."
        ),
        "",
    ]


def _per_example(result) -> list[str]:
    head = ["network", "batch", "manual samples/s", "vmap(jax.grad) samples/s",
            "manual / vmap(jax.grad)"]  # fmt: skip
    rows = [[sizes_name(r["sizes"]), r["batch"], f"{r['manual']['samples_per_s']:.0f}",
             f"{r['vmap(jax.grad)']['samples_per_s']:.0f}", f"{r['speedup_manual']:.3f}×"]
            for r in result["per_example"]]  # fmt: skip
    return ["## Per-example gradients", "", markdown_table(head, rows), ""]


def _runs(r) -> str:
    return (
        f"{r['fnbp_first_s']:.2f} (runs: {', '.join(f'{v:.2f}' for v in r['fnbp_first_s_runs'])})"
    )


def _crosscheck(result) -> list[str]:
    cc = result["crosscheck"]
    rows = [
        ["fnbp.crosscheck, finite differences of every parameter, fresh process (compile included)",
         _runs(cc)],
        ["fnbp.crosscheck again, compiled", f"{cc['fnbp_compiled_s']:.2f}"],
    ]  # fmt: skip
    if "torch_gradcheck_s" in cc:
        rows.append(["torch.autograd.gradcheck (full mode, float64)", f"{cc['torch_gradcheck_s']:.2f}"])  # fmt: skip
    lines = [
        f"## Cross-check cost ({sizes_name(cc['sizes'])}, {cc['num_params']} parameters, batch {cc['batch']}, float64)",
        "",
        markdown_table(["check", "seconds"], rows),
        "",
        f"fnbp's check {'passed' if cc['passed'] else 'FAILED'} ({cc['kinks']} parameters straddle a ReLU kink).",
        "",
    ]  # fmt: skip
    nets = cc.get("nets", [])
    if nets:
        rows = []
        for r in nets:
            if "note" in r:
                rows.append([r["name"], "–", "–", "–", "–", r["note"]])
                continue
            rows.append([r["name"], r["num_params"], _runs(r), f"{r['fnbp_compiled_s']:.2f}",
                         f"{r['vs_mlp']:.2f}×",
                         f"{'passed' if r['passed'] else 'FAILED'}, {r['kinks']} kinks"])  # fmt: skip
        head = ["net", "parameters", "fresh process s (compile included)", "again, compiled s",
                f"vs the {sizes_name(cc['sizes'])} MLP", "check"]  # fmt: skip
        lines += [
            f"Nets, the same check (every parameter by finite differences, batch {cc['batch']}, "
            "float64), each fresh process taking turns with the MLP's; vs the MLP: the median "
            "over rounds of the net's time over the MLP's in the same round:",
            "",
            markdown_table(head, rows),
            "",
        ]
    return lines + fast_markdown(cc)


def markdown(result) -> str:
    lines = _header(result) + _train_steps(result) + _net_steps(result)
    lines += _sweep(result) + _per_example(result) + _crosscheck(result)
    if "instruments" in result:
        lines += instruments_markdown(result["instruments"])
    if "instruments_training" in result:
        lines += instruments_training_markdown(result["instruments_training"])
    if "privacy" in result:
        lines += privacy_markdown(result["privacy"])
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)
