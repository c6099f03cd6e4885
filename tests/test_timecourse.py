import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, strategies as st

import nfdm_sciml as nf
from nfdm_sciml._timecourse import _chain, _Knots


TIMES = (0.0, 0.5, 2.0, 3.0)  # uneven on purpose
DIM = 2


def _populations(rng, sizes=(30, 40, 50, 60), dim=DIM):
    return [rng.normal(size=(n, dim)) + k for k, n in enumerate(sizes)]


@pytest.fixture
def snapshots():
    return nf.Snapshots(TIMES, _populations(np.random.default_rng(0)))


@pytest.fixture(scope="module")
def model():
    return nf.TimeCourseNFDM(TIMES, DIM, key=jr.key(0), width_size=16, depth=2)


# --- Snapshots --------------------------------------------------------------------


def test_from_labels_sorts_and_groups():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 3))
    labels = np.array([5, 1, 3, 1, 5, 3, 3, 1, 5, 5, 1, 3], dtype=float)
    snaps = nf.Snapshots.from_labels(x, labels)
    assert snaps.times == (1.0, 3.0, 5.0) and snaps.dim == 3 and len(snaps) == 3
    for t, pop in zip(snaps.times, snaps.populations, strict=True):
        np.testing.assert_array_equal(pop, x[labels == t])
    # Integer and string-of-number labels work too.
    assert nf.Snapshots.from_labels(x, labels.astype(int)).times == snaps.times
    as_text = labels.astype(int).astype(str)
    assert nf.Snapshots.from_labels(x, as_text).times == snaps.times


def test_bad_snapshots():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 2))
    with pytest.raises(ValueError, match="two or more times"):
        nf.Snapshots.from_labels(x, np.zeros(6))
    with pytest.raises(ValueError, match="missing \\(NaN\\)"):
        nf.Snapshots.from_labels(x, np.array([0, 1, np.nan, 1, 0, 1]))
    with pytest.raises(ValueError, match="must be numbers"):
        nf.Snapshots.from_labels(x, np.array(["day1", "day2"] * 3))
    with pytest.raises(ValueError, match="one time label per row"):
        nf.Snapshots.from_labels(x, np.arange(5))
    with pytest.raises(ValueError, match="strictly increasing"):
        nf.Snapshots([1.0, 0.0], [x, x])
    with pytest.raises(ValueError, match="strictly increasing"):
        nf.Snapshots([1.0, 1.0], [x, x])
    with pytest.raises(ValueError, match="2 times but 3 populations"):
        nf.Snapshots([0.0, 1.0], [x, x, x])
    with pytest.raises(ValueError, match="NaN or infinite"):
        nf.Snapshots([0.0, 1.0], [x, np.where(x > 1.0, np.nan, x)])
    with pytest.raises(ValueError, match="same dimension"):
        nf.Snapshots([0.0, 1.0], [x, rng.normal(size=(4, 3))])
    with pytest.raises(ValueError, match="non-empty numeric array"):
        nf.Snapshots([0.0, 1.0], [x, np.zeros((0, 2))])
    with pytest.raises(ValueError, match="must be finite"):
        nf.Snapshots([0.0, np.inf], [x, x])


def test_drop_map_and_sampler(snapshots):
    dropped = snapshots.drop(2)
    assert dropped.times == (0.0, 0.5, 3.0)
    assert [len(p) for p in dropped.populations] == [30, 40, 60]
    assert snapshots.drop(-1).times == TIMES[:3]
    with pytest.raises(IndexError):
        snapshots.drop(4)
    assert snapshots.map(lambda x: 2 * x).populations[1][0, 0] == pytest.approx(
        2 * snapshots.populations[1][0, 0]
    )
    batch = jax.jit(snapshots.sampler(64, jnp.float64))(jr.key(0))
    assert batch.shape == (64, 4, DIM) and batch.dtype == jnp.float64
    for k, pop in enumerate(snapshots.populations):
        # Every draw is a row of its own population (never padding).
        hits = np.all(np.asarray(batch[:, k])[:, None] == pop[None], -1)
        assert np.all(hits.any(1))
    with pytest.raises(ValueError, match="positive integer"):
        snapshots.sampler(0)


