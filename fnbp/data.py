"""Datasets and mini-batches.

Every loader returns a :class:`Dataset` of float32 inputs ``(n, features)`` and int32 labels
``(n,)`` (float32 targets ``(n, outputs)`` for regression), checked to be finite:

* :func:`load_digits`: scikit-learn's bundled 8×8 handwritten digits (no download), the
  default;
* :func:`load_mnist1d`: MNIST-1D generated locally by the ``mnist1d`` package;
* :func:`load_mnist`: the standard MNIST IDX files from a folder you name;
* :func:`teacher_student`: a synthetic regression task labelled by a random teacher network.

:func:`epoch_indices` shuffles with a JAX key and cuts an epoch into equal batches of row
indices, :func:`epoch_batches` gathers them (both run inside ``jit``); :func:`batches` iterates
over the same batches in Python.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Dataset(NamedTuple):
    """A train/test split. ``num_classes`` is ``None`` for regression targets."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def num_outputs(self) -> int:
        return self.num_classes if self.num_classes is not None else self.y_train.shape[1]


def _finite(name: str, dataset: Dataset) -> Dataset:
    for field in ("x_train", "y_train", "x_test", "y_test"):
        v = getattr(dataset, field)
        if len(v) == 0:
            raise ValueError(f"{name}: {field} is empty")
        if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
            bad = int(np.sum(~np.isfinite(v)))
            raise ValueError(f"{name}: {field} holds {bad} NaN or Inf values")
    return dataset


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre each feature and divide by the overall std, with the training set's statistics.

    Pixels share one scale, so one std for all of them keeps their relative contrast; dividing
    each pixel by its own std instead blows up the near-constant border pixels of the digits
    (a pixel inked in three training images gets a std of ~0.1 and test values of ~100), which
    costs about one point of test accuracy.
    """
    mean = x_train.mean(0)
    std = (x_train - mean).std()
    std = std if std > 0 else 1.0
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def load_digits(seed: int = 0, test_fraction: float = 0.2, scale: str = "standardize") -> Dataset:
    """scikit-learn's 8×8 digits: 1797 samples, 64 features, 10 classes; bundled, no download.

    The train/test split is stratified by class and fixed by ``seed`` (the default gives 1437
    train and 360 test samples). ``scale="standardize"`` centres each feature and divides by
    the overall std of the training set; ``scale="unit"`` keeps raw intensities, mapped from
    0..16 to [0, 1] (the textbook setting for sigmoid networks with N(0, 1) weights, which
    saturate on standardized inputs).
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    if scale not in ("standardize", "unit"):
        raise ValueError(f"scale must be 'standardize' or 'unit', got {scale!r}")
    x, y = sk_load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    if scale == "standardize":
        x_tr, x_te = _standardize(x_tr, x_te)
    else:
        x_tr, x_te = (x_tr / 16.0).astype(np.float32), (x_te / 16.0).astype(np.float32)
    return _finite(
        "digits", Dataset("digits", x_tr, y_tr.astype(np.int32), x_te, y_te.astype(np.int32), 10)
    )


