"""Shared test helpers: random data that fits a model, random architectures (MLPs and Nets of
every layer kind, with perturbed params and state), faulty layer kinds, IDX files, the
environment of a subprocess with forced CPU devices."""

import dataclasses
import gzip
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import fnbp
from fnbp.activations import ACTIVATIONS
from fnbp.layers import (
    Activation,
    AvgPool,
    BatchNorm,
    Conv,
    Dense,
    Dropout,
    Flatten,
    LayerError,
    LayerNorm,
    MaxPool,
    Reshape,
    Residual,
)
from fnbp.losses import LOSSES


def xla_flags(drop: str, add: str = "") -> str:
    """``XLA_FLAGS`` for a fresh process: this process's own (e.g. the optimization level
    scripts/test.sh sets) without those starting with ``drop``, then ``add``."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(drop)]
    return " ".join([*kept, add]).strip()


def forced_devices_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a fresh process with ``devices`` forced CPU devices."""
    flag = "--xla_force_host_platform_device_count"
    return xla_flags(drop=flag, add=f"{flag}={devices}")


def random_data(key, model, batch, dtype=jnp.float32):
    """``(x, y)`` for ``model`` (an MLP or a Net): N(0, 1) inputs, and labels its loss accepts
    (class indices for softmax cross-entropy, targets in [0, 1] for binary cross-entropy,
    N(0, 1) for mse)."""
    k_x, k_y = jax.random.split(key)
    x = jax.random.normal(k_x, (batch, *model.input_shape), dtype)
    n_out = model.output_size
    if model.loss == "softmax_cross_entropy":
        return x, jax.random.randint(k_y, (batch,), 0, n_out)
    if model.loss == "sigmoid_binary_cross_entropy":
        return x, jax.random.uniform(k_y, (batch, n_out), dtype)
    return x, jax.random.normal(k_y, (batch, n_out), dtype)


@st.composite
def models(draw, max_depth=6, max_width=64):
    """An MLP of depth 1..max_depth and widths 1..max_width, with any activation and loss."""
    depth = draw(st.integers(1, max_depth))
    sizes = tuple(draw(st.lists(st.integers(1, max_width), min_size=depth + 1, max_size=depth + 1)))
    loss = draw(st.sampled_from(sorted(LOSSES)))
    output = "identity" if LOSSES[loss].from_logits else draw(st.sampled_from(sorted(ACTIVATIONS)))
    return fnbp.MLP(sizes, draw(st.sampled_from(sorted(ACTIVATIONS))), loss, output)


# ----------------------------------------------------------------------------------------------
# Random Nets over every layer kind.


def every_kind_net(loss="softmax_cross_entropy"):
    """A small Net that uses every layer kind (1-D and 2-D convolutions, both pools, nested
    residual blocks with and without a projection, a learned α and α = 0)::

        (24,) -Reshape-> (4, 3, 2) -Conv 2×2 SAME-> (4, 3, 3) -MaxPool 2×1-> (2, 3, 3) -BN->
        -Reshape-> (6, 3) -Conv 3 VALID-> (4, 4) -AvgPool 2-> (2, 4) -LN-> -Residual+P->
        (2, 5) -Flatten-> (10,) -Dense-> (6,) -Dropout-> -Residual(Dense, LN, Residual α=0)->
        -Activation-> -Dense-> (3,)
    """
    return fnbp.Net(
        24,
        [
            Reshape((4, 3, 2)),
            Conv(3, (2, 2), padding="SAME", activation="tanh"),
            MaxPool((2, 1)),
            BatchNorm(momentum=0.8, activation="relu"),
            Reshape((6, 3)),
            Conv(4, (3,), strides=1, padding="VALID", activation="softplus", use_bias=False),
            AvgPool((2,)),
            LayerNorm(),
            Residual((Conv(5, (3,), padding=((1, 1),)), Dropout(0.25)), 0.7, learn_alpha=True),
            Flatten(),
            Dense(6, "gelu"),
            Dropout(0.5),
            Residual(
                (Dense(6, "silu"), LayerNorm(), Residual((Dense(6, "leaky_relu"),), alpha=0.0)),
                alpha=0.5,
            ),
            Activation("tanh"),
            Dense(3),
        ],
        loss,
    )


