import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import nfdm_sciml as nf


def _model(coupling=None, sigma=0.0):
    return nf.FlowMatching(
        (2,), key=jr.key(0), coupling=coupling, sigma=sigma, width_size=8, depth=1
    )


@pytest.mark.parametrize("sigma", [0.0, 0.1])
def test_loss_by_hand(sigma):
    model = jax.tree.map(
        lambda a: a.astype(jnp.float64) if eqx_float(a) else a, _model(sigma=sigma)
    )
    xs = jr.normal(jr.key(1), (5, 2), jnp.float64)
    key = jr.key(2)
    loss, terms = model.batch_loss(xs, key=key)
    # The same draws, written out: noise, (identity) coupling, times, path noise.
    nkey, _, tkey, skey = jr.split(key, 4)
    noise = jr.normal(nkey, xs.shape, jnp.float64)
    ts = jr.uniform(tkey, (5,), jnp.float64)
    zs = (1 - ts[:, None]) * xs + ts[:, None] * noise
    if sigma > 0:
        zs = zs + sigma * jr.normal(skey, xs.shape, jnp.float64)
    expected = np.mean(
        [
            np.sum((model.ode_drift(z, t) - (n - x)) ** 2)
            for z, t, n, x in zip(zs, ts, noise, xs, strict=True)
        ]
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-10)
    np.testing.assert_allclose(terms["loss"], loss)


def eqx_float(a):
    return isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating)


@pytest.mark.parametrize(
    "coupling", [nf.IndependentCoupling(), nf.ExactOTCoupling()], ids=["i", "ot"]
)
def test_trains_and_samples(coupling):
    model = _model(coupling)
    config = nf.TrainConfig(
        steps=200, batch_size=64, steps_per_call=100, ema_decay=None, learning_rate=3e-3
    )
    trainer = nf.Trainer(config)
    sample = lambda k: nf.moons(k, 64, dtype=jnp.float64)  # noqa: E731
    state, records = trainer.fit(trainer.init(model), sample)
    assert records[-1]["loss"] < records[0]["loss"]
    solution = nf.sample_ode(
        state.model, 16, key=jr.key(3), solver="euler", num_steps=4, num_saves=5
    )
    assert solution.samples.shape == (16, 2)
    assert solution.trajectories is not None
    assert solution.trajectories.shape == (16, 5, 2)
    assert bool(jnp.all(jnp.isfinite(solution.samples)))


def test_ot_coupling_gives_straighter_paths_than_independent():
    # Minibatch OT pairs each noise point with a nearby data point, so the regression
    # targets vary less: its loss at the optimum is lower.
    xs = nf.eight_gaussians(jr.key(4), 256, dtype=jnp.float64)
    noise = jr.normal(jr.key(5), xs.shape, jnp.float64)
    independent = jnp.mean(jnp.sum((noise - xs) ** 2, -1))
    x_ot, n_ot = nf.ExactOTCoupling()(xs, noise, key=jr.key(6))
    paired = jnp.mean(jnp.sum((n_ot - x_ot) ** 2, -1))
    assert float(paired) < 0.5 * float(independent)


def test_bad_input(no_typecheck):
    with pytest.raises(ValueError, match="non-empty shape"):
        nf.FlowMatching((), key=jr.key(0))
    with pytest.raises(ValueError, match="sigma"):
        nf.FlowMatching((2,), key=jr.key(0), sigma=-1.0)
    with pytest.raises(TypeError, match="AbstractCoupling"):
        nf.FlowMatching((2,), key=jr.key(0), coupling="ot")  # pyright: ignore
    model = _model()
    with pytest.raises(ValueError, match="batch of shape"):
        model.batch_loss(jnp.zeros((4, 3)), key=jr.key(0))
    with pytest.raises(TypeError, match="sample_ode"):
        nf.sample_sde(model, 4, key=jr.key(0))  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="bridge and time-course NFDM models only"):
        step = nf.make_train_step(
            nf.TrainConfig().optimiser(), penalties=nf.Penalties(k=nf.KineticEnergy())
        )
        step(model, None, jnp.zeros((4, 2)), jr.key(0))


def test_loss_from_a_data_source():
    # The bridge baseline: the source samples replace the noise.
    model = nf.FlowMatching((2,), key=jr.key(0), width_size=8, depth=1, from_data=True)
    pairs = jr.normal(jr.key(1), (5, 2, 2))
    key = jr.key(2)
    loss, _ = model.batch_loss(pairs, key=key)
    _, _, tkey, _ = jr.split(key, 4)
    ts = jr.uniform(tkey, (5,), pairs.dtype)
    x, n = pairs[:, 0], pairs[:, 1]
    zs = (1 - ts[:, None]) * x + ts[:, None] * n
    expected = np.mean(
        [
            np.sum((model.ode_drift(z, t) - (b - a)) ** 2)
            for z, t, a, b in zip(zs, ts, x, n, strict=True)
        ]
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="pairs"):
        model.batch_loss(jnp.zeros((4, 2)), key=key)
