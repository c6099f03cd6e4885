r"""Latent SDEs for time series, trained without simulation (SDE Matching) or, as the
classical baseline, by back-propagating through a Diffrax solve.

The generative model is a prior SDE in a latent space,
$dz = h_\theta(z, t)\,dt + g_\theta(z)\,dW$ with $z_{t_0} \sim p(z_0)$, read through
an observation model $p(x_t \mid z_t)$. The posterior over latent paths given one
series $X$ is defined, as NFDM defines its forward process, by its marginals
$q(z_t \mid X) = \mathcal{N}(m(X, t), \mathrm{diag}\,s(X, t)^2)$ from an encoder of
the series. With the prior's diffusion, the forward-time drift that has exactly
these marginals is

$$f_q = \partial_t m + \partial_t s \odot \varepsilon + \tfrac12 g^2 \odot
\nabla_z \log q + \tfrac12 \partial_z \odot g^2,$$

the last term the Itô correction of a state-dependent diffusion (the diagonal of
the Jacobian of $g^2$). The bound on $-\log p(X)$ is then

$$\mathrm{KL}(q(z_{t_0} \mid X)\,\|\,p(z_0)) + \mathbb{E}_{t, \varepsilon}\Big[
(T - t_0)\,\tfrac12 \big\|(f_q - h_\theta)/g\big\|^2\Big]
- \sum_i \mathbb{E}\,\log p(x_{t_i} \mid z_{t_i}),$$

all in closed form at sampled times: no solver in the training step.
"""

import abc
from collections.abc import Callable
from typing import cast

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ._custom_types import Scalar
from ._series import check_series, TimeSeries


_LOG_2PI = float(np.log(2 * np.pi))


def _gaussian_kl(m, log_s, m0, log_s0) -> Scalar:
    """KL(N(m, s^2) || N(m0, s0^2)), summed over coordinates."""
    return jnp.sum(
        log_s0
        - log_s
        + (jnp.exp(2 * log_s) + (m - m0) ** 2) / (2 * jnp.exp(2 * log_s0))
        - 0.5
    )


class AbstractDiffusion(eqx.Module):
    r"""A state-dependent diagonal diffusion $g(z, t)$ of a latent SDE.

    Subclasses implement `__call__(z, t) -> g` (positive, shape of `z`); the Itô
    correction $\tfrac12 \partial_{z_i} g_i^2$ defaults to the diagonal of the
    Jacobian (one forward pass per coordinate) and may be overridden by a cheaper
    exact form.
    """

    @abc.abstractmethod
    def __call__(self, z: Float[Array, " d"], t: Scalar) -> Float[Array, " d"]:
        """The noise scale of every coordinate at state `z` and time `t`."""

    def ito_correction(self, z: Float[Array, " d"], t: Scalar) -> Float[Array, " d"]:
        r"""$\tfrac12 \partial_{z_i} g_i(z, t)^2$ for every coordinate $i$."""
        jac = jax.jacfwd(lambda y: self(y, t) ** 2)(z)
        return 0.5 * jnp.diagonal(jac)


class DiagonalDiffusion(AbstractDiffusion):
    r"""$g_i(z) = g_{\max}\,\mathrm{sigmoid}(\mathrm{MLP}_i(z_i))$: each coordinate's
    noise scale depends on that coordinate only (multiplicative noise, as in a
    stochastic Lorenz system), through its own small network.

    Because the Jacobian of $g$ is diagonal, the Itô correction is one Jacobian-vector
    product with a vector of ones.

    **Arguments:**

    - `latent_size`: number of coordinates.
    - `width_size`: hidden width of each coordinate's network (one hidden layer).
    - `max_scale`: $g_{\max}$, the largest noise scale.
    - `key`: a JAX PRNG key.
    """

    nets: eqx.nn.MLP
    max_scale: float = eqx.field(static=True)

    def __init__(
        self,
        latent_size: int,
        *,
        width_size: int = 100,
        max_scale: float = 1.0,
        key: PRNGKeyArray,
    ):
        if latent_size <= 0 or width_size <= 0 or not max_scale > 0:
            raise ValueError(
                "`DiagonalDiffusion` needs latent_size > 0, width_size > 0 and "
                f"max_scale > 0; got {latent_size}, {width_size}, {max_scale}."
            )

        def make(k):
            return eqx.nn.MLP(
                1,
                1,
                width_size,
                1,
                activation=jax.nn.softplus,
                final_activation=jax.nn.sigmoid,
                key=k,
            )

        self.nets = eqx.filter_vmap(make)(jr.split(key, latent_size))
        self.max_scale = float(max_scale)

    def __call__(self, z: Float[Array, " d"], t: Scalar) -> Float[Array, " d"]:
        dtype = self.nets.layers[0].weight.dtype
        out = eqx.filter_vmap(lambda net, zi: net(zi[None])[0])(
            self.nets, z.astype(dtype)
        )
        return self.max_scale * out.astype(z.dtype)

    def ito_correction(self, z: Float[Array, " d"], t: Scalar) -> Float[Array, " d"]:
        g, dg = jax.jvp(lambda y: self(y, t), (z,), (jnp.ones_like(z),))
        return g * dg


