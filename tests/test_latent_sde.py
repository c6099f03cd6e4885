import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import nfdm_sciml as nf
from nfdm_sciml import matched_drift


class _TanhDiffusion(nf.AbstractDiffusion):
    """g(z) = a + b tanh(c z + d): state-dependent and coupled across coordinates
    when `mix` is set (so the default Jacobian path is exercised)."""

    a: float
    b: float
    mix: bool = False

    def __call__(self, z, t):
        inner = 1.3 * z + 0.2 + (0.4 * jnp.roll(z, 1) if self.mix else 0.0)
        return self.a + self.b * jnp.tanh(inner) + 0.1 * t


def _fd_ito(diffusion, z, t, h=1e-5):
    out = []
    for i in range(z.shape[0]):
        e = jnp.zeros_like(z).at[i].set(h)
        up, down = diffusion(z + e, t)[i] ** 2, diffusion(z - e, t)[i] ** 2
        out.append(0.25 * (up - down) / h)
    return jnp.stack(out)


def test_ito_correction_matches_finite_differences(getkey):
    z = jr.normal(getkey(), (4,))
    t = jnp.asarray(0.3)
    diffusion = nf.DiagonalDiffusion(4, width_size=8, max_scale=2.0, key=getkey())
    # The per-coordinate networks: the one-JVP form, the generic Jacobian form and
    # central differences agree.
    generic = nf.AbstractDiffusion.ito_correction(diffusion, z, t)
    assert jnp.allclose(diffusion.ito_correction(z, t), generic, rtol=1e-10)
    assert jnp.allclose(
        diffusion.ito_correction(z, t), _fd_ito(diffusion, z, t), rtol=1e-6
    )
    coupled = _TanhDiffusion(0.6, 0.3, mix=True)
    assert jnp.allclose(coupled.ito_correction(z, t), _fd_ito(coupled, z, t), rtol=1e-6)
    assert jnp.max(jnp.abs(coupled.ito_correction(z, t))) > 1e-2


def _gaussian_density(z, m, s):
    return jnp.exp(-0.5 * ((z - m) / s) ** 2) / (s * jnp.sqrt(2 * jnp.pi))


@pytest.mark.parametrize("ito", [True, False])
def test_matched_drift_solves_fokker_planck(ito):
    # 1D marginals N(m(t), s(t)^2) and a state-dependent g(z): the drift must
    # satisfy dq/dt = -d(f q)/dz + 1/2 d2(g^2 q)/dz2 at every (z, t). Without the
    # Itô term it must not.
    diffusion = _TanhDiffusion(0.7, 0.4)

    class NoIto(_TanhDiffusion):
        def ito_correction(self, z, t):
            return jnp.zeros_like(z)

    used = diffusion if ito else NoIto(0.7, 0.4)

    def moments(t):
        return jnp.sin(2 * t)[None] + 0.3, (0.5 + 0.3 * t**2)[None]

    def q(z, t):
        m, s = moments(t)
        return _gaussian_density(z, m[0], s[0])

    def drift_at(z, t):
        m, s = moments(t)
        eps = (jnp.atleast_1d(z) - m) / s
        return matched_drift(moments, used, t, eps)[1][0]

    h = 1e-4
    residuals = []
    for t in (0.2, 0.55, 0.9):
        t = jnp.asarray(t)
        for z in (-0.4, 0.3, 0.8, 1.6):
            z = jnp.asarray(z)
            dq_dt = (q(z, t + h) - q(z, t - h)) / (2 * h)

            def flux(y, t=t):
                return drift_at(y, t) * q(y, t)

            def spread(y, t=t):
                return diffusion(jnp.atleast_1d(y), t)[0] ** 2 * q(y, t)

            d_flux = (flux(z + h) - flux(z - h)) / (2 * h)
            d2_spread = (spread(z + h) - 2 * spread(z) + spread(z - h)) / h**2
            residuals.append(dq_dt + d_flux - 0.5 * d2_spread)
    worst = float(jnp.max(jnp.abs(jnp.stack(residuals))))
    if ito:
        assert worst < 1e-5
    else:
        assert worst > 1e-2


def test_matched_drift_of_the_prior_marginals_is_the_prior_drift(getkey):
    # An Ornstein–Uhlenbeck prior dz = -z dt + g dW: the marginals it produces from
    # N(m0, s0^2) are N(m0 e^{-t}, s0^2 e^{-2t} + g^2 (1 - e^{-2t}) / 2); the matched
    # drift of those marginals is -z exactly, so SDE Matching's path term vanishes.
    g = 0.8
    m0, s0 = jnp.array([1.5, -0.3]), jnp.array([0.2, 1.1])

    class Constant(nf.AbstractDiffusion):
        def __call__(self, z, t):
            return jnp.full_like(z, g)

    def moments(t):
        decay = jnp.exp(-t)
        return m0 * decay, jnp.sqrt(s0**2 * decay**2 + g**2 * (1 - decay**2) / 2)

    for t in (0.1, 0.7, 2.0):
        eps = jr.normal(getkey(), (2,))
        z, drift = matched_drift(moments, Constant(), jnp.asarray(t), eps)
        assert jnp.allclose(drift, -z, atol=1e-12)