_ALPHAS = (0.0, 0.5, 1.0, -0.7)  # α = 0 passes δ back unchanged; a negative α flips the branch


def _fits(layer, shape) -> bool:
    try:
        layer.validate()
        layer.out_shape(shape)
    except LayerError:
        return False
    return True


_NORMS = ["batch_norm", "layer_norm", "dropout", "activation"]


def _norm_or_dropout(draw, acts, kind=None):
    kind = draw(st.sampled_from(_NORMS)) if kind is None else kind
    if kind == "batch_norm":
        return BatchNorm(draw(st.sampled_from([0.0, 0.9])), draw(st.sampled_from([1e-5, 0.1])),
                         draw(acts))  # fmt: skip
    if kind == "layer_norm":
        return LayerNorm(draw(st.sampled_from([1e-5, 0.1])), draw(acts))
    if kind == "dropout":
        return Dropout(draw(st.sampled_from([0.0, 0.3, 0.6])))
    return Activation(draw(acts))


def _dense_block(draw, shape, acts, width, depth):
    """A layer for a vector of ``shape``: Dense, a norm, dropout, an activation or a residual
    block whose branch (1–2 such layers, nested residuals down to ``depth``) may change the
    width (a projection)."""
    kinds = ["dense", *_NORMS] + ["residual"] * 2 * (depth > 0)
    kind = draw(st.sampled_from(kinds))
    if kind == "dense":
        return Dense(draw(st.integers(1, width)), draw(acts), draw(st.booleans()))
    if kind in _NORMS:
        return _norm_or_dropout(draw, acts, kind)
    branch = [_dense_block(draw, shape, acts, width, depth - 1)]
    if draw(st.booleans()):
        inner = sequence_out(branch, shape)
        branch.append(_dense_block(draw, inner, acts, width, depth - 1))
    return _residual(draw, branch, acts)


def _residual(draw, branch, acts):
    return Residual(tuple(branch), draw(st.sampled_from(_ALPHAS)), draw(st.booleans()), draw(acts))


def sequence_out(layers, shape):
    """The per-example output shape of ``layers`` on inputs of ``shape``."""
    for layer in layers:
        shape = layer.out_shape(shape)
    return shape


def _conv(draw, ndim, acts, channels, same=False):
    kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim)))
    if same:  # shape-preserving: for residual branches
        return Conv(draw(st.integers(1, channels)), kernel, 1, "SAME", draw(acts))
    strides = tuple(draw(st.lists(st.integers(1, 2), min_size=ndim, max_size=ndim)))
    padding = draw(st.sampled_from(["SAME", "VALID", "explicit"]))
    if padding == "explicit":
        padding = tuple(
            tuple(draw(st.lists(st.integers(0, 2), min_size=2, max_size=2))) for _ in range(ndim)
        )
    return Conv(draw(st.integers(1, channels)), kernel, strides, padding, draw(acts),
                draw(st.booleans()))  # fmt: skip


def _pool(draw, shape):
    window, strides = [], []
    for n in shape[:-1]:
        w = draw(st.integers(1, min(2, n)))
        window.append(w)
        strides.append(draw(st.sampled_from([s for s in (1, 2) if (n - w) % s == 0])))
    cls = draw(st.sampled_from([MaxPool, AvgPool]))
    return cls(tuple(window), None if window == strides else tuple(strides))


