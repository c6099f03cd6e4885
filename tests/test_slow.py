"""Longer checks, excluded from CI: `nox -s slow`."""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import nfdm_sciml as nf
from nfdm_sciml import testing

from .helpers import FORWARD_PROCESSES


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", sorted(FORWARD_PROCESSES))
def test_invariants_thoroughly(name):
    make, learnable = FORWARD_PROCESSES[name]
    testing.check_forward_process(
        make(4, 0, jr.key(7)),
        (4,),
        delta=0.01 if learnable else None,
        dtype=jnp.float64,
        max_examples=200,
    )


def test_short_recipe_finds_all_modes():
    # 4,000 steps of the 2D recipe in float64: the loss falls well below its start
    # and SDE samples land near each of the eight centres.
    model = nf.build_model("nfdm", 2, key=jr.key(0))
    optimiser = optax.adam(1e-3)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
    step = nf.make_train_step(optimiser)
    model, _, terms = nf.run_steps(
        step,
        model,
        opt_state,
        lambda k: nf.eight_gaussians(k, 1024, dtype=jnp.float64),
        4000,
        key=jr.key(1),
    )
    assert float(terms.diffusion[-500:].mean()) < 11.5
    samples = np.asarray(nf.sample_sde(model, 4000, key=jr.key(2)).samples)
    angles = np.arange(8) * np.pi / 4
    centres = 4 / np.sqrt(2) * np.stack([np.cos(angles), np.sin(angles)], -1)
    nearest = np.argmin(((samples[:, None] - centres[None]) ** 2).sum(-1), 1)
    counts = np.bincount(nearest, minlength=8)
    assert counts.min() > 0.06 * len(samples)