def test_chain_sampler_follows_the_population_plans(getkey):
    # Two far-apart clusters that swap sides at every time: with exact OT over the
    # whole populations every chain is a translation of its first point.
    rng = np.random.default_rng(7)
    base = rng.normal(size=(40, DIM))
    times = (0.0, 1.0, 2.0)
    snaps = nf.Snapshots(times, [base + 3.0 * k for k in range(3)])
    sample = jax.jit(snaps.chain_sampler(16, nf.ExactOTCoupling(), dtype=jnp.float64))
    chains = np.asarray(sample(getkey()))
    assert chains.shape == (16, 3, DIM)
    np.testing.assert_allclose(chains[:, 1] - chains[:, 0], 3.0, atol=1e-12)
    np.testing.assert_allclose(chains[:, 2] - chains[:, 0], 6.0, atol=1e-12)
    # Entropic plans on populations of different sizes: every link is a row of its
    # own population and the clusters are kept.
    # A third of each population is on the left, so no mass needs to cross.
    left = rng.normal(size=(20, DIM)) * 0.1 - 5.0
    right = rng.normal(size=(40, DIM)) * 0.1 + 5.0
    pops = [np.concatenate([left[:n], right[: 2 * n]]) for n in (10, 20, 15)]
    snaps = nf.Snapshots(times, pops)
    chains = np.asarray(snaps.chain_sampler(64)(getkey()))
    for k, pop in enumerate(pops):
        assert np.all(np.any(np.all(chains[:, k, None] == pop[None], -1), 1))
    signs = np.sign(chains[..., 0])
    assert np.all(signs == signs[:, :1])
    with pytest.raises(ValueError, match="max_size"):
        snaps.chain_sampler(8, max_size=0)
    with pytest.raises(TypeError, match="AbstractCoupling"):
        snaps.chain_sampler(8, "exact")  # pyright: ignore[reportArgumentType]


def test_from_anndata(snapshots):
    anndata = pytest.importorskip("anndata")
    pd = pytest.importorskip("pandas")
    x = np.concatenate(snapshots.populations)
    days = np.concatenate(
        [np.full(len(p), t) for t, p in zip(TIMES, snapshots.populations, strict=True)]
    )
    order = np.random.default_rng(3).permutation(len(x))
    adata = anndata.AnnData(
        X=np.zeros((len(x), 5)),
        obs=pd.DataFrame({"day": days[order]}, index=[str(i) for i in range(len(x))]),
        obsm={"X_pca": x[order]},
    )
    loaded = nf.Snapshots.from_anndata(adata, "day", "X_pca")
    assert loaded.times == TIMES
    for got, want in zip(loaded.populations, snapshots.populations, strict=True):
        np.testing.assert_array_equal(np.sort(got, 0), np.sort(want, 0))
    assert nf.Snapshots.from_anndata(adata, "day").dim == 5
    with pytest.raises(KeyError, match="No time column 'time'"):
        nf.Snapshots.from_anndata(adata, "time", "X_pca")
    with pytest.raises(KeyError, match="No embedding 'X_umap'"):
        nf.Snapshots.from_anndata(adata, "day", "X_umap")
    with pytest.raises(TypeError, match="anndata.AnnData"):
        nf.Snapshots.from_anndata(x, "day")


# --- The chain spline and forward process -----------------------------------------


@given(
    seed=st.integers(0, 2**31 - 1),
    gaps=st.lists(st.floats(0.2, 3.0), min_size=2, max_size=4),
)
def test_cubic_spline_reproduces_quadratics(seed, gaps):
    rng = np.random.default_rng(seed)
    times = np.concatenate([[0.0], np.cumsum(gaps)])
    knots = _Knots.of(times)
    coefficients = rng.normal(size=(3, DIM))
    r = jnp.asarray(knots.knots)
    c0, c1, c2 = (jnp.asarray(c)[None] for c in coefficients)
    chain = c0 + r[:, None] * c1 + r[:, None] ** 2 * c2
    for s in np.linspace(0.0, 1.0, 13):
        want = coefficients[0] + s * coefficients[1] + s**2 * coefficients[2]
        got = knots.spline(jnp.asarray(s), chain, cubic=True)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    # The linear spline hits the chain at the knots and is linear in between.
    for i, s in enumerate(knots.knots):
        np.testing.assert_allclose(knots.spline(jnp.asarray(s), chain, False), chain[i])


