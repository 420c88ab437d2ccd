"""Tests of fnbp/cli.py: ``fnbp train`` and ``fnbp check``, run in-process through main()."""

import contextlib
import importlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from helpers import forced_devices_flags

import fnbp
from fnbp.cli import main
from fnbp.io import load_params
from fnbp.layers import BatchNorm, Conv, Dense, Dropout, Flatten, MaxPool, Reshape

SMALL = ["--dataset", "digits", "--sizes", "64,32,10", "--epochs", "3", "--no-progress"]


def _train_quietly(out, *extra):
    """Run ``fnbp train`` in-process; returns (return code, stdout)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = main(["train", *SMALL, "--out", str(out), *extra])
    return rc, buffer.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four small digits runs: seed 0 manual (twice), seed 0 autodiff, seed 1 manual; and, in
    ``results["grads_built"]``, the ``grads`` each run built its training step with."""
    from fnbp import train

    root = tmp_path_factory.mktemp("runs")
    results, built = {}, {}
    real = train._value_and_grads
    for name, extra in [
        ("manual", ["--seed", "0", "--grads", "manual"]),
        ("manual_again", ["--seed", "0", "--grads", "manual"]),
        ("autodiff", ["--seed", "0", "--grads", "autodiff"]),
        ("seed1", ["--seed", "1", "--grads", "manual"]),
    ]:
        seen = built[name] = set()
        with pytest.MonkeyPatch.context() as mp:  # a spy: records, then builds the real step
            mp.setattr(train, "_value_and_grads",
                       lambda model, grads, *a, seen=seen: seen.add(grads) or real(model, grads, *a))  # fmt: skip
            rc, out = _train_quietly(root / name, *extra)
        results[name] = (rc, out, root / name)
    results["grads_built"] = built
    return results


