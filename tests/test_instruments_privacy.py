"""DP-SGD from one backward pass (fnbp/instruments/privacy.py) against vmap-and-clip: per-example
gradients by ``jax.vmap(jax.grad)`` of each example's own loss, clipped, summed, noised, averaged;
and its privacy accounting against published values."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import every_kind_net, nets, perturbed, random_net_data
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq
from scipy.special import ndtr

import fnbp
from fnbp.instruments import privacy
from fnbp.layers import (
    AvgPool,
    BatchNorm,
    Conv,
    Dense,
    Dropout,
    Flatten,
    LayerNorm,
    MaxPool,
    Residual,
)
from fnbp.model import _loss, draw_batch_masks, l2_penalty

# Compiling is most of these tests' time; level 0 gives the same results to rounding.
_quick_jit = functools.partial(
    jax.jit, static_argnames="train", compiler_options={"xla_backend_optimization_level": 0}
)


def _vmap_and_clip(params, net, x, y, l2, state, masks, train, clip_norm):
    """``(grads, norms)``: DP-SGD with σ = 0 from materialised per-example gradients."""

    def one(xi, yi, mi):  # ∂ℓᵢ/∂θ, the data term only, with example i's row of the masks
        rows = jax.tree.map(lambda m: m[None], mi)
        return jax.grad(_loss)(params, net, xi[None], yi[None], 0.0, None, state, rows, train)

    g = jax.vmap(one)(x, y, masks)
    norms = jnp.sqrt(
        sum(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1) for v in jax.tree.leaves(g))
    )
    c = jnp.minimum(1.0, clip_norm / norms)
    mean = jax.tree.map(lambda v: jnp.tensordot(c, v, axes=1) / x.shape[0], g)
    decay = jax.grad(lambda p: l2_penalty(p, net, l2))(params)  # λW on the weights, unclipped
    return jax.tree.map(jnp.add, mean, decay), norms


@_quick_jit
def _both(params, net, x, y, l2, state, key, train):
    """The reference and the hand-written ``_dp_grads`` (σ = 0) in one program, with ``C`` just
    under the median per-example norm so that clipping binds for about half the batch."""
    masks = draw_batch_masks(net, key, x.shape[0], train)
    _, ref_norms = _vmap_and_clip(params, net, x, y, l2, state, masks, train, 1.0)
    clip = 0.9 * jnp.median(ref_norms) + 1e-3  # > 0 even where every gradient is 0
    ref = _vmap_and_clip(params, net, x, y, l2, state, masks, train, clip)
    got = privacy._dp_grads(params, net, x, y, l2, state, masks, train, clip, 0.0, None)
    return got, ref, clip


def _close(actual, expected, rtol):
    """Within ``rtol`` of each entry plus ``rtol`` × the tree's largest entry (entries that
    cancel to nearly 0 are judged against the tree's scale)."""
    scale = max([float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(expected)] + [0.0])
    chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=rtol * scale + 1e-300)


def _check(net, batch, train, l2, seed):
    with jax.enable_x64(True):
        params, state = perturbed(seed, net, np.float64)
        x, y = random_net_data(seed, net, batch, np.float64)
        key = jax.random.key(seed, impl="rbg")  # cheap to compile, unlike threefry
        (grads, norms, loss), (ref_grads, ref_norms), clip = _both(
            params, net, x, y, l2, state, key, train
        )
        # float64: the same sums in different orders, ~1e-16 per operation (as
        # tests/test_backprop.py measures for the per-example grads); 1e-10 leaves room for depth.
        _close(norms, ref_norms, 1e-10)
        _close(grads, ref_grads, 1e-10)
        chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
        assert bool(jnp.any(ref_norms > clip)) or not bool(jnp.any(ref_norms > 1e-3))
        return loss


