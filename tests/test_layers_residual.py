"""Tests of fnbp/layers/residual.py: z = x + α·F(x) (or P x + α·F(x)). The rule against
``jax.vjp`` of the block's forward for branches of every kind, α = 0 passing δ back bit for
bit, the learned α's grad Σ⟨δ, F⟩ and the projection's grad and back against NumPy, and the
nested deltas (their structure, shapes and values) against autodiff of a hand-built block."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import (
    assert_rel_close,
    layer_rule,
    mixed_rule,
    random_masks,
    random_params,
    random_state,
)

from fnbp.layers import BatchNorm, Conv, Dense, Dropout, LayerNorm, MaxPool, Residual

# float64: a few layers of sums, each side rounding at ~1e-16; 1e-12 is loose for that and
# ten orders below any missing or misplaced term.
RTOL = 1e-12
BATCH = 5

CASES = {
    "dense-learned-alpha": (Residual((Dense(6, "tanh"), Dense(6)), 0.4, learn_alpha=True), (6,)),
    "post-activation": (  # F ends in a sigmoid (so ∂L/∂α = Σ⟨δ, σ(z)⟩), then a gelu on top
        Residual((Dense(6, "relu"), Dense(6, "sigmoid")), 1.3, learn_alpha=True, activation="gelu"),
        (6,),
    ),
    "projection": (Residual((Dense(4, "tanh"), Dense(9)), alpha=0.7), (6,)),
    "norms": (Residual((LayerNorm(), Dense(6, "tanh"), BatchNorm(activation="tanh")), 0.5), (6,)),
    "dropout": (Residual((Dense(6, "relu"), Dropout(0.3), Dense(6)), alpha=0.9), (6,)),
    "conv-projection": (
        Residual((Conv(3, (3, 3), activation="tanh"), BatchNorm(), Conv(5, (1, 1))), 0.6,
                 learn_alpha=True),
        (4, 4, 3),
    ),
    "conv-pool": (
        Residual((Conv(2, (2, 2), padding="VALID"), MaxPool((2, 2), (1, 1)),
                  Conv(3, (2, 2), padding=((1, 2), (1, 2)))), 0.8),
        (4, 4, 3),
    ),
    "nested": (
        Residual((Dense(6, "tanh"), Residual((Dense(6, "relu"), Dense(6)), alpha=0.5),
                  Dense(6)), alpha=0.8, learn_alpha=True),
        (6,),
    ),
}  # fmt: skip


def _setup(name, seed=0, dtype=np.float64):
    """The block, random params (off init), state and masks, inputs and δ, all from NumPy."""
    layer, in_shape = CASES[name]
    layer.validate()
    rng = np.random.default_rng(seed)
    p = random_params(layer, in_shape, rng, dtype)
    s = random_state(layer, in_shape, rng)
    mask = random_masks(layer, in_shape, BATCH, rng)
    x = rng.standard_normal((BATCH, *in_shape)).astype(dtype)
    delta = rng.standard_normal((BATCH, *layer.out_shape(in_shape))).astype(dtype)
    return layer, p, s, mask, x, delta


# eval mode as well where a branch holds a layer whose output depends on the mode
MODES = [(n, True) for n in CASES] + [(n, False) for n in ("norms", "conv-projection")]


@pytest.mark.parametrize(
    "name, train", MODES, ids=[f"{n}-{'train' if t else 'eval'}" for n, t in MODES]
)
def test_rule_equals_jax_vjp_of_the_block(name, train, x64):
    layer, p, s, mask, x, delta = _setup(name)
    mask = mask if train else layer.no_mask()
    r = layer_rule(layer, p, s, x, mask, train, delta)
    assert_rel_close((r.grads, r.back), (r.vjp_grads, r.vjp_back), RTOL)
    assert len(r.inner) == len(layer.branch)


@pytest.mark.parametrize("learn_alpha", [False, True])
def test_alpha_zero_passes_delta_back_bit_for_bit(learn_alpha):
    layer = Residual((Dense(6, "tanh"), Dense(6, "relu")), alpha=0.0, learn_alpha=learn_alpha)
    p = random_params(layer, (6,), np.random.default_rng(0), np.float32)
    if learn_alpha:
        p["alpha"] = np.zeros((), np.float32)
    x, delta = np.random.default_rng(1).standard_normal((2, BATCH, 6)).astype(np.float32)
    r = layer_rule(layer, p, {"branch": [{}, {}]}, x, [None, None], True, delta)
    chex.assert_trees_all_equal(r.back, delta)
    chex.assert_trees_all_equal(r.grads["branch"], jax.tree.map(np.zeros_like, p["branch"]))
    if learn_alpha:  # α itself still learns: Σ⟨δ, F⟩ ≠ 0
        assert float(np.abs(r.grads["alpha"])) > 1e-3


def _np_branch(p, x):
    """F(x) = W₂ tanh(W₁x + b₁) + b₂ in NumPy, with its pieces."""
    h = np.tanh(x @ p[0]["W"].T + p[0]["b"])
    return h, h @ p[1]["W"].T + p[1]["b"]


def test_learned_alpha_grad_is_the_sum_of_delta_times_the_branch_output(x64):
    layer, p, s, mask, x, delta = _setup("dense-learned-alpha", seed=1)
    r = layer_rule(layer, p, s, x, mask, True, delta)
    _, F = _np_branch(p["branch"], x)
    assert_rel_close(r.z, x + p["alpha"] * F, RTOL, "z")
    assert_rel_close(r.grads["alpha"], np.sum(delta * F), RTOL, "alpha")  # Σ ⟨δ, F(x)⟩


def test_projection_grad_and_back_equal_numpy(x64):
    # y = P x + α F(x), F = W₂ tanh(W₁ x + b₁) + b₂ mapping 6 features to 9; λ = 0.1 decays
    # P and both W (not the biases)
    layer, p, s, mask, x, delta = _setup("projection", seed=2)
    assert p["P"].shape == (9, 6)
    r = layer_rule(layer, p, s, x, mask, True, delta, 0.1)
    h, F = _np_branch(p["branch"], x)
    assert_rel_close(r.z, x @ p["P"].T + 0.7 * F, RTOL, "z")
    W1, W2 = p["branch"][0]["W"], p["branch"][1]["W"]
    d2 = 0.7 * delta  # δ_F = α δ (F's last activation is the identity)
    d1 = (d2 @ W2) * (1 - h**2)  # tanh′ = 1 − h²
    want = {
        "P": delta.T @ x + 0.1 * p["P"],  # Σₙ δ xᵀ + λP
        "branch": [
            {"W": d1.T @ x + 0.1 * W1, "b": d1.sum(0)},
            {"W": d2.T @ h + 0.1 * W2, "b": d2.sum(0)},
        ],
    }
    assert_rel_close(r.grads, want, RTOL, "grads")
    assert_rel_close(r.back, delta @ p["P"] + d1 @ W1, RTOL, "back")  # P⊤δ + ∂L/∂x|_F


def test_projection_on_the_channels_of_a_conv_input_equals_numpy(x64):
    layer, p, s, mask, x, delta = _setup("conv-projection")
    r = layer_rule(layer, p, s, x, layer.no_mask(), False, delta)
    # P acts on the last axis at every position: Σ over batch and space of δ xᵀ
    assert_rel_close(r.grads["P"], np.einsum("nhwo,nhwi->oi", delta, x), RTOL)


def test_nested_deltas_have_the_branch_structure_and_equal_dloss_dz(x64):
    # outer: x + 0.8·F(x), F = Dense₃(inner(tanh(Dense₁ x))), inner(a) = a + 0.5·G(a),
    # G = Dense(relu(Dense a)); the reference is autodiff of this block written out in jnp,
    # with an offset added to every z (outer branch and inner branch)
    layer, p, s, mask, x, delta = _setup("nested")
    inner = layer_rule(layer, p, s, x, mask, True, delta).inner
    V = p["branch"][1]["branch"]

    def block(o):
        def dense(q, a):
            return a @ q["W"].T + q["b"][None, :]

        z0 = dense(p["branch"][0], x) + o[0]
        a0 = jnp.tanh(z0)
        u0 = dense(V[0], a0) + o[1]["branch"][0]
        u1 = dense(V[1], jax.nn.relu(u0)) + o[1]["branch"][1]
        z1 = a0 + 0.5 * u1 + o[1]["out"]
        z2 = dense(p["branch"][2], z1) + o[2]
        return jnp.sum(delta * (x + p["alpha"] * z2))

    zeros = np.zeros((BATCH, 6))
    offsets = [zeros, {"out": zeros, "branch": [zeros, zeros]}, zeros]
    want = jax.jit(jax.grad(block))(offsets)
    chex.assert_trees_all_equal_shapes_and_dtypes(inner, offsets)
    assert_rel_close(inner, want, RTOL, "deltas")


def test_mixed_precision_grads_come_in_the_params_dtype():
    layer, p, s, mask, x, delta = _setup("norms", dtype=np.float32)
    x16, d16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(delta, jnp.bfloat16)
    z, _, grads, back, _ = mixed_rule(layer, p, s, x16, mask, True, d16)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, jax.tree.map(jnp.asarray, p))
    assert z.dtype == back.dtype == jnp.bfloat16
