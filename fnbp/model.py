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
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fnbp.activations import Activation, get_activation
from fnbp.engine import Trace, draw_masks, forward_seq, no_masks
from fnbp.layers.dense import Dense, dense, no_l2  # noqa: F401  (dense: the MLP's z = Wa + b)
from fnbp.losses import Loss, get_loss, to_targets
from fnbp.net import Net

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

    # The generic view every function shares with fnbp.Net: an MLP is a stack of Dense layers.

    @property
    def layers(self) -> tuple[Dense, ...]:
        """``(Dense(n₁, f), …, Dense(n_{L−1}, f), Dense(n_L, g))``."""
        L = self.num_layers
        return tuple(
            Dense(n, self.output_activation if l == L else self.activation)
            for l, n in enumerate(self.sizes[1:], start=1)
        )

    @property
    def input_shape(self) -> tuple[int]:
        return (self.sizes[0],)

    @property
    def in_shapes(self) -> tuple[tuple[int], ...]:
        """Each layer's per-example input shape."""
        return tuple((n,) for n in self.sizes[:-1])

    @property
    def output_size(self) -> int:
        return self.sizes[-1]

    needs_train = needs_state = couples_examples = False


# ----------------------------------------------------------------------------------------------
# The forward pass (unchecked internals).


def cast(tree, dtype):
    """``tree`` with every leaf cast to ``dtype`` (``None``: unchanged)."""
    return tree if dtype is None else jax.tree.map(lambda v: v.astype(dtype), tree)


def blank_state(model) -> list:
    """The state of a model that keeps no statistics: ``{}`` for every layer, ``{"branch":
    [{}, …]}`` for a residual block (its layers' own init_state, which has no leaves)."""
    return [layer.init_state(s) for layer, s in zip(model.layers, model.in_shapes, strict=True)]


def run(
    params, model, x, *, state=None, masks=None, train=False, compute_dtype=None, offsets=None
) -> Trace:
    """The forward pass of any model, keeping what the backward pass needs (:class:`Trace`).

    ``compute_dtype`` (mixed precision) casts the params and ``x`` first; ``state`` and
    ``masks`` default to none (a model without BatchNorm, eval mode or no dropout).
    """
    state = blank_state(model) if state is None else state
    masks = no_masks(model.layers) if masks is None else masks
    params, x = cast((params, x), compute_dtype)
    return forward_seq(model.layers, params, state, x, masks, train, offsets)


def forward_trace(params: Params, model, x: Array, compute_dtype=None) -> tuple[list, list]:
    """The forward pass in the textbook's indexing (no state, no dropout: an MLP's).

    Arguments:
        compute_dtype: ``None`` computes in the dtypes of ``params`` and ``x`` as given. A dtype
            (mixed precision, e.g. ``jnp.bfloat16`` beside float32 master params) casts every
            ``W``, ``b`` and ``x`` to it first, so every matmul and activation runs in it.

    Returns:
        ``(z, a)``, two lists indexed like the textbook: ``a[0] = x``, and for ``l = 1..L``
        ``z[l] = W⁽ˡ⁾a⁽ˡ⁻¹⁾ + b⁽ˡ⁾`` and ``a[l] = f(z[l])``, each of shape
        ``(batch, sizes[l])`` and in the compute dtype. ``z[0]`` is ``None``.
    """
    tr = run(params, model, x, compute_dtype=compute_dtype)
    return [None, *tr.z], tr.a


def param_dtype(params):
    """The dtype of the (master) params: that of their first leaf."""
    return jax.tree.leaves(params)[0].dtype


def output_for_loss(params: Params, z_out: Array, a_out: Array) -> tuple[Array, Array]:
    """The output layer's ``(z⁽ᴸ⁾, a⁽ᴸ⁾)`` in the dtype the loss is computed in.

    That is the wider of the compute dtype and the params' dtype: under mixed precision
    (bfloat16 compute, float32 master params) the logits are upcast, so the softmax, the loss
    value and δ⁽ᴸ⁾ run in float32. Without mixed precision it changes nothing.
    """
    dtype = jnp.promote_types(z_out.dtype, param_dtype(params))
    return z_out.astype(dtype), a_out.astype(dtype)


