"""Test oracles (computations that share nothing with the code under test) and the small
harness that runs a layer's rule beside them.

* A FROZEN copy of the MLP backward pass and init as they were before the generic engine
  (``git show 9edf5f9:fnbp/backprop.py``, ``:fnbp/model.py``, ``:fnbp/initializers.py``, the
  commit before "Layers beyond the MLP"): the new engine must reproduce them bit for bit on an
  MLP. Do not edit them to follow the library; they are the record of what an MLP computed.
* NumPy loop implementations of convolution (direct sum and im2col with an explicit scatter),
  pooling and normalization, the independent witnesses for the local rules.
* The autodiff reference of one layer's rule (``jax.vjp`` of its forward), run beside the rule
  itself in one jitted program (:func:`layer_rule`), and central finite differences of the
  NumPy forwards.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnbp.initializers import get_scheme
from fnbp.losses import to_targets

# ----------------------------------------------------------------------------------------------
# Frozen copy of the old MLP path (9edf5f9). Only renames: old_ prefixes, the Backprop tuple.


class OldBackprop(NamedTuple):
    loss: jax.Array
    grads: list
    deltas: list
    preactivations: list
    activations: list


def old_dense(p, a_prev):
    return a_prev @ p["W"].T + p["b"][None, :]


def old_forward_trace(params, model, x, compute_dtype=None):
    if compute_dtype is not None:
        params, x = jax.tree.map(lambda v: v.astype(compute_dtype), (params, x))
    z, a = [None], [x]
    for l in range(1, model.num_layers + 1):
        z.append(old_dense(params[l - 1], a[l - 1]))  # z⁽ˡ⁾ = W⁽ˡ⁾a⁽ˡ⁻¹⁾ + b⁽ˡ⁾
        a.append(model.layer_activation(l).f(z[l]))  # a⁽ˡ⁾ = f(z⁽ˡ⁾)
    return z, a


def old_output_for_loss(params, z_out, a_out):
    dtype = jnp.promote_types(z_out.dtype, params[-1]["W"].dtype)
    return z_out.astype(dtype), a_out.astype(dtype)


def old_no_l2(l2) -> bool:
    return isinstance(l2, (int, float)) and l2 == 0


def old_l2_penalty(params, l2):
    if old_no_l2(l2):
        return 0.0
    return jnp.where(l2 == 0, 0, 0.5 * l2 * sum(jnp.sum(p["W"] ** 2) for p in params))


def old_dense_backward(p, a_prev, delta, l2):
    W, b = p["W"], p["b"]
    dW = jnp.matmul(delta.T, a_prev, preferred_element_type=W.dtype)  # Σₙ δaᵀ
    grads = {
        "W": dW if old_no_l2(l2) else dW + jnp.asarray(l2, W.dtype) * W,  # + λW
        "b": jnp.sum(delta, axis=0, dtype=b.dtype),  # Σₙ δ
    }
    return grads, delta @ W.astype(delta.dtype)  # Wᵀδ, one row per example


def old_backprop(params, model, x, y, l2, compute_dtype=None) -> OldBackprop:
    L, loss_fn = model.num_layers, model.loss_fn
    z, a = old_forward_trace(params, model, x, compute_dtype)
    z_out, a_out = old_output_for_loss(params, z[L], a[L])
    t = to_targets(loss_fn, y, model.sizes[-1], z_out.dtype)
    loss = jnp.mean(loss_fn.value(z_out, a_out, t)) + old_l2_penalty(params, l2)

    delta, grads = [None] * (L + 1), [None] * (L + 1)
    g_prime = model.layer_activation(L).df(z_out, a_out)
    delta[L] = loss_fn.delta(z_out, a_out, t, g_prime) / x.shape[0]  # δ⁽ᴸ⁾ = (p − y)/B, …
    delta[L] = delta[L].astype(z[L].dtype)
    for l in range(L, 0, -1):
        grads[l], back = old_dense_backward(params[l - 1], a[l - 1], delta[l], l2)
        if l > 1:
            f_prime = model.layer_activation(l - 1).df(z[l - 1], a[l - 1])
            delta[l - 1] = jnp.where(f_prime == 0, 0, f_prime * back)
    return OldBackprop(loss, grads[1:], delta[1:], z[1:], a[1:])


def old_init_params(key, model, scheme="he_normal", *, dtype=jnp.float32):
    s = get_scheme(scheme)
    params = []
    layer_keys = jax.random.split(key, model.num_layers)
    for k, fan_in, fan_out in zip(layer_keys, model.sizes[:-1], model.sizes[1:], strict=True):
        k_w, k_b = jax.random.split(k)
        b = jnp.zeros((fan_out,), dtype)
        if s.bias_std > 0:
            b = s.bias_std * jax.random.normal(k_b, (fan_out,), dtype)
        draw_dtype = jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype
        W = s.weight_init(k_w, (fan_out, fan_in), draw_dtype).astype(dtype)
        params.append({"W": W, "b": b})
    return params


# ----------------------------------------------------------------------------------------------
# Autodiff reference and comparisons.


class Run(NamedTuple):
    """One layer run forward and back on ``δ``: what the code under test returns (``z``,
    ``state``, ``grads``, ``back``, ``inner``) beside the autodiff reference
    ``(vjp_grads, vjp_back) = ∂⟨δ, z⟩/∂(p, x)`` by ``jax.vjp`` of the layer's own forward."""

    z: jax.Array
    state: dict
    grads: dict
    back: jax.Array
    inner: object
    vjp_grads: dict
    vjp_back: jax.Array