def test_mean_and_scale_pinned_at_every_snapshot(model, getkey):
    chain = jr.normal(getkey(), (4, DIM))
    for i, r in enumerate(model.knots.knots):
        mu, sigma = model.mean_and_scale(jnp.asarray(r), chain)
        np.testing.assert_allclose(mu, chain[i], atol=1e-12)
        np.testing.assert_allclose(sigma, model.delta, rtol=1e-12)
    mu, sigma = model.mean_and_scale(jnp.asarray(0.3), chain)
    assert bool(jnp.all(sigma > model.delta))
    assert model.times == TIMES


def test_velocity_is_a_finite_difference(model, getkey):
    chain, eps = jr.normal(getkey(), (4, DIM)), jr.normal(getkey(), (DIM,))
    for r in (0.05, 0.3, 0.6, 0.9):
        r = jnp.asarray(r)
        mu, sigma, dmu, dsigma = model._moments(r, chain)
        h = 1e-6
        plus, minus = (model.mean_and_scale(r + s, chain) for s in (h, -h))
        fd = ((plus[0] + plus[1] * eps) - (minus[0] + minus[1] * eps)) / (2 * h)
        np.testing.assert_allclose(dmu + dsigma * eps, fd, rtol=1e-6, atol=1e-7)


def test_forward_drift_solves_fokker_planck():
    # In 1D, q(z, r) = N(mu(r), sigma(r)^2) must satisfy
    # dq/dr = -d(f q)/dz + g^2/2 d2q/dz2 with f the conditional forward drift.
    model = nf.TimeCourseNFDM(
        TIMES, 1, key=jr.key(5), width_size=8, depth=1,
        volatility=nf.ConstantVolatility(0.7),
    )  # fmt: skip
    chain = jnp.asarray([[0.0], [1.0], [-0.5], [0.4]])
    g2 = 0.49

    def density(z, r):
        mu, sigma = model.mean_and_scale(r, chain)
        return jnp.exp(-0.5 * ((z - mu[0]) / sigma[0]) ** 2) / sigma[0]

    def drift(z, r):
        mu, sigma, dmu, dsigma = model._moments(r, chain)
        eps = (z - mu[0]) / sigma[0]
        return (dmu + dsigma * eps - g2 / 2 * eps / sigma)[0]

    for z, r in ((0.3, 0.2), (0.8, 0.45), (-0.2, 0.8)):
        z, r = jnp.asarray(z), jnp.asarray(r)
        lhs = jax.grad(density, 1)(z, r)
        flux = jax.grad(lambda y, r=r: drift(y, r) * density(y, r))(z)
        laplacian = jax.grad(jax.grad(density))(z, r)
        np.testing.assert_allclose(lhs, -flux + g2 / 2 * laplacian, rtol=1e-8)


class _Oracle(eqx.Module):
    # A predictor that knows the chain: its output minus z is the chain.
    chain: jax.Array

    def __call__(self, r, z):
        return (self.chain - z[None]).ravel()


def test_loss_is_zero_for_the_true_chain(model, getkey):
    chain, eps = jr.normal(getkey(), (4, DIM)), jr.normal(getkey(), (DIM,))
    oracle = eqx.tree_at(lambda m: m.predictor, model, _Oracle(chain))
    kl, values = oracle.loss_terms(chain, jnp.asarray(0.4), eps)
    assert float(kl) == pytest.approx(0.0, abs=1e-18)
    kl, _ = model.loss_terms(chain, jnp.asarray(0.4), eps)
    assert float(kl) > 0
    assert float(values["velocity_fit"]) >= 0


def test_batch_loss_penalties_and_training(snapshots):
    model = nf.TimeCourseNFDM(TIMES, DIM, key=jr.key(1), width_size=16, depth=2)
    chains = snapshots.chain_sampler(32, dtype=jnp.float64)
    batch = chains(jr.key(2))
    loss, terms = model.batch_loss(batch, key=jr.key(3))
    assert set(terms) == {"diffusion", "velocity_fit", "loss"}
    assert bool(jnp.isfinite(loss))
    penalties = nf.Penalties(energy=(0.5, nf.KineticEnergy()))
    loss_p, terms_p = model.batch_loss(batch, key=jr.key(3), penalties=penalties)
    assert float(terms_p["penalty/energy"]) > 0
    np.testing.assert_allclose(loss_p, loss + 0.5 * terms_p["penalty/energy"])
    # The training step accepts the penalties for this model.
    trainer = nf.Trainer(
        nf.TrainConfig(steps=60, batch_size=32, steps_per_call=30, learning_rate=3e-3),
        penalties=penalties,
        progress=nf.NoProgress(),
    )
    _, records = trainer.fit(trainer.init(model), chains)
    assert records[-1]["loss"] < records[0]["loss"]
    with pytest.raises(ValueError, match="batch"):
        model.batch_loss(batch[:, :3], key=jr.key(3))


