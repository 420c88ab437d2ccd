"""The network spec: a sequence of layer specs with its input shape and its loss.

``Net(input_shape, layers, loss)`` is immutable and hashable (a static pytree, like
:class:`fnbp.MLP`), so it passes through ``jax.jit`` as an ordinary argument. Shapes are
inferred and checked when it is built; inputs are batch-first and channels-last: ``x`` has
shape ``(batch, *input_shape)``. The last layer's activation is the output activation ``g``.

Examples::

    Net(64, [Dense(128, "relu"), Dense(10)])                               # an MLP
    Net(64, [Reshape((8, 8, 1)), Conv(16, (3, 3), activation="relu"), MaxPool((2, 2)),
             Flatten(), Dense(10)])                                        # a CNN
    Net(64, [Dense(128), *[Residual((Dense(128, "relu"), Dense(128)), alpha=0.1)] * 30,
             Dense(10)])                                                   # a ResNet
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from fnbp.layers import from_dict
from fnbp.layers.base import LayerError, sequence_shapes
from fnbp.losses import Loss, get_loss

FORMAT = "net"


def find_layer(layers, predicate, prefix: str = "") -> str | None:
    """The first layer (nested branches included) for which ``predicate`` holds, named like
    ``layer 3 (batch_norm)`` or ``layer 2 (residual) branch layer 1 (dropout)``; ``None``."""
    for i, layer in enumerate(layers, start=1):
        name = f"{prefix}layer {i} ({layer.kind})"
        if layer.sublayers():
            inner = find_layer(layer.sublayers(), predicate, f"{name} branch ")
            if inner is not None:
                return inner
        elif predicate(layer):
            return name
    return None


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Net:
    """A network: ``layers`` applied in order to inputs of per-example shape ``input_shape``.

    Arguments:
        input_shape: an int (vector inputs) or a tuple, the shape of one example.
        layers: a sequence of :mod:`fnbp.layers` kinds; the last must output a vector.
        loss: a name in :data:`fnbp.LOSSES`.

    Raises:
        ValueError: naming the layer (1-based) and its kind, for bad fields, shapes that do
            not fit, a last layer that does not output a vector, or a squashing last
            activation under a cross-entropy.
    """

    input_shape: tuple[int, ...]
    layers: tuple
    loss: str = "softmax_cross_entropy"
    in_shapes: tuple = dataclasses.field(init=False, repr=False, compare=False)
    output_shape: tuple = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        shape = self.input_shape
        if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
            shape = (int(shape),)
        if isinstance(shape, list):
            shape = tuple(shape)
        if (not isinstance(shape, tuple) or not shape or any(
                isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in shape)):  # fmt: skip
            raise ValueError(
                f"Net: input_shape must be a positive int or a tuple of them, got {self.input_shape!r}"
            )
        object.__setattr__(self, "input_shape", tuple(int(n) for n in shape))
        layers = tuple(self.layers) if isinstance(self.layers, (list, tuple)) else self.layers
        object.__setattr__(self, "layers", layers)
        get_loss(self.loss)
        try:
            in_shapes, out = sequence_shapes(layers, self.input_shape)
        except LayerError as e:
            raise LayerError(f"Net: {e}") from None
        object.__setattr__(self, "in_shapes", in_shapes)
        object.__setattr__(self, "output_shape", out)
        last = f"layer {len(layers)} ({layers[-1].kind})"
        if len(out) != 1:
            raise LayerError(
                f"Net: {last} outputs per-example shape {out}, but the loss needs a vector "
                "(batch, n): end with Flatten() and Dense(n)"
            )
        if self.loss_fn.from_logits and layers[-1].activation != "identity":
            raise LayerError(
                f"Net: loss={self.loss!r} applies its own softmax/sigmoid to the logits, so "
                f"{last} must have activation 'identity', got {layers[-1].activation!r}"
            )

    @property
    def loss_fn(self) -> Loss:
        return get_loss(self.loss)

    @property
    def output_size(self) -> int:
        return self.output_shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_params(self) -> int:
        from fnbp.initializers import init_layers

        shapes = jax.eval_shape(
            lambda: init_layers(
                jax.random.key(0), self.layers, self.in_shapes, "he_normal", jnp.float32
            )
        )
        return sum(math.prod(v.shape) for v in jax.tree.leaves(shapes))

    def find(self, predicate) -> str | None:
        """See :func:`find_layer`."""
        return find_layer(self.layers, predicate)

    @property
    def needs_train(self) -> bool:
        return any(layer.needs_train for layer in self.layers)

    @property
    def needs_state(self) -> bool:
        return any(layer.needs_state for layer in self.layers)

    @property
    def couples_examples(self) -> bool:
        return any(layer.couples_examples for layer in self.layers)

    # JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "kind": FORMAT,
            "input_shape": list(self.input_shape),
            "loss": self.loss,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def to_json(self, indent: int | None = None) -> str:
        """The JSON form of the spec; :meth:`from_json` reads it back."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d) -> Net:
        if not isinstance(d, dict) or d.get("kind") != FORMAT:
            raise ValueError(
                f'a net spec must be an object with "kind": "{FORMAT}", got {str(d)[:80]!r}'
            )
        unknown = sorted(set(d) - {"kind", "input_shape", "layers", "loss"})
        if unknown:
            raise ValueError(f"net spec: unknown field {unknown[0]!r}")
        if not isinstance(d.get("layers"), list) or "input_shape" not in d:
            raise ValueError('net spec: needs "input_shape" and a list of "layers"')
        layers = tuple(
            from_dict(layer, f"layer {i}") for i, layer in enumerate(d["layers"], start=1)
        )
        return cls(d["input_shape"], layers, d.get("loss", "softmax_cross_entropy"))

    @classmethod
    def from_json(cls, text: str) -> Net:
        """A :class:`Net` from :meth:`to_json`'s text.

        Raises:
            ValueError: for text that is not JSON, an unknown kind or field (naming the
                layer), or a spec that does not build.
        """
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"net spec is not valid JSON ({e})") from None
        return cls.from_dict(d)