NETS = {
    "mlp": (fnbp.MLP((6, 7, 5, 3), "tanh"), False),
    "conv_pool": (
        fnbp.Net(
            (6, 6, 2),
            [
                Conv(3, (3, 3), padding="SAME", activation="relu"),
                MaxPool((2, 2)),
                Conv(2, (2, 2), strides=1, padding="VALID", activation="softplus"),
                AvgPool((2, 2)),
                Flatten(),
                Dense(3),
            ],
        ),
        False,
    ),
    "residual_layer_norm": (
        fnbp.Net(
            6,
            [
                Dense(5, "gelu"),
                Residual((Dense(5, "tanh"), LayerNorm()), 0.7, learn_alpha=True),
                Residual((Dense(4, "silu"),), 0.5),  # a projection 5 → 4
                Dense(3),
            ],
            "mse",
        ),
        False,
    ),
    "dropout": (fnbp.Net(6, [Dense(8, "relu"), Dropout(0.5), Dense(8, "tanh"), Dense(3)]), True),
    "every_kind_eval_batch_norm": (every_kind_net(), False),
}


@pytest.mark.parametrize("name", sorted(NETS))
def test_dp_grads_with_no_noise_equal_vmap_and_clip_in_float64(name):
    """MLP, convolutions and pools, residual blocks with LayerNorm and a projection, train-mode
    dropout (each example keeps its row of the key's masks), and every kind in eval mode
    (BatchNorm's running statistics); λ = 0.05 added unclipped."""
    net, train = NETS[name]
    _check(net, 5, train, 0.05, 3)


@st.composite
def net_cases(draw):
    net = draw(nets())
    return (
        net,
        draw(st.integers(1, 5)),
        draw(st.sampled_from([0.0, 0.05])),
        draw(st.integers(0, 99)),
    )


@settings(max_examples=4)  # each draw compiles anew; the named nets above cover every kind
@given(net_cases())
def test_dp_grads_with_no_noise_equal_vmap_and_clip_on_random_nets(case):
    net, batch, l2, seed = case
    _check(net, batch, not net.couples_examples, l2, seed)  # train mode unless BatchNorm


def _mlp_case(batch=6, seed=0, dtype=np.float64):
    net = fnbp.MLP((10, 20, 5), "tanh")
    params, _ = perturbed(seed, net, dtype)
    x, y = random_net_data(seed, net, batch, dtype)
    return net, params, x, y


@_quick_jit
def _reference(params, net, x, y, l2, state, key, train, clip_norm):
    masks = draw_batch_masks(net, key, x.shape[0], train)
    return _vmap_and_clip(params, net, x, y, l2, state, masks, train, clip_norm)


def test_public_dp_grads_draws_masks_as_backprop_does_and_noise_from_the_documented_stream():
    """``dp_grads`` (the public path: its own masks from ``key``) against vmap-and-clip with
    the masks ``fnbp.backprop`` draws from the same key (layer i's from fold_in(key, i));
    with C = ∞ the mean gradient is ``fnbp.backprop``'s. The noise is σC/B · N(0, 1) from
    split(fold_in(key, 2³¹ − 1), leaves), one key per leaf in params order (what a training
    step calling ``_dp_grads`` reproduces), and leaves the norms alone."""
    net, _ = NETS["dropout"]
    with jax.enable_x64(True):
        params, _ = perturbed(1, net, np.float64)
        x, y = random_net_data(1, net, 6, np.float64)
        key = jax.random.key(4, impl="rbg")  # cheap to compile
        ref, ref_norms = _reference(params, net, x, y, 0.05, None, key, True, 0.3)
        kw = dict(clip_norm=0.3, key=key, l2=0.05, train=True)
        got = fnbp.dp_grads(params, net, x, y, noise_multiplier=0, **kw)
        _close(got.norms, ref_norms, 1e-10)  # float64, as above
        _close(got.grads, ref, 1e-10)
        assert bool(jnp.all(ref_norms > 0.3))  # every example clipped
        unclipped = fnbp.dp_grads(
            params, net, x, y, clip_norm=1e300, noise_multiplier=0, key=key, l2=0.05, train=True
        )
        batch = fnbp.backprop(params, net, x, y, l2=0.05, key=key, train=True)
        _close(unclipped.grads, batch.grads, 1e-12)  # one backward, summed in another order

        noisy = fnbp.dp_grads(params, net, x, y, noise_multiplier=1.5, **kw)
        chex.assert_trees_all_equal(noisy.norms, got.norms)
        assert privacy.NOISE_STREAM >= len(net.layers)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.fold_in(key, 2**31 - 1), len(leaves))
        want = [
            1.5 * 0.3 / 6 * jax.random.normal(k, v.shape, v.dtype)
            for k, v in zip(keys, leaves, strict=True)
        ]
        # float64: (s + n)/B − s/B rounds at 1e-16 of (|s| + |n|)/B, both below 1
        chex.assert_trees_all_close(
            jax.tree.map(jnp.subtract, noisy.grads, got.grads),
            jax.tree.unflatten(treedef, want),
            rtol=1e-10,
            atol=1e-14,
        )