def matched_drift(
    moments: Callable[[Scalar], tuple[Array, Array]],
    diffusion: AbstractDiffusion,
    t: Scalar,
    eps: Float[Array, " d"],
) -> tuple[Float[Array, " d"], Float[Array, " d"]]:
    r"""The forward-time drift of an SDE with diffusion $g(z, t)$ whose marginals
    are the Gaussians $\mathcal{N}(m(t), \mathrm{diag}\,s(t)^2)$ given by
    `moments(t) -> (m, s)`, at the point $z = m + s\,\varepsilon$:

    $$f = \partial_t m + \partial_t s \odot \varepsilon - \tfrac12 g^2 \odot
    \varepsilon / s + \tfrac12 \partial_z \odot g^2.$$

    It solves the Fokker–Planck equation of those marginals: the probability-flow
    velocity plus the score term, plus the Itô correction that a state-dependent
    diffusion needs (dropping it biases the marginals wherever $g$ varies).
    The time derivatives are one `jax.jvp`.

    **Returns:** `(z, f)`.
    """
    (m, s), (dm, ds) = jax.jvp(moments, (t,), (jnp.ones_like(t),))
    z = m + s * eps
    g = diffusion(z, t)
    drift = dm + ds * eps - 0.5 * g**2 * eps / s + diffusion.ito_correction(z, t)
    return z, drift


class PriorSDE(eqx.Module):
    r"""The generative latent SDE $dz = h_\theta(z, t)\,dt + g_\theta(z, t)\,dW$ with a
    learned diagonal Gaussian initial state $p(z_{t_0})$.

    **Arguments:**

    - `latent_size`: dimension of the latent state.
    - `width_size`, `depth`: of the drift network (softplus activations).
    - `time_dependent`: whether the drift sees the (normalised) time.
    - `diffusion`: an [`nfdm_sciml.AbstractDiffusion`][] (default: a
      [`nfdm_sciml.DiagonalDiffusion`][] of the same width).
    - `key`: a JAX PRNG key.
    """

    drift_net: eqx.nn.MLP
    diffusion: AbstractDiffusion
    initial_mean: Float[Array, " latent"]
    initial_log_scale: Float[Array, " latent"]
    time_dependent: bool = eqx.field(static=True)

    def __init__(
        self,
        latent_size: int,
        *,
        width_size: int = 100,
        depth: int = 1,
        time_dependent: bool = False,
        diffusion: AbstractDiffusion | None = None,
        key: PRNGKeyArray,
    ):
        dkey, gkey = jr.split(key)
        self.time_dependent = bool(time_dependent)
        self.drift_net = eqx.nn.MLP(
            latent_size + int(self.time_dependent),
            latent_size,
            width_size,
            depth,
            activation=jax.nn.softplus,
            key=dkey,
        )
        self.diffusion = (
            DiagonalDiffusion(latent_size, width_size=width_size, key=gkey)
            if diffusion is None
            else diffusion
        )
        self.initial_mean = jnp.zeros(latent_size)
        self.initial_log_scale = jnp.zeros(latent_size)

    def drift(self, z: Float[Array, " d"], u: Scalar) -> Float[Array, " d"]:
        """$h_\\theta$ at state `z` and normalised time `u`."""
        dtype = self.drift_net.layers[0].weight.dtype
        inputs = jnp.append(z, u) if self.time_dependent else z
        return self.drift_net(inputs.astype(dtype)).astype(z.dtype)


class GaussianObservation(eqx.Module):
    r"""$p(x_t \mid z_t) = \mathcal{N}(W z_t + b, \mathrm{diag}\,\sigma^2)$ on the
    observed channels.

    **Arguments:**

    - `latent_size`, `channels`: sizes of $z$ and $x$.
    - `scale`: the initial (or fixed) observation noise $\sigma$.
    - `learn_scale`: whether $\sigma$ is trained (per channel) or kept at `scale`.
    - `key`: a JAX PRNG key.
    """

    linear: eqx.nn.Linear
    log_scale: Float[Array, " channels"]
    learn_scale: bool = eqx.field(static=True)

    def __init__(
        self,
        latent_size: int,
        channels: int,
        *,
        scale: float = 0.01,
        learn_scale: bool = False,
        key: PRNGKeyArray,
    ):
        if not scale > 0:
            raise ValueError(f"`scale` must be positive, got {scale}.")
        self.linear = eqx.nn.Linear(latent_size, channels, key=key)
        self.log_scale = jnp.full(channels, float(np.log(scale)))
        self.learn_scale = bool(learn_scale)

    def mean(self, z: Float[Array, " latent"]) -> Float[Array, " channels"]:
        return self.linear(z.astype(self.linear.weight.dtype)).astype(z.dtype)

    def scale(self) -> Float[Array, " channels"]:
        log_scale = (
            self.log_scale
            if self.learn_scale
            else jax.lax.stop_gradient(self.log_scale)
        )
        return jnp.exp(log_scale)

    def log_prob(
        self,
        z: Float[Array, " latent"],
        x: Float[Array, " channels"],
        mask: Bool[Array, " channels"],
    ) -> Scalar:
        """$\\log p(x \\mid z)$ summed over the observed channels (`mask`)."""
        scale = self.scale().astype(x.dtype)
        r = (x - self.mean(z)) / scale
        terms = -0.5 * r**2 - jnp.log(scale) - 0.5 * _LOG_2PI
        return jnp.sum(jnp.where(mask, terms, 0.0))


