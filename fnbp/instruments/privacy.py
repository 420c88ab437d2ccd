"""Private SGD with one backward pass: DP-SGD's clipped, noised gradient from the stored a and
δ of every layer, no per-example gradient formed, and its privacy accounting.

DP-SGD (Abadi et al. 2016) clips each example's gradient to norm ``C`` and adds Gaussian noise
of standard deviation ``σC`` to their sum. With ``gᵢ = ∂ℓᵢ/∂θ`` example ``i``'s gradient of its
own loss term (the data term only: no L2) and ``B`` the batch size::

    cᵢ = min(1, C / ‖gᵢ‖)                                     ‖gᵢ‖ over every param
    ḡ  = (Σᵢ cᵢ gᵢ + N(0, σ²C² I)) / B  +  λW                  λW on the weights only

Both sums come from the factors of one backward pass (:mod:`fnbp.instruments.factors`):
``‖gᵢ‖² = Σ_leaves ‖gᵢ‖²`` (``‖δᵢ‖²‖aᵢ‖²`` for a dense layer, Goodfellow 2015) and
``Σᵢ cᵢ gᵢ`` by book-keeping (``(c ⊙ δ)ᵀ a = Σᵢ cᵢ δᵢ aᵢᵀ`` for a dense layer): one forward,
one backward, no ``vmap``, no second backward. The batch gradient's ``δᵀa`` products are
never used, so XLA drops them; the clipped ones take their place.

The L2 term ``λW`` is the same for every example and does not depend on the data: it is added
after the clipping and the noise, unclipped and unnoised, as Opacus does with an optimizer's
``weight_decay`` (applied by the wrapped optimizer after the private gradient is formed).
``noise_multiplier=0`` gives exactly the clipped mean ``(1/B) Σᵢ cᵢ gᵢ (+ λW)``, comparable with
any DP-SGD implementation.

Randomness: the train-mode dropout masks are drawn from ``key`` exactly as
:func:`fnbp.backprop` draws them (layer ``i``'s from ``fold_in(key, i)``), so the gᵢ are those of
:func:`fnbp.per_example_grads` with the same key; the noise comes from
:func:`noise_key` = ``fold_in(key, NOISE_STREAM)`` (``NOISE_STREAM = 2³¹ − 1``, an index no
layer has), split into one key per params leaf in ``jax.tree.leaves(params)`` order.

With optax: any optimizer is applied to :func:`dp_grads`' output, e.g.
``updates, s = opt.update(dp.grads, s, params)``. An optax transformation sees only the mean
gradient, from which the per-example norms are gone, so the clipping has to happen in the
step, as here (``optax.contrib.differentially_private_aggregate`` instead takes per-example
gradients with a batch axis, the ``vmap(jax.grad)`` this module avoids). The privacy
guarantee is :func:`epsilon`'s, for Poisson sampling of each example with probability
``sampling_rate`` per step (the usual accounting of DP-SGD, also applied to shuffled batches of
fixed size ``B``, as TF-Privacy and Opacus do).

Under train-mode BatchNorm one example's loss depends on every other example of the batch:
no per-example gradient exists, so :func:`dp_grads` refuses it (eval mode is fine).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnbp.initializers import _check_key
from fnbp.instruments import factors as fx
from fnbp.instruments.per_example import _factors, _map, check_per_example
from fnbp.layers.base import Outer
from fnbp.layers.dense import decay
from fnbp.model import _concrete, draw_batch_masks

Array = jax.Array

NOISE_STREAM = 2**31 - 1  # fold_in index of the noise: the masks use 0 … len(layers) − 1


class DPGrads(NamedTuple):
    """What :func:`dp_grads` returns (unpacks as ``grads, norms``).

    Attributes:
        grads: the clipped, noised mean gradient (L2 term added after), like ``params``.
        norms: ``(batch,)``, ‖gᵢ‖ of each example's data-term gradient before clipping (the
            clipped one has norm ``min(‖gᵢ‖, C)``), in at least float32.
    """

    grads: list
    norms: Array


def noise_key(key):
    """The key of DP-SGD's noise, ``jax.random.fold_in(key, NOISE_STREAM)``: a stream apart from
    the dropout masks, which :func:`fnbp.backprop` draws from ``fold_in(key, i)`` for layer
    ``i``."""
    return jax.random.fold_in(key, NOISE_STREAM)


def _dp_grads(
    params, model, x, y, l2, state, masks, train, clip_norm, noise_multiplier, noise_key
) -> tuple[list, Array, Array]:
    """``(grads, norms, loss)`` of DP-SGD from one forward and one backward pass (jittable, no
    checks): ``masks`` as :func:`fnbp.model.draw_batch_masks` returns them, ``noise_key`` a
    PRNG key or ``None`` for no noise at all (then ``noise_multiplier`` is not read); ``loss``
    the batch's mean loss, L2 penalty included."""
    out, factors = _factors(params, model, x, y, l2, state, masks, train)
    B = x.shape[0]
    sq = sum(jax.tree.leaves(_map(fx.sq_norms, factors)))  # ‖gᵢ‖², the data term only
    norms = jnp.sqrt(sq)
    c = jnp.minimum(1, jnp.asarray(clip_norm, sq.dtype) / norms)  # ‖gᵢ‖ = 0: C/0 = ∞, c = 1
    total = _map(lambda f, w: fx.weighted_sum(f, c, w), factors, params)  # Σᵢ cᵢ gᵢ
    if noise_key is not None:  # + N(0, σ²C²I)
        leaves, treedef = jax.tree.flatten(total)
        keys = jax.random.split(noise_key, len(leaves))
        scale = jnp.asarray(noise_multiplier, sq.dtype) * jnp.asarray(clip_norm, sq.dtype)
        noisy = [
            s + scale * jax.random.normal(k, s.shape, s.dtype)
            for s, k in zip(leaves, keys, strict=True)
        ]
        total = jax.tree.unflatten(treedef, noisy)

    def finish(f, s, w):  # / B, in the params' dtype, then + λW on a weight (unclipped)
        g = (s / B).astype(w.dtype)
        return decay(g, w, l2) if isinstance(f, Outer) else g

    return _map(finish, factors, total, params), norms, out.loss


