import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import nfdm_sciml as nf
from nfdm_sciml import testing

from .helpers import gaussian_data, gaussian_log_prob, make_model


MEAN, STD, DIM = 0.5, 1.3, 2


def _vp_model(predictor=None):
    # With g^2 = gamma' sigma^2 the conditional forward SDE does not depend on x, so
    # the bound is tight up to the decoder: the analytic test of the whole NELBO.
    process = nf.VariancePreserving()
    sigma0 = math.sqrt(float(jax.nn.sigmoid(-10.0)))
    return nf.NFDM(
        process,
        predictor or testing.gaussian_posterior_mean(process, MEAN, STD),
        nf.LinearSNRVolatility(),
        nf.GaussianDecoder(sigma0),
        data_shape=(DIM,),
    )


def test_nelbo_matches_exact_nll_on_gaussian_data():
    xs = gaussian_data(jr.key(0), 4096, DIM, MEAN, STD)
    estimate = nf.nelbo_estimate(_vp_model(), xs, key=jr.key(1), num_times=256)
    nll = -gaussian_log_prob(np.asarray(xs), MEAN, STD**2)
    gap = np.asarray(estimate.per_example) - nll
    stderr = gap.std(ddof=1) / math.sqrt(gap.size)
    # A bound: never below the exact NLL beyond Monte Carlo error; and tight: the gap
    # (from the decoder and the prior, O(sigma_0^2) here) is below 0.02 nats.
    assert gap.mean() > -3 * stderr
    assert gap.mean() < 0.02 + 3 * stderr
    assert stderr < 0.02
    np.testing.assert_allclose(
        estimate.bits_per_dim, estimate.nats / (DIM * math.log(2)), rtol=1e-12
    )
    np.testing.assert_allclose(
        estimate.nats,
        estimate.terms.nelbo,
        rtol=1e-10,  # pyright: ignore
    )


def test_nelbo_is_an_upper_bound_for_a_poor_predictor():
    # Shrinking the optimal prediction towards zero makes the bound looser, never lower.
    process = nf.VariancePreserving()
    optimal = testing.gaussian_posterior_mean(process, MEAN, STD)
    poor = nf.FunctionPredictor(lambda z, t, c: 0.8 * optimal(z, t, c))
    xs = gaussian_data(jr.key(2), 1024, DIM, MEAN, STD)
    nll = -gaussian_log_prob(np.asarray(xs), MEAN, STD**2).mean()
    good = nf.nelbo_estimate(_vp_model(), xs, key=jr.key(3), num_times=64)
    bad = nf.nelbo_estimate(_vp_model(poor), xs, key=jr.key(3), num_times=64)
    assert float(bad.nats) > float(good.nats) + 0.1
    assert float(bad.nats) > nll


def test_ode_likelihood_of_a_known_flow():
    # The linear interpolant with the exact posterior mean makes the ODE drift the
    # probability-flow velocity of N((1-t) m, (1-t)^2 s^2 + sigma_t^2): at t = 0 the
    # density is N(m, s^2 + delta^2) in closed form.
    process = nf.LinearInterpolant(delta=0.01)
    model = nf.NFDM(
        process,
        testing.gaussian_posterior_mean(process, MEAN, STD),
        nf.ConstantVolatility(),
        data_shape=(DIM,),
    )
    xs = gaussian_data(jr.key(4), 32, DIM, MEAN, STD)
    expected = -gaussian_log_prob(np.asarray(xs), MEAN, STD**2 + 0.01**2)
    exact = nf.ode_log_likelihood(model, xs, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(exact.per_example, expected, atol=1e-4)
    hutchinson = nf.ode_log_likelihood(
        model, xs, trace="hutchinson", key=jr.key(5), num_probes=16
    )
    # Unbiased: the mean agrees within a few standard errors of the probe noise.
    diff = np.asarray(hutchinson.per_example) - expected
    assert abs(diff.mean()) < 4 * diff.std(ddof=1) / math.sqrt(diff.size) + 1e-3


def test_likelihoods_of_a_trained_style_model_are_finite():
    model = make_model("flow_affine", key=jr.key(6))
    xs = jr.normal(jr.key(7), (6, 2), jnp.float64)
    nelbo = nf.nelbo_estimate(model, xs, key=jr.key(8), num_times=8, chunk_size=4)
    ode = nf.ode_log_likelihood(model, xs, rtol=1e-4, atol=1e-4)
    for estimate in (nelbo, ode):
        assert estimate.per_example.shape == (6,)
        assert np.all(np.isfinite(estimate.per_example))
        assert np.isfinite(estimate.nats_stderr)


def test_likelihood_bad_inputs(no_typecheck):
    model = _vp_model()
    with pytest.raises(ValueError, match="NaN"):
        nf.nelbo_estimate(model, jnp.array([[jnp.nan, 0.0]]), key=jr.key(0))
    with pytest.raises(ValueError, match="num_times"):
        nf.nelbo_estimate(model, jnp.zeros((2, 2)), key=jr.key(0), num_times=0)
    with pytest.raises(ValueError, match="trace"):
        nf.ode_log_likelihood(model, jnp.zeros((2, 2)), trace="exactly")
    with pytest.raises(ValueError, match="needs a `key`"):
        nf.ode_log_likelihood(model, jnp.zeros((2, 2)), trace="hutchinson")
    with pytest.raises(ValueError, match="shape"):
        nf.ode_log_likelihood(model, jnp.zeros((2, 3)))
