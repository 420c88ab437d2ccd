"""Private SGD's gradient from one backward pass (``fnbp.instruments.privacy._dp_grads``) beside
vmap-and-clip (``jax.vmap(jax.grad)`` per-example gradients, clipped, summed, noised,
averaged: what optax's ``differentially_private_aggregate`` and jax_privacy are fed) and a
plain hand-written gradient, all jitted and bare:

* time, interleaved rounds, ratios paired within a round: on 784-1024-1024-10 at batch 256
  and on 784-128-128-10 at batch 256, 1024 and 4096; Opacus 1.x (PyTorch eager, per-sample
  gradients by hooks, ``DPOptimizer`` with SGD) in a process of its own where it is installed
  and not ``--quick`` (an optional peer, never a dependency);
* memory: each compiled program's peak (XLA's memory analysis: arguments + outputs +
  temporaries; compiled, not run, so batches whose per-example gradients would not fit are
  measured too).

Run alone: ``cd scripts && ../.venv/bin/python -m bench.privacy [--quick]`` (prints the
markdown; ``scripts/bench.py`` runs it as one of its sections).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from bench.common import ROOT, interleaved, log, mlp_case, paired, peak_bytes, sizes_name
from fnbp.backprop import _backward
from fnbp.instruments.privacy import _dp_grads
from fnbp.model import _loss, draw_batch_masks

CLIP, SIGMA = 1.0, 1.0
BIG, SMALL = (784, 1024, 1024, 10), (784, 128, 128, 10)


def _programs(model):
    """``{name: f(params, x, y, key) -> grads}``, to jit."""

    def plain(params, x, y, key):  # the non-private mean gradient
        return _backward(params, model, x, y, 0.0).grads

    def one_backward(params, x, y, key):
        masks = draw_batch_masks(model, None, x.shape[0], False)  # none: no dropout
        return _dp_grads(params, model, x, y, 0.0, None, masks, False, CLIP, SIGMA, key)[0]

    def vmap_and_clip(params, x, y, key):
        one = lambda xi, yi: jax.grad(_loss)(params, model, xi[None], yi[None], 0.0)  # noqa: E731
        g = jax.vmap(one)(x, y)
        sq = sum(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim))) for v in jax.tree.leaves(g))
        c = jnp.minimum(1.0, CLIP / jnp.sqrt(sq))
        leaves, treedef = jax.tree.flatten(g)
        keys = jax.random.split(key, len(leaves))
        noisy = [
            (jnp.tensordot(c, v, axes=1) + SIGMA * CLIP * jax.random.normal(k, v.shape[1:]))
            / x.shape[0]
            for v, k in zip(leaves, keys, strict=True)
        ]
        return jax.tree.unflatten(treedef, noisy)

    return {
        "plain": plain,
        "one backward, no noise": lambda p, x, y, key: one_backward(p, x, y, None),
        "one backward": one_backward,
        "vmap-and-clip": vmap_and_clip,
    }


def _compiled(sizes, batch) -> tuple[dict, tuple, dict]:
    """``(compiled programs, their arguments, peak bytes)`` for the MLP ``sizes`` at ``batch``."""
    model, params, x, y = mlp_case(sizes, batch)
    args = (params, x, y, jax.random.key(3))
    compiled = {n: jax.jit(f).lower(*args).compile() for n, f in _programs(model).items()}
    peaks = {"sizes": list(sizes), "batch": batch}
    peaks |= {n: peak_bytes(c) for n, c in compiled.items()}
    log(f"  {sizes_name(sizes)} batch {batch}: peak MB " + ", ".join(
        f"{k} {peaks[k] / 2**20:.0f}" for k in compiled))  # fmt: skip
    return compiled, args, peaks


def _runner(f, args):
    def run(n):
        for _ in range(n):
            out = f(*args)
        jax.block_until_ready(out)

    return {"run": run}


def _time_case(compiled, inputs, args) -> dict:
    runners = {name: _runner(f, inputs) for name, f in compiled.items()}
    fast = ("plain", "one backward, no noise", "one backward")
    times = interleaved({k: runners[k] for k in fast}, min(args.repeats, 9), args.target_s)
    # vmap-and-clip takes 10–100× longer: a few rounds, each paired with one backward
    slow = interleaved(
        {k: runners[k] for k in ("one backward", "vmap-and-clip")},
        2 if args.quick else 3,
        args.target_s,
    )
    ms = lambda ts: 1e3 * statistics.median(ts)  # noqa: E731
    return {
        "plain_ms": ms(times["plain"]),
        "no_noise_ms": ms(times["one backward, no noise"]),
        "one_backward_ms": ms(times["one backward"]),
        "vmap_ms": ms(slow["vmap-and-clip"]),
        "no_noise_vs_plain": paired(times["one backward, no noise"], times["plain"]),
        "one_backward_vs_plain": paired(times["one backward"], times["plain"]),
        "vmap_vs_one_backward": paired(slow["vmap-and-clip"], slow["one backward"]),
    }


def privacy_section(args) -> dict:
    """``{"time": [...], "memory": [...], "opacus": {...} or None}`` (module docstring)."""
    log("private SGD gradient: one backward against vmap-and-clip")
    if args.quick:
        time_cases, memory_only, opacus_cases = [((64, 32, 10), 32)], [], []
    else:
        time_cases = [(BIG, 256)] + [(SMALL, b) for b in (256, 1024, 4096)]
        memory_only = [(BIG, 1024), (BIG, 4096)]  # vmap-and-clip's 10 and 57 GB: compiled only
        opacus_cases = time_cases[:3]  # Opacus at 4096 takes seconds a step
    section = {"clip_norm": CLIP, "noise_multiplier": SIGMA, "time": [], "memory": []}
    for sizes, batch in time_cases:
        compiled, inputs, peaks = _compiled(sizes, batch)
        row = {"sizes": list(sizes), "batch": batch} | _time_case(compiled, inputs, args)
        log(f"  one backward {row['one_backward_ms']:.2f} ms "
            f"({row['one_backward_vs_plain']['ratio']:.2f}× plain, "
            f"{row['no_noise_vs_plain']['ratio']:.2f}× without the noise), vmap-and-clip "
            f"{row['vmap_ms']:.1f} ms ({row['vmap_vs_one_backward']['ratio']:.1f}× one backward)")  # fmt: skip
        section["time"].append(row)
        section["memory"].append(peaks)
    for sizes, batch in memory_only:
        section["memory"].append(_compiled(sizes, batch)[2])
    section["memory"].sort(key=lambda r: (-r["sizes"][1], r["batch"]))
    section["opacus"] = run_opacus_worker(opacus_cases, args) if opacus_cases else None
    return section


# ----------------------------------------------------------------------------------------------
# Opacus, in a process of its own (torch's OpenMP workers would slow the XLA programs above).


def opacus_worker(spec: dict) -> dict:
    """Seconds per DP-SGD step of Opacus (forward, backward with per-sample gradient hooks,
    ``DPOptimizer.step``: clip, noise, SGD) for every ``(sizes, batch)`` case."""
    import numpy as np
    import opacus
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(0)
    out = {"version": opacus.__version__, "torch_version": torch.__version__, "cases": []}
    for sizes, batch in spec["cases"]:
        _, params, x, y = mlp_case(tuple(sizes), batch)
        layers = []
        for l, p in enumerate(params, start=1):
            linear = torch.nn.Linear(p["W"].shape[1], p["W"].shape[0])
            with torch.no_grad():  # the same initial weights
                linear.weight.copy_(torch.from_numpy(np.array(p["W"])))
                linear.bias.copy_(torch.from_numpy(np.array(p["b"])))
            layers += [linear] + ([torch.nn.ReLU()] if l < len(params) else [])
        net = GradSampleModule(torch.nn.Sequential(*layers))
        opt = DPOptimizer(
            torch.optim.SGD(net.parameters(), lr=0.01),
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            expected_batch_size=batch,
        )
        xt = torch.from_numpy(np.array(x))
        yt = torch.from_numpy(np.asarray(y).astype(np.int64))

        def run(n, net=net, opt=opt, xt=xt, yt=yt):
            for _ in range(n):
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(net(xt), yt).backward()
                opt.step()

        run(1)
        times = interleaved({"opacus": {"run": run, "settle_s": 0.2}}, spec["rounds"], 0.0)
        ms = 1e3 * statistics.median(times["opacus"])
        log(f"  opacus {sizes_name(sizes)} batch {batch}: {ms:.1f} ms")
        out["cases"].append({"sizes": list(sizes), "batch": batch, "step_ms": ms})
    return out


def run_opacus_worker(time_cases, args) -> dict | None:
    """:func:`opacus_worker` in a subprocess; ``None`` without Opacus (or ``--no-torch``)."""
    if getattr(args, "no_torch", False) or importlib.util.find_spec("opacus") is None:
        return None
    spec = {"cases": [[list(s), b] for s, b in time_cases], "rounds": 2}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.privacy", "--opacus-worker", json.dumps(spec)],
            stdout=subprocess.PIPE, text=True, check=True, cwd=ROOT / "scripts", timeout=300,
        )  # fmt: skip
    except (subprocess.SubprocessError, OSError) as e:
        return {"note": f"failed: {type(e).__name__}: {str(e)[:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------


def markdown(section) -> list[str]:
    c, s = section["clip_norm"], section["noise_multiplier"]
    lines = [
        "## Private SGD's gradient from one backward pass",
        "",
        f"DP-SGD's clipped and noised mean gradient (C = {c}, σ = {s}), float32, jitted: one "
        "backward (per-example norms and Σᵢ cᵢgᵢ from the stored a and δ) against vmap-and-clip "
        "(jax.vmap(jax.grad), clip, sum, noise) and the plain mean gradient; ratios are medians "
        "over rounds of the two timed in the same round.",
        "",
        "| MLP | batch | plain ms | one backward ms | × plain | × plain, σ = 0 | vmap-and-clip ms "
        "| × one backward |" + (" Opacus step ms |" if _opacus_rows(section) else ""),
        "| --- | --- | --- | --- | --- | --- | --- | --- |"
        + (" --- |" if _opacus_rows(section) else ""),
    ]
    opacus = _opacus_rows(section)
    for r in section["time"]:
        row = (
            f"| {sizes_name(r['sizes'])} | {r['batch']} | {r['plain_ms']:.2f} | "
            f"{r['one_backward_ms']:.2f} | {r['one_backward_vs_plain']['ratio']:.2f} | "
            f"{r['no_noise_vs_plain']['ratio']:.2f} | {r['vmap_ms']:.1f} | "
            f"{r['vmap_vs_one_backward']['ratio']:.1f} |"
        )
        if opacus:
            ms = opacus.get((tuple(r["sizes"]), r["batch"]))
            row += f" {ms:.1f} |" if ms is not None else " |"
        lines.append(row)
    if opacus:
        o = section["opacus"]
        lines += ["", f"Opacus {o['version']} on torch {o['torch_version']}, eager, a process of "
                  "its own: a whole step (per-sample gradients by hooks, DPOptimizer: clip, "
                  "noise, SGD)."]  # fmt: skip
    lines += [
        "",
        "Peak memory of each compiled program (XLA memory analysis: arguments + outputs + "
        "temporaries; compiled, not run):",
        "",
        "| MLP | batch | plain MB | one backward MB | σ = 0 MB | vmap-and-clip MB "
        "| ÷ one backward |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in section["memory"]:
        lines.append(
            f"| {sizes_name(r['sizes'])} | {r['batch']} | {r['plain'] / 2**20:.1f} | "
            f"{r['one backward'] / 2**20:.1f} | {r['one backward, no noise'] / 2**20:.1f} | "
            f"{r['vmap-and-clip'] / 2**20:.1f} | "
            f"{r['vmap-and-clip'] / r['one backward']:.0f} |"
        )
    return lines + [""]


def _opacus_rows(section) -> dict:
    o = section.get("opacus")
    if not o or "cases" not in o:
        return {}
    return {(tuple(c["sizes"]), c["batch"]): c["step_ms"] for c in o["cases"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="the private SGD bench section alone")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-torch", action="store_true", help="leave Opacus out")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--target-s", type=float, default=None)
    p.add_argument("--json", default=None, help="also write the section's numbers here")
    p.add_argument("--opacus-worker", metavar="SPEC", help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    if args.opacus_worker:
        print(json.dumps(opacus_worker(json.loads(args.opacus_worker))))
        return 0
    args.repeats = args.repeats or (2 if args.quick else 15)
    args.target_s = args.target_s or (0.005 if args.quick else 0.15)
    t0 = time.perf_counter()
    section = privacy_section(args)
    section["wall_s"] = time.perf_counter() - t0
    if args.json:
        from fnbp.report import save_json

        save_json(args.json, section)
    print("\n".join(markdown(section)))
    log(f"done in {section['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
