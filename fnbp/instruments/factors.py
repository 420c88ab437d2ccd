"""Per-example gradients, kept factored, and the statistics read off them without forming them.

The backward pass holds, for every layer (nested ones too), its input ``a`` and its error
signal δ for every example of the batch. With the mean loss ``L = (1/B) Σᵢ ℓᵢ`` the backward
pass's δ carries the 1/B; ``δᵢ = B·δ`` is the error signal of example ``i``'s own loss ℓᵢ, and
each layer kind states its leaves' per-example gradients from it
(:meth:`fnbp.layers.base.Layer.example_grads`): a small leaf (a bias, γ, β, α) as the
``(batch, *leaf)`` array itself, a weight matrix as factors ``gᵢ = Σₜ δᵢₜ ⊗ aᵢₜ``
(:class:`fnbp.layers.base.Outer`). Everything here is a function of those factors:

=========================  ===============================================  =====================
quantity                   dense layer (T = 1)                              cost
=========================  ===============================================  =====================
``sq_norms``: ‖gᵢ‖²        ‖δᵢ‖² ‖aᵢ‖²  (Goodfellow 2015)                     O(B·(n_out + n_in))
``dots``: ⟨gᵢ, V⟩          δᵢᵀ V aᵢ                                          one matmul
``weighted_sum``: Σ cᵢgᵢ   (c ⊙ δ)ᵀ a                                        one matmul
``sum_sq``: Σᵢ gᵢ²         (δ²)ᵀ (a²)                                        one matmul
``kron``: A, G             A = Σᵢ aᵢaᵢᵀ/B,  G = Σᵢ δᵢδᵢᵀ/B  (K-FAC)             two matmuls
=========================  ===============================================  =====================

A weight shared over ``T > 1`` positions (a convolution, a projection on a sequence) has
``‖gᵢ‖² = Σₜ,ₛ ⟨aᵢₜ, aᵢₛ⟩⟨δᵢₜ, δᵢₛ⟩``: the T×T Gram form costs ``B·T²·(n_out + n_in)``, forming
each gᵢ costs ``B·T·n_out·n_in``; :func:`sq_norms` takes the cheaper (:func:`uses_gram`).
``sum_sq`` forms each gᵢ there (``B × leaf`` memory for that layer only).

Nothing here differentiates anything: the factors come from the hand-written backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fnbp.layers.base import Outer

Array = jax.Array


def is_factor(v) -> bool:
    """A leaf of a factor tree: an :class:`Outer` or a per-example array."""
    return isinstance(v, Outer) or isinstance(v, jax.Array)


def example_factors(layers, params, trace, deltas, batch: int) -> list:
    """Every layer's per-example gradient factors, a tree shaped like ``params``.

    Arguments:
        layers, params: a sequence of layer kinds and their params (lists aligned).
        trace: the :class:`fnbp.engine.Trace` of the forward pass.
        deltas: the backward pass's δ per layer (nested ``{"out", "branch"}`` for residual
            blocks), carrying the mean loss's 1/B.
        batch: ``B``; the per-example δ is ``B·δ``, upcast to at least float32.

    Returns:
        A list aligned with ``layers`` of dicts: each leaf's factor (see the module
        docstring) and, for a residual block, ``"branch"``: its branch's list.
    """
    out = []
    for layer, p, x, cache, d in zip(
        layers, params, trace.a[:-1], trace.cache, deltas, strict=True
    ):
        d_out = d["out"] if isinstance(d, dict) else d
        wide = jnp.promote_types(d_out.dtype, jnp.float32)
        g = layer.example_grads(p, x.astype(wide), cache, d_out.astype(wide) * batch)  # δᵢ = B·δ
        if layer.sublayers():
            g["branch"] = example_factors(layer.sublayers(), p["branch"], cache, d["branch"], batch)
        out.append(g)
    return out


def uses_gram(f: Outer) -> bool:
    """The T×T Gram form of ‖gᵢ‖² is cheaper than forming gᵢ: ``T(n_out + n_in) < n_out·n_in``."""
    T, n_out, n_in = f.out.shape[1], f.out.shape[2], f.inp.shape[2]
    return T > 1 and T * (n_out + n_in) < n_out * n_in


def _matrix(f: Outer, leaf: Array) -> Array:
    """``leaf`` as the ``(n_out, n_in)`` matrix the factors multiply."""
    m = leaf.reshape(f.inp.shape[2], f.out.shape[2]).T if f.transposed else leaf
    return m.reshape(f.out.shape[2], f.inp.shape[2])


def _as_leaf(f: Outer, m: Array, leaf: Array) -> Array:
    """An ``(n_out, n_in)`` matrix back in ``leaf``'s layout."""
    return (m.T if f.transposed else m).reshape(leaf.shape)