def _conv_block(draw, shape, acts, channels):
    ndim = len(shape) - 1
    kind = draw(st.sampled_from(["conv", "conv", "pool", "pool", *_NORMS[:3], "residual"]))
    if kind == "conv":
        layer = _conv(draw, ndim, acts, channels)
    elif kind == "pool":
        layer = _pool(draw, shape)
    elif kind in _NORMS:
        layer = _norm_or_dropout(draw, acts, kind)
    else:
        branch = [_conv(draw, ndim, acts, channels, same=True)]
        if draw(st.booleans()):
            branch.append(_norm_or_dropout(draw, acts))
        layer = _residual(draw, branch, acts)
    return layer if _fits(layer, shape) else Activation(draw(acts))


@st.composite
def nets(draw, max_blocks=3, max_width=5, families=("dense", "cnn1d", "cnn2d")):
    """A small random :class:`fnbp.Net` over every layer kind and any activation and loss.

    ``dense``: a vector input and up to ``max_blocks`` of Dense (with or without bias),
    BatchNorm, LayerNorm, Dropout (rate 0 included), Activation and Residual blocks (α of
    0, ±, learned or not, a projection when the branch changes the width, nested residuals).
    ``cnn1d``/``cnn2d``: an input of shape (W, C) or (H, W, C) (or a vector and a Reshape to
    it), then convolutions (strides 1–2, SAME/VALID/explicit padding), max and average pools,
    the norms, dropout and shape-preserving residual convolutions, then Flatten, perhaps a
    hidden Dense, and the output Dense. The last activation is the identity under the
    cross-entropies, any activation under mse.
    """
    family = draw(st.sampled_from(families))
    acts = st.sampled_from(sorted(ACTIVATIONS))
    layers = []
    if family == "dense":
        input_shape = shape = (draw(st.integers(1, max_width)),)
        for _ in range(draw(st.integers(1, max_blocks))):
            layers.append(_dense_block(draw, shape, acts, max_width, depth=2))
            shape = layers[-1].out_shape(shape)
    else:
        ndim = 1 if family == "cnn1d" else 2
        sizes = st.integers(3, 7) if ndim == 1 else st.integers(3, 5)
        shape = (*draw(st.lists(sizes, min_size=ndim, max_size=ndim)), draw(st.integers(1, 2)))
        input_shape = shape
        if draw(st.booleans()):  # a vector input reshaped to the image
            input_shape = (math.prod(shape),)
            layers.append(Reshape(shape))
        for _ in range(draw(st.integers(1, max_blocks))):
            layers.append(_conv_block(draw, shape, acts, 3))
            shape = layers[-1].out_shape(shape)
        layers.append(Flatten())
        if draw(st.booleans()):
            layers.append(Dense(draw(st.integers(1, max_width)), draw(acts)))
    loss = draw(st.sampled_from(sorted(LOSSES)))
    output = "identity" if LOSSES[loss].from_logits else draw(acts)
    layers.append(Dense(draw(st.integers(1, 4)), output))
    return fnbp.Net(input_shape, layers, loss)


