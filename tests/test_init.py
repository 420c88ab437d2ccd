"""Tests of fnbp/__init__.py: the public names the docs promise are importable from ``fnbp``."""

import chex
import jax
import optax

import fnbp

ISSUE_API = [
    "MLP", "init_params", "forward", "loss", "backprop", "autodiff_grads", "crosscheck",
    "per_example_grads", "make_train_step", "make_train_epoch", "make_population_epoch",
    "init_population", "fit", "to_flax", "from_flax", "data", "theory", "checkpoint",
    "Checkpoint", "save_checkpoint", "load_checkpoint", "NonFiniteError", "Interrupted",
    "data_mesh",
]  # fmt: skip


def test_every_public_name_is_exported_and_listed_in_all():
    for name in ISSUE_API:
        assert hasattr(fnbp, name), name
        assert name in fnbp.__all__, name
    assert all(hasattr(fnbp, name) for name in fnbp.__all__)


def test_top_level_train_step_and_flax_round_trip():
    model = fnbp.MLP((3, 4, 2))
    params = fnbp.init_params(jax.random.key(0), model)
    optimizer = optax.sgd(0.1)
    x, y = jax.random.normal(jax.random.key(1), (5, 3)), jax.numpy.array([0, 1, 0, 1, 1])
    step = fnbp.make_train_step(model, optimizer, metrics="norms")
    new, _, metrics = step(params, optimizer.init(params), x, y)
    assert metrics["grad_norms"].shape == (2,)
    module, variables = fnbp.to_flax(new, model)
    back, same_model = fnbp.from_flax(module, variables)
    assert same_model == model
    chex.assert_trees_all_equal(back, new)