def _series(n=6, steps=9, channels=2, *, key):
    times = jnp.sort(jr.uniform(key, (n, steps)), axis=1) * 0.9 + 0.05
    times = times + jnp.arange(steps, dtype=times.dtype)[None] * 1e-3
    values = jr.normal(jr.fold_in(key, 1), (n, steps, channels))
    mask = jr.uniform(jr.fold_in(key, 2), (n, steps, channels)) > 0.2
    mask = mask.at[:, 0].set(True)
    return nf.TimeSeries(np.asarray(times), np.asarray(values), np.asarray(mask))


@pytest.mark.parametrize("cls", [nf.LatentSDE, nf.SolverLatentSDE])
def test_losses_shapes_and_masking(cls, getkey):
    series = _series(key=getkey())
    extra = {"num_steps": 20} if cls is nf.SolverLatentSDE else {}
    model = cls(2, 3, hidden_size=8, key=getkey(), **extra)
    key = getkey()
    loss, terms = model.batch_loss(series, key=key)
    assert loss.shape == ()
    assert set(terms) >= {"prior", "diffusion", "reconstruction", "nelbo", "loss"}
    assert all(bool(jnp.isfinite(v)) for v in terms.values())
    assert terms["prior"] >= 0 and terms["diffusion"] >= 0
    # A missing entry may hold anything: the loss does not see it.
    values = jnp.where(series.mask, series.values, 1e3)
    changed = eqx.tree_at(lambda s: s.values, series, values)
    assert jnp.allclose(model.batch_loss(changed, key=key)[0], loss)
    # Gradients reach the prior, the encoder and the observation model.
    grads = eqx.filter_grad(lambda m: m.batch_loss(series, key=key)[0])(model)
    for part in (grads.prior.drift_net, grads.encoder, grads.observation.linear):
        norms = [jnp.sum(x**2) for x in jax.tree.leaves(eqx.filter(part, eqx.is_array))]
        assert float(sum(norms)) > 0


@pytest.mark.parametrize("cls", [nf.LatentSDE, nf.SolverLatentSDE])
def test_forecast_and_generation_shapes(cls, getkey):
    series = _series(n=3, key=getkey())
    extra = {"num_steps": 10} if cls is nf.SolverLatentSDE else {}
    model = cls(2, 3, hidden_size=8, key=getkey(), **extra)
    sol = model.forecast(series, 0.5, key=getkey(), num_samples=4, num_steps=10)
    assert sol.latents.shape == (3, 4, 9, 3)
    assert sol.observations.shape == (3, 4, 9, 2)
    assert bool(jnp.all(jnp.isfinite(sol.observations)))
    # Forecasts beyond the trained span are allowed.
    future = jnp.broadcast_to(jnp.linspace(0.6, 1.5, 5), (3, 5))
    assert model.forecast(
        series, 0.5, times=future, key=getkey(), num_samples=2, num_steps=10
    ).observations.shape == (3, 2, 5, 2)
    gen = model.sample_prior(jnp.linspace(0, 1, 7), 5, key=getkey(), num_steps=20)
    assert gen.observations.shape == (1, 5, 7, 2)
    scores = nf.forecast_error(
        model, series, 0.5, key=getkey(), num_samples=3, num_steps=10
    )
    assert set(scores) == {"rmse", "mae", "crps"} and all(
        v >= 0 for v in scores.values()
    )


def test_forecast_ignores_the_future(getkey):
    series = _series(n=2, key=getkey())
    model = nf.LatentSDE(2, 3, hidden_size=8, key=getkey())
    key = getkey()
    before = model.forecast(series, 0.4, key=key, num_samples=2, num_steps=5)
    values = jnp.where(series.times[..., None] > 0.4, 50.0, series.values)
    changed = eqx.tree_at(lambda s: s.values, series, values)
    after = model.forecast(changed, 0.4, key=key, num_samples=2, num_steps=5)
    assert jnp.allclose(before.observations, after.observations)


