r"""Conditional flow matching: the baseline that NFDM-OT and the bridges are measured
against, with independent or optimal-transport couplings of each minibatch."""

import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, PRNGKeyArray

from ._checks import check_batch
from ._couplings import AbstractCoupling, IndependentCoupling
from ._custom_types import Batch, Context, Data, Scalar, Time
from ._nets import TimeMLP


class FlowMatching(eqx.Module):
    r"""A generative ODE trained by conditional flow matching (Lipman et al. 2023;
    with a minibatch OT coupling, Tong et al. and Pooladian et al. 2023).

    On our clock (data at $t = 0$, noise at $t = 1$) a data point $x$ and a noise
    sample $n \sim \mathcal{N}(0, I)$ are paired by `coupling`, and the velocity
    network $v_\theta(z, t)$ regresses the straight-line velocity:
    $$\mathcal{L} = \mathbb{E}\,\|v_\theta(z_t, t) - (n - x)\|^2, \qquad
    z_t = (1 - t)\,x + t\,n + \sigma\,\xi.$$
    With [`nfdm_sciml.IndependentCoupling`][] this is plain conditional flow matching
    (I-CFM); with [`nfdm_sciml.ExactOTCoupling`][] or a Sinkhorn coupling it is
    minibatch OT flow matching (OT-CFM), whose paths are straighter. Sample it with
    [`nfdm_sciml.sample_ode`][]; train it with [`nfdm_sciml.Trainer`][].

    **Arguments:**

    - `data_shape`: the shape of one example.
    - `key`: a JAX PRNG key for the network's initialisation.
    - `coupling`: how each minibatch of noise is paired with the data.
    - `sigma`: the constant noise $\sigma \ge 0$ around the conditional paths.
    - `width_size`, `depth`: of the [`nfdm_sciml.TimeMLP`][] velocity network (the
      same network as the NFDM predictor of [`nfdm_sciml.build_model`][]).
    - `from_data`: if `True`, the source at $t = 1$ is a second data set instead of
      noise (the bridge baseline): batches are then pairs of shape
      `(batch, 2, *data_shape)` as for [`nfdm_sciml.NeuralFlowBridge`][], and
      sampling starts from source samples (`sample_ode(..., z1=sources)`).
    """

    velocity: TimeMLP
    coupling: AbstractCoupling
    sigma: float = eqx.field(static=True)
    data_shape: tuple[int, ...] = eqx.field(static=True)
    from_data: bool = eqx.field(static=True)

    def __init__(
        self,
        data_shape: Sequence[int],
        *,
        key: PRNGKeyArray,
        coupling: AbstractCoupling | None = None,
        sigma: float = 0.0,
        width_size: int = 64,
        depth: int = 4,
        from_data: bool = False,
    ):
        self.from_data = bool(from_data)
        self.data_shape = tuple(int(n) for n in data_shape)
        if not self.data_shape or any(n <= 0 for n in self.data_shape):
            raise ValueError(
                "`data_shape` must be the non-empty shape of one example, e.g. (2,); "
                f"got {self.data_shape}."
            )
        if not sigma >= 0:
            raise ValueError(f"`sigma` must be >= 0, got {sigma}.")
        coupling = IndependentCoupling() if coupling is None else coupling
        if not isinstance(coupling, AbstractCoupling):
            raise TypeError(
                "`coupling` must be an AbstractCoupling such as IndependentCoupling or "
                f"ExactOTCoupling; got {type(coupling).__name__}."
            )
        self.coupling, self.sigma = coupling, float(sigma)
        self.velocity = TimeMLP(
            self.data_size,
            self.data_size,
            width_size=width_size,
            depth=depth,
            key=key,
        )

    @property
    def data_size(self) -> int:
        """Number of entries of one example."""
        return math.prod(self.data_shape)

    def ode_drift(self, z: Data, t: Time, context: Context = None) -> Data:
        r"""The learned velocity $v_\theta(z, t) = \mathrm{d}z/\mathrm{d}t$ (the
        sampler integrates it from $t = 1$ to $t = 0$)."""
        out = self.velocity(t, z, context)
        return out.reshape(self.data_shape).astype(z.dtype)

    def batch_loss(
        self, xs: Batch, *, key: PRNGKeyArray, contexts: Context = None
    ) -> tuple[Scalar, dict[str, Array]]:
        """The flow-matching loss of a batch, with the noise drawn (or, with
        `from_data`, the source samples taken from the pairs) and coupled inside.

        **Returns:** `(loss, {"loss": loss})`.
        """
        nkey, ckey, tkey, skey = jr.split(key, 4)
        if self.from_data:
            pairs = check_batch(xs, (2, *self.data_shape), "pairs")
            xs, noise = pairs[:, 0], pairs[:, 1]
        else:
            xs = check_batch(xs, self.data_shape)
            noise = jr.normal(nkey, xs.shape, dtype=xs.dtype)
        xs, noise = self.coupling(xs, noise, key=ckey)
        ts = jr.uniform(tkey, xs.shape[:1], dtype=xs.dtype)
        wide = ts.reshape((-1,) + (1,) * len(self.data_shape))
        zs = (1 - wide) * xs + wide * noise
        if self.sigma > 0:
            zs = zs + self.sigma * jr.normal(skey, xs.shape, dtype=xs.dtype)
        target = noise - xs
        in_axes = (0, 0, None if contexts is None else 0)
        predicted = jax.vmap(self.ode_drift, in_axes)(zs, ts, contexts)
        per_example = jnp.sum((predicted - target).reshape(xs.shape[0], -1) ** 2, -1)
        loss = jnp.mean(per_example)
        return loss, {"loss": loss}