class Encoded(eqx.Module):
    """One series as the encoder summarises it: features per observation time."""

    times: Float[Array, " steps"]
    features: Float[Array, "steps features"]
    rows: Bool[Array, " steps"]


class SeriesEncoder(eqx.Module):
    r"""Summarises a series for the posterior: a GRU run forwards and one run
    backwards over the rows (observed values with their mask, the time and the gap
    to the previous row), and a time-localised softmax attention over the rows,
    $c(t) = \sum_i w_i(t)\,h_i$ with $w(t) = \mathrm{softmax}_i(-(L(u_i - u))^2)$ in
    normalised time $u$ and a learned sharpness $L$. The context is smooth in `t`,
    so the posterior's time derivatives exist.

    Rows with no observed channel take no attention, so a missing value never
    enters the context.
    """

    forward_cell: eqx.nn.GRUCell
    backward_cell: eqx.nn.GRUCell
    log_sharpness: Float[Array, ""]
    t0: float = eqx.field(static=True)
    t1: float = eqx.field(static=True)

    def __init__(
        self,
        channels: int,
        *,
        hidden_size: int,
        t0: float,
        t1: float,
        attention_width: float = 0.05,
        key: PRNGKeyArray,
    ):
        fkey, bkey = jr.split(key)
        in_size = 2 * channels + 2
        self.forward_cell = eqx.nn.GRUCell(in_size, hidden_size, key=fkey)
        self.backward_cell = eqx.nn.GRUCell(in_size, hidden_size, key=bkey)
        self.log_sharpness = jnp.asarray(-np.log(attention_width))
        self.t0, self.t1 = float(t0), float(t1)

    @property
    def size(self) -> int:
        return 2 * self.forward_cell.hidden_size

    def normalise(self, t):
        return (t - self.t0) / (self.t1 - self.t0)

    def __call__(
        self,
        times: Float[Array, " steps"],
        values: Float[Array, "steps channels"],
        mask: Bool[Array, "steps channels"],
    ) -> Encoded:
        dtype = self.forward_cell.weight_ih.dtype
        u = self.normalise(times)
        gaps = jnp.diff(u, prepend=u[:1])
        rows = jnp.concatenate(
            [
                jnp.where(mask, values, 0.0),
                mask.astype(values.dtype),
                u[:, None],
                gaps[:, None],
            ],
            axis=1,
        ).astype(dtype)
        h0 = jnp.zeros(self.forward_cell.hidden_size, dtype)

        def run(cell, xs):
            def step(h, x):
                h = cell(x, h)
                return h, h

            return jax.lax.scan(step, h0, xs)[1]

        ahead = run(self.forward_cell, rows)
        behind = run(self.backward_cell, rows[::-1])[::-1]
        features = jnp.concatenate([ahead, behind], axis=1)
        return Encoded(times, features, jnp.any(mask, axis=1))

    def context(self, encoded: Encoded, t: Scalar) -> Float[Array, " features"]:
        sharpness = jnp.exp(self.log_sharpness)
        du = self.normalise(encoded.times) - self.normalise(t)
        logits = jnp.where(encoded.rows, -((sharpness * du) ** 2), -jnp.inf)
        weights = jax.nn.softmax(logits)
        return weights.astype(encoded.features.dtype) @ encoded.features


def _check_model_span(model, series: TimeSeries) -> None:
    lo, hi = float(jnp.min(series.times)), float(jnp.max(series.times))
    if lo < model.t0 - 1e-9 * (model.t1 - model.t0) or hi > model.t1 + 1e-9 * (
        model.t1 - model.t0
    ):
        raise ValueError(
            f"The series span times [{lo}, {hi}] but the model covers [t0, t1] = "
            f"[{model.t0}, {model.t1}]; build the model with a `t0` at or before the "
            "first time and a `t1` at or after the last."
        )


def _check_span_args(t0, t1) -> tuple[float, float]:
    t0, t1 = float(t0), float(t1)
    if not t1 > t0:
        raise ValueError(f"A latent SDE needs t1 > t0; got t0 = {t0}, t1 = {t1}.")
    return t0, t1


class LatentSolution(eqx.Module):
    """Simulated latent paths and their observations.

    - `times`: the saved times, shape `(series, saves)`.
    - `latents`: shape `(series, samples, saves, latent)`.
    - `observations`: shape `(series, samples, saves, channels)`: the observation
      model's mean (or a draw of it, with `noise=True`).
    """

    times: Float[Array, "series saves"]
    latents: Float[Array, "series samples saves latent"]
    observations: Float[Array, "series samples saves channels"]


