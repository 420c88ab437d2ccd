"""Preset nets a user can name on the command line (``fnbp train --arch NAME``), each built for a
data set's number of input features ``d`` and of outputs ``n``.

=================  ==============================================================================
name               layers
=================  ==============================================================================
``cnn``            a 2-D CNN for square images (digits: 8×8): ``Reshape((s, s, 1))``, s = √d, then
                   Conv 16 3×3 ReLU, MaxPool 2×2, Conv 32 3×3 ReLU, MaxPool 2×2, Flatten,
                   Dense 64 ReLU, [Dropout], Dense n
``mnist1d_cnn``    the MNIST-1D paper's CNN on inputs of shape (d, 1): three Conv1d of 25
                   channels, kernels 5/3/3, stride 2, padding 1, ReLU; Flatten, [Dropout], Dense n
``resmlp``         a residual MLP: Dense ``width``, then ``depth`` blocks x + α·F(x) with
                   F = Dense, [norm], ReLU, [Dropout], Dense, [norm]; Dense n
``mlp``            (``--sizes`` with ``--dropout``) Dense layers with Dropout after each hidden one
=================  ==============================================================================

Every function returns an :class:`fnbp.Net` and raises ``ValueError``, its message starting
with the preset's name, for options that do not fit.
"""

from __future__ import annotations

import math

from fnbp.layers import (
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
from fnbp.net import Net

ARCHS = ("cnn", "mnist1d_cnn", "resmlp")
NORMS = ("batch", "layer", "none")
RESMLP_DEPTH, RESMLP_WIDTH = 30, 128


def _dropout(rate: float) -> list:
    return [Dropout(rate)] if rate else []


def _net(name: str, input_shape: tuple, layers: list, loss: str) -> Net:
    """``Net(input_shape, layers, loss)``, its errors prefixed with the preset's name."""
    try:
        return Net(input_shape, layers, loss)
    except ValueError as e:
        raise ValueError(f"{name} on inputs of shape {input_shape}: {e}") from None


def cnn(features: int, outputs: int, *, activation="relu", output_activation="identity",
        loss="softmax_cross_entropy", dropout=0.0) -> Net:  # fmt: skip
    """A small 2-D CNN for ``features = s²`` pixels (one channel), ``s`` divisible by 4.

    Shapes for digits (s = 8): 8×8×1 → conv 8×8×16 → pool 4×4×16 → conv 4×4×32 → pool 2×2×32
    → 128 → 64 → ``outputs`` (13,706 params for 10 classes; SAME padding).
    """
    side = math.isqrt(features)
    if side * side != features or side % 4:
        raise ValueError(
            f"cnn: reshapes each example to an s×s image with s divisible by 4 (two 2×2 "
            f"poolings), so it needs 16, 64, 144, … 784 features, got {features}"
        )
    return _net(
        "cnn",
        (features,),
        [
            Reshape((side, side, 1)),
            Conv(16, (3, 3), activation=activation),
            MaxPool((2, 2)),
            Conv(32, (3, 3), activation=activation),
            MaxPool((2, 2)),
            Flatten(),
            Dense(64, activation),
            *_dropout(dropout),
            Dense(outputs, output_activation),
        ],
        loss,
    )


def mnist1d_cnn(features: int, outputs: int, *, activation="relu", output_activation="identity",
                loss="softmax_cross_entropy", dropout=0.0) -> Net:  # fmt: skip
    """The MNIST-1D CNN (Greydanus, 2020) on inputs of shape ``(features, 1)``.

    Each Conv1d has 25 channels, stride 2 and padding 1, so a length ``w`` becomes
    ``⌊(w + 2 − k)/2⌋ + 1``: 40 → 19 → 10 → 5 for MNIST-1D, 125 features into the last Dense
    (5,210 params for 10 classes).
    """
    convs = [Conv(25, (k,), strides=2, padding=((1, 1),), activation=activation) for k in (5, 3, 3)]
    return _net(
        "mnist1d_cnn",
        (features, 1),
        [*convs, Flatten(), *_dropout(dropout), Dense(outputs, output_activation)],
        loss,
    )


def resmlp(features: int, outputs: int, *, depth=RESMLP_DEPTH, width=RESMLP_WIDTH, norm="none",
           alpha=None, activation="relu", output_activation="identity",
           loss="softmax_cross_entropy", dropout=0.0) -> Net:  # fmt: skip
    """A residual MLP: ``Dense(width)``, ``depth`` blocks ``x + α·F(x)``, ``Dense(outputs)``.

    ``F = Dense(width), [norm], f, [Dropout], Dense(width), [norm]`` with ``norm`` one of
    :data:`NORMS`; ``α = 1/√depth`` unless given (the stream's variance then grows by a bounded
    factor, not exponentially, at init). Dense layers feeding a BatchNorm have no bias (the
    normalization cancels it; its gradient would be zero).
    """
    if norm not in NORMS:
        raise ValueError(f"resmlp: norm must be one of {NORMS}, got {norm!r}")
    alpha = 1 / math.sqrt(depth) if alpha is None else alpha
    bias = norm != "batch"

    def normed(act):
        if norm == "none":
            return [Dense(width, act)]
        kind = BatchNorm if norm == "batch" else LayerNorm
        return [Dense(width, use_bias=bias), kind(activation=act)]

    branch = (*normed(activation), *_dropout(dropout), *normed("identity"))
    return _net(
        "resmlp",
        (features,),
        [Dense(width), *[Residual(branch, alpha=alpha)] * depth, Dense(outputs, output_activation)],
        loss,
    )


def mlp(sizes, *, activation="relu", output_activation="identity",
        loss="softmax_cross_entropy", dropout=0.0) -> Net:  # fmt: skip
    """The :class:`fnbp.MLP` of ``sizes`` as a net, with ``Dropout(dropout)`` after each hidden
    layer."""
    hidden = [[Dense(n, activation), *_dropout(dropout)] for n in sizes[1:-1]]
    return _net(
        "mlp",
        (sizes[0],),
        [*(layer for block in hidden for layer in block), Dense(sizes[-1], output_activation)],
        loss,
    )


PRESETS = {"cnn": cnn, "mnist1d_cnn": mnist1d_cnn, "resmlp": resmlp}