def test_simulate(model, snapshots, getkey):
    z0 = jnp.asarray(snapshots.populations[0][:5])
    sol = model.simulate(z0, 0.0, 3.0, key=getkey(), save_times=[0.0, 1.0, 3.0])
    assert sol.trajectories.shape == (5, 3, DIM) and sol.final.shape == (5, DIM)
    np.testing.assert_allclose(sol.times, [0.0, 1.0, 3.0])
    assert bool(jnp.all(jnp.isfinite(sol.trajectories)))
    # Save times that nearly coincide with the uniform steps (as 61 evenly spaced
    # times do with 100 steps) must not make the grid non-increasing in float32.
    many = list(np.linspace(0.0, 3.0, 61))
    sol = model.simulate(z0, 0.0, 3.0, key=getkey(), save_times=many)
    assert sol.trajectories.shape == (5, 61, DIM)
    one = model.simulate(z0, 0.5, 2.0, key=jr.key(0), stochastic=False, num_steps=7)
    two = model.simulate(z0, 0.5, 2.0, key=jr.key(0), stochastic=False, num_steps=7)
    np.testing.assert_array_equal(one.final, two.final)
    with pytest.raises(ValueError, match="must come after"):
        model.simulate(z0, 2.0, 1.0, key=getkey())
    with pytest.raises(ValueError, match="Extrapolation"):
        model.simulate(z0, 0.0, 4.0, key=getkey())
    with pytest.raises(ValueError, match="save_times"):
        model.simulate(z0, 0.0, 1.0, key=getkey(), save_times=[2.0])
    fm = nf.TimeCourseFlowMatching(TIMES, DIM, key=jr.key(2), width_size=8, depth=1)
    assert fm.simulate(z0, 0.0, 3.0, key=getkey()).final.shape == (5, DIM)
    with pytest.raises(ValueError, match="ODE only"):
        fm.simulate(z0, 0.0, 3.0, key=getkey(), stochastic=True)


def test_flow_matching_loss_is_zero_on_its_target():
    # Translating snapshots at unit speed: a network that outputs the constant
    # velocity has zero loss; the chained exact-OT pairs are the translations.
    times = (0.0, 1.0, 2.0)
    base = np.random.default_rng(4).normal(size=(16, DIM))
    snaps = nf.Snapshots(times, [base + k for k in range(3)])
    fm = nf.TimeCourseFlowMatching(
        times, DIM, key=jr.key(0), coupling=nf.ExactOTCoupling()
    )
    span = 2.0  # velocities are per unit of normalised time

    class Constant(eqx.Module):
        def __call__(self, r, z):
            return jnp.full((DIM,), span, z.dtype)

    fm = eqx.tree_at(lambda m: m.velocity, fm, Constant())
    batch = jnp.stack([jnp.asarray(p) for p in snaps.populations], axis=1)
    loss, _ = fm.batch_loss(batch, key=jr.key(1))
    assert float(loss) == pytest.approx(0.0, abs=1e-20)
    chains = _chain(nf.ExactOTCoupling(), batch, jr.key(0))
    np.testing.assert_allclose(chains[:, 2] - chains[:, 0], 2.0)


def test_bad_model_arguments(no_typecheck):
    with pytest.raises(ValueError, match="strictly increasing"):
        nf.TimeCourseNFDM((0.0, 0.0), 2, key=jr.key(0))
    with pytest.raises(ValueError, match="interpolation"):
        nf.TimeCourseNFDM(TIMES, 2, key=jr.key(0), interpolation="quintic")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="spread"):
        nf.TimeCourseNFDM(TIMES, 2, key=jr.key(0), spread=0.0)
    with pytest.raises(TypeError, match="AbstractCoupling"):
        nf.TimeCourseFlowMatching(TIMES, 2, key=jr.key(0), coupling="ot")  # pyright: ignore[reportArgumentType]


# --- The protocol -----------------------------------------------------------------


