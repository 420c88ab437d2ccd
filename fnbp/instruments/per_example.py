"""Per-example gradient norms and gradient statistics from one backward pass, no per-example
gradients formed.

With ``gᵢ = ∂ℓᵢ/∂θ + λW`` example ``i``'s gradient (its own loss term plus the L2 term, so
that ``ḡ = (1/B) Σᵢ gᵢ`` is the batch gradient :func:`fnbp.backprop` returns, and the same
gᵢ as :func:`fnbp.per_example_grads`):

* :func:`per_example_grad_norms` — ‖gᵢ‖ per layer and in total; for a dense layer
  ``‖δᵢaᵢᵀ + λW‖² = ‖δᵢ‖²‖aᵢ‖² + 2λ δᵢᵀWaᵢ + λ²‖W‖²``.
* :func:`gradient_stats` — per entry ``Σᵢ gᵢ²`` and the sample variance
  ``(Σᵢ gᵢ² − Bḡ²)/(B − 1)``; ``tr Σ`` (their sum); the gradient noise scale
  ``B_simple = tr Σ / ‖ḡ‖²`` (McCandlish et al. 2018); Cockpit's norm test
  ``√(tr Σ / (B‖ḡ‖²))`` (Byrd et al. 2012), inner-product test
  ``√(Var(gᵢᵀḡ) / (B‖ḡ‖⁴))`` and orthogonality test
  ``√(Σᵢ‖gᵢ − (gᵢᵀḡ/‖ḡ‖²)ḡ‖² / ((B−1)·B‖ḡ‖²))`` (Bollapragada et al. 2018); and K-FAC's
  Kronecker factors ``A = Σᵢ aᵢaᵢᵀ/B``, ``G = Σᵢ δᵢδᵢᵀ/B`` of every weight matrix.

Under train-mode BatchNorm one example's loss depends on every example of the batch, so
these are refused (:func:`fnbp.backprop.check_independent`); eval mode is fine.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fnbp.backprop import _backward, check_independent
from fnbp.instruments import factors as fx
from fnbp.layers.base import Outer
from fnbp.layers.dense import no_l2
from fnbp.model import (
    _expected_params,
    check_inputs,
    check_l2,
    check_mode,
    check_params,
    draw_batch_masks,
)

Array = jax.Array


class PerExampleNorms(NamedTuple):
    """What :func:`per_example_grad_norms` returns.

    Attributes:
        per_layer: one ``(batch,)`` array per layer with params (nested layers included, in
            params order: a residual block's own ``P``/``α`` before its branch's layers;
            :func:`layer_names` names them): the norm of that layer's part of gᵢ.
        total: ``(batch,)``, ‖gᵢ‖ over every param; ``total² = Σ per_layer²``.
    """

    per_layer: list
    total: Array


class GradientStats(NamedTuple):
    """What :func:`gradient_stats` returns (every field an array or a list of them).

    Attributes:
        loss: the batch's mean loss (L2 penalty included).
        grads: ḡ, the batch gradient, like ``params``.
        sum_sq: ``Σᵢ gᵢ²`` entry by entry, like ``params``.
        variance: the unbiased sample variance of the gᵢ, entry by entry, like ``params``.
        trace_cov: ``tr Σ``, the sum of ``variance``.
        grad_norm_sq: ``‖ḡ‖²``.
        b_simple: the gradient noise scale ``tr Σ / ‖ḡ‖²`` (plug-in: ‖ḡ‖² overestimates
            ‖E g‖² by tr Σ / B; averaging numerator and denominator over steps first, as
            McCandlish et al. do, is the caller's choice).
        norm_test, inner_product_test, orthogonality_test: Cockpit's θ_max of each test.
        sq_norms: ``(batch,)``, ‖gᵢ‖².
        kron: one dict per layer with params (aligned with :func:`layer_names`): for each of
            its weight matrices (``W``, a projection ``P``), ``{"A": (n_in, n_in), "G":
            (n_out, n_out)}``; a convolution's sum over its output positions.
    """

    loss: Array
    grads: list
    sum_sq: list
    variance: list
    trace_cov: Array
    grad_norm_sq: Array
    b_simple: Array
    norm_test: Array
    inner_product_test: Array
    orthogonality_test: Array
    sq_norms: Array
    kron: list


def _factors(params, model, x, y, l2, state, masks, train):
    out = _backward(params, model, x, y, l2, None, state, masks, train)
    return out, fx.example_factors(model.layers, params, out.trace, out.deltas, x.shape[0])


def _map(fn, factors, *trees):
    return jax.tree.map(fn, factors, *trees, is_leaf=fx.is_factor)


def layer_entries(tree) -> list[dict]:
    """The own leaves of every layer with params, nested layers included, in params order:
    a list of dicts (a residual block's ``"branch"`` is visited after the block's own)."""
    out = []
    for layer in tree:
        own = {k: v for k, v in layer.items() if k != "branch"}
        if own:
            out.append(own)
        if "branch" in layer:
            out.extend(layer_entries(layer["branch"]))
    return out


def layer_names(model) -> list[str]:
    """Names of the layers :attr:`PerExampleNorms.per_layer` holds, as errors name them:
    ``layer 1 (dense)``, ``layer 2 (residual) branch layer 1 (conv)``."""

    def walk(layers, shapes, prefix):
        names = []
        for i, (layer, p) in enumerate(zip(layers, shapes, strict=True), start=1):
            name = f"{prefix}layer {i} ({layer.kind})"
            if any(k != "branch" for k in p):
                names.append(name)
            if layer.sublayers():
                names.extend(walk(layer.sublayers(), p["branch"], f"{name} branch "))
        return names

    return walk(model.layers, _expected_params(model), "")


def norm_methods(model) -> list[dict[str, str]]:
    """How :func:`per_example_grad_norms` computes each leaf's ‖gᵢ‖², one dict per layer with
    params (aligned with :func:`layer_names`): ``"direct"`` (a small leaf, its per-example
    gradient at hand), ``"outer"`` (a dense layer: ‖δᵢ‖²‖aᵢ‖²), ``"gram T=…"`` (a weight shared
    over T positions, the T×T Gram form) or ``"formed T=…"`` (each gᵢ formed: cheaper than the
    Gram form when T(n_out + n_in) ≥ n_out·n_in). Decided from the shapes alone."""
    params = _expected_params(model)
    x = jax.ShapeDtypeStruct((1, *model.input_shape), jnp.float32)
    y = jax.ShapeDtypeStruct((1, model.output_size), jnp.float32)
    factors = jax.eval_shape(
        lambda p, x, y: _factors(p, model, x, y, 0.0, None, None, False)[1], params, x, y
    )

    def method(f):
        if not isinstance(f, Outer):
            return "direct"
        T = f.out.shape[1]
        return "outer" if T == 1 else f"{'gram' if fx.uses_gram(f) else 'formed'} T={T}"

    return [{k: method(f) for k, f in own.items()} for own in layer_entries(factors)]


def _sq_norms(f, leaf, l2):
    """‖gᵢ + λW‖² = ‖gᵢ‖² + 2λ⟨gᵢ, W⟩ + λ²‖W‖² for a weight matrix (L2 decays those only)."""
    sq = fx.sq_norms(f)
    if isinstance(f, Outer) and not no_l2(l2):
        w = leaf.astype(sq.dtype)
        sq = sq + 2 * l2 * fx.dots(f, w) + l2**2 * jnp.sum(jnp.square(w))
    return sq


def layer_sq_norms(factors, params, l2) -> list:
    """‖gᵢ‖² of every layer with params (:func:`layer_names` order), L2 term included: one
    ``(batch,)`` array per layer, from a factor tree of :func:`fnbp.instruments.factors.
    example_factors` (what a training step computes from its own backward pass)."""
    sq = layer_entries(_map(lambda f, w: _sq_norms(f, w, l2), factors, params))
    return [sum(own.values()) for own in sq]


def _norms(params, model, x, y, l2, state, masks, train) -> PerExampleNorms:
    _, factors = _factors(params, model, x, y, l2, state, masks, train)
    per_layer = layer_sq_norms(factors, params, l2)
    return PerExampleNorms([jnp.sqrt(s) for s in per_layer], jnp.sqrt(sum(per_layer)))


def _stats(params, model, x, y, l2, state, masks, train) -> GradientStats:
    out, factors = _factors(params, model, x, y, l2, state, masks, train)
    B, grads = x.shape[0], out.grads

    def sum_sq(f, w, g):  # Σᵢ (gᵢ + λW)² = Σᵢ gᵢ² + 2λW ⊙ Σᵢ gᵢ + Bλ²W², Σᵢ gᵢ = B(ḡ − λW)
        s = fx.sum_sq(f, w)
        if isinstance(f, Outer) and not no_l2(l2):
            w = w.astype(s.dtype)
            s = s + 2 * l2 * B * w * g.astype(s.dtype) - B * l2**2 * jnp.square(w)
        return s

    def dots(f, w, g):  # ⟨gᵢ + λW, ḡ⟩
        d = fx.dots(f, g)
        if isinstance(f, Outer) and not no_l2(l2):
            d = d + l2 * jnp.sum(w.astype(d.dtype) * g.astype(d.dtype))
        return d

    sq = _map(sum_sq, factors, params, grads)
    wide = jax.tree.leaves(sq)[0].dtype
    mean = jax.tree.map(lambda g: g.astype(wide), grads)
    variance = jax.tree.map(lambda s, g: (s - B * jnp.square(g)) / (B - 1), sq, mean)
    trace_cov = sum(jnp.sum(v) for v in jax.tree.leaves(variance))
    g2 = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(mean))
    proj = sum(jax.tree.leaves(_map(dots, factors, params, mean)))  # pᵢ = ⟨gᵢ, ḡ⟩
    norms = sum(jax.tree.leaves(_map(lambda f, w: _sq_norms(f, w, l2), factors, params)))
    var_proj = (jnp.sum(jnp.square(proj)) - B * g2**2) / (B - 1)
    ortho = jnp.sum(norms - jnp.square(proj) / g2) / (B - 1)  # Σᵢ ‖gᵢ − (pᵢ/‖ḡ‖²) ḡ‖² / (B − 1)
    kron = [
        {k: fx.kron(f) for k, f in own.items() if isinstance(f, Outer)}
        for own in layer_entries(factors)
    ]
    return GradientStats(
        loss=out.loss,
        grads=grads,
        sum_sq=sq,
        variance=variance,
        trace_cov=trace_cov,
        grad_norm_sq=g2,
        b_simple=trace_cov / g2,
        norm_test=jnp.sqrt(trace_cov / (B * g2)),
        inner_product_test=jnp.sqrt(var_proj / (B * g2**2)),
        orthogonality_test=jnp.sqrt(ortho / (B * g2)),
        sq_norms=norms,
        kron=kron,
    )


def _keyed(fn):
    @functools.partial(jax.jit, static_argnames="train")
    def run(params, model, x, y, l2, state, key, train):
        return fn(
            params, model, x, y, l2, state, draw_batch_masks(model, key, x.shape[0], train), train
        )

    return run


_norms_jit, _stats_jit = _keyed(_norms), _keyed(_stats)


def check_per_example(params, model, x, y, *, l2, state, key, train, what: str) -> bool:
    """The checks of every per-example quantity: the arguments fit the model, and the
    examples are independent. Returns the mode (``train``) as :func:`fnbp.model.check_mode`."""
    check_params(params, model)
    check_inputs(model, x, y)
    check_l2(l2)
    train = check_mode(model, state=state, train=train, key=key, what=what)
    check_independent(model, train, what)
    return train


def per_example_grad_norms(
    params, model, x: Array, y: Array, *, l2=0.0, state=None, key=None, train=None
) -> PerExampleNorms:
    """Each example's gradient norm, per layer and in total, from one backward pass.

    Arguments:
        params, model, x, y: as for :func:`fnbp.backprop` (``x`` of shape
            ``(batch, *input_shape)``).
        l2, state, key, train: as for :func:`fnbp.backprop`; gᵢ includes λW, as
            :func:`fnbp.per_example_grads` does.

    Returns:
        A :class:`PerExampleNorms`: ``.per_layer`` (one ``(batch,)`` array per layer with
        params, :func:`layer_names`) and ``.total`` (``(batch,)``), in at least float32.
        Equal to the norms of :func:`fnbp.per_example_grads` without forming them: extra
        memory ``O(batch · width)`` for dense layers (a convolution: ``O(batch·T²)`` or
        ``O(batch·|W|)``, whichever is smaller; :func:`norm_methods` says which).

    Raises:
        ValueError, TypeError: as :func:`fnbp.backprop`, and for train-mode BatchNorm (naming
            the layer): its examples are coupled, so no per-example gradient exists.
    """
    train = check_per_example(
        params, model, x, y, l2=l2, state=state, key=key, train=train, what="per_example_grad_norms"
    )
    return _norms_jit(params, model, x, y, l2, state, key, train=train)


def gradient_stats(
    params, model, x: Array, y: Array, *, l2=0.0, state=None, key=None, train=None
) -> GradientStats:
    """Gradient variance, noise scale, Cockpit's tests and K-FAC factors from one backward pass.

    Arguments:
        params, model, x, y, l2, state, key, train: as for :func:`per_example_grad_norms`;
            ``x`` needs at least two examples (a sample variance).

    Returns:
        A :class:`GradientStats` (formulas in the module docstring), in at least float32.

    Raises:
        ValueError, TypeError: as :func:`per_example_grad_norms`, and for a batch of one.
    """
    train = check_per_example(
        params, model, x, y, l2=l2, state=state, key=key, train=train, what="gradient_stats"
    )
    if x.shape[0] < 2:
        raise ValueError(
            f"gradient_stats: x holds {x.shape[0]} example; a sample variance needs a batch of "
            "at least 2"
        )
    return _stats_jit(params, model, x, y, l2, state, key, train=train)
