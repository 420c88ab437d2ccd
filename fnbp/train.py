"""Jitted training: one step, one whole epoch in one XLA program, and populations of models.

* :func:`make_train_step` — ``step(params, opt_state, x, y) -> (params, opt_state, metrics)``.
* :func:`make_train_epoch` — ``epoch(params, opt_state, key, x, y)`` runs every mini-batch
  step of an epoch inside one ``lax.scan``: one dispatch per epoch instead of one per step.
* :func:`make_population_epoch` — the same epoch ``vmap``-ed over a leading population axis
  of params, optimizer states and keys: many models (seeds, init schemes) in one XLA program.
  :func:`init_population` draws such a population.
* :func:`fit` — a Python loop over epochs with a progress bar and per-epoch evaluation.

Gradients come from the hand-written :func:`fnbp.backprop` (``grads="manual"``) or from
``jax.value_and_grad(fnbp.loss)`` (``grads="autodiff"``); the optimizer is any optax
``GradientTransformation``. Metrics of every step: ``loss`` (scalar) and ``grad_norms``
(``(L,)``: the Frobenius norm ‖∂L/∂W⁽ˡ⁾‖ of each layer's weight gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fnbp.backprop import _backprop
from fnbp.data import _check_batch_size, epoch_batches
from fnbp.initializers import InitScheme, init_params
from fnbp.model import (
    MLP,
    Params,
    _loss,
    accuracy,
    check_compute_dtype,
    check_inputs,
    check_l2,
    check_params,
)

Array = jax.Array
GRADS = ("manual", "autodiff")


def _value_and_grads(model: MLP, grads: str, l2, compute_dtype=None) -> Callable:
    """``(params, x, y) -> (loss, grads)`` by the chosen method."""
    if grads == "manual":
        return lambda params, x, y: _backprop(params, model, x, y, l2, compute_dtype)[:2]
    return lambda params, x, y: jax.value_and_grad(_loss)(params, model, x, y, l2, compute_dtype)


def _check_config(model, optimizer, grads, l2):
    if not isinstance(model, MLP):
        raise TypeError(f"model must be an fnbp.MLP, got {type(model).__name__}")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation (e.g. optax.sgd(0.1)), got "
            f"{type(optimizer).__name__}"
        )
    if grads not in GRADS:
        raise ValueError(f"grads must be one of {GRADS}, got {grads!r}")
    check_l2(l2)


def _step_fn(model, optimizer, grads, l2, compute_dtype=None):
    value_and_grads = _value_and_grads(model, grads, l2, compute_dtype)

    def step(params, opt_state, x, y):
        loss, g = value_and_grads(params, x, y)
        updates, opt_state = optimizer.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        norms = jnp.stack([jnp.linalg.norm(gl["W"].astype(jnp.float32)) for gl in g])
        return params, opt_state, {"loss": loss, "grad_norms": norms}

    return step


def make_train_step(
    model: MLP,
    optimizer: optax.GradientTransformation,
    *,
    grads: str = "manual",
    l2=0.0,
    compute_dtype=None,
) -> Callable:
    """A jitted training step.

    Arguments:
        model: the :class:`fnbp.MLP` spec.
        optimizer: any optax ``GradientTransformation``; initialize its state with
            ``optimizer.init(params)``.
        grads: ``"manual"`` (hand-written backprop) or ``"autodiff"`` (``jax.grad``).
        l2: L2 strength λ ≥ 0, part of the loss (not the optimizer's weight decay).
        compute_dtype: ``None``, or e.g. ``jnp.bfloat16`` for mixed precision: the params
            stay the (float32) master copy the optimizer updates, the gradients are computed
            in ``compute_dtype`` as in :func:`fnbp.backprop`.

    Returns:
        ``step(params, opt_state, x, y) -> (params, opt_state, metrics)``; ``metrics`` holds
        ``loss`` (the loss before the update) and ``grad_norms`` (``(L,)``). Shapes are checked
        when the step is traced (once per input shape), not on every call.
    """
    _check_config(model, optimizer, grads, l2)
    step = _step_fn(model, optimizer, grads, l2, check_compute_dtype(compute_dtype))

    @jax.jit
    def train_step(params, opt_state, x, y):
        check_params(params, model)
        check_inputs(model, x, y)
        return step(params, opt_state, x, y)

    return train_step


def _epoch_fn(model, optimizer, batch_size, grads, l2, compute_dtype=None):
    step = _step_fn(model, optimizer, grads, l2, compute_dtype)

    def epoch(params, opt_state, key, x, y):
        xb, yb = epoch_batches(key, x, y, batch_size)

        def body(carry, batch):
            params, opt_state = carry
            params, opt_state, metrics = step(params, opt_state, *batch)
            return (params, opt_state), metrics

        (params, opt_state), metrics = jax.lax.scan(body, (params, opt_state), (xb, yb))
        return params, opt_state, metrics

    return epoch


def make_train_epoch(
    model: MLP,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    grads: str = "manual",
    l2=0.0,
    compute_dtype=None,
) -> Callable:
    """A jitted whole epoch: shuffle, then every mini-batch step in one ``lax.scan``.

    Returns:
        ``epoch(params, opt_state, key, x, y) -> (params, opt_state, metrics)`` where ``x, y``
        are the whole training set, ``key`` draws this epoch's shuffle, and every entry of
        ``metrics`` has a leading axis of ``len(x) // batch_size`` steps. The last
        ``len(x) mod batch_size`` shuffled examples sit out the epoch.
    """
    _check_config(model, optimizer, grads, l2)
    _check_batch_size(batch_size)
    epoch = _epoch_fn(model, optimizer, batch_size, grads, l2, check_compute_dtype(compute_dtype))

    @jax.jit
    def train_epoch(params, opt_state, key, x, y):
        check_params(params, model)
        check_inputs(model, x, y)
        return epoch(params, opt_state, key, x, y)

    return train_epoch


def make_population_epoch(
    model: MLP,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    grads: str = "manual",
    l2=0.0,
    compute_dtype=None,
) -> Callable:
    """:func:`make_train_epoch` vmapped over a population: one XLA program trains them all.

    Returns:
        ``epoch(params, opt_states, keys, x, y) -> (params, opt_states, metrics)`` where
        ``params`` and ``opt_states`` carry a leading population axis of size ``P`` (from
        :func:`init_population` and ``jax.vmap(optimizer.init)``), ``keys`` has shape ``(P,)``
        (one shuffle per member), and the data ``x, y`` is shared. ``metrics`` entries have
        shape ``(P, steps, …)``.
    """
    _check_config(model, optimizer, grads, l2)
    _check_batch_size(batch_size)
    epoch = jax.vmap(
        _epoch_fn(model, optimizer, batch_size, grads, l2, check_compute_dtype(compute_dtype)),
        in_axes=(0, 0, 0, None, None),
    )

    @jax.jit
    def population_epoch(params, opt_states, keys, x, y):
        check_params([jax.tree.map(lambda v: v[0], p) for p in params], model)
        check_inputs(model, x, y)
        return epoch(params, opt_states, keys, x, y)

    return population_epoch


def init_population(
    keys: Array,
    model: MLP,
    schemes: str | InitScheme | Sequence[str | InitScheme] = "he_normal",
    *,
    dtype=jnp.float32,
) -> Params:
    """Draw a population: one network per (scheme, key), stacked on a leading axis.

    Arguments:
        keys: PRNG keys of shape ``(S,)`` (``jax.random.split(key, S)``), one per seed.
        model: the spec shared by all members.
        schemes: one scheme or a sequence of ``K`` schemes.

    Returns:
        Params whose leaves have a leading axis of ``K·S``, scheme-major: member ``k·S + s`` is
        scheme ``k`` with key ``s``.
    """
    if isinstance(schemes, (str, InitScheme)):
        schemes = [schemes]
    pops = [jax.vmap(lambda k, s=s: init_params(k, model, s, dtype=dtype))(keys) for s in schemes]
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *pops)


def _is_classification(model: MLP, y) -> bool:
    """Softmax classifiers, one-output binary classifiers, and class indices under mse."""
    if model.loss == "softmax_cross_entropy":
        return True
    if model.loss == "sigmoid_binary_cross_entropy":
        return model.sizes[-1] == 1
    return model.sizes[-1] > 1 and jnp.issubdtype(jnp.asarray(y).dtype, jnp.integer)


def fit(
    model: MLP,
    optimizer: optax.GradientTransformation,
    params: Params,
    x_train,
    y_train,
    *,
    key: Array,
    epochs: int,
    batch_size: int,
    grads: str = "manual",
    l2=0.0,
    x_test=None,
    y_test=None,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[Params, optax.OptState, list[dict]]:
    """Train for ``epochs`` scan-fused epochs, evaluating after each one.

    Arguments:
        key: the PRNG key the epoch shuffles are drawn from (``fold_in(key, epoch)``).
        x_test, y_test: evaluated after every epoch when given.
        progress: show a tqdm progress bar with epoch, loss and accuracy.
        on_epoch: called with each epoch's record.

    Returns:
        ``(params, opt_state, history)``; ``history[e]`` is a dict with ``epoch``,
        ``train_loss`` (mean over the epoch's steps), ``grad_norms`` (their mean, per layer)
        and, when test data is given, ``test_loss`` and (for classifiers) ``test_accuracy``.
    """
    from tqdm.auto import tqdm

    from fnbp.model import loss as loss_fn

    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    train_epoch = make_train_epoch(model, optimizer, batch_size=batch_size, grads=grads, l2=l2)
    x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
    check_params(params, model)
    check_inputs(model, x_train, y_train)
    opt_state = optimizer.init(params)
    history = []
    bar = tqdm(range(1, epochs + 1), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        params, opt_state, metrics = train_epoch(
            params, opt_state, jax.random.fold_in(key, epoch), x_train, y_train
        )
        record = {
            "epoch": epoch,
            "train_loss": float(jnp.mean(metrics["loss"])),
            "grad_norms": [float(v) for v in jnp.mean(metrics["grad_norms"], axis=0)],
        }
        if x_test is not None:
            record["test_loss"] = float(loss_fn(params, model, x_test, y_test, l2=l2))
            if _is_classification(model, y_test):
                record["test_accuracy"] = float(accuracy(params, model, x_test, y_test))
        history.append(record)
        bar.set_postfix(
            {k: f"{v:.4f}" for k, v in record.items() if k in ("train_loss", "test_accuracy")}
        )
        if on_epoch is not None:
            on_epoch(record)
    return params, opt_state, history
