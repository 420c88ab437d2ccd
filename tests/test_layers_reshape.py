"""Tests of fnbp/layers/reshape.py: Flatten and Reshape move entries without touching them, so
their rules are exact: δ reshaped back, bit for bit equal to ``jax.vjp`` and to NumPy."""

import chex
import numpy as np
import pytest
from oracles import layer_rule

from fnbp.layers import Flatten, Reshape

CASES = [
    (Flatten(), (3, 4, 5, 2), (3, 40)),
    (Flatten(), (2, 7, 3), (2, 21)),
    (Flatten(), (4, 6), (4, 6)),
    (Reshape((8, 8, 1)), (2, 64), (2, 8, 8, 1)),
    (Reshape((6, 2)), (3, 4, 3), (3, 6, 2)),
]


@pytest.mark.parametrize("layer, in_shape, out_shape", CASES, ids=lambda v: str(v))
def test_forward_and_rule_are_numpy_reshapes_and_equal_jax_vjp_bitwise(layer, in_shape, out_shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(in_shape).astype(np.float32)
    delta = rng.standard_normal(out_shape).astype(np.float32)
    assert layer.out_shape(in_shape[1:]) == out_shape[1:]
    r = layer_rule(layer, {}, {}, x, None, False, delta)
    chex.assert_trees_all_equal(
        (r.z, r.grads, r.back), (x.reshape(out_shape), {}, delta.reshape(in_shape))
    )
    assert r.inner is None
    chex.assert_trees_all_equal((r.grads, r.back), (r.vjp_grads, r.vjp_back))


def test_reshape_to_a_shape_with_another_number_of_entries_is_refused():
    with pytest.raises(ValueError, match=r"cannot reshape per-example shape \(10,\)"):
        Reshape((3, 3)).out_shape((10,))
