"""Flax interop: the same network as a Flax Linen module, and back.

fnbp keeps ``W⁽ˡ⁾`` as ``(fan_out, fan_in)`` and computes ``z = a Wᵀ + b``; ``flax.linen.Dense``
keeps ``kernel = Wᵀ`` of shape ``(fan_in, fan_out)`` and computes ``z = a·kernel + bias``.
:func:`to_flax` gives a Linen module (Linen: a module plus a separate variables dict, as
functional as fnbp) with its variables; ``module.apply(variables, x)`` equals
:func:`fnbp.forward`. ``jax.grad`` through it is a third reference for the hand-written
gradients, independent of fnbp's forward code.

An :class:`fnbp.MLP` becomes a :class:`FlaxMLP`; an :class:`fnbp.Net` a :class:`FlaxNet`, each
kind of :mod:`fnbp.layers` its Linen counterpart, named ``layer1 … layerN`` by its 1-based
index (a residual branch's layers likewise inside their block):

==============  ==============================================  ================================
fnbp kind       Linen                                           variables
==============  ==============================================  ================================
``Dense``       ``nn.Dense(features, use_bias)``                ``kernel = Wᵀ``, ``bias = b``
``Conv``        ``nn.Conv(features, kernel_size, strides,       ``kernel = W`` (the same
                padding)``                                      ``(*k, C_in, C_out)``), ``bias``
``MaxPool``     ``nn.max_pool(window, strides, "VALID")``       –
``AvgPool``     ``nn.avg_pool(window, strides, "VALID")``       –
``BatchNorm``   ``nn.BatchNorm(use_running_average=not train,   ``scale = γ``, ``bias = β``;
                momentum, epsilon, use_fast_variance=False)``   batch_stats ``mean``, ``var``
``LayerNorm``   ``nn.LayerNorm(epsilon, use_fast_variance=      ``scale = γ``, ``bias = β``
                False)``
``Dropout``     ``m ⊙ x / q`` with a mask passed in (or         –
                ``nn.Dropout`` drawing its own)
``Residual``    :class:`FlaxResidual`: ``skip + α·F(x)``        the branch's, ``alpha`` when
                                                                learned, ``projection.kernel =
                                                                Pᵀ`` (``nn.Dense``, no bias)
``Flatten``,    ``x.reshape``                                   –
``Reshape``
``Activation``  the identity (then ``f``, as after every kind)  –
==============  ==============================================  ================================

Each layer's ``activation`` (from :mod:`fnbp.activations`) follows its op. Conv padding goes to
Flax as given: ``"SAME"`` is padded by Flax's own rule, a check of fnbp's.

Flax draws its own Bernoulli masks, so to reproduce an fnbp train-mode step exactly the
module takes fnbp's masks::

    masks = fnbp.model.draw_batch_masks(net, key, batch, True)      # fnbp.backprop(key=key)'s
    z, new = module.apply(variables, x, train=True, masks=masks, mutable=["batch_stats"])

and ``new["batch_stats"]`` are the running statistics ``fnbp.backprop(...).state`` returns.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from fnbp.activations import get_activation
from fnbp.layers import (
    Activation,
    AvgPool,
    BatchNorm,
    Conv,
    Dense,
    Dropout,
    Flatten,
    LayerNorm,
    MaxPool,
    Reshape,
    Residual,
)
from fnbp.model import MLP, Params, check_mode, check_params, init_state
from fnbp.net import Net


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


# ----------------------------------------------------------------------------------------------
# The Linen modules of a Net.


def _layer_name(i: int) -> str:
    return f"layer{i + 1}"


def _masks_for(layers, masks, where: str) -> list:
    """``masks`` checked to be a list aligned with ``layers``."""
    if not isinstance(masks, (list, tuple)) or len(masks) != len(layers):
        got = len(masks) if isinstance(masks, (list, tuple)) else type(masks).__name__
        raise ValueError(
            f"{where}masks must be a list aligned with the {len(layers)} layers (from "
            f"fnbp.model.draw_batch_masks), got {got}"
        )
    return list(masks)


def _dense(layer, name, x, train, mask):
    return nn.Dense(layer.features, use_bias=layer.use_bias, name=name, param_dtype=x.dtype)(x)


def _conv(layer, name, x, train, mask):
    return nn.Conv(
        layer.features, layer.kernel_size, strides=layer.strides, padding=layer.padding,
        use_bias=layer.use_bias, name=name, param_dtype=x.dtype,
    )(x)  # fmt: skip


def _batch_norm(layer, name, x, train, mask):
    return nn.BatchNorm(
        use_running_average=not train, axis=-1, momentum=layer.momentum, epsilon=layer.eps,
        use_fast_variance=False, name=name, param_dtype=x.dtype,
    )(x)  # fmt: skip


def _layer_norm(layer, name, x, train, mask):
    ln = nn.LayerNorm(epsilon=layer.eps, use_fast_variance=False, name=name, param_dtype=x.dtype)
    return ln(x)


_DRAW = object()  # the mask of a train-mode call without masks: nn.Dropout draws its own


def _dropout(layer, name, x, train, mask):
    if not train:
        return x
    if mask is _DRAW:  # Flax's own Bernoulli (needs rngs={"dropout": key})
        return nn.Dropout(layer.rate, deterministic=False, name=name)(x)
    return x if mask is None else jnp.where(mask, x / (1.0 - layer.rate), 0)  # m ⊙ x / q


def _residual(layer, name, x, train, mask):
    return FlaxResidual(layer, name=name)(x, train, None if mask is _DRAW else mask)


# kind -> (layer, name, x, train, mask) -> z, its Linen counterpart created in the calling module
_LINEN = {
    Dense: _dense,
    Conv: _conv,
    MaxPool: lambda l, n, x, t, m: nn.max_pool(x, l.window, strides=l.steps, padding="VALID"),
    AvgPool: lambda l, n, x, t, m: nn.avg_pool(x, l.window, strides=l.steps, padding="VALID"),
    BatchNorm: _batch_norm,
    LayerNorm: _layer_norm,
    Dropout: _dropout,
    Residual: _residual,
    Flatten: lambda l, n, x, t, m: x.reshape(x.shape[0], -1),
    Reshape: lambda l, n, x, t, m: x.reshape(x.shape[0], *l.shape),
    Activation: lambda l, n, x, t, m: x,
}


def _apply_sequence(layers, x, train: bool, masks, where: str = ""):
    """``a`` of the last layer: each layer's ``z = op(x)`` then its activation ``a = f(z)``."""
    masks = [_DRAW] * len(layers) if masks is None else _masks_for(layers, masks, where)
    for i, (layer, mask) in enumerate(zip(layers, masks, strict=True)):
        op = _LINEN.get(type(layer))
        if op is None:
            raise TypeError(f"{where}layer {i + 1} ({layer.kind}): no Flax counterpart")
        x = get_activation(layer.activation).f(op(layer, _layer_name(i), x, train, mask))
    return x


