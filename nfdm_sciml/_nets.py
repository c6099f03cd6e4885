"""Small networks used by the built-in processes, predictors and volatilities."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


class TimeMLP(eqx.Module):
    """An MLP on the concatenation of flattened inputs and the raw time `t`.

    Time enters as one extra input feature with no embedding, as in the authors' 2D
    recipe. The network must be smooth in `t`: every velocity in this library is a
    `jax.jvp` in `t`, so a discretised time embedding would silently zero it.

    **Arguments:**

    - `in_size`: total size of the flattened inputs, excluding `t`.
    - `out_size`: size of the (flat) output.
    - `width_size`, `depth`: hidden width and number of hidden layers.
    - `activation`: hidden activation (SELU by default, as in the paper's recipe).
    - `key`: a JAX PRNG key for initialisation.
    """

    mlp: eqx.nn.MLP

    def __init__(
        self,
        in_size: int,
        out_size: int,
        *,
        width_size: int = 64,
        depth: int = 4,
        activation: Callable[[Array], Array] = jax.nn.selu,
        key: PRNGKeyArray,
    ):
        if in_size < 0 or out_size <= 0 or width_size <= 0 or depth < 0:
            raise ValueError(
                "`TimeMLP` needs in_size >= 0, out_size > 0, width_size > 0 and "
                f"depth >= 0; got {in_size=}, {out_size=}, {width_size=}, {depth=}."
            )
        self.mlp = eqx.nn.MLP(
            in_size + 1, out_size, width_size, depth, activation=activation, key=key
        )

    def __call__(
        self, t: Float[Array, ""], *inputs: Array | None
    ) -> Float[Array, " out"]:
        # Everything is cast to the weights' dtype so that float32 networks accept
        # float64 data (and vice versa) under strict dtype promotion.
        dtype = self.mlp.layers[0].weight.dtype
        parts = [jnp.ravel(u).astype(dtype) for u in inputs if u is not None]
        parts.append(jnp.reshape(t, (1,)).astype(dtype))
        return self.mlp(jnp.concatenate(parts))
