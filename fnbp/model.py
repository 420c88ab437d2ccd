"""The model: an immutable MLP spec, its forward pass and its loss, as pure functions.

A network is a spec (:class:`MLP`: sizes and names, no arrays) plus a parameter pytree: a list
with one ``{"W": (fan_out, fan_in), "b": (fan_out,)}`` dict per layer. Layer ``l = 1..L``
computes::

    z⁽ˡ⁾ = W⁽ˡ⁾ a⁽ˡ⁻¹⁾ + b⁽ˡ⁾,    a⁽ˡ⁾ = f(z⁽ˡ⁾),    a⁽⁰⁾ = x

with ``f`` the hidden activation for ``l < L`` and the output activation ``g`` for ``l = L``.
Batches are rows: ``x`` has shape ``(batch, fan_in)``, so in code ``z = a @ W.T + b``.

Public functions validate their arguments in Python before tracing (shapes, names, label
ranges when the labels are concrete) and raise ``ValueError``/``TypeError`` naming the
argument; the jitted internals carry no checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fnbp.activations import Activation, get_activation
from fnbp.losses import Loss, get_loss, to_targets

Array = jax.Array
Params = list  # list[dict[str, Array]]: one {"W": (fan_out, fan_in), "b": (fan_out,)} per layer


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class MLP:
    """An immutable, hashable multilayer-perceptron spec (no arrays).

    It is a static pytree (no leaves), so it passes through ``jax.jit``, ``jax.vmap`` and
    ``jax.grad`` as an ordinary argument: no ``static_argnums`` needed.

    Arguments:
        sizes: layer widths ``(n₀, n₁, …, n_L)``: ``n₀`` inputs, ``n_L`` outputs, at least two
            entries, all positive.
        activation: hidden activation ``f``, a name in :data:`fnbp.ACTIVATIONS`.
        loss: a name in :data:`fnbp.LOSSES`.
        output_activation: output activation ``g``. Must be ``"identity"`` for the
            cross-entropies, which take logits.

    Raises:
        ValueError: for bad sizes, unknown names, or a squashing output activation under a
            cross-entropy loss.
    """

    sizes: tuple[int, ...]
    activation: str = "relu"
    loss: str = "softmax_cross_entropy"
    output_activation: str = "identity"

    def __post_init__(self):
        sizes = self.sizes
        if isinstance(sizes, np.ndarray) and sizes.ndim == 1:
            sizes = sizes.tolist()
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
            raise TypeError(
                f"MLP: sizes must be a sequence of ints like (64, 128, 10), got {sizes!r}"
            )
        if len(sizes) < 2:
            raise ValueError(
                f"MLP: sizes needs at least two entries (inputs and outputs), got {tuple(sizes)!r}"
            )
        for s in sizes:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
                raise ValueError(
                    f"MLP: every entry of sizes must be a positive int, got {tuple(sizes)!r}"
                )
        object.__setattr__(self, "sizes", tuple(int(s) for s in sizes))
        get_activation(self.activation)
        get_activation(self.output_activation)
        if get_loss(self.loss).from_logits and self.output_activation != "identity":
            raise ValueError(
                f"MLP: loss={self.loss!r} applies its own softmax/sigmoid to the logits, so "
                f"output_activation must be 'identity', got {self.output_activation!r}"
            )

    @property
    def num_layers(self) -> int:
        """L, the number of weight layers."""
        return len(self.sizes) - 1

    @property
    def num_params(self) -> int:
        """Total number of weights and biases."""
        return sum((i + 1) * o for i, o in zip(self.sizes[:-1], self.sizes[1:], strict=True))

    def layer_activation(self, l: int) -> Activation:
        """The activation of layer ``l`` (1-based): ``f`` for ``l < L``, ``g`` for ``l = L``."""
        return get_activation(self.output_activation if l == self.num_layers else self.activation)

    @property
    def loss_fn(self) -> Loss:
        return get_loss(self.loss)


# ----------------------------------------------------------------------------------------------
# The forward pass (unchecked internals).


def dense(p: dict[str, Array], a_prev: Array) -> Array:
    """z⁽ˡ⁾ = W⁽ˡ⁾ a⁽ˡ⁻¹⁾ + b⁽ˡ⁾ for a batch of rows: ``(batch, fan_in) -> (batch, fan_out)``."""
    return a_prev @ p["W"].T + p["b"][None, :]


def forward_trace(params: Params, model: MLP, x: Array, compute_dtype=None) -> tuple[list, list]:
    """The forward pass, keeping what the backward pass needs.

    Arguments:
        compute_dtype: ``None`` computes in the dtypes of ``params`` and ``x`` as given. A dtype
            (mixed precision, e.g. ``jnp.bfloat16`` beside float32 master params) casts every
            ``W``, ``b`` and ``x`` to it first, so every matmul and activation runs in it.

    Returns:
        ``(z, a)``, two lists indexed like the textbook: ``a[0] = x``, and for ``l = 1..L``
        ``z[l] = W⁽ˡ⁾a⁽ˡ⁻¹⁾ + b⁽ˡ⁾`` and ``a[l] = f(z[l])``, each of shape
        ``(batch, sizes[l])`` and in the compute dtype. ``z[0]`` is ``None``.
    """
    if compute_dtype is not None:
        params, x = jax.tree.map(lambda v: v.astype(compute_dtype), (params, x))
    z, a = [None], [x]
    for l in range(1, model.num_layers + 1):
        z.append(dense(params[l - 1], a[l - 1]))  # z⁽ˡ⁾ = W⁽ˡ⁾a⁽ˡ⁻¹⁾ + b⁽ˡ⁾
        a.append(model.layer_activation(l).f(z[l]))  # a⁽ˡ⁾ = f(z⁽ˡ⁾)
    return z, a


def output_for_loss(params: Params, z_out: Array, a_out: Array) -> tuple[Array, Array]:
    """The output layer's ``(z⁽ᴸ⁾, a⁽ᴸ⁾)`` in the dtype the loss is computed in.

    That is the wider of the compute dtype and the params' dtype: under mixed precision
    (bfloat16 compute, float32 master params) the logits are upcast, so the softmax, the loss
    value and δ⁽ᴸ⁾ run in float32. Without mixed precision it changes nothing.
    """
    dtype = jnp.promote_types(z_out.dtype, params[-1]["W"].dtype)
    return z_out.astype(dtype), a_out.astype(dtype)


def no_l2(l2) -> bool:
    """λ is a literal 0 (a Python number, not traced): the penalty and its λW are left out
    instead of computed as 0·Σ‖W‖² and 0·W, two passes over every weight that XLA keeps (0·W is
    NaN for an infinite W)."""
    return isinstance(l2, (int, float)) and l2 == 0


def l2_penalty(params: Params, l2) -> Array:
    """(λ/2) Σₗ ‖W⁽ˡ⁾‖²_F. Biases are not decayed.

    Exactly 0 for λ = 0, even where ‖W‖² overflows (0·∞ would make the whole loss NaN); a
    literal 0 (:func:`no_l2`) computes nothing at all.
    """
    if no_l2(l2):
        return 0.0
    return jnp.where(l2 == 0, 0, 0.5 * l2 * sum(jnp.sum(p["W"] ** 2) for p in params))


def _loss(params, model, x, y, l2, compute_dtype=None):
    z, a = forward_trace(params, model, x, compute_dtype)
    z_out, a_out = output_for_loss(params, z[-1], a[-1])
    t = to_targets(model.loss_fn, y, model.sizes[-1], z_out.dtype)
    return jnp.mean(model.loss_fn.value(z_out, a_out, t)) + l2_penalty(params, l2)


_forward_jit = jax.jit(lambda params, model, x: forward_trace(params, model, x)[1][-1])
_loss_jit = jax.jit(_loss, static_argnames="compute_dtype")


# ----------------------------------------------------------------------------------------------
# Public API.


def forward(params: Params, model: MLP, x: Array) -> Array:
    """Network output a⁽ᴸ⁾ = g(z⁽ᴸ⁾) (the logits for the cross-entropy losses).

    Arguments:
        params: one ``{"W": (n_l, n_{l−1}), "b": (n_l,)}`` dict per layer.
        model: the :class:`MLP` spec.
        x: inputs, shape ``(batch, sizes[0])``, floating dtype.

    Returns:
        Array of shape ``(batch, sizes[-1])``.
    """
    check_params(params, model)
    check_inputs(model, x)
    return _forward_jit(params, model, x)


def loss(params: Params, model: MLP, x: Array, y: Array, *, l2=0.0, compute_dtype=None) -> Array:
    """Mean loss over the batch plus the L2 penalty: ``mean_n ℓ(xₙ, yₙ) + (λ/2) Σₗ‖W⁽ˡ⁾‖²``.

    ``jax.grad(fnbp.loss)`` works on it directly; it is the reference the hand-written
    :func:`fnbp.backprop` is checked against.

    Arguments:
        params, model, x: as in :func:`forward`.
        y: labels: integer class indices ``(batch,)`` or targets ``(batch, sizes[-1])`` (see
            :func:`fnbp.losses.to_targets`).
        l2: L2 strength λ ≥ 0.
        compute_dtype: ``None``, or a floating dtype such as ``jnp.bfloat16`` for mixed
            precision: the matmuls and activations run in it, while the logits are upcast so
            the loss is computed in the params' dtype (see :func:`forward_trace`).

    Returns:
        A scalar, in the params' dtype.
    """
    check_params(params, model)
    check_inputs(model, x, y)
    check_l2(l2)
    return _loss_jit(params, model, x, y, l2, compute_dtype=check_compute_dtype(compute_dtype))


def accuracy(params: Params, model: MLP, x: Array, y: Array) -> Array:
    """Fraction of rows classified correctly.

    With several outputs the prediction is the arg-max output and ``y`` holds class indices
    ``(batch,)`` or one-hot/probability rows. A one-output ``sigmoid_binary_cross_entropy``
    network predicts ``z > 0`` (p > ½) against 0/1 targets.

    Raises:
        ValueError: for a one-output network of any other loss (a regressor has no accuracy).
    """
    check_params(params, model)
    check_inputs(model, x, y)
    if model.sizes[-1] == 1 and model.loss != "sigmoid_binary_cross_entropy":
        raise ValueError(
            f"accuracy needs a classifier: a one-output network with loss={model.loss!r} is a "
            "regressor; use fnbp.loss instead"
        )
    return _accuracy_jit(params, model, x, y)


@jax.jit
def _accuracy_jit(params, model, x, y):
    out = forward_trace(params, model, x)[1][-1]
    if model.sizes[-1] == 1:  # binary: p = σ(z) > ½  ⇔  z > 0
        return jnp.mean((out[:, 0] > 0) == (y.reshape(-1) > 0.5))
    labels = y if y.ndim == 1 else jnp.argmax(y, axis=-1)
    return jnp.mean(jnp.argmax(out, axis=-1) == labels)


# ----------------------------------------------------------------------------------------------
# Validation at the boundary (Python, before tracing; value checks only on concrete arrays).


def _concrete(v) -> bool:
    return not isinstance(v, jax.core.Tracer)


def check_params(params, model: MLP, name: str = "params") -> None:
    """Raise if ``params`` does not match ``model``: count, keys, shapes, floating dtypes."""
    if not isinstance(model, MLP):
        raise TypeError(f"model must be an fnbp.MLP, got {type(model).__name__}")
    if not isinstance(params, (list, tuple)):
        raise TypeError(
            f"{name} must be a list of {{'W', 'b'}} dicts (from fnbp.init_params), "
            f"got {type(params).__name__}"
        )
    if len(params) != model.num_layers:
        raise ValueError(
            f"{name} has {len(params)} layers but the model sizes {model.sizes} need "
            f"{model.num_layers}"
        )
    for l, (p, fan_in, fan_out) in enumerate(
        zip(params, model.sizes[:-1], model.sizes[1:], strict=True), start=1
    ):
        if not isinstance(p, dict) or set(p) != {"W", "b"}:
            got = sorted(p) if isinstance(p, dict) else type(p).__name__
            raise ValueError(f"{name}[{l - 1}] must be a dict with keys 'W' and 'b', got {got}")
        for key, want in (("W", (fan_out, fan_in)), ("b", (fan_out,))):
            shape = tuple(getattr(p[key], "shape", ()))
            if shape != want:
                raise ValueError(
                    f"{name}[{l - 1}]['{key}'] (layer {l}) must have shape {want} for model "
                    f"sizes {model.sizes}, got {shape}"
                )
            if not jnp.issubdtype(p[key].dtype, jnp.floating):
                raise TypeError(
                    f"{name}[{l - 1}]['{key}'] must be a floating array, got dtype {p[key].dtype}"
                )


def check_inputs(model: MLP, x, y=None) -> None:
    """Raise if ``x`` (and ``y``, when given) do not fit ``model``.

    ``x`` must be floating with shape ``(batch, sizes[0])``. ``y`` must have ``batch`` rows:
    integer class indices in ``[0, sizes[-1])`` of shape ``(batch,)``, or targets of shape
    ``(batch, sizes[-1])`` (or ``(batch,)`` for a one-output network). Label values are
    checked only when ``y`` is concrete (not inside ``jit``).
    """
    n_in, n_out = model.sizes[0], model.sizes[-1]
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x must be an array of shape (batch, {n_in}), got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != n_in:
        raise ValueError(
            f"x must have shape (batch, {n_in}) for model sizes {model.sizes}, got {x.shape}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"x must be a floating array, got dtype {x.dtype}; convert it, e.g. "
            f"x.astype(jnp.float32)"
        )
    if y is None:
        return
    if not hasattr(y, "shape") or not hasattr(y, "dtype"):
        raise TypeError(f"y must be an array, got {type(y).__name__}")
    batch = x.shape[0]
    if y.ndim not in (1, 2) or y.shape[0] != batch:
        raise ValueError(
            f"y must have {batch} rows like x (shape ({batch},) for class indices or "
            f"({batch}, {n_out}) for targets), got shape {y.shape}"
        )
    integer = jnp.issubdtype(y.dtype, jnp.integer)
    classes = integer and y.ndim == 1 and (model.loss_fn.integer_labels_are_classes or n_out > 1)
    if y.ndim == 2 and y.shape[1] != n_out:
        raise ValueError(f"y has shape {y.shape} but the model has {n_out} outputs")
    if y.ndim == 1 and not classes and n_out > 1:
        raise ValueError(
            f"y of shape {y.shape} and dtype {y.dtype} is neither integer class indices nor "
            f"targets of shape ({batch}, {n_out})"
        )
    if classes and _concrete(y) and y.size:
        labels = np.asarray(y)  # concrete: checked on the host, never staged into a trace
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n_out:
            raise ValueError(
                f"y holds class labels in [{lo}, {hi}] but the model has {n_out} outputs, "
                f"so labels must lie in [0, {n_out})"
            )


def check_l2(l2) -> None:
    """Raise unless ``l2`` is a finite number ≥ 0 (checked when concrete)."""
    if _concrete(l2):
        if isinstance(l2, bool) or np.ndim(l2) != 0:
            raise TypeError(f"l2 must be a number >= 0, got {l2!r}")
        try:
            value = float(l2)
        except (TypeError, ValueError):
            raise TypeError(f"l2 must be a number >= 0, got {l2!r}") from None
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"l2 must be a finite number >= 0, got {l2!r}")


def check_compute_dtype(compute_dtype):
    """``None``, or ``compute_dtype`` as a floating ``jnp.dtype``; raise for anything else."""
    if compute_dtype is None:
        return None
    try:
        dtype = jnp.dtype(compute_dtype)
    except TypeError:
        raise TypeError(
            f"compute_dtype must be None or a floating dtype such as jnp.bfloat16, got "
            f"{compute_dtype!r}"
        ) from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"compute_dtype must be a floating dtype such as jnp.bfloat16, got {dtype.name}"
        )
    return dtype
