import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import nfdm_sciml as nf
from nfdm_sciml import testing

from .helpers import randomise


def _bridge(key, data_size=2):
    process = nf.GaussianBridge(data_size, width_size=16, depth=2, key=key)
    return randomise(process, key)


def test_bridge_process_invariants():
    # Round trip, log-det, velocity against finite differences, score against an
    # independent density, with the source as the context.
    process = _bridge(jr.key(0))
    source = jnp.array([1.5, -0.5])
    testing.check_forward_process(process, (2,), context=source, dtype=jnp.float64)


@pytest.mark.parametrize("seed", range(3))
def test_bridge_is_pinned_at_both_ends(seed):
    process = _bridge(jr.key(seed), 3)
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
    # In between the learned part moves the path off the straight line.
    straight = 0.5 * x0 + 0.5 * x1
    assert not np.allclose(process(jnp.zeros(3), jnp.array(0.5), x0, x1), straight)


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


def test_bridge_trains_and_carries_sources_to_targets():
    bridge = nf.NeuralFlowBridge(
        2, key=jr.key(4), width_size=32, depth=2, coupling=nf.ExactOTCoupling()
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
