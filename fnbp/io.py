"""Saving and loading parameters: ``.npz`` files that never execute code on load.

A file holds one array per leaf and the model spec as JSON (``__model__``, stored as UTF-8
bytes). It is written to a temporary file in the same folder, fsynced and renamed into place,
so a crash never leaves a half-written file under the name. Loading uses
``numpy.load(..., allow_pickle=False)``. Whole training states (optimizer state, step, key)
are checkpoints: :mod:`fnbp.checkpoint`.

==================  ===========================================================================
model               members
==================  ===========================================================================
:class:`fnbp.MLP`   ``layer<l>/W``, ``layer<l>/b`` for ``l = 1..L``; ``__model__`` the four
                    fields ``{"sizes", "activation", "loss", "output_activation"}``
:class:`fnbp.Net`   ``params/<path>``: each leaf under its tree path in ``params``
                    (``params/0/W``, ``params/2/gamma``, ``params/4/branch/0/W``: list indices
                    0-based as in Python, so ``params/2/…`` is layer 3); ``state/<path>`` the
                    same for the state when it was saved (``state/2/mean``); ``__model__``
                    the net's JSON (:meth:`fnbp.Net.to_json`)
==================  ===========================================================================

bfloat16 leaves (``.npz`` has no such dtype) are stored as float32, exactly, and load as
float32.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import jax
import numpy as np

from fnbp.model import MLP, Params, _expected_params, check_mode, check_params, init_state
from fnbp.net import Net


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary file: fsync, rename, fsync the folder.

    A crash at any point leaves either the old file or the new one under ``path``, never a
    mix; the temporary name starts with a dot and is removed on any error.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    finally:
        if tmp.exists():
            tmp.unlink()


# ----------------------------------------------------------------------------------------------
# Model specs and leaf names, shared with fnbp.checkpoint.


def _model_spec(model) -> dict:
    """The JSON form of a model spec: an MLP's four fields (the form of every file written
    before nets existed), or :meth:`fnbp.Net.to_dict` (``{"kind": "net", …}``)."""
    if isinstance(model, Net):
        return model.to_dict()
    return {
        "sizes": list(model.sizes),
        "activation": model.activation,
        "loss": model.loss,
        "output_activation": model.output_activation,
    }


def _model_from_spec(spec: dict) -> MLP | Net:
    """The inverse of :func:`_model_spec`: a spec with a ``"kind"`` is a net's.

    Raises:
        KeyError, ValueError, TypeError: for a bad spec; an unknown layer kind or field is a
            ``ValueError`` naming the layer (``layer 3: unknown kind 'attention'; …``).
    """
    if isinstance(spec, dict) and "kind" in spec:
        return Net.from_dict(spec)
    return MLP(tuple(spec["sizes"]), spec["activation"], spec["loss"], spec["output_activation"])


def _leaf_name(prefix: str, path) -> str:
    """``prefix/2/gamma``, ``prefix/4/branch/0/W``: a leaf's tree path (list indices and dict
    keys) under ``prefix``."""
    return "/".join([prefix, *(str(getattr(k, "idx", getattr(k, "key", k))) for k in path)])


def _named_leaves(prefix: str, tree) -> dict:
    """Every leaf of ``tree`` under its :func:`_leaf_name`."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_leaf_name(prefix, path): v for path, v in leaves}


def _layer_of(model, name: str) -> str:
    """``layer 3 (batch_norm)`` for a leaf name ``params/2/…`` of a net."""
    i = int(name.split("/")[1])
    return f"layer {i + 1} ({model.layers[i].kind})"


def _tree_from_names(prefix: str, like, arrays: dict, model, where) -> list:
    """The tree shaped like ``like`` whose leaf at each path is ``arrays[<its name>]``.

    Raises:
        ValueError: naming ``where`` (the file), the missing array and its layer, or an array
            under ``prefix/`` that the tree has no place for.
    """
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    names = [_leaf_name(prefix, path) for path, _ in paths]
    for name in names:
        if name not in arrays:
            raise ValueError(
                f"{where}: no array {name}, which {_layer_of(model, name)} of the net needs"
            )
    extra = sorted(set(n for n in arrays if n.startswith(prefix + "/")) - set(names))
    if extra:
        raise ValueError(
            f"{where}: array {extra[0]} has no place in the net's {prefix} (a file of another net?)"
        )
    return jax.tree.unflatten(treedef, [arrays[name] for name in names])


