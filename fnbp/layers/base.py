"""The layer protocol: what every layer kind provides, so the engine never branches on a kind.

A layer kind is a small frozen dataclass (a static pytree: hashable, no arrays) carrying its
hyper-parameters and an ``activation`` applied to its output. It computes
``z = op(θ, x)`` and ``a = f(z)`` and implements:

=====================================  =========================================================
method                                 returns
=====================================  =========================================================
``out_shape(in_shape)``                the shape of ``z`` per example; raises ``ValueError``
``init(key, in_shape, scheme, dtype)`` its params dict (``{}`` when it has none)
``init_state(in_shape)``               its state dict (``{}`` unless it keeps statistics)
``forward(p, s, x, mask, train)``      ``(z, cache, new_state)``
``backward(p, x, cache, δ, l2)``       ``(grads, ∂L/∂x, inner)``, δ = ∂L/∂z; ``inner`` is
                                       ``None`` or the deltas of a nested sequence
``weights(p)``                         the leaves L2 decays and ``grad_norms`` measures
``regions(cache)``                     kink indicators besides the activation's (max-pool)
``example_grads(p, x, cache, δ)``      each own leaf's per-example gradients, as an array
                                       ``(batch, *leaf)`` or an :class:`Outer` (δ per example)
``draw_mask(key, in_shape, batch)``    dropout masks (``None`` for every other kind)
=====================================  =========================================================
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax

from fnbp.activations import Activation, get_activation


class Outer(NamedTuple):
    """Per-example gradients of a weight leaf, kept factored: example ``i``'s gradient is

        gᵢ = Σₜ out[i, t] ⊗ inp[i, t]          an ``(n_out, n_in)`` matrix

    summed over the ``T`` positions ``t`` a weight is shared across (1 for a dense layer, the
    output positions of a convolution), reshaped to the leaf's shape (transposed first when
    ``transposed``: a convolution stores its kernel as ``(*k, C_in, C_out)``). Forming gᵢ for
    every example would cost ``batch × leaf`` memory; the factors cost ``batch·T·(n_out + n_in)``.

    Attributes:
        out: ``(batch, T, n_out)``, the per-example error signal (δ of the examples' own losses).
        inp: ``(batch, T, n_in)``, what the weight multiplies (the layer's input, or its
            windows for a convolution).
        transposed: the leaf is laid out as ``(n_in, n_out)``.
    """

    out: jax.Array
    inp: jax.Array
    transposed: bool = False


class LayerError(ValueError):
    """A layer spec that does not fit (raised by a kind's checks; :class:`fnbp.Net` adds the
    layer's index and kind to the message)."""


def positive_int(name: str, v) -> int:
    """``v`` if it is an int ≥ 1 (not a bool); a :class:`LayerError` naming ``name`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise LayerError(f"{name} must be a positive int, got {v!r}")
    return v


def int_tuple(name: str, v, length: int | None = None) -> tuple[int, ...]:
    """``v`` (an int or a sequence of ints, each ≥ 1) as a tuple, of ``length`` entries."""
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v,) * (length or 1)
    if (not isinstance(v, (tuple, list)) or not v
            or any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in v)):  # fmt: skip
        raise LayerError(f"{name} must be a positive int or a tuple of them, got {v!r}")
    v = tuple(v)
    if length is not None and len(v) != length:
        raise LayerError(f"{name} must have {length} entries, got {v!r}")
    return v


class Layer:
    """Base of every layer kind: defaults for the protocol (see the module docstring)."""

    kind: ClassVar[str] = ""
    activation: str = "identity"

    def __post_init__(self):
        self.normalize()

    def normalize(self) -> None:
        """Turn lists into tuples where a field wants one (never raises: :meth:`validate`
        judges the result, when the layer joins an :class:`fnbp.Net`)."""

    def validate(self) -> None:
        """Raise :class:`LayerError` for a bad activation name or bad fields."""
        try:
            get_activation(self.activation)
        except ValueError as e:
            raise LayerError(str(e)) from None
        self.check()

    def check(self) -> None:
        """Raise :class:`LayerError` for bad fields (each kind checks its own)."""

    def _set(self, name, value):  # normalise a field of the frozen dataclass
        object.__setattr__(self, name, value)

    @property
    def act(self) -> Activation:
        return get_activation(self.activation)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return in_shape

    def init(self, key, in_shape, scheme, dtype) -> dict:
        return {}

    def init_state(self, in_shape) -> dict:
        return {}

    def draw_mask(self, key, in_shape, batch):
        return None

    def no_mask(self):
        return None

    def weights(self, p: dict) -> list:
        return []

    def regions(self, x, cache) -> list:
        return []

    def example_grads(self, p: dict, x, cache, delta) -> dict:
        """Each own leaf's (not a branch's) per-example gradient of the examples' own losses,
        from the layer's input ``x``, its cache and ``delta`` = ∂ℓᵢ/∂z (one row per example,
        no 1/B): an :class:`Outer` for a weight matrix, a ``(batch, *leaf)`` array for a small
        leaf. L2 is not included. ``{}`` for a kind without params."""
        return {}

    @property
    def needs_state(self) -> bool:
        """It reads and updates running statistics (BatchNorm)."""
        return False

    @property
    def needs_train(self) -> bool:
        """Its output depends on the mode (BatchNorm, Dropout)."""
        return False

    @property
    def couples_examples(self) -> bool:
        """In train mode one example's output depends on the others (BatchNorm)."""
        return False

    def sublayers(self) -> tuple:
        """The layers nested inside (a residual branch); empty for every other kind."""
        return ()

    # JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        out = {"kind": self.kind}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


def sequence_shapes(layers, in_shape) -> tuple[tuple, tuple]:
    """Check every layer of a sequence and infer its per-example shapes.

    Returns ``(in_shapes, out_shape)``: the input shape of each layer and the last one's output.

    Raises:
        LayerError: naming the layer (1-based, as ``layer 3 (conv)``), what it expected and what
            came.
    """
    if not isinstance(layers, tuple) or not layers:
        raise LayerError(
            f"layers must be a non-empty sequence of fnbp.layers kinds, got {layers!r}"
        )
    shapes = []
    for i, layer in enumerate(layers, start=1):
        if not isinstance(layer, Layer):
            raise LayerError(
                f"layer {i}: expected an fnbp.layers kind (Dense, Conv, BatchNorm, …), got "
                f"{type(layer).__name__}"
            )
        shapes.append(in_shape)
        try:
            layer.validate()
            in_shape = layer.out_shape(in_shape)
        except LayerError as e:
            raise LayerError(f"layer {i} ({layer.kind}): {e}") from None
    return tuple(shapes), in_shape
