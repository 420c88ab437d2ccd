"""Tests of fnbp/checkpoint.py: whole training states in pickle-free, checksummed .npz files."""

import hashlib
import json
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fnbp import checkpoint as ck
from fnbp import io as fio
from fnbp.initializers import init_params
from fnbp.model import MLP, init_state

MODEL = MLP((5, 7, 3), "tanh")


def _state(optimizer, dtype=jnp.float32, steps=3):
    """A checkpoint after a few real optimizer steps, so no leaf of the state is trivially 0."""
    params = init_params(jax.random.key(0), MODEL, dtype=dtype)
    opt_state = optimizer.init(params)
    for i in range(steps):
        g = jax.tree.map(lambda v, i=i: jnp.full_like(v, 0.1 * (i + 1)), params)
        updates, opt_state = optimizer.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
    return ck.Checkpoint(
        params, opt_state, steps, 1, jax.random.key(42), MODEL,
        config={"lr": 0.1, "sizes": [5, 7, 3]}, loop={"history": [{"epoch": 1, "loss": 0.5}]},
    )  # fmt: skip


OPTIMIZERS = {
    "sgd": optax.sgd(0.1),
    "momentum": optax.sgd(0.1, momentum=0.9),
    "adam": optax.adam(1e-2),
    "skip-nonfinite-adam": optax.apply_if_finite(optax.adam(1e-2), 10),
}


@pytest.fixture
def saved(tmp_path):
    state = _state(OPTIMIZERS["adam"])
    path = ck.save_checkpoint(tmp_path / "ckpt-000000003.npz", state)
    return path, state


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_round_trip_restores_every_array_bit_for_bit_and_the_counters(tmp_path, name):
    state = _state(OPTIMIZERS[name])
    path = ck.save_checkpoint(tmp_path / "c.npz", state)
    back = ck.load_checkpoint(path, OPTIMIZERS[name], MODEL)
    chex.assert_trees_all_equal(back.params, state.params)
    chex.assert_trees_all_equal(back.opt_state, state.opt_state)  # same structure and bits
    assert jax.tree.structure(back.opt_state) == jax.tree.structure(state.opt_state)
    assert (back.step, back.epoch, back.model) == (3, 1, MODEL)
    assert back.config == state.config and back.loop == state.loop
    np.testing.assert_array_equal(jax.random.key_data(back.key), jax.random.key_data(state.key))
    # the restored key draws what the original draws
    np.testing.assert_array_equal(
        jax.random.normal(back.key, (4,)), jax.random.normal(state.key, (4,))
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float64])
def test_round_trip_keeps_bfloat16_and_float64_bits(tmp_path, dtype):
    with jax.enable_x64(dtype == np.float64):
        state = _state(OPTIMIZERS["momentum"], dtype=dtype)
        path = ck.save_checkpoint(tmp_path / "c.npz", state)
        back = ck.load_checkpoint(path, OPTIMIZERS["momentum"], MODEL)
        assert back.params[0]["W"].dtype == jnp.dtype(dtype)
        chex.assert_trees_all_equal(back.params, state.params)
        chex.assert_trees_all_equal(back.opt_state, state.opt_state)


def test_file_is_a_plain_npz_whose_meta_is_json(saved):
    path, state = saved
    with np.load(path, allow_pickle=False) as f:  # nothing in it needs pickle
        meta = json.loads(bytes(f["__meta__"]).decode())
        np.testing.assert_array_equal(f["params/1/W"], np.asarray(state.params[0]["W"]))
        assert f["key"].dtype == np.uint32
    assert meta["format"] == "fnbp-checkpoint" and meta["step"] == 3
    assert meta["model"]["sizes"] == [5, 7, 3]
    assert meta["arrays"]["params/1/W"] == ["float32", [7, 5]]
    assert len(meta["sha256"]) == 64


def test_save_leaves_no_temporary_file_and_latest_finds_the_newest(tmp_path):
    state = _state(OPTIMIZERS["sgd"])
    for step in (7, 30, 12):
        ck.save_checkpoint(ck.checkpoint_path(tmp_path, step), state._replace(step=step))
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [
        "ckpt-000000007.npz", "ckpt-000000012.npz", "ckpt-000000030.npz",
    ]  # fmt: skip
    assert ck.latest_checkpoint(tmp_path).name == "ckpt-000000030.npz"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    ck.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [
        "ckpt-000000012.npz", "ckpt-000000030.npz",
    ]  # fmt: skip
    assert (tmp_path / "notes.txt").exists()
    assert ck.latest_checkpoint(tmp_path / "missing") is None


