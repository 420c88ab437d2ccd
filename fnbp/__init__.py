"""fnbp: functional neural networks in JAX with a hand-written, textbook backprop.

A network is a parameter pytree plus pure functions. Gradients are computed twice, by the
hand-written backward pass (:func:`backprop`) and by ``jax.grad`` (:func:`autodiff_grads`),
and :func:`crosscheck` shows that they agree, with finite differences as a third witness.
"""

from fnbp.activations import ACTIVATIONS, Activation
from fnbp.backprop import Backprop, backprop, per_example_grads
from fnbp.crosscheck import CrosscheckReport, autodiff_grads, crosscheck
from fnbp.initializers import (
    SCHEMES,
    InitScheme,
    init_params,
    normal_scheme,
    sigma_w2,
    variance_scaling_scheme,
)
from fnbp.losses import LOSSES, Loss
from fnbp.model import MLP, accuracy, forward, loss

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "LOSSES",
    "MLP",
    "SCHEMES",
    "Activation",
    "Backprop",
    "CrosscheckReport",
    "InitScheme",
    "Loss",
    "accuracy",
    "autodiff_grads",
    "backprop",
    "crosscheck",
    "forward",
    "init_params",
    "loss",
    "normal_scheme",
    "per_example_grads",
    "sigma_w2",
    "variance_scaling_scheme",
]