def _simulate_prior(prior, normalise, z0, t_start, save_times, num_steps, key):
    """Euler–Maruyama of the prior SDE from `z0` at `t_start` for one path, saving at
    `save_times` (times before `t_start` are saved as the start state)."""
    dtype = z0.dtype
    t_end = jnp.maximum(save_times[-1], t_start + 1e-6)
    dt0 = (t_end - t_start) / num_steps
    bm = diffrax.UnsafeBrownianPath(z0.shape, key)
    drift = diffrax.ODETerm(lambda t, y, args: prior.drift(y, normalise(t)))
    noise = diffrax.ControlTerm(
        lambda t, y, args: lx.DiagonalLinearOperator(prior.diffusion(y, t)), bm
    )
    sol = diffrax.diffeqsolve(
        diffrax.MultiTerm(drift, noise),
        diffrax.Euler(),
        t_start,
        t_end,
        dt0,
        z0,
        saveat=diffrax.SaveAt(ts=jnp.clip(save_times, t_start, t_end).astype(dtype)),
        max_steps=num_steps + 2,
        adjoint=diffrax.ForwardMode(),
    )
    return cast(Array, sol.ys)


class _LatentSDEBase(eqx.Module):
    """What both training methods share: the prior, the observation model, the
    encoder and the span; forecasting and generation."""

    encoder: eqx.AbstractVar[SeriesEncoder]
    prior: eqx.AbstractVar[PriorSDE]
    observation: eqx.AbstractVar[GaussianObservation]

    @property
    def t0(self) -> float:
        return self.encoder.t0

    @property
    def t1(self) -> float:
        return self.encoder.t1

    @property
    def latent_size(self) -> int:
        return self.prior.initial_mean.shape[0]

    @property
    def channels(self) -> int:
        return self.observation.log_scale.shape[0]

    def check(self, series: TimeSeries) -> TimeSeries:
        """Validates `series` for this model (channels, and times within the span)."""
        series = check_series(series, self.channels)
        _check_model_span(self, series)
        return series

    @abc.abstractmethod
    def filtered_state(
        self, encoded: Encoded, t: Scalar, key: PRNGKeyArray
    ) -> Float[Array, " latent"]:
        """A draw of the latent state at `t` given the encoded series."""

    def sample_prior(
        self,
        times: Float[Array, " saves"],
        num_samples: int,
        *,
        key: PRNGKeyArray,
        num_steps: int = 1000,
        noise: bool = False,
    ) -> LatentSolution:
        """Generation: `num_samples` paths of the prior SDE from $p(z_{t_0})$, saved
        at `times` (increasing, in $[t_0, t_1]$ or beyond $t_1$ to extrapolate),
        with `num_steps` Euler–Maruyama steps over the whole span."""
        times = jnp.asarray(times, jnp.result_type(float))
        _check_save_times(times, self.t0)
        zkey, skey, nkey = jr.split(key, 3)
        eps = jr.normal(zkey, (num_samples, self.latent_size), times.dtype)
        scale = jnp.exp(self.prior.initial_log_scale)
        z0 = self.prior.initial_mean[None] + scale[None] * eps
        latents: Array = _simulate_many(
            self.prior,
            self.encoder.normalise,
            z0,
            jnp.full(num_samples, self.t0, times.dtype),
            jnp.broadcast_to(times, (num_samples, times.shape[0])),
            num_steps,
            skey,
        )
        obs = self._observe(latents, noise, nkey)
        return LatentSolution(times[None], latents[None], obs[None])

    def forecast(
        self,
        series: TimeSeries,
        t_start: float,
        *,
        key: PRNGKeyArray,
        times: Float[Array, "series saves"] | None = None,
        num_samples: int = 32,
        num_steps: int = 200,
        noise: bool = False,
    ) -> LatentSolution:
        """Forecasts each series from its observations up to `t_start`: draws
        `num_samples` posterior states at `t_start` given that history (later
        observations are ignored) and simulates the prior SDE from there to
        `times` (default: the series' own times; times before `t_start` are
        returned as the start state), with `num_steps` Euler–Maruyama steps."""
        series = self.check(series)
        history = series.until(t_start)
        times = (
            series.times if times is None else jnp.asarray(times, series.times.dtype)
        )
        if times.ndim != 2 or times.shape[0] != series.num_series:
            raise ValueError(
                f"`times` must have shape (series, saves) with series = "
                f"{series.num_series}; got {times.shape}."
            )
        _check_save_times(times, -np.inf)
        return _forecast(
            self, history, t_start, times, num_samples, num_steps, noise, key
        )

    def _observe(self, latents, noise, key):
        obs = jax.vmap(jax.vmap(self.observation.mean))(latents)
        if noise:
            scale = self.observation.scale().astype(obs.dtype)
            scale = jnp.reshape(scale, (1,) * (obs.ndim - 1) + scale.shape)
            obs = obs + scale * jr.normal(key, obs.shape, obs.dtype)
        return obs