@functools.partial(jax.jit, static_argnames="train")
def layer_rule(layer, p, s, x, mask, train, delta, l2=0.0) -> Run:
    """The layer's forward, then its local rule on what the forward stored, and beside them
    ``jax.vjp`` of the forward (the reference, without the L2 term ``λW``). Jitted as one
    program: a single compile per configuration instead of many eager ops (``layer`` is a
    static pytree)."""
    z, cache, new_state = layer.forward(p, s, x, mask, train)
    grads, back, inner = layer.backward(p, x, cache, delta, l2)
    _, pullback = jax.vjp(lambda p, x: layer.forward(p, s, x, mask, train)[0], p, x)
    return Run(z, new_state, grads, back, inner, *pullback(delta))


@functools.partial(jax.jit, static_argnames="train")
def mixed_rule(layer, p, s, x, mask, train, delta):
    """Mixed precision as the engine runs a layer: the forward with the params cast to the
    compute dtype (that of ``x``), the rule with the master params beside ``x`` and ``δ`` in the
    compute dtype. Returns ``(z, state, grads, back, cached)``, ``cached`` the arrays the
    forward stored."""
    low = jax.tree.map(lambda v: v.astype(x.dtype), p)
    z, cache, new_state = layer.forward(low, s, x, mask, train)
    grads, back, _ = layer.backward(p, x, cache, delta, 0.0)
    cached = [c for c in jax.tree.leaves(cache) if isinstance(c, jax.Array)]
    return z, new_state, grads, back, cached


def random_params(layer, in_shape, rng, dtype=np.float64, scale=0.5):
    """Params with the structure, shapes and dtypes of ``layer.init`` (read by
    ``jax.eval_shape``: nothing is drawn or compiled), every entry moved off its init: N(0,
    scale²) for W, b, β, P and α, and 1 + N(0, scale²) for γ. At init (γ = 1, β = 0, α = 0)
    exactly the bugs these tests look for would hide."""
    shapes = jax.eval_shape(lambda: layer.init(jax.random.key(0), in_shape, "he_normal", dtype))

    def draw(path, leaf):
        v = scale * rng.standard_normal(leaf.shape)
        return (v + (jax.tree_util.keystr(path).endswith("['gamma']"))).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def random_state(layer, in_shape, rng):
    """A state like ``layer.init_state`` with random running statistics (var in [0.5, 2])."""

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        var = name.endswith("['var']")
        return (rng.uniform(0.5, 2, leaf.shape) if var else rng.standard_normal(leaf.shape)).astype(
            leaf.dtype
        )

    return jax.tree_util.tree_map_with_path(
        draw, jax.eval_shape(lambda: layer.init_state(in_shape))
    )


def random_masks(layer, in_shape, batch, rng, keep=0.7):
    """Masks shaped like ``layer.draw_mask``'s (read by ``jax.eval_shape``), drawn in NumPy."""
    shapes = jax.eval_shape(lambda k: layer.draw_mask(k, in_shape, batch), jax.random.key(0))
    return jax.tree.map(lambda leaf: rng.random(leaf.shape) < keep, shapes)


