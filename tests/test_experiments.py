"""The experiment scripts in --quick mode: they run, write their run folder, and the numbers they
produce are right (measured gradient factors against mean-field theory, who trains and who
does not), not merely present."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name, tmp_path, *extra):
    out = tmp_path / name
    assert _load(name).main(["--quick", "--out", str(out), *extra]) == str(out)
    results = json.loads((out / "results.json").read_text())
    config = json.loads((out / "config.json").read_text())
    report = (out / "report.md").read_text()
    for image in [p.name for p in out.glob("*.png")]:
        assert f"]({image})" in report, f"report.md does not embed {image}"
    assert config["experiment"] == name and config["quick"] is True
    assert config["jax_version"] and config["fnbp_version"] == fnbp.__version__
    return out, results, config, report


@pytest.fixture(scope="module")
def gradient_stability(tmp_path_factory):
    return _run("gradient_stability", tmp_path_factory.mktemp("gs"))


def test_gradient_stability_measures_relu_chi_within_5_percent_of_theory(gradient_stability):
    _, results, _, _ = gradient_stability
    relu = [r for r in results["rows"] if r["activation"] == "relu"]
    assert len(relu) == 11
    for r in relu:
        # Theory for ReLU: χ = σ_w²/2 exactly, whatever q (so the prediction is closed-form).
        assert r["chi_predicted"] == pytest.approx(r["sigma_w2"] / 2, rel=1e-9) or r[
            "scheme"
        ].startswith("glorot")
        assert r["chi_measured"] == pytest.approx(r["chi_predicted"], rel=0.05), r
    he = next(r for r in relu if r["scheme"] == "he_normal")
    naive = next(r for r in relu if r["scheme"] == "naive")
    assert he["chi_measured"] == pytest.approx(1.0, rel=0.05)
    assert naive["chi_measured"] == pytest.approx(1e-4 * 128 / 2, rel=0.05)  # width 128 in --quick


def test_gradient_stability_tanh_and_sigmoid_within_10_percent(gradient_stability):
    _, results, _, _ = gradient_stability
    for r in results["rows"]:
        if r["activation"] in ("tanh", "sigmoid"):
            assert r["chi_measured"] == pytest.approx(r["chi_predicted"], rel=0.10), r
            assert r["within_goal"]
    sigmoid = [r for r in results["rows"] if r["activation"] == "sigmoid"]
    assert max(r["chi_measured"] for r in sigmoid) < 0.25  # σ′ ≤ 1/4: sigmoid always vanishes


def test_gradient_stability_replays_glorot_bengio(gradient_stability):
    _, results, _, report = gradient_stability
    gb = results["glorot_bengio"]
    # standard U(±1/√n): χ ≈ 1/3 per layer, δ shrinks by orders of magnitude toward the input
    assert gb["standard_uniform"]["delta_first_to_last_hidden"] < 1e-3
    assert (
        gb["glorot_uniform"]["delta_first_to_last_hidden"]
        > 100 * gb["standard_uniform"]["delta_first_to_last_hidden"]
    )
    assert "Glorot & Bengio" in report


def test_gradient_stability_curves_follow_theory_layer_by_layer(gradient_stability):
    _, results, _, _ = gradient_stability
    he = results["curves"]["relu/he_normal"]
    q_meas, q_pred = he["q_measured"], he["q_predicted"]
    for l in range(1, len(q_pred)):  # He keeps q⁽ˡ⁾ level, and measured q tracks the prediction
        assert q_meas[l] == pytest.approx(q_pred[l], rel=0.25)


@pytest.fixture(scope="module")
def init_study(tmp_path_factory):
    return _run("init_study", tmp_path_factory.mktemp("is"))


def test_init_study_naive_small_weights_do_not_train_at_depth(init_study):
    _, results, _, _ = init_study
    rows = {(r["depth"], r["scheme"]): r for r in results["summary"]}
    naive = rows[(8, "naive")]
    he = rows[(8, "he_normal")]
    assert naive["trained_seeds"] == 0 and naive["final_accuracy_mean"] < 0.2  # chance is 0.1
    # the first layer's gradient is vanishingly small compared with He's
    assert naive["first_layer_grad_at_init"] < 1e-6 * he["first_layer_grad_at_init"]
    assert rows[(2, "he_normal")]["trained_seeds"] >= 1


def test_init_study_records_exploding_runs_instead_of_crashing(init_study):
    _, results, _, _ = init_study
    rows = {(r["depth"], r["scheme"]): r for r in results["summary"]}
    assert rows[(8, "naive_unit")]["nonfinite_seeds"] >= 1  # N(0, 1): σ_w² = width


def test_init_study_shapes_and_report(init_study):
    out, results, config, report = init_study
    run8 = results["runs"]["8"]
    K, S, E = len(config["schemes"]), config["seeds"], config["epochs"]
    assert len(run8["test_accuracy"]) == K and len(run8["test_accuracy"][0]) == S
    assert len(run8["test_accuracy"][0][0]) == E
    assert len(run8["weight_grad_norm"][0][0][0]) == 9  # 8 hidden + output layer
    assert {"loss_curves.png", "accuracy_vs_depth.png", "grad_profiles.png"} <= {
        p.name for p in out.glob("*.png")
    }
    assert "He et al. (2015)" in report


def test_classic_sigmoid_learns_and_is_reproducible(tmp_path):
    _, first, _, report = _run("classic_sigmoid", tmp_path / "a")
    _, second, _, _ = _run("classic_sigmoid", tmp_path / "b")
    acc = [r["test_accuracy"] for r in first["history"]]
    assert len(acc) == 5 and acc[-1] > 0.85  # the textbook net on digits, 5 epochs
    assert [r["test_accuracy"] for r in second["history"]] == acc  # same seed, same numbers
    assert [r["train_loss"] for r in second["history"]] == [
        r["train_loss"] for r in first["history"]
    ]
    assert "Final test accuracy" in report


def test_experiment_refuses_an_existing_run_folder(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        _load("classic_sigmoid").main(["--quick", "--out", str(out)])
    assert (out / "keep.txt").read_text() == "precious"


def test_architectures_quick_trains_a_cnn_and_a_bn_resmlp_and_inits_like_pytorch(tmp_path):
    module = _load("architectures")
    # The MNIST-1D recipes start from PyTorch's default init: W and b ~ U(±1/√fan_in),
    # fan_in = C_in·kernel for a Conv1d. A uniform on ±c has std c/√3.
    cnn, mlp = module.mnist1d_cnn_net(), module.mnist1d_mlp_net()
    draw = jax.jit(lambda k: [module.torch_default_init(k, net) for net in (cnn, mlp)])
    cnn_params, mlp_params = jax.tree.map(np.asarray, draw(jax.random.key(0)))
    layers = [  # (W, b, fan_in) of every Dense/Conv, the residual branch's included
        *[
            (p["W"], p["b"], f)
            for p, f in zip(cnn_params, [5, 75, 75, None, 125], strict=True)
            if f
        ],
        (mlp_params[0]["W"], mlp_params[0]["b"], 40),
        (mlp_params[1]["branch"][0]["W"], mlp_params[1]["branch"][0]["b"], 100),
        (mlp_params[2]["W"], mlp_params[2]["b"], 100),
    ]
    assert cnn_params[3] == {}  # Flatten
    for W, b, fan_in in layers:
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(W).max() <= bound and np.abs(b).max() <= bound
        assert np.std(W) == pytest.approx(bound / np.sqrt(3), rel=0.15)
        assert np.abs(b).max() > 0.5 * bound  # biases drawn, not left at zero

    # Two of --quick's three recipes, to stay within the test budget: conv, pooling, dropout,
    # residual blocks and BatchNorm (the 1-D conv of mnist1d_cnn has its own layer tests).
    out, results, _, report = _run("architectures", tmp_path, "--recipes", "digits_cnn,resmlp_bn")
    res = results["results"]
    assert list(res) == ["digits_cnn", "resmlp_bn"]
    for r in res.values():
        finals = [run["final_accuracy"] for run in r["runs"]]
        assert len(finals) == 2 and finals == [run["test_accuracy"][-1] for run in r["runs"]]
        assert r["final_accuracy_mean"] == pytest.approx(np.mean(finals), abs=1e-12)
        assert all(np.isfinite(run["train_loss"]).all() for run in r["runs"])
        assert f"| {r['name']} |" in report
    # chance is 10%: two epochs of the hand-written backward already learn digits
    assert res["digits_cnn"]["final_accuracy_min"] > 0.6
    assert res["resmlp_bn"]["final_accuracy_min"] > 0.3
    assert {p.name for p in out.glob("*.png")} == {"digits_cnn.png", "resmlp.png"}


@pytest.fixture(scope="module")
def cures(tmp_path_factory):
    return _run("cures", tmp_path_factory.mktemp("cures"))


def test_cures_measured_factors_match_theory_within_5_percent(cures):
    """--quick: width 128, 3 seeds. Measured: fnbp.backprop's δ; predicted: fnbp.theory."""
    _, results, _, report = cures
    rows = {r["name"]: r for r in results["rows"]}
    assert len(rows) == 25 and all(r["within_goal"] for r in rows.values()), [
        (r["name"], r["relative_error"]) for r in rows.values() if not r["within_goal"]
    ]
    # predictions with closed forms, written out here: (1 + 2α²), 1 + α², (B − 2)/(B − 3)
    assert rows["linear, α = 1"]["factor_predicted"] == pytest.approx(3.0, rel=1e-9)
    assert rows["pre, α = 1"]["factor_predicted"] == pytest.approx(2.0, rel=1e-9)
    assert rows["linear, α = 1/√L"]["factor_predicted"] == pytest.approx(1.2, rel=1e-9)  # L = 10
    assert rows["Dense→BN (linear), batch 8"]["factor_predicted"] == pytest.approx(1.2, rel=1e-6)
    assert rows["ReLU, keep 0.8, σ_w² = 2"]["factor_predicted"] == pytest.approx(1.25, rel=1e-9)
    # BatchNorm explodes faster at a smaller batch, measured as predicted
    bn = [rows[f"Dense→BN→ReLU, batch {b}"]["factor_measured"] for b in (8, 32, 64)]
    assert bn[0] > bn[1] > bn[2] > 1.4
    # α = 0 passes δ through untouched; the 1/√L total stays near (1 + 2/L)^window, far from 3^window
    assert rows["linear, α = 0"]["factor_measured"] == pytest.approx(1.0, abs=1e-12)
    r = rows["linear, α = 1/√L"]
    assert r["total_measured"] == pytest.approx(r["total_predicted"], rel=0.1)
    assert "25 of 25 measured factors lie within 5%" in report
    assert [r["width"] for r in results["width_sweep"]] == [64, 128]  # finite width, reported
    assert all(r["name"] == "post, α = 1" for r in results["width_sweep"])


