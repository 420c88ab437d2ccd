"""Tests of fnbp/report.py: run folders, environment records, JSON, markdown tables, figures."""

import datetime
import json
import platform
import re
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = Path(fnbp.__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------------
# check_out and run_dir


def test_check_out_default_path_is_root_name_timestamp_and_is_not_created(tmp_path):
    before = datetime.datetime.now().replace(microsecond=0)
    path = report.check_out("sweep", root=tmp_path)
    after = datetime.datetime.now()
    assert path.parent == tmp_path
    match = re.fullmatch(r"sweep-(\d{8}-\d{6})", path.name)
    assert match, path.name
    stamp = datetime.datetime.strptime(match.group(1), "%Y%m%d-%H%M%S")
    assert before <= stamp <= after  # the current local time, to the second
    assert not path.exists()


def test_check_out_default_root_is_results_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = report.check_out("demo")
    assert path.parent == Path("results")
    assert path.name.startswith("demo-")
    assert not (tmp_path / "results").exists()


def test_check_out_accepts_a_missing_or_empty_folder(tmp_path):
    assert report.check_out("x", tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert report.check_out("x", tmp_path / "empty") == tmp_path / "empty"
    assert report.check_out("x", str(tmp_path / "empty")) == tmp_path / "empty"  # str is fine


def test_check_out_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not empty"):
        report.check_out("x", tmp_path)
    assert report.check_out("x", tmp_path, overwrite=True) == tmp_path
    assert (tmp_path / "results.json").read_text() == "{}"  # checked, never emptied


@pytest.mark.parametrize("overwrite", [False, True])
def test_check_out_refuses_a_file_path_even_with_overwrite(tmp_path, overwrite):
    target = tmp_path / "a_file"
    target.write_text("data")
    with pytest.raises(FileExistsError, match="is a file"):
        report.check_out("x", target, overwrite=overwrite)


def test_run_dir_creates_the_folder_with_its_parents(tmp_path):
    path = report.run_dir("x", tmp_path / "a" / "b")
    assert path == tmp_path / "a" / "b"
    assert path.is_dir()


def test_run_dir_creates_the_default_timestamped_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = report.run_dir("demo")
    assert path.parent == Path("results")
    assert (tmp_path / path).is_dir()


def test_run_dir_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    (tmp_path / "report.md").write_text("old")
    with pytest.raises(FileExistsError):
        report.run_dir("x", tmp_path)
    assert report.run_dir("x", tmp_path, overwrite=True) == tmp_path


# ----------------------------------------------------------------------------------------------
# environment


def test_environment_records_versions_device_python_and_is_json_serializable():
    env = report.environment()
    assert {"fnbp_version", "jax_version", "device", "python", "git_commit"} <= set(env)
    assert env["fnbp_version"] == fnbp.__version__
    assert env["jax_version"] == jax.__version__
    assert env["python"] == platform.python_version()
    assert isinstance(env["device"], str) and env["device"]
    assert env["device_count"] >= 1
    json.dumps(env)


def test_environment_git_commit_is_the_checkout_head():
    env = report.environment()
    if shutil.which("git") is None:
        assert env["git_commit"] is None
        return
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", env["git_commit"] or ""), env["git_commit"]
    assert env["git_commit"] == head


def test_environment_git_commit_is_none_without_git(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert report.environment()["git_commit"] is None


# ----------------------------------------------------------------------------------------------
# save_json


def _strict_loads(text):
    """json.loads that refuses the non-standard NaN/Infinity tokens."""

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_save_json_round_trips_nested_dicts_with_numpy_and_jax_arrays(tmp_path):
    obj = {
        "config": {"sizes": (4, 8, 2), "lr": 0.1, "name": "relu", "out": Path("results/x")},
        "curves": {
            "loss": np.array([1.5, 0.75, 0.25]),
            "grid": np.arange(6, dtype=np.int32).reshape(2, 3),
            "jax": jnp.array([0.5, 2.0]),
        },
        "scalars": [np.float64(0.125), np.int64(3), np.bool_(True)],
        3: "int key",
    }
    path = tmp_path / "results.json"
    report.save_json(path, obj)
    loaded = _strict_loads(path.read_text())
    assert loaded == {
        "config": {"sizes": [4, 8, 2], "lr": 0.1, "name": "relu", "out": "results/x"},
        "curves": {"loss": [1.5, 0.75, 0.25], "grid": [[0, 1, 2], [3, 4, 5]], "jax": [0.5, 2.0]},
        "scalars": [0.125, 3, True],
        "3": "int key",
    }


def test_save_json_writes_nan_as_null_and_infinities_as_strings(tmp_path):
    obj = {
        "nan": float("nan"),
        "inf": float("inf"),
        "-inf": -float("inf"),
        "np_nan": np.float64("nan"),
        "array": np.array([1.0, np.nan, np.inf, -np.inf]),
        "jax": jnp.array([jnp.nan, 2.0]),
    }
    path = tmp_path / "r.json"
    report.save_json(path, obj)
    loaded = _strict_loads(path.read_text())  # strict: no bare NaN/Infinity tokens
    assert loaded == {
        "nan": None,
        "inf": "inf",
        "-inf": "-inf",
        "np_nan": None,
        "array": [1.0, None, "inf", "-inf"],
        "jax": [None, 2.0],
    }


def test_save_json_replaces_an_existing_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old contents")
    report.save_json(path, {"a": 1})
    report.save_json(path, {"b": [1, 2]})
    assert _strict_loads(path.read_text()) == {"b": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_save_json_accepts_a_str_path(tmp_path):
    report.save_json(str(tmp_path / "c.json"), [1, 2.5])
    assert _strict_loads((tmp_path / "c.json").read_text()) == [1, 2.5]


# ----------------------------------------------------------------------------------------------
# markdown_table


def test_markdown_table_has_header_separator_and_one_line_per_row():
    table = report.markdown_table(["scheme", "depth", "chi"], [["he", 4, 1.0], ["lecun", 10, 0.5]])
    assert table.splitlines() == [
        "| scheme | depth | chi |",
        "|---|---|---|",
        "| he | 4 | 1 |",
        "| lecun | 10 | 0.5 |",
    ]


@pytest.mark.parametrize(
    "value, text",
    [
        (3.14159265, "3.142"),
        (12345.678, "1.235e+04"),
        (0.000123456, "0.0001235"),
        (-2.0 / 3.0, "-0.6667"),
        (np.float32(0.1), "0.1"),
        (np.float64(2.5e-7), "2.5e-07"),
        (float("nan"), "nan"),
        (np.float64("nan"), "nan"),
        (float("inf"), "inf"),
        (12345, "12345"),  # ints are not rounded
        (np.int64(7), "7"),
        ("relu", "relu"),
    ],
)
def test_markdown_table_shows_floats_with_4_significant_digits_and_nan_as_nan(value, text):
    assert report.markdown_table(["v"], [[value]]).splitlines()[2] == f"| {text} |"


def test_markdown_table_without_rows_is_header_and_separator():
    assert report.markdown_table(["a", "b"], []) == "| a | b |\n|---|---|"


# ----------------------------------------------------------------------------------------------
# figure and save_figure


def test_figure_gives_a_grid_of_axes_sized_per_panel():
    import matplotlib.pyplot as plt

    fig, axes = report.figure(2, 3, size=(2.0, 1.5))
    try:
        assert axes.shape == (2, 3)
        np.testing.assert_allclose(fig.get_size_inches(), [6.0, 3.0])
    finally:
        plt.close(fig)


def test_figure_default_is_a_single_axes_in_a_1_by_1_grid():
    import matplotlib.pyplot as plt

    fig, axes = report.figure()
    try:
        assert axes.shape == (1, 1)
        np.testing.assert_allclose(fig.get_size_inches(), [6.0, 4.0])
    finally:
        plt.close(fig)


def test_save_figure_writes_a_png_closes_the_figure_and_returns_the_file_name(tmp_path):
    import matplotlib.pyplot as plt

    fig, axes = report.figure()
    axes[0, 0].plot([0, 1, 2], [1, 0.5, 0.25])
    path = tmp_path / "grad_norms.png"
    assert report.save_figure(fig, path) == "grad_norms.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert not plt.fignum_exists(fig.number)
    assert report.save_figure(report.figure()[0], str(tmp_path / "b.png")) == "b.png"
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG_SIGNATURE


# ----------------------------------------------------------------------------------------------
# read_jsonl and train_report: fnbp train's report.md from a run folder's files

MLP_CONFIG = {
    "dataset": "digits", "sizes": [4, 6, 3], "activation": "relu", "loss": "softmax_cross_entropy",
    "output_activation": "identity", "lr": 0.1, "epochs": 3, "early_stopping": None,
    "instruments": False, "dp_clip": None, "command": "fnbp train --sizes 4,6,3 --epochs 3",
}  # fmt: skip
RECORDS = [  # numbers chosen by hand: the report must show exactly these
    {"epoch": 1, "step": 10, "train_loss": 2.5, "grad_norms": [0.75, 0.5], "seconds": 1.5,
     "test_loss": 1.25, "test_accuracy": 0.5},
    {"epoch": 2, "step": 20, "train_loss": 1.0, "grad_norms": [0.25, 0.125], "seconds": 2.0,
     "test_loss": 0.75, "test_accuracy": 0.625},
    {"epoch": 3, "step": 30, "train_loss": 0.5, "grad_norms": [0.0625, 0.03125], "seconds": 2.5,
     "test_loss": 0.625, "test_accuracy": 0.875},
]  # fmt: skip


def _run_folder(path, config=MLP_CONFIG, records=RECORDS, finished=True, tail=""):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    if finished:
        (path / "params.npz").write_bytes(b"")  # only whether it exists is read
    return path


def test_read_jsonl_keeps_records_in_order_and_skips_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "x": 1}\n[1, 2]\n{"epoch": "2"}\n{"epoch": 3}\n{"epoch": 4, "x"')
    assert report.read_jsonl(path) == [{"epoch": 1, "x": 1}, {"epoch": 3}]
    assert report.read_jsonl(tmp_path / "missing.jsonl") == []


def test_train_report_of_a_finished_run_has_command_status_metrics_figure_and_config(tmp_path):
    run = _run_folder(tmp_path / "run")
    path = report.train_report(run)
    text = path.read_text()
    assert path == run / "report.md"
    assert text.startswith("# fnbp train: run\n\n```\nfnbp train --sizes 4,6,3 --epochs 3\n```\n")
    assert "Finished: 3 of 3 epochs, 30 steps; the params are in params.npz." in text
    assert "## Final metrics (epoch 3)" in text
    for row in ["| train loss (mean over the epoch's steps) | 0.5 |", "| test loss | 0.625 |",
                "| test accuracy | 0.875 |", "| steps | 30 |",
                "| seconds (training, compilation included) | 2.5 |"]:  # fmt: skip
        assert row in text, row
    assert "| layer 1 (dense) | 0.75 | 0.0625 |" in text  # ‖∂L/∂W‖ at epochs 1 and 3
    assert "| layer 2 (dense) | 0.5 | 0.03125 |" in text
    assert "Per epoch: train loss (the mean over each epoch's steps), test loss, test accuracy, each layer's" in text  # fmt: skip
    assert "![training](training.png)" in text
    assert (run / "training.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "| lr | 0.1 |" in text and "| sizes | 4,6,3 |" in text and "| dp_clip | – |" in text
    assert "| command |" not in text  # shown once, above


def test_train_report_of_an_interrupted_run_says_how_far_it_got_and_how_to_resume(tmp_path):
    run = _run_folder(
        tmp_path / "run", records=RECORDS[:2], finished=False, tail='{"epoch": 3, "st'
    )
    text = report.train_report(run).read_text()
    assert (
        f"Not finished: 2 of 3 epochs recorded (20 steps) and no params.npz: the run was "
        f"interrupted or diverged (its error says which). Continue it with `fnbp train --resume {run}`."
    ) in text  # fmt: skip
    assert "## Final metrics (epoch 2)" in text and "| test accuracy | 0.625 |" in text


def test_train_report_before_the_first_epoch_has_no_metrics_and_no_figure(tmp_path):
    run = _run_folder(tmp_path / "run", records=[], finished=False)
    text = report.train_report(run).read_text()
    assert "Not finished: 0 of 3 epochs recorded (0 steps)" in text
    assert "## Final metrics" not in text and not (run / "training.png").exists()
    assert "## Config" in text


def test_train_report_names_a_nets_weight_layers_and_its_early_stopping_epoch(tmp_path):
    from fnbp.layers import BatchNorm, Dense, Residual

    net = fnbp.Net(4, [Dense(6, "relu"), BatchNorm(), Residual((Dense(6),)), Dense(3)])
    config = {**MLP_CONFIG, "sizes": None, "net": net.to_dict(), "early_stopping": 1}
    records = [{**r, "grad_norms": [*r["grad_norms"], 1.0], "best_epoch": 2} for r in RECORDS]
    text = report.train_report(_run_folder(tmp_path / "run", config, records)).read_text()
    # the three layers with weights, as fnbp.train.weight_layers counts them: BatchNorm is not one
    for row in ["| layer 1 (dense) | 0.75 | 0.0625 |", "| layer 3 (residual) | 0.5 | 0.03125 |",
                "| layer 4 (dense) | 1 | 1 |"]:  # fmt: skip
        assert row in text, row
    assert (
        "Finished: early stopping ran 3 of 3 epochs (30 steps); params.npz holds epoch 2's" in text
    )
    assert "| test accuracy, epoch 2 (the params kept) | 0.625 |" in text
    assert "The net: 4 layers (1 dense, 2 batch_norm, 3 residual, 4 dense)." in text


def test_train_report_of_a_regression_run_plots_losses_only(tmp_path):
    config = {**MLP_CONFIG, "dataset": "teacher_student", "loss": "mse", "sizes": [4, 6, 1]}
    records = [{k: v for k, v in r.items() if k not in ("test_accuracy", "grad_norms")}
               for r in RECORDS]  # fmt: skip
    text = report.train_report(_run_folder(tmp_path / "run", config, records)).read_text()
    assert "Per epoch: train loss (the mean over each epoch's steps), test loss.\n" in text
    assert "accuracy" not in text and "‖∂L/∂W‖" not in text


def test_train_report_of_a_dp_run_shows_the_accounting_of_privacy_json(tmp_path):
    config = {**MLP_CONFIG, "dp_clip": 1.0}
    run = _run_folder(tmp_path / "run", config)
    accounting = {"epsilon": 3.25, "delta": 1e-5, "accountant": "dp-accounting RDP (Rényi DP)",
                  "noise_multiplier": 1.1, "clip_norm": 1.0, "sampling_rate": 0.125,
                  "batch_size": 4, "n_train": 32, "steps": 30, "sampling": "not Poisson."}  # fmt: skip
    (run / "privacy.json").write_text(json.dumps(accounting))
    text = report.train_report(run).read_text()
    assert "## Privacy (DP-SGD)" in text and "Gaussian noise σC = 1.1·1 on the sum" in text
    assert "**ε = 3.25 at δ = 1e-05** after 30 steps, sampling rate q = 4/32 = 0.125" in text
    assert "Caveat: not Poisson." in text


@pytest.mark.parametrize(
    "config, error, match",
    [
        (None, FileNotFoundError, "no config.json, so it is not an fnbp train run folder"),
        ("{", ValueError, "config.json: not an fnbp train config (JSONDecodeError"),
        ({"sizes": [4, 3], "activation": "relu", "loss": "mse", "output_activation": "identity"},
         ValueError, "not an fnbp train config (KeyError: 'epochs')"),
        ({**MLP_CONFIG, "activation": "swish"}, ValueError, "not an fnbp train config"),
    ],
)  # fmt: skip
def test_train_report_refuses_a_folder_without_a_train_config(tmp_path, config, error, match):
    run = tmp_path / "run"
    run.mkdir()
    if config is not None:
        (run / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(error, match=re.escape(match)):
        report.train_report(run)
    assert not (run / "report.md").exists()