def test_prior_simulation_matches_the_sde(getkey):
    # Generation with a linear prior drift and constant noise against the closed form
    # of the OU marginals at t = 1.
    model = nf.LatentSDE(1, 1, hidden_size=4, key=getkey())

    class Constant(nf.AbstractDiffusion):
        def __call__(self, z, t):
            return jnp.full_like(z, 0.5)

    class Linear(eqx.Module):
        layers: tuple

        def __call__(self, x):
            return -2.0 * x

    prior = eqx.tree_at(
        lambda p: (p.diffusion, p.drift_net),
        model.prior,
        (Constant(), Linear(model.prior.drift_net.layers)),
    )
    prior = eqx.tree_at(lambda p: p.initial_mean, prior, jnp.array([1.0]))
    model = eqx.tree_at(lambda m: m.prior, model, prior)
    sol = model.sample_prior(jnp.array([0.0, 1.0]), 4000, key=getkey(), num_steps=200)
    z1 = sol.latents[0, :, 1, 0]
    mean = np.exp(-2.0)
    var = np.exp(-4.0) + 0.25 * (1 - np.exp(-4.0)) / 4
    assert abs(float(jnp.mean(z1)) - mean) < 0.03
    assert abs(float(jnp.var(z1)) - var) < 0.03


@pytest.mark.parametrize("cls", [nf.LatentSDE, nf.SolverLatentSDE])
def test_training_lowers_the_bound(cls, getkey):
    series = nf.stochastic_lorenz(32, num_times=11, inner_steps=20, key=getkey())
    extra = {"num_steps": 20} if cls is nf.SolverLatentSDE else {}
    model = cls(3, 4, hidden_size=16, observation_scale=0.1, key=getkey(), **extra)
    optimiser = optax.adam(3e-3)
    step = nf.make_train_step(optimiser)
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
    first = model.batch_loss(series, key=getkey())[0]
    model, state, terms = nf.run_steps(
        step, model, state, lambda k: series, 150, key=getkey()
    )
    last = model.batch_loss(series, key=getkey())[0]
    assert float(last) < 0.5 * float(first)


def test_time_series_validation():
    times = np.linspace(0, 1, 5)
    values = np.zeros((2, 5, 3))
    ts = nf.TimeSeries(times, values)
    assert (ts.num_series, ts.num_steps, ts.num_channels) == (2, 5, 3)
    assert nf.TimeSeries(times, np.zeros((2, 5))).num_channels == 1
    with pytest.raises(ValueError, match="strictly increasing"):
        nf.TimeSeries(times[::-1], values)
    with pytest.raises(ValueError, match="strictly increasing"):
        nf.TimeSeries(np.array([0, 0.2, 0.2, 0.5, 1.0]), values)
    nan = values.copy()
    nan[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="not marked missing.*mask=~np.isnan"):
        nf.TimeSeries(times, nan)
    with pytest.raises(ValueError, match="marked as observed"):
        nf.TimeSeries(times, nan, np.ones(values.shape, bool))
    missing = nf.TimeSeries.from_nan(times, nan)
    assert not bool(missing.mask[1, 2, 0]) and float(missing.values[1, 2, 0]) == 0.0
    with pytest.raises(ValueError, match="shape"):
        nf.TimeSeries(np.linspace(0, 1, 4), values)
    with pytest.raises(ValueError, match="shape"):
        nf.TimeSeries(times, np.zeros(5))
    with pytest.raises(TypeError, match="boolean"):
        nf.TimeSeries(times, values, np.ones(values.shape))
    with pytest.raises(ValueError, match="no observed entry"):
        nf.TimeSeries(times, values, np.zeros(values.shape, bool))
    with pytest.raises(ValueError, match="finite time"):
        nf.TimeSeries(np.array([0, np.nan, 0.5, 0.7, 1.0]), values)
    with pytest.raises(TypeError, match="numbers"):
        nf.TimeSeries(times, np.full((2, 5), "a"))


def test_time_series_helpers(getkey):
    padded = nf.TimeSeries.from_lists(
        [np.array([0.0, 0.5]), np.array([0.1, 0.2, 0.9])],
        [np.ones((2, 1)), np.array([[1.0], [np.nan], [3.0]])],
        missing_nan=True,
    )
    assert padded.times.shape == (2, 3)
    assert padded.mask[:, :, 0].tolist() == [[True, True, False], [True, False, True]]
    assert jnp.allclose(padded.last_time(), jnp.array([0.5, 0.9]))
    series = _series(key=getkey())
    assert len(series[:2]) == 2 and len(series[3]) == 1
    assert not bool(jnp.any(series.until(0.5).mask & (series.times > 0.5)[..., None]))
    assert not bool(jnp.any(series.after(0.5).mask & (series.times <= 0.5)[..., None]))
    with pytest.raises(ValueError, match="no observation at or before"):
        series.until(-1.0)
    train, test = series.split(2, key=getkey())
    assert (len(train), len(test)) == (4, 2)
    mean, scale = train.channel_stats()
    standard = train.standardise(mean, scale)
    new_mean, new_scale = standard.channel_stats()
    assert jnp.allclose(new_mean, 0.0, atol=1e-10) and jnp.allclose(new_scale, 1.0)
    batch = jax.jit(series.sampler(5))(getkey())
    assert batch.values.shape == (5, 9, 2)