def weights(model, params) -> list:
    """Every weight leaf L2 decays, in params order: each ``W`` (dense and conv) and each
    residual projection ``P``; not biases, γ, β or α."""
    return [w for layer, p in zip(model.layers, params, strict=True) for w in layer.weights(p)]


def l2_penalty(params: Params, model, l2) -> Array:
    """(λ/2) Σ ‖W‖²_F over :func:`weights`. Biases are not decayed.

    Exactly 0 for λ = 0, even where ‖W‖² overflows (0·∞ would make the whole loss NaN); a
    literal 0 (:func:`no_l2`) computes nothing at all.
    """
    if no_l2(l2):
        return 0.0
    return jnp.where(l2 == 0, 0, 0.5 * l2 * sum(jnp.sum(W**2) for W in weights(model, params)))


def _loss_and_state(
    params, model, x, y, l2, compute_dtype=None, state=None, masks=None, train=False, offsets=None
):
    """``(mean loss + penalty, new state)``: what ``jax.grad`` differentiates as the reference."""
    tr = run(
        params,
        model,
        x,
        state=state,
        masks=masks,
        train=train,
        compute_dtype=compute_dtype,
        offsets=offsets,
    )
    z_out, a_out = output_for_loss(params, tr.z[-1], tr.a[-1])
    t = to_targets(model.loss_fn, y, model.output_size, z_out.dtype)
    return jnp.mean(model.loss_fn.value(z_out, a_out, t)) + l2_penalty(params, model, l2), tr.state


def _loss(params, model, x, y, l2, compute_dtype=None, state=None, masks=None, train=False):
    return _loss_and_state(params, model, x, y, l2, compute_dtype, state, masks, train)[0]


def draw_batch_masks(model, key, batch: int, train: bool) -> list:
    """The dropout masks of one batch (``None`` everywhere unless ``train`` and a ``key``)."""
    if not train or key is None:
        return no_masks(model.layers)
    return draw_masks(model.layers, key, model.in_shapes, batch)


def _keyed_loss(params, model, x, y, l2, compute_dtype=None, state=None, key=None, train=False):
    masks = draw_batch_masks(model, key, x.shape[0], train)
    return _loss(params, model, x, y, l2, compute_dtype, state, masks, train)


_forward_jit = jax.jit(lambda params, model, x, state: run(params, model, x, state=state).a[-1])
_loss_jit = jax.jit(_keyed_loss, static_argnames=("compute_dtype", "train"))


# ----------------------------------------------------------------------------------------------
# Public API.


def forward(params: Params, model, x: Array, *, state=None) -> Array:
    """Network output a⁽ᴸ⁾ = g(z⁽ᴸ⁾) (the logits for the cross-entropy losses), in eval mode
    (running statistics, no dropout).

    Arguments:
        params: from :func:`fnbp.init_params` (for an MLP one ``{"W", "b"}`` dict per layer).
        model: an :class:`MLP` or :class:`fnbp.Net`.
        x: inputs, shape ``(batch, *input_shape)``, floating dtype.
        state: from :func:`fnbp.init_state` or training; required for a net with BatchNorm.

    Returns:
        Array of shape ``(batch, output_size)``.
    """
    check_params(params, model)
    check_inputs(model, x)
    check_mode(model, state=state, train=False, key=None, what="forward")
    return _forward_jit(params, model, x, state)


def loss(
    params: Params,
    model,
    x: Array,
    y: Array,
    *,
    l2=0.0,
    compute_dtype=None,
    state=None,
    key=None,
    train=None,
) -> Array:
    """Mean loss over the batch plus the L2 penalty: ``mean_n ℓ(xₙ, yₙ) + (λ/2) Σ‖W‖²``.

    ``jax.grad(fnbp.loss)`` works on it directly; it is the reference the hand-written
    :func:`fnbp.backprop` is checked against.

    Arguments:
        params, model, x: as in :func:`forward`.
        y: labels: integer class indices ``(batch,)`` or targets ``(batch, output_size)`` (see
            :func:`fnbp.losses.to_targets`).
        l2: L2 strength λ ≥ 0 (every weight matrix; not biases, γ, β, α).
        compute_dtype: ``None``, or a floating dtype such as ``jnp.bfloat16`` for mixed
            precision: the matmuls and activations run in it, while the logits are upcast so
            the loss is computed in the params' dtype (see :func:`forward_trace`).
        state: the BatchNorm running statistics (:func:`fnbp.init_state`); required for a net
            with BatchNorm.
        key: the PRNG key dropout masks are drawn from; required in train mode for a net with
            dropout.
        train: ``True`` (batch statistics, dropout on) or ``False``; required for a net with
            BatchNorm or Dropout.

    Returns:
        A scalar, in the params' dtype.
    """
    check_params(params, model)
    check_inputs(model, x, y)
    check_l2(l2)
    train = check_mode(model, state=state, train=train, key=key, what="loss")
    return _loss_jit(
        params,
        model,
        x,
        y,
        l2,
        compute_dtype=check_compute_dtype(compute_dtype),
        state=state,
        key=key,
        train=train,
    )


