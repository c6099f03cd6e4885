"""Built-in toy data sets, sampled on the device so training needs no host loop."""

import math

import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray


def eight_gaussians(
    key: PRNGKeyArray, num_samples: int, *, dtype=jnp.float32
) -> Float[Array, "n 2"]:
    """The mixture of 8 Gaussians of the NFDM paper's 2D experiments.

    Centres at radius 4 in the directions 0°, 45°, ..., 315°, component standard
    deviation 0.5, and the whole sample divided by $\\sqrt 2$ (so radius about 2.83 and
    standard deviation about 0.354). Its differential entropy is about 2.832 nats.
    """
    if not (isinstance(num_samples, int) and num_samples > 0):
        raise ValueError(
            f"`num_samples` must be a positive integer, got {num_samples}."
        )
    ckey, nkey = jr.split(key)
    angles = jr.randint(ckey, (num_samples,), 0, 8).astype(dtype) * (math.pi / 4)
    centres = 4 * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    noise = 0.5 * jr.normal(nkey, (num_samples, 2), dtype=dtype)
    return (centres + noise) / math.sqrt(2)


def eight_gaussians_log_prob(x: Float[Array, "n 2"]) -> Float[Array, " n"]:
    """The exact log-density of [`nfdm_sciml.eight_gaussians`][] at `x`."""
    angles = jnp.arange(8, dtype=x.dtype) * (math.pi / 4)
    centres = 4 / math.sqrt(2) * jnp.stack([jnp.cos(angles), jnp.sin(angles)], -1)
    var = 0.25 / 2
    d2 = jnp.sum((x[:, None, :] - centres[None]) ** 2, axis=-1)
    log_components = -d2 / (2 * var) - math.log(2 * math.pi * var)
    return jax.nn.logsumexp(log_components, axis=-1) - math.log(8)
