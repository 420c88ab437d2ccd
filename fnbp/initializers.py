"""Initialization schemes and :func:`init_params`.

Every scheme draws ``W⁽ˡ⁾`` of shape ``(fan_out, fan_in)`` with i.i.d. zero-mean entries of
variance ``Var(W) = σ_w² / fan_in`` (this "σ_w²" is the quantity mean-field theory works with,
:func:`sigma_w2`), and biases ``b⁽ˡ⁾ = 0`` unless a ``bias_std`` is given.

=====================  =========================================  ===================
scheme                 distribution of W_ij                       σ_w² = fan_in·Var(W)
=====================  =========================================  ===================
``he_normal``          truncated normal, Var = 2/fan_in            2
``he_uniform``         U(±√(6/fan_in)), Var = 2/fan_in             2
``lecun_normal``       truncated normal, Var = 1/fan_in            1
``lecun_uniform``      U(±√(3/fan_in)), Var = 1/fan_in             1
``glorot_normal``      truncated normal, Var = 2/(fan_in+fan_out)  2·fan_in/(fan_in+fan_out)
``glorot_uniform``     U(±√(6/(fan_in+fan_out)))                   2·fan_in/(fan_in+fan_out)
``orthogonal``         orthonormal rows or columns (gain 1)        fan_in/max(fan_in, fan_out)
``standard_uniform``   U(±1/√fan_in), Var = 1/(3 fan_in)           1/3
``naive``              N(0, 0.01²), the classic "small random"     10⁻⁴·fan_in
=====================  =========================================  ===================

The truncated normals are ``jax.nn.initializers``' own: cut at two standard deviations and
rescaled so that the variance is exactly the one listed (PyTorch's ``kaiming_normal_`` samples
an untruncated normal of the same variance). ``standard_uniform`` is the "commonly used
heuristic" of Glorot & Bengio (2010) and the default weight init of ``torch.nn.Linear`` (whose
biases, unlike these, are not zero). Ask for your own with :func:`normal_scheme` (N(0, σ²)) or
:func:`variance_scaling_scheme` (Var = σ_w²/fan_in).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.nn import initializers as jinit

# jax.nn.initializers assume kernels of shape (fan_in, fan_out); fnbp's W is (fan_out, fan_in).
_AXES = {"in_axis": -1, "out_axis": -2}


class InitScheme(NamedTuple):
    """A weight-initialization scheme.

    Attributes:
        name: a label for reports.
        weight_init: a ``jax.nn.initializers``-style ``(key, shape, dtype) -> W`` for
            ``shape = (fan_out, fan_in)``.
        weight_variance: ``(fan_in, fan_out) -> Var(W_ij)``, the variance it draws with.
        bias_std: biases are drawn from N(0, bias_std²) (zero when 0).
    """

    name: str
    weight_init: Callable
    weight_variance: Callable[[int, int], float]
    bias_std: float = 0.0


def variance_scaling_scheme(
    sigma_w2: float, distribution: str = "normal", *, bias_std: float = 0.0, name: str | None = None
) -> InitScheme:
    """Var(W_ij) = σ_w²/fan_in with the given distribution.

    Arguments:
        sigma_w2: σ_w² > 0 (2 is He, 1 is LeCun).
        distribution: ``"normal"``, ``"truncated_normal"`` or ``"uniform"``.
        bias_std: σ_b; biases ~ N(0, σ_b²).
    """
    if not (_is_number(sigma_w2) and math.isfinite(sigma_w2) and sigma_w2 > 0):
        raise ValueError(f"sigma_w2 must be a finite number > 0, got {sigma_w2!r}")
    if distribution not in ("normal", "truncated_normal", "uniform"):
        raise ValueError(
            f"distribution must be 'normal', 'truncated_normal' or 'uniform', got {distribution!r}"
        )
    _check_bias_std(bias_std)
    return InitScheme(
        name or f"variance_scaling(sigma_w2={sigma_w2:g}, {distribution})",
        jinit.variance_scaling(float(sigma_w2), "fan_in", distribution, **_AXES),
        lambda fan_in, fan_out: float(sigma_w2) / fan_in,
        float(bias_std),
    )


def normal_scheme(std: float, *, bias_std: float = 0.0, name: str | None = None) -> InitScheme:
    """W_ij ~ N(0, std²), whatever the layer's width (σ_w² = std²·fan_in)."""
    if not (_is_number(std) and math.isfinite(std) and std > 0):
        raise ValueError(f"std must be a finite number > 0, got {std!r}")
    _check_bias_std(bias_std)
    return InitScheme(
        name or f"normal(std={std:g})",
        jinit.normal(float(std)),
        lambda fan_in, fan_out: float(std) ** 2,
        float(bias_std),
    )


def _is_number(v) -> bool:
    """A real scalar (Python, NumPy or a 0-d array), not a bool."""
    if isinstance(v, bool) or (hasattr(v, "shape") and v.shape != ()):
        return False
    return isinstance(v, numbers.Real) or (
        hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.number)
    )


def _check_bias_std(bias_std):
    if not (_is_number(bias_std) and math.isfinite(bias_std) and bias_std >= 0):
        raise ValueError(f"bias_std must be a finite number >= 0, got {bias_std!r}")


