"""Shared test helpers: random data that fits a model, and random architectures."""

import jax
import jax.numpy as jnp
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