def _arrays(run_dir):
    with np.load(run_dir / "params.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------------------------
# train


def test_train_writes_config_metrics_and_params(runs):
    rc, out, run = runs["manual"]
    assert rc == 0
    names = [
        "checkpoints",
        "config.json",
        "metrics.jsonl",
        "params.npz",
        "report.md",
        "training.png",
    ]
    assert sorted(p.name for p in run.iterdir()) == names
    # one checkpoint per epoch (44 steps of 32), the newest two kept
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        ["ckpt-000000088.npz", "ckpt-000000132.npz"]
    )
    config = json.loads((run / "config.json").read_text())
    assert config["sizes"] == [64, 32, 10]
    assert config["seed"] == 0 and config["epochs"] == 3 and config["grads"] == "manual"
    assert config["jax_version"] == jax.__version__
    assert config["out"] == str(run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for r in records:
        assert np.isfinite(r["train_loss"]) and 0 <= r["test_accuracy"] <= 1
        assert len(r["grad_norms"]) == 2
    assert records[-1]["train_loss"] < records[0]["train_loss"]  # it learns
    assert records[-1]["test_accuracy"] > 0.85  # 3 epochs of digits already get ~0.95
    params, model = load_params(run / "params.npz")
    assert model.sizes == (64, 32, 10) and model.activation == "relu"
    assert params[0]["W"].shape == (32, 64)
    assert f"final test accuracy: {records[-1]['test_accuracy']:.4f}" in out
    assert f"report: {run / 'report.md'}\nrun folder: {run}" in out
    assert config["n_train"] == 1437  # digits' 80% split: the size DP-SGD's accounting needs
    assert config["command"] == f"fnbp train {' '.join(SMALL)} --out {run} --seed 0 --grads manual"


def test_train_report_shows_the_command_final_metrics_curves_and_config(runs):
    _, _, run = runs["manual"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    report = (run / "report.md").read_text()
    assert report.startswith(f"# fnbp train: manual\n\n```\nfnbp train {' '.join(SMALL)}")
    assert "Finished: 3 of 3 epochs, 132 steps; the params are in params.npz." in report
    assert f"| test accuracy | {records[-1]['test_accuracy']:.6g} |" in report
    assert (
        f"| train loss (mean over the epoch's steps) | {records[-1]['train_loss']:.6g} |" in report
    )
    g0, g2 = records[0]["grad_norms"], records[2]["grad_norms"]
    assert f"| layer 1 (dense) | {g0[0]:.4g} | {g2[0]:.4g} |" in report
    assert f"| layer 2 (dense) | {g0[1]:.4g} | {g2[1]:.4g} |" in report
    assert "](training.png)" in report and (run / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert "| lr | 0.02 |" in report and "| sizes | 64,32,10 |" in report
    assert f"| jax_version | {jax.__version__} |" in report


def test_report_rebuilds_report_md_of_a_finished_and_of_an_interrupted_run(runs, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(runs["seed1"][2], run)
    written = (run / "report.md").read_text().replace("# fnbp train: seed1", "# fnbp train: copy")
    (run / "report.md").unlink()
    (run / "training.png").unlink()
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out == f"report: {run / 'report.md'}\n"
    assert (run / "report.md").read_text() == written and (run / "training.png").is_file()
    # as a run killed in epoch 3 leaves it: two records, half a line, no params
    (run / "params.npz").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(f"{lines[0]}\n{lines[1]}\n{lines[2][:20]}")
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "Not finished: 2 of 3 epochs recorded (88 steps) and no params.npz" in report
    assert f"`fnbp train --resume {run}`" in report and "## Final metrics (epoch 2)" in report


@pytest.mark.parametrize(
    "setup, match",
    [
        (None, "nowhere: no such run folder"),
        ("empty", "it has no config.json, so it is not an fnbp train run folder"),
        ("bad-json", "config.json: not an fnbp train config (JSONDecodeError"),
        ("no-epochs", "config.json: not an fnbp train config (KeyError: 'epochs')"),
    ],
)
def test_report_refuses_a_folder_that_is_not_a_run_in_one_line(tmp_path, capsys, setup, match):
    out = tmp_path / ("nowhere" if setup is None else "run")
    if setup is not None:
        out.mkdir()
    if setup == "bad-json":
        (out / "config.json").write_text("{not json")
    elif setup == "no-epochs":
        (out / "config.json").write_text(json.dumps({"sizes": [64, 10], "activation": "relu",
                                                      "loss": "softmax_cross_entropy",
                                                      "output_activation": "identity"}))  # fmt: skip
    before = sorted(p.name for p in out.rglob("*")) if out.exists() else None
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fnbp: error:") and match in err[0], err
    assert (sorted(p.name for p in out.rglob("*")) if out.exists() else None) == before


def test_train_same_seed_gives_bitwise_identical_params(runs):
    a, b = _arrays(runs["manual"][2]), _arrays(runs["manual_again"][2])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_train_different_seed_gives_different_params(runs):
    a, c = _arrays(runs["manual"][2]), _arrays(runs["seed1"][2])
    assert not np.array_equal(a["layer1/W"], c["layer1/W"])


def test_train_autodiff_and_manual_grads_give_the_same_params(runs):
    assert runs["autodiff"][0] == 0
    manual, _ = load_params(runs["manual"][2] / "params.npz")
    auto, _ = load_params(runs["autodiff"][2] / "params.npz")
    # The two gradients agree to float32 rounding (~1e-7 relative per step); 132 SGD steps
    # with momentum leave parameters of order 0.1-1 within ~1e-7 of each other (observed).
    # rtol 1e-4 / atol 1e-6 leave a wide margin, yet a gradient off by 0.1% would not fit.
    chex.assert_trees_all_close(manual, auto, rtol=1e-4, atol=1e-6)
    # ... and --grads was honoured: recorded, and the only gradient each run's steps were built
    # with (equal params prove nothing here: the two programs can round alike, bit for bit)
    assert json.loads((runs["autodiff"][2] / "config.json").read_text())["grads"] == "autodiff"
    assert runs["grads_built"]["autodiff"] == {"autodiff"}
    assert runs["grads_built"]["manual"] == {"manual"}


def test_train_goal_run_reaches_97_percent_on_digits(tmp_path, capsys):
    out = tmp_path / "goal"
    rc = main(
        "train --dataset digits --sizes 64,128,128,10 --activation relu --init he_normal "
        "--optimizer sgd --lr 0.02 --momentum 0.9 --l2 1e-3 --epochs 30 --seed 0 --grads manual "
        f"--no-progress --out {out}".split()
    )
    assert rc == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 30
    assert records[-1]["test_accuracy"] >= 0.97
    assert "final test accuracy" in capsys.readouterr().out


def test_train_teacher_student_with_mse_reports_final_test_loss(tmp_path, capsys):
    out = tmp_path / "ts"
    rc = main(
        [
            "train",
            "--dataset",
            "teacher_student",
            "--loss",
            "mse",
            "--epochs",
            "2",
            "--lr",
            "0.01",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "final test loss" in stdout and "accuracy" not in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "test_accuracy" not in records[-1]
    assert 0 < records[-1]["test_loss"] < records[0]["train_loss"]


def test_train_overwrite_reuses_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("stale\n")
    rc = main(["train", *SMALL, "--epochs", "1", "--overwrite", "--out", str(out)])
    assert rc == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1


# ----------------------------------------------------------------------------------------------
# train: --early-stopping and --val-fraction


def test_train_early_stopping_saves_the_best_epochs_params_and_names_the_epoch(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *SMALL, "--epochs", "15", "--lr", "0.1", "--early-stopping", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    records = _records(out)
    val = np.array([r["val_loss"] for r in records])
    best = records[-1]["best_epoch"]
    assert best == int(np.argmin(val)) + 1 and len(records) == best + 2 < 15  # stopped early
    assert [r["best_epoch"] for r in records] == [
        int(np.argmin(val[:e])) + 1 for e in range(1, len(val) + 1)
    ]
    # 144 of the 1437 training examples held out: 1293 // 32 = 40 steps an epoch
    assert [r["step"] for r in records] == [40 * r["epoch"] for r in records]
    config = json.loads((out / "config.json").read_text())
    assert (config["early_stopping"], config["val_fraction"]) == (2, 0.1)
    # params.npz holds the best epoch's params: they give its test metrics, not the last one's
    params, model = load_params(out / "params.npz")
    ds = fnbp.data.load_digits(seed=0)
    kept = records[best - 1]
    assert float(fnbp.accuracy(params, model, ds.x_test, ds.y_test)) == kept["test_accuracy"]
    # the same function of the same arrays: rtol allows only another fusion (the last epoch's
    # test loss is more than 10% off)
    test_loss = float(fnbp.loss(params, model, ds.x_test, ds.y_test))
    np.testing.assert_allclose(test_loss, kept["test_loss"], rtol=1e-6)
    assert abs(records[-1]["test_loss"] - test_loss) > 0.1 * test_loss
    printed = capsys.readouterr().out
    assert (
        f"final test accuracy: {kept['test_accuracy']:.4f}  (epoch {best} of {len(records)}, "
        "kept by early stopping"
    ) in printed
    # --resume of the stopped run reads the early-stopping settings back and changes nothing
    before = _arrays(out)
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    after = _arrays(out)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert _records(out) == records


def test_train_val_fraction_alone_logs_val_metrics_without_stopping(tmp_path):
    out = tmp_path / "run"
    rc, _ = _train_quietly(out, "--epochs", "2", "--val-fraction", "0.25")
    assert rc == 0
    records = _records(out)
    assert len(records) == 2 and all("best_epoch" not in r for r in records)
    assert all(0 < r["val_loss"] and 0 <= r["val_accuracy"] <= 1 for r in records)
    assert records[0]["step"] == (1437 - 359) // 32  # round(0.25 · 1437) = 359 held out
    config = json.loads((out / "config.json").read_text())
    assert (config["early_stopping"], config["val_fraction"]) == (None, 0.25)


def test_hold_out_is_a_partition_of_the_training_set_drawn_by_the_seed():
    from fnbp.cli import _hold_out

    ds = fnbp.data.load_digits(seed=0)
    rest, (x_val, y_val) = _hold_out(ds, 0.1, seed=0)
    assert (len(x_val), len(rest.x_train)) == (144, 1293) and len(y_val) == 144
    rows = lambda x: sorted(map(bytes, x))  # noqa: E731 (each example's bytes)
    assert rows(np.concatenate([rest.x_train, x_val])) == rows(ds.x_train)  # nothing lost
    np.testing.assert_array_equal(rest.x_test, ds.x_test)  # the test set untouched
    again = _hold_out(ds, 0.1, seed=0)[1][0]
    other = _hold_out(ds, 0.1, seed=1)[1][0]
    np.testing.assert_array_equal(again, x_val)
    assert rows(other) != rows(x_val)
    same, none = _hold_out(ds, None, seed=0)
    assert same is ds and none == (None, None)


# ----------------------------------------------------------------------------------------------
# train --instruments and DP-SGD


def test_train_instruments_records_every_kth_step_and_plots_them_in_report_md(tmp_path, capsys):
    out = tmp_path / "run"
    rc, printed = _train_quietly(out, "--epochs", "2", "--instruments", "--instruments-every", "20")
    assert rc == 0 and f"report: {out / 'report.md'}" in printed
    figures = ["example_norms.png", "gradient_flow.png", "noise_scale.png", "update_ratio.png"]
    assert {p.name for p in out.glob("*.png")} == {*figures, "training.png"}
    assert all((out / f).stat().st_size > 10_000 for f in figures)  # drawn, not blank
    report = (out / "report.md").read_text()
    assert all(f"]({f})" in report for f in figures) and "Every 20-th step" in report
    assert "| layer 1 (dense) |" in report and "| layer 2 (dense) |" in report
    config = json.loads((out / "config.json").read_text())
    assert config["instrument_layers"] == ["layer 1 (dense)", "layer 2 (dense)"]
    assert config["instruments"] is True and config["instruments_every"] == 20
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for record in records for r in record["instruments"]]
    assert steps == [1, 21, 41, 45, 65, 85]  # steps 0, 20, 40 of each 44-step epoch
    first = records[0]["instruments"][0]
    assert len(first["grad_norm"]) == 2 and len(first["example_norms"][0]) == 4
    assert first["dead_fraction"][1] is None and 0 <= first["dead_fraction"][0] <= 1
    assert first["b_simple"] > 0
    # --resume rebuilds the switch from config.json: the finished run stays as it was
    before = (out / "metrics.jsonl").read_text()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    strip = lambda text: [{k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
                          for line in text.splitlines()]  # fmt: skip
    assert strip((out / "metrics.jsonl").read_text()) == strip(before)


def test_train_instruments_under_batchnorm_leave_out_the_per_example_plots_and_say_why(
    tmp_path, capsys
):
    out = tmp_path / "run"
    argv = ["train", "--arch", "resmlp", "--depth", "1", "--width", "8", "--norm", "batch",
            "--epochs", "1", "--instruments", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    why = "layer 2 (residual) branch layer 2 (batch_norm) couples the examples"
    assert why in capsys.readouterr().err
    assert why in (out / "report.md").read_text()
    assert {p.name for p in out.glob("*.png")} == {
        "gradient_flow.png", "update_ratio.png", "training.png"
    }  # fmt: skip
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["instruments"][0]
    assert "b_simple" not in record and "example_norms" not in record
    assert len(record["grad_norm"]) == 6  # dense, 2 dense + BN in the block, dense


def test_train_dp_writes_epsilon_its_accounting_and_the_sampling_caveat(tmp_path):
    from fnbp.instruments.privacy import epsilon

    out = tmp_path / "run"
    rc, printed = _train_quietly(out, "--epochs", "2", "--dp-clip", "1", "--dp-noise", "1.1")
    assert rc == 0
    want = epsilon(1.1, 32 / 1437, 88, 1e-5)  # 2 epochs of 44 batches of 32 of 1437 examples
    accounting = json.loads((out / "privacy.json").read_text())
    assert accounting["epsilon"] == pytest.approx(want, rel=1e-12) and 0.5 < want < 5
    assert accounting["steps"] == 88 and accounting["sampling_rate"] == 32 / 1437
    assert accounting["delta"] == 1e-5 and "RDP" in accounting["accountant"]
    assert "not Poisson sampling" in accounting["sampling"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["dp_epsilon"] == pytest.approx(want, rel=1e-12)
    assert records[0]["dp_epsilon"] < records[1]["dp_epsilon"]  # ε grows with the steps
    assert all(0 < r["dp_clipped_fraction"] <= 1 for r in records)
    report = (out / "report.md").read_text()
    assert f"ε = {want:.4g} at δ = 1e-05" in report and "not Poisson sampling" in report
    assert f"DP-SGD: ε = {want:.4g} at δ = 1e-05 (RDP accountant" in printed
    assert "shuffled and of fixed size" in printed
    config = json.loads((out / "config.json").read_text())
    assert (config["dp_clip"], config["dp_noise"], config["dp_delta"]) == (1.0, 1.1, 1e-5)
    # fnbp report computes the accounting again from config.json and metrics.jsonl alone
    (out / "privacy.json").unlink()
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert json.loads((out / "privacy.json").read_text()) == accounting
    assert (out / "report.md").read_text() == report


# ----------------------------------------------------------------------------------------------
# train: bad input is reported in one line, exit code 2, nothing written


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty current folder (so a default runs/ folder would show up too)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "args, match",
    [
        (["--sizes", "64"], "at least two entries"),
        (["--sizes", "64,0,10"], "positive int"),
        (["--sizes", "64,32,3"], "does not fit dataset digits: it has 64 features and 10 outputs"),
        (["--sizes", "40,32,10", "--dataset", "digits"], "must start with 64"),
        (["--dataset", "mnist"], "--data-dir"),
        (["--dataset", "mnist", "--data-dir", "no/such/folder"], "no/such/folder"),
        (["--batch-size", "2000"], "--batch-size 2000 exceeds the 1437 training examples"),
    ],
    ids=[
        "one-size",
        "zero-width",
        "wrong-outputs",
        "wrong-inputs",
        "mnist-no-dir",
        "mnist-missing-dir",
        "batch-too-big",
    ],
)
def test_train_bad_value_exits_2_with_one_line_and_writes_nothing(workdir, capsys, args, match):
    out = workdir / "run"
    rc = main(["train", "--epochs", "1", "--no-progress", "--out", str(out), *args])
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fnbp: error:"), captured.err
    assert match in lines[0]
    assert captured.out == ""
    assert not out.exists() and list(workdir.iterdir()) == []


@pytest.mark.parametrize(
    "args, match",
    [
        (["--lr", "0"], "--lr: must be > 0"),
        (["--lr", "-1"], "--lr: must be > 0"),
        (["--lr", "nan"], "--lr: must be > 0"),
        (["--epochs", "0"], "--epochs: must be > 0"),
        (["--epochs", "1.5"], "--epochs: expected a int"),
        (["--batch-size", "0"], "--batch-size: must be > 0"),
        (["--l2", "-1"], "--l2: must be >= 0"),
        (["--momentum", "-0.5"], "--momentum: must be >= 0"),
        (["--sizes", "64,x,10"], "--sizes must be comma-separated integers"),
        (["--activation", "swish"], "--activation: invalid choice: 'swish'"),
        (["--init", "xavier"], "--init: invalid choice: 'xavier'"),
        (["--dataset", "cifar"], "--dataset: invalid choice"),
        (["--grads", "numeric"], "--grads: invalid choice"),
    ],
)
def test_train_bad_argument_exits_2_via_argparse_and_writes_nothing(workdir, capsys, args, match):
    out = workdir / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--no-progress", "--out", str(out), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("fnbp train: error:")
    assert match in err
    assert not out.exists() and list(workdir.iterdir()) == []


def test_train_existing_non_empty_out_is_refused_and_left_untouched(workdir, capsys):
    out = workdir / "run"
    out.mkdir()
    keep = out / "notes.txt"
    keep.write_text("precious\n")
    rc = main(["train", *SMALL, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fnbp: error:") and "--overwrite" in lines[0]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert keep.read_text() == "precious\n"


def test_train_out_that_is_a_file_is_refused(workdir, capsys):
    out = workdir / "run"
    out.write_text("a file\n")
    assert main(["train", *SMALL, "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("fnbp: error:")
    assert out.read_text() == "a file\n"


def test_train_infinite_l2_exits_2_and_writes_nothing(workdir, capsys):
    out = workdir / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", *SMALL, "--l2", "inf", "--out", str(out)])
    assert e.value.code == 2
    assert "--l2" in capsys.readouterr().err
    assert not out.exists()


def test_train_overwrite_onto_a_file_exits_2(workdir, capsys):
    out = workdir / "run"
    out.write_text("a file\n")
    assert main(["train", *SMALL, "--overwrite", "--out", str(out)]) == 2


# ----------------------------------------------------------------------------------------------
# check

CHECK = ["check", "--sizes", "8,6,4", "--batch-size", "5"]


@pytest.mark.parametrize(
    "extra, header",
    [
        ([], "MLP 8-6-4, relu, softmax_cross_entropy, batch 5, float32"),
        (["--dtype", "float64"], "MLP 8-6-4, relu, softmax_cross_entropy, batch 5, float64"),
        (["--activation", "tanh", "--loss", "mse"], "MLP 8-6-4, tanh, mse, batch 5, float32"),
        (
            ["--loss", "sigmoid_binary_cross_entropy", "--l2", "0.1"],
            "MLP 8-6-4, relu, sigmoid_binary_cross_entropy, batch 5, float32",
        ),
    ],
    ids=["default", "float64", "tanh-mse", "sigmoid-bce-l2"],
)
def test_check_passes_and_prints_the_table(capsys, extra, header):
    rc = main([*CHECK, *extra])
    out = capsys.readouterr().out
    assert rc == 0
    assert header in out
    for leaf in ("layer 1 W", "layer 1 b", "layer 2 W", "layer 2 b"):
        assert leaf in out
    assert "finite diff" in out
    assert out.strip().splitlines()[-1] == "PASSED" and "FAIL" not in out


def test_check_fails_with_exit_1_when_backprop_is_wrong(capsys, monkeypatch):
    # fnbp.crosscheck is the function (re-exported by fnbp/__init__), not the module.
    module = importlib.import_module("fnbp.crosscheck")
    real = module._backprop_jit

    def off_by_one_percent(*args, **kwargs):
        r = real(*args, **kwargs)
        return r._replace(grads=jax.tree.map(lambda g: g * 1.01, r.grads))

    monkeypatch.setattr(module, "_backprop_jit", off_by_one_percent)
    rc = main([*CHECK, "--no-fd"])
    out = capsys.readouterr().out
    assert rc == 1
    assert out.count("FAIL") == 5  # four leaves, then FAILED
    assert out.strip().splitlines()[-1] == "FAILED"


def test_check_bad_sizes_exit_2(capsys):
    assert main(["check", "--sizes", "8"]) == 2
    assert capsys.readouterr().err.startswith("fnbp: error: MLP: sizes needs at least two")


# ----------------------------------------------------------------------------------------------
# the console script


def _fnbp_script():
    script = Path(sys.executable).parent / "fnbp"
    return str(script) if script.exists() else shutil.which("fnbp")


def test_console_script_help_exits_0():
    script = _fnbp_script()
    assert script is not None, "the fnbp console script is not installed"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "check" in result.stdout


def test_console_script_bad_value_exits_2(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [_fnbp_script(), "train", "--sizes", "64", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "fnbp: error: MLP: sizes needs at least two entries" in result.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# checkpoints and --resume, with real processes and real signals

# 44 steps of 32 per epoch, a checkpoint every 10 steps within an epoch and at its end; the
# wider net makes a run last a few seconds, so a signal lands in its middle.
LONG = ["--sizes", "64,256,256,10", "--epochs", "25", "--checkpoint-every", "10", "--no-progress"]
# The same for a net whose resume needs more than params: BatchNorm's running statistics and
# dropout masks drawn from the key at each step (3 residual blocks of 256, 8 epochs).
LONG_NET = ["--arch", "resmlp", "--depth", "3", "--width", "256", "--norm", "batch",
            "--dropout", "0.2", "--epochs", "8", "--checkpoint-every", "10", "--no-progress"]  # fmt: skip


def _start(out, *extra, argv=LONG):
    return subprocess.Popen(
        [_fnbp_script(), "train", *argv, "--out", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # our signals go to it alone
    )  # fmt: skip


def _wait_for_checkpoint(proc, folder, min_step, timeout=120):
    """Poll until a checkpoint of at least ``min_step`` steps exists; return its step."""
    from fnbp.checkpoint import latest_checkpoint

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        newest = latest_checkpoint(folder / "checkpoints")
        if newest is not None and int(newest.stem[5:]) >= min_step:
            return int(newest.stem[5:])
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def _run_whole(folder, argv):
    """The uninterrupted reference, in this process (the same programs as a subprocess's, bit
    for bit, without its ~3 s of imports)."""
    out = folder / "run"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["train", *argv, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _run_whole(tmp_path_factory.mktemp("long"), LONG)


@pytest.fixture(scope="module")
def uninterrupted_net(tmp_path_factory):
    return _run_whole(tmp_path_factory.mktemp("long-net"), LONG_NET)


def _resume(out) -> tuple[int, str]:
    """``fnbp train --resume`` in this process (the stopped run's process is gone; its folder is
    all a resume reads): (return code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(["train", "--resume", str(out), "--no-progress"])
    return rc, err.getvalue()


def _same_results(run, reference):
    a, b = _arrays(run), _arrays(reference)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit for bit
    strip = lambda p: [  # noqa: E731
        {k: v for k, v in json.loads(line).items() if k != "seconds"}
        for line in (p / "metrics.jsonl").read_text().splitlines()
    ]
    assert strip(run) == strip(reference)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_resume_ends_bitwise_identical(
    tmp_path, uninterrupted, sig, code
):
    out = tmp_path / "run"
    proc = _start(out)
    seen = _wait_for_checkpoint(proc, out, 54)  # into epoch 2
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    line = stderr.strip().splitlines()[-1]
    match = re.search(r"stopped after step (\d+); checkpoint (\S+);", line)
    assert match and line.startswith(f"fnbp: {signal.Signals(sig).name}:"), line
    stopped, saved = int(match.group(1)), Path(match.group(2))
    assert stopped >= seen and saved.name == f"ckpt-{stopped:09d}.npz" and saved.is_file()
    assert not (out / "params.npz").exists()
    rc, resumed = _resume(out)
    assert rc == 0, resumed
    assert f"resuming {out} from ckpt-{stopped:09d}.npz" in resumed
    _same_results(out, uninterrupted)


@pytest.mark.parametrize("argv, reference", [(LONG, "uninterrupted"), (LONG_NET, "uninterrupted_net")],
                         ids=["mlp", "net-with-batchnorm-and-dropout"])  # fmt: skip
def test_kill_9_loses_at_most_one_checkpoint_interval_and_resumes_bitwise(
    tmp_path, request, argv, reference
):
    from fnbp.checkpoint import latest_checkpoint, verify_checkpoint

    uninterrupted = request.getfixturevalue(reference)
    out = tmp_path / "run"
    proc = _start(out, argv=argv)
    seen = _wait_for_checkpoint(proc, out, 70)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    newest = latest_checkpoint(out / "checkpoints")
    assert int(newest.stem[5:]) >= seen  # every checkpoint it finished is there, and whole
    for path in (out / "checkpoints").glob("ckpt-*.npz"):
        verify_checkpoint(path)
    rc, resumed = _resume(out)
    assert rc == 0, resumed
    _same_results(out, uninterrupted)
    assert not list((out / "checkpoints").glob(".*"))  # no temporary file left behind


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    out = tmp_path / "run"
    rc, _ = _train_quietly(out, "--epochs", "2")
    assert rc == 0
    before = _arrays(out)
    rc = main(["train", "--resume", str(out), "--no-progress"])
    assert rc == 0
    after = _arrays(out)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_from_a_corrupt_checkpoint_exits_2_naming_it_and_keeps_it(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _ = _train_quietly(out, "--epochs", "2")
    newest = out / "checkpoints" / "ckpt-000000088.npz"
    newest.write_bytes(b"garbage" + newest.read_bytes()[7:])
    before = newest.read_bytes()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("resuming")  # then the one-line error
    assert err[1].startswith("fnbp: error:") and "ckpt-000000088.npz" in err[1]
    assert newest.read_bytes() == before


@pytest.mark.parametrize(
    "setup, extra, match",
    [
        (None, [], "no such run folder"),
        ("empty", [], "it has no config.json"),
        ("bad-json", [], "config.json: not an fnbp train config"),
        ("bad-value", [], "config.json: fnbp train: argument --lr: must be > 0"),
        ("run", ["--lr", "0.1"], "drop --lr"),
        ("run", ["--epochs=4", "--overwrite"], "drop --epochs, --overwrite"),
        ("bad-net", [], "config.json: net: layer 1: unknown kind 'attention'"),
    ],
)
def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys, setup, extra, match):
    out = tmp_path / "run"
    if setup == "run":
        assert _train_quietly(out, "--epochs", "1")[0] == 0
    elif setup is not None:
        out.mkdir()
        config = json.loads(json.dumps({"lr": 0.0}))
        if setup == "bad-json":
            (out / "config.json").write_text("{not json")
        elif setup in ("bad-value", "bad-net"):
            from fnbp.cli import TRAIN_SETTINGS

            config = {k: None for k in TRAIN_SETTINGS}
            config.update(dataset="digits", sizes=[64, 10], lr=0.0, epochs=1)
            if setup == "bad-net":
                config.update(lr=0.1, sizes=None, net={"kind": "net", "input_shape": 64,
                                                       "layers": [{"kind": "attention"}]})  # fmt: skip
            (out / "config.json").write_text(json.dumps(config))
    before = sorted(p.name for p in out.rglob("*")) if out.exists() else None
    assert main(["train", "--resume", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fnbp: error:") and match in err[-1], err
    assert (sorted(p.name for p in out.rglob("*")) if out.exists() else None) == before


def test_divergence_exits_1_naming_step_and_layer_and_writes_no_params(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", *SMALL, "--lr", "50", "--checkpoint-every", "5", "--out", str(out)])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    match = re.match(r"fnbp: error: training diverged at step (\d+) \(epoch 1\): the gradient of "
                     r"layer (\d) is non-finite", err[0])  # fmt: skip
    assert match, err
    step = int(match.group(1))
    assert not (out / "params.npz").exists()
    kept = sorted((out / "checkpoints").glob("ckpt-*.npz"))
    assert step > 5  # seed 0 diverges at step 12: after the first checkpoints
    assert kept and f"last finite checkpoint is {kept[-1]}" in err[0]
    assert int(kept[-1].stem[5:]) == (step - 1) // 5 * 5
    with np.load(kept[-1], allow_pickle=False) as f:
        assert all(np.isfinite(f[k]).all() for k in f.files if k.startswith("params"))


def test_skip_nonfinite_finishes_and_counts_skipped_steps(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", *SMALL, "--lr", "50", "--on-nonfinite", "skip", "--out", str(out)])
    assert rc == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["skipped_steps"] > 0 for r in records)
    params, _ = load_params(out / "params.npz")
    assert all(np.isfinite(np.asarray(v)).all() for p in params for v in p.values())


_DEVICES = r"""
import contextlib, io, json, sys
import numpy as np
from fnbp.cli import main
root, out = sys.argv[1], {}
for name, extra in [("one", ["--devices", "1"]), ("four", ["--devices", "4"]),
                    ("all", ["--devices", "all"]), ("eight", ["--devices", "8"]),
                    ("odd-batch", ["--devices", "4", "--batch-size", "30"])]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["train", "--sizes", "64,32,10", "--epochs", "2", "--no-progress",
                   "--out", f"{root}/{name}", *extra])
    out[name] = {"rc": rc, "err": err.getvalue()}
    if rc == 0:
        with np.load(f"{root}/{name}/params.npz") as f:
            out[name]["W"] = f["layer1/W"].tolist()
print(json.dumps(out))
"""


def test_devices_splits_batches_over_4_cpu_devices_and_refuses_what_does_not_fit(tmp_path):
    env = dict(os.environ, XLA_FLAGS=forced_devices_flags(4))
    result = subprocess.run(
        [sys.executable, "-c", _DEVICES, str(tmp_path)], env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert [out[k]["rc"] for k in ("one", "four", "all")] == [0, 0, 0]
    chex.assert_trees_all_close(out["four"]["W"], out["one"]["W"], rtol=1e-4, atol=1e-5)
    assert out["all"]["W"] == out["four"]["W"]  # all = the 4 devices
    assert json.loads((tmp_path / "four" / "config.json").read_text())["devices"] == 4
    for bad, match in [("eight", "--devices 8: devices must be 1 to 4"),
                       ("odd-batch", "--batch-size 30 must be divisible by the 4 devices")]:  # fmt: skip
        assert out[bad]["rc"] == 2
        lines = out[bad]["err"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fnbp: error:") and match in lines[0]
        assert not (tmp_path / bad).exists()


def test_train_mixed_precision_keeps_float32_params_and_learns(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", *SMALL, "--compute-dtype", "bfloat16", "--out", str(out)])
    assert rc == 0
    params, _ = load_params(out / "params.npz")
    assert params[0]["W"].dtype == np.float32  # the master copy
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["test_accuracy"] > 0.85  # like float32 (3 epochs: ~0.95)
    assert json.loads((out / "config.json").read_text())["compute_dtype"] == "bfloat16"


def test_check_mixed_precision_passes_at_its_tolerance(capsys):
    assert main([*CHECK, "--compute-dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "rtol: jax.grad 0.05 (bfloat16 compute)" in out and out.strip().endswith("PASSED")


# ----------------------------------------------------------------------------------------------
# nets: --net FILE.json and the --arch presets

# A small CNN with every mode-dependent kind: BatchNorm (state) and Dropout (masks from the key).
# (No conv bias: train-mode BatchNorm cancels it, its gradient is 0 and a relative error of it
# is rounding noise.)
TINY_CNN = fnbp.Net(64, [
    Reshape((8, 8, 1)), Conv(4, (3, 3), use_bias=False), BatchNorm(activation="relu"),
    MaxPool((2, 2)),
    Flatten(), Dropout(0.2), Dense(10),
])  # fmt: skip


@pytest.fixture(scope="module")
def net_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "tiny-cnn.json"
    path.write_text(TINY_CNN.to_json(indent=1))
    return path


def _check_net(capsys, *argv):
    rc = main(["check", "--batch-size", "6", *argv])
    return rc, capsys.readouterr().out


def test_check_net_file_passes_and_names_every_layer_and_the_state(capsys, net_file):
    rc, out = _check_net(capsys, "--net", str(net_file))
    assert rc == 0, out
    assert "Net (64,) -> 10: reshape, conv, batch_norm, max_pool, flatten, dropout, dense" in out
    assert "train mode" in out and "params perturbed from init" in out.splitlines()[0]
    for leaf in ("layer 2 (conv) W", "layer 3 (batch_norm) gamma", "layer 7 (dense) b"):
        assert leaf in out
    assert "new state, vs the reference forward pass" in out
    assert out.strip().splitlines()[-1] == "PASSED"


def _captured_crosscheck(monkeypatch):
    """Replace the CLI's crosscheck by one that records its arguments and still runs it."""
    module = importlib.import_module("fnbp.crosscheck")
    real, seen = module.crosscheck, {}

    def recording(params, model, x, y, **kwargs):
        seen.update(params=params, model=model, x=x, **kwargs)
        return real(params, model, x, y, **kwargs)

    monkeypatch.setattr(module, "crosscheck", recording)
    return seen


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_check_uses_perturbed_params_and_state_and_the_chosen_mode(capsys, monkeypatch, mode):
    seen = _captured_crosscheck(monkeypatch)
    rc, out = _check_net(capsys, "--arch", "resmlp", "--norm", "batch", "--depth", "1",
                         "--width", "4", "--dropout", "0.1", "--mode", mode, "--no-fd")  # fmt: skip
    assert rc == 0, out
    assert f"{mode} mode" in out.splitlines()[1]
    assert seen["train"] is (mode == "train") and (seen["key"] is not None) is (mode == "train")
    block = seen["params"][1]["branch"]  # the first residual block's branch
    bn, state = block[1], seen["state"][1]["branch"][1]
    # init would give γ = 1, β = 0, b = 0, mean 0, var 1: each of them must be moved
    assert np.all(np.asarray(bn["gamma"]) != 1) and np.all(np.asarray(bn["beta"]) != 0)
    assert np.all(np.asarray(seen["params"][0]["b"]) != 0)
    assert np.all(np.asarray(state["mean"]) != 0) and np.all(np.asarray(state["var"]) != 1)
    assert np.all(np.asarray(state["var"]) > 0)
    # the preset is sized for digits: 64 features, 10 classes
    assert seen["x"].shape == (6, 64) and seen["model"].output_size == 10


def test_check_mnist1d_cnn_is_sized_for_mnist1d(capsys):
    rc, out = _check_net(capsys, "--arch", "mnist1d_cnn", "--no-fd")
    assert rc == 0, out
    assert "Net (40, 1) -> 10: conv, conv, conv, flatten, dense" in out
    assert "layer 3 (conv) W  (3, 25, 25)" in out and out.strip().endswith("PASSED")


def test_check_net_fails_with_exit_1_naming_the_broken_layer(capsys, monkeypatch, net_file):
    module = importlib.import_module("fnbp.crosscheck")
    real = module._backprop_jit

    def conv_grads_off(*args, **kwargs):
        r = real(*args, **kwargs)
        grads = list(r.grads)
        grads[1] = jax.tree.map(lambda g: g * 1.001, grads[1])  # layer 2 (conv)
        return r._replace(grads=grads)

    monkeypatch.setattr(module, "_backprop_jit", conv_grads_off)
    rc, out = _check_net(capsys, "--net", str(net_file), "--no-fd")
    assert rc == 1
    fails = [line.split("  ")[0] for line in out.splitlines() if line.endswith("FAIL")]
    assert fails == ["layer 2 (conv) W"], out
    assert "first broken local rule: layer 2 (conv)" in out
    assert out.strip().splitlines()[-1] == "FAILED"


def test_help_lists_the_net_options(capsys):
    for command, options in [
        ("train", ["--net FILE.json", "--arch {cnn,mnist1d_cnn,resmlp}", "--depth", "--width",
                   "--norm {batch,layer,none}", "--alpha", "--dropout RATE"]),
        ("check", ["--net FILE.json", "--arch", "--mode {train,eval}", "PERTURBED"]),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for option in options:
            assert option in text, (command, option)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "a --net file or an --arch preset" in " ".join(capsys.readouterr().out.split())


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def net_runs(tmp_path_factory, net_file):
    """Two 2-epoch digits runs of TINY_CNN: ``whole`` uninterrupted, ``cut`` stopped after its
    first chunk (step 20) and resumed with its --net file gone."""
    root = tmp_path_factory.mktemp("net-runs")
    results = {}
    for name in ("whole", "cut"):
        spec = root / f"{name}.json"
        spec.write_text(net_file.read_text())
        argv = ["train", "--net", str(spec), "--epochs", "2", "--checkpoint-every", "20",
                "--no-progress", "--out", str(root / name)]  # fmt: skip
        buffer, err = io.StringIO(), io.StringIO()
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.redirect_stdout(buffer))
            stack.enter_context(contextlib.redirect_stderr(err))
            if name == "cut":  # as if a SIGINT came during the first chunk
                mp = stack.enter_context(pytest.MonkeyPatch.context())
                mp.setattr("fnbp.cli._StopOnSignal.__call__", lambda self: True)
            rc = main(argv)
        results[name] = {"rc": rc, "out": buffer.getvalue(), "err": err.getvalue()}
        spec.unlink()  # --resume must rebuild the net from config.json alone
    cut = root / "cut"
    results["cut"]["params_before_resume"] = (cut / "params.npz").exists()
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        results["resumed"] = {"rc": main(["train", "--resume", str(cut), "--no-progress"]),
                              "err": err.getvalue()}  # fmt: skip
    return root, results


def test_train_net_file_writes_its_spec_state_and_metrics(net_runs):
    from fnbp.io import load_state

    root, results = net_runs
    run = root / "whole"
    assert results["whole"]["rc"] == 0, results["whole"]["err"]
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "config.json", "metrics.jsonl", "params.npz", "report.md", "training.png"
    ]  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    assert config["net"] == json.loads(TINY_CNN.to_json())  # the full spec, not just the file
    assert config["net_file"] == str(root / "whole.json") and config["sizes"] is None
    params, net = load_params(run / "params.npz")
    assert net == TINY_CNN and params[1]["W"].shape == (3, 3, 1, 4)
    state = load_state(run / "params.npz")
    mean = np.asarray(state[2]["mean"])  # layer 3 (batch_norm): moved from its init, 0
    assert mean.shape == (4,) and np.all(mean != 0)
    records = _records(run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(len(r["grad_norms"]) == 2 for r in records)  # the conv's W and the dense's W
    assert records[-1]["test_accuracy"] > 0.5  # chance is 0.1; 2 epochs of this net get ~0.8
    assert f"final test accuracy: {records[-1]['test_accuracy']:.4f}" in results["whole"]["out"]


def test_resume_rebuilds_the_net_from_config_json_and_ends_bitwise_identical(net_runs):
    root, results = net_runs
    cut = results["cut"]
    assert cut["rc"] == 130 and not cut["params_before_resume"], cut["err"]
    assert "stopped after step 20" in cut["err"]
    assert results["resumed"]["rc"] == 0, results["resumed"]["err"]
    assert "from ckpt-000000020.npz" in results["resumed"]["err"]
    _same_results(root / "cut", root / "whole")  # BatchNorm state and dropout masks included
    from fnbp.io import load_state

    a, b = load_state(root / "cut" / "params.npz"), load_state(root / "whole" / "params.npz")
    chex.assert_trees_all_close(a, b, rtol=0, atol=0)  # bit for bit


def _train_arch(out, *argv):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = main(["train", *argv, "--epochs", "1", "--no-progress", "--out", str(out)])
    assert rc == 0
    return json.loads((out / "config.json").read_text()), load_params(out / "params.npz")


def test_train_arch_cnn_builds_the_preset_for_digits(tmp_path):
    from fnbp import presets

    config, (params, net) = _train_arch(tmp_path / "cnn", "--arch", "cnn", "--batch-size", "64")
    assert net == presets.cnn(64, 10) and config["arch"] == "cnn"
    assert config["net"] == net.to_dict() and config["depth"] is None
    assert _records(tmp_path / "cnn")[-1]["test_accuracy"] > 0.5  # one epoch: ~0.9


def test_train_arch_resmlp_with_batch_norm_records_its_resolved_options(tmp_path):
    from fnbp.io import load_state

    config, (params, net) = _train_arch(
        tmp_path / "res", "--arch", "resmlp", "--norm", "batch", "--depth", "2", "--width", "16"
    )
    assert (config["depth"], config["width"], config["norm"]) == (2, 16, "batch")
    assert config["alpha"] == 1 / np.sqrt(2) and config["dropout"] == 0.0
    assert [layer.kind for layer in net.layers] == ["dense", "residual", "residual", "dense"]
    assert [layer.kind for layer in net.layers[1].branch] == [
        "dense", "batch_norm", "dense", "batch_norm"
    ]  # fmt: skip
    state = load_state(tmp_path / "res" / "params.npz")
    assert np.all(np.asarray(state[1]["branch"][1]["var"]) != 1)  # running stats were kept


def test_train_arch_mnist1d_cnn_reshapes_the_data_to_its_input_shape(tmp_path):
    config, (params, net) = _train_arch(
        tmp_path / "m1d", "--arch", "mnist1d_cnn", "--batch-size", "64", "--optimizer", "adam",
        "--lr", "0.01",
    )  # fmt: skip
    assert net.input_shape == (64, 1)  # digits' 64 features as a signal of one channel
    assert params[0]["W"].shape == (5, 1, 25) and params[-1]["W"].shape == (10, 8 * 25)
    assert _records(tmp_path / "m1d")[-1]["test_accuracy"] > 0.3  # one epoch: ~0.8
