"""The library in float32, the dtype of real training runs: dtypes are preserved
end to end and the checks pass with float32 tolerances."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import nfdm_sciml as nf
from nfdm_sciml import testing


def test_float32_end_to_end():
    with jax.enable_x64(False):
        model = nf.build_model("nfdm", 2, key=jr.key(0), width_size=16, depth=2)
        testing.check_forward_process(
            model.forward, (2,), delta=0.01, dtype=jnp.float32, max_examples=5
        )
        optimiser = optax.adam(1e-3)
        opt_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
        step = nf.make_train_step(optimiser)
        model, opt_state, terms = nf.run_steps(
            step,
            model,
            opt_state,
            lambda k: nf.eight_gaussians(k, 32),
            3,
            key=jr.key(1),
        )
        assert terms.nelbo.dtype == jnp.float32
        solution = nf.sample_sde(model, 8, key=jr.key(2), num_steps=10)
        assert solution.samples.dtype == jnp.float32
        xs = nf.eight_gaussians(jr.key(3), 8)
        estimate = nf.nelbo_estimate(model, xs, key=jr.key(4), num_times=4)
        assert estimate.nats.dtype == jnp.float32
        assert np.isfinite(float(estimate.nats))
