r"""Volatility $g(t) > 0$ of the conditional and generative SDEs.

Any positive $g$ gives a valid bound; a learned $g$ is trained jointly with the forward
process and predictor. Each volatility is a function of the scalar time only.
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from ._custom_types import Scalar, Time
from ._nets import TimeMLP


class AbstractVolatility(eqx.Module):
    """The interface of a volatility: `g(t) -> scalar > 0`."""

    @abc.abstractmethod
    def __call__(self, t: Time) -> Scalar:
        """**Returns:** $g(t) > 0$, a scalar array."""


class ConstantVolatility(AbstractVolatility):
    """A fixed volatility $g(t) = $ `value` for all $t$."""

    value: float = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        if not self.value > 0:
            raise ValueError(
                f"`ConstantVolatility` needs value > 0 (g = 0 makes the bound "
                f"undefined); got {self.value}."
            )

    def __call__(self, t: Time) -> Scalar:
        return jnp.full((), self.value, dtype=jnp.result_type(t))


class LinearSNRVolatility(AbstractVolatility):
    r"""$g^2(t) = \gamma'(t)\,\mathrm{sigmoid}(\gamma(t))$ for the linear schedule
    $\gamma(t) = \gamma_{\min} + (\gamma_{\max} - \gamma_{\min})\,t$.

    With [`nfdm_sciml.VariancePreserving`][] of the same schedule this makes the forward
    SDE the variance-preserving SDE, $\mathrm{d}z = -\tfrac12\gamma'\sigma^2 z\,
    \mathrm{d}t + g\,\mathrm{d}w$, independent of $x$.
    """

    gamma_min: float = eqx.field(static=True, default=-10.0)
    gamma_max: float = eqx.field(static=True, default=10.0)

    def __check_init__(self):
        if not self.gamma_min < self.gamma_max:
            raise ValueError(
                "`LinearSNRVolatility` needs gamma_min < gamma_max; got "
                f"{self.gamma_min} and {self.gamma_max}."
            )

    def __call__(self, t: Time) -> Scalar:
        slope = self.gamma_max - self.gamma_min
        return jnp.sqrt(slope * jax.nn.sigmoid(self.gamma_min + slope * t))


class NeuralVolatility(AbstractVolatility):
    r"""A learned volatility $g(t) = \mathrm{softplus}(\mathrm{Net}(t)) + g_{\min}$.

    The floor $g_{\min}$ keeps $g$ strictly positive in floating point (softplus alone
    underflows to zero for very negative inputs), so the weight $1/(2g^2)$ of the bound
    never divides by zero.

    **Arguments:**

    - `width_size`, `depth`: of the network (64 and 4 in the paper's 2D recipe).
    - `floor`: the smallest value $g$ can take.
    - `key`: a JAX PRNG key.
    """

    net: TimeMLP
    floor: float = eqx.field(static=True)

    def __init__(
        self,
        *,
        width_size: int = 64,
        depth: int = 4,
        floor: float = 1e-4,
        key: PRNGKeyArray,
    ):
        if not floor > 0:
            raise ValueError(f"`NeuralVolatility` needs floor > 0, got {floor}.")
        self.net = TimeMLP(0, 1, width_size=width_size, depth=depth, key=key)
        self.floor = floor

    def __call__(self, t: Time) -> Scalar:
        raw = self.net(t)[0].astype(jnp.result_type(t))
        return jax.nn.softplus(raw) + self.floor
