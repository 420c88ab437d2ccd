"""Tests of fnbp/initializers.py: the documented distributions, σ_w², purity and bad input."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp

# The module docstring's table, written out again here (not read from scheme.weight_variance):
# Var(W_ij) for a layer with fan_in inputs and fan_out outputs.
EXPECTED_VARIANCE = {
    "he_normal": lambda fi, fo: 2.0 / fi,
    "he_uniform": lambda fi, fo: 2.0 / fi,
    "lecun_normal": lambda fi, fo: 1.0 / fi,
    "lecun_uniform": lambda fi, fo: 1.0 / fi,
    "glorot_normal": lambda fi, fo: 2.0 / (fi + fo),
    "glorot_uniform": lambda fi, fo: 2.0 / (fi + fo),
    "orthogonal": lambda fi, fo: 1.0 / max(fi, fo),
    "standard_uniform": lambda fi, fo: 1.0 / (3.0 * fi),
    "naive": lambda fi, fo: 1e-4,
}

# Half-width a of U(±a) for the uniform schemes.
UNIFORM_BOUND = {
    "he_uniform": lambda fi, fo: math.sqrt(6.0 / fi),
    "lecun_uniform": lambda fi, fo: math.sqrt(3.0 / fi),
    "glorot_uniform": lambda fi, fo: math.sqrt(6.0 / (fi + fo)),
    "standard_uniform": lambda fi, fo: 1.0 / math.sqrt(fi),
}

TRUNCATED = ["he_normal", "lecun_normal", "glorot_normal"]
# jax.nn.initializers draw N(0,1) cut at ±2 and divide by its std, 0.8796: |W| ≤ 2σ/0.8796.
TRUNCATED_STD = 0.87962566103423978

FANS = [(300, 500), (500, 300)]

# Sampling: 150 000 i.i.d. entries give a relative standard error of the variance of
# √(2/n) ≈ 0.4% (less for uniform and truncated draws), so 5% is > 10 standard errors and still
# catches any wrong fan (300 vs 500 is 40%) or factor.
VAR_RTOL = 0.05

# float32 rounding of the bound itself (√(3·var) is computed in float32): one ulp of slack.
ULP32 = 1.0 + 2.0**-22


def _layer(fan_in, fan_out, scheme, dtype=jnp.float32, seed=0):
    (p,) = fnbp.init_params(jax.random.key(seed), fnbp.MLP((fan_in, fan_out)), scheme, dtype=dtype)
    return p


def test_expected_variance_table_covers_every_scheme():
    assert sorted(EXPECTED_VARIANCE) == sorted(fnbp.SCHEMES)


@pytest.mark.parametrize(("fan_in", "fan_out"), FANS)
@pytest.mark.parametrize("name", sorted(fnbp.SCHEMES))
def test_weight_variance_mean_shape_and_zero_bias_match_the_table(name, fan_in, fan_out):
    p = _layer(fan_in, fan_out, name)
    assert p["W"].dtype == jnp.float32 and p["b"].dtype == jnp.float32  # the default dtype
    W = np.asarray(p["W"], np.float64)
    assert W.shape == (fan_out, fan_in)
    assert p["b"].shape == (fan_out,)
    np.testing.assert_array_equal(np.asarray(p["b"]), 0.0)
    want = EXPECTED_VARIANCE[name](fan_in, fan_out)
    assert W.var() == pytest.approx(want, rel=VAR_RTOL)
    # Mean: its standard error is √(var/n); 5 standard errors.
    assert abs(W.mean()) < 5 * math.sqrt(want / W.size)


@pytest.mark.parametrize("name", sorted(fnbp.SCHEMES))
def test_float64_draws_have_the_tabled_variance(name, x64):
    p = _layer(300, 500, name, jnp.float64)
    assert p["W"].dtype == jnp.float64 and p["b"].dtype == jnp.float64
    assert float(jnp.var(p["W"])) == pytest.approx(EXPECTED_VARIANCE[name](300, 500), rel=VAR_RTOL)


_BF16_NAMES = sorted(fnbp.SCHEMES)


@pytest.mark.parametrize("name", _BF16_NAMES)
def test_bfloat16_params_have_the_requested_dtype(name):
    dtype = jnp.bfloat16
    params = fnbp.init_params(jax.random.key(0), fnbp.MLP((30, 20, 10)), name, dtype=dtype)
    assert [(p["W"].dtype, p["b"].dtype) for p in params] == [(dtype, dtype)] * 2
    assert [p["W"].shape for p in params] == [(20, 30), (10, 20)]


def test_bfloat16_draws_keep_the_tabled_variance():
    # bfloat16 rounds each entry by ≤ 2^-9 relative: the variance moves by < 1%.
    p = _layer(300, 500, "he_normal", jnp.bfloat16)
    assert float(jnp.var(p["W"].astype(jnp.float32))) == pytest.approx(2.0 / 300, rel=VAR_RTOL)


@pytest.mark.parametrize(("fan_in", "fan_out"), [(300, 500), (500, 300), (784, 16)])
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("he_normal", lambda fi, fo: 2.0),
        ("he_uniform", lambda fi, fo: 2.0),
        ("lecun_normal", lambda fi, fo: 1.0),
        ("lecun_uniform", lambda fi, fo: 1.0),
        ("glorot_normal", lambda fi, fo: 2.0 * fi / (fi + fo)),
        ("glorot_uniform", lambda fi, fo: 2.0 * fi / (fi + fo)),
        ("orthogonal", lambda fi, fo: fi / max(fi, fo)),
        ("standard_uniform", lambda fi, fo: 1.0 / 3.0),
        ("naive", lambda fi, fo: 1e-4 * fi),
    ],
)
def test_sigma_w2_follows_the_table(name, expected, fan_in, fan_out):
    assert fnbp.sigma_w2(name, fan_in, fan_out) == pytest.approx(
        expected(fan_in, fan_out), rel=1e-12
    )


def test_sigma_w2_accepts_a_scheme_object():
    assert fnbp.sigma_w2(fnbp.normal_scheme(0.1), 400, 7) == pytest.approx(0.01 * 400, rel=1e-12)
    assert fnbp.sigma_w2(fnbp.variance_scaling_scheme(1.7), 400, 7) == pytest.approx(1.7, rel=1e-12)


@pytest.mark.parametrize(("fan_in", "fan_out"), FANS)
@pytest.mark.parametrize("name", sorted(UNIFORM_BOUND))
def test_uniform_schemes_stay_within_and_reach_their_bounds(name, fan_in, fan_out):
    W = np.abs(np.asarray(_layer(fan_in, fan_out, name)["W"], np.float64))
    bound = UNIFORM_BOUND[name](fan_in, fan_out)
    assert W.max() <= bound * ULP32
    # 150 000 uniform draws: the largest |W| falls short of the bound by ~bound/150 000.
    assert W.max() >= 0.999 * bound


@pytest.mark.parametrize(("fan_in", "fan_out"), FANS)
@pytest.mark.parametrize("name", TRUNCATED)
def test_truncated_normals_never_exceed_two_untruncated_standard_deviations(name, fan_in, fan_out):
    W = np.abs(np.asarray(_layer(fan_in, fan_out, name)["W"], np.float64))
    bound = 2.0 * math.sqrt(EXPECTED_VARIANCE[name](fan_in, fan_out)) / TRUNCATED_STD
    assert W.max() <= bound * ULP32
    assert W.max() >= 0.99 * bound  # ~4.5% of the mass lies within 1% of the cut
    # An untruncated normal of the same variance would exceed the cut ~1 000 times here.


def test_naive_is_an_untruncated_normal():
    W = np.abs(np.asarray(_layer(300, 500, "naive")["W"], np.float64))
    # Beyond 2/0.8796 = 2.27 std: P ≈ 2.3% of 150 000 entries.
    assert (W > 2.0 * 0.01 / TRUNCATED_STD).sum() > 1000


@pytest.mark.parametrize(("fan_in", "fan_out"), [*FANS, (64, 64)])
def test_orthogonal_has_orthonormal_rows_or_columns(fan_in, fan_out):
    W = np.asarray(_layer(fan_in, fan_out, "orthogonal")["W"], np.float64)
    # float32 QR: entries of W Wᵀ are sums of ~500 products rounded at ~6e-8 each.
    if fan_out <= fan_in:
        np.testing.assert_allclose(W @ W.T, np.eye(fan_out), atol=1e-5)
    if fan_out >= fan_in:
        np.testing.assert_allclose(W.T @ W, np.eye(fan_in), atol=1e-5)


def test_normal_scheme_draws_the_requested_std():
    W = np.asarray(_layer(300, 500, fnbp.normal_scheme(0.05))["W"], np.float64)
    assert W.std() == pytest.approx(0.05, rel=0.025)  # std's standard error is 0.2% here
    assert fnbp.sigma_w2(fnbp.normal_scheme(0.05), 300, 500) == pytest.approx(0.0025 * 300)


@pytest.mark.parametrize(("fan_in", "fan_out"), FANS)
def test_variance_scaling_uniform_draws_sigma_w2_over_fan_in(fan_in, fan_out):
    W = np.asarray(_layer(fan_in, fan_out, fnbp.variance_scaling_scheme(4.0, "uniform"))["W"])
    assert float(W.astype(np.float64).var()) == pytest.approx(4.0 / fan_in, rel=VAR_RTOL)
    assert np.abs(W).max() <= math.sqrt(12.0 / fan_in) * ULP32  # U(±√(3·4/fan_in))


@pytest.mark.parametrize("distribution", ["normal", "truncated_normal"])
def test_variance_scaling_normals_draw_sigma_w2_over_fan_in(distribution):
    W = np.asarray(_layer(500, 300, fnbp.variance_scaling_scheme(0.5, distribution))["W"])
    assert float(W.astype(np.float64).var()) == pytest.approx(0.5 / 500, rel=VAR_RTOL)


@pytest.mark.parametrize(
    "scheme",
    [fnbp.normal_scheme(0.01, bias_std=0.3), fnbp.variance_scaling_scheme(2.0, bias_std=0.3)],
)
def test_bias_std_draws_biases_with_that_std(scheme):
    model = fnbp.MLP((3, 20000, 2))
    params = fnbp.init_params(jax.random.key(0), model, scheme)
    b = np.asarray(params[0]["b"], np.float64)
    assert b.std() == pytest.approx(0.3, rel=0.03)  # 20 000 draws: standard error 0.5%
    assert abs(b.mean()) < 5 * 0.3 / math.sqrt(b.size)
    # Each layer gets its own biases, not copies of one draw.
    assert not np.allclose(np.asarray(params[1]["b"]), b[:2])


def test_init_params_is_pure_in_the_key():
    model = fnbp.MLP((7, 9, 4))
    a = fnbp.init_params(jax.random.key(1), model)
    b = fnbp.init_params(jax.random.key(1), model)
    c = fnbp.init_params(jax.random.key(2), model)
    chex.assert_trees_all_equal(a, b)
    for pa, pc in zip(a, c, strict=True):
        assert not np.allclose(np.asarray(pa["W"]), np.asarray(pc["W"]))
    # the two layers do not reuse one stream
    assert not np.allclose(np.asarray(a[0]["W"])[:4, :7], np.asarray(a[1]["W"])[:4, :7])


@pytest.mark.parametrize("make_keys", [jax.random.key, jax.random.PRNGKey], ids=["typed", "raw"])
def test_init_params_vmaps_over_keys_into_a_population(make_keys):
    model = fnbp.MLP((5, 6, 3))
    keys = jax.random.split(make_keys(0), 4)
    population = jax.vmap(lambda k: fnbp.init_params(k, model, "glorot_uniform"))(keys)
    assert [p["W"].shape for p in population] == [(4, 6, 5), (4, 3, 6)]
    one_by_one = [fnbp.init_params(k, model, "glorot_uniform") for k in keys]
    chex.assert_trees_all_equal(population, jax.tree.map(lambda *v: jnp.stack(v), *one_by_one))
    assert not np.allclose(np.asarray(population[0]["W"][0]), np.asarray(population[0]["W"][1]))


# ----------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("bad", ["kaiming", "he", None])
def test_unknown_scheme_name_raises_value_error_listing_names(bad):
    with pytest.raises(ValueError, match="unknown init scheme") as info:
        fnbp.init_params(jax.random.key(0), fnbp.MLP((3, 2)), bad)
    for name in fnbp.SCHEMES:
        assert repr(name) in str(info.value)
    with pytest.raises(ValueError, match="unknown init scheme"):
        fnbp.sigma_w2(bad, 3, 2)


@pytest.mark.parametrize(
    "key",
    [0, np.uint32(7), jax.random.split(jax.random.key(0), 2), jnp.zeros((3,), jnp.uint32)],
    ids=["int", "numpy-int", "two-typed-keys", "wrong-raw-shape"],
)
def test_a_key_that_is_not_one_prng_key_raises_type_error(key):
    with pytest.raises(TypeError, match=r"jax\.random\.key"):
        fnbp.init_params(key, fnbp.MLP((3, 2)))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_non_floating_dtype_raises_type_error(dtype):
    with pytest.raises(TypeError, match="floating dtype"):
        fnbp.init_params(jax.random.key(0), fnbp.MLP((3, 2)), dtype=dtype)


def test_a_model_that_is_not_an_mlp_raises_type_error():
    with pytest.raises(TypeError, match="fnbp.MLP"):
        fnbp.init_params(jax.random.key(0), (3, 2))


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: fnbp.normal_scheme(0.0), "std must be"),
        (lambda: fnbp.normal_scheme(-0.1), "std must be"),
        (lambda: fnbp.normal_scheme(float("nan")), "std must be"),
        (lambda: fnbp.normal_scheme(float("inf")), "std must be"),
        (lambda: fnbp.normal_scheme("0.1"), "std must be"),
        (lambda: fnbp.variance_scaling_scheme(0.0), "sigma_w2 must be"),
        (lambda: fnbp.variance_scaling_scheme(-2.0), "sigma_w2 must be"),
        (lambda: fnbp.variance_scaling_scheme(float("nan")), "sigma_w2 must be"),
        (lambda: fnbp.normal_scheme(0.1, bias_std=-0.3), "bias_std must be"),
        (lambda: fnbp.variance_scaling_scheme(2.0, bias_std=-1e-9), "bias_std must be"),
        (lambda: fnbp.variance_scaling_scheme(2.0, bias_std=float("nan")), "bias_std must be"),
        (lambda: fnbp.variance_scaling_scheme(2.0, "laplace"), "distribution must be"),
        (lambda: fnbp.variance_scaling_scheme(2.0, "truncated"), "distribution must be"),
    ],
)
def test_bad_scheme_arguments_raise_value_error(make, fragment):
    with pytest.raises(ValueError, match=fragment):
        make()