def _net_params(arrays: dict, net: Net, where) -> list:
    """A net's params from arrays named ``params/<path>`` (not yet shape-checked)."""
    return _tree_from_names("params", _expected_params(net), arrays, net, where)


def _net_state(arrays: dict, net: Net, where) -> list:
    """A net's state from arrays named ``state/<path>``, checked against the net."""
    like = jax.eval_shape(lambda: init_state(net))
    state = _tree_from_names("state", like, arrays, net, where)
    try:
        check_mode(net, state=state, train=False, key=None, what=str(where))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    return state


def _state_layer(net: Net) -> str | None:
    """The first layer of ``net`` that keeps running statistics (``layer 2 (batch_norm)``)."""
    return net.find(lambda layer: layer.needs_state)


# ----------------------------------------------------------------------------------------------
# Params files.


def _storable(v) -> np.ndarray:
    v = np.asarray(v)
    if v.dtype.name == "bfloat16":  # .npz has no bfloat16: store float32, exact
        v = v.astype(np.float32)
    return v


def save_params(path: str | os.PathLike, params: Params, model, state=None) -> None:
    """Write ``params`` and the ``model`` spec to ``path`` (an ``.npz`` file), atomically.

    Arguments:
        path: the file.
        params: params of ``model`` (checked).
        model: an :class:`fnbp.MLP` or :class:`fnbp.Net`.
        state: a net's state (BatchNorm running statistics, from training), saved beside the
            params so that :func:`load_state` gives it back; ``None`` saves none. An MLP keeps
            none.

    Raises:
        ValueError, TypeError: for params or a state that do not fit the model; nothing is
            written then.
    """
    check_params(params, model)
    if state is not None:
        check_mode(model, state=state, train=False, key=None, what="save_params")
    if isinstance(model, MLP):
        arrays = {
            f"layer{l}/{k}": _storable(p[k])
            for l, p in enumerate(params, start=1)
            for k in ("W", "b")
        }
    else:
        arrays = {n: _storable(v) for n, v in _named_leaves("params", params).items()}
        if state is not None:
            arrays.update({n: _storable(v) for n, v in _named_leaves("state", state).items()})
    arrays["__model__"] = np.frombuffer(json.dumps(_model_spec(model)).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _atomic_write_bytes(Path(path), buffer.getvalue())


def _read(path: Path) -> tuple[MLP | Net, dict]:
    """The model spec and every array of a params file (unchecked)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such params file")
    try:
        with np.load(path, allow_pickle=False) as f:
            model = _model_from_spec(json.loads(bytes(f["__model__"]).decode()))
            arrays = {name: np.array(f[name]) for name in f.files if name != "__model__"}
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a valid fnbp params file ({e})") from None
    return model, arrays


def load_params(path: str | os.PathLike) -> tuple[Params, MLP | Net]:
    """Read ``(params, model)`` written by :func:`save_params` (NumPy arrays).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the file, if it is not such a file, its spec is bad (an unknown
            layer kind or field: naming the layer) or its arrays do not fit its spec.
    """
    path = Path(path)
    model, arrays = _read(path)
    try:
        if isinstance(model, MLP):
            params = [
                {k: arrays[f"layer{l}/{k}"] for k in ("W", "b")}
                for l in range(1, model.num_layers + 1)
            ]
        else:
            params = _net_params(arrays, model, path)
        check_params(params, model)
    except KeyError as e:
        raise ValueError(f"{path}: not a valid fnbp params file (no array {e})") from None
    except (ValueError, TypeError) as e:
        raise ValueError(e if str(e).startswith(str(path)) else f"{path}: {e}") from None
    return params, model


def load_state(path: str | os.PathLike) -> list | None:
    """The state saved beside a net's params by ``save_params(path, params, net, state)``.

    Returns:
        A list aligned with the net's layers, like :func:`fnbp.init_state` (NumPy arrays);
        ``init_state(net)`` itself for a net that keeps no statistics; ``None`` for an MLP's
        file.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the file, if it is not a params file, or the net keeps running
            statistics but the file holds none (naming the layer) or holds ones that do not
            fit.
    """
    path = Path(path)
    model, arrays = _read(path)
    if isinstance(model, MLP):
        return None
    if not any(name.startswith("state/") for name in arrays) and _state_layer(model):
        raise ValueError(
            f"{path}: the file holds no state, but the net's {_state_layer(model)} keeps running "
            "statistics; save them with save_params(path, params, net, state=state)"
        )
    return _net_state(arrays, model, path)
