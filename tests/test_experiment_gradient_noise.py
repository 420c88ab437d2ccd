"""experiments/gradient_noise.py: the S–E fit recovers its parameters, the noise scale is the
per-example gradients' tr Σ / |G|² (against vmap(jax.grad)), its batch estimate is unbiased,
chunking does not change a trajectory, and the --quick run's numbers hold together."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp.layers import Dense

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _load():
    spec = importlib.util.spec_from_file_location(
        "experiments_gradient_noise", EXPERIMENTS / "gradient_noise.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gn = _load()


def test_fit_tradeoff_recovers_s_min_and_e_min_from_the_model_formula():
    B = np.array([16, 32, 64, 128, 256, 512, 1024], float)
    s_min, e_min = 40.0, 6000.0  # B_crit = 150
    exact = s_min + e_min / B
    got = gn.fit_tradeoff(B, exact)
    # exact data: the least squares minimum is the truth, to the solver's tolerance
    np.testing.assert_allclose(got, (s_min, e_min), rtol=1e-6)
    # the paper's form holds on the fitted curve: (S/S_min − 1)(E/E_min − 1) = 1
    S = s_min + e_min / B
    np.testing.assert_allclose((S / got[0] - 1) * (B * S / got[1] - 1), 1.0, rtol=1e-6)
    # 5% log-normal noise on every point (seeded): both within 15%, B_crit within 25%
    noisy = exact * np.exp(0.05 * np.random.default_rng(0).standard_normal(len(B)))
    s_fit, e_fit = gn.fit_tradeoff(B, noisy)
    assert s_fit == pytest.approx(s_min, rel=0.15) and e_fit == pytest.approx(e_min, rel=0.15)
    assert e_fit / s_fit == pytest.approx(150.0, rel=0.25)
    # points that never reached the target are left out, not fitted as inf
    with_missing = np.where(B == 64, np.inf, exact)
    np.testing.assert_allclose(gn.fit_tradeoff(B, with_missing), (s_min, e_min), rtol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        gn.fit_tradeoff(B[:2], [np.inf, 3.0])


def test_steps_to_target_interpolates_the_first_crossing():
    steps = np.array([0, 10, 20, 30])
    acc = np.array([
        [0.1, 0.5, 0.9, 0.95],  # crosses 0.8 between 10 and 20: 10 + 10·0.3/0.4 = 17.5
        [0.1, 0.85, 0.7, 0.9],  # the first crossing counts, not a later one
        [0.1, 0.2, 0.3, 0.4],  # never
        [0.9, 0.9, 0.9, 0.9],  # already there at step 0
    ])  # fmt: skip
    np.testing.assert_allclose(
        gn.steps_to_target(acc, steps, 0.8), [17.5, 10 * 0.7 / 0.75, np.inf, 0.0]
    )


def test_upper_median_is_the_median_for_odd_counts_and_waits_for_a_majority():
    v = np.array([[3.0, 1.0, 2.0], [1.0, np.inf, np.inf], [4.0, 1.0, np.inf]])
    np.testing.assert_array_equal(gn.upper_median(v), [2.0, np.inf, 4.0])
    assert gn.upper_median(np.array([1.0, 2.0, 3.0, np.inf])) == 3.0  # 3 of 4 there
    assert gn.upper_median(np.array([1.0, 2.0, np.inf, np.inf])) == np.inf  # half is no majority


def _tiny(seed=0, n=48):
    net = fnbp.Net(5, [Dense(7, "tanh"), Dense(3)])
    kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (n, 5))
    y = jax.random.randint(ky, (n,), 0, 3)
    return net, fnbp.init_params(kp, net, "he_normal"), x, y


def test_noise_scale_on_the_whole_set_is_tr_sigma_over_g2_of_per_example_gradients(x64):
    """The reference: per-example gradients from vmap(jax.grad) of each example's own loss,
    in float64; Σ is the empirical distribution's covariance (over n, not n − 1)."""
    net, params, x, y = _tiny()
    params = jax.tree.map(lambda v: v.astype(jnp.float64), params)
    x = x.astype(jnp.float64)
    grad = jax.jit(jax.vmap(lambda xi, yi: jax.grad(fnbp.loss)(params, net, xi[None], yi[None])))
    per = grad(x, y)
    g = np.concatenate([np.asarray(v).reshape(len(x), -1) for v in jax.tree.leaves(per)], 1)
    G = g.mean(0)
    tr = np.mean(np.sum((g - G) ** 2, 1))
    args = type("A", (), {"noise_batches": 1, "noise_batch": len(x)})()  # one shape, one compile
    got = gn.noise_scale(params, net, np.asarray(x), np.asarray(y), np.random.default_rng(1), args)
    # float64 on both sides: agreement to ~1e-12 relative; 1e-9 leaves room for summation order
    np.testing.assert_allclose(got["trace_cov"], tr, rtol=1e-9)
    np.testing.assert_allclose(got["grad_norm_sq"], G @ G, rtol=1e-9)
    np.testing.assert_allclose(got["b_simple"], tr / (G @ G), rtol=1e-9)


