import os

import jax
import jax.random as jr
import jaxtyping
import pytest
from hypothesis import settings


# Numerics are checked in float64; strict promotion and rank checks make silent dtype
# or broadcasting mistakes fail loudly.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "ci", max_examples=10, derandomize=True, database=None, deadline=None
)
settings.register_profile(
    "thorough", max_examples=200, derandomize=True, database=None, deadline=None
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def getkey():
    keys = iter(jr.split(jr.key(1234), 1000))
    return lambda: next(keys)


@pytest.fixture
def no_typecheck(monkeypatch):
    """Turns off the jaxtyping test hook, to test the errors users see without it."""
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
