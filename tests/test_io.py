"""Tests of fnbp/io.py: saving and loading params as pickle-free .npz files."""

import json
import zipfile

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fnbp
from fnbp import io as fio
from fnbp.initializers import init_params
from fnbp.model import MLP

MODEL = MLP((5, 7, 3), "tanh", "mse", "sigmoid")


@pytest.fixture
def params():
    # bias_std 0 by default: give the biases values so that a dropped bias would show.
    p = init_params(jax.random.key(0), MODEL, "glorot_normal")
    return [dict(l, b=jax.random.normal(jax.random.key(i), l["b"].shape)) for i, l in enumerate(p)]


@pytest.fixture
def saved(tmp_path, params):
    path = tmp_path / "params.npz"
    fio.save_params(path, params, MODEL)
    return path


def test_round_trip_is_bitwise_equal_and_restores_the_model(saved, params):
    loaded, model = fio.load_params(saved)
    assert model == MLP((5, 7, 3), "tanh", "mse", "sigmoid")
    assert len(loaded) == 2
    for got, want in zip(loaded, params, strict=True):
        assert set(got) == {"W", "b"}
        for k in ("W", "b"):
            assert got[k].dtype == np.float32
            np.testing.assert_array_equal(got[k], np.asarray(want[k]))


def test_float64_params_round_trip_in_float64(tmp_path):
    model = MLP((3, 2))
    with jax.enable_x64(True):
        p = init_params(jax.random.key(1), model, dtype=jnp.float64)
    fio.save_params(tmp_path / "p.npz", p, model)
    loaded, _ = fio.load_params(tmp_path / "p.npz")
    assert loaded[0]["W"].dtype == np.float64
    np.testing.assert_array_equal(loaded[0]["W"], np.asarray(p[0]["W"]))


def test_bfloat16_params_round_trip_their_values(tmp_path):
    p = init_params(jax.random.key(2), MODEL, dtype=jnp.bfloat16)
    p[0]["b"] = jnp.asarray([1.0, -2.5, 3.140625, 0.0078125, -0.0, 7.0, 256.0], jnp.bfloat16)
    fio.save_params(tmp_path / "p.npz", p, MODEL)
    loaded, _ = fio.load_params(tmp_path / "p.npz")
    # Stored as float32 (npz has no bfloat16): bfloat16 -> float32 is exact, so the values are
    # bitwise those of the bfloat16 params, and casting back gives the same bfloat16 bits.
    for got, want in zip(loaded, p, strict=True):
        for k in ("W", "b"):
            assert got[k].dtype == np.float32
            np.testing.assert_array_equal(got[k], np.asarray(want[k], np.float32))
            np.testing.assert_array_equal(
                got[k].astype(ml_dtypes.bfloat16).view(np.uint16),
                np.asarray(want[k]).view(np.uint16),
            )


def test_file_is_a_plain_npz_readable_without_pickle(saved, params):
    with np.load(saved, allow_pickle=False) as f:
        assert sorted(f.files) == ["__model__", "layer1/W", "layer1/b", "layer2/W", "layer2/b"]
        spec = json.loads(bytes(f["__model__"]).decode())
        np.testing.assert_array_equal(f["layer2/W"], np.asarray(params[1]["W"]))
    assert spec == {
        "sizes": [5, 7, 3],
        "activation": "tanh",
        "loss": "mse",
        "output_activation": "sigmoid",
    }
    assert zipfile.is_zipfile(saved)


def test_save_leaves_no_temporary_file(saved):
    assert [p.name for p in saved.parent.iterdir()] == ["params.npz"]


def test_save_replaces_an_existing_file(saved, params):
    fio.save_params(saved, [dict(l, W=l["W"] * 2) for l in params], MODEL)
    loaded, _ = fio.load_params(saved)
    np.testing.assert_array_equal(loaded[1]["W"], 2 * np.asarray(params[1]["W"]))


@pytest.mark.parametrize(
    "cut",
    [
        0.5,
        -10,
    ],
    ids=["half", "last-10-bytes"],
)
def test_truncated_file_raises_value_error_naming_the_path(saved, cut):
    payload = saved.read_bytes()
    end = int(len(payload) * cut) if isinstance(cut, float) else cut
    bad = saved.with_name("truncated.npz")
    bad.write_bytes(payload[:end])
    with pytest.raises(ValueError, match="truncated.npz"):
        fio.load_params(bad)


@pytest.mark.parametrize(
    "payload",
    [
        np.random.default_rng(0).bytes(300),
        b"",
        b"\x93NUMPY",
        b"PK\x03\x04" + bytes(50),
    ],
    ids=["random", "empty", "npy-magic-only", "zip-magic-only"],
)
def test_random_bytes_raise_value_error_naming_the_path(tmp_path, payload):
    bad = tmp_path / "random.npz"
    bad.write_bytes(payload)
    with pytest.raises(ValueError, match="random.npz"):
        fio.load_params(bad)


