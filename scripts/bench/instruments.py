"""Per-example gradient norms from one backward pass: what a training step pays to return
them, and the memory they need beside the materialised ``vmap(jax.grad)``.

* time: a plain hand-written SGD step against the same step that also returns every
  example's gradient norm per layer and in total (from the factors of its own backward pass),
  and against a step that gets them by materialising ``vmap(jax.grad)``, timed in the same
  rounds;
* memory: the compiled programs' peak (arguments + outputs + temporaries, from XLA's memory
  analysis: compiled, not run, so a batch whose materialised gradients would not fit is still
  measured).
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import optax

from bench.common import interleaved, log, mlp_case, paired, peak_bytes, sizes_name
from fnbp.backprop import _backward
from fnbp.instruments import factors as fx
from fnbp.instruments.per_example import layer_sq_norms
from fnbp.model import _loss


def _steps(model, lr=0.01):
    opt = optax.sgd(lr)

    def plain(params, opt_state, x, y):
        out = _backward(params, model, x, y, 0.0)
        updates, opt_state = opt.update(out.grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, out.loss

    def with_norms(params, opt_state, x, y):  # the same pass, its a and δ read once more
        out = _backward(params, model, x, y, 0.0)
        factors = fx.example_factors(model.layers, params, out.trace, out.deltas, x.shape[0])
        per_layer = layer_sq_norms(factors, params, 0.0)
        updates, opt_state = opt.update(out.grads, opt_state, params)
        norms = (jnp.sqrt(jnp.stack(per_layer)), jnp.sqrt(sum(per_layer)))
        return optax.apply_updates(params, updates), opt_state, out.loss, norms

    def materialised(params, opt_state, x, y):  # per-example grads formed, then reduced
        one = lambda xi, yi: jax.grad(_loss)(params, model, xi[None], yi[None], 0.0)  # noqa: E731
        g = jax.vmap(one)(x, y)
        sq = [sum(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim))) for v in layer.values())
              for layer in g]  # fmt: skip
        grads = jax.tree.map(lambda v: jnp.mean(v, 0), g)
        updates, opt_state = opt.update(grads, opt_state, params)
        norms = (jnp.sqrt(jnp.stack(sq)), jnp.sqrt(sum(sq)))
        return optax.apply_updates(params, updates), opt_state, norms

    return opt, {"plain": plain, "with_norms": with_norms, "vmap(jax.grad)": materialised}


def _runner(step, params, opt_state, x, y):
    def run(n):
        p, s = params, opt_state
        for _ in range(n):
            p, s, *_ = step(p, s, x, y)
        jax.block_until_ready(p)

    return {"run": run}


def instruments_section(args) -> dict:
    """``{"overhead": [...], "memory": [...]}`` (see the module docstring)."""
    sizes, batch = ((64, 128, 128, 10), 32) if args.quick else ((784, 1024, 1024, 10), 256)
    model, params, x, y = mlp_case(sizes, batch)
    opt, fns = _steps(model)
    opt_state = opt.init(params)
    log(f"per-example norms: {sizes_name(sizes)} batch {batch}")
    steps = {name: jax.jit(f) for name, f in fns.items()}
    fast = {k: _runner(steps[k], params, opt_state, x, y) for k in ("plain", "with_norms")}
    times = interleaved(fast, args.repeats, args.target_s)
    # the materialised step takes seconds: a few single calls, paired with plain steps
    slow = {k: _runner(steps[k], params, opt_state, x, y) for k in ("plain", "vmap(jax.grad)")}
    slow_times = interleaved(slow, 2 if args.quick else 3, 0.0)
    overhead = {
        "sizes": list(sizes),
        "batch": batch,
        "plain_ms": 1e3 * statistics.median(times["plain"]),
        "with_norms_ms": 1e3 * statistics.median(times["with_norms"]),
        "vmap_ms": 1e3 * statistics.median(slow_times["vmap(jax.grad)"]),
        "with_norms_ratio": paired(times["with_norms"], times["plain"]),
        "vmap_ratio": paired(slow_times["vmap(jax.grad)"], slow_times["plain"]),
    }
    log(f"  with norms {overhead['with_norms_ratio']['ratio']:.3f}× a plain step; "
        f"vmap(jax.grad) {overhead['vmap_ratio']['ratio']:.0f}×")  # fmt: skip
    memory = []
    for b in (32, 64) if args.quick else (256, 1024, 4096, 16384):
        _, _, xb, yb = mlp_case(sizes, b)
        row = {"batch": b}
        for name, f in steps.items():
            row[name] = peak_bytes(f.lower(params, opt_state, xb, yb).compile())
        log(f"  batch {b}: peak MB " + ", ".join(
            f"{k} {v / 2**20:.0f}" for k, v in row.items() if k != "batch"))  # fmt: skip
        memory.append(row)
    return {"overhead": overhead, "memory": memory}


def markdown(section) -> list[str]:
    o = section["overhead"]
    lines = [
        "## Per-example gradient norms from one backward pass",
        "",
        f"{sizes_name(o['sizes'])}, batch {o['batch']}, float32, hand-written SGD step; ratios are "
        "medians over rounds of the two timed in the same round.",
        "",
        "| step | ms | × plain step | paired IQR |",
        "| --- | --- | --- | --- |",
        f"| plain | {o['plain_ms']:.2f} | 1 | |",
        f"| + per-example norms (factors) | {o['with_norms_ms']:.2f} | "
        f"{o['with_norms_ratio']['ratio']:.3f} | {o['with_norms_ratio']['paired_iqr'][0]:.3f}–"
        f"{o['with_norms_ratio']['paired_iqr'][1]:.3f} |",
        f"| + per-example norms (vmap(jax.grad)) | {o['vmap_ms']:.1f} | "
        f"{o['vmap_ratio']['ratio']:.0f} | |",
        "",
        "Peak memory of the compiled step (XLA memory analysis: arguments + outputs + "
        "temporaries; compiled, not run):",
        "",
        "| batch | plain MB | + norms (factors) MB | + norms (vmap(jax.grad)) MB |",
        "| --- | --- | --- | --- |",
    ]
    for r in section["memory"]:
        lines.append(
            f"| {r['batch']} | {r['plain'] / 2**20:.0f} | {r['with_norms'] / 2**20:.0f} | "
            f"{r['vmap(jax.grad)'] / 2**20:.0f} |"
        )
    return lines + [""]
