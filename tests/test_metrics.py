import math

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import nfdm_sciml as nf


def test_mmd_by_hand():
    # Two points each, bandwidth 1: every kernel value written out.
    x = jnp.array([[0.0], [1.0]])
    y = jnp.array([[0.0], [2.0]])
    k = lambda a, b: math.exp(-((a - b) ** 2) / 2)  # noqa: E731
    xx = 2 * k(0, 1) / 2
    yy = 2 * k(0, 2) / 2
    xy = (k(0, 0) + k(0, 2) + k(1, 0) + k(1, 2)) / 4
    expected = xx + yy - 2 * xy
    np.testing.assert_allclose(nf.mmd(x, y, bandwidth=1.0), expected, rtol=1e-12)


def test_mmd_separates_distributions():
    a = jr.normal(jr.key(0), (500, 2), jnp.float64)
    b = jr.normal(jr.key(1), (500, 2), jnp.float64)
    shifted = b + 1.0
    same, different = float(nf.mmd(a, b)), float(nf.mmd(a, shifted))
    assert abs(same) < 0.01 and different > 0.1


def test_mmd_bad_input(no_typecheck):
    with pytest.raises(ValueError, match="same number of features"):
        nf.mmd(jnp.zeros((3, 2)), jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match="at least two points"):
        nf.mmd(jnp.zeros((1, 2)), jnp.zeros((3, 2)))