def test_optimizers_quick_reach_the_bowls_minimum_and_match_the_hand_chain_rule(tmp_path):
    _, results, _, report = _run("optimizers", tmp_path)
    assert set(results["bowl"]) == {"SGD", "momentum 0.9", "Nesterov 0.9", "Adam", "AdaBelief",
                                    "Lookahead(Adam)"}  # fmt: skip
    for name, r in results["bowl"].items():
        # 4000 steps at lr 0.01: plain GD shrinks the distance by (1 − 0.02) a step, to e^−80
        np.testing.assert_allclose(r["final"], [-1.0, 0.0], atol=1e-8, err_msg=name)
        assert r["f_final"] == pytest.approx(1.0, abs=1e-12) and r["max_grad_gap"] < 1e-12
        assert np.allclose(r["path"][0], [1.0, 4.0])  # every path starts at (1, 4)
    # SGD on the bowl moves straight towards the minimum: every point on the line y = 2(x + 1)
    sgd = np.asarray(results["bowl"]["SGD"]["path"])
    np.testing.assert_allclose(sgd[:, 1], 2 * (sgd[:, 0] + 1), atol=1e-12)
    n = results["neuron"]
    z = n["w"] * n["a_prev"] + n["b"]
    a = 1 / (1 + np.exp(-z))
    assert n["by_fnbp"]["dC_dw"] == pytest.approx(n["a_prev"] * a * (1 - a) * 2 * (a - n["y"]), rel=1e-12)  # fmt: skip
    assert n["by_fnbp"]["dC_db"] == pytest.approx(n["by_hand"]["dC_db"], rel=1e-12)
    for name, r in results["digits"].items():
        assert np.all(np.isfinite(r["train_loss"])), name
        assert np.mean(r["test_accuracy"]) > 0.15, name  # 3 epochs at width 32: above chance