def test_noise_scale_batch_estimate_is_bias_corrected():
    """Averaged over 200 batches of 32 drawn with replacement, the corrected B_simple comes
    near the whole set's, while the plug-in ratio (no correction) is off by the factor
    1 + B_simple/32 that E‖ḡ‖² = |G|² + tr Σ/B predicts."""
    net, params, x, y = _tiny(seed=0, n=64)
    args = type("A", (), {"noise_batches": 200, "noise_batch": 32})()
    got = gn.noise_scale(params, net, np.asarray(x), np.asarray(y), np.random.default_rng(2), args)
    b = got["b_simple"]
    assert 10 < b < 60  # comparable with the batch: the test can tell the estimators apart
    # measured over eight generators: tr Σ within ±1.5%, the corrected B_simple within ±7%, the
    # plug-in within ±4% of its prediction; the tolerances are about twice those
    assert got["trace_cov_batches"] == pytest.approx(got["trace_cov"], rel=0.1)
    assert got["b_simple_batches"] == pytest.approx(b, rel=0.15)
    assert got["b_simple_plug_in"] == pytest.approx(b / (1 + b / 32), rel=0.1)
    assert got["b_simple_plug_in"] < 0.7 * b


def test_a_trajectory_does_not_depend_on_how_it_is_cut_into_chunks():
    """The reference run replays the sweep's runs with another chunk length: step t's batch
    comes from fold_in(key, t), so 2 chunks of 3 steps give what 1 chunk of 6 does."""
    net, params, x, y = _tiny(n=40)
    opt = gn.optimizer(0.9)
    P = 2
    pop = jax.tree.map(lambda v: jnp.stack([v] * P), params)
    opt_states = gn.with_lrs(jax.vmap(opt.init)(pop), np.array([0.05, 0.2]))
    keys = jax.random.split(jax.random.key(5), P)
    one = gn.make_chunk(net, opt, 4, 6)(pop, opt_states, keys, 0, x, y, x, y)
    three = gn.make_chunk(net, opt, 4, 3)
    p, o, _, _ = three(pop, opt_states, keys, 0, x, y, x, y)
    p, o, _, acc = three(p, o, keys, 3, x, y, x, y)
    # the same float32 operations in the same order; 1e-6 allows XLA to fuse them differently
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), one[0], p)
    np.testing.assert_array_equal(one[3], acc)
    # and the two learning rates really differ per member
    assert not np.allclose(p[0]["W"][0], p[0]["W"][1])
    assert float(o.hyperparams["learning_rate"][1]) == pytest.approx(0.2)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("gn") / "gradient_noise"
    assert gn.main(["--quick", "--out", str(out)]) == str(out)
    results = json.loads((out / "results.json").read_text())
    config = json.loads((out / "config.json").read_text())
    report = (out / "report.md").read_text()
    for image in [p.name for p in out.glob("*.png")]:
        assert f"]({image})" in report, f"report.md does not embed {image}"
    assert {"steps.png", "bsimple.png"} <= {p.name for p in out.glob("*.png")}
    assert config["experiment"] == "gradient_noise" and config["quick"] is True
    assert config["jax_version"] and config["fnbp_version"] == fnbp.__version__
    return results, config, report


def test_gradient_noise_quick_steps_fall_with_batch_and_the_fit_follows_them(quick):
    """--quick: digits to 90% test accuracy, batches 16, 64, 256, 2 seeds, 4 learning rates."""
    results, _, report = quick
    r = results["datasets"]["digits"]
    rows = r["sweep"]
    assert [row["batch_size"] for row in rows] == [16, 64, 256]
    steps = [row["steps"] for row in rows]
    assert all(row["reached_seeds"] == 2 for row in rows)
    assert steps[0] > steps[1] > steps[2] > 0  # bigger batches, fewer steps
    assert steps[0] > 2 * steps[2]  # and by a real factor: batch 16 is far below B_crit
    examples = [row["examples"] for row in rows]
    assert examples[0] < examples[2]  # but more examples: past perfect scaling at 256
    f = r["fit"]
    for row in rows:  # the two-parameter curve passes within 20% of each of the 3 points
        assert f["S_min"] + f["E_min"] / row["batch_size"] == pytest.approx(row["steps"], rel=0.2)
    assert 16 < f["B_crit"] < 1024 and f["B_crit_16"] <= f["B_crit"] <= f["B_crit_84"]
    assert f["B_crit"] == pytest.approx(f["E_min"] / f["S_min"], rel=1e-12)
    assert "B_crit" in report and "python experiments/gradient_noise.py --quick" in report


def test_gradient_noise_quick_b_simple_is_finite_and_grows_as_the_gradient_shrinks(quick):
    results, config, _ = quick
    r = results["datasets"]["digits"]
    ref = r["reference"]
    b = np.array(ref["b_simple"])
    assert b.shape == (config["seeds"], config["checkpoints"] + 1)
    assert np.all(np.isfinite(b)) and np.all(b > 0)
    np.testing.assert_allclose(b, np.array(ref["trace_cov"]) / np.array(ref["grad_norm_sq"]),
                               rtol=1e-6)  # fmt: skip
    # training drives |G|² down faster than tr Σ: the noise scale rises
    assert np.all(b[:, -1] > 2 * b[:, 0])
    assert np.all(np.array(ref["grad_norm_sq"])[:, -1] < np.array(ref["grad_norm_sq"])[:, 0])
    n = r["noise"]
    assert b[:, 0].min() <= n["b_simple_at_target"] <= b.max()
    # the batch estimate (2 batches of 1437 drawn with replacement) agrees with the exact one
    assert n["b_simple_batches_at_target"] == pytest.approx(n["b_simple_at_target"], rel=0.3)
    # the reference run replays the sweep's run at its batch: it reaches the target there too
    acc = np.array(ref["test_accuracy"])
    crossed = gn.steps_to_target(acc, np.array(ref["steps"]), r["target"])
    row = next(row for row in r["sweep"] if row["batch_size"] == ref["batch_size"])
    assert np.all(np.isfinite(crossed))
    assert np.all(np.abs(crossed - np.array(row["steps_per_seed"])) <= ref["steps"][1])