def _check_save_times(times, t_min) -> None:
    if not bool(jnp.all(jnp.diff(times, axis=-1) > 0)):
        raise ValueError("Save `times` must be strictly increasing.")
    if not bool(jnp.all(times >= t_min)):
        raise ValueError(f"Save `times` must not come before t0 = {t_min}.")


def _simulate_paths(prior, normalise, z0, t_start, save_times, num_steps, key):
    keys = jr.split(key, z0.shape[0])
    return jax.vmap(
        lambda z, t, s, k: _simulate_prior(prior, normalise, z, t, s, num_steps, k)
    )(z0, t_start, save_times, keys)


_simulate_many = eqx.filter_jit(_simulate_paths)


@eqx.filter_jit
def _forecast(model, history, t_start, times, num_samples, num_steps, noise, key):
    dtype = times.dtype
    t_start = jnp.asarray(t_start, dtype)
    skeys = jr.split(key, history.num_series)

    def one(t, v, m, save, k):
        encoded = model.encoder(t, v, m)
        zkey, pkey, nkey = jr.split(k, 3)
        z = jax.vmap(lambda kk: model.filtered_state(encoded, t_start, kk))(
            jr.split(zkey, num_samples)
        )
        latents = _simulate_paths(
            model.prior,
            model.encoder.normalise,
            z,
            jnp.full(num_samples, t_start, dtype),
            jnp.broadcast_to(save, (num_samples, save.shape[0])),
            num_steps,
            pkey,
        )
        return latents, model._observe(latents, noise, nkey)

    latents, obs = jax.vmap(one)(
        history.times, history.values, history.mask, times, skeys
    )
    return LatentSolution(times, cast(Array, latents), cast(Array, obs))


def _mlp(in_size: int, out_size: int, width: int, key: PRNGKeyArray) -> eqx.nn.MLP:
    """A head of the latent SDEs: two hidden layers of `width` SiLU units."""
    return eqx.nn.MLP(in_size, out_size, width, 2, activation=jax.nn.silu, key=key)


def _shared_parts(
    channels: int,
    latent_size: int,
    *,
    t0: float,
    t1: float,
    hidden_size: int,
    observation_scale: float,
    learn_observation_scale: bool,
    time_dependent_drift: bool,
    attention_width: float,
    keys: tuple[PRNGKeyArray, PRNGKeyArray, PRNGKeyArray],
) -> tuple[SeriesEncoder, PriorSDE, GaussianObservation]:
    """The encoder, prior and observation model that both latent SDEs share, so that
    a comparison of the two changes only the training method."""
    ekey, pkey, okey = keys
    encoder = SeriesEncoder(
        channels,
        hidden_size=hidden_size,
        t0=t0,
        t1=t1,
        attention_width=attention_width,
        key=ekey,
    )
    prior = PriorSDE(
        latent_size,
        width_size=hidden_size,
        time_dependent=time_dependent_drift,
        key=pkey,
    )
    observation = GaussianObservation(
        latent_size,
        channels,
        scale=observation_scale,
        learn_scale=learn_observation_scale,
        key=okey,
    )
    return encoder, prior, observation


