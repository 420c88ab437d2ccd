"""Shared test helpers: random data that fits a model, random architectures, IDX files."""

import gzip
import struct

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import fnbp
from fnbp.activations import ACTIVATIONS
from fnbp.losses import LOSSES


def random_data(key, model, batch, dtype=jnp.float32):
    """``(x, y)`` for ``model``: N(0, 1) inputs, and labels its loss accepts (class indices for
    softmax cross-entropy, targets in [0, 1] for binary cross-entropy, N(0, 1) for mse)."""
    k_x, k_y = jax.random.split(key)
    x = jax.random.normal(k_x, (batch, model.sizes[0]), dtype)
    n_out = model.sizes[-1]
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
