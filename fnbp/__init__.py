"""fnbp: functional neural networks in JAX with a hand-written, textbook backprop.

A network is a parameter pytree plus pure functions. Gradients are computed twice, by the
hand-written backward pass (:func:`backprop`) and by ``jax.grad`` (:func:`autodiff_grads`),
and :func:`crosscheck` shows that they agree, with finite differences as a third witness.
"""

from fnbp import (
    checkpoint,
    data,
    diagnostics,
    distributed,
    engine,
    guard,
    instruments,
    layers,
    report,
    theory,
)
from fnbp.activations import ACTIVATIONS, Activation
from fnbp.backprop import Backprop, backprop, per_example_grads
from fnbp.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fnbp.crosscheck import CrosscheckReport, autodiff_grads, crosscheck
from fnbp.diagnostics import layer_stats
from fnbp.flax_interop import FlaxMLP, FlaxNet, from_flax, to_flax
from fnbp.gradcheck import GradcheckReport, gradcheck
from fnbp.initializers import (
    SCHEMES,
    InitScheme,
    init_params,
    normal_scheme,
    sigma_w2,
    variance_scaling_scheme,
)
from fnbp.instruments import (
    DPGrads,
    GradCAM,
    GradientStats,
    IntegratedGradients,
    PerExampleNorms,
    dp_grads,
    grad_cam,
    gradient_stats,
    input_gradients,
    integrated_gradients,
    per_example_grad_norms,
)
from fnbp.io import load_params, load_state, save_params
from fnbp.losses import LOSSES, Loss
from fnbp.model import MLP, accuracy, forward, init_state, loss
from fnbp.net import Net
from fnbp.train import (
    Interrupted,
    NonFiniteError,
    data_mesh,
    fit,
    init_population,
    make_population_epoch,
    make_train_epoch,
    make_train_step,
)

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "LOSSES",
    "MLP",
    "Net",
    "PerExampleNorms",
    "NonFiniteError",
    "SCHEMES",
    "Activation",
    "Backprop",
    "Checkpoint",
    "CrosscheckReport",
    "DPGrads",
    "FlaxMLP",
    "GradCAM",
    "GradcheckReport",
    "GradientStats",
    "FlaxNet",
    "InitScheme",
    "IntegratedGradients",
    "Interrupted",
    "Loss",
    "accuracy",
    "autodiff_grads",
    "backprop",
    "checkpoint",
    "crosscheck",
    "data",
    "data_mesh",
    "diagnostics",
    "distributed",
    "dp_grads",
    "engine",
    "fit",
    "forward",
    "grad_cam",
    "gradcheck",
    "gradient_stats",
    "guard",
    "from_flax",
    "init_params",
    "init_population",
    "init_state",
    "input_gradients",
    "instruments",
    "integrated_gradients",
    "layers",
    "layer_stats",
    "load_checkpoint",
    "load_params",
    "load_state",
    "loss",
    "make_population_epoch",
    "make_train_epoch",
    "make_train_step",
    "normal_scheme",
    "per_example_grad_norms",
    "per_example_grads",
    "report",
    "save_checkpoint",
    "save_params",
    "sigma_w2",
    "theory",
    "to_flax",
    "variance_scaling_scheme",
]
