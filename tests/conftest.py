"""Shared test settings.

Rank promotion raises (as in equinox's tests): an accidental broadcast between a (batch,) and a
(batch, 1) array becomes an error instead of a silently wrong gradient.
"""

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "fnbp",
    deadline=None,  # first calls compile
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,  # CI runs the same examples every time
)
settings.load_profile("fnbp")


@pytest.fixture
def x64():
    """Run a test with float64 enabled."""
    with jax.enable_x64(True):
        yield
