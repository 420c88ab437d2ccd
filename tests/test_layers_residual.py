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
    random_masks,
    random_params,
    random_state,
    vjp_rule,
)

from fnbp.layers import BatchNorm, Conv, Dense, Dropout, LayerNorm, MaxPool, Residual

# float64: a few layers of sums, each side rounding at ~1e-16; 1e-12 is loose for that and
# ten orders below any missing or misplaced term.
RTOL = 1e-12
BATCH = 5

CASES = {
    "dense": (Residual((Dense(6, "tanh"), Dense(6)), alpha=0.7), (6,)),
    "learned-alpha-post-act": (
        Residual((Dense(6, "tanh"), Dense(6, "sigmoid")), alpha=0.3, learn_alpha=True,
                 activation="gelu"),
        (6,),
    ),
    "projection": (Residual((Dense(4, "relu"), Dense(9)), alpha=1.2, learn_alpha=True), (6,)),
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
MODES = [(n, True) for n in CASES] + [(n, False) for n in ("norms", "dropout", "conv-projection")]


@pytest.mark.parametrize(
    "name, train", MODES, ids=[f"{n}-{'train' if t else 'eval'}" for n, t in MODES]
)
def test_rule_equals_jax_vjp_of_the_block(name, train, x64):
    layer, p, s, mask, x, delta = _setup(name)
    mask = mask if train else layer.no_mask()
    _, _, grads, back, inner = layer_rule(layer, p, s, x, mask, train, delta)
    g_ref, back_ref = vjp_rule(layer, p, s, x, mask, train, delta)
    assert_rel_close((grads, back), (g_ref, back_ref), RTOL)
    assert len(inner) == len(layer.branch)


@pytest.mark.parametrize("learn_alpha", [False, True])
def test_alpha_zero_passes_delta_back_bit_for_bit(learn_alpha):
    layer = Residual((Dense(6, "tanh"), Dense(6, "relu")), alpha=0.0, learn_alpha=learn_alpha)
    p = random_params(layer, (6,), np.random.default_rng(0), np.float32)
    if learn_alpha:
        p["alpha"] = np.zeros((), np.float32)
    x, delta = np.random.default_rng(1).standard_normal((2, BATCH, 6)).astype(np.float32)
    _, _, grads, back, _ = layer_rule(layer, p, {"branch": [{}, {}]}, x, [None, None], True, delta)
    chex.assert_trees_all_equal(back, delta)
    chex.assert_trees_all_equal(grads["branch"], jax.tree.map(jnp.zeros_like, p["branch"]))
    if learn_alpha:  # α itself still learns: Σ⟨δ, F⟩ ≠ 0
        assert float(jnp.abs(grads["alpha"])) > 1e-3


def _np_branch(p, x):
    """F(x) = W₂ tanh(W₁x + b₁) + b₂ in NumPy, with its pieces."""
    h = np.tanh(x @ p[0]["W"].T + p[0]["b"])
    return h, h @ p[1]["W"].T + p[1]["b"]


def test_learned_alpha_grad_is_the_sum_of_delta_times_the_branch_output(x64):
    layer = Residual((Dense(6, "tanh"), Dense(6)), alpha=0.4, learn_alpha=True)
    p = random_params(layer, (6,), np.random.default_rng(4))
    x = np.random.default_rng(6).standard_normal((BATCH, 6))
    delta = np.random.default_rng(0).standard_normal((BATCH, 6))
    z, _, grads, _, _ = layer_rule(layer, p, {"branch": [{}, {}]}, x, [None, None], True, delta)
    _, F = _np_branch(p["branch"], x)
    assert_rel_close(z, x + p["alpha"] * F, RTOL, "z")
    assert_rel_close(grads["alpha"], np.sum(delta * F), RTOL, "alpha")  # Σ ⟨δ, F(x)⟩


def test_projection_grad_and_back_equal_numpy(x64):
    # y = P x + α F(x), F = W₂ tanh(W₁ x + b₁) + b₂ mapping 6 features to 9; λ = 0.1 decays
    # P and both W (not the biases, not α)
    layer = Residual((Dense(4, "tanh"), Dense(9)), alpha=0.7)
    p = random_params(layer, (6,), np.random.default_rng(7))
    assert p["P"].shape == (9, 6)
    pn = p
    x = np.random.default_rng(1).standard_normal((BATCH, 6))
    delta = np.random.default_rng(2).standard_normal((BATCH, 9))
    z, _, grads, back, _ = layer_rule(layer, p, {"branch": [{}, {}]}, x, [None, None], True,
                                      delta, 0.1)  # fmt: skip
    h, F = _np_branch(pn["branch"], x)
    assert_rel_close(z, x @ pn["P"].T + 0.7 * F, RTOL, "z")
    d2 = 0.7 * delta  # δ_F = α δ (F's last activation is the identity)
    d1 = (d2 @ pn["branch"][1]["W"]) * (1 - h**2)  # tanh′ = 1 − h²
    want = {
        "P": delta.T @ x + 0.1 * pn["P"],  # Σₙ δ xᵀ + λP
        "branch": [
            {"W": d1.T @ x + 0.1 * pn["branch"][0]["W"], "b": d1.sum(0)},
            {"W": d2.T @ h + 0.1 * pn["branch"][1]["W"], "b": d2.sum(0)},
        ],
    }
    assert_rel_close(grads, want, RTOL, "grads")
    assert_rel_close(back, delta @ pn["P"] + d1 @ pn["branch"][0]["W"], RTOL, "back")  # P⊤δ + …


def test_projection_on_the_channels_of_a_conv_input_equals_numpy(x64):
    layer, p, s, mask, x, delta = _setup("conv-projection")
    _, _, grads, _, _ = layer_rule(layer, p, s, x, mask, False, delta)
    xn, dn = np.asarray(x), np.asarray(delta)
    # P acts on the last axis at every position: Σ over batch and space of δ xᵀ
    assert_rel_close(grads["P"], np.einsum("nhwo,nhwi->oi", dn, xn), RTOL)


def test_nested_deltas_have_the_branch_structure_and_equal_dloss_dz(x64):
    # outer: x + 0.8·F(x), F = Dense₃(inner(tanh(Dense₁ x))), inner(a) = a + 0.5·G(a),
    # G = Dense(relu(Dense a)); the reference is autodiff of this block written out in jnp,
    # with an offset added to every z (outer branch and inner branch)
    layer, p, s, mask, x, delta = _setup("nested")
    _, _, _, _, inner = layer_rule(layer, p, s, x, mask, True, delta)
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
    want = jax.grad(block)(offsets)
    chex.assert_trees_all_equal_shapes_and_dtypes(inner, offsets)
    assert_rel_close(inner, want, RTOL, "deltas")


def test_mixed_precision_grads_come_in_the_params_dtype():
    layer, p, s, mask, x, delta = _setup("conv-projection", dtype=np.float32)
    x16, d16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(delta, jnp.bfloat16)
    p16 = jax.tree.map(lambda v: jnp.asarray(v, jnp.bfloat16), p)
    z, cache, _ = layer.forward(p16, s, x16, mask, True)
    grads, back, _ = layer.backward(p, x16, cache, d16, 0.0)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, p)
    assert z.dtype == back.dtype == jnp.bfloat16
