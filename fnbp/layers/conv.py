"""Convolution, 1-D and 2-D, channels last: ``z = W ⋆ x + b``.

Inputs ``x`` of shape ``(batch, *spatial, C_in)`` (``(B, W, C)`` or ``(B, H, W, C)``), kernels
``W`` of shape ``(*kernel_size, C_in, C_out)`` (Flax's layout), strides ``s`` and padding
``(lo, hi)`` per spatial axis. With ``x̃`` the padded input,

    z[n, o, c] = Σ_{k, i} x̃[n, o·s + k, i] W[k, i, c] + b[c]

and the local rule (per spatial axis; λ the L2 strength)::

    ∂L/∂W[k, i, c] = Σ_{n, o} x̃[n, o·s + k, i] δ[n, o, c] + λW     a correlation of x with δ
    ∂L/∂b[c]       = Σ_{n, o} δ[n, o, c]
    ∂L/∂x          = full correlation of δ, dilated by s, with W flipped and C_in ↔ C_out

With stride 1 both are forward convolutions (``lax.conv_general_dilated``) with the operands'
roles swapped, the padding derived here; no autodiff. This is the same XLA program as JAX's own
transpose rule, so agreement with JAX's autodiff proves little for them: the tests add finite
differences and an im2col computation as independent witnesses.

With a stride > 1 those convolutions are dilated (δ spread out by s), and XLA's CPU backend
runs them slowly (the MNIST-1D CNN's whole train step took ~12% longer). There the same sums
are matmuls over the windows of x̃ (im2col, :func:`fnbp.layers.pool.windows`): with
``P[n, o, (k, i)] = x̃[n, o·s + k, i]`` as rows ``(B·O, K·C_in)`` and ``W`` as ``(K·C_in, C_out)``::

    ∂L/∂W = Pᵀ δ + λW,    ∂L/∂P = δ Wᵀ,    ∂L/∂x = Σ over the windows of ∂L/∂P   (unwindows)

the same formula, summed in another order (float32 results differ in the last bits).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from fnbp.initializers import draw_bias, draw_matrix
from fnbp.layers.base import Layer, LayerError, Outer, int_tuple, positive_int
from fnbp.layers.dense import decay
from fnbp.layers.pool import unwindows, windows

Array = jax.Array

# dimension numbers (lhs, rhs, out) of the forward, the weight gradient and the input gradient
_SPECS = {
    1: (("NWC", "WIO", "NWC"), ("CWN", "IWO", "WNC"), ("NWC", "WOI", "NWC")),
    2: (("NHWC", "HWIO", "NHWC"), ("CHWN", "IHWO", "HWNC"), ("NHWC", "HWOI", "NHWC")),
}


def _as_tuple(v):
    return (
        tuple(_as_tuple(e) if isinstance(e, list) else e for e in v) if isinstance(v, list) else v
    )


def same_padding(n: int, k: int, s: int) -> tuple[int, int]:
    """ "SAME": ``ceil(n / s)`` outputs, the padding split with the extra on the high side."""
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Conv(Layer):
    """A convolution: 1-D when ``kernel_size`` has one entry, 2-D with two.

    Arguments:
        features: output channels ``C_out``.
        kernel_size: ``(k,)`` or ``(kh, kw)``.
        strides: an int or one per spatial axis.
        padding: ``"SAME"``, ``"VALID"`` or one ``(lo, hi)`` pair per spatial axis.
        activation, use_bias: as for :class:`fnbp.layers.Dense`.

    Params ``{"W": (*kernel_size, C_in, C_out), "b": (C_out,)}``, drawn as a
    ``(C_out, prod(kernel_size)·C_in)`` matrix by the init scheme (fan_in = prod(k)·C_in, so
    σ_w² keeps its meaning; Glorot's fan_out is then C_out, not C_out·prod(k) as in PyTorch).
    """

    features: int
    kernel_size: tuple[int, ...]
    strides: int | tuple[int, ...] = 1
    padding: str | tuple = "SAME"
    activation: str = "identity"
    use_bias: bool = True
    kind = "conv"

    def normalize(self):
        for name in ("kernel_size", "strides", "padding"):
            self._set(name, _as_tuple(getattr(self, name)))
        if (
            isinstance(self.kernel_size, tuple)
            and isinstance(self.strides, int)
            and not isinstance(self.strides, bool)
        ):
            self._set("strides", (self.strides,) * len(self.kernel_size))

    @property
    def ndim(self) -> int:
        return len(self.kernel_size)

    def check(self):
        positive_int("features", self.features)
        if not isinstance(self.kernel_size, tuple) or len(self.kernel_size) not in (1, 2):
            raise LayerError(
                f"kernel_size must be a tuple of 1 (1-D) or 2 (2-D) positive ints, got "
                f"{self.kernel_size!r}"
            )
        int_tuple("kernel_size", self.kernel_size)
        int_tuple("strides", self.strides, self.ndim)
        p = self.padding
        if isinstance(p, str):
            if p not in ("SAME", "VALID"):
                raise LayerError(f"padding must be 'SAME', 'VALID' or (lo, hi) pairs, got {p!r}")
        elif not (
            isinstance(p, tuple) and len(p) == self.ndim
            and all(isinstance(q, tuple) and len(q) == 2 and all(
                isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in q) for q in p)
        ):  # fmt: skip
            raise LayerError(
                f"padding must be 'SAME', 'VALID' or {self.ndim} (lo, hi) pairs of ints >= 0, "
                f"got {p!r}"
            )
        if not isinstance(self.use_bias, bool):
            raise LayerError(f"use_bias must be True or False, got {self.use_bias!r}")

    def pads(self, spatial) -> list[tuple[int, int]]:
        if self.padding == "VALID":
            return [(0, 0)] * self.ndim
        if self.padding == "SAME":
            return [
                same_padding(n, k, s)
                for n, k, s in zip(spatial, self.kernel_size, self.strides, strict=True)
            ]
        return list(self.padding)

    def out_shape(self, in_shape):
        if len(in_shape) != self.ndim + 1:
            want = "(width, channels)" if self.ndim == 1 else "(height, width, channels)"
            raise LayerError(
                f"a {self.ndim}-D convolution needs per-example inputs of shape {want}, got "
                f"{in_shape}; put a Reshape(...) before it"
            )
        out = []
        for n, k, s, (lo, hi) in zip(
            in_shape[:-1], self.kernel_size, self.strides, self.pads(in_shape[:-1]), strict=True
        ):
            if n + lo + hi < k:
                raise LayerError(f"kernel {k} does not fit the padded input of size {n + lo + hi}")
            if s > n + lo + hi:
                raise LayerError(f"stride {s} does not fit the padded input of size {n + lo + hi}")
            out.append((n + lo + hi - k) // s + 1)
        return (*out, self.features)

    def init(self, key, in_shape, scheme, dtype):
        k_w, k_b = jax.random.split(key)
        c_in = in_shape[-1]
        W = draw_matrix(k_w, scheme, self.features, math.prod(self.kernel_size) * c_in, dtype)
        W = jnp.moveaxis(W.reshape(self.features, *self.kernel_size, c_in), 0, -1)
        return (
            {"W": W, "b": draw_bias(k_b, scheme, self.features, dtype)}
            if self.use_bias
            else {"W": W}
        )

    def forward(self, p, s, x, mask, train):
        spec = _SPECS[self.ndim][0]
        z = lax.conv_general_dilated(
            x, p["W"], self.strides, self.pads(x.shape[1:-1]), dimension_numbers=spec
        )
        if "b" in p:
            z = z + p["b"].reshape((1,) * (z.ndim - 1) + (-1,))
        return z, None, {}

    def window_pads(self, in_spatial, out_spatial) -> list[tuple[int, int]]:
        """The padding that makes x̃ exactly: the padded input may hold a few rows no window
        reaches, cropped from the high side (a negative ``hi``)."""
        return [(lo, hi - (n + lo + hi - k - (o - 1) * s))
                for n, o, k, s, (lo, hi) in zip(in_spatial, out_spatial, self.kernel_size, self.strides, self.pads(in_spatial), strict=True)]  # fmt: skip

    def backward(self, p, x, cache, delta, l2):
        W, d = p["W"], self.ndim
        _, w_spec, back_spec = _SPECS[d]
        n_in, n_out, pads = x.shape[1:-1], delta.shape[1:-1], self.pads(x.shape[1:-1])
        w_pads = self.window_pads(n_in, n_out)
        if any(s > 1 for s in self.strides):  # dilated convolutions: matmuls over windows instead
            return _backward_by_windows(self, p, x, delta, l2, w_pads)
        # ∂L/∂W[k, i, c] = Σ_{n,o} x̃[n, o·s + k, i] δ[n, o, c] + λW   (batch contracted like a feature)
        dW = lax.conv_general_dilated(
            x, delta, (1,) * d, w_pads, rhs_dilation=self.strides,
            dimension_numbers=w_spec, preferred_element_type=W.dtype,
        )  # fmt: skip
        grads = {"W": decay(dW, W, l2)} | _bias_grad(p, delta)
        # ∂L/∂x: δ dilated by the strides, fully correlated with the flipped kernel (C_in ↔ C_out)
        b_pads = [(k - 1 - lo, n + lo - 1 - (o - 1) * s)
                  for n, o, k, s, (lo, _) in zip(n_in, n_out, self.kernel_size, self.strides, pads, strict=True)]  # fmt: skip
        flipped = jnp.flip(W, axis=tuple(range(d))).astype(delta.dtype)
        back = lax.conv_general_dilated(
            delta, flipped, (1,) * d, b_pads, lhs_dilation=self.strides, dimension_numbers=back_spec
        )
        return grads, back, None

    def example_grads(self, p, x, cache, delta):
        rows_p = _patches(self, x, self.window_pads(x.shape[1:-1], delta.shape[1:-1]))[1]
        B = x.shape[0]
        # ∂ℓᵢ/∂W = Σₒ x̃ᵢ[o·s + k] ⊗ δᵢ[o]: the windows Pᵢ against δᵢ, kernel laid out (K·C_in, C_out)
        g = {
            "W": Outer(
                delta.reshape(B, -1, delta.shape[-1]), rows_p.reshape(B, -1, rows_p.shape[-1]), True
            )
        }
        space = tuple(range(1, delta.ndim - 1))
        return g | ({"b": jnp.sum(delta, axis=space)} if "b" in p else {})  # ∂ℓᵢ/∂b = Σₒ δᵢ[o]

    def weights(self, p):
        return [p["W"]]


def _patches(layer: Conv, x, pads):
    """``(x̃, P)``: the input padded (or cropped) by ``pads`` and its windows as rows
    ``P[n, o, (k, i)] = x̃[n, o·s + k, i]`` of shape ``(B·O, K·C_in)``, plus the windows'
    ``(B, *O, K, C_in)`` shape."""
    config = [(0, 0, 0), *[(lo, hi, 0) for lo, hi in pads], (0, 0, 0)]
    x_pad = lax.pad(x, jnp.zeros((), x.dtype), config)
    patches = windows(x_pad, layer.kernel_size, layer.strides)  # (B, *O, K, C_in)
    return x_pad, patches.reshape(-1, patches.shape[-2] * patches.shape[-1]), patches.shape


def _bias_grad(p, delta) -> dict:
    """``{"b": Σ δ}`` over every axis but the channels, or ``{}`` without a bias."""
    if "b" not in p:
        return {}
    return {"b": jnp.sum(delta, axis=tuple(range(delta.ndim - 1)), dtype=p["b"].dtype)}  # Σ δ


def _backward_by_windows(layer: Conv, p, x, delta, l2, pads):
    """The local rule by im2col (module docstring); ``pads`` pad ``x`` to x̃ exactly, its last
    window ending at its last row (a negative ``hi`` crops rows no window reaches)."""
    W, config = p["W"], [(0, 0, 0), *[(lo, hi, 0) for lo, hi in pads], (0, 0, 0)]
    x_pad, rows_p, windows_shape = _patches(layer, x, pads)  # P: (B·O, K·C_in)
    rows_d, W_rows = delta.reshape(-1, delta.shape[-1]), W.reshape(-1, W.shape[-1])
    dW = jnp.matmul(rows_p.T, rows_d, preferred_element_type=W.dtype)  # Pᵀ δ
    grads = {"W": decay(dW.reshape(W.shape), W, l2)} | _bias_grad(p, delta)  # + λW
    # ∂L/∂P = δ Wᵀ (summed in at least float32), added back where each window read x̃
    wide = jnp.promote_types(delta.dtype, jnp.float32)
    d_rows = jnp.matmul(rows_d, W_rows.astype(delta.dtype).T, preferred_element_type=wide)
    d_pad = unwindows(d_rows.reshape(windows_shape), x_pad.shape, layer.kernel_size, layer.strides)
    unpad = [(-lo, -hi, interior) for lo, hi, interior in config]  # x̃ -> x (0 for cropped rows)
    back = lax.pad(d_pad, jnp.zeros((), wide), unpad)
    return grads, back.astype(delta.dtype), None