def perturbed(seed, net, dtype=np.float32, scale=0.5):
    """``(params, state)`` for ``net`` away from the values at init that hide bugs.

    Drawn with NumPy (nothing for XLA to compile: a jitted PRNG costs seconds per net), in the
    structure and shapes of ``fnbp.init_params`` and ``fnbp.init_state``: weights W, conv
    kernels and projections P ~ N(0, 2/fan_in) (He), every leaf that starts at a constant
    ``scale``·N(0, 1) away from it (biases, β ≠ 0, γ ≠ 1, a learned α ≠ its init); running
    means ``scale``·N(0, 1), variances exp(``scale``·N(0, 1)) > 0.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: fnbp.init_params(jax.random.key(0), net, dtype=jnp.float32))
    start = jax.eval_shape(lambda: fnbp.init_state(net))

    def param(path, leaf):
        name = path[-1].key
        if name in (
            "W",
            "P",
        ):  # fan_in: all axes but the output one (W of a conv: (*k, C_in, C_out))
            fan_in = leaf.shape[1] if len(leaf.shape) == 2 else math.prod(leaf.shape[:-1])
            return rng.standard_normal(leaf.shape) * math.sqrt(2 / fan_in)
        one = 1.0 if name == "gamma" else 0.0
        if name == "alpha":
            one = _alpha_at(net, path)
        return one + scale * rng.standard_normal(leaf.shape)

    def stat(path, leaf):
        n = scale * rng.standard_normal(leaf.shape)
        return np.exp(n) if path[-1].key == "var" else n

    cast = lambda v: jnp.asarray(v, dtype)  # noqa: E731
    params = jax.tree_util.tree_map_with_path(lambda p, v: cast(param(p, v)), shapes)
    return params, jax.tree_util.tree_map_with_path(lambda p, v: cast(stat(p, v)), start)


def _alpha_at(net, path) -> float:
    """The ``alpha`` field of the residual block a params path ends in."""
    layers, layer = net.layers, None
    for entry in path[:-1]:
        if isinstance(entry, jax.tree_util.SequenceKey):
            layer = layers[entry.idx]
            layers = layer.sublayers()
    return layer.alpha


def random_net_data(seed, net, batch, dtype=np.float32):
    """``(x, y)`` for ``net`` drawn with NumPy, as :func:`random_data` draws them."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, *net.input_shape)), dtype)
    n_out = net.output_size
    if net.loss == "softmax_cross_entropy":
        return x, jnp.asarray(rng.integers(0, n_out, (batch,)))
    if net.loss == "sigmoid_binary_cross_entropy":
        return x, jnp.asarray(rng.uniform(size=(batch, n_out)), dtype)
    return x, jnp.asarray(rng.standard_normal((batch, n_out)), dtype)


# ----------------------------------------------------------------------------------------------
# Fault injection: layer kinds whose backward rule is wrong in one term, by a factor 1 + 1e-4
# (tests/test_crosscheck.py and tests/test_gradcheck.py must catch and name each).

FAULT_SCALE = 1 + 1e-4


def faulty(cls, fault):
    """A subclass of the layer kind ``cls`` (same forward, same ``kind``) whose backward
    passes its grads and ∂L/∂x through ``fault(self, p, x, cache, δ, grads, back)``."""

    @jax.tree_util.register_static
    @dataclasses.dataclass(frozen=True)
    class Faulty(cls):
        def backward(self, p, x, cache, delta, l2):
            grads, back, inner = super().backward(p, x, cache, delta, l2)
            grads, back = fault(self, p, x, cache, delta, grads, back)
            return grads, back, inner

    Faulty.__name__ = Faulty.__qualname__ = f"Faulty{cls.__name__}"
    return Faulty


def fault_back(self, p, x, cache, delta, grads, back):  # ∂L/∂x · (1 + 1e-4)
    return grads, back * FAULT_SCALE


def fault_grad(name):
    def fault(self, p, x, cache, delta, grads, back):  # ∂L/∂θ[name] · (1 + 1e-4)
        return {**grads, name: grads[name] * FAULT_SCALE}, back

    return fault


def fault_bn_coupling(self, p, x, cache, delta, grads, back):
    """γ r (δ − Σδ/m − x̂·Σ(δ⊙x̂)/m) with its last term scaled: the batch coupling."""
    xhat, r, _ = cache
    m, axes = np.prod(delta.shape[:-1]), tuple(range(delta.ndim - 1))
    gamma = p["gamma"].reshape((1,) * len(axes) + (-1,))
    term = gamma * r * xhat * jnp.sum(delta * xhat, axis=axes, keepdims=True) / m
    return grads, back - (FAULT_SCALE - 1) * term


def fault_ln_inner(self, p, x, cache, delta, grads, back):
    """r (g − mean(g) − x̂·mean(g⊙x̂)), g = γ⊙δ, with its last term scaled."""
    xhat, r = cache
    g = p["gamma"][None, :] * delta
    return grads, back - (FAULT_SCALE - 1) * r * xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)


def fault_skip(self, p, x, cache, delta, grads, back):  # δ + ∂L/∂x|_F with the skip's δ scaled
    return grads, back + (FAULT_SCALE - 1) * delta