def test_clipping_scales_a_single_example_to_norm_c_in_float32():
    """A batch of one: ḡ = min(1, C/‖g‖) g, so ‖ḡ‖ = min(‖g‖, C), with g = backprop's grads;
    float32 params give float32 grads and norms."""
    net, params, x, y = _mlp_case(batch=1, dtype=np.float32)
    g = fnbp.backprop(params, net, x, y).grads
    norm = math.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in jax.tree.leaves(g)))
    for clip, scale in ((norm / 3, 1 / 3), (2 * norm, 1.0)):
        got, norms = fnbp.dp_grads(params, net, x, y, clip_norm=clip, noise_multiplier=0, key=None)
        # float32: the same products summed in another order, ~1e-7 relative per operation
        np.testing.assert_allclose(float(norms[0]), norm, rtol=1e-5)
        _close(got, jax.tree.map(lambda v, s=scale: s * v, g), 1e-5)
        chex.assert_trees_all_equal_shapes_and_dtypes(got, params)
        assert norms.shape == (1,) and norms.dtype == jnp.float32


def test_the_norms_are_of_the_data_term_and_l2_is_added_after_clipping():
    with jax.enable_x64(True):
        net, params, x, y = _mlp_case()
        kw = dict(clip_norm=0.1, noise_multiplier=0, key=None)
        plain, decayed = (
            fnbp.dp_grads(params, net, x, y, **kw),
            fnbp.dp_grads(params, net, x, y, l2=0.3, **kw),
        )
        chex.assert_trees_all_equal(plain.norms, decayed.norms)  # ‖gᵢ‖ without λW
        for p, a, b in zip(params, plain.grads, decayed.grads, strict=True):
            # λW on W exactly (float64 rounding of one addition), nothing on b
            np.testing.assert_allclose(b["W"] - a["W"], 0.3 * p["W"], rtol=1e-12, atol=1e-15)
            chex.assert_trees_all_equal(a["b"], b["b"])


