import math

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import nfdm_sciml as nf
from nfdm_sciml import testing

from .helpers import make_model


MEAN, STD = 0.5, 1.3


def _exact_model(process, volatility):
    return nf.NFDM(
        process,
        testing.gaussian_posterior_mean(process, MEAN, STD),
        volatility,
        data_shape=(2,),
    )


def _check_moments(samples, std, n):
    samples = np.asarray(samples)
    assert np.all(np.isfinite(samples))
    np.testing.assert_allclose(samples.mean(0), MEAN, atol=5 * std / math.sqrt(n))
    np.testing.assert_allclose(samples.std(0), std, rtol=0.08)


@pytest.mark.parametrize(
    ("solver", "adaptive", "num_steps"),
    [
        ("euler", False, 200),
        ("heun", False, 50),
        ("shark", False, 50),
        ("spark", True, 0),
        ("heun", True, 0),
    ],
)
def test_sde_samples_exact_reverse_process(solver, adaptive, num_steps):
    # VP process + matching volatility + exact posterior mean: the generative SDE is
    # the exact time reversal, so samples follow N(m, s^2) (up to sigma_0 ~ 0.007).
    model = _exact_model(nf.VariancePreserving(), nf.LinearSNRVolatility())
    n = 1000
    solution = nf.sample_sde(
        model,
        n,
        key=jr.key(0),
        solver=solver,
        adaptive=adaptive,
        num_steps=num_steps or 1,
        rtol=1e-2,
        atol=1e-2,
    )
    assert solution.samples.shape == (n, 2)
    _check_moments(solution.samples, STD, n)
    if adaptive:
        assert int(solution.num_steps.min()) > 0


@pytest.mark.parametrize(
    ("solver", "num_steps"), [("euler", 100), ("heun", 20), ("tsit5", None)]
)
def test_ode_samples_exact_flow(solver, num_steps):
    model = _exact_model(nf.LinearInterpolant(), nf.ConstantVolatility())
    n = 1000
    kwargs = {} if num_steps is None else {"num_steps": num_steps}
    solution = nf.sample_ode(model, n, key=jr.key(1), solver=solver, **kwargs)
    _check_moments(solution.samples, math.sqrt(STD**2 + 1e-4), n)


def test_ode_is_deterministic_map_and_inverts_likelihood_direction():
    # Solving from given z1 twice gives the same samples; the ODE sample of z1 then
    # maps back near z1 when integrated forward (tested through the likelihood solve
    # sharing the same drift): here only determinism and the recorded steps.
    model = _exact_model(nf.LinearInterpolant(), nf.ConstantVolatility())
    z1 = jr.normal(jr.key(2), (5, 2), jnp.float64)
    a = nf.sample_ode(model, key=jr.key(3), z1=z1)
    b = nf.sample_ode(model, key=jr.key(4), z1=z1)
    np.testing.assert_allclose(a.samples, b.samples, rtol=1e-12)
    # For this exact flow the map is affine: x = m + sqrt(s^2 + d^2) (z1 - 0) / 1.
    expected = MEAN + math.sqrt(STD**2 + 1e-4) * z1
    np.testing.assert_allclose(a.samples, expected, rtol=1e-3, atol=1e-3)


def test_trajectories():
    model = make_model("nfdm_gaussian", key=jr.key(5))
    solution = nf.sample_sde(model, 4, key=jr.key(6), num_steps=20, num_saves=11)
    assert solution.ts is not None and solution.trajectories is not None
    np.testing.assert_allclose(solution.ts, np.linspace(1, 0, 11), atol=1e-12)
    assert solution.trajectories.shape == (4, 11, 2)
    np.testing.assert_allclose(solution.trajectories[:, -1], solution.samples)
    assert int(solution.num_steps[0]) == 20
    ode = nf.sample_ode(
        model, 4, key=jr.key(6), solver="euler", num_steps=10, num_saves=3
    )
    assert ode.trajectories is not None and ode.trajectories.shape == (4, 3, 2)


def test_sampler_bad_inputs(no_typecheck):
    model = make_model(key=jr.key(7))
    with pytest.raises(ValueError, match="Unknown SDE solver"):
        nf.sample_sde(model, 2, key=jr.key(0), solver="rk4")  # pyright: ignore
    with pytest.raises(ValueError, match="cannot adapt"):
        nf.sample_sde(model, 2, key=jr.key(0), solver="euler", adaptive=True)
    with pytest.raises(ValueError, match="cannot adapt"):
        nf.sample_ode(model, 2, key=jr.key(0), solver="euler", adaptive=True)
    with pytest.raises(ValueError, match="num_samples"):
        nf.sample_ode(model, 0, key=jr.key(0))
    with pytest.raises(ValueError, match="num_steps"):
        nf.sample_sde(model, 2, key=jr.key(0), num_steps=0)
    with pytest.raises(ValueError, match="num_saves"):
        nf.sample_sde(model, 2, key=jr.key(0), num_saves=1)
    with pytest.raises(ValueError, match="shape"):
        nf.sample_ode(model, key=jr.key(0), z1=jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        nf.sample_ode(model, key=jr.key(0), z1=jnp.full((3, 2), jnp.nan))
