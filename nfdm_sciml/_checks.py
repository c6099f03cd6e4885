"""Input validation used at the public entry points.

Shapes and dtypes are checked at trace time with `ValueError`/`TypeError`. Values
(finiteness, `t` in `[0, 1]`) are checked on the host when the array is concrete, and
with `eqx.error_if` when it is traced, so that bad input fails loudly in both cases.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)  # pyright: ignore[reportAttributeAccessIssue]


def check_floating(x, name: str) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(
            f"`{name}` must be a floating-point array, but has dtype "
            f"{jnp.result_type(x)}; convert it with `jnp.asarray({name}, "
            "dtype=jnp.float32)` (integer data such as pixels should first be "
            "scaled to [-1, 1])."
        )


def check_shape(x, expected: Sequence[int], name: str) -> None:
    if tuple(jnp.shape(x)) != tuple(expected):
        raise ValueError(
            f"`{name}` must have shape {tuple(expected)}, but has shape "
            f"{tuple(jnp.shape(x))}. Per-example methods act on one unbatched example; "
            "use `jax.vmap` over a batch."
        )


def check_time(t, name: str = "t") -> Array:
    """Checks that `t` is a floating scalar in `[0, 1]` and returns it as an array."""
    check_floating(t, name)
    if jnp.ndim(t) != 0:
        raise ValueError(
            f"`{name}` must be a scalar time (shape ()), but has shape "
            f"{jnp.shape(t)}; call per-example methods under `jax.vmap`."
        )
    t = jnp.asarray(t)
    bad = (t < 0) | (t > 1) | ~jnp.isfinite(t)
    message = f"`{name}` must lie in [0, 1] (t = 0 is data, t = 1 is noise)."
    if _is_traced(t):
        return eqx.error_if(t, bad, message)
    if bool(bad):
        raise ValueError(message + f" Got {float(t)}.")
    return t


def check_finite(x, name: str) -> Array:
    """Raises if `x` holds a NaN or an infinity (on the host when possible)."""
    x = jnp.asarray(x)
    message = (
        f"`{name}` contains NaN or infinite values; remove or impute them before "
        "passing the data in."
    )
    if _is_traced(x):
        return eqx.error_if(x, ~jnp.all(jnp.isfinite(x)), message)
    # A concrete array is checked with NumPy: under an outer trace (a constant closed
    # over in a `lax.scan`) a jnp reduction of it would itself be traced.
    count = int(np.sum(~np.isfinite(np.asarray(x))))
    if count:
        raise ValueError(message + f" ({count} non-finite entries found.)")
    return x


def check_batch(xs, data_shape: Sequence[int], name: str = "x") -> Array:
    """Validates a batch of examples against the model's `data_shape`."""
    check_floating(xs, name)
    shape = tuple(jnp.shape(xs))
    if shape[1:] != tuple(data_shape) or len(shape) != len(data_shape) + 1:
        raise ValueError(
            f"`{name}` must be a batch of shape (batch, *{tuple(data_shape)}) for this "
            f"model, but has shape {shape}. Add a leading batch axis for one example, "
            "or check that the data has the dimension the model was built for."
        )
    if shape[0] == 0:
        raise ValueError(f"`{name}` is an empty batch; pass at least one example.")
    return check_finite(xs, name)
