"""Array aliases shared by every module, so that signatures read the same everywhere.

One example is unbatched: `Data` has the shape of a single data point (a vector for
tabular data, `(channels, height, width)` for images) and `Time` is a scalar array.
Callers `jax.vmap` over examples.
"""

from typing import Any, TypeAlias

from jaxtyping import Array, Float, PRNGKeyArray


Data: TypeAlias = Float[Array, "*dims"]
Time: TypeAlias = Float[Array, ""]
Scalar: TypeAlias = Float[Array, ""]
Batch: TypeAlias = Float[Array, " batch *dims"]
# A context is whatever a process is conditioned on besides `x` (a bridge's source
# sample, an encoded time series, a label). `None` means "unconditional".
Context: TypeAlias = Any
Key: TypeAlias = PRNGKeyArray