class FlaxResidual(nn.Module):
    """``z = x + α·F(x)`` (``x Pᵀ + α·F(x)`` when ``F`` changes the last axis), ``F`` the
    block's branch; a learned α is the param ``alpha``, ``P`` the kernel of a bias-free
    ``nn.Dense`` named ``projection`` (``kernel = Pᵀ``)."""

    block: Residual

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, masks=None) -> jax.Array:
        F = _apply_sequence(self.block.branch, x, train, masks, f"{self.name} branch ")
        alpha = self.block.alpha
        if self.block.learn_alpha:
            alpha = self.param("alpha", lambda key, dtype: jnp.asarray(alpha, dtype), x.dtype)
        skip = x
        if F.shape != x.shape:  # x Pᵀ
            skip = nn.Dense(F.shape[-1], use_bias=False, name="projection", param_dtype=x.dtype)(x)
        return skip + alpha * F


class FlaxNet(nn.Module):
    """An :class:`fnbp.Net` as a Linen module (see the module docstring for the kinds).

    Call it as ``module.apply(variables, x, train=False, masks=None)``:

    Arguments:
        x: inputs ``(batch, *net.input_shape)``.
        train: BatchNorm uses the batch's statistics (pass ``mutable=["batch_stats"]`` to get
            the new running ones) and dropout drops; eval mode otherwise.
        masks: fnbp's dropout masks (``fnbp.model.draw_batch_masks(net, key, batch, True)``),
            used as they are; ``None`` in train mode lets ``nn.Dropout`` draw its own (pass
            ``rngs={"dropout": key}``).

    Returns:
        The output ``a⁽ᴸ⁾`` (the logits for the cross-entropies), ``(batch, net.output_size)``;
        the loss is not part of the module.
    """

    net: Net

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, masks=None) -> jax.Array:
        return _apply_sequence(self.net.layers, x, train, masks)