def test_the_noise_is_gaussian_with_std_sigma_c_over_b():
    """z = (dp − clipped)·B/(σC) over 60 keys × 155 params = 9,300 draws: mean within 5
    standard errors of 0 (5/√N = 0.052), std within 5 standard errors of 1 (5/√(2N) = 0.037),
    neighbouring entries uncorrelated. The net and arguments of the test above (its programs,
    compiled once), each key's masks in both calls."""
    net, _ = NETS["dropout"]
    with jax.enable_x64(True):
        params, _ = perturbed(1, net, np.float64)
        x, y = random_net_data(1, net, 6, np.float64)
        zs = []
        for k in range(60):
            kw = dict(clip_norm=0.3, key=jax.random.key(k, impl="rbg"), l2=0.05, train=True)
            quiet = fnbp.dp_grads(params, net, x, y, noise_multiplier=0, **kw)
            noisy = fnbp.dp_grads(params, net, x, y, noise_multiplier=1.5, **kw)
            diff = jax.tree.map(lambda a, b: (a - b) * 6 / (1.5 * 0.3), noisy.grads, quiet.grads)
            zs.append(np.concatenate([np.ravel(v) for v in jax.tree.leaves(diff)]))
    z = np.stack(zs)
    assert z.shape == (60, 155)
    assert abs(z.mean()) < 5 / math.sqrt(z.size), z.mean()
    assert abs(z.std() - 1) < 5 / math.sqrt(2 * z.size), z.std()
    assert abs(np.corrcoef(z[:, :-1].ravel(), z[:, 1:].ravel())[0, 1]) < 5 / math.sqrt(z.size)
    assert abs(np.corrcoef(z[:-1].ravel(), z[1:].ravel())[0, 1]) < 5 / math.sqrt(z.size)  # keys


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(clip_norm=0.0), ValueError, "clip_norm must be a finite number > 0, got 0.0"),
        (dict(clip_norm=-1.0), ValueError, "clip_norm"),
        (dict(clip_norm=math.inf), ValueError, "clip_norm"),
        (dict(clip_norm=math.nan), ValueError, "clip_norm"),
        (dict(clip_norm="1"), TypeError, "clip_norm must be a finite number > 0, got '1'"),
        (dict(clip_norm=True), TypeError, "clip_norm"),
        (dict(clip_norm=jnp.ones(2)), TypeError, "clip_norm"),
        (dict(noise_multiplier=-0.5), ValueError, "noise_multiplier must be a finite number >= 0"),
        (dict(noise_multiplier=math.inf), ValueError, "noise_multiplier"),
        (
            dict(noise_multiplier=1.0, key=None),
            ValueError,
            "noise_multiplier=1.0 adds .* pass key=",
        ),
        (dict(key=np.zeros(3)), TypeError, "key must be a single JAX PRNG key"),
        (dict(l2=-1.0), ValueError, "l2"),
    ],
)
def test_dp_grads_rejects_bad_arguments_naming_them(kw, error, match):
    net, params, x, y = _mlp_case(dtype=np.float32)
    args = dict(clip_norm=1.0, noise_multiplier=0.0, key=jax.random.key(0)) | kw
    with pytest.raises(error, match=match):
        fnbp.dp_grads(params, net, x, y, **args)


def test_dp_grads_refuses_train_mode_batch_norm_and_dropout_without_a_key():
    net = fnbp.Net(3, [Residual((BatchNorm(),)), Dense(2)])
    params, state = perturbed(0, net)
    x, y = random_net_data(0, net, 4)
    kw = dict(clip_norm=1.0, noise_multiplier=0.0, key=None, state=state)
    with pytest.raises(
        ValueError, match=r"dp_grads: .*layer 1 \(residual\) branch layer 1 \(batch_norm\)"
    ):
        fnbp.dp_grads(params, net, x, y, train=True, **kw)
    fnbp.dp_grads(params, net, x, y, train=False, **kw)  # eval mode: defined
    net, _ = NETS["dropout"]
    params, _ = perturbed(0, net)
    x, y = random_net_data(0, net, 4)
    with pytest.raises(ValueError, match="dp_grads: .*dropout.* pass key="):
        fnbp.dp_grads(params, net, x, y, clip_norm=1.0, noise_multiplier=0, key=None, train=True)


# ----------------------------------------------------------------------------------------------
# Accounting.


def test_epsilon_matches_opacus_documented_rdp_value():
    # Opacus's documentation of compute_dp_sgd_privacy
    # (https://opacus.ai/api/compute_dp_sgd_privacy.html): sample rate 0.01, noise multiplier
    # 1.0, 3 epochs = 300 steps, δ = 1e-5, alphas 2 5 10 20 100 → "epsilon = 2.39", optimal
    # alpha 5. Printed to two decimals: ±0.005.
    got = privacy.epsilon(1.0, 0.01, 300, 1e-5, orders=(2, 5, 10, 20, 100))
    assert abs(got - 2.39) <= 0.005, got