def test_crash_during_write_keeps_the_previous_checkpoint(saved, monkeypatch):
    path, state = saved
    before = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(fio.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(path, state._replace(step=4))
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


# ----------------------------------------------------------------------------------------------
# Bad files: a clear ValueError naming the file


@pytest.mark.parametrize("cut", [0.5, 0.9, -1], ids=["half", "90%", "last-byte"])
def test_truncated_checkpoint_raises_value_error_naming_the_file(saved, cut):
    path, _ = saved
    payload = path.read_bytes()
    end = int(len(payload) * cut) if isinstance(cut, float) else cut
    bad = path.with_name("ckpt-000000009.npz")
    bad.write_bytes(payload[:end])
    with pytest.raises(ValueError, match="ckpt-000000009.npz.*(truncated or corrupt)"):
        ck.load_checkpoint(bad, OPTIMIZERS["adam"])


def test_flipped_array_byte_is_caught_by_the_checksum(saved, tmp_path):
    """Rewrite the zip with one array byte changed (valid zip CRCs, so only the SHA-256 can
    tell) and check that loading refuses it."""
    path, _ = saved
    bad = tmp_path / "flipped.npz"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "params/1/W.npy":
                data = data[:-1] + bytes([data[-1] ^ 0x01])
            dst.writestr(item, data)
    with pytest.raises(ValueError, match="flipped.npz: checksum mismatch"):
        ck.load_checkpoint(bad, OPTIMIZERS["adam"])


def test_corrupt_zip_member_is_a_value_error(saved, tmp_path):
    path, _ = saved
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 3] ^= 0xFF  # inside some member: the zip CRC or npy header breaks
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(bytes(payload))
    with pytest.raises(ValueError, match="corrupt.npz"):
        ck.load_checkpoint(bad, OPTIMIZERS["adam"])


@pytest.mark.parametrize(
    "payload", [b"", b"PK\x03\x04" + bytes(40), np.random.default_rng(1).bytes(500)],
    ids=["empty", "zip-magic", "random"],
)  # fmt: skip
def test_random_bytes_raise_value_error(tmp_path, payload):
    bad = tmp_path / "junk.npz"
    bad.write_bytes(payload)
    with pytest.raises(ValueError, match="junk.npz"):
        ck.load_checkpoint(bad, OPTIMIZERS["sgd"])


def test_params_file_is_not_a_checkpoint(tmp_path):
    params = init_params(jax.random.key(0), MODEL)
    fio.save_params(tmp_path / "params.npz", params, MODEL)
    with pytest.raises(ValueError, match="params.npz.*no __meta__"):
        ck.load_checkpoint(tmp_path / "params.npz", OPTIMIZERS["sgd"])


def test_checkpoint_of_another_model_is_refused_naming_both(saved):
    path, _ = saved
    other = MLP((5, 8, 3), "tanh")
    with pytest.raises(ValueError, match=r"ckpt-000000003.npz: .*another model.*\(5, 7, 3\)"):
        ck.load_checkpoint(path, OPTIMIZERS["adam"], other)


def test_checkpoint_of_another_optimizer_is_refused(saved):
    path, _ = saved  # written with adam: mu, nu and a count
    with pytest.raises(ValueError, match="ckpt-000000003.npz: the optimizer state has"):
        ck.load_checkpoint(path, OPTIMIZERS["momentum"])


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        ck.load_checkpoint(tmp_path / "nope.npz", OPTIMIZERS["sgd"])


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda s: s._replace(config={"f": object()}), TypeError, "JSON-able"),
        (lambda s: s._replace(key=jax.random.split(s.key, 2)), TypeError, "single typed PRNG"),
        (lambda s: s._replace(params=s.params[:1]), ValueError, "layers"),
    ],
    ids=["config-not-json", "two-keys", "params-of-another-model"],
)
def test_unsavable_state_raises_and_writes_nothing(tmp_path, change, error, match):
    with pytest.raises(error, match=match):
        ck.save_checkpoint(tmp_path / "c.npz", change(_state(OPTIMIZERS["sgd"])))
    assert list(tmp_path.iterdir()) == []


def test_verify_checkpoint_returns_the_meta_record(saved):
    path, _ = saved
    meta = ck.verify_checkpoint(path)
    assert meta["step"] == 3 and meta["loop"]["history"][0]["epoch"] == 1


# ----------------------------------------------------------------------------------------------
# Files written before nets existed, and nets


