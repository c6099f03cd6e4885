import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def _check_arguments(
    inputs: Array,
    width_logits: Array,
    height_logits: Array,
    derivative_params: Array,
    bound: float,
    min_bin_width: float,
    min_bin_height: float,
    min_derivative: float,
) -> None:
    if inputs.ndim != 1:
        raise ValueError(
            "`inputs` must be one-dimensional with shape (n,), but it has shape "
            f"{inputs.shape}; call the spline on one example and `jax.vmap` over more."
        )
    if not jnp.issubdtype(inputs.dtype, jnp.floating):
        raise ValueError(
            f"`inputs` must have a floating dtype, but it has dtype {inputs.dtype}; "
            "cast it to float32 or float64 first."
        )
    (n,) = inputs.shape
    if (
        width_logits.ndim != 2
        or width_logits.shape[0] != n
        or width_logits.shape[1] < 1
    ):
        raise ValueError(
            f"`width_logits` must have shape (n, k) = ({n}, k) with k >= 1 bins to "
            f"match `inputs`, but it has shape {width_logits.shape}; give one row of "
            "bin logits per input."
        )
    num_bins = width_logits.shape[1]
    if height_logits.shape != width_logits.shape:
        raise ValueError(
            "`height_logits` must have the same shape as `width_logits`, "
            f"{width_logits.shape}, but it has shape {height_logits.shape}; give one "
            "height logit per bin."
        )
    if derivative_params.shape != (n, num_bins - 1):
        raise ValueError(
            "`derivative_params` holds the derivatives at the k - 1 interior knots "
            f"only, so it must have shape {(n, num_bins - 1)}, but it has shape "
            f"{derivative_params.shape}; drop the two boundary knots, whose "
            "derivatives are fixed to 1."
        )
    if not bound > 0:
        raise ValueError(
            f"`bound` must be positive, but it is {bound}; pass a value > 0."
        )
    for name, minimum in (
        ("min_bin_width", min_bin_width),
        ("min_bin_height", min_bin_height),
    ):
        if not 0 <= minimum * num_bins < 1:
            raise ValueError(
                f"`{name}` times the number of bins must lie in [0, 1), but it is "
                f"{minimum} * {num_bins}; lower `{name}` or use fewer bins."
            )
    if not 0 < min_derivative < 1:
        raise ValueError(
            f"`min_derivative` must lie in (0, 1), but it is {min_derivative}; a value "
            "of at least 1 would make the identity map unreachable, so pick e.g. 1e-3."
        )


def _knots(
    logits: Float[Array, "n k"], min_fraction: float, bound: float
) -> Float[Array, "n k+1"]:
    n, num_bins = logits.shape
    fractions = min_fraction + (1 - min_fraction * num_bins) * jax.nn.softmax(logits)
    interior = -bound + 2 * bound * jnp.cumsum(fractions, axis=1)[:, :-1]
    # The edges are set exactly rather than taken from the cumulative sum, whose
    # rounding would leave a sliver of [-bound, bound] outside every bin.
    edge = jnp.full((n, 1), bound, dtype=logits.dtype)
    return jnp.concatenate([-edge, interior, edge], axis=1)


def _derivatives(
    params: Float[Array, "n m"], min_derivative: float
) -> Float[Array, "n m+2"]:
    # softplus(shift) = 1 - min_derivative, so zero parameters give derivative 1.
    shift = math.log(math.expm1(1 - min_derivative))
    interior = min_derivative + jax.nn.softplus(params + shift)
    # Unit derivatives at the edges make the map C^1 where it joins the identity.
    return jnp.pad(interior, ((0, 0), (1, 1)), constant_values=1.0)


def _log_derivative(
    xi: Float[Array, " n"],
    slope: Float[Array, " n"],
    derivative_lo: Float[Array, " n"],
    derivative_hi: Float[Array, " n"],
) -> Float[Array, " n"]:
    xi_1m = xi * (1 - xi)
    numerator = slope**2 * (
        derivative_hi * xi**2 + 2 * slope * xi_1m + derivative_lo * (1 - xi) ** 2
    )
    denominator = slope + (derivative_lo + derivative_hi - 2 * slope) * xi_1m
    return jnp.log(numerator) - 2 * jnp.log(denominator)


def _gather(values: Float[Array, "n m"], index: Int[Array, " n"]) -> Float[Array, " n"]:
    # A one-hot sum rather than a gather: its derivatives stay elementwise, which
    # roughly halves compilation time under `jax.grad` and `jax.jvp`.
    one_hot = index[:, None] == jnp.arange(values.shape[1])[None, :]
    return jnp.sum(jnp.where(one_hot, values, 0.0), axis=1)