class LatentSDE(_LatentSDEBase):
    r"""A latent SDE trained by SDE Matching: the posterior is a Gaussian process in
    `t` defined by an encoder of the series, and its forward drift (with the Itô
    correction) is matched to the prior drift in closed form, so a training step
    solves no differential equation and its cost does not depend on a solver's step
    count.

    **Arguments:**

    - `channels`: number of observed channels.
    - `latent_size`: dimension of the latent state.
    - `t0`, `t1`: the span of the model: the prior's initial state lives at `t0`;
      every series must lie in $[t_0, t_1]$ (forecasts may go beyond `t1`).
    - `hidden_size`: width of the encoder and of every network.
    - `observation_scale`, `learn_observation_scale`: of the
      [`nfdm_sciml.GaussianObservation`][].
    - `time_dependent_drift`: whether the prior drift sees the time.
    - `attention_width`: initial width of the encoder's attention, in units of the
      span.
    - `reconstruction_points`: `None` reconstructs every observation at every step
      (the exact bound); an integer `k` draws `k` observed rows per series and
      rescales (unbiased, the notebook's choice with `k = 1`), so the step's cost
      beyond the encoder does not grow with the length of the series.
    - `key`: a JAX PRNG key.
    """

    encoder: SeriesEncoder
    head: eqx.nn.MLP
    prior: PriorSDE
    observation: GaussianObservation
    reconstruction_points: int | None = eqx.field(static=True)

    def __init__(
        self,
        channels: int,
        latent_size: int,
        *,
        t0: float = 0.0,
        t1: float = 1.0,
        hidden_size: int = 100,
        observation_scale: float = 0.01,
        learn_observation_scale: bool = False,
        time_dependent_drift: bool = False,
        attention_width: float = 0.05,
        reconstruction_points: int | None = None,
        key: PRNGKeyArray,
    ):
        t0, t1 = _check_span_args(t0, t1)
        _check_sizes(channels, latent_size, hidden_size)
        if reconstruction_points is not None and not (
            isinstance(reconstruction_points, int) and reconstruction_points > 0
        ):
            raise ValueError(
                "`reconstruction_points` must be None (every observation) or a "
                f"positive integer, got {reconstruction_points!r}."
            )
        self.reconstruction_points = reconstruction_points
        ekey, hkey, pkey, okey = jr.split(key, 4)
        self.encoder, self.prior, self.observation = _shared_parts(
            channels,
            latent_size,
            t0=t0,
            t1=t1,
            hidden_size=hidden_size,
            observation_scale=observation_scale,
            learn_observation_scale=learn_observation_scale,
            time_dependent_drift=time_dependent_drift,
            attention_width=attention_width,
            keys=(ekey, pkey, okey),
        )
        self.head = _mlp(self.encoder.size + 1, 2 * latent_size, hidden_size, hkey)

    def posterior(
        self, encoded: Encoded, t: Scalar
    ) -> tuple[Float[Array, " latent"], Float[Array, " latent"]]:
        """The mean and log-scale of $q(z_t \\mid X)$."""
        context = self.encoder.context(encoded, t)
        u = self.encoder.normalise(t).astype(context.dtype)
        out = self.head(jnp.append(context, u))
        mean, log_scale = jnp.split(out.astype(encoded.times.dtype), 2)
        return mean, log_scale

    def posterior_drift(
        self, encoded: Encoded, t: Scalar, eps: Float[Array, " latent"]
    ) -> tuple[Float[Array, " latent"], Float[Array, " latent"]]:
        """The state $z = m + s\\,\\varepsilon$ and the forward drift $f_q$ there that
        carries the posterior marginals under the prior's diffusion."""

        def moments(s):
            mean, log_scale = self.posterior(encoded, s)
            return mean, jnp.exp(log_scale)

        return matched_drift(moments, self.prior.diffusion, t, eps)

    def filtered_state(
        self, encoded: Encoded, t: Scalar, key: PRNGKeyArray
    ) -> Float[Array, " latent"]:
        mean, log_scale = self.posterior(encoded, t)
        return mean + jnp.exp(log_scale) * jr.normal(key, mean.shape, mean.dtype)

    def series_loss(
        self,
        times: Float[Array, " steps"],
        values: Float[Array, "steps channels"],
        mask: Bool[Array, "steps channels"],
        u: Scalar,
        *,
        key: PRNGKeyArray,
    ) -> dict[str, Scalar]:
        """The three terms of the bound for one series, with the path term at the
        time $t = t_0 + u\\,(T - t_0)$ for $u \\in [0, 1]$ ($T$: the last row)."""
        encoded = self.encoder(times, values, mask)
        ekey, rkey = jr.split(key)
        dtype = times.dtype
        t0 = jnp.asarray(self.t0, dtype)
        span = times[-1] - t0
        t = t0 + u * span

        m0, log_s0 = self.posterior(encoded, t0)
        kl0 = _gaussian_kl(
            m0, log_s0, self.prior.initial_mean, self.prior.initial_log_scale
        )
        eps = jr.normal(ekey, (self.latent_size,), dtype)
        z, drift_q = self.posterior_drift(encoded, t, eps)
        g = self.prior.diffusion(z, t)
        h = self.prior.drift(z, self.encoder.normalise(t))
        path = span * 0.5 * jnp.sum(((drift_q - h) / g) ** 2)

        def log_lik(ti, xi, mi, k):
            mean, log_scale = self.posterior(encoded, ti)
            zi = mean + jnp.exp(log_scale) * jr.normal(k, mean.shape, dtype)
            return self.observation.log_prob(zi, xi, mi)

        k = self.reconstruction_points
        if k is None:
            keys = jr.split(rkey, times.shape[0])
            reconstruction = -jnp.sum(jax.vmap(log_lik)(times, values, mask, keys))
        else:
            # k observed rows drawn uniformly (with replacement), each weighted by
            # (observed rows) / k: an unbiased estimate of the sum over all rows at a
            # cost that does not grow with the length of the series.
            ikey, rkey = jr.split(rkey)
            rows = jnp.any(mask, axis=1)
            count = jnp.sum(rows).astype(dtype)
            p = rows.astype(dtype) / count
            idx = jr.choice(ikey, times.shape[0], (k,), p=p)
            keys = jr.split(rkey, k)
            terms = jax.vmap(log_lik)(times[idx], values[idx], mask[idx], keys)
            reconstruction = -jnp.sum(terms) * count / k
        return {"prior": kl0, "diffusion": path, "reconstruction": reconstruction}

    def batch_loss(
        self, series: TimeSeries, *, key: PRNGKeyArray
    ) -> tuple[Scalar, dict[str, Array]]:
        """The negative bound averaged over a batch of series (nats per series), with
        stratified path times. **Returns:** `(loss, terms)` with `"prior"`,
        `"diffusion"`, `"reconstruction"`, `"nelbo"` and `"nelbo_per_entry"` (per
        observed entry)."""
        n = series.num_series
        ukey, lkey = jr.split(key)
        dtype = series.times.dtype
        u = (jnp.arange(n, dtype=dtype) + jr.uniform(ukey, (n,), dtype)) / n
        terms = jax.vmap(lambda t, v, m, s, k: self.series_loss(t, v, m, s, key=k))(
            series.times, series.values, series.mask, u, jr.split(lkey, n)
        )
        return _assemble(terms, series)


