"""Tests of fnbp/theory/mean_field.py: mean-field maps against closed forms, quadrature and Monte Carlo.

Every reference here is computed independently of fnbp: closed forms, scipy.integrate.quad, or
Monte Carlo with NumPy's own RNG and NumPy/SciPy formulas for φ and φ′.
"""

import math

import numpy as np
import pytest
from scipy import integrate, special

from fnbp import theory

# 200-node Gauss–Hermite is exact for polynomials of degree < 400 and converges geometrically
# for entire functions, so smooth expectations agree with closed forms to float64 rounding.
QUAD_RTOL = 1e-10
# ReLU-family integrands are piecewise polynomials; the even, symmetric node set makes them
# exact up to rounding of a 200-term sum (~1e-16 each).
KINK_RTOL = 1e-12


def _std_normal_pdf(x):
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _quad_gauss(fn):
    """E[fn(x)], x ~ N(0, 1), by adaptive quadrature (scipy), independent of fnbp's nodes."""
    value, _ = integrate.quad(
        lambda x: fn(x) * _std_normal_pdf(x), -np.inf, np.inf, epsabs=1e-14, epsrel=1e-13, limit=200
    )
    return value


# ----------------------------------------------------------------------------------------------
# gaussian_expectation


@pytest.mark.parametrize("q", [0.1, 1.0, 4.0, 10.0])
def test_gaussian_expectation_of_even_moments_is_q_and_three_q_squared(q):
    assert theory.gaussian_expectation(lambda h: h**2, q) == pytest.approx(q, rel=QUAD_RTOL)
    assert theory.gaussian_expectation(lambda h: h**4, q) == pytest.approx(3 * q**2, rel=QUAD_RTOL)


@pytest.mark.parametrize("q", [0.1, 1.0, 4.0, 10.0])
def test_gaussian_expectation_of_cos_is_exp_minus_half_q(q):
    assert theory.gaussian_expectation(np.cos, q) == pytest.approx(math.exp(-q / 2), rel=QUAD_RTOL)


@pytest.mark.parametrize("q", [0.01, 1.0, 7.3, 1e4])
def test_gaussian_expectation_is_exact_for_relu_square_and_the_step(q):
    relu_sq = theory.gaussian_expectation(lambda h: np.maximum(h, 0.0) ** 2, q)
    step = theory.gaussian_expectation(lambda h: (h > 0).astype(np.float64), q)
    assert relu_sq == pytest.approx(q / 2, rel=KINK_RTOL)
    assert step == pytest.approx(0.5, rel=KINK_RTOL)


def test_gaussian_expectation_at_zero_variance_is_fn_of_zero():
    # The weights sum to 1 up to rounding of 200 terms.
    assert theory.gaussian_expectation(lambda h: np.cos(h) + 2.0, 0.0) == pytest.approx(
        3.0, rel=1e-13
    )
    assert theory.gaussian_expectation(lambda h: h + 0.25, 0.0) == pytest.approx(0.25, rel=1e-13)


@pytest.mark.parametrize("q", [-1e-9, -1.0, float("nan")])
def test_gaussian_expectation_rejects_a_negative_or_nan_variance(q):
    with pytest.raises(ValueError, match="q must be"):
        theory.gaussian_expectation(np.cos, q)


# ----------------------------------------------------------------------------------------------
# length_map and chi against closed forms


@pytest.mark.parametrize("q", [0.05, 1.0, 3.7, 250.0])
@pytest.mark.parametrize("sigma_w2, sigma_b2", [(2.0, 0.0), (1.0, 0.3), (0.4, 1.5)])
def test_relu_length_map_is_half_sigma_w2_q_plus_sigma_b2(q, sigma_w2, sigma_b2):
    expected = sigma_w2 * q / 2 + sigma_b2
    assert theory.length_map("relu", sigma_w2, q, sigma_b2) == pytest.approx(
        expected, rel=KINK_RTOL
    )


@pytest.mark.parametrize("q", [0.05, 1.0, 3.7, 250.0])
@pytest.mark.parametrize("sigma_w2", [0.1, 1.0, 2.0, 5.0])
def test_relu_chi_is_half_sigma_w2_at_every_q(q, sigma_w2):
    assert theory.chi("relu", sigma_w2, q) == pytest.approx(sigma_w2 / 2, rel=KINK_RTOL)


