"""Mean-field theory at initialization: what each architecture predicts for the forward second
moment and the per-layer (per-block) growth of E‖δ‖².

* :mod:`fnbp.theory.mean_field`: plain stacks, the length map q⁽ˡ⁺¹⁾ = σ_w² E[φ(h)²] + σ_b² and
  χ = σ_w² E[φ′(h)²] (Poole et al. 2016; Schoenholz et al. 2017).
  With dropout after each activation (keep probability ρ, ``keep=``), Schoenholz et al. 2017.
* :mod:`fnbp.theory.residual`: residual blocks in three orderings (stream with no activation,
  full pre-activation, post-activation) for any α.
* :mod:`fnbp.theory.normalization`: LayerNorm before and after the activation, and train-mode
  BatchNorm at a finite batch size (Yang et al. 2019).
"""

from fnbp.theory.mean_field import (
    chi,
    chi1,
    depth_scale,
    fixed_point,
    gaussian_expectation,
    length_map,
    q_trajectory,
)
from fnbp.theory.normalization import POSITIONS, batchnorm_factor, layernorm_factor
from fnbp.theory.residual import ORDERINGS, ResidualChain, residual_chain

__all__ = [
    "ORDERINGS",
    "POSITIONS",
    "ResidualChain",
    "batchnorm_factor",
    "chi",
    "chi1",
    "depth_scale",
    "fixed_point",
    "gaussian_expectation",
    "layernorm_factor",
    "length_map",
    "q_trajectory",
    "residual_chain",
]