def test_epsilon_of_the_tf_privacy_mnist_tutorial_is_below_its_looser_conversion():
    # TF-Privacy's tutorials/README.md: noise multiplier 1.12, batch 256 of 60,000, 60 epochs
    # (⌈60·60000/256⌉ = 14,063 steps), δ = 1e-5 → ε = 2.92, from RDP with the original
    # conversion ε = min_α RDP(α) + log(1/δ)/(α − 1). dp-accounting converts with Canonne,
    # Kamath and Steinke 2020 (Prop. 12), which at every α is smaller by
    # log(α)/(α − 1) − log(1 − 1/α) > 0, about 0.4 at the optimal α ≈ 8–9: so below 2.92, and
    # not by more than half a unit (a wrong q or step count would move it by far more).
    rdp = privacy.epsilon(1.12, 256 / 60000, 14063, 1e-5)
    assert 2.92 - 0.5 < rdp < 2.92, rdp
    pld = privacy.epsilon(1.12, 256 / 60000, 14063, 1e-5, accountant="pld")
    assert 0.8 * rdp < pld < rdp, (pld, rdp)  # PLD is tighter than RDP, not wildly so


def test_pld_epsilon_of_composed_gaussians_matches_the_analytic_gaussian_mechanism():
    # With q = 1, n steps of noise σ are one Gaussian mechanism of noise σ/√n (sensitivity 1),
    # whose exact δ(ε) = Φ(−εs + 1/(2s)) − e^ε Φ(−εs − 1/(2s)), s = σ/√n (Balle and Wang 2018,
    # Theorem 8). PLD's discretisation (1e-4 of the privacy loss) is pessimistic by less than
    # 1e-4 relative; RDP is an upper bound.
    sigma, n, delta = 2.0, 16, 1e-5
    s = sigma / math.sqrt(n)
    exact = brentq(
        lambda e: ndtr(-e * s + 1 / (2 * s)) - math.exp(e) * ndtr(-e * s - 1 / (2 * s)) - delta,
        0,
        100,
    )
    pld = privacy.epsilon(sigma, 1.0, n, delta, accountant="pld")
    assert exact <= pld <= exact * (1 + 1e-4), (pld, exact)
    assert privacy.epsilon(sigma, 1.0, n, delta) > exact


def test_epsilon_edges_and_monotonicity():
    assert privacy.epsilon(1.0, 0.01, 0, 1e-5) == 0.0
    assert privacy.epsilon(0.0, 0.01, 10, 1e-5) == math.inf
    few, many = (privacy.epsilon(1.0, 0.01, n, 1e-5) for n in (100, 1000))
    assert 0 < few < many
    assert privacy.epsilon(2.0, 0.01, 1000, 1e-5) < many  # more noise, less ε


@pytest.mark.parametrize(
    "args, kw, match",
    [
        ((-1.0, 0.01, 10, 1e-5), {}, "noise_multiplier"),
        ((1.0, 0.0, 10, 1e-5), {}, "sampling_rate"),
        ((1.0, 1.5, 10, 1e-5), {}, r"sampling_rate must be in \(0, 1\], got 1.5"),
        ((1.0, 0.01, -1, 1e-5), {}, "steps must be an integer >= 0, got -1"),
        ((1.0, 0.01, 2.5, 1e-5), {}, "steps"),
        ((1.0, 0.01, 10, 0.0), {}, "delta"),
        ((1.0, 0.01, 10, 1.0), {}, r"delta must be in \(0, 1\), got 1.0"),
        ((1.0, 0.01, 10, 1e-5), {"accountant": "moments"}, "accountant must be one of"),
        ((1.0, 0.01, 10, 1e-5), {"accountant": "pld", "orders": (2, 3)}, "orders"),
    ],
)
def test_epsilon_rejects_bad_arguments_naming_them(args, kw, match):
    with pytest.raises(ValueError, match=match):
        privacy.epsilon(*args, **kw)
