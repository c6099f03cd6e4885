"""The public checks must be able to fail: each is run on a deliberately broken
process and must raise."""

import jax.numpy as jnp
import numpy as np
import pytest

import nfdm_sciml as nf
from nfdm_sciml import testing


class WrongVelocity(nf.AbstractGaussianProcess):
    # Closed-form methods are right, but the velocity is off by a constant.
    def mean_and_scale(self, t, x, context=None):
        return (1 - t) * x, jnp.broadcast_to(t + (1 - t) * 0.01, x.shape)

    def velocity(self, z, t, x, context=None):
        return super().velocity(z, t, x, context) + 0.1


class WrongLogDet(nf.AbstractFlowProcess):
    # z = x (1 - t) + (1 + t) eps with a log-det that forgets the scale and adds a
    # term varying with eps, so that the score derived from it is wrong too.
    def __call__(self, eps, t, x, context=None):
        return (1 - t) * x + (1 + t) * eps

    def inverse_and_log_det(self, z, t, x, context=None):
        eps = (z - (1 - t) * x) / (1 + t)
        return eps, self.log_det_jacobian(eps, t, x, context)

    def log_det_jacobian(self, eps, t, x, context=None):
        return 0.1 * jnp.sum(eps**2)


class NoBoundary(nf.AbstractGaussianProcess):
    def mean_and_scale(self, t, x, context=None):
        return 0.5 * x, jnp.ones_like(x)


EPS, X, T = jnp.array([0.3, -0.5]), jnp.array([1.0, 2.0]), jnp.array(0.4)


def test_checks_catch_a_wrong_velocity():
    with pytest.raises(AssertionError, match="velocity"):
        testing.check_velocity(WrongVelocity(), EPS, T, X)


def test_checks_catch_a_wrong_log_det_and_score():
    with pytest.raises(AssertionError, match="log-determinant"):
        testing.check_log_det(WrongLogDet(), EPS, T, X)
    with pytest.raises(AssertionError, match="score"):
        testing.check_score(WrongLogDet(), EPS, T, X)


def test_checks_catch_missing_boundary_conditions():
    with pytest.raises(AssertionError, match="boundary at t=0"):
        testing.check_boundary(NoBoundary(), EPS, X, delta=0.01)


def test_check_forward_process_reports_smallest_failure():
    with pytest.raises(AssertionError, match="log-determinant"):
        testing.check_forward_process(WrongLogDet(), (2,), max_examples=5)
    # A correct process passes the same call.
    testing.check_forward_process(nf.LinearInterpolant(), (2,), max_examples=5)


def test_check_volatility_and_predictor_catch_problems(no_typecheck):
    class Negative(nf.AbstractVolatility):
        def __call__(self, t):
            return t - 0.5

    with pytest.raises(AssertionError, match="> 0"):
        testing.check_volatility(Negative(), np.linspace(0, 1, 5))
    with pytest.raises(AssertionError, match="shape"):
        testing.check_predictor(
            nf.FunctionPredictor(lambda z, t, c: z[:1]), jnp.zeros(2), 0.5
        )
    testing.check_predictor(
        nf.FunctionPredictor(lambda z, t, c: t * z), jnp.ones(2), 0.5
    )