def assert_rel_close(actual, expected, rtol, what="", atol=0.0):
    """Every leaf: ``max|actual − expected| ≤ rtol · max|expected| + atol`` (norm-relative, so
    entries near 0 are judged on the leaf's scale; ``atol`` for a leaf that is itself a
    cancellation of much larger terms), same shapes."""
    a_leaves, a_tree = jax.tree_util.tree_flatten_with_path(actual)
    e_leaves, e_tree = jax.tree_util.tree_flatten_with_path(expected)
    assert a_tree == e_tree, f"{what}: structures differ: {a_tree} vs {e_tree}"
    for (path, a), (_, e) in zip(a_leaves, e_leaves, strict=True):
        name = f"{what}{jax.tree_util.keystr(path)}"
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, f"{name}: shape {a.shape} vs {e.shape}"
        scale = float(np.max(np.abs(e.astype(np.float64)), initial=0.0))
        err = float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64)), initial=0.0))
        assert err <= rtol * scale + atol, (
            f"{name}: max error {err:.3g} > {rtol:g} × {scale:.3g} + {atol:g}"
        )


def central_fd(f, v, eps):
    """∂f/∂v for a scalar NumPy function ``f`` of one float64 array, by central differences
    ``(f(v + εe) − f(v − εe)) / 2ε``, one entry ``e`` at a time."""
    v = np.asarray(v, np.float64)
    out = np.zeros(v.shape)
    for i in np.ndindex(*v.shape):
        e = np.zeros(v.shape)
        e[i] = eps
        out[i] = (f(v + e) - f(v - e)) / (2 * eps)
    return out


# ----------------------------------------------------------------------------------------------
# NumPy convolution (channels last; W of shape (*kernel, C_in, C_out)).


def np_same_pads(spatial, kernel, strides):
    """TensorFlow's "SAME": ceil(n/s) outputs, the extra padding on the high side."""
    pads = []
    for n, k, s in zip(spatial, kernel, strides, strict=True):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def np_pads(padding, spatial, kernel, strides):
    if padding == "SAME":
        return np_same_pads(spatial, kernel, strides)
    if padding == "VALID":
        return [(0, 0)] * len(kernel)
    return [tuple(p) for p in padding]


