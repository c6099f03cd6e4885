"""Sample-quality metrics."""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float
from ott.geometry import costs, pointcloud
from ott.tools import unreg

from ._checks import check_finite, check_floating


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


def wasserstein(
    x: Float[Array, " n *dims"], y: Float[Array, " n *dims"], *, p: float | int = 2.0
) -> Float[Array, ""]:
    r"""The exact $p$-Wasserstein distance between two empirical distributions of the
    same size, $W_p = \big(\min_\pi \tfrac1n \sum_i \|x_i - y_{\pi(i)}\|^p\big)^{1/p}$,
    from the optimal assignment (ott-jax's Hungarian solver).

    The cost grows as $O(n^3)$: on 2 CPU cores about 0.4 s for 512 points, 3 s for
    1000 and 20 s for 2000. Examples with several axes are flattened.

    **Arguments:**

    - `x`, `y`: samples of shape `(n, *dims)` with the same `n` and `dims` (subsample
      the larger one for unequal sizes).
    - `p`: the order, `p >= 1` (1 for $W_1$, 2 for $W_2$).
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim < 2 or x.shape != y.shape:
        raise ValueError(
            "`wasserstein` needs two samples of one shape (n, *dims) with n points "
            f"each; got shapes {x.shape} and {y.shape}. Subsample the larger sample."
        )
    if not p >= 1:
        raise ValueError(f"`p` must be >= 1, got {p}.")
    if x.shape[0] < 1:
        raise ValueError("`wasserstein` needs at least one point in each sample.")
    for name, sample in (("x", x), ("y", y)):
        check_floating(sample, name)
        check_finite(sample, name)
    y = y.astype(x.dtype)
    return _wasserstein(x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1), float(p))


@functools.partial(jax.jit, static_argnums=2)
def _wasserstein(x, y, p):
    if p == 2.0:
        cost_fn = costs.SqEuclidean()
    else:
        cost_fn = costs.EuclideanP(p=p)
    cost, _ = unreg.hungarian(pointcloud.PointCloud(x, y, cost_fn=cost_fn))
    return jnp.maximum(cost, 0) ** (1 / p)