def _assemble(terms, series):
    out = {k: jnp.mean(v) for k, v in terms.items()}
    nelbo = out["prior"] + out["diffusion"] + out["reconstruction"]
    out["nelbo"] = nelbo
    out["nelbo_per_entry"] = (
        nelbo * series.num_series / jnp.sum(series.mask).astype(nelbo.dtype)
    )
    out["loss"] = nelbo
    return nelbo, out


def _check_sizes(channels, latent_size, hidden_size) -> None:
    for name, value in (
        ("channels", channels),
        ("latent_size", latent_size),
        ("hidden_size", hidden_size),
    ):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


class SolverLatentSDE(_LatentSDEBase):
    r"""The classical latent SDE (Li et al., 2020), the baseline of SDE Matching: the
    posterior is itself an SDE, $dz = h_\phi(z, t, c(t))\,dt + g_\theta(z)\,dW$ from
    $q(z_{t_0} \mid X)$, and the bound

    $$\mathrm{KL}(q(z_{t_0})\,\|\,p(z_0)) + \mathbb{E}\int_{t_0}^{T} \tfrac12
    \big\|(h_\phi - h_\theta)/g\big\|^2\,dt - \sum_i \log p(x_{t_i} \mid z_{t_i})$$

    is estimated on one posterior path solved by Diffrax (Euler–Maruyama with
    `num_steps` steps over $[t_0, t_1]$, a virtual Brownian tree) and
    differentiated through the solver. Its cost per step grows with `num_steps`.

    The arguments are those of [`nfdm_sciml.LatentSDE`][], plus `num_steps`.
    """

    encoder: SeriesEncoder
    initial_head: eqx.nn.MLP
    drift_net: eqx.nn.MLP
    prior: PriorSDE
    observation: GaussianObservation
    num_steps: int = eqx.field(static=True)

    def __init__(
        self,
        channels: int,
        latent_size: int,
        *,
        t0: float = 0.0,
        t1: float = 1.0,
        hidden_size: int = 100,
        num_steps: int = 100,
        observation_scale: float = 0.01,
        learn_observation_scale: bool = False,
        time_dependent_drift: bool = False,
        attention_width: float = 0.05,
        key: PRNGKeyArray,
    ):
        t0, t1 = _check_span_args(t0, t1)
        _check_sizes(channels, latent_size, hidden_size)
        if not (isinstance(num_steps, int) and num_steps > 0):
            raise ValueError(
                f"`num_steps` must be a positive integer, got {num_steps!r}."
            )
        ekey, ikey, dkey, pkey, okey = jr.split(key, 5)
        self.encoder, self.prior, self.observation = _shared_parts(
            channels,
            latent_size,
            t0=t0,
            t1=t1,
            hidden_size=hidden_size,
            observation_scale=observation_scale,
            learn_observation_scale=learn_observation_scale,
            time_dependent_drift=time_dependent_drift,
            attention_width=attention_width,
            keys=(ekey, pkey, okey),
        )
        size = self.encoder.size
        self.initial_head = _mlp(size + 1, 2 * latent_size, hidden_size, ikey)
        self.drift_net = _mlp(latent_size + size + 1, latent_size, hidden_size, dkey)
        self.num_steps = num_steps

    def initial(self, encoded: Encoded):
        t0 = jnp.asarray(self.t0, encoded.times.dtype)
        context = self.encoder.context(encoded, t0)
        out = self.initial_head(jnp.append(context, self.encoder.normalise(t0)))
        mean, log_scale = jnp.split(out.astype(encoded.times.dtype), 2)
        return mean, log_scale

    def posterior_drift(self, encoded: Encoded, z, t):
        context = self.encoder.context(encoded, t)
        u = self.encoder.normalise(t).astype(context.dtype)
        return self.drift_net(
            jnp.concatenate([z.astype(context.dtype), context, u[None]])
        ).astype(z.dtype)

    def filtered_state(
        self, encoded: Encoded, t: Scalar, key: PRNGKeyArray
    ) -> Float[Array, " latent"]:
        # The filtering distribution at `t` is that of the posterior SDE solved
        # from t0 to t on the history.
        ikey, skey = jr.split(key)
        mean, log_scale = self.initial(encoded)
        z0 = mean + jnp.exp(log_scale) * jr.normal(ikey, mean.shape, mean.dtype)
        dtype = z0.dtype
        t0 = jnp.asarray(self.t0, dtype)
        t_end = jnp.maximum(t, t0 + 1e-6)
        bm = diffrax.UnsafeBrownianPath(z0.shape, skey)
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda s, y, args: self.posterior_drift(encoded, y, s)),
            diffrax.ControlTerm(
                lambda s, y, args: lx.DiagonalLinearOperator(
                    self.prior.diffusion(y, jnp.asarray(s))
                ),
                bm,
            ),
        )
        sol = diffrax.diffeqsolve(
            terms,
            diffrax.Euler(),
            t0,
            t_end,
            (t_end - t0) / self.num_steps,
            z0,
            max_steps=self.num_steps + 2,
            adjoint=diffrax.ForwardMode(),
        )
        return cast(Array, sol.ys)[-1]

    def series_loss(
        self,
        times: Float[Array, " steps"],
        values: Float[Array, "steps channels"],
        mask: Bool[Array, "steps channels"],
        *,
        key: PRNGKeyArray,
    ) -> dict[str, Scalar]:
        """The terms of the bound for one series from one solved posterior path."""
        encoded = self.encoder(times, values, mask)
        ikey, bkey = jr.split(key)
        dtype = times.dtype
        mean, log_scale = self.initial(encoded)
        kl0 = _gaussian_kl(
            mean, log_scale, self.prior.initial_mean, self.prior.initial_log_scale
        )
        z0 = mean + jnp.exp(log_scale) * jr.normal(ikey, mean.shape, dtype)
        d = self.latent_size
        t0, t1 = self.t0, self.t1
        dt = (t1 - t0) / self.num_steps

        def drift(t, y, args):
            z = y[:d]
            hq = self.posterior_drift(encoded, z, t)
            hp = self.prior.drift(z, self.encoder.normalise(t))
            g = self.prior.diffusion(z, t)
            return jnp.append(hq, 0.5 * jnp.sum(((hq - hp) / g) ** 2))

        def diffusion(t, y, args):
            g = self.prior.diffusion(y[:d], t)
            return jnp.concatenate([jnp.diag(g), jnp.zeros((1, d), g.dtype)])

        bm = diffrax.VirtualBrownianTree(t0, t1, tol=dt / 2, shape=(d,), key=bkey)
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, bm)
        )
        sol = diffrax.diffeqsolve(
            terms,
            diffrax.Euler(),
            t0,
            t1,
            dt,
            jnp.append(z0, jnp.zeros((), dtype)),
            saveat=diffrax.SaveAt(ts=times),
            max_steps=self.num_steps + 2,
        )
        ys = sol.ys
        assert ys is not None
        reconstruction = -jnp.sum(
            jax.vmap(self.observation.log_prob)(ys[:, :d], values, mask)
        )
        return {"prior": kl0, "diffusion": ys[-1, d], "reconstruction": reconstruction}

    def batch_loss(
        self, series: TimeSeries, *, key: PRNGKeyArray
    ) -> tuple[Scalar, dict[str, Array]]:
        """The negative bound averaged over a batch of series; the terms of
        [`nfdm_sciml.LatentSDE.batch_loss`][]."""
        n = series.num_series
        terms = jax.vmap(lambda t, v, m, k: self.series_loss(t, v, m, key=k))(
            series.times, series.values, series.mask, jr.split(key, n)
        )
        return _assemble(terms, series)


