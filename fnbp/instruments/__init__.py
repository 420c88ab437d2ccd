"""What the stored a and δ of every layer make possible, computed inside one jitted pass
without per-example gradients: per-example gradient norms, gradient noise and curvature
statistics (:mod:`.per_example`, from the factors of :mod:`.factors`)."""

from fnbp.instruments import factors
from fnbp.instruments.per_example import (
    GradientStats,
    PerExampleNorms,
    gradient_stats,
    layer_names,
    per_example_grad_norms,
)

__all__ = [
    "GradientStats",
    "PerExampleNorms",
    "factors",
    "gradient_stats",
    "layer_names",
    "per_example_grad_norms",
]