@functools.partial(jax.jit, static_argnames=("train", "noise"))
def _dp_grads_jit(params, model, x, y, l2, state, key, clip_norm, noise_multiplier, train, noise):
    masks = draw_batch_masks(model, key, x.shape[0], train)
    nk = noise_key(key) if noise else None
    return _dp_grads(params, model, x, y, l2, state, masks, train, clip_norm, noise_multiplier, nk)


def _check_number(name: str, value, *, positive: bool) -> None:
    """Raise unless ``value`` is a finite real number > 0 (``positive``) or ≥ 0 (checked when
    concrete)."""
    want = "a finite number > 0" if positive else "a finite number >= 0"
    if not _concrete(value):
        return
    dtype = np.asarray(value).dtype if isinstance(value, (np.ndarray, jax.Array)) else None
    real = isinstance(value, (int, float, np.integer, np.floating)) or (
        dtype is not None
        and (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))
    )
    if isinstance(value, (bool, np.bool_)) or not real or np.ndim(value) != 0:
        raise TypeError(f"{name} must be {want}, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be {want}, got {value!r}")


def dp_grads(
    params,
    model,
    x: Array,
    y: Array,
    *,
    clip_norm,
    noise_multiplier,
    key,
    l2=0.0,
    state=None,
    train=None,
) -> DPGrads:
    """DP-SGD's clipped, noised mean gradient from one forward and one backward pass.

    ``ḡ = (Σᵢ min(1, C/‖gᵢ‖) gᵢ + N(0, σ²C²I)) / B + λW`` with gᵢ example ``i``'s gradient of
    its own loss term (L2 left out of gᵢ and of the clipping: see the module docstring).

    Arguments:
        params, model, x, y: as for :func:`fnbp.backprop` (``x`` of shape
            ``(batch, *input_shape)``, ``B = batch``).
        clip_norm: ``C > 0``, the norm each gᵢ is clipped to (over every param at once).
        noise_multiplier: ``σ ≥ 0``; the noise's standard deviation is ``σC`` (on the sum, so
            ``σC/B`` on the mean). ``0`` adds none: the exact clipped mean.
        key: a PRNG key: train-mode dropout's masks, drawn as :func:`fnbp.backprop` draws them,
            and the noise, from :func:`noise_key`. May be ``None`` when
            ``noise_multiplier == 0`` and no dropout draws a mask.
        l2: λ ≥ 0; ``λW`` is added to each weight's result after clipping and noise.
        state, train: as for :func:`fnbp.backprop`; train-mode BatchNorm is refused.

    Returns:
        A :class:`DPGrads` ``(grads, norms)``: ``grads`` like ``params`` (same dtypes),
        ``norms`` ``(batch,)``, each ‖gᵢ‖ before clipping.

    Raises:
        ValueError, TypeError: for a ``clip_norm`` that is not a finite number > 0, a
            ``noise_multiplier`` that is not a finite number ≥ 0, a missing ``key`` where noise
            is added, as :func:`fnbp.backprop` for the other arguments, and for train-mode
            BatchNorm (naming the layer): its examples are coupled.
    """
    _check_number("clip_norm", clip_norm, positive=True)
    _check_number("noise_multiplier", noise_multiplier, positive=False)
    train = check_per_example(
        params, model, x, y, l2=l2, state=state, key=key, train=train, what="dp_grads"
    )
    noise = not (_concrete(noise_multiplier) and float(noise_multiplier) == 0)
    if noise and key is None:
        raise ValueError(
            f"dp_grads: noise_multiplier={noise_multiplier!r} adds Gaussian noise; pass key= "
            "(a PRNG key, e.g. jax.random.key(0)) to draw it"
        )
    if key is not None:
        _check_key(key)
    grads, norms, _ = _dp_grads_jit(
        params, model, x, y, l2, state, key, clip_norm, noise_multiplier, train=train, noise=noise
    )
    return DPGrads(grads, norms)