def load_mnist1d(seed: int = 0, num_samples: int = 5000) -> Dataset:
    """MNIST-1D (Greydanus, 2020): 40-long 1-D signals of 10 classes, 80/20 train/test split.

    Generated locally by ``mnist1d.data.make_dataset`` (never its download path) with the
    package's default settings and the given seed. The package seeds NumPy's global generator;
    its state is restored afterwards.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    if num_samples < 20:
        raise ValueError(f"num_samples must be >= 20 (two per class per split), got {num_samples}")
    args = get_dataset_args()
    args.seed, args.num_samples = seed, num_samples
    state = np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    return _finite(
        "mnist1d",
        Dataset(
            "mnist1d",
            d["x"].astype(np.float32),
            d["y"].astype(np.int32),
            d["x_test"].astype(np.float32),
            d["y_test"].astype(np.int32),
            10,
        ),
    )


# ----------------------------------------------------------------------------------------------
# MNIST IDX files.

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# The most data read_idx accepts by default: 2 GiB. MNIST's largest file, the training images,
# holds 47,040,000 bytes of data; a header that claims more than this is refused before
# anything is read, and a gzip stream is never decompressed past it.
MAX_IDX_BYTES = 2**31
_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _read_at_most(f, limit: int, chunk: int = 1 << 20) -> bytes:
    """Read until EOF or ``limit`` bytes, in chunks: memory grows only with the data present."""
    parts, size = [], 0
    while size < limit:
        part = f.read(min(chunk, limit - size))
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


def read_idx(path: str | os.PathLike, *, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed, by a ``.gz`` suffix).

    The header (magic ``00 00 <dtype> <ndim>``, then ``ndim`` big-endian uint32 sizes) is
    validated before anything is allocated: the size it claims must be at most ``max_bytes``
    and, for a plain file, equal to what the file holds. A gzip stream is decompressed only
    up to the claimed size (plus one byte, to detect excess), so a forged header or a gzip
    "bomb" cannot make it allocate more than about twice ``min(claimed, max_bytes)``, nor
    read past the end of the data.

    Arguments:
        path: the file; a ``.gz`` suffix means gzip-compressed.
        max_bytes: the largest data size (in bytes, after decompression) to accept; the
            default :data:`MAX_IDX_BYTES` (2 GiB) is 45 times MNIST's largest file.

    Returns:
        An array of the header's dims and dtype, in native byte order.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the file, for a bad magic number, dtype code or dimension count, a
            claimed size above ``max_bytes``, a length that does not match the header, or a
            corrupt gzip stream.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise ValueError(f"{path}: not an IDX file (bad magic number {head.hex()!r})")
            if head[2] not in _IDX_DTYPES:
                raise ValueError(f"{path}: unknown IDX dtype code 0x{head[2]:02x}")
            ndim = head[3]
            if not 1 <= ndim <= 4:
                raise ValueError(f"{path}: IDX dimension count must be 1 to 4, got {ndim}")
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise ValueError(f"{path}: truncated IDX header")
            dims = tuple(int(d) for d in np.frombuffer(dims_raw, ">u4"))
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            expected = int(np.prod(dims, dtype=object)) * dtype.itemsize
            if expected > max_bytes:
                raise ValueError(
                    f"{path}: header says {dims} of {dtype.name} ({expected} bytes), more than "
                    f"max_bytes={max_bytes}; if the file is genuine, pass a larger max_bytes"
                )
            if path.suffix != ".gz":
                available = path.stat().st_size - 4 - 4 * ndim
                if available != expected:
                    raise ValueError(
                        f"{path}: header says {dims} of {dtype.name} ({expected} bytes) but the "
                        f"file holds {available} bytes of data"
                    )
            data = _read_at_most(f, expected + 1)  # what the header promises, plus one
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        if isinstance(e, FileNotFoundError):
            raise FileNotFoundError(f"{path}: no such IDX file") from None
        raise ValueError(f"{path}: cannot read IDX file ({type(e).__name__}: {e})") from None
    if len(data) != expected:
        raise ValueError(
            f"{path}: header says {dims} of {dtype.name} ({expected} bytes) but the file holds "
            f"{len(data)}{'+' if len(data) > expected else ''} bytes of data"
        )
    return np.frombuffer(data, dtype).reshape(dims).astype(dtype.newbyteorder("="))


def load_mnist(folder: str | os.PathLike, *, max_bytes: int = MAX_IDX_BYTES) -> Dataset:
    """MNIST from the four standard IDX files in ``folder`` (plain or ``.gz``).

    Pixels are flattened to 784 features, scaled to [0, 1], centred per feature and scaled by
    the overall std of the training set; labels are int32 in 0..9. Each file is read by
    :func:`read_idx` with the given ``max_bytes``.

    Raises:
        FileNotFoundError: if the folder or a file is missing (the message lists the names).
        ValueError: naming the file or split, for malformed files (see :func:`read_idx`), a
            file of no examples or holding NaN or Inf, images that are not a non-empty
            ``(n, rows, cols)`` stack of one size in both splits, non-integer labels,
            mismatched counts, or labels outside 0..9.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"MNIST folder {str(folder)!r} does not exist")
    arrays = {}
    for field, stem in _MNIST_FILES.items():
        path = next((folder / n for n in (stem, stem + ".gz") if (folder / n).is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"MNIST folder {str(folder)!r} lacks {stem}[.gz]; it needs "
                f"{', '.join(_MNIST_FILES.values())}"
            )
        arrays[field] = v = read_idx(path, max_bytes=max_bytes)
        if len(v) == 0:
            raise ValueError(f"{path}: holds no examples (its first dimension is 0)")
        if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
            bad = int(np.sum(~np.isfinite(v)))
            raise ValueError(f"{path}: holds {bad} NaN or Inf values")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or 0 in x.shape:
            raise ValueError(
                f"MNIST {split}: images of shape {x.shape} and labels of shape {y.shape} do not "
                f"match (want (n, rows, cols) and (n,), n, rows and cols at least 1)"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"MNIST {split}: labels must be integers, got dtype {y.dtype}")
        if y.min() < 0 or y.max() > 9:
            raise ValueError(f"MNIST {split}: labels must lie in 0..9, got {y.min()}..{y.max()}")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(
            f"MNIST: train images are {arrays['x_train'].shape[1:]} but test images are "
            f"{arrays['x_test'].shape[1:]}"
        )
    flat = lambda v: v.reshape(len(v), -1).astype(np.float32) / 255.0  # noqa: E731
    x_tr, x_te = _standardize(flat(arrays["x_train"]), flat(arrays["x_test"]))
    return _finite(
        "mnist",
        Dataset(
            "mnist",
            x_tr,
            arrays["y_train"].astype(np.int32),
            x_te,
            arrays["y_test"].astype(np.int32),
            10,
        ),
    )


# ----------------------------------------------------------------------------------------------
# Synthetic teacher-student regression.


def teacher_student(
    key: Array,
    *,
    sizes: tuple[int, ...] = (16, 32, 1),
    activation: str = "tanh",
    n_train: int = 1024,
    n_test: int = 1024,
    noise: float = 0.1,
) -> Dataset:
    """Regression on the outputs of a random teacher MLP.

    ``x ~ N(0, I)`` of ``sizes[0]`` features; ``y = teacher(x) + noise·ε`` with ``ε ~ N(0, 1)``
    and the teacher an :class:`fnbp.MLP` of the given sizes and activation, LeCun-normal
    initialized (σ_w² = 1), identity output. Train a student with ``loss="mse"``; its best
    achievable test loss is ``noise²·sizes[-1]/2``.
    """
    from fnbp.initializers import init_params
    from fnbp.model import MLP, forward

    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train} and {n_test}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    teacher = MLP(sizes, activation, "mse")
    k_teacher, k_x, k_noise = jax.random.split(key, 3)
    params = init_params(k_teacher, teacher, "lecun_normal")
    x = jax.random.normal(k_x, (n_train + n_test, sizes[0]))
    y = forward(params, teacher, x) + noise * jax.random.normal(
        k_noise, (n_train + n_test, sizes[-1])
    )
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    return _finite(
        "teacher_student",
        Dataset("teacher_student", x[:n_train], y[:n_train], x[n_train:], y[n_train:], None),
    )


