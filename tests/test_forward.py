import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, strategies as st

import nfdm_sciml as nf
from nfdm_sciml import testing

from .helpers import FORWARD_PROCESSES, VOLATILITIES


SHAPES = [(1,), (3,)]


@pytest.mark.parametrize("name", sorted(FORWARD_PROCESSES))
@pytest.mark.parametrize("shape", SHAPES)
def test_invariants(name, shape):
    # Round trip, log-det, velocity vs finite differences, score vs autodiff density;
    # the boundary conditions too for the learnable processes.
    make, learnable = FORWARD_PROCESSES[name]
    process = make(shape[0], 0, jr.key(0))
    testing.check_forward_process(
        process, shape, delta=0.01 if learnable else None, dtype=jnp.float64
    )


@pytest.mark.parametrize("name", ["nfdm_gaussian", "flow_spline"])
def test_invariants_with_context(name):
    process = FORWARD_PROCESSES[name][0](2, 3, jr.key(1))
    context = jnp.array([0.3, -1.0, 2.0])
    testing.check_forward_process(process, (2,), context=context, delta=0.01)
    # The context must actually change the process away from the boundaries.
    eps, x, t = jnp.ones(2), jnp.zeros(2), jnp.array(0.5)
    assert not np.allclose(process(eps, t, x, context), process(eps, t, x, -context))


@pytest.mark.parametrize("name", ["nfdm_gaussian", "flow_affine", "flow_spline"])
@pytest.mark.parametrize("seed", range(3))
def test_boundary_random_parameters(name, seed):
    process = FORWARD_PROCESSES[name][0](3, 0, jr.key(seed))
    ekey, xkey = jr.split(jr.key(100 + seed))
    eps = jr.normal(ekey, (3,), jnp.float64)
    x = 3 * jr.normal(xkey, (3,), jnp.float64)
    testing.check_boundary(process, eps, x, delta=0.01)
    # The velocity is finite and the process is not trivial in between.
    mid = process(eps, jnp.array(0.5), x)
    assert not np.allclose(mid, 0.5 * x + 0.5 * eps)


def test_unpinned_prior_is_learned_and_its_kl_exact():
    process = FORWARD_PROCESSES["nfdm_gaussian_free"][0](2, 0, jr.key(5))
    x = jnp.array([1.5, -0.7])
    zero, one = jnp.zeros(2), jnp.ones(2)
    # z_0 is still pinned at x + delta * eps.
    np.testing.assert_allclose(
        process(one, jnp.array(0.0), x), x + 0.01 * one, rtol=1e-12
    )
    # z_1 = m(x) + s(x) eps with m, s read off two evaluations of F.
    m = process(zero, jnp.array(1.0), x)
    s = process(one, jnp.array(1.0), x) - m
    assert not np.allclose(m, 0) and not np.allclose(s, 1)
    kl = 0.5 * np.sum(s**2 + m**2 - 1 - 2 * np.log(s))
    np.testing.assert_allclose(process.prior_kl(zero, x), kl, rtol=1e-10)


@given(testing.example_inputs((3,), np.float64))
def test_linear_interpolant_velocity_is_exact(inputs):
    eps, t, x = (jnp.asarray(u) for u in inputs)
    t = jnp.asarray(t)
    process = nf.LinearInterpolant(delta=0.01)
    z, velocity, _ = process.sample_terms(eps, t, x)
    expected = -x + (1 - 0.01) * eps
    np.testing.assert_allclose(velocity, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        process.velocity(z, t, x), expected, rtol=1e-9, atol=1e-9
    )


@given(testing.example_inputs((3,), np.float64))
def test_variance_preserving_forward_drift_is_vp_sde(inputs):
    # With g^2 = gamma' sigma^2 the forward drift f + g^2/2 * score is -gamma' sigma^2
    # z / 2 whatever x: the variance-preserving SDE.
    eps, t, x = (jnp.asarray(u) for u in inputs)
    t = jnp.asarray(t)
    process, volatility = nf.VariancePreserving(), nf.LinearSNRVolatility()
    z, velocity, score = process.sample_terms(eps, t, x)
    g2 = volatility(t) ** 2
    sigma2 = jax.nn.sigmoid(-10 + 20 * t)
    np.testing.assert_allclose(g2, 20 * sigma2, rtol=1e-12)
    forward_drift = velocity + 0.5 * g2 * score
    np.testing.assert_allclose(
        forward_drift, -0.5 * 20 * sigma2 * z, rtol=1e-9, atol=1e-9
    )


