"""Sample-quality metrics."""

import jax.numpy as jnp
from jaxtyping import Array, Float


def mmd(
    x: Float[Array, "n d"], y: Float[Array, "m d"], *, bandwidth: float | None = None
) -> Float[Array, ""]:
    r"""The unbiased squared maximum mean discrepancy between two samples with the
    Gaussian kernel $k(a, b) = \exp(-\|a - b\|^2 / (2h^2))$.

    Zero in expectation when both samples come from one distribution (so an estimate
    can be slightly negative), larger the more they differ. `bandwidth` $h$ defaults
    to the median distance between all points of both samples.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"`mmd` needs two 2D samples with the same number of features; got shapes "
            f"{x.shape} and {y.shape}."
        )
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("`mmd` needs at least two points in each sample.")
    both = jnp.concatenate([x, y.astype(x.dtype)])
    d2 = jnp.sum((both[:, None, :] - both[None, :, :]) ** 2, axis=-1)
    if bandwidth is None:
        h2 = jnp.median(d2[jnp.triu_indices(both.shape[0], 1)]) / 2
    else:
        h2 = jnp.asarray(bandwidth**2, x.dtype)
    kernel = jnp.exp(-d2 / (2 * h2))
    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    # Unbiased: the diagonals (each point with itself) are left out.
    xx = (jnp.sum(kxx) - jnp.trace(kxx)) / (n * (n - 1))
    yy = (jnp.sum(kyy) - jnp.trace(kyy)) / (m * (m - 1))
    return xx + yy - 2 * jnp.mean(kxy)
