"""What the stored a and δ of every layer make possible, computed inside one jitted pass
without per-example gradients: per-example gradient norms, gradient noise and curvature
statistics (:mod:`.per_example`, from the factors of :mod:`.factors`); input attributions
(:mod:`.attributions`)."""

from fnbp.instruments import factors, privacy
from fnbp.instruments.attributions import (
    GradCAM,
    IntegratedGradients,
    grad_cam,
    input_gradients,
    integrated_gradients,
)
from fnbp.instruments.per_example import (
    GradientStats,
    PerExampleNorms,
    gradient_stats,
    layer_names,
    norm_methods,
    per_example_grad_norms,
)
from fnbp.instruments.privacy import DPGrads, dp_grads

__all__ = [
    "DPGrads",
    "GradCAM",
    "GradientStats",
    "IntegratedGradients",
    "PerExampleNorms",
    "dp_grads",
    "factors",
    "grad_cam",
    "gradient_stats",
    "input_gradients",
    "integrated_gradients",
    "layer_names",
    "norm_methods",
    "per_example_grad_norms",
    "privacy",
]
