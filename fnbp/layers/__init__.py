"""Layer kinds: each a small immutable spec whose forward and local backward rule sit side by
side in the module of its kind (:mod:`fnbp.layers.base` states the protocol).

================  ======================  ==========================================
kind              module                  params
================  ======================  ==========================================
``Dense``         :mod:`.dense`           ``{"W": (out, in), "b": (out,)}``
``Activation``    :mod:`.dense`           –
``Conv``          :mod:`.conv`            ``{"W": (*kernel, C_in, C_out), "b": (C_out,)}``
``MaxPool``       :mod:`.pool`            –
``AvgPool``       :mod:`.pool`            –
``BatchNorm``     :mod:`.norm`            ``{"gamma", "beta"}`` (C,); state ``{"mean", "var"}``
``LayerNorm``     :mod:`.norm`            ``{"gamma", "beta"}`` (C,)
``Dropout``       :mod:`.dropout`         –
``Residual``      :mod:`.residual`        ``{"branch": [...], "alpha"?, "P"?}``
``Flatten``       :mod:`.reshape`         –
``Reshape``       :mod:`.reshape`         –
================  ======================  ==========================================
"""

from __future__ import annotations

import dataclasses

from fnbp.layers.base import Layer, LayerError, sequence_shapes
from fnbp.layers.conv import Conv
from fnbp.layers.dense import Activation, Dense
from fnbp.layers.dropout import Dropout
from fnbp.layers.norm import BatchNorm, LayerNorm
from fnbp.layers.pool import AvgPool, MaxPool
from fnbp.layers.reshape import Flatten, Reshape
from fnbp.layers.residual import Residual

KINDS: dict[str, type[Layer]] = {
    cls.kind: cls
    for cls in (
        Dense,
        Activation,
        Conv,
        MaxPool,
        AvgPool,
        BatchNorm,
        LayerNorm,
        Dropout,
        Residual,
        Flatten,
        Reshape,
    )  # fmt: skip
}
"""Every layer class by its ``kind``, the name its JSON form carries (:func:`from_dict`)."""


def from_dict(d, where: str = "layer") -> Layer:
    """A layer from its JSON form ``{"kind": ..., **fields}`` (the inverse of ``to_dict``).

    Raises:
        LayerError: naming ``where`` (e.g. ``layer 3``) for an unknown kind or field.
    """
    if not isinstance(d, dict) or "kind" not in d:
        raise LayerError(f"{where}: expected an object with a 'kind', got {d!r}")
    kind = d["kind"]
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise LayerError(f"{where}: unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    fields = {k: v for k, v in d.items() if k != "kind"}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise LayerError(
            f"{where} ({kind}): unknown field {unknown[0]!r}; expected some of {sorted(names)}"
        )
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in fields
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise LayerError(
            f"{where} ({kind}): missing field {missing[0]!r}; a {kind} needs {missing}"
        )
    if cls is Residual and isinstance(fields.get("branch"), list):
        fields["branch"] = tuple(
            from_dict(b, f"{where} ({kind}) branch layer {j}")
            for j, b in enumerate(fields["branch"], start=1)
        )
    try:
        return cls(**fields)
    except TypeError as e:
        raise LayerError(f"{where} ({kind}): {e}") from None


__all__ = [
    "KINDS",
    "Activation",
    "AvgPool",
    "BatchNorm",
    "Conv",
    "Dense",
    "Dropout",
    "Flatten",
    "Layer",
    "LayerError",
    "LayerNorm",
    "MaxPool",
    "Reshape",
    "Residual",
    "from_dict",
    "sequence_shapes",
]