# the faults of ∂L/∂x (the others are of a parameter's gradient)
INPUT_FAULTS = (fault_back, fault_bn_coupling, fault_ln_inner, fault_skip)
VEC, SIGNAL = (5,), (6, 2)
# (kind, fault, input shape, the layers before, the layers after, train): the faulty layer is
# always layer 2, after a layer whose δ its ∂L/∂x feeds.
FAULTS = {
    "dense-back": (Dense, fault_back, VEC, [Dense(6, "tanh")], (4, "tanh"), [Dense(3)], False),
    "dense-W": (Dense, fault_grad("W"), VEC, [Dense(6, "tanh")], (4, "tanh"), [Dense(3)], False),
    "conv-back": (Conv, fault_back, SIGNAL, [Conv(3, (2,), activation="tanh")], (2, (3,)),
                  [Flatten(), Dense(3)], False),
    "conv-W": (Conv, fault_grad("W"), SIGNAL, [Conv(3, (2,), activation="tanh")], (2, (3,), 2),
               [Flatten(), Dense(3)], False),
    "max_pool": (MaxPool, fault_back, SIGNAL, [Conv(3, (2,), activation="tanh")], ((2,),),
                 [Flatten(), Dense(3)], False),
    "avg_pool": (AvgPool, fault_back, SIGNAL, [Conv(3, (2,), activation="tanh")], ((3,),),
                 [Flatten(), Dense(3)], False),
    "batch_norm": (BatchNorm, fault_bn_coupling, VEC, [Dense(6, "tanh")], (), [Dense(3)], True),
    "batch_norm-gamma": (BatchNorm, fault_grad("gamma"), VEC, [Dense(6, "tanh")], (), [Dense(3)],
                         True),
    "layer_norm": (LayerNorm, fault_ln_inner, VEC, [Dense(6, "tanh")], (), [Dense(3)], False),
    "dropout": (Dropout, fault_back, VEC, [Dense(6, "tanh")], (0.3,), [Dense(3)], True),
    "residual-skip": (Residual, fault_skip, VEC, [Dense(6, "tanh")], ((Dense(6, "tanh"),), 0.5),
                      [Dense(3)], False),
    "residual-alpha": (Residual, fault_grad("alpha"), VEC, [Dense(6, "tanh")],
                       ((Dense(6, "tanh"),), 0.5, True), [Dense(3)], False),
    "flatten": (Flatten, fault_back, SIGNAL, [Conv(2, (2,), activation="tanh")], (), [Dense(3)],
                False),
    "reshape": (Reshape, fault_back, VEC, [Dense(6, "tanh")], ((3, 2),),
                [Conv(2, (2,)), Flatten(), Dense(3)], False),
    "activation": (Activation, fault_back, VEC, [Dense(6)], ("tanh",), [Dense(3)], False),
}  # fmt: skip


def idx_bytes(arr, code: int = 0x08, big_endian_dtype: str = ">u1") -> bytes:
    """An IDX file: 00 00 <dtype code> <ndim>, ndim big-endian uint32 sizes, big-endian data."""
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + np.asarray(arr).astype(big_endian_dtype).tobytes()


def write_file(path, payload: bytes):
    """Write ``payload`` to ``path``, gzip-compressed when the name ends in ``.gz``."""
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


MNIST_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def write_mnist(folder, arrays=None, suffix=""):
    """An MNIST folder of the four IDX files holding ``arrays`` (train images, train labels,
    test images, test labels); by default a small valid set: 12 and 6 random uint8 images of
    28×28, labels 0..9."""
    if arrays is None:
        rng = np.random.default_rng(0)
        arrays = [
            rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
            (np.arange(12) % 10).astype(np.uint8),
            rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
            (np.arange(6) % 10).astype(np.uint8),
        ]
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in zip(MNIST_NAMES, arrays, strict=True):
        write_file(folder / (name + suffix), idx_bytes(arr))
    return folder
