r"""Bridges between two distributions: a forward process pinned at both ends and the
neural flow bridge model (NFBM) that trains and samples it.

The target sample $x_0$ sits at $t = 0$ and the source sample $x_1$ at $t = 1$; the
source is the process's context. Everything else is NFDM's machinery unchanged: the
bound, the penalties, the samplers and the likelihood estimates, with the source
passed as `contexts`.
"""

from typing import Literal

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import check_batch
from ._constraints import Penalties
from ._couplings import AbstractCoupling, IndependentCoupling
from ._custom_types import Context, Data, Scalar, Time
from ._decoder import GaussianDecoder
from ._flow import NeuralFlowProcess
from ._forward import _check_delta, AbstractGaussianProcess
from ._model import LossTerms, NFDM
from ._nets import TimeMLP
from ._predictor import Predictor
from ._solve import ReverseSolution, sample_ode, sample_sde
from ._volatility import AbstractVolatility, NeuralVolatility


class GaussianBridge(AbstractGaussianProcess):
    r"""A learnable Gaussian forward process pinned at both ends.

    $$\mu = (1 - t)\,x_0 + t\,x_1 + t(1 - t)\,\bar\mu_\phi(x_0, x_1, t), \qquad
    \log\sigma = \log\big(\delta + 2t(1 - t)\big)
    + t(1 - t)\,\bar\ell_\phi(x_0, x_1, t),$$

    so $z_0 = x_0 + \delta\varepsilon$ and $z_1 = x_1 + \delta\varepsilon$ exactly,
    with a spread of about 0.5 in between that the network reshapes. The floor
    $\delta$ at both ends keeps the reverse drift finite. The source sample $x_1$ is the
    `context` argument of every method (same shape as $x_0$).

    **Arguments:**

    - `data_size`: number of entries of one example.
    - `width_size`, `depth`: of the network.
    - `delta`: the noise floor at both ends.
    - `key`: a JAX PRNG key.
    """

    net: TimeMLP
    delta: float = eqx.field(static=True)

    def __init__(
        self,
        data_size: int,
        *,
        width_size: int = 64,
        depth: int = 4,
        delta: float = 0.01,
        key: PRNGKeyArray,
    ):
        _check_delta(delta, "GaussianBridge")
        self.net = TimeMLP(
            2 * data_size, 2 * data_size, width_size=width_size, depth=depth, key=key
        )
        self.delta = delta

    def _source(self, x: Data, context: Context) -> Array:
        if context is None or jnp.size(context) != jnp.size(x):
            raise ValueError(
                "A bridge needs the source sample x1 as `context`, with as many "
                f"entries as x0 ({jnp.size(x)}); got "
                f"{None if context is None else jnp.shape(context)}."
            )
        return jnp.reshape(context, x.shape).astype(x.dtype)

    def mean_and_scale(
        self, t: Time, x: Data, context: Context = None
    ) -> tuple[Data, Data]:
        source = self._source(x, context)
        out = self.net(t, x, source).astype(x.dtype)
        mean_bar, log_scale_bar = jnp.split(out, 2)
        bump = t * (1 - t)
        mu = (1 - t) * x + t * source + bump * mean_bar.reshape(x.shape)
        # A smooth base spread, delta at the ends and about 0.5 at t = 1/2 (a square
        # root of t(1 - t), as in a Brownian bridge, would make the velocity blow up
        # near the ends).
        log_sigma = jnp.log(self.delta + 2 * bump) + bump * log_scale_bar.reshape(
            x.shape
        )
        return mu, jnp.exp(log_sigma)

    def prior_kl(self, eps: Data, x: Data, context: Context = None) -> Scalar:
        r"""Zero: $q(z_1 \mid x_0, x_1) = \mathcal{N}(x_1, \delta^2 I)$ exactly, which
        is the bridge's prior $p(z_1 \mid x_1)$."""
        del eps
        self._source(x, context)
        return jnp.zeros((), x.dtype)


