import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import nfdm_sciml as nf
from nfdm_sciml import testing

from .helpers import randomise


def _bridge(key, data_size=2, kind="gaussian"):
    process = nf.GaussianBridge(data_size, width_size=16, depth=2, key=key)
    if kind != "gaussian":
        process = nf.NeuralFlowProcess(
            data_size,
            context_size=data_size,
            transform=kind,
            num_layers=2,
            num_bins=4,
            width_size=16,
            depth=1,
            gaussian=process,
            key=jr.fold_in(key, 1),
        )
    # Random parameters everywhere, so that nothing passes because a layer is zero.
    return randomise(process, key)


BRIDGES = ["gaussian", "affine", "spline"]


@pytest.mark.parametrize("kind", BRIDGES)
@pytest.mark.parametrize("data_size", [1, 3])
def test_bridge_process_invariants(kind, data_size):
    # Hypothesis draws (eps, t, x0, x1): round trip, log-det, velocity against finite
    # differences, score against an independent density, and both pinned ends.
    process = _bridge(jr.key(0), data_size, kind)
    testing.check_bridge_process(
        process, (data_size,), delta=0.01, dtype=jnp.float64, max_examples=10
    )


def test_bridge_check_catches_a_process_that_is_not_a_bridge():
    # NFDM-Gaussian ends at N(0, I), not at the source: the check must say so.
    process = randomise(
        nf.NFDMGaussian(2, context_size=2, width_size=8, depth=1, key=jr.key(0)),
        jr.key(1),
    )
    with pytest.raises(AssertionError, match="bridge boundary at t=1"):
        testing.check_bridge_process(process, (2,), delta=0.01, dtype=jnp.float64)


@pytest.mark.parametrize("kind", BRIDGES)
@pytest.mark.parametrize("seed", range(2))
def test_bridge_is_pinned_at_both_ends(kind, seed):
    process = _bridge(jr.key(seed), 3, kind)
    ekey, xkey, skey = jr.split(jr.key(100 + seed), 3)
    eps = jr.normal(ekey, (3,), jnp.float64)
    x0 = 3 * jr.normal(xkey, (3,), jnp.float64)
    x1 = 3 * jr.normal(skey, (3,), jnp.float64)
    np.testing.assert_allclose(
        process(eps, jnp.array(0.0), x0, x1), x0 + 0.01 * eps, atol=1e-12
    )
    np.testing.assert_allclose(
        process(eps, jnp.array(1.0), x0, x1), x1 + 0.01 * eps, atol=1e-12
    )
    assert float(process.prior_kl(eps, x0, x1)) == 0.0
    # In between the learned part moves the path off the straight line, and a
    # non-Gaussian bridge off its Gaussian part.
    half = jnp.array(0.5)
    straight = 0.5 * x0 + 0.5 * x1
    assert not np.allclose(process(jnp.zeros(3), half, x0, x1), straight)
    if kind != "gaussian":
        mu, sigma = process.gaussian.mean_and_scale(half, x0, x1)
        assert not np.allclose(process(eps, half, x0, x1), mu + sigma * eps)


def _pairs(key, n):
    # Targets around (+2, 0), sources around (-2, 0).
    tkey, skey = jr.split(key)
    target = jnp.array([[2.0, 0.0]]) + 0.3 * jr.normal(tkey, (n, 2), jnp.float64)
    source = jnp.array([[-2.0, 0.0]]) + 0.3 * jr.normal(skey, (n, 2), jnp.float64)
    return jnp.stack([target, source], axis=1)


def test_bridge_loss_is_the_nfdm_loss_with_the_source_as_context():
    bridge = nf.NeuralFlowBridge(2, key=jr.key(1), width_size=16, depth=2)
    pairs = _pairs(jr.key(2), 16)
    key = jr.key(3)
    penalties = nf.Penalties(obstacle=nf.Obstacle(nf.Disk([0.0, 0.0], 0.5)))
    loss, terms = bridge.batch_loss(pairs, key=key, penalties=penalties)
    _, lkey = jr.split(key)
    expected, _ = bridge.model.batch_loss(
        pairs[:, 0], key=lkey, contexts=pairs[:, 1], penalties=penalties
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-12)
    assert float(terms.prior) == 0.0 and "obstacle" in terms.penalties


@pytest.mark.parametrize("kind", ["gaussian", "spline"])
def test_bridge_trains_and_carries_sources_to_targets(kind):
    bridge = nf.NeuralFlowBridge(
        2,
        key=jr.key(4),
        width_size=32,
        depth=2,
        coupling=nf.ExactOTCoupling(),
        forward=kind,
        num_layers=2,
    )
    config = nf.TrainConfig(
        steps=600, batch_size=128, steps_per_call=300, learning_rate=3e-3, seed=1
    )
    trainer = nf.Trainer(config)
    state, records = trainer.fit(trainer.init(bridge), lambda k: _pairs(k, 128))
    assert records[-1]["nelbo"] < records[0]["nelbo"]
    sources = _pairs(jr.key(5), 256)[:, 1]
    for deterministic in (False, True):
        solution = state.ema.sample(
            sources, key=jr.key(6), deterministic=deterministic, num_saves=11
        )
        assert solution.trajectories is not None
        assert solution.trajectories.shape == (256, 11, 2)
        # The paths start at the sources and end near the target cloud.
        np.testing.assert_allclose(solution.trajectories[:, 0], sources, atol=0.1)
        mean = np.mean(np.asarray(solution.samples), axis=0)
        assert abs(mean[0] - 2.0) < 0.5 and abs(mean[1]) < 0.5
    # The bound of log p(x0 | x1) evaluates with the sources as contexts.
    pairs = _pairs(jr.key(7), 64)
    estimate = nf.nelbo_estimate(
        state.ema.model, pairs[:, 0], key=jr.key(8), num_times=8, contexts=pairs[:, 1]
    )
    assert np.isfinite(float(estimate.nats))


def test_bad_input(no_typecheck):
    process = _bridge(jr.key(0))
    with pytest.raises(ValueError, match="source sample x1 as `context`"):
        process(jnp.zeros(2), jnp.array(0.5), jnp.zeros(2))
    bridge = nf.NeuralFlowBridge(2, key=jr.key(1), width_size=8, depth=1)
    with pytest.raises(ValueError, match="pairs"):
        bridge.batch_loss(jnp.zeros((4, 2)), key=jr.key(0))
    with pytest.raises(ValueError, match="sources"):
        bridge.sample(jnp.zeros((4, 3)), key=jr.key(0))
    with pytest.raises(TypeError, match="AbstractCoupling"):
        nf.NeuralFlowBridge(2, key=jr.key(1), coupling="ot")  # pyright: ignore
    with pytest.raises(ValueError, match="'gaussian', 'spline' or 'affine'"):
        nf.NeuralFlowBridge(2, key=jr.key(1), forward="flow")  # pyright: ignore
    with pytest.raises(TypeError, match="AbstractGaussianProcess"):
        nf.NeuralFlowProcess(2, gaussian="bridge", key=jr.key(0))  # pyright: ignore