def accuracy(params: Params, model, x: Array, y: Array, *, state=None) -> Array:
    """Fraction of rows classified correctly, in eval mode.

    With several outputs the prediction is the arg-max output and ``y`` holds class indices
    ``(batch,)`` or one-hot/probability rows. A one-output ``sigmoid_binary_cross_entropy``
    network predicts ``z > 0`` (p > ½) against 0/1 targets.

    Raises:
        ValueError: for a one-output network of any other loss (a regressor has no accuracy).
    """
    check_params(params, model)
    check_inputs(model, x, y)
    check_mode(model, state=state, train=False, key=None, what="accuracy")
    if model.output_size == 1 and model.loss != "sigmoid_binary_cross_entropy":
        raise ValueError(
            f"accuracy needs a classifier: a one-output network with loss={model.loss!r} is a "
            "regressor; use fnbp.loss instead"
        )
    return _accuracy_jit(params, model, x, y, state)


@jax.jit
def _accuracy_jit(params, model, x, y, state=None):
    out = run(params, model, x, state=state).a[-1]
    if model.output_size == 1:  # binary: p = σ(z) > ½  ⇔  z > 0
        return jnp.mean((out[:, 0] > 0) == (y.reshape(-1) > 0.5))
    labels = y if y.ndim == 1 else jnp.argmax(y, axis=-1)
    return jnp.mean(jnp.argmax(out, axis=-1) == labels)


# ----------------------------------------------------------------------------------------------
# Validation at the boundary (Python, before tracing; value checks only on concrete arrays).


def _concrete(v) -> bool:
    return not isinstance(v, jax.core.Tracer)


def check_model(model) -> None:
    """Raise unless ``model`` is an :class:`MLP` or a :class:`fnbp.Net`."""
    if not isinstance(model, (MLP, Net)):
        raise TypeError(f"model must be an fnbp.MLP or fnbp.Net, got {type(model).__name__}")


@functools.lru_cache(maxsize=64)
def _expected_params(model: Net):
    from fnbp.initializers import init_layers

    return jax.eval_shape(
        lambda: init_layers(
            jax.random.key(0), model.layers, model.in_shapes, "he_normal", jnp.float32
        )
    )


