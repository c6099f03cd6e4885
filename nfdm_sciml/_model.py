r"""The neural flow diffusion model: forward process, predictor, volatility, decoder."""

import math
from collections.abc import Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import check_batch, check_floating, check_shape, check_time
from ._constraints import PathPoint, Penalties
from ._custom_types import Batch, Context, Data, Scalar, Time
from ._decoder import AbstractDecoder, GaussianDecoder
from ._forward import AbstractForwardProcess
from ._predictor import AbstractPredictor
from ._volatility import AbstractVolatility


class LossTerms(eqx.Module):
    r"""The three terms of the negative ELBO, in nats (per example, or batch means).

    - `diffusion`: $\mathcal{L}_\text{diff}$, the KL between the conditional and
      generative path measures.
    - `prior`: $\mathcal{L}_\text{prior} = \mathrm{KL}(q(z_1 \mid x) \,\|\, p(z_1))$.
    - `reconstruction`: $\mathcal{L}_\text{rec} = -\log p(x \mid z_0)$.
    - `penalties`: the unweighted value of each training penalty by name (see
      [`nfdm_sciml.Penalties`][]); empty without penalties. Not part of the bound.
    """

    diffusion: Float[Array, "*batch"]
    prior: Float[Array, "*batch"]
    reconstruction: Float[Array, "*batch"]
    penalties: dict[str, Float[Array, "*batch"]] = eqx.field(default_factory=dict)

    @property
    def nelbo(self) -> Float[Array, "*batch"]:
        """The negative ELBO, the sum of the three terms."""
        return self.diffusion + self.prior + self.reconstruction