def _out_sizes(padded, kernel, strides):
    return [(n - k) // s + 1 for n, k, s in zip(padded, kernel, strides, strict=True)]


def np_conv(x, W, b, strides, pads):
    """z[n, o, c] = Σ_{k, i} x̃[n, o·s + k, i] W[k, i, c] + b[c], summed offset by offset."""
    kernel = W.shape[:-2]
    xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    out = _out_sizes(xp.shape[1:-1], kernel, strides)
    z = np.zeros((x.shape[0], *out, W.shape[-1]))
    for o in itertools.product(*(range(n) for n in out)):
        for k in itertools.product(*(range(n) for n in kernel)):
            i = tuple(oi * s + ki for oi, s, ki in zip(o, strides, k, strict=True))
            z[(slice(None), *o)] += xp[(slice(None), *i)] @ W[k]
    return z + b


def np_patches(x, kernel, strides, pads):
    """im2col: ``(B, *out, prod(kernel)·C_in)``, entry ``(k, i)`` of a patch at ``k·C_in + i``
    (the order of ``W.reshape(-1, C_out)``), built with explicit loops."""
    xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    out = _out_sizes(xp.shape[1:-1], kernel, strides)
    offsets = list(itertools.product(*(range(n) for n in kernel)))
    cols = np.zeros((x.shape[0], *out, len(offsets), x.shape[-1]))
    for o in itertools.product(*(range(n) for n in out)):
        for j, k in enumerate(offsets):
            i = tuple(oi * s + ki for oi, s, ki in zip(o, strides, k, strict=True))
            cols[(slice(None), *o, j)] = xp[(slice(None), *i)]
    return cols.reshape(x.shape[0], *out, -1)


def np_conv_backward_im2col(x, W, delta, strides, pads):
    """``(dW, db, dx)`` of ⟨δ, z⟩ by im2col: dW = patchesᵀ·δ, db = Σ δ, and dx by scattering
    each patch's δ·Wᵀ back onto the input positions it was read from (then un-padding)."""
    kernel, c_in, c_out = W.shape[:-2], W.shape[-2], W.shape[-1]
    cols = np_patches(x, kernel, strides, pads)
    d_rows = delta.reshape(-1, c_out)
    W_rows = W.reshape(-1, c_out)
    dW = (cols.reshape(-1, W_rows.shape[0]).T @ d_rows).reshape(W.shape)
    db = d_rows.sum(axis=0)
    d_cols = (d_rows @ W_rows.T).reshape(*delta.shape[:-1], -1, c_in)
    xp_shape = [n + lo + hi for n, (lo, hi) in zip(x.shape[1:-1], pads, strict=True)]
    dxp = np.zeros((x.shape[0], *xp_shape, c_in))
    offsets = list(itertools.product(*(range(n) for n in kernel)))
    for o in itertools.product(*(range(n) for n in delta.shape[1:-1])):
        for j, k in enumerate(offsets):
            i = tuple(oi * s + ki for oi, s, ki in zip(o, strides, k, strict=True))
            dxp[(slice(None), *i)] += d_cols[(slice(None), *o, j)]
    crop = tuple(slice(lo, lo + n) for n, (lo, _) in zip(x.shape[1:-1], pads, strict=True))
    return dW, db, dxp[(slice(None), *crop)]


# ----------------------------------------------------------------------------------------------
# NumPy pooling.


def np_pool_windows(x, window, strides):
    """``[(out_index, [input_index, …]), …]``: every window and the positions it covers."""
    out = _out_sizes(x.shape[1:-1], window, strides)
    result = []
    for o in itertools.product(*(range(n) for n in out)):
        cover = [
            tuple(oi * s + ki for oi, s, ki in zip(o, strides, k, strict=True))
            for k in itertools.product(*(range(n) for n in window))
        ]
        result.append((o, cover))
    return out, result


def np_pool(x, window, strides, op):
    """AvgPool (``op="avg"``) or MaxPool (``"max"``) by a loop over windows."""
    out, wins = np_pool_windows(x, window, strides)
    z = np.zeros((x.shape[0], *out, x.shape[-1]))
    for o, cover in wins:
        vals = np.stack([x[(slice(None), *i)] for i in cover])  # (K, B, C)
        z[(slice(None), *o)] = vals.mean(axis=0) if op == "avg" else vals.max(axis=0)
    return z


def np_pool_backward(x, window, strides, delta, op):
    """∂⟨δ, z⟩/∂x: each window hands δ/K to every entry (avg), or δ/#ties to each of its
    maxima (max), accumulated over overlapping windows."""
    _, wins = np_pool_windows(x, window, strides)
    dx = np.zeros(x.shape)
    for o, cover in wins:
        d = delta[(slice(None), *o)]  # (B, C)
        if op == "avg":
            for i in cover:
                dx[(slice(None), *i)] += d / len(cover)
            continue
        vals = np.stack([x[(slice(None), *i)] for i in cover])
        hit = vals == vals.max(axis=0)
        count = hit.sum(axis=0)
        for j, i in enumerate(cover):
            dx[(slice(None), *i)] += np.where(hit[j], d / count, 0.0)
    return dx


# ----------------------------------------------------------------------------------------------
# NumPy normalization.


def np_batch_norm_train(x, gamma, beta, mean, var, momentum, eps):
    """``(z, new_mean, new_var)``: statistics over every axis but the last, biased variance."""
    axes = tuple(range(x.ndim - 1))
    m = math.prod(x.shape[:-1])
    mu = x.sum(axis=axes) / m
    s2 = ((x - mu) ** 2).sum(axis=axes) / m  # biased: divide by m, not m − 1
    z = gamma * (x - mu) / np.sqrt(s2 + eps) + beta
    return z, momentum * mean + (1 - momentum) * mu, momentum * var + (1 - momentum) * s2


# ----------------------------------------------------------------------------------------------
# NumPy witnesses for the mean-field theory tests: activations, and normalization with its
# backward, written out by hand

NP_ACTS = {
    "relu": (lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(float)),
    "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2),
    "identity": (lambda z: z, np.ones_like),
}


def np_normalize(z, axis, eps=1e-5):
    """``(u, s)``: ``z`` normalized along ``axis`` with the biased variance (BatchNorm: axis 0,
    over the batch; LayerNorm: axis 1, over the features), and its std."""
    s = np.sqrt(z.var(axis=axis, keepdims=True) + eps)
    return (z - z.mean(axis=axis, keepdims=True)) / s, s


def np_normalize_backward(g, u, s, axis):
    """∂L/∂z from ∂L/∂u for ``u, s = np_normalize(z, axis)``."""
    return (g - g.mean(axis=axis, keepdims=True) - u * (g * u).mean(axis=axis, keepdims=True)) / s