def test_npz_without_model_spec_raises_value_error(tmp_path, params):
    bad = tmp_path / "nospec.npz"
    np.savez(
        bad, **{"layer1/W": np.asarray(params[0]["W"]), "layer1/b": np.asarray(params[0]["b"])}
    )
    with pytest.raises(ValueError, match=r"nospec\.npz.*__model__"):
        fio.load_params(bad)


def _rewrite(path, **changes):
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    for k, v in changes.items():
        if v is None:
            del arrays[k.replace("__", "/")]
        else:
            arrays[k.replace("__", "/") if k != "__model__" else k] = v
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(layer2__W=np.zeros((3, 6), np.float32)), r"params\[1\]\['W'\].*\(3, 7\)"),
        (dict(layer1__b=np.zeros((7, 1), np.float32)), r"params\[0\]\['b'\]"),
        (dict(layer1__W=np.zeros((7, 5), np.int32)), "floating"),
        (dict(layer2__b=None), "layer2/b"),
        (dict(__model__=np.frombuffer(b"not json", np.uint8)), "not a valid fnbp params file"),
        (dict(__model__=np.frombuffer(b'{"sizes": [5, 3]}', np.uint8)), "activation"),
        (
            dict(
                __model__=np.frombuffer(
                    b'{"sizes": [5, 0, 3], "activation": "relu", "loss": '
                    b'"mse", "output_activation": "identity"}',
                    np.uint8,
                )
            ),
            "positive int",
        ),
    ],
    ids=["W-shape", "b-rank", "int-dtype", "missing-leaf", "bad-json", "spec-keys", "bad-sizes"],
)
def test_arrays_that_do_not_fit_the_spec_raise_value_error_naming_the_path(saved, change, match):
    _rewrite(saved, **change)
    with pytest.raises(ValueError, match=match) as e:
        fio.load_params(saved)
    assert str(saved) in str(e.value)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        fio.load_params(tmp_path / "absent.npz")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p[:1],
        lambda p: [p[0], dict(p[1], W=p[1]["W"].T)],
        lambda p: [p[0], {"W": p[1]["W"]}],
    ],
    ids=["too-few-layers", "transposed-W", "missing-b"],
)
def test_saving_mismatched_params_raises_and_writes_nothing(tmp_path, params, mutate):
    path = tmp_path / "p.npz"
    with pytest.raises(ValueError):
        fio.save_params(path, mutate(params), MODEL)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_an_existing_good_file(saved, params):
    before = saved.read_bytes()
    with pytest.raises(ValueError):
        fio.save_params(saved, params[:1], MODEL)
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == ["params.npz"]


def test_crash_during_write_keeps_an_existing_good_file(saved, params, monkeypatch):
    """A failure after the temporary file is written (here: the rename) leaves the old file
    under the name and removes the temporary file."""
    before = saved.read_bytes()

    def fail(*args):
        raise OSError("disk on fire")

    monkeypatch.setattr(fio.os, "replace", fail)
    with pytest.raises(OSError, match="disk on fire"):
        fio.save_params(saved, [dict(l, W=l["W"] + 1) for l in params], MODEL)
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == ["params.npz"]


# ----------------------------------------------------------------------------------------------
# Files written before nets existed, and nets


def _old_save_params(path, params, model):
    """The params writer of fnbp at commit 9edf5f9 (before nets), frozen here: it makes the
    files users already have (checked once against that commit's own writer: same members,
    same bytes in each)."""
    arrays = {}
    for l, p in enumerate(params, start=1):
        for k in ("W", "b"):
            v = np.asarray(p[k])
            if v.dtype.name == "bfloat16":
                v = v.astype(np.float32)
            arrays[f"layer{l}/{k}"] = v
    spec = {
        "sizes": list(model.sizes),
        "activation": model.activation,
        "loss": model.loss,
        "output_activation": model.output_activation,
    }
    arrays["__model__"] = np.frombuffer(json.dumps(spec).encode(), np.uint8)
    np.savez(path, **arrays)


def _members(path):
    with zipfile.ZipFile(path) as f:
        return {item.filename: f.read(item) for item in f.infolist()}


def test_an_old_mlp_params_file_loads_and_the_new_writer_writes_the_same_members(tmp_path, params):
    old, new = tmp_path / "old.npz", tmp_path / "new.npz"
    _old_save_params(old, params, MODEL)
    loaded, model = fio.load_params(old)
    assert model == MODEL and fio.load_state(old) is None
    for got, want in zip(loaded, params, strict=True):
        for k in ("W", "b"):
            np.testing.assert_array_equal(got[k], np.asarray(want[k]))
    fio.save_params(new, params, MODEL)
    assert _members(new) == _members(old)  # every member's name and bytes: the format is unchanged