class NFDM(eqx.Module):
    r"""A neural flow diffusion model (Bartosh, Vetrov and Naesseth, NeurIPS 2024).

    The forward process $q(z_t \mid x)$, given by $z_t = F(\varepsilon, t, x)$, has the
    conditional reverse-time SDE $\mathrm{d}z = \hat f(z, t, x)\,\mathrm{d}t +
    g(t)\,\mathrm{d}\bar w$ with $\hat f = f - \tfrac{g^2}{2}\nabla_z\log q(z_t\mid x)$.
    The generative process replaces $x$ by the prediction $\hat x_\theta(z, t)$ and
    starts at $z_1 \sim \mathcal{N}(0, I)$. Training minimises the simulation-free
    bound
    $$-\log p(x) \le \mathbb{E}_{t, \varepsilon}\Big[\tfrac{1}{2g^2(t)}
    \big\|\hat f(z_t, t, x) - \hat f(z_t, t, \hat x_\theta(z_t, t))\big\|^2\Big]
    + \mathrm{KL}(q(z_1\mid x)\,\|\,\mathcal{N}(0, I)) - \mathbb{E}\log p(x\mid z_0)$$
    over all of $F$, $\hat x_\theta$ and $g$ at once.

    Per-example methods act on one unbatched example (batch them with `jax.vmap`);
    `batch_loss` acts on a batch.

    **Arguments:**

    - `forward`: the forward process $F$.
    - `predictor`: the data predictor $\hat x_\theta$.
    - `volatility`: $g(t)$.
    - `decoder`: $p(x \mid z_0)$; defaults to a Gaussian decoder of scale 0.01.
    - `data_shape`: the shape of one example, e.g. `(2,)`.
    """

    forward: AbstractForwardProcess
    predictor: AbstractPredictor
    volatility: AbstractVolatility
    decoder: AbstractDecoder
    data_shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        forward: AbstractForwardProcess,
        predictor: AbstractPredictor,
        volatility: AbstractVolatility,
        decoder: AbstractDecoder | None = None,
        *,
        data_shape: Sequence[int],
    ):
        for value, cls, name in (
            (forward, AbstractForwardProcess, "forward"),
            (predictor, AbstractPredictor, "predictor"),
            (volatility, AbstractVolatility, "volatility"),
        ):
            if not isinstance(value, cls):
                raise TypeError(
                    f"`{name}` must be an instance of `{cls.__name__}`, got "
                    f"{type(value).__name__}; see the built-in classes in nfdm_sciml."
                )
        if decoder is not None and not isinstance(decoder, AbstractDecoder):
            raise TypeError(
                f"`decoder` must be an `AbstractDecoder`, got {type(decoder).__name__}."
            )
        data_shape = tuple(int(n) for n in data_shape)
        if len(data_shape) == 0 or any(n <= 0 for n in data_shape):
            raise ValueError(
                "`data_shape` must be the non-empty shape of one example with positive "
                f"sizes, e.g. (2,); got {data_shape}."
            )
        self.forward = forward
        self.predictor = predictor
        self.volatility = volatility
        self.decoder = GaussianDecoder() if decoder is None else decoder
        self.data_shape = data_shape

    @property
    def data_size(self) -> int:
        """Number of entries of one example (the $D$ of bits per dimension)."""
        return math.prod(self.data_shape)

    def _check_example(self, name: str, *arrays) -> None:
        for array, label in zip(arrays, name.split(","), strict=True):
            check_floating(array, label)
            check_shape(array, self.data_shape, label)

    def diffusion_loss(
        self, x: Data, t: Time, eps: Data, context: Context = None
    ) -> Scalar:
        r"""$\frac{1}{2g^2}\|\hat f(z_t, t, x) - \hat f(z_t, t, \hat x_\theta)\|^2$ at
        $z_t = F(\varepsilon, t, x)$: the single-sample diffusion term, in nats."""
        self._check_example("x,eps", x, eps)
        return self._diffusion_loss(x, check_time(t), eps, context)

    def _diffusion_loss(self, x, t, eps, context):
        return self._diffusion_terms(x, t, eps, context)[0]

    def _diffusion_terms(self, x, t, eps, context):
        # Unchecked: for callers that draw t in [0, 1] themselves (the training loss).
        # Also returns the forward sample and its velocity, for the penalties.
        z, velocity, score = self.forward.sample_terms(eps, t, x, context)
        x_hat = self.predictor(z, t, context)
        velocity_hat, score_hat = self.forward.velocity_and_score(z, t, x_hat, context)
        g2 = self.volatility(t) ** 2
        # Reverse-time drifts f - g^2/2 * score are compared, as in the authors' code.
        gap = (velocity - velocity_hat) - 0.5 * g2 * (score - score_hat)
        return 0.5 * jnp.sum(gap**2) / g2, z, velocity

    def path_point(
        self, x: Data, t: Time, eps: Data, context: Context = None
    ) -> PathPoint:
        """The [`nfdm_sciml.PathPoint`][] at $z_t = F(\varepsilon, t, x)$ that the
        penalties see: the sample, its conditional velocity, the forward path through
        it and the generative ODE drift."""
        self._check_example("x,eps", x, eps)
        t = check_time(t)
        z, velocity = self.forward.sample_terms(eps, t, x, context)[:2]
        return self._path_point(x, t, eps, context, z, velocity)

    def _path_point(self, x, t, eps, context, z, velocity) -> PathPoint:
        return PathPoint(
            t,
            z,
            velocity,
            context,
            path=lambda s: self.forward(eps, s, x, context),
            drift=lambda y, s, freeze_predictor=False: self._ode_drift(
                y, s, context, freeze_predictor
            ),
        )

    def prior_loss(self, x: Data, eps: Data, context: Context = None) -> Scalar:
        """$\\mathrm{KL}(q(z_1 \\mid x) \\| \\mathcal{N}(0, I))$ (see
        `AbstractForwardProcess.prior_kl`)."""
        self._check_example("x,eps", x, eps)
        return self.forward.prior_kl(eps, x, context)

    def reconstruction_loss(
        self, x: Data, eps: Data, context: Context = None
    ) -> Scalar:
        """$-\\log p(x \\mid z_0)$ at $z_0 = F(\\varepsilon, 0, x)$."""
        self._check_example("x,eps", x, eps)
        z0 = self.forward(eps, jnp.zeros((), x.dtype), x, context)
        return self.decoder.nll(x, z0)

    def loss_terms(
        self, x: Data, *, key: PRNGKeyArray, context: Context = None
    ) -> LossTerms:
        """The three bound terms for one example, with $t \\sim U(0, 1)$ and one noise
        draw shared by the terms.

        **Returns:** a [`nfdm_sciml.LossTerms`][] of scalars.
        """
        tkey, ekey = jr.split(key)
        t = jr.uniform(tkey, (), dtype=x.dtype)
        eps = jr.normal(ekey, x.shape, dtype=x.dtype)
        self._check_example("x", x)
        return LossTerms(
            self._diffusion_loss(x, t, eps, context),
            self.prior_loss(x, eps, context),
            self.reconstruction_loss(x, eps, context),
        )

    def nelbo(self, x: Data, *, key: PRNGKeyArray, context: Context = None) -> Scalar:
        """A single-sample unbiased estimate of the negative ELBO of `x`, in nats."""
        return self.loss_terms(x, key=key, context=context).nelbo

    def batch_loss(
        self,
        xs: Batch,
        *,
        key: PRNGKeyArray,
        contexts: Context = None,
        objective: Literal["nelbo", "diffusion"] = "nelbo",
        penalties: Penalties | None = None,
    ) -> tuple[Scalar, LossTerms]:
        """The training objective: the batch mean of the single-sample NELBO, plus
        weighted penalties if any.

        **Arguments:**

        - `xs`: a batch of examples, shape `(batch, *data_shape)`.
        - `key`: a JAX PRNG key; each example gets its own time $t \\sim U(0, 1)$
          and noise, the noise shared by its three terms.
        - `contexts`: per-example contexts with a leading batch axis, or `None`.
        - `objective`: `"nelbo"` (all three terms) or `"diffusion"` (the diffusion
          term alone, as in the authors' 2D code). The latter is only equivalent when
          the prior and reconstruction terms do not depend on the parameters, as for
          [`nfdm_sciml.NFDMGaussian`][] with a fixed decoder; the terms it does not
          compute are reported as NaN.
        - `penalties`: [`nfdm_sciml.Penalties`][] evaluated at the same forward
          samples $z_t$ as the diffusion term; their weighted batch means are added
          to the loss.

        **Returns:** `(loss, terms)` where `terms` holds the batch means of each term
        (and of each penalty, unweighted).
        """
        if objective not in ("nelbo", "diffusion"):
            raise ValueError(
                f"`objective` must be 'nelbo' or 'diffusion', got {objective!r}."
            )
        if penalties is not None and not isinstance(penalties, Penalties):
            raise TypeError(
                "`penalties` must be an `nfdm_sciml.Penalties` (e.g. "
                f"`Penalties(curvature=(0.1, GenerativeCurvature()))`), got "
                f"{type(penalties).__name__}."
            )
        xs = check_batch(xs, self.data_shape)
        # One draw for the whole batch is much cheaper than a key split per example.
        tkey, ekey = jr.split(key)
        ts = jr.uniform(tkey, xs.shape[:1], dtype=xs.dtype)
        eps = jr.normal(ekey, xs.shape, dtype=xs.dtype)

        def one(x, t, e, c):
            diffusion, z, velocity = self._diffusion_terms(x, t, e, c)
            extra = {}
            if penalties is not None:
                extra = penalties(self._path_point(x, t, e, c, z, velocity))
            if objective == "diffusion":
                nan = jnp.full((), jnp.nan, x.dtype)
                return LossTerms(diffusion, nan, nan, extra)
            return LossTerms(
                diffusion,
                self.forward.prior_kl(e, x, c),
                self.reconstruction_loss(x, e, c),
                extra,
            )

        in_axes = (0, 0, 0, None if contexts is None else 0)
        means = jax.tree.map(jnp.mean, jax.vmap(one, in_axes)(xs, ts, eps, contexts))
        loss = means.nelbo if objective == "nelbo" else means.diffusion
        if penalties is not None:
            loss = loss + penalties.total(means.penalties).astype(loss.dtype)
        return loss, means

    def reverse_drift(self, z: Data, t: Time, context: Context = None) -> Data:
        r"""The generative SDE drift $\hat f(z, t, \hat x_\theta(z, t))$ (reverse)."""
        x_hat = self.predictor(z, t, context)
        velocity, score = self.forward.velocity_and_score(z, t, x_hat, context)
        return velocity - 0.5 * self.volatility(t) ** 2 * score

    def ode_drift(self, z: Data, t: Time, context: Context = None) -> Data:
        r"""The deterministic sampler's drift $f(z, t, \hat x_\theta(z, t))$.

        !!! warning
            This is the conditional ODE with $\hat x$ plugged in, as in the authors'
            sampler. It is not in general the probability-flow ODE of the SDE model:
            treat its samples and likelihoods as those of a separate, deterministic
            model.
        """
        return self._ode_drift(z, t, context, False)

    def _ode_drift(self, z, t, context, freeze_predictor):
        predictor = self.predictor
        if freeze_predictor:
            params, static = eqx.partition(predictor, eqx.is_array)
            predictor = eqx.combine(jax.lax.stop_gradient(params), static)
        x_hat = predictor(z, t, context)
        return self.forward.velocity(z, t, x_hat, context)