def test_model_input_errors(getkey):
    series = _series(key=getkey())
    model = nf.LatentSDE(2, 3, hidden_size=8, t0=0.1, t1=1.0, key=getkey())
    with pytest.raises(ValueError, match="covers"):
        model.check(series)
    model = nf.LatentSDE(3, 3, hidden_size=8, key=getkey())
    with pytest.raises(ValueError, match="channels"):
        model.forecast(series, 0.5, key=getkey())
    with pytest.raises(TypeError, match="TimeSeries"):
        model.check(np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="t1 > t0"):
        nf.LatentSDE(2, 3, t0=1.0, t1=1.0, key=getkey())
    with pytest.raises(ValueError, match="latent_size"):
        nf.LatentSDE(2, 0, key=getkey())
    with pytest.raises(ValueError, match="num_steps"):
        nf.SolverLatentSDE(2, 3, num_steps=0, key=getkey())
    with pytest.raises(ValueError, match="increasing"):
        model.sample_prior(jnp.array([0.5, 0.2]), 2, key=getkey())


def test_generated_series(getkey):
    lorenz = nf.stochastic_lorenz(16, num_times=11, inner_steps=10, key=getkey())
    assert lorenz.values.shape == (16, 11, 3)
    assert jnp.allclose(jnp.mean(lorenz.values, axis=(0, 1)), 0.0, atol=0.05)
    vdp = nf.stochastic_van_der_pol(
        8, num_times=40, keep=0.5, missing=0.1, key=getkey()
    )
    assert vdp.values.shape == (8, 20, 1)
    assert bool(jnp.all(jnp.diff(vdp.times, axis=1) > 0))
    assert not bool(
        jnp.all(vdp.times == vdp.times[:1])
    )  # each series has its own times
    assert 0.8 < float(jnp.mean(vdp.mask)) < 0.97
    regular = nf.stochastic_van_der_pol(4, num_times=40, keep=1.0, key=getkey())
    assert regular.values.shape == (4, 40, 1)
    with pytest.raises(ValueError, match="Unknown time-series data set"):
        nf.series_dataset("weather")
    with pytest.raises(ValueError, match="keep"):
        nf.stochastic_van_der_pol(4, keep=0.0, key=getkey())


def test_basic_motions():
    pytest.importorskip("aeon")
    series, labels = nf.load_basic_motions("train")
    assert series.values.shape == (40, 100, 6) and labels.shape == (40,)
    with pytest.raises(ValueError, match="split"):
        nf.load_basic_motions("validation")


@given(st.floats(-3, 3), st.floats(-3, 3))
def test_energy_distance(a, b):
    x = jnp.full((5, 2), a)
    y = jnp.full((4, 2), b)
    assert jnp.allclose(
        nf.energy_distance(x, y), 2 * np.sqrt(2) * abs(a - b), atol=1e-6
    )


def test_energy_distance_errors():
    with pytest.raises(ValueError, match="at least two"):
        nf.energy_distance(jnp.zeros((1, 2)), jnp.zeros((3, 2)))


def test_subsampled_reconstruction_is_unbiased(getkey):
    series = _series(n=1, key=getkey())
    mkey = getkey()
    full = nf.LatentSDE(2, 3, hidden_size=8, observation_scale=0.5, key=mkey)
    some = nf.LatentSDE(
        2, 3, hidden_size=8, observation_scale=0.5, reconstruction_points=2, key=mkey
    )
    u = jnp.asarray(0.5)

    def rec(model, key):
        args = (series.times[0], series.values[0], series.mask[0], u)
        return model.series_loss(*args, key=key)["reconstruction"]

    keys = jr.split(getkey(), 4000)
    a = jax.vmap(lambda k: rec(full, k))(keys)
    b = jax.vmap(lambda k: rec(some, k))(keys)
    error = jnp.sqrt(jnp.var(a) / a.shape[0] + jnp.var(b) / b.shape[0])
    assert abs(float(jnp.mean(a) - jnp.mean(b))) < 4 * float(error)
    assert float(jnp.var(b)) > float(jnp.var(a))  # it is a real subsample
    with pytest.raises(ValueError, match="reconstruction_points"):
        nf.LatentSDE(2, 3, reconstruction_points=0, key=getkey())