SCHEMES: dict[str, InitScheme] = {
    "he_normal": variance_scaling_scheme(2.0, "truncated_normal", name="he_normal"),
    "he_uniform": variance_scaling_scheme(2.0, "uniform", name="he_uniform"),
    "lecun_normal": variance_scaling_scheme(1.0, "truncated_normal", name="lecun_normal"),
    "lecun_uniform": variance_scaling_scheme(1.0, "uniform", name="lecun_uniform"),
    "glorot_normal": InitScheme(
        "glorot_normal",
        jinit.variance_scaling(1.0, "fan_avg", "truncated_normal", **_AXES),
        lambda fan_in, fan_out: 2.0 / (fan_in + fan_out),
    ),
    "glorot_uniform": InitScheme(
        "glorot_uniform",
        jinit.variance_scaling(1.0, "fan_avg", "uniform", **_AXES),
        lambda fan_in, fan_out: 2.0 / (fan_in + fan_out),
    ),
    "orthogonal": InitScheme(
        "orthogonal",
        jinit.orthogonal(1.0, column_axis=-1),
        lambda fan_in, fan_out: 1.0 / max(fan_in, fan_out),
    ),
    "standard_uniform": InitScheme(
        "standard_uniform",
        # U(±1/√fan_in) has variance 1/(3·fan_in): variance_scaling "uniform" with scale 1/3.
        jinit.variance_scaling(1.0 / 3.0, "fan_in", "uniform", **_AXES),
        lambda fan_in, fan_out: 1.0 / (3.0 * fan_in),
    ),
    "naive": normal_scheme(0.01, name="naive"),
}
"""The named init schemes, each an :class:`InitScheme` (its distribution and variance in the module docstring)."""


def get_scheme(scheme: str | InitScheme) -> InitScheme:
    """Resolve a scheme name (a key of :data:`SCHEMES`) or pass an :class:`InitScheme` through.

    Raises:
        ValueError: for an unknown name.
    """
    if isinstance(scheme, InitScheme):
        return scheme
    try:
        return SCHEMES[scheme]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown init scheme {scheme!r}; expected one of {sorted(SCHEMES)}, or an "
            f"InitScheme from fnbp.normal_scheme / fnbp.variance_scaling_scheme"
        ) from None


def sigma_w2(scheme: str | InitScheme, fan_in: int, fan_out: int) -> float:
    """σ_w² = fan_in·Var(W_ij) of a scheme for a layer of the given fans."""
    return fan_in * get_scheme(scheme).weight_variance(fan_in, fan_out)


def draw_matrix(key, scheme, fan_out: int, fan_in: int, dtype) -> jax.Array:
    """A ``(fan_out, fan_in)`` weight matrix from an init scheme (low-precision draws go
    through float32: XLA has no bfloat16 QR for "orthogonal")."""
    draw_dtype = jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype
    return get_scheme(scheme).weight_init(key, (fan_out, fan_in), draw_dtype).astype(dtype)


def draw_bias(key, scheme, n: int, dtype) -> jax.Array:
    """Zeros, or N(0, σ_b²) entries for a scheme with ``bias_std > 0``."""
    s = get_scheme(scheme)
    if s.bias_std > 0:
        return s.bias_std * jax.random.normal(key, (n,), dtype)
    return jnp.zeros((n,), dtype)


def init_layers(key, layers, in_shapes, scheme, dtype) -> list:
    """One params dict per layer, layer ``i`` drawn from the ``i``-th of ``split(key)``."""
    keys = jax.random.split(key, len(layers))
    return [
        layer.init(k, s, scheme, dtype) for layer, k, s in zip(layers, keys, in_shapes, strict=True)
    ]


def init_params(
    key: jax.Array, model, scheme: str | InitScheme = "he_normal", *, dtype=jnp.float32
) -> list:
    """Draw parameters for ``model``.

    Pure in ``key``: ``jax.vmap(lambda k: init_params(k, model))(jax.random.split(key, n))``
    draws a population of ``n`` networks with a leading population axis.

    Arguments:
        key: a JAX PRNG key (``jax.random.key(seed)``).
        model: an :class:`fnbp.MLP` or :class:`fnbp.Net`.
        scheme: a name in :data:`SCHEMES` or an :class:`InitScheme`: the distribution of every
            weight matrix (dense ``W``, conv kernels as ``(C_out, prod(k)·C_in)`` matrices,
            residual projections) and of biases. Normalization layers start at γ = 1, β = 0;
            a learned residual α at its ``alpha``.
        dtype: floating dtype of the parameters (float32 by default).

    Returns:
        A list aligned with ``model.layers`` (``{}`` for layers without params); for an MLP
        one ``{"W": (sizes[l], sizes[l−1]), "b": (sizes[l],)}`` dict per layer.
    """
    from fnbp.model import check_model

    check_model(model)
    get_scheme(scheme)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype!r}")
    if jnp.dtype(dtype).itemsize == 8 and not jax.config.jax_enable_x64:
        raise ValueError(
            "dtype float64 needs 64-bit JAX: run inside `with jax.enable_x64(True):` or set "
            "jax.config.update('jax_enable_x64', True)"
        )
    _check_key(key)
    return init_layers(key, model.layers, model.in_shapes, scheme, dtype)


def _check_key(key) -> None:
    typed = hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = hasattr(key, "dtype") and key.dtype == jnp.uint32 and tuple(key.shape) == (2,)
    if not (typed and key.shape == ()) and not raw:
        got = f"shape {key.shape}, dtype {key.dtype}" if hasattr(key, "dtype") else repr(key)
        raise TypeError(f"key must be a single JAX PRNG key, e.g. jax.random.key(0); got {got}")