class NeuralFlowBridge(eqx.Module):
    r"""A neural flow bridge model: a stochastic (or deterministic) map from a source
    distribution (at $t = 1$) to a target distribution (at $t = 0$), trained on
    unpaired samples of both.

    Each training batch of targets and sources is paired by `coupling` (independent,
    or minibatch optimal transport: [`nfdm_sciml.ExactOTCoupling`][],
    [`nfdm_sciml.SinkhornCoupling`][]); the model is then an
    [`nfdm_sciml.NFDM`][] whose forward process is a bridge pinned at both ends and
    whose predictor sees the source. The bridge is a [`nfdm_sciml.GaussianBridge`][]
    (`forward="gaussian"`), or that bridge reshaped in between by coupling layers,
    a non-Gaussian bridge ([`nfdm_sciml.NeuralFlowProcess`][] with the
    `GaussianBridge` as its Gaussian part; `forward="spline"` or `"affine"`). Its
    bound is a NELBO of $-\log p(x_0 \mid x_1)$; the reverse process starts at
    $z_1 = x_1 + \delta n$. The penalties of [`nfdm_sciml.Penalties`][] apply unchanged.

    **Arguments:**

    - `data_size`: number of entries of one example.
    - `key`: a JAX PRNG key.
    - `coupling`: how target and source minibatches are paired.
    - `width_size`, `depth`: of every network.
    - `delta`: the noise floor at both ends.
    - `volatility`: $g(t)$; a learned [`nfdm_sciml.NeuralVolatility`][] by default.
    - `forward`: `"gaussian"`, `"spline"` or `"affine"`: the bridge process.
    - `num_layers`, `num_bins`: of the coupling layers of a non-Gaussian bridge.
    """

    model: NFDM
    coupling: AbstractCoupling
    delta: float = eqx.field(static=True)

    def __init__(
        self,
        data_size: int,
        *,
        key: PRNGKeyArray,
        coupling: AbstractCoupling | None = None,
        width_size: int = 64,
        depth: int = 4,
        delta: float = 0.01,
        volatility: AbstractVolatility | None = None,
        forward: Literal["gaussian", "spline", "affine"] = "gaussian",
        num_layers: int = 4,
        num_bins: int = 8,
    ):
        if forward not in ("gaussian", "spline", "affine"):
            raise ValueError(
                "`forward` must be 'gaussian', 'spline' or 'affine' (the bridge "
                f"process); got {forward!r}."
            )
        fkey, pkey, vkey, ckey = jr.split(key, 4)
        process = GaussianBridge(
            data_size, width_size=width_size, depth=depth, delta=delta, key=fkey
        )
        if forward != "gaussian":
            process = NeuralFlowProcess(
                data_size,
                context_size=data_size,
                num_layers=num_layers,
                transform=forward,
                num_bins=num_bins,
                width_size=width_size,
                depth=depth,
                gaussian=process,
                key=ckey,
            )
        predictor = Predictor(
            data_size,
            context_size=data_size,
            width_size=width_size,
            depth=depth,
            delta=delta,
            key=pkey,
        )
        if volatility is None:
            volatility = NeuralVolatility(width_size=width_size, depth=depth, key=vkey)
        self.delta = delta
        self.model = NFDM(
            process,
            predictor,
            volatility,
            GaussianDecoder(delta),
            data_shape=(data_size,),
        )
        coupling = IndependentCoupling() if coupling is None else coupling
        if not isinstance(coupling, AbstractCoupling):
            raise TypeError(
                "`coupling` must be an AbstractCoupling such as IndependentCoupling or "
                f"ExactOTCoupling; got {type(coupling).__name__}."
            )
        self.coupling = coupling

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.model.data_shape

    def batch_loss(
        self,
        pairs: Float[Array, " batch 2 dims"],
        *,
        key: PRNGKeyArray,
        penalties: Penalties | None = None,
    ) -> tuple[Scalar, LossTerms]:
        """The bridge objective on a batch of unpaired samples.

        **Arguments:**

        - `pairs`: shape `(batch, 2, data_size)`: `pairs[:, 0]` are target samples
          $x_0$ and `pairs[:, 1]` source samples $x_1$, drawn independently; the
          coupling pairs them.
        - `key`: a JAX PRNG key.
        - `penalties`: optional [`nfdm_sciml.Penalties`][].

        **Returns:** `(loss, terms)` as [`nfdm_sciml.NFDM.batch_loss`][].
        """
        pairs = check_batch(pairs, (2, *self.data_shape), "pairs")
        ckey, lkey = jr.split(key)
        targets, sources = self.coupling(pairs[:, 0], pairs[:, 1], key=ckey)
        return self.model.batch_loss(
            targets, key=lkey, contexts=sources, penalties=penalties
        )

    def sample(
        self,
        sources: Float[Array, " n dims"],
        *,
        key: PRNGKeyArray,
        deterministic: bool = False,
        num_steps: int = 200,
        num_saves: int | None = None,
    ) -> ReverseSolution:
        """Carries source samples to the target distribution: the reverse SDE (or the
        ODE with `deterministic=True`) from $z_1 = x_1 + \\delta n$ at $t = 1$ to
        $t = 0$, with fixed steps.

        **Returns:** a [`nfdm_sciml.ReverseSolution`][].
        """
        sources = check_batch(sources, self.data_shape, "sources")
        nkey, skey = jr.split(key)
        noise = jr.normal(nkey, sources.shape, dtype=sources.dtype)
        z1 = sources + self.delta * noise
        if deterministic:
            return sample_ode(
                self.model,
                key=skey,
                solver="euler",
                num_steps=num_steps,
                num_saves=num_saves,
                contexts=sources,
                z1=z1,
            )
        return sample_sde(
            self.model,
            key=skey,
            num_steps=num_steps,
            num_saves=num_saves,
            contexts=sources,
            z1=z1,
        )
