"""Flax interop: the same network as a Flax Linen module, and back.

fnbp keeps ``W⁽ˡ⁾`` as ``(fan_out, fan_in)`` and computes ``z = a Wᵀ + b``; ``flax.linen.Dense``
keeps ``kernel = Wᵀ`` of shape ``(fan_in, fan_out)`` and computes ``z = a·kernel + bias``.
:func:`to_flax` gives a :class:`FlaxMLP` Linen module (Linen: a module plus a separate
variables dict, as functional as fnbp) with its variables; ``module.apply(variables, x)``
equals :func:`fnbp.forward`. ``jax.grad`` through it is a third reference for the
hand-written gradients, independent of fnbp's forward code.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fnbp.activations import get_activation
from fnbp.model import MLP, Params, check_params


class FlaxMLP(nn.Module):
    """A stack of ``nn.Dense`` layers named ``layer1 … layerL`` with fnbp's activations."""

    sizes: tuple[int, ...]
    activation: str = "relu"
    output_activation: str = "identity"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        L = len(self.sizes) - 1
        for l, width in enumerate(self.sizes[1:], start=1):
            x = nn.Dense(width, name=f"layer{l}", param_dtype=x.dtype)(x)
            x = get_activation(self.output_activation if l == L else self.activation).f(x)
        return x


def to_flax(params: Params, model: MLP) -> tuple[FlaxMLP, dict]:
    """``(module, variables)`` with ``module.apply(variables, x) == fnbp.forward(params, model, x)``.

    The loss is not part of the module: apply ``model.loss`` to its outputs yourself.
    """
    check_params(params, model)
    module = FlaxMLP(model.sizes, model.activation, model.output_activation)
    variables = {
        "params": {
            f"layer{l}": {"kernel": jnp.asarray(p["W"]).T, "bias": jnp.asarray(p["b"])}
            for l, p in enumerate(params, start=1)
        }
    }
    return module, variables


def from_flax(
    module: FlaxMLP, variables: dict, loss: str = "softmax_cross_entropy"
) -> tuple[Params, MLP]:
    """``(params, model)`` from a :class:`FlaxMLP` and its variables (the inverse of :func:`to_flax`).

    Raises:
        TypeError: if ``module`` is not a :class:`FlaxMLP`.
        ValueError: if the variables do not match the module's sizes.
    """
    if not isinstance(module, FlaxMLP):
        raise TypeError(
            f"module must be an fnbp FlaxMLP (from fnbp.to_flax), got {type(module).__name__}"
        )
    model = MLP(module.sizes, module.activation, loss, module.output_activation)
    tree = variables.get("params", variables) if isinstance(variables, dict) else None
    if not isinstance(tree, dict):
        raise ValueError(
            "variables must be a dict like {'params': {'layer1': {'kernel', 'bias'}, …}}"
        )
    try:
        params = [
            {
                "W": jnp.asarray(tree[f"layer{l}"]["kernel"]).T,
                "b": jnp.asarray(tree[f"layer{l}"]["bias"]),
            }
            for l in range(1, model.num_layers + 1)
        ]
    except (KeyError, TypeError) as e:
        raise ValueError(f"variables lack {e} for a FlaxMLP of sizes {model.sizes}") from None
    check_params(params, model, name="params from variables")
    return params, model