@pytest.mark.parametrize("q", [0.0, 0.5, 2.0, 40.0])
@pytest.mark.parametrize("sigma_w2, sigma_b2", [(1.0, 0.0), (0.7, 0.2), (3.0, 1.0)])
def test_identity_length_map_is_sigma_w2_q_plus_sigma_b2_and_chi_is_sigma_w2(q, sigma_w2, sigma_b2):
    expected = sigma_w2 * q + sigma_b2
    assert theory.length_map("identity", sigma_w2, q, sigma_b2) == pytest.approx(
        expected, rel=1e-12
    )
    assert theory.chi("identity", sigma_w2, q) == pytest.approx(sigma_w2, rel=1e-12)


@pytest.mark.parametrize("q", [0.3, 1.0, 9.0])
@pytest.mark.parametrize("sigma_w2", [1.0, 2.0])
def test_leaky_relu_chi_is_half_sigma_w2_times_one_plus_slope_squared(q, sigma_w2):
    expected = sigma_w2 * (1 + 0.01**2) / 2
    assert theory.chi("leaky_relu", sigma_w2, q) == pytest.approx(expected, rel=KINK_RTOL)


def test_leaky_relu_length_map_is_half_sigma_w2_q_times_one_plus_slope_squared():
    expected = 2.0 * 1.7 * (1 + 0.01**2) / 2 + 0.1
    assert theory.length_map("leaky_relu", 2.0, 1.7, 0.1) == pytest.approx(expected, rel=KINK_RTOL)


# ----------------------------------------------------------------------------------------------
# chi1


@pytest.mark.parametrize(
    "sigma_w2, expected",
    [
        (2.0, 1.0),  # He: critical
        (1.0, 0.5),  # LeCun
        (1e-4 * 512, 0.0256),  # naive N(0, 0.01²) at fan_in 512
        (1e-4 * 784, 0.0392),  # naive at fan_in 784 (MNIST input layer)
    ],
)
def test_relu_chi1_is_half_sigma_w2(sigma_w2, expected):
    assert theory.chi1("relu", sigma_w2) == pytest.approx(expected, rel=KINK_RTOL)


@pytest.mark.parametrize("sigma_w2, q0", [(1e-8, 1.0), (1.0, 0.0)])
def test_relu_chi1_is_half_sigma_w2_even_when_q_star_underflows_to_zero(sigma_w2, q0):
    assert theory.chi1("relu", sigma_w2, q0=q0) == pytest.approx(sigma_w2 / 2, rel=KINK_RTOL)


@pytest.mark.parametrize("sigma_w2", [0.3, 0.8])
def test_tanh_chi1_below_the_order_chaos_edge_is_sigma_w2(sigma_w2):
    # σ_b² = 0 and σ_w² < 1: q* = 0, where tanh′(0)² = 1, so χ₁ = σ_w².
    assert theory.fixed_point("tanh", sigma_w2) < 1e-200
    assert theory.chi1("tanh", sigma_w2) == pytest.approx(sigma_w2, rel=1e-12)


def test_tanh_fixed_point_and_chi1_at_sigma_w2_4_match_scipy_quadrature():
    sigma_w2 = 4.0
    q = 1.0
    for _ in range(500):  # the map is a contraction near q* ≈ 2.12; 500 steps is far past 1e-14
        new = sigma_w2 * _quad_gauss(lambda x, q=q: math.tanh(math.sqrt(q) * x) ** 2)
        if abs(new - q) < 1e-14:
            break
        q = new
    q_star = new
    # sech⁴ y = (1 − tanh² y)², written without cosh, which overflows in the far tails.
    chi_1 = sigma_w2 * _quad_gauss(lambda x: (1 - math.tanh(math.sqrt(q_star) * x) ** 2) ** 2)
    # quad's error is ~1e-12; 1e-6 also leaves room for the fixed point's slow tail.
    assert theory.fixed_point("tanh", sigma_w2) == pytest.approx(q_star, rel=1e-6)
    assert theory.chi1("tanh", sigma_w2) == pytest.approx(chi_1, rel=1e-6)
    assert chi_1 > 1  # chaotic phase: a sanity check on the reference itself


# ----------------------------------------------------------------------------------------------
# Monte Carlo against NumPy/SciPy formulas of φ and φ′