def forecast_error(
    model: _LatentSDEBase,
    series: TimeSeries,
    t_start: float,
    *,
    key: PRNGKeyArray,
    num_samples: int = 32,
    num_steps: int = 200,
) -> dict[str, float]:
    """Forecast scores on held-out `series` from their history up to `t_start`: the
    root-mean-square error of the mean forecast and the mean absolute error of the
    median over the observed entries after `t_start`, and the continuous ranked
    probability score (CRPS, from the samples) averaged over those entries."""
    sol = model.forecast(
        series, t_start, key=key, num_samples=num_samples, num_steps=num_steps
    )
    target = series.after(t_start)
    mask = target.mask
    if not bool(jnp.any(mask)):
        raise ValueError(f"No observation after t = {t_start} to score a forecast on.")
    samples = sol.observations  # (series, samples, steps, channels)
    mean = jnp.mean(samples, axis=1)
    median = jnp.median(samples, axis=1)
    x = target.values
    count = jnp.sum(mask).astype(x.dtype)
    rmse = jnp.sqrt(jnp.sum(jnp.where(mask, (mean - x) ** 2, 0.0)) / count)
    mae = jnp.sum(jnp.where(mask, jnp.abs(median - x), 0.0)) / count
    spread = jnp.mean(jnp.abs(samples[:, :, None] - samples[:, None, :]), axis=(1, 2))
    crps = jnp.mean(jnp.abs(samples - x[:, None]), axis=1) - 0.5 * spread
    crps = jnp.sum(jnp.where(mask, crps, 0.0)) / count
    return {"rmse": float(rmse), "mae": float(mae), "crps": float(crps)}