def _check_tree(tree, want, name: str, what: str) -> None:
    """Raise unless ``tree`` has the structure and leaf shapes of ``want`` (shape structs)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    want_leaves, want_def = jax.tree_util.tree_flatten_with_path(want)
    if treedef != want_def:
        raise ValueError(
            f"{name} ({what}) must have the structure {_keys(want)}, got {_keys(tree)}"
        )
    for (path, v), (_, w) in zip(leaves, want_leaves, strict=True):
        leaf = name + jax.tree_util.keystr(path)
        shape = tuple(getattr(v, "shape", ()))
        if shape != w.shape:
            raise ValueError(f"{leaf} ({what}) must have shape {w.shape}, got {shape}")
        if not jnp.issubdtype(getattr(v, "dtype", np.dtype(object)), jnp.floating):
            raise TypeError(
                f"{leaf} ({what}) must be a floating array, got {getattr(v, 'dtype', type(v).__name__)}"
            )


def _keys(tree):
    if isinstance(tree, dict):
        return "{" + ", ".join(f"{k!r}: {_keys(v)}" for k, v in sorted(tree.items())) + "}"
    if isinstance(tree, (list, tuple)):
        return "[" + ", ".join(_keys(v) for v in tree) + "]"
    return "array"


def _check_aligned(tree, model, name: str, source: str) -> None:
    if not isinstance(tree, (list, tuple)):
        raise TypeError(
            f"{name} must be a list aligned with the net's layers ({source}), got {type(tree).__name__}"
        )
    if len(tree) != len(model.layers):
        raise ValueError(
            f"{name} has {len(tree)} entries but the net has {len(model.layers)} layers"
        )


def check_params(params, model, name: str = "params") -> None:
    """Raise if ``params`` does not match ``model``: count, keys, shapes, floating dtypes."""
    check_model(model)
    if isinstance(model, Net):
        _check_aligned(params, model, name, "from fnbp.init_params")
        for i, (p, want, layer) in enumerate(
            zip(params, _expected_params(model), model.layers, strict=True)
        ):
            _check_tree(p, want, f"{name}[{i}]", f"layer {i + 1}, {layer.kind}")
        return
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


def check_inputs(model, x, y=None) -> None:
    """Raise if ``x`` (and ``y``, when given) do not fit ``model``.

    ``x`` must be floating with shape ``(batch, *input_shape)``. ``y`` must have ``batch`` rows:
    integer class indices in ``[0, output_size)`` of shape ``(batch,)``, or targets of shape
    ``(batch, output_size)`` (or ``(batch,)`` for a one-output network). Label values are
    checked only when ``y`` is concrete (not inside ``jit``).
    """
    n_out = model.output_size
    if isinstance(model, MLP):
        want, spec = f"(batch, {model.sizes[0]})", f"model sizes {model.sizes}"
    else:
        want, spec = (
            f"(batch, {', '.join(map(str, model.input_shape))})",
            f"the net's input_shape {model.input_shape}",
        )
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x must be an array of shape {want}, got {type(x).__name__}")
    if x.ndim != 1 + len(model.input_shape) or tuple(x.shape[1:]) != model.input_shape:
        raise ValueError(f"x must have shape {want} for {spec}, got {x.shape}")
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


def init_state(model) -> list:
    """The state of a fresh model: a list aligned with ``model.layers``, ``{"mean": 0, "var": 1}``
    (float32, shape ``(C,)``) for each BatchNorm (nested in ``{"branch": [...]}`` for residual
    blocks), ``{}`` elsewhere. Training returns the new state; nothing mutates it."""
    check_model(model)
    return [layer.init_state(s) for layer, s in zip(model.layers, model.in_shapes, strict=True)]


def check_mode(model, *, state, train, key, what: str) -> bool:
    """Check the mode keywords of a call on ``model`` and return the mode (a bool).

    A net with BatchNorm or Dropout needs ``train=True`` or ``False`` (no silent default, as in
    Flax and Haiku); one with BatchNorm needs ``state``; train-mode dropout needs ``key``.

    Raises:
        ValueError, TypeError: naming the layer that needs what is missing.
    """
    if train is not None and not isinstance(train, bool):
        raise TypeError(f"{what}: train must be True, False or None, got {train!r}")
    if isinstance(model, MLP):
        if state is not None and list(state) != blank_state(model):
            raise ValueError(f"{what}: an MLP keeps no state; pass state=None")
        return bool(train)
    if train is None:
        layer = model.find(lambda l: l.needs_train)
        if layer is not None:
            raise ValueError(
                f"{what}: the net's {layer} behaves differently in training and evaluation; "
                "pass train=True or train=False"
            )
        train = False
    if model.needs_state:
        layer = model.find(lambda l: l.needs_state)
        if state is None:
            raise ValueError(
                f"{what}: the net's {layer} keeps running statistics; pass state= "
                "(fnbp.init_state(net) to start, then the state training returns)"
            )
    if state is not None:
        _check_aligned(state, model, "state", "from fnbp.init_state")
        for i, (s, layer, shape) in enumerate(
            zip(state, model.layers, model.in_shapes, strict=True)
        ):
            want = jax.eval_shape(lambda layer=layer, shape=shape: layer.init_state(shape))
            _check_tree(s, want, f"state[{i}]", f"layer {i + 1}, {layer.kind}")
    if train and key is None:
        layer = model.find(lambda l: getattr(l, "rate", 0) > 0)
        if layer is not None:
            raise ValueError(
                f"{what}: the net's {layer} drops units in train mode; pass key= (a PRNG key, "
                "e.g. jax.random.key(0)) to draw its mask"
            )
    if key is not None:
        from fnbp.initializers import _check_key

        _check_key(key)
    return train


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