_N_MC = 2_000_000
_X = np.random.default_rng(20240611).standard_normal(_N_MC)  # N(0, 1), scaled by √q per test


def _np_sigmoid(h):
    return 1 / (1 + np.exp(-h))


_NUMPY_PHI = {
    "tanh": (np.tanh, lambda h: 1 - np.tanh(h) ** 2),
    "sigmoid": (_np_sigmoid, lambda h: _np_sigmoid(h) * (1 - _np_sigmoid(h))),
    "gelu": (
        lambda h: h * special.ndtr(h),
        lambda h: special.ndtr(h) + h * np.exp(-0.5 * h * h) / np.sqrt(2 * np.pi),
    ),
    "softplus": (lambda h: np.logaddexp(0.0, h), _np_sigmoid),
}


def _mc_mean(values):
    """Sample mean and its standard error."""
    return values.mean(), values.std() / math.sqrt(values.size)


@pytest.mark.parametrize("q", [0.3, 1.0, 3.0])
@pytest.mark.parametrize("activation", sorted(_NUMPY_PHI))
def test_length_map_and_chi_match_monte_carlo(activation, q):
    sigma_w2, sigma_b2 = 1.5, 0.1
    f, df = _NUMPY_PHI[activation]
    h = math.sqrt(q) * _X
    mean_f2, se_f2 = _mc_mean(f(h) ** 2)
    mean_df2, se_df2 = _mc_mean(df(h) ** 2)
    # 5 standard errors: a false failure has probability ~6e-7 per comparison (24 in all), while
    # the standard error is ~1e-3 relative, far below what a wrong φ or φ′ would shift.
    got_q = theory.length_map(activation, sigma_w2, q, sigma_b2)
    assert abs(got_q - (sigma_w2 * mean_f2 + sigma_b2)) < 5 * sigma_w2 * se_f2
    got_chi = theory.chi(activation, sigma_w2, q)
    assert abs(got_chi - sigma_w2 * mean_df2) < 5 * sigma_w2 * se_df2


# ----------------------------------------------------------------------------------------------
# fixed_point, q_trajectory, depth_scale


def test_relu_fixed_point_diverges_to_inf_above_sigma_w2_2():
    assert theory.fixed_point("relu", 4.0) == math.inf
    assert theory.fixed_point("relu", 2.5, sigma_b2=0.1) == math.inf


@pytest.mark.parametrize("q0", [0.3, 1.0, 17.0])
def test_relu_fixed_point_at_sigma_w2_2_without_bias_is_the_starting_q(q0):
    # Every q is a fixed point; the quadrature's rounding (~1e-16) is all that may move it.
    assert theory.fixed_point("relu", 2.0, 0.0, q0) == pytest.approx(q0, rel=1e-13)


def test_relu_fixed_point_with_bias_is_sigma_b2_over_one_minus_half_sigma_w2():
    # q* = σ_w² q*/2 + σ_b²  ⇒  q* = σ_b² / (1 − σ_w²/2)
    assert theory.fixed_point("relu", 1.0, 0.3) == pytest.approx(0.3 / 0.5, rel=1e-11)


def test_sigmoid_fixed_point_solves_the_length_map_by_scipy_quadrature():
    q_star = theory.fixed_point("sigmoid", 1.0)
    image = _quad_gauss(lambda x: special.expit(math.sqrt(q_star) * x) ** 2)
    # quad is accurate to ~1e-13 here, so the residual must be at rounding level.
    assert image == pytest.approx(q_star, rel=1e-10)
    assert theory.length_map("sigmoid", 1.0, q_star) == pytest.approx(q_star, rel=1e-10)
    assert 0.25 < q_star < 1  # E[σ(h)²] > σ(0)² = 1/4 and < 1


@pytest.mark.parametrize("sigma_w2", [1.0, 2.0, 3.0])
def test_relu_q_trajectory_is_geometric_with_ratio_half_sigma_w2(sigma_w2):
    q1, depth = 0.7, 9
    traj = theory.q_trajectory("relu", sigma_w2, q1, depth)
    expected = q1 * (sigma_w2 / 2) ** np.arange(depth)
    assert traj.shape == (depth,)
    assert traj[0] == q1
    np.testing.assert_allclose(traj, expected, rtol=1e-12)  # 9 exact steps, rounding only