def test_left_out_time_never_reaches_training(snapshots):
    seen = []

    def method(train, source, t_source, t_target, seed):
        seen.append((train, t_source, t_target, seed))
        return source + 0.0

    result = nf.leave_one_out(snapshots, method, seeds=(0, 1), eval_size=20)
    assert len(result.rows) == 4 and {r["index"] for r in result.rows} == {1, 2}
    for train, t_source, t_target, _ in seen:
        assert t_target not in train.times and t_source in train.times
        held = snapshots.populations[TIMES.index(t_target)]
        for pop in train.populations:
            assert not np.any(np.all(pop[:, None] == held[None], -1))
    assert set(result.per_time()) == {0.5, 2.0}
    assert result.std >= 0 and result.mean == pytest.approx(np.mean(result.w1))


def test_ot_interpolation_is_exact_for_translations():
    times = (0.0, 1.0, 2.0, 4.0)
    base = np.random.default_rng(6).normal(size=(50, DIM))
    snaps = nf.Snapshots(times, [base + t for t in times])
    result = nf.leave_one_out(snaps, "ot-interpolation", seeds=(0,), eval_size=50)
    np.testing.assert_allclose(result.w1, 0.0, atol=1e-9)


def test_protocol_bad_input(no_typecheck, snapshots):
    with pytest.raises(ValueError, match="three or more"):
        nf.leave_one_out(snapshots.drop(0).drop(0), "ot-interpolation")
    with pytest.raises(ValueError, match="interior snapshots"):
        nf.leave_one_out(snapshots, "ot-interpolation", left_out=[0])
    with pytest.raises(ValueError, match="Unknown method"):
        nf.leave_one_out(snapshots, "cfm")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="non-finite"):
        nf.leave_one_out(snapshots, lambda *a: a[1] * np.nan, seeds=(0,))
    with pytest.raises(TypeError, match="Snapshots"):
        nf.fit_time_course(snapshots.populations)


def test_fit_and_leave_one_out_end_to_end():
    # A quarter turn of a ring: NFDM's curved paths beat the straight lines at the
    # held-out time, on a small budget.
    rng = np.random.default_rng(0)
    times = (0.0, 1.0, 2.0, 3.0, 4.0)
    pops = []
    for t in times:
        angle = np.pi * t / 4
        centre = 2 * np.array([np.cos(angle), np.sin(angle)])
        pops.append(centre + 0.1 * rng.normal(size=(300, 2)))
    snaps = nf.Snapshots(times, pops)

    def config(seed):
        return nf.TrainConfig(
            steps=1500, batch_size=128, steps_per_call=500, schedule="cosine",
            clip_norm=1.0, seed=seed,
        )  # fmt: skip

    nfdm = nf.leave_one_out(
        snaps, "nfdm", seeds=(0,), left_out=[2], eval_size=200, config=config,
        width_size=32,
    )  # fmt: skip
    line = nf.leave_one_out(
        snaps, "ot-interpolation", seeds=(0,), left_out=[2], eval_size=200
    )
    assert nfdm.mean < 0.6 * line.mean


# --- Generated data ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(nf.TIME_COURSES))
def test_generated_time_courses(name):
    make = nf.TIME_COURSES[name]
    snaps = make(50, seed=0)
    assert len(snaps) >= 5 and all(len(p) == 50 for p in snaps.populations)
    again, other = make(50, seed=0), make(50, seed=1)
    np.testing.assert_array_equal(again.populations[-1], snaps.populations[-1])
    assert not np.allclose(other.populations[-1], snaps.populations[-1])
    assert snaps.dim == {"double_well": 2, "lorenz": 3, "oscillator": 5}[name]


def test_double_well_bifurcates():
    snaps = nf.double_well(2000, seed=0)
    x = snaps.populations[-1][:, 0]
    right = np.mean(x > 0)
    # Two branches near x = -1 and x = +1, the tilt favouring the right one.
    assert 0.5 < right < 0.9
    assert np.median(x[x > 0]) == pytest.approx(1.0, abs=0.2)
    assert np.median(x[x < 0]) == pytest.approx(-1.0, abs=0.2)
    assert np.std(snaps.populations[0][:, 0]) < 0.2


def test_generator_bad_input():
    with pytest.raises(ValueError, match="positive integer"):
        nf.double_well(0)
    with pytest.raises(ValueError, match="strictly increasing"):
        nf.noisy_lorenz(10, times=(0.2, 0.1))
    with pytest.raises(ValueError, match="dim"):
        nf.oscillator(10, dim=2)
