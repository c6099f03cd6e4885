r"""Decoders $p(x \mid z_0)$ that give the reconstruction term of the bound."""

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp

from ._custom_types import Data, Scalar


class AbstractDecoder(eqx.Module):
    """The interface of a decoder: `decoder.nll(x, z0) -> -log p(x | z0)`."""

    @abc.abstractmethod
    def nll(self, x: Data, z0: Data) -> Scalar:
        """**Returns:** $-\\log p(x \\mid z_0)$ in nats, summed over dimensions."""

    @abc.abstractmethod
    def sample(self, z0: Data) -> Data:
        """**Returns:** the decoder's point estimate of $x$ given $z_0$."""


class GaussianDecoder(AbstractDecoder):
    r"""$p(x \mid z_0) = \mathcal{N}(x; z_0, s^2 I)$ for continuous data.

    With $s = \delta$, the forward process's noise floor, and $z_0 = x + \delta
    \varepsilon$, the reconstruction term is the constant
    $\tfrac d2 \log(2\pi e \delta^2)$ in expectation.
    """

    scale: float = eqx.field(static=True, default=0.01)

    def __check_init__(self):
        if not self.scale > 0:
            raise ValueError(f"`GaussianDecoder` needs scale > 0, got {self.scale}.")

    def nll(self, x: Data, z0: Data) -> Scalar:
        r = (x - z0) / self.scale
        return 0.5 * jnp.sum(r**2) + x.size * (
            math.log(self.scale) + 0.5 * math.log(2 * math.pi)
        )

    def sample(self, z0: Data) -> Data:
        return z0


class DiscretisedGaussianDecoder(AbstractDecoder):
    r"""A decoder for integer data on `num_bins` levels, represented as bin centres
    $v_k = \text{low} + k\,(\text{high} - \text{low})/(\text{num\_bins} - 1)$.

    $p(x = v_k \mid z_0) \propto \mathcal{N}(z_0; v_k, s^2)$, normalised over the bins
    of each entry. The bound is then a bound on the discrete log-likelihood: bits per
    dimension need no dequantisation offset. Data must already be mapped to the bin
    centres (for 8-bit pixels: `x = k / 127.5 - 1`).
    """

    num_bins: int = eqx.field(static=True, default=256)
    low: float = eqx.field(static=True, default=-1.0)
    high: float = eqx.field(static=True, default=1.0)
    scale: float = eqx.field(static=True, default=0.01)

    def __check_init__(self):
        if self.num_bins < 2 or not self.low < self.high or not self.scale > 0:
            raise ValueError(
                "`DiscretisedGaussianDecoder` needs num_bins >= 2, low < high and "
                f"scale > 0; got {self.num_bins}, {self.low}, {self.high}, "
                f"{self.scale}."
            )

    def _centres(self, dtype) -> jax.Array:
        return jnp.linspace(self.low, self.high, self.num_bins, dtype=dtype)

    def bin_index(self, x: Data) -> jax.Array:
        """**Returns:** the integer level of each entry of `x` (nearest bin centre)."""
        width = (self.high - self.low) / (self.num_bins - 1)
        k = jnp.round((x - self.low) / width)
        return jnp.clip(k, 0, self.num_bins - 1).astype(jnp.int32)

    def nll(self, x: Data, z0: Data) -> Scalar:
        centres = self._centres(z0.dtype)
        centres = centres.reshape((1,) * z0.ndim + (-1,))
        logits = -0.5 * ((z0[..., None] - centres) / self.scale) ** 2
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        k = self.bin_index(x)
        return -jnp.sum(jnp.take_along_axis(log_probs, k[..., None], axis=-1))

    def sample(self, z0: Data) -> Data:
        return self._centres(z0.dtype)[self.bin_index(z0)]
