import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nfdm_sciml as nf


def test_gaussian_decoder_closed_form():
    decoder = nf.GaussianDecoder(0.1)
    x, z0 = jnp.array([0.0, 1.0]), jnp.array([0.1, 0.8])
    expected = -np.sum(
        -0.5 * ((x - z0) / 0.1) ** 2 - math.log(0.1) - 0.5 * math.log(2 * math.pi)
    )
    np.testing.assert_allclose(decoder.nll(x, z0), expected, rtol=1e-12)


def test_discretised_decoder_is_normalised():
    decoder = nf.DiscretisedGaussianDecoder(num_bins=17, scale=0.1)
    centres = jnp.linspace(-1.0, 1.0, 17)
    z0 = jnp.array([0.33])
    nlls = jax.vmap(lambda c: decoder.nll(jnp.reshape(c, (1,)), z0))(centres)
    np.testing.assert_allclose(jnp.sum(jnp.exp(-nlls)), 1.0, rtol=1e-10)
    # The most likely level is the nearest centre, and sample() returns it.
    assert float(decoder.sample(z0)[0]) == pytest.approx(0.375)
    assert int(jnp.argmin(nlls)) == 11


def test_discretised_decoder_sharp_limit():
    # With a small scale, z0 exactly on a centre gives probability close to one.
    decoder = nf.DiscretisedGaussianDecoder(num_bins=256, scale=1e-3)
    x = jnp.array([10 / 127.5 - 1])
    assert float(decoder.nll(x, x)) == pytest.approx(0.0, abs=1e-6)


def test_decoder_bad_configs():
    with pytest.raises(ValueError, match="scale > 0"):
        nf.GaussianDecoder(0.0)
    with pytest.raises(ValueError, match="num_bins >= 2"):
        nf.DiscretisedGaussianDecoder(num_bins=1)
