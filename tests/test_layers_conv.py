"""Tests of fnbp/layers/conv.py: the convolution's forward and local backward rule.

The hand-written backward compiles to the same XLA program as JAX's transpose rule, so
agreement with ``jax.vjp`` proves little on its own. Three witnesses that share nothing with it
stand beside it: a NumPy loop convolution for the forward, an im2col computation in NumPy
(explicit patches, dW = patchesᵀ·δ, dx scattered back) and central finite differences in
float64 for dW, db and dx.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from oracles import (
    assert_rel_close,
    central_fd,
    layer_rule,
    mixed_rule,
    np_conv,
    np_conv_backward_im2col,
    np_pads,
)

from fnbp.layers import Conv

# (input spatial size, kernel, strides, padding): 1-D and 2-D; strides 1, 2, 3; SAME, VALID and
# explicit asymmetric padding; non-square kernels; sizes the stride does not divide; and
# (9, k 2, s 3) / (7, k 3, s 3, pad (0, 3)), where the last rows of the padded input are read by
# no window (the rule must crop them); padding wider than the kernel (3 > k − 1); a kernel
# taller than the input (2 rows, k 3, SAME).
CASES = [
    ((7,), (3,), (1,), "SAME"),
    ((8,), (3,), (2,), "SAME"),
    ((10,), (4,), (3,), "VALID"),
    ((9,), (2,), (3,), "VALID"),
    ((9,), (2,), (2,), ((2, 1),)),
    ((7,), (3,), (3,), ((0, 3),)),
    ((6,), (2,), (2,), ((3, 0),)),
    ((7, 6), (3, 2), (1, 1), "SAME"),
    ((8, 7), (3, 3), (2, 2), "SAME"),
    ((7, 9), (2, 3), (3, 2), "VALID"),
    ((6, 7), (3, 2), (2, 3), ((1, 2), (0, 1))),
    ((5, 5), (1, 3), (3, 1), ((2, 0), (1, 1))),
    ((2, 5), (3, 3), (1, 2), "SAME"),
]
IDS = [f"{len(k)}d-n{n}-k{k}-s{s}-{p}" for n, k, s, p in CASES]
B, C_IN, C_OUT = 2, 2, 3

# float64: the NumPy and XLA sums differ only in order, a few ulps of each output (1e-16
# relative); 1e-12 leaves room for the summation length and is far below any wrong index.
RTOL = 1e-12


def _setup(case, seed=0, use_bias=True, dtype=np.float64):
    n, kernel, strides, padding = case
    layer = Conv(C_OUT, kernel, strides, padding, use_bias=use_bias)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, *n, C_IN)).astype(dtype)
    p = {"W": rng.standard_normal((*kernel, C_IN, C_OUT)).astype(dtype)}
    if use_bias:
        p["b"] = rng.standard_normal((C_OUT,)).astype(dtype)
    out = layer.out_shape((*n, C_IN))
    delta = rng.standard_normal((B, *out)).astype(dtype)
    return layer, p, x, delta, np_pads(padding, n, kernel, strides)


@functools.cache
def _run(case, use_bias=True):
    """``(layer, p, x, δ, pads, run)`` for a case: the forward, the rule and jax.vjp run once,
    in float64, in one compiled program; each witness below compares with the same numbers."""
    layer, p, x, delta, pads = _setup(case, seed=1, use_bias=use_bias)
    with jax.enable_x64(True):
        run = jax.tree.map(np.asarray, layer_rule(layer, p, {}, x, None, False, delta))
    return layer, p, x, delta, pads, run


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_equals_a_numpy_loop_convolution(case):
    layer, p, x, _, pads, run = _run(case)
    assert run.z.shape == (B, *layer.out_shape(x.shape[1:]))
    assert_rel_close(run.z, np_conv(x, p["W"], p["b"], case[2], pads), RTOL, "z")


@pytest.mark.parametrize("case", [c for c in CASES if c[3] == "SAME"], ids=lambda c: str(c))
def test_same_padding_gives_the_output_of_lax_same(case, x64):
    # lax derives its own "SAME" padding: an independent check of fnbp's derivation
    layer, p, x, _, _, run = _run(case)
    spec = ("NWC", "WIO", "NWC") if len(case[1]) == 1 else ("NHWC", "HWIO", "NHWC")
    want = lax.conv_general_dilated(x, p["W"], case[2], "SAME", dimension_numbers=spec)
    want = want + p["b"].reshape((1,) * (want.ndim - 1) + (-1,))
    assert_rel_close(run.z, want, RTOL, "z")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_equals_a_numpy_im2col_computation(case):
    layer, p, x, delta, pads, run = _run(case)
    dW, db, dx = np_conv_backward_im2col(x, p["W"], delta, case[2], pads)
    assert run.inner is None
    assert_rel_close(run.grads, {"W": dW, "b": db}, RTOL, "grads")
    assert_rel_close(run.back, dx, RTOL, "back")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_equals_central_finite_differences_of_the_numpy_convolution(case):
    layer, p, x, delta, pads, run = _run(case)

    def loss(W, b, x):  # ⟨δ, z⟩: its gradient is what the rule returns
        return np.sum(delta * np_conv(x, W, b, case[2], pads))

    # z is linear in each of W, b, x, so the central quotient has no truncation error: only
    # rounding, ~1e-16·|loss|/ε ≈ 1e-13 at ε = 1e-3; 1e-9 is far below any wrong term (O(1)).
    eps = 1e-3
    fd = {
        "W": central_fd(lambda W: loss(W, p["b"], x), p["W"], eps),
        "b": central_fd(lambda b: loss(p["W"], b, x), p["b"], eps),
    }
    assert_rel_close(run.grads, fd, 1e-9, "grads")
    fd_x = central_fd(lambda v: loss(p["W"], p["b"], v), x, eps)
    assert_rel_close(run.back, fd_x, 1e-9, "back")


@pytest.mark.parametrize(
    "case, use_bias", [(c, True) for c in CASES] + [(CASES[10], False)], ids=[*IDS, "no-bias"]
)
def test_backward_equals_jax_vjp(case, use_bias):
    # the weakest witness for conv (the same XLA program), kept for the structure and dtypes
    layer, p, x, delta, _, run = _run(case, use_bias)
    assert set(run.grads) == set(p)
    assert_rel_close((run.grads, run.back), (run.vjp_grads, run.vjp_back), RTOL)


def test_l2_adds_lambda_w_to_the_kernel_grad_only(x64):
    layer, p, x, delta, _ = _setup(CASES[8], seed=4)
    r0 = layer_rule(layer, p, {}, x, None, False, delta, 0.0)
    r1 = layer_rule(layer, p, {}, x, None, False, delta, 0.25)  # λ traced: the same program
    assert_rel_close(r1.grads["W"], r0.grads["W"] + 0.25 * p["W"], 1e-14)
    chex.assert_trees_all_equal((r1.grads["b"], r1.back), (r0.grads["b"], r0.back))


@pytest.mark.parametrize("case", [CASES[1], CASES[10]], ids=[IDS[1], IDS[10]])
def test_mixed_precision_grads_come_in_the_params_dtype_and_back_in_the_compute_dtype(case):
    # the engine hands the rule float32 master params beside bfloat16 activations and δ
    layer, p, x, delta, pads = _setup(case, seed=5, dtype=np.float32)
    x16, d16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(delta, jnp.bfloat16)
    z, _, grads, back, _ = mixed_rule(layer, p, {}, x16, None, False, d16)
    assert z.dtype == jnp.bfloat16
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, jax.tree.map(jnp.asarray, p))
    assert back.dtype == jnp.bfloat16 and back.shape == x.shape
    # the float32 sums of bfloat16 products: within bfloat16 rounding of the exact im2col sums
    # of the same bfloat16 values (8 bits of mantissa: 2⁻⁸ ≈ 4e-3 per input, a few together)
    dW, db, dx = np_conv_backward_im2col(
        np.asarray(x16, np.float64), p["W"], np.asarray(d16, np.float64), case[2], pads
    )
    assert_rel_close(grads, {"W": dW, "b": db}, 1e-5, "grads")  # only the float32 sum order
    assert_rel_close(back, dx, 3e-2, "back")  # W cast to bfloat16, the result bfloat16
