"""Activation functions as ``(f, f′)`` pairs.

Each entry of :data:`ACTIVATIONS` carries the function ``f`` and its derivative ``f′``. The
derivative takes both the pre-activation ``z`` and the stored activation ``a = f(z)``, so that
it can use whichever is cheaper: the ReLU mask from ``a > 0``, the sigmoid's ``a(1 − a)``, the
tanh's ``1 − a²``. The backward pass never branches on a name: adding an activation is adding
one entry here.

At a kink (ReLU-family at ``z = 0``) the derivative follows the convention of ``jax.grad`` on
the same ``f``, so the hand-written and automatic gradients agree even there:
``relu′(0) = 0`` and ``leaky_relu′(0) = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import erf

Array = jax.Array

LEAKY_RELU_SLOPE = 0.01  # the negative slope of "leaky_relu" (jax.nn.leaky_relu's default)


class Activation(NamedTuple):
    """An elementwise activation.

    Attributes:
        name: the name used in :class:`fnbp.MLP`.
        f: ``f(z) -> a``, elementwise.
        df: ``df(z, a) -> f′(z)``, elementwise, from the pre-activation ``z`` and ``a = f(z)``.
        region: for piecewise-linear activations, ``region(z)`` gives the linear piece each
            ``z`` lies on (``None`` for smooth activations). :func:`fnbp.crosscheck` uses it to
            detect a finite-difference step that crosses a kink.
    """

    name: str
    f: Callable[[Array], Array]
    df: Callable[[Array, Array], Array]
    region: Callable[[Array], Array] | None = None


def _relu(z):
    return jnp.where(z > 0, z, jnp.zeros_like(z))


def _leaky_relu(z):
    return jnp.where(z >= 0, z, LEAKY_RELU_SLOPE * z)


def _gelu(z):
    # Exact GELU, z·Φ(z) (the paper's definition and PyTorch's default; jax.nn.gelu defaults
    # to the tanh approximation).
    return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))


def _gelu_prime(z):
    # d/dz z·Φ(z) = Φ(z) + z·φ(z)
    phi = jnp.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return 0.5 * (1.0 + erf(z / math.sqrt(2.0))) + z * phi


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in [
        # f(z) = max(z, 0);            f′ = 1[a > 0]
        Activation("relu", _relu, lambda z, a: (a > 0).astype(a.dtype), lambda z: z > 0),
        # f(z) = z if z ≥ 0 else s·z;   f′ = 1 or s
        Activation(
            "leaky_relu",
            _leaky_relu,
            lambda z, a: jnp.where(z >= 0, 1.0, LEAKY_RELU_SLOPE).astype(z.dtype),
            lambda z: z >= 0,
        ),
        # f(z) = tanh z;               f′ = 1 − a²
        Activation("tanh", jnp.tanh, lambda z, a: 1 - a * a),
        # f(z) = 1/(1 + e^(−z));       f′ = a(1 − a)
        Activation("sigmoid", jax.nn.sigmoid, lambda z, a: a * (1 - a)),
        # f(z) = z·Φ(z);               f′ = Φ(z) + z·φ(z)
        Activation("gelu", _gelu, lambda z, a: _gelu_prime(z)),
        # f(z) = log(1 + e^z);         f′ = σ(z)
        Activation("softplus", jax.nn.softplus, lambda z, a: jax.nn.sigmoid(z)),
        # f(z) = z·σ(z);               f′ = σ(z)(1 + z(1 − σ(z)))
        Activation(
            "silu",
            jax.nn.silu,
            lambda z, a: jax.nn.sigmoid(z) * (1 + z * (1 - jax.nn.sigmoid(z))),
        ),
        # f(z) = z;                    f′ = 1
        Activation("identity", lambda z: z, lambda z, a: jnp.ones_like(z)),
    ]
}
"""Every activation by name: ``relu``, ``tanh``, ``sigmoid``, … each an :class:`Activation` ``(f, f′)`` pair."""


def get_activation(name: str) -> Activation:
    """Look up an activation by name.

    Raises:
        ValueError: if ``name`` is not one of :data:`ACTIVATIONS`.
    """
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        ) from None