def _old_save_checkpoint(path, c):
    """The checkpoint writer of fnbp at commit 9edf5f9 (before nets), frozen here: it makes the
    files users already have (checked once against that commit's own writer: same members,
    same bytes in each). Not atomic; the format is what matters."""
    arrays = {
        f"params/{l}/{k}": np.asarray(p[k])
        for l, p in enumerate(c.params, start=1)
        for k in ("W", "b")
    }
    leaves = jax.tree.leaves(c.opt_state)
    arrays.update({f"opt_state/{i}": np.asarray(v) for i, v in enumerate(leaves)})
    arrays["key"] = np.asarray(jax.random.key_data(c.key))
    stored = {
        n: v if v.dtype.isbuiltin == 1 else v.view(f"u{v.dtype.itemsize}")
        for n, v in arrays.items()
    }
    h = hashlib.sha256()
    for name in sorted(stored):
        v = np.ascontiguousarray(stored[name])
        h.update(f"{name}|{v.dtype.str}|{v.shape}|".encode())
        h.update(v.tobytes())
    m = c.model
    meta = {
        "format": "fnbp-checkpoint",
        "version": 1,
        "step": int(c.step),
        "epoch": int(c.epoch),
        "model": {"sizes": list(m.sizes), "activation": m.activation, "loss": m.loss,
                  "output_activation": m.output_activation},
        "key_impl": str(jax.random.key_impl(c.key)),
        "opt_state_tree": str(jax.tree.structure(c.opt_state)),
        "arrays": {name: [v.dtype.name, list(v.shape)] for name, v in arrays.items()},
        "sha256": h.hexdigest(),
        "config": c.config or {},
        "loop": c.loop or {},
    }  # fmt: skip
    text = json.dumps(meta, allow_nan=True).encode()
    np.savez(path, __meta__=np.frombuffer(text, np.uint8), **stored)


def _members(path):
    with zipfile.ZipFile(path) as f:
        return {item.filename: f.read(item) for item in f.infolist()}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_an_old_mlp_checkpoint_loads_and_the_new_writer_writes_the_same_members(tmp_path, dtype):
    state = _state(OPTIMIZERS["adam"], dtype=dtype)
    old, new = tmp_path / "old.npz", tmp_path / "new.npz"
    _old_save_checkpoint(old, state)
    back = ck.load_checkpoint(old, OPTIMIZERS["adam"], MODEL)
    chex.assert_trees_all_equal((back.params, back.opt_state), (state.params, state.opt_state))
    assert (back.step, back.epoch, back.model, back.state) == (3, 1, MODEL, None)
    assert back.config == state.config and back.loop == state.loop
    ck.save_checkpoint(new, state)
    assert _members(new) == _members(old)  # names, bytes and meta record: the format is unchanged


def _net():
    """Conv, BatchNorm, and a residual block holding a BatchNorm and dropout."""
    from fnbp.layers import BatchNorm, Conv, Dense, Dropout, Flatten, Residual
    from fnbp.net import Net

    return Net((5, 2), [
        Conv(3, (3,), activation="relu"),
        BatchNorm(),
        Residual((Conv(3, (1,), activation="tanh"), BatchNorm(momentum=0.5), Dropout(0.1))),
        Flatten(),
        Dense(2),
    ])  # fmt: skip


def _net_checkpoint(optimizer=OPTIMIZERS["adam"]):
    """A net's checkpoint after a few optimizer steps, with running statistics no init gives."""
    net = _net()
    params = init_params(jax.random.key(0), net)
    opt_state = optimizer.init(params)
    for i in range(3):
        g = jax.tree.map(lambda v, i=i: jnp.full_like(v, 0.1 * (i + 1)), params)
        updates, opt_state = optimizer.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
    state = jax.tree.map(lambda v: v + 0.25, init_state(net))
    loop = {"history": []}
    return ck.Checkpoint(params, opt_state, 3, 0, jax.random.key(7), net, None, loop, state)


def test_a_net_checkpoint_round_trips_params_state_and_optimizer_state_bitwise(tmp_path):
    c = _net_checkpoint()
    path = ck.save_checkpoint(tmp_path / "net.npz", c)
    back = ck.load_checkpoint(path, OPTIMIZERS["adam"], c.model)
    chex.assert_trees_all_equal((back.params, back.state), (c.params, c.state))
    chex.assert_trees_all_equal(back.opt_state, c.opt_state)
    assert back.model == c.model and back.step == 3
    meta = ck.verify_checkpoint(path)
    assert meta["version"] == 2 and meta["model"] == json.loads(c.model.to_json())
    names = {n for n in meta["arrays"] if not n.startswith("opt_state/")}
    assert names == {
        "key", "params/0/W", "params/0/b", "params/1/gamma", "params/1/beta",
        "params/2/branch/0/W", "params/2/branch/0/b", "params/2/branch/1/gamma",
        "params/2/branch/1/beta", "params/4/W", "params/4/b", "state/1/mean", "state/1/var",
        "state/2/branch/1/mean", "state/2/branch/1/var",
    }  # fmt: skip