def test_init_study_nudge_moves_every_parameter_by_exactly_k_ulps():
    nudge = _load("init_study").nudge
    params = [{"W": jnp.array([[0.5, -1.25], [3.0, 0.0]], jnp.float32), "b": jnp.zeros(2, jnp.float32)}]  # fmt: skip
    moved = nudge(params, 2)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(moved), strict=True):
        want = np.nextafter(np.nextafter(np.asarray(a), np.inf), np.inf)
        np.testing.assert_array_equal(np.asarray(b), want)
    assert nudge(params, 0) is params


def test_cures_training_quick_naive_vanishes_as_theory_says_and_residual_bn_trains(tmp_path):
    """--quick: digits, 8 hidden layers of 32, 2 seeds, 3 epochs; SGD only (half the compiling)."""
    _, results, _, report = _run("cures_training", tmp_path, "--optimizers", "sgd")
    rows = {(r["variant"], r["optimizer"], r["init"]): r for r in results["summary"]}
    assert len(rows) == 6 * 1 * 2
    for opt in ("sgd",):
        # naive N(0, 0.01²): nothing reaches the first layer, whatever the optimizer
        assert rows[("plain", opt, "naive")]["trained_seeds"] == 0
        for init in ("he", "naive"):
            assert rows[("res_bn", opt, init)]["trained_seeds"] == 2, (opt, init)
    # mean-field: ‖δ‖ shrinks by √(σ_w²·½) = √(10⁻⁴·32·½) = 0.04 per ReLU layer, 7 layers
    # between the first weight layer and the last one below the output
    naive = rows[("plain", "sgd", "naive")]["delta_ratio_at_init"]
    assert 0.3 < naive / 0.04**7 < 3, naive
    # a residual block x + α·W₂φ(W₁x) from He weights multiplies ‖δ‖² by 1 + 2α² (theory's
    # "linear" ordering); 4 blocks: ‖δ‖ grows by (1 + 2α²)² from the top block to the bottom
    for variant, alpha in (("res_1", 1.0), ("res_sqrt", 0.5)):
        got = rows[(variant, "sgd", "he")]["delta_ratio_at_init"]
        assert got == pytest.approx((1 + 2 * alpha**2) ** 2, rel=0.25), variant
    assert "| residual + BN, α = 1 |" in report