# ----------------------------------------------------------------------------------------------
# fnbp params and state <-> Flax variables.


def _layer_to_flax(layer, p: dict, s: dict) -> tuple[dict, dict]:
    """One layer's ``(params, batch_stats)`` entries in Flax's names (``{}`` when none)."""
    if isinstance(layer, Dense):
        return {"kernel": p["W"].T, **({"bias": p["b"]} if "b" in p else {})}, {}
    if isinstance(layer, Conv):
        return {"kernel": p["W"], **({"bias": p["b"]} if "b" in p else {})}, {}
    if isinstance(layer, BatchNorm):
        return {"scale": p["gamma"], "bias": p["beta"]}, {"mean": s["mean"], "var": s["var"]}
    if isinstance(layer, LayerNorm):
        return {"scale": p["gamma"], "bias": p["beta"]}, {}
    if isinstance(layer, Residual):
        params, stats = _sequence_to_flax(layer.branch, p["branch"], s["branch"])
        if "alpha" in p:
            params["alpha"] = p["alpha"]
        if "P" in p:
            params["projection"] = {"kernel": p["P"].T}
        return params, stats
    return {}, {}


def _sequence_to_flax(layers, params, state) -> tuple[dict, dict]:
    out_p, out_s = {}, {}
    for i, (layer, p, s) in enumerate(zip(layers, params, state, strict=True)):
        fp, fs = _layer_to_flax(layer, p, s)
        if fp:
            out_p[_layer_name(i)] = fp
        if fs:
            out_s[_layer_name(i)] = fs
    return out_p, out_s


def _entry(tree: Mapping, key: str, where: str):
    if not isinstance(tree, Mapping) or key not in tree:
        have = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
        raise ValueError(f"variables lack {where}{key!r} (found {have})")
    return tree[key]


def _layer_from_flax(layer, in_shape, fp: Mapping, fs: Mapping, where: str) -> tuple[dict, dict]:
    """The inverse of :func:`_layer_to_flax`: one layer's fnbp ``(params, state)``."""
    asarray = jnp.asarray
    if isinstance(layer, (Dense, Conv)):
        kernel = asarray(_entry(fp, "kernel", where))
        p = {"W": kernel.T if isinstance(layer, Dense) else kernel}
        if layer.use_bias:
            p["b"] = asarray(_entry(fp, "bias", where))
        return p, {}
    if isinstance(layer, (BatchNorm, LayerNorm)):
        p = {
            "gamma": asarray(_entry(fp, "scale", where)),
            "beta": asarray(_entry(fp, "bias", where)),
        }
        if isinstance(layer, LayerNorm):
            return p, {}
        return p, {
            "mean": asarray(_entry(fs, "mean", where)),
            "var": asarray(_entry(fs, "var", where)),
        }
    if isinstance(layer, Residual):
        in_shapes = layer.shapes(in_shape)[0]
        branch_p, branch_s = _sequence_from_flax(layer.branch, in_shapes, fp, fs, where)
        p = {"branch": branch_p}
        if layer.learn_alpha:
            p["alpha"] = asarray(_entry(fp, "alpha", where))
        if layer.projects(in_shape):
            p["P"] = asarray(_entry(fp["projection"], "kernel", f"{where}'projection' ")).T
        return p, {"branch": branch_s}
    return {}, {}


def _sequence_from_flax(layers, in_shapes, fparams: Mapping, fstats: Mapping, prefix: str = ""):
    params, state = [], []
    for i, (layer, shape) in enumerate(zip(layers, in_shapes, strict=True)):
        name = _layer_name(i)
        where = f"{prefix}{name!r} ({layer.kind}) "
        fp, fs = fparams.get(name, {}), fstats.get(name, {})
        p, s = _layer_from_flax(layer, shape, fp, fs, where)
        params.append(p)
        state.append(s)
    return params, state


