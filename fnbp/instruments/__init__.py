"""What the stored a and δ of every layer make possible, computed inside one jitted pass
without per-example gradients: per-example gradient norms, gradient noise and curvature
statistics (:mod:`.per_example`, from the factors of :mod:`.factors`); input attributions
(:mod:`.attributions`)."""

from fnbp.instruments import factors
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
    per_example_grad_norms,
)

__all__ = [
    "GradCAM",
    "GradientStats",
    "IntegratedGradients",
    "PerExampleNorms",
    "factors",
    "grad_cam",
    "gradient_stats",
    "input_gradients",
    "integrated_gradients",
    "layer_names",
    "per_example_grad_norms",
]