def test_nfdm_gaussian_formula():
    # mu and log sigma follow the paper's parameterisation exactly.
    process = FORWARD_PROCESSES["nfdm_gaussian"][0](2, 0, jr.key(3))
    x, t = jnp.array([0.4, -1.2]), jnp.array(0.3)
    mean_bar, log_scale_bar = jnp.split(process.net(t, x), 2)
    mu, sigma = process.mean_and_scale(t, x)
    np.testing.assert_allclose(mu, 0.7 * x + 0.21 * mean_bar, rtol=1e-12)
    np.testing.assert_allclose(
        jnp.log(sigma), 0.7 * math.log(0.01) + 0.21 * log_scale_bar, rtol=1e-12
    )


def test_flow_process_starts_gaussian_and_is_not_after_randomising():
    untrained = nf.NeuralFlowProcess(2, width_size=8, depth=1, key=jr.key(0))
    eps, x, t = jnp.array([0.5, -0.3]), jnp.array([1.0, 2.0]), jnp.array(0.4)
    np.testing.assert_allclose(
        untrained(eps, t, x), untrained.gaussian(eps, t, x), rtol=1e-12
    )
    random = FORWARD_PROCESSES["flow_spline"][0](2, 0, jr.key(0))
    assert not np.allclose(random(eps, t, x), random.gaussian(eps, t, x))


@pytest.mark.parametrize("name", sorted(VOLATILITIES))
def test_volatility_positive(name):
    volatility = VOLATILITIES[name](jr.key(0))
    testing.check_volatility(volatility, np.linspace(0, 1, 51))


def test_neural_volatility_floor():
    volatility = nf.NeuralVolatility(width_size=4, depth=1, floor=1e-3, key=jr.key(0))
    # Push the output far negative: softplus underflows, the floor remains.
    last = volatility.net.mlp.layers[-1]
    volatility = eqx.tree_at(
        lambda v: v.net.mlp.layers[-1].bias, volatility, last.bias - 1e4
    )
    assert float(volatility(jnp.array(0.5))) == pytest.approx(1e-3)


def test_prior_kl_closed_form():
    # VariancePreserving ends near, not at, N(0, I): KL matches the Gaussian formula.
    process = nf.VariancePreserving(gamma_min=-3.0, gamma_max=2.0)
    x = jnp.array([1.5, -0.5])
    alpha2, sigma2 = jax.nn.sigmoid(-2.0), jax.nn.sigmoid(2.0)
    expected = 0.5 * np.sum(alpha2 * x**2 + sigma2 - 1 - np.log(sigma2))
    kl = process.prior_kl(jnp.zeros(2), x)
    np.testing.assert_allclose(kl, expected, rtol=1e-10)
    # The flow estimator (single-sample, unbiased) agrees on average with the closed
    # form for a Gaussian map written through the generic path.
    assert float(nf.LinearInterpolant().prior_kl(jnp.zeros(2), x)) == pytest.approx(0)


@pytest.mark.parametrize("kwargs", [{"delta": 0.0}, {"delta": 1.5}])
def test_bad_delta(kwargs):
    with pytest.raises(ValueError, match="delta"):
        nf.LinearInterpolant(**kwargs)
    with pytest.raises(ValueError, match="delta"):
        nf.NFDMGaussian(2, key=jr.key(0), **kwargs)


def test_bad_configs():
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        nf.VariancePreserving(gamma_min=1.0, gamma_max=0.0)
    with pytest.raises(ValueError, match="value > 0"):
        nf.ConstantVolatility(0.0)
    # The annotation (under the jaxtyping test hook) or our own check rejects it.
    with pytest.raises((ValueError, TypeError), match="transform"):
        nf.NeuralFlowProcess(2, transform="radial", key=jr.key(0))  # pyright: ignore


@pytest.mark.parametrize("name", sorted(VOLATILITIES))
@given(t=st.floats(0.0, 1.0))
def test_volatility_positive_property(name, t):
    volatility = VOLATILITIES[name](jr.key(1))
    g = volatility(jnp.asarray(t))
    assert g.shape == () and np.isfinite(float(g)) and float(g) > 0