# ----------------------------------------------------------------------------------------------
# Public API.


def to_flax(params: Params, model, state=None) -> tuple[nn.Module, dict]:
    """``(module, variables)`` with ``module.apply(variables, x) == fnbp.forward(params, model,
    x, state=state)``.

    Arguments:
        params: from :func:`fnbp.init_params` or training.
        model: an :class:`fnbp.MLP` (gives a :class:`FlaxMLP`) or an :class:`fnbp.Net` (gives
            a :class:`FlaxNet`).
        state: a net's state (BatchNorm running statistics); ``None`` takes
            :func:`fnbp.init_state` (mean 0, var 1), as Flax's own init does. An MLP has none.

    Returns:
        ``(module, variables)``: ``variables = {"params": {...}}``, plus ``"batch_stats"`` for
        a net with BatchNorm, keyed ``layer1 … layerN`` by layer (only layers that have params
        or statistics appear, as in ``module.init``'s tree). The arrays are fnbp's (``W``
        transposed for dense kernels and projections), dtypes unchanged. The loss is not part
        of the module: apply ``model.loss`` to its outputs yourself.

    Raises:
        ValueError, TypeError: for params or state that do not fit the model.
    """
    check_params(params, model)
    if isinstance(model, MLP):
        check_mode(model, state=state, train=False, key=None, what="to_flax")
        module = FlaxMLP(model.sizes, model.activation, model.output_activation)
        variables = {
            "params": {
                f"layer{l}": {"kernel": jnp.asarray(p["W"]).T, "bias": jnp.asarray(p["b"])}
                for l, p in enumerate(params, start=1)
            }
        }
        return module, variables
    state = init_state(model) if state is None else state
    check_mode(model, state=state, train=False, key=None, what="to_flax")
    params, state = jax.tree.map(jnp.asarray, (params, state))
    flax_params, stats = _sequence_to_flax(model.layers, params, state)
    variables = {"params": flax_params}
    if model.needs_state:
        variables["batch_stats"] = stats
    return FlaxNet(model), variables


def from_flax(module: nn.Module, variables: Mapping, loss: str | None = None):
    """The inverse of :func:`to_flax`.

    Arguments:
        module: a :class:`FlaxMLP` or :class:`FlaxNet`.
        variables: its variables (from :func:`to_flax`, ``module.init`` or Flax training).
        loss: the loss of the returned model; ``None``: ``"softmax_cross_entropy"`` for an MLP,
            the module's net's own loss for a :class:`FlaxNet`.

    Returns:
        ``(params, model)`` for a :class:`FlaxMLP`; ``(params, state, net)`` for a
        :class:`FlaxNet` (``state`` as :func:`fnbp.init_state` lays it out, filled from
        ``variables["batch_stats"]``).

    Raises:
        TypeError: if ``module`` is neither.
        ValueError: if the variables do not match the module's layers (naming the entry).
    """
    if isinstance(module, FlaxNet):
        return _net_from_flax(module, variables, loss)
    if not isinstance(module, FlaxMLP):
        raise TypeError(
            "module must be an fnbp FlaxMLP or FlaxNet (from fnbp.to_flax), got "
            f"{type(module).__name__}"
        )
    loss = "softmax_cross_entropy" if loss is None else loss
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


def _net_from_flax(module: FlaxNet, variables, loss):
    net = module.net
    if loss is not None and loss != net.loss:
        net = Net(net.input_shape, net.layers, loss)
    if not isinstance(variables, Mapping) or not isinstance(variables.get("params"), Mapping):
        raise ValueError(
            "variables must be a dict like {'params': {'layer1': {'kernel', 'bias'}, …}, "
            "'batch_stats': {…}}"
        )
    stats = variables.get("batch_stats", {})
    if net.needs_state and "batch_stats" not in variables:
        raise ValueError(
            f"variables lack 'batch_stats': the net's {net.find(lambda l: l.needs_state)} "
            "keeps running statistics"
        )
    params, state = _sequence_from_flax(net.layers, net.in_shapes, variables["params"], stats)
    check_params(params, net, name="params from variables")
    check_mode(net, state=state, train=False, key=None, what="from_flax")
    return params, state, net