# ----------------------------------------------------------------------------------------------
# Mini-batches.


def _check_batch_size(batch_size, name: str = "batch_size") -> None:
    """Raise unless ``batch_size`` (or the count called ``name``) is a positive int."""
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ValueError(f"{name} must be a positive int, got {batch_size!r}")


def epoch_indices(key: Array, n: int, batch_size: int) -> Array:
    """One epoch's shuffled mini-batches as row indices: ``(n // batch_size, batch_size)`` int32.

    The permutation of ``range(n)`` is drawn from ``key``; the ``n mod batch_size`` examples
    that do not fill a batch are left out of this epoch (a different few each epoch). Works
    inside ``jit``; the training loops gather each batch ``x[idx[s]]`` as they reach step ``s``.
    """
    _check_batch_size(batch_size)
    steps = n // batch_size
    if steps == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} examples available")
    return jax.random.permutation(key, n)[: steps * batch_size].reshape(steps, batch_size)


def epoch_batches(key: Array, x: Array, y: Array, batch_size: int) -> tuple[Array, Array]:
    """One epoch's shuffled mini-batches, stacked: ``(steps, batch_size, …)``.

    The batches of :func:`epoch_indices` with the same key, gathered. Works inside ``jit``.
    """
    idx = epoch_indices(key, x.shape[0], batch_size)
    return jnp.asarray(x)[idx], jnp.asarray(y)[idx]


def batches(
    key: Array, x: Array, y: Array, batch_size: int, *, drop_remainder: bool = True
) -> Iterator[tuple[Array, Array]]:
    """Iterate over shuffled mini-batches ``(x_b, y_b)`` of one epoch.

    Shuffled by a permutation drawn from ``key``. With ``drop_remainder`` (the default, and the
    batches :func:`epoch_batches` makes) every batch has ``batch_size`` rows; otherwise the
    last batch holds the rest.
    """
    _check_batch_size(batch_size)
    n = x.shape[0]
    if len(y) != n:
        raise ValueError(f"x has {n} rows but y has {len(y)}")
    if drop_remainder and batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} examples available")
    perm = np.asarray(jax.random.permutation(key, n))
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        idx = perm[start : start + batch_size]
        yield x[idx], y[idx]
