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