def _per_example(f: Outer) -> Array:
    """Every gᵢ formed: ``(B, n_out, n_in)``."""
    return jnp.einsum("bto,bti->boi", f.out, f.inp)


def sq_norms(f) -> Array:
    """``(B,)``: ‖gᵢ‖² of one leaf, example by example."""
    if not isinstance(f, Outer):
        return jnp.sum(jnp.square(f).reshape(f.shape[0], -1), axis=1)
    if f.out.shape[1] == 1:  # ‖δᵢ aᵢᵀ‖² = ‖δᵢ‖² ‖aᵢ‖²
        return jnp.sum(jnp.square(f.out), axis=(1, 2)) * jnp.sum(jnp.square(f.inp), axis=(1, 2))
    if uses_gram(f):  # Σₜ,ₛ ⟨aᵢₜ, aᵢₛ⟩⟨δᵢₜ, δᵢₛ⟩
        gram_a = jnp.einsum("bti,bsi->bts", f.inp, f.inp)
        gram_d = jnp.einsum("bto,bso->bts", f.out, f.out)
        return jnp.sum(gram_a * gram_d, axis=(1, 2))
    return jnp.sum(jnp.square(_per_example(f)), axis=(1, 2))


def dots(f, v: Array) -> Array:
    """``(B,)``: ⟨gᵢ, v⟩ for a leaf-shaped ``v`` (``δᵢᵀ V aᵢ`` for a dense layer)."""
    if not isinstance(f, Outer):
        return jnp.sum((f * v[None].astype(f.dtype)).reshape(f.shape[0], -1), axis=1)
    m = _matrix(f, v.astype(f.out.dtype))
    return jnp.einsum("bto,oi,bti->b", f.out, m, f.inp)


def weighted_sum(f, c: Array, leaf: Array) -> Array:
    """``Σᵢ cᵢ gᵢ`` in ``leaf``'s shape (``(c ⊙ δ)ᵀ a`` for a dense layer)."""
    if not isinstance(f, Outer):
        return jnp.tensordot(c.astype(f.dtype), f, axes=1).reshape(leaf.shape)
    out = (f.out * c[:, None, None].astype(f.out.dtype)).reshape(-1, f.out.shape[2])
    return _as_leaf(f, out.T @ f.inp.reshape(-1, f.inp.shape[2]), leaf)


def sum_sq(f, leaf: Array) -> Array:
    """``Σᵢ gᵢ²`` (entry by entry) in ``leaf``'s shape (``(δ²)ᵀ(a²)`` for a dense layer)."""
    if not isinstance(f, Outer):
        return jnp.sum(jnp.square(f), axis=0).reshape(leaf.shape)
    if f.out.shape[1] == 1:
        return _as_leaf(f, jnp.square(f.out[:, 0]).T @ jnp.square(f.inp[:, 0]), leaf)
    return _as_leaf(f, jnp.sum(jnp.square(_per_example(f)), axis=0), leaf)


def kron(f: Outer) -> dict:
    """K-FAC's factors ``{"A": Σᵢₜ aᵢₜaᵢₜᵀ/B (n_in, n_in), "G": Σᵢₜ δᵢₜδᵢₜᵀ/B (n_out, n_out)}``;
    for a dense layer ``A ⊗ G`` approximates the empirical Fisher ``(1/B) Σᵢ vec(gᵢ)vec(gᵢ)ᵀ``
    (``vec`` stacking gᵢ's columns)."""
    B = f.out.shape[0]
    a, d = f.inp.reshape(-1, f.inp.shape[2]), f.out.reshape(-1, f.out.shape[2])
    return {"A": a.T @ a / B, "G": d.T @ d / B}