def rational_quadratic_spline(
    inputs: Float[Array, " n"],
    width_logits: Float[Array, "n k"],
    height_logits: Float[Array, "n k"],
    derivative_params: Float[Array, "n k-1"],
    *,
    bound: float,
    inverse: bool = False,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
    r"""Elementwise monotone rational-quadratic spline (Durkan et al., 2019).

    Each input $x_i$ is mapped by its own strictly increasing spline on
    $[-B, B]$, $B$ = `bound`, made of $k$ rational-quadratic pieces, and by the
    identity outside $[-B, B]$. Bin widths and heights are softmaxes of the logits,
    mixed so that each bin covers at least `min_bin_width` (`min_bin_height`) of the
    interval. The derivatives at the $k - 1$ interior knots are
    $\delta_{\min} + \operatorname{softplus}(p + c)$ with
    $c = \log(e^{1 - \delta_{\min}} - 1)$, and those at $\pm B$ are fixed to 1, so
    the map is $C^1$ where it meets the identity.

    All-zero logits and derivative parameters give uniform bins with unit
    derivatives, which is the identity map with log-determinant 0 (up to rounding).
    This lets a caller switch the transform off by scaling its parameters to zero.

    Inside bin $j$, with $\xi = (x - x_j) / w_j$, slope $s_j = h_j / w_j$ and knot
    derivatives $d_j, d_{j+1}$,

    $$y = y_j + h_j \frac{s_j \xi^2 + d_j \xi(1 - \xi)}
        {s_j + (d_{j+1} + d_j - 2 s_j)\, \xi(1 - \xi)}.$$

    The inverse solves this quadratic in $\xi$ in closed form.

    **Arguments:**

    - `inputs`: the points to transform, one per spline.
    - `width_logits`: unnormalised bin widths, one row of $k$ per input.
    - `height_logits`: unnormalised bin heights, one row of $k$ per input.
    - `derivative_params`: unconstrained derivatives at the $k - 1$ interior knots.
    - `bound`: half-width $B > 0$ of the interval the spline acts on. A Python
        float, fixed at trace time.
    - `inverse`: whether to apply the inverse map instead.
    - `min_bin_width`: smallest fraction of the interval a bin may span in $x$.
    - `min_bin_height`: smallest fraction of the interval a bin may span in $y$.
    - `min_derivative`: smallest derivative at an interior knot, in $(0, 1)$.

    **Returns:**

    A tuple `(outputs, log_det)`: the transformed points and, elementwise,
    $\log |\mathrm{d}\,\text{outputs} / \mathrm{d}\,\text{inputs}|$ of the map
    applied. For `inverse=True` that is the log-derivative of the inverse map, the
    negative of the forward one at the output. Both have the dtype of `inputs`; the
    parameters are cast to it.

    !!! warning

        Where the spline is nearly flat, its inverse is ill-conditioned: with random
        parameters the derivative can fall to ~1e-6, and then the rounding of a
        float32 input can move the inverse by 0.1 or more. Use float64, or raise
        `min_bin_height` and `min_derivative`, if the inverse must be accurate there.
    """
    _check_arguments(
        inputs,
        width_logits,
        height_logits,
        derivative_params,
        bound,
        min_bin_width,
        min_bin_height,
        min_derivative,
    )
    dtype = inputs.dtype
    x_knots = _knots(width_logits.astype(dtype), min_bin_width, bound)
    y_knots = _knots(height_logits.astype(dtype), min_bin_height, bound)
    derivatives = _derivatives(derivative_params.astype(dtype), min_derivative)

    # Points outside the interval are replaced by 0 before the spline sees them, so
    # that the untaken branch of the final `where` has finite values and gradients.
    inside: Bool[Array, " n"] = (inputs >= -bound) & (inputs <= bound)
    safe_inputs = jnp.where(inside, inputs, 0.0)
    search_knots = y_knots if inverse else x_knots
    # A sum of comparisons rather than `searchsorted`: each input has its own knots.
    index = jnp.sum(safe_inputs[:, None] >= search_knots[:, 1:-1], axis=1)
    x_lo = _gather(x_knots, index)
    y_lo = _gather(y_knots, index)
    width = _gather(x_knots, index + 1) - x_lo
    height = _gather(y_knots, index + 1) - y_lo
    derivative_lo = _gather(derivatives, index)
    derivative_hi = _gather(derivatives, index + 1)
    slope = height / width
    curvature = derivative_lo + derivative_hi - 2 * slope

    if inverse:
        # Clearing the denominator gives a xi^2 + b xi + c = 0 with c <= 0; of the
        # two roots, the one in [0, 1] is taken in the form that avoids cancellation.
        offset = safe_inputs - y_lo
        a = height * (slope - derivative_lo) + offset * curvature
        b = height * derivative_lo - offset * curvature
        c = -slope * offset
        discriminant = jnp.maximum(b**2 - 4 * a * c, 0.0)
        xi = 2 * c / (-b - jnp.sqrt(discriminant))
        spline = x_lo + xi * width
        log_det = -_log_derivative(xi, slope, derivative_lo, derivative_hi)
    else:
        xi = (safe_inputs - x_lo) / width
        xi_1m = xi * (1 - xi)
        spline = y_lo + height * (slope * xi**2 + derivative_lo * xi_1m) / (
            slope + curvature * xi_1m
        )
        log_det = _log_derivative(xi, slope, derivative_lo, derivative_hi)

    outputs = jnp.where(inside, spline, inputs)
    log_det = jnp.where(inside, log_det, 0.0)
    return outputs, log_det