def test_relu_q_trajectory_with_bias_follows_the_affine_recursion_closed_form():
    # q_l = r^(l−1) q1 + σ_b² (1 − r^(l−1)) / (1 − r),  r = σ_w²/2
    sigma_w2, sigma_b2, q1, depth = 1.2, 0.25, 2.0, 7
    r = sigma_w2 / 2
    k = np.arange(depth)
    expected = r**k * q1 + sigma_b2 * (1 - r**k) / (1 - r)
    got = theory.q_trajectory("relu", sigma_w2, q1, depth, sigma_b2)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_q_trajectory_of_depth_one_is_just_q1():
    np.testing.assert_array_equal(theory.q_trajectory("tanh", 1.0, 0.42, 1), [0.42])


@pytest.mark.parametrize("chi_1", [0.5, 0.9, 0.0256])
def test_depth_scale_below_one_is_minus_one_over_log_chi(chi_1):
    assert theory.depth_scale(chi_1) == pytest.approx(-1 / math.log(chi_1), rel=1e-15)


def test_depth_scale_of_a_half_is_one_over_ln_2():
    assert theory.depth_scale(0.5) == pytest.approx(1 / math.log(2), rel=1e-15)


@pytest.mark.parametrize("chi_1", [1.1, 2.0, 1.3626733360340588])
def test_depth_scale_above_one_is_one_over_log_chi(chi_1):
    assert theory.depth_scale(chi_1) == pytest.approx(1 / math.log(chi_1), rel=1e-15)


def test_depth_scale_is_infinite_at_criticality():
    assert theory.depth_scale(1.0) == math.inf


@pytest.mark.parametrize("chi_1", [0.0, -0.5, float("nan")])
def test_depth_scale_rejects_a_non_positive_chi(chi_1):
    with pytest.raises(ValueError, match="chi_1 must be > 0"):
        theory.depth_scale(chi_1)


def _numpy_dropout_chi(sigma_w2, keep, seed, width=512, depth=16, batch=32):
    """Geometric mean over layers 2 … depth − 1 of ‖δ⁽ˡ⁻¹⁾‖²/‖δ⁽ˡ⁾‖² in a random ReLU stack with
    inverted dropout (keep ``keep``) after every activation, forward and backward by hand."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((batch, width))
    Ws, tape = [], []
    for _ in range(depth):
        W = math.sqrt(sigma_w2 / width) * rng.standard_normal((width, width))
        z = a @ W.T
        mask = (rng.random(z.shape) < keep) / keep
        a = np.maximum(z, 0) * mask
        Ws.append(W)
        tape.append((z, mask))
    delta = rng.standard_normal((batch, width))
    ratios = []
    for l in range(depth - 1, 1, -1):
        z, mask = tape[l - 1]
        new = (z > 0) * mask * (delta @ Ws[l])  # δ⁽ˡ⁻¹⁾ = f′(z) ⊙ m/ρ ⊙ Wᵀδ⁽ˡ⁾
        ratios.append(np.sum(new**2) / np.sum(delta**2))
        delta = new
    return np.exp(np.mean(np.log(ratios)))


@pytest.mark.parametrize("sigma_w2, keep", [(2.0, 0.8), (1.6, 0.8), (1.0, 0.5), (2.0, 1.0)])
def test_dropout_moves_the_critical_relu_init_to_two_rho(sigma_w2, keep):
    """χ₁ = σ_w²/(2ρ): He's σ_w² = 2 explodes under dropout; σ_w² = 2ρ is critical. The
    measured factor of wide random NumPy stacks (3 seeds) agrees within 5%."""
    assert theory.chi1("relu", sigma_w2, keep=keep) == pytest.approx(
        sigma_w2 / (2 * keep), rel=1e-12
    )
    assert theory.length_map("relu", sigma_w2, 0.7, keep=keep) == pytest.approx(sigma_w2 * 0.35 / keep, rel=1e-12)  # fmt: skip
    measured = np.exp(np.mean([np.log(_numpy_dropout_chi(sigma_w2, keep, s)) for s in range(3)]))
    assert measured == pytest.approx(sigma_w2 / (2 * keep), rel=0.05)


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, math.nan])
def test_a_keep_probability_outside_zero_one_is_refused(keep):
    with pytest.raises(ValueError, match="keep"):
        theory.chi("relu", 2.0, 1.0, keep=keep)