def _cnn():
    """Conv, BatchNorm, a residual block with a BatchNorm inside, and a dense head."""
    from fnbp.layers import BatchNorm, Conv, Dense, Dropout, Flatten, Residual

    return fnbp.Net((6, 2), [
        Conv(3, (3,), activation="relu"),
        BatchNorm(),
        Residual((Conv(3, (1,), activation="tanh"), BatchNorm(momentum=0.5), Dropout(0.1)), learn_alpha=True),
        Flatten(),
        Dense(2),
    ])  # fmt: skip


def _trained_state(net, key=3):
    """A state no init would give: random running statistics (var > 0)."""
    leaves, treedef = jax.tree.flatten(fnbp.init_state(net))
    keys = jax.random.split(jax.random.key(key), len(leaves))
    return jax.tree.unflatten(
        treedef, [jnp.exp(jax.random.normal(k, v.shape)) for k, v in zip(keys, leaves, strict=True)]
    )


def test_a_nets_params_and_state_round_trip_bitwise_under_their_tree_paths(tmp_path):
    net = _cnn()
    params, state = fnbp.init_params(jax.random.key(0), net), _trained_state(net)
    fio.save_params(tmp_path / "net.npz", params, net, state)
    with np.load(tmp_path / "net.npz", allow_pickle=False) as f:
        names = set(f.files)
        assert fnbp.Net.from_json(bytes(f["__model__"]).decode()) == net
    assert names == {
        "__model__", "params/0/W", "params/0/b", "params/1/gamma", "params/1/beta",
        "params/2/alpha", "params/2/branch/0/W", "params/2/branch/0/b",
        "params/2/branch/1/gamma", "params/2/branch/1/beta", "params/4/W", "params/4/b",
        "state/1/mean", "state/1/var", "state/2/branch/1/mean", "state/2/branch/1/var",
    }  # fmt: skip
    loaded, model = fio.load_params(tmp_path / "net.npz")
    assert model == net
    chex.assert_trees_all_equal(loaded, jax.tree.map(np.asarray, params))
    chex.assert_trees_all_equal(
        fio.load_state(tmp_path / "net.npz"), jax.tree.map(np.asarray, state)
    )
    # the loaded pair runs: the same outputs as the originals
    np.testing.assert_array_equal(
        fnbp.forward(
            loaded,
            model,
            np.ones((2, 6, 2), np.float32),
            state=fio.load_state(tmp_path / "net.npz"),
        ),
        fnbp.forward(params, net, jnp.ones((2, 6, 2)), state=state),
    )


def test_load_state_of_a_net_saved_without_its_state_names_the_layer(tmp_path):
    net = _cnn()
    fio.save_params(tmp_path / "net.npz", fnbp.init_params(jax.random.key(0), net), net)
    with pytest.raises(
        ValueError, match=r"net.npz: the file holds no state.*layer 2 \(batch_norm\)"
    ):
        fio.load_state(tmp_path / "net.npz")
    plain = fnbp.Net(4, [fnbp.layers.Dense(3)])  # nothing to keep: the empty state
    fio.save_params(tmp_path / "plain.npz", fnbp.init_params(jax.random.key(0), plain), plain)
    assert fio.load_state(tmp_path / "plain.npz") == [{}]


def test_a_net_file_with_an_unknown_kind_or_a_missing_leaf_is_refused_naming_the_layer(tmp_path):
    net = _cnn()
    path = tmp_path / "net.npz"
    fio.save_params(path, fnbp.init_params(jax.random.key(0), net), net)
    spec = json.loads(net.to_json())
    spec["layers"][2]["branch"][0]["kind"] = "attention"
    _rewrite(path, __model__=np.frombuffer(json.dumps(spec).encode(), np.uint8))
    with pytest.raises(
        ValueError,
        match=r"net.npz: .*layer 3 \(residual\) branch layer 1: unknown kind 'attention'",
    ):
        fio.load_params(path)
    fio.save_params(path, fnbp.init_params(jax.random.key(0), net), net)
    _rewrite(path, **{"params__2__branch__1__gamma": None})
    with pytest.raises(
        ValueError, match=r"net.npz: no array params/2/branch/1/gamma, which layer 3 \(residual\)"
    ):
        fio.load_params(path)


def test_saving_a_state_that_does_not_fit_is_refused_naming_the_layer(tmp_path):
    net = _cnn()
    params, state = fnbp.init_params(jax.random.key(0), net), fnbp.init_state(net)
    state[1] = {"mean": jnp.zeros(4), "var": jnp.ones(4)}
    with pytest.raises(
        ValueError, match=r"state\[1\]\['mean'\] \(layer 2, batch_norm\) must have shape \(3,\)"
    ):
        fio.save_params(tmp_path / "net.npz", params, net, state)
    with pytest.raises(ValueError, match="an MLP keeps no state"):
        fio.save_params(
            tmp_path / "mlp.npz", init_params(jax.random.key(0), MODEL), MODEL, [{"x": 1}] * 2
        )
    assert list(tmp_path.iterdir()) == []
