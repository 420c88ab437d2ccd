"""The PyTorch peers, in a process of their own (``scripts/bench.py --torch-worker SPEC``): with
torch loaded, its OpenMP workers slowed the XLA steps of the main process by ~10% on a 2-core
CPU, even between torch's runs. The worker times every MLP case's eager and ``torch.compile``
steps (``nn.Sequential`` + ``torch.optim.SGD``, the same initial weights, interleaved with each
other) and ``torch.autograd.gradcheck`` of the cross-check MLP (full and fast mode), and prints
them as JSON."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import fnbp
from bench.common import ENTRY, LR, MOMENTUM, ROOT, case_label, interleaved, log, mlp_case


def make_torch(torch, sizes, batch, dtype, compiled):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, params, x, y = mlp_case(sizes, batch)
    layers = []
    for l, p in enumerate(params, start=1):
        linear = torch.nn.Linear(p["W"].shape[1], p["W"].shape[0])
        with torch.no_grad():  # the same initial weights
            linear.weight.copy_(torch.from_numpy(np.array(p["W"])))
            linear.bias.copy_(torch.from_numpy(np.array(p["b"])))
        layers += [linear] + ([torch.nn.ReLU()] if l < len(params) else [])
    net = torch.nn.Sequential(*layers).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    xt = torch.from_numpy(np.array(x)).to(device)
    yt = torch.from_numpy(np.asarray(y).astype(np.int64)).to(device)
    autocast = dtype == "bfloat16"

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            logits = net(xt)
        loss = torch.nn.functional.cross_entropy(logits.float(), yt)
        loss.backward()
        optimizer.step()
        return loss

    step = torch.compile(train_step) if compiled else train_step
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(n):
        for _ in range(n):
            step()
        sync()

    t0 = time.perf_counter()
    run(2)  # torch.compile traces on the first call and may recompile once on the second
    # On a CPU, torch's OpenMP workers spin for a while after each op: whatever runs next would
    # share the cores with them, so the timer waits for them to go idle.
    settle = 0.0 if device == "cuda" else 0.2
    return {
        "run": run,
        "compile_s": time.perf_counter() - t0,
        "peak_bytes": None,
        "settle_s": settle,
    }


def torch_worker(spec: dict) -> dict:
    """The PyTorch peers, in a process of their own (``--torch-worker``): every case's eager
    and ``torch.compile`` steps (interleaved with each other) and ``gradcheck`` runs."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls as XLA runs them on GPUs
        torch.backends.cudnn.allow_tf32 = True
    out = {"version": torch.__version__, "cases": {}}
    for config, sizes, batch, dtype in spec["cases"]:
        label = case_label(config, sizes, batch, dtype)
        log(f"torch train step: {label}")
        runners, got = {"torch eager": make_torch(torch, sizes, batch, dtype, compiled=False)}, {}
        if spec["torch_compile"]:
            try:
                runners["torch.compile"] = make_torch(torch, sizes, batch, dtype, True)
            except Exception as e:  # noqa: BLE001  (any compile failure is a result)
                got["torch.compile"] = {"note": f"failed: {type(e).__name__}: {str(e)[:200]}"}
                log(f"  torch.compile {got['torch.compile']['note']}")
        else:
            got["torch.compile"] = {"note": "not run (--quick or --no-torch-compile)"}
        for impl, ts in interleaved(runners, spec["repeats"], spec["target_s"]).items():
            got[impl] = {"times": ts, "compile_s": runners[impl]["compile_s"]}
            log(f"  {impl:14s} {1e3 * statistics.median(ts):9.3f} ms")
        out["cases"][label] = got
    sizes = tuple(spec["crosscheck_sizes"])
    out["gradcheck_s_runs"] = [_torch_gradcheck(torch, sizes) for _ in range(spec["gradchecks"])]
    out["gradcheck_fast_s_runs"] = [
        _torch_gradcheck(torch, sizes, fast=True) for _ in range(spec["gradchecks"])
    ]
    return out


def run_torch_worker(cases, args, crosscheck_sizes) -> dict | None:
    """:func:`torch_worker` in a subprocess, or ``None`` when torch is not installed (or
    ``--no-torch``); ``crosscheck_sizes`` is the MLP its ``gradcheck`` checks."""
    if args.no_torch or importlib.util.find_spec("torch") is None:
        return None
    spec = {
        "cases": cases, "torch_compile": args.torch_compile, "repeats": args.repeats,
        "target_s": args.target_s, "gradchecks": 1 if args.quick else 3,
        "crosscheck_sizes": list(crosscheck_sizes),
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(ENTRY), "--torch-worker", json.dumps(spec)],
        stdout=subprocess.PIPE, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def _torch_gradcheck(torch, sizes, fast: bool = False) -> float:
    """``torch.autograd.gradcheck`` (full mode, or ``fast_mode``: one random direction per
    parameter tensor; float64) of the loss w.r.t. all parameters."""
    with jax.enable_x64(True):
        model = fnbp.MLP(sizes)
        params = fnbp.init_params(jax.random.key(1), model, dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(2), (32, model.sizes[0]), jnp.float64)
        y = jax.random.randint(jax.random.key(3), (32,), 0, model.sizes[-1])
    leaves = [
        torch.tensor(np.asarray(p[k]), dtype=torch.float64, requires_grad=True)
        for p in params
        for k in ("W", "b")
    ]
    xt = torch.tensor(np.asarray(x), dtype=torch.float64)
    yt = torch.tensor(np.asarray(y), dtype=torch.int64)

    def loss(*leaves):
        a = xt
        for l in range(0, len(leaves), 2):
            a = a @ leaves[l].T + leaves[l + 1]
            if l + 2 < len(leaves):
                a = torch.relu(a)
        return torch.nn.functional.cross_entropy(a, yt)

    t0 = time.perf_counter()
    torch.autograd.gradcheck(loss, tuple(leaves), eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=fast)
    return time.perf_counter() - t0
