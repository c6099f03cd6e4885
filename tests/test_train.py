import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import nfdm_sciml as nf

from .helpers import make_model


def _setup(seed=0):
    model = make_model("nfdm_gaussian", "neural", key=jr.key(seed))
    optimiser = optax.adam(3e-3)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
    return model, optimiser, opt_state


def _sample(key):
    return nf.eight_gaussians(key, 64, dtype=jnp.float64)


def test_scan_equals_step_by_step():
    model, optimiser, opt_state = _setup()
    step = nf.make_train_step(optimiser)
    scanned, _, terms = nf.run_steps(step, model, opt_state, _sample, 5, key=jr.key(1))
    for i, key in enumerate(jr.split(jr.key(1), 5)):
        dkey, lkey = jr.split(key)
        model, opt_state, t = step(model, opt_state, _sample(dkey), lkey)
        np.testing.assert_allclose(t.nelbo, terms.nelbo[i], rtol=1e-10)
    for a, b in zip(
        jax.tree.leaves(eqx.filter(model, eqx.is_array)),
        jax.tree.leaves(eqx.filter(scanned, eqx.is_array)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_training_lowers_the_loss():
    model, optimiser, opt_state = _setup(2)
    step = nf.make_train_step(optimiser)
    _, _, terms = nf.run_steps(step, model, opt_state, _sample, 300, key=jr.key(3))
    first, last = terms.diffusion[:30].mean(), terms.diffusion[-30:].mean()
    assert float(last) < 0.8 * float(first)
    assert np.all(np.isfinite(terms.nelbo))


def test_run_steps_bad_num_steps():
    model, optimiser, opt_state = _setup()
    with pytest.raises(ValueError, match="num_steps"):
        nf.run_steps(
            nf.make_train_step(optimiser), model, opt_state, _sample, 0, key=jr.key(0)
        )


def test_eight_gaussians_density():
    xs = nf.eight_gaussians(jr.key(4), 200_000, dtype=jnp.float64)
    # The sample's radius and spread, and the entropy of the mixture (2.832 nats).
    radius = jnp.linalg.norm(xs, axis=-1).mean()
    assert float(radius) == pytest.approx(4 / np.sqrt(2), rel=0.02)
    entropy = -float(nf.eight_gaussians_log_prob(xs).mean())
    assert entropy == pytest.approx(2.832, abs=0.01)
    # The density integrates to one on a grid.
    grid = jnp.linspace(-5, 5, 401)
    xx, yy = jnp.meshgrid(grid, grid)
    points = jnp.stack([xx.ravel(), yy.ravel()], -1)
    mass = jnp.exp(nf.eight_gaussians_log_prob(points)).sum() * (grid[1] - grid[0]) ** 2
    assert float(mass) == pytest.approx(1.0, abs=1e-3)
