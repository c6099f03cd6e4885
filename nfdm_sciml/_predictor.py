r"""Data predictors $\hat x_\theta(z, t)$ that define the generative process."""

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from ._custom_types import Context, Data, Time
from ._nets import TimeMLP


class AbstractPredictor(eqx.Module):
    """The interface of a data predictor: `predictor(z, t, context) -> x_hat`."""

    @abc.abstractmethod
    def __call__(self, z: Data, t: Time, context: Context = None) -> Data:
        """**Returns:** the predicted data point $\\hat x(z, t)$, shaped as `z`."""


class Predictor(AbstractPredictor):
    r"""An MLP data predictor with the stabilising reparameterisation
    $\hat x = (1 - t)\,z + (t + \delta)\,\mathrm{Net}(z, t)$.

    Near $t = 0$ the prediction is close to $z$ itself, which is nearly the data, so
    the network only corrects it; this keeps early training stable.

    **Arguments:**

    - `data_size`: number of entries of one example.
    - `context_size`: number of entries of the flattened context.
    - `width_size`, `depth`: of the network.
    - `delta`: the offset in $(t + \delta)$.
    - `key`: a JAX PRNG key.
    """

    net: TimeMLP
    delta: float = eqx.field(static=True)

    def __init__(
        self,
        data_size: int,
        *,
        context_size: int = 0,
        width_size: int = 64,
        depth: int = 4,
        delta: float = 0.01,
        key: PRNGKeyArray,
    ):
        if not delta > 0:
            raise ValueError(f"`Predictor` needs delta > 0, got {delta}.")
        self.net = TimeMLP(
            data_size + context_size,
            data_size,
            width_size=width_size,
            depth=depth,
            key=key,
        )
        self.delta = delta

    def __call__(self, z: Data, t: Time, context: Context = None) -> Data:
        out = self.net(t, z, context).astype(z.dtype).reshape(z.shape)
        return (1 - t) * z + (t + self.delta) * out


class FunctionPredictor(AbstractPredictor):
    """Wraps a plain function `fn(z, t, context) -> x_hat` as a predictor.

    Useful for closed-form predictors (for example the exact posterior mean on
    Gaussian data, see `nfdm_sciml.testing`) and for networks written outside Equinox.
    The function is treated as fixed: it has no trainable parameters.
    """

    fn: object = eqx.field(static=True)

    def __call__(self, z: Data, t: Time, context: Context = None) -> Data:
        return jnp.asarray(self.fn(z, t, context))  # pyright: ignore[reportCallIssue]
