"""Registries of every built-in component, and small utilities for the tests."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import nfdm_sciml as nf


def randomise(module, key, scale: float = 0.5):
    """Replaces every inexact array of `module` by Gaussian noise of `scale`, so that
    checks do not pass merely because layers start at zero."""
    leaves, treedef = jax.tree.flatten(module, is_leaf=eqx.is_inexact_array)
    keys = jr.split(key, len(leaves))
    new = [
        scale * jr.normal(k, leaf.shape, leaf.dtype)
        if eqx.is_inexact_array(leaf)
        else leaf
        for leaf, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, new)


def _key(seed: int):
    return jr.key(seed)


# name -> (constructor(data_size, context_size, key), is learnable with NFDM boundary)
FORWARD_PROCESSES = {
    "nfdm_gaussian": (
        lambda d, c, k: randomise(
            nf.NFDMGaussian(d, context_size=c, width_size=16, depth=2, key=k), k
        ),
        True,
    ),
    "flow_affine": (
        lambda d, c, k: randomise(
            nf.NeuralFlowProcess(
                d,
                context_size=c,
                transform="affine",
                num_layers=2,
                width_size=16,
                depth=1,
                key=k,
            ),
            k,
        ),
        True,
    ),
    "flow_spline": (
        lambda d, c, k: randomise(
            nf.NeuralFlowProcess(
                d,
                context_size=c,
                transform="spline",
                num_layers=2,
                num_bins=4,
                width_size=16,
                depth=1,
                key=k,
            ),
            k,
        ),
        True,
    ),
    # The end point q(z_1 | x) is learned, so only t = 0 is pinned.
    "nfdm_gaussian_free": (
        lambda d, c, k: randomise(
            nf.NFDMGaussian(
                d, context_size=c, width_size=16, depth=2, pin_prior=False, key=k
            ),
            k,
        ),
        False,
    ),
    "linear_interpolant": (lambda d, c, k: nf.LinearInterpolant(), False),
    "variance_preserving": (lambda d, c, k: nf.VariancePreserving(), False),
}

VOLATILITIES = {
    "constant": lambda k: nf.ConstantVolatility(0.7),
    "linear_snr": lambda k: nf.LinearSNRVolatility(),
    "neural": lambda k: randomise(nf.NeuralVolatility(width_size=8, depth=2, key=k), k),
}


def make_model(process="nfdm_gaussian", volatility="neural", data_size=2, *, key):
    fkey, pkey, vkey = jr.split(key, 3)
    forward = FORWARD_PROCESSES[process][0](data_size, 0, fkey)
    predictor = nf.Predictor(data_size, width_size=16, depth=2, key=pkey)
    return nf.NFDM(
        forward, predictor, VOLATILITIES[volatility](vkey), data_shape=(data_size,)
    )


def gaussian_data(key, n, d, mean, std):
    return mean + std * jr.normal(key, (n, d), jnp.float64)


def gaussian_log_prob(x, mean, var):
    return np.sum(-0.5 * (x - mean) ** 2 / var - 0.5 * np.log(2 * np.pi * var), -1)