# ----------------------------------------------------------------------------------------------
# Privacy accounting.

ACCOUNTANTS = ("rdp", "pld")


def epsilon(
    noise_multiplier, sampling_rate, steps, delta, *, accountant: str = "rdp", orders=None
) -> float:
    """ε of ``steps`` steps of DP-SGD at the given δ, from Google's ``dp-accounting``.

    Each step is a Poisson-subsampled Gaussian mechanism (every example in the batch with
    probability ``sampling_rate``, noise ``σ = noise_multiplier`` times the sensitivity ``C``),
    neighbouring datasets differing by adding or removing one example; the steps compose.

    Arguments:
        noise_multiplier: ``σ ≥ 0``; ``0`` gives ``ε = ∞`` (no privacy).
        sampling_rate: ``q`` in ``(0, 1]``, the batch size over the dataset size.
        steps: the number of steps, an integer ≥ 0 (``0`` gives ``ε = 0``).
        delta: δ in ``(0, 1)``.
        accountant: ``"rdp"`` (Rényi DP, Mironov 2017, as TF-Privacy and Opacus's RDP
            accountant, with dp-accounting's conversion to (ε, δ) of Canonne, Kamath and
            Steinke 2020) or ``"pld"`` (privacy loss distributions, Koskela et al. 2020 and
            Doroshenko et al. 2022: tighter, a few tenths of a second slower).
        orders: the RDP orders α to minimise over (``"rdp"`` only); ``None`` for
            dp-accounting's default (1 < α ≤ 256 and a few larger).

    Returns:
        ε as a float (``math.inf`` where no finite ε holds).

    Raises:
        ValueError, TypeError: for arguments out of range, naming the argument.
    """
    from dp_accounting import dp_event, pld, rdp

    _check_number("noise_multiplier", noise_multiplier, positive=False)
    _check_number("sampling_rate", sampling_rate, positive=True)
    if not 0 < float(sampling_rate) <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    _check_number("delta", delta, positive=True)
    if not 0 < float(delta) < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if orders is not None and accountant != "rdp":
        raise ValueError(
            f"orders apply to the 'rdp' accountant only, got accountant={accountant!r}"
        )
    if steps == 0:
        return 0.0
    if float(noise_multiplier) == 0:
        return math.inf
    step = dp_event.PoissonSampledDpEvent(
        float(sampling_rate), dp_event.GaussianDpEvent(float(noise_multiplier))
    )
    acc = rdp.RdpAccountant(orders) if accountant == "rdp" else pld.PLDAccountant()
    acc.compose(dp_event.SelfComposedDpEvent(step, int(steps)))
    return float(acc.get_epsilon(float(delta)))