def _rewrite_meta(path, change):
    """Rewrite the checkpoint's __meta__ record through ``change(meta)``; the arrays (and so
    the checksum) stay valid."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(bytes(arrays.pop("__meta__")).decode())
    change(meta)
    np.savez(path, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)


def test_a_checkpoint_of_a_net_with_an_unknown_kind_is_refused_naming_file_and_layer(tmp_path):
    path = ck.save_checkpoint(tmp_path / "ckpt-000000003.npz", _net_checkpoint())
    _rewrite_meta(path, lambda m: m["model"]["layers"][1].update(kind="group_norm"))
    with pytest.raises(
        ValueError, match=r"ckpt-000000003.npz: bad model spec.*layer 2: unknown kind 'group_norm'"
    ):
        ck.load_checkpoint(path, OPTIMIZERS["adam"])


def test_a_net_checkpoint_missing_a_state_array_is_refused_naming_it_and_its_layer(tmp_path):
    path = ck.save_checkpoint(tmp_path / "c.npz", _net_checkpoint())

    def drop(meta):
        del meta["arrays"]["state/2/branch/1/var"]

    _rewrite_meta(path, drop)
    with np.load(path, allow_pickle=False) as f:  # the array itself gone too, checksum fixed
        arrays = {k: f[k] for k in f.files if k != "state/2/branch/1/var"}
    meta = json.loads(bytes(arrays.pop("__meta__")).decode())
    meta["sha256"] = ck._digest(arrays)
    np.savez(path, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    with pytest.raises(
        ValueError, match=r"c.npz: no array state/2/branch/1/var.*layer 3 \(residual\)"
    ):
        ck.load_checkpoint(path, OPTIMIZERS["adam"])


def test_a_net_checkpoint_without_the_running_statistics_is_refused(tmp_path):
    c = _net_checkpoint()._replace(state=None)
    with pytest.raises(ValueError, match=r"checkpoint.state is None.*layer 2 \(batch_norm\)"):
        ck.save_checkpoint(tmp_path / "c.npz", c)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# best params and state beside the current ones (fnbp.fit's early stopping)


def test_best_params_and_a_nets_best_state_round_trip_bitwise_under_best(tmp_path):
    mlp = _state(OPTIMIZERS["adam"])
    mlp = mlp._replace(best_params=jax.tree.map(lambda v: v * 0.5, mlp.params))
    back = ck.load_checkpoint(ck.save_checkpoint(tmp_path / "mlp.npz", mlp), OPTIMIZERS["adam"])
    chex.assert_trees_all_equal((back.params, back.best_params), (mlp.params, mlp.best_params))
    assert back.best_state is None
    net = _net_checkpoint()
    best_state = jax.tree.map(lambda v: v - 1.0, net.state)
    net = net._replace(best_params=jax.tree.map(lambda v: v + 1.0, net.params),
                       best_state=best_state)  # fmt: skip
    path = ck.save_checkpoint(tmp_path / "net.npz", net)
    back = ck.load_checkpoint(path, OPTIMIZERS["adam"], net.model)
    chex.assert_trees_all_equal(
        (back.params, back.state, back.best_params, back.best_state),
        (net.params, net.state, net.best_params, net.best_state),
    )
    names = set(ck.verify_checkpoint(path)["arrays"])
    assert {"best/params/0/W", "best/params/1/gamma", "best/state/1/mean"} <= names
    assert {n[len("best/") :] for n in names if n.startswith("best/")} == {
        n for n in names if n.startswith(("params/", "state/"))
    }


def test_a_checkpoint_without_best_params_loads_with_none_there(saved):
    path, _ = saved
    back = ck.load_checkpoint(path, OPTIMIZERS["adam"], MODEL)
    assert back.best_params is None and back.best_state is None
    assert not any(n.startswith("best/") for n in ck.verify_checkpoint(path)["arrays"])


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: c._replace(best_params=c.params[:1]), "checkpoint.best_params has 1 entries but the net has"),
        (lambda c: c._replace(best_state=c.state), "best_state is given without"),
        (lambda c: c._replace(best_params=c.params, best_state=None),
         r"checkpoint.best_state is None.*layer 2 \(batch_norm\)"),
    ],
    ids=["best-params-of-another-model", "best-state-alone", "net-best-without-statistics"],
)  # fmt: skip
def test_unsavable_best_params_raise_and_write_nothing(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        ck.save_checkpoint(tmp_path / "c.npz", change(_net_checkpoint()))
    assert list(tmp_path.iterdir()) == []