def test_overfitting_early_stop_rule():
    early_stop = _load("overfitting").early_stop
    assert early_stop(np.array([3.0, 2.0, 1.0, 2.0, 3.0, 4.0]), 2) == (3, 5)
    assert early_stop(np.array([1.0, 2.0, 3.0]), 1) == (1, 2)
    assert early_stop(np.array([3.0, 2.0, 1.0]), 1) == (3, 3)  # never stopped: the last epoch
    assert early_stop(np.array([np.nan, 1.0, np.nan, np.nan]), 2) == (2, 4)  # NaN never improves
    assert early_stop(np.array([2.0, 2.0, 2.0]), 2) == (1, 3)  # a tie is no improvement


def test_overfitting_quick_memorizes_and_early_stopping_restores_the_best_epoch(tmp_path):
    _, results, config, report = _run("overfitting", tmp_path)
    rows = {r["variant"]: r for r in results["summary"]}
    assert set(rows) == {"none", "dropout 0.1", "dropout 0.3", "dropout 0.5", "L2 0.001",
                         "L2 0.01", "early stopping"}  # fmt: skip
    assert rows["none"]["train_accuracy_mean"] > 0.99  # 200 examples, memorized
    assert rows["none"]["test_accuracy_mean"] > 0.8
    h, es = results["history"]["none"], results["history"]["early stopping"]
    for s, (best, stop) in enumerate(zip(es["best_epoch"], es["stop_epoch"], strict=True)):
        val = np.asarray(h["val_loss"][s][:stop])
        assert best == 1 + int(np.argmin(val))  # the lowest validation loss up to the stop
        assert stop == config["epochs"] or stop == best + config["patience"]
        assert es["final_test_accuracy"][s] == h["test_accuracy"][s][best - 1]
    # the regularizers change the training (dropout masks, the penalty's gradient)
    for name in ("dropout 0.5", "L2 0.01"):
        assert results["history"][name]["train_loss"] != h["train_loss"], name
    assert "| early stopping |" in report


def test_overfitting_early_stop_rule_agrees_with_fits_early_stopping():
    """The experiment applies the rule to recorded curves; fnbp.fit applies it online."""
    import optax

    early_stop = _load("overfitting").early_stop
    ds = fnbp.data.load_digits()
    model = fnbp.MLP((64, 64, 10), "relu")
    params = fnbp.init_params(jax.random.key(0), model, "he_normal")
    _, _, history = fnbp.fit(
        model, optax.sgd(0.1, momentum=0.9), params, ds.x_train[:64], ds.y_train[:64],
        key=jax.random.key(1), epochs=30, batch_size=16, x_val=ds.x_train[1000:1200],
        y_val=ds.y_train[1000:1200], early_stopping=3, progress=False,
    )  # fmt: skip
    val = np.array([r["val_loss"] for r in history])
    best, stop = early_stop(val, 3)
    assert stop == len(history) < 30  # it did stop early
    assert best == history[-1]["best_epoch"]
