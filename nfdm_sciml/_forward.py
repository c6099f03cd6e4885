r"""Forward processes $z_t = F(\varepsilon, t, x)$ and their conditional dynamics.

A forward process maps noise $\varepsilon \sim \mathcal{N}(0, I)$ to a sample of
$q(z_t \mid x)$. From $F$ alone follow the conditional ODE velocity
$f(z, t, x) = \partial_t F(\varepsilon, t, x)$ at $\varepsilon = F^{-1}(z, t, x)$ and
the conditional score $\nabla_z \log q(z_t \mid x)$, and with them the conditional SDEs
for any volatility $g(t)$. Time runs from data ($t = 0$) to noise ($t = 1$).

Every method acts on one example: `eps`, `z` and `x` share one shape and `t` is a
scalar array. Batch with `jax.vmap`.
"""

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from ._custom_types import Context, Data, Scalar, Time
from ._nets import TimeMLP


def standard_normal_log_prob(eps: Data) -> Scalar:
    """$\\log \\mathcal{N}(\\varepsilon; 0, I)$ summed over all dimensions."""
    return -0.5 * jnp.sum(eps**2) - 0.5 * eps.size * math.log(2 * math.pi)


class AbstractForwardProcess(eqx.Module):
    r"""The interface of a forward process $z_t = F(\varepsilon, t, x, c)$.

    $F$ must be differentiable in $t$ and invertible in $\varepsilon$ with a tractable
    log-determinant. Do not subclass this directly: subclass
    [`nfdm_sciml.AbstractGaussianProcess`][] (write `mean_and_scale` and get every
    closed form) or [`nfdm_sciml.AbstractFlowProcess`][] (write `__call__`, `inverse`
    and `log_det_jacobian` and get the velocity and score by automatic
    differentiation).

    Methods take an optional `context`, anything the process is conditioned on besides
    `x`; processes that ignore it accept `None`.
    """

    @abc.abstractmethod
    def __call__(self, eps: Data, t: Time, x: Data, context: Context = None) -> Data:
        """**Returns:** $z_t = F(\\varepsilon, t, x)$."""

    @abc.abstractmethod
    def inverse(self, z: Data, t: Time, x: Data, context: Context = None) -> Data:
        """**Returns:** $\\varepsilon = F^{-1}(z, t, x)$."""

    @abc.abstractmethod
    def log_det_jacobian(
        self, eps: Data, t: Time, x: Data, context: Context = None
    ) -> Scalar:
        """**Returns:** $\\log|\\det \\partial F / \\partial \\varepsilon|$ at `eps`."""

    @abc.abstractmethod
    def velocity(self, z: Data, t: Time, x: Data, context: Context = None) -> Data:
        """**Returns:** the conditional ODE velocity $f(z, t, x)$."""

    @abc.abstractmethod
    def score(self, z: Data, t: Time, x: Data, context: Context = None) -> Data:
        """**Returns:** the conditional score $\\nabla_z \\log q(z_t \\mid x)$."""

    @abc.abstractmethod
    def velocity_and_score(
        self, z: Data, t: Time, x: Data, context: Context = None
    ) -> tuple[Data, Data]:
        """Velocity and score at once, sharing the work of both.

        **Returns:** `(velocity, score)` at `z`.
        """

    @abc.abstractmethod
    def sample_terms(
        self, eps: Data, t: Time, x: Data, context: Context = None
    ) -> tuple[Data, Data, Data]:
        """Sample, velocity and score at once, given the noise.

        This is what a training step needs at the data point: knowing `eps` avoids
        computing $F^{-1}$.

        **Returns:** `(z, velocity, score)` at $z = F(\\varepsilon, t, x)$.
        """

    @abc.abstractmethod
    def prior_kl(self, eps: Data, x: Data, context: Context = None) -> Scalar:
        r"""$\mathrm{KL}(q(z_1 \mid x) \,\|\, \mathcal{N}(0, I))$, the prior term.

        Closed form where one exists (then `eps` is unused); otherwise the unbiased
        single-sample estimate $\log q(z_1 \mid x) - \log \mathcal{N}(z_1; 0, I)$ at
        $z_1 = F(\varepsilon, 1, x)$. Exactly zero for processes that end at
        $\mathcal{N}(0, I)$ by construction.
        """

    @abc.abstractmethod
    def log_prob(self, z: Data, t: Time, x: Data, context: Context = None) -> Scalar:
        r"""**Returns:** $\log q(z_t \mid x) = \log \mathcal{N}(\varepsilon) -
        \log|\det \partial_\varepsilon F|$ at $\varepsilon = F^{-1}(z)$."""


class AbstractGaussianProcess(AbstractForwardProcess):
    r"""A forward process with Gaussian marginals, $F = \mu(x, t) + \sigma(x, t) \odot
    \varepsilon$, with elementwise $\sigma > 0$.

    Subclasses implement only `mean_and_scale`. Its time derivatives come from one
    `jax.jvp`, and the sample, inverse, velocity, score, log-determinant and prior KL
    are closed forms:
    $f = \partial_t\mu + \partial_t\sigma \, (z - \mu)/\sigma$ and
    $\nabla_z \log q = (\mu - z)/\sigma^2$.
    """

    @abc.abstractmethod
    def mean_and_scale(
        self, t: Time, x: Data, context: Context = None
    ) -> tuple[Data, Data]:
        """**Returns:** `(mu, sigma)`, each with the shape of `x`; `sigma > 0`."""

    def moments_and_rates(
        self, t: Time, x: Data, context: Context = None
    ) -> tuple[tuple[Data, Data], tuple[Data, Data]]:
        """**Returns:** `((mu, sigma), (dmu/dt, dsigma/dt))` from one JVP in `t`."""
        return jax.jvp(
            lambda s: self.mean_and_scale(s, x, context), (t,), (jnp.ones_like(t),)
        )

    def __call__(self, eps: Data, t: Time, x: Data, context: Context = None) -> Data:
        mu, sigma = self.mean_and_scale(t, x, context)
        return mu + sigma * eps

    def inverse(self, z: Data, t: Time, x: Data, context: Context = None) -> Data:
        mu, sigma = self.mean_and_scale(t, x, context)
        return (z - mu) / sigma

    def log_det_jacobian(
        self, eps: Data, t: Time, x: Data, context: Context = None
    ) -> Scalar:
        del eps
        _, sigma = self.mean_and_scale(t, x, context)
        return jnp.sum(jnp.log(sigma))

    def velocity(self, z: Data, t: Time, x: Data, context: Context = None) -> Data:
        (mu, sigma), (dmu, dsigma) = self.moments_and_rates(t, x, context)
        return dmu + dsigma * (z - mu) / sigma

    def score(self, z: Data, t: Time, x: Data, context: Context = None) -> Data:
        mu, sigma = self.mean_and_scale(t, x, context)
        return (mu - z) / sigma**2

    def log_prob(self, z: Data, t: Time, x: Data, context: Context = None) -> Scalar:
        mu, sigma = self.mean_and_scale(t, x, context)
        eps = (z - mu) / sigma
        return standard_normal_log_prob(eps) - jnp.sum(jnp.log(sigma))

    def velocity_and_score(
        self, z: Data, t: Time, x: Data, context: Context = None
    ) -> tuple[Data, Data]:
        (mu, sigma), (dmu, dsigma) = self.moments_and_rates(t, x, context)
        eps = (z - mu) / sigma
        return dmu + dsigma * eps, -eps / sigma

    def sample_terms(
        self, eps: Data, t: Time, x: Data, context: Context = None
    ) -> tuple[Data, Data, Data]:
        (mu, sigma), (dmu, dsigma) = self.moments_and_rates(t, x, context)
        return mu + sigma * eps, dmu + dsigma * eps, -eps / sigma

    def prior_kl(self, eps: Data, x: Data, context: Context = None) -> Scalar:
        del eps
        mu, sigma = self.mean_and_scale(jnp.ones((), x.dtype), x, context)
        return 0.5 * jnp.sum(mu**2 + sigma**2 - 1 - 2 * jnp.log(sigma))


class AbstractFlowProcess(AbstractForwardProcess):
    r"""A general invertible forward process, served by automatic differentiation.

    Subclasses implement `__call__`, `inverse_and_log_det` (the inverse map, with
    $\log|\det \partial_\varepsilon F|$ at the recovered $\varepsilon$, in one pass)
    and `log_det_jacobian`. The velocity is a `jax.jvp` of $F$ in $t$ at
    $\varepsilon = F^{-1}(z)$; the score is the gradient of
    $\log \mathcal{N}(\varepsilon) - \log|\det \partial_\varepsilon F|$ with respect
    to $z$; the prior KL is a single-sample estimate. Override `prior_kl` with `0`
    when the process ends at $\mathcal{N}(0, I)$ exactly.
    """

    @abc.abstractmethod
    def inverse_and_log_det(
        self, z: Data, t: Time, x: Data, context: Context = None
    ) -> tuple[Data, Scalar]:
        """**Returns:** `(eps, log|det dF/deps|)` with `eps = F^{-1}(z, t, x)`."""

    def inverse(self, z: Data, t: Time, x: Data, context: Context = None) -> Data:
        return self.inverse_and_log_det(z, t, x, context)[0]

    def log_prob(self, z: Data, t: Time, x: Data, context: Context = None) -> Scalar:
        eps, log_det = self.inverse_and_log_det(z, t, x, context)
        return standard_normal_log_prob(eps) - log_det

    def velocity(self, z: Data, t: Time, x: Data, context: Context = None) -> Data:
        eps = self.inverse(z, t, x, context)
        _, dz = jax.jvp(lambda s: self(eps, s, x, context), (t,), (jnp.ones_like(t),))
        return dz

    def score(self, z: Data, t: Time, x: Data, context: Context = None) -> Data:
        return jax.grad(self.log_prob)(z, t, x, context)

    def velocity_and_score(
        self, z: Data, t: Time, x: Data, context: Context = None
    ) -> tuple[Data, Data]:
        # One inverse pass serves both: the score is the gradient of the log-density
        # and the recovered eps (its auxiliary output) seeds the velocity's JVP.
        def log_prob_and_eps(y):
            eps, log_det = self.inverse_and_log_det(y, t, x, context)
            return standard_normal_log_prob(eps) - log_det, eps

        score, eps = jax.grad(log_prob_and_eps, has_aux=True)(z)
        _, dz = jax.jvp(lambda s: self(eps, s, x, context), (t,), (jnp.ones_like(t),))
        return dz, score

    def sample_terms(
        self, eps: Data, t: Time, x: Data, context: Context = None
    ) -> tuple[Data, Data, Data]:
        z, dz = jax.jvp(lambda s: self(eps, s, x, context), (t,), (jnp.ones_like(t),))
        return z, dz, self.score(z, t, x, context)

    def prior_kl(self, eps: Data, x: Data, context: Context = None) -> Scalar:
        one = jnp.ones((), x.dtype)
        z1 = self(eps, one, x, context)
        return self.log_prob(z1, one, x, context) - standard_normal_log_prob(z1)


def _check_delta(delta: float, name: str) -> None:
    if not 0 < delta < 1:
        raise ValueError(
            f"`{name}` needs a noise floor `delta` in (0, 1) (the scale of z_0 around "
            f"x; 0.01 is the usual choice), got {delta}."
        )


def _pinned_moments(
    out: Array, t: Time, x: Data, delta: float, pin_prior: bool
) -> tuple[Data, Data]:
    r"""NFDM-Gaussian's mean and scale from a network output `out` that stacks
    $(\bar\mu, \bar\ell)$ along its first axis (a vector of twice the data's entries,
    or an image of twice its channels). Shared by the vector and image processes so
    the boundary conditions are written once."""
    mean_bar, log_scale_bar = jnp.split(out, 2)
    bump = t * (1 - t) if pin_prior else t
    mu = (1 - t) * x + bump * mean_bar.reshape(x.shape)
    log_sigma = (1 - t) * math.log(delta) + bump * log_scale_bar.reshape(x.shape)
    return mu, jnp.exp(log_sigma)


class NFDMGaussian(AbstractGaussianProcess):
    r"""The learnable Gaussian forward process of NFDM ("NFDM-Gaussian").

    $$\mu = (1 - t)\,x + t(1 - t)\,\bar\mu_\phi(x, t), \qquad
    \log\sigma = (1 - t)\log\delta + t(1 - t)\,\bar\ell_\phi(x, t),$$

    with $(\bar\mu_\phi, \bar\ell_\phi)$ one network. Whatever the parameters,
    $q(z_0 \mid x) = \mathcal{N}(x, \delta^2 I)$ and $q(z_1 \mid x) = \mathcal{N}(0, I)$
    exactly, so the prior term of the bound vanishes.

    With `pin_prior=False` the factor $t(1 - t)$ becomes $t$: the end point
    $q(z_1 \mid x) = \mathcal{N}(\bar\mu_\phi(x, 1), e^{2\bar\ell_\phi(x, 1)})$ is
    learned too and the prior term is its KL to $\mathcal{N}(0, I)$. The process
    can then carry information about $x$ to $t = 1$, a learned coupling of noise and
    data, which is what straight generative paths (NFDM-OT) need: with $z_1$
    independent of $x$, the first step of the generative ODE can only move the noise
    by an affine map.

    **Arguments:**

    - `data_size`: number of entries of one example.
    - `context_size`: number of entries of the flattened context (0 for none).
    - `width_size`, `depth`: of the network (64 and 4 in the paper's 2D recipe).
    - `delta`: the noise floor at $t = 0$.
    - `pin_prior`: whether $z_1 = \varepsilon$ exactly (default) or learned.
    - `key`: a JAX PRNG key.
    """

    net: TimeMLP
    delta: float = eqx.field(static=True)
    pin_prior: bool = eqx.field(static=True)

    def __init__(
        self,
        data_size: int,
        *,
        context_size: int = 0,
        width_size: int = 64,
        depth: int = 4,
        delta: float = 0.01,
        pin_prior: bool = True,
        key: PRNGKeyArray,
    ):
        _check_delta(delta, "NFDMGaussian")
        self.pin_prior = bool(pin_prior)
        self.net = TimeMLP(
            data_size + context_size,
            2 * data_size,
            width_size=width_size,
            depth=depth,
            key=key,
        )
        self.delta = delta

    def mean_and_scale(
        self, t: Time, x: Data, context: Context = None
    ) -> tuple[Data, Data]:
        out = self.net(t, x, context).astype(x.dtype)
        return _pinned_moments(out, t, x, self.delta, self.pin_prior)

    def prior_kl(self, eps: Data, x: Data, context: Context = None) -> Scalar:
        if not self.pin_prior:
            return super().prior_kl(eps, x, context)
        # Exact by construction (mu_1 = 0, sigma_1 = 1): skip the network pass.
        del eps, context
        return jnp.zeros((), x.dtype)


class LinearInterpolant(AbstractGaussianProcess):
    r"""The fixed linear interpolant of flow matching with optimal-transport paths
    ("FM-OT"): $\mu = (1 - t)\,x$, $\sigma = t + (1 - t)\,\delta$.

    Its conditional velocity is $f = -x + (1 - \delta)\,\varepsilon$. Use it as a
    baseline with the same model and loss as a learned process.
    """

    delta: float = eqx.field(static=True, default=0.01)

    def __check_init__(self):
        _check_delta(self.delta, "LinearInterpolant")

    def mean_and_scale(
        self, t: Time, x: Data, context: Context = None
    ) -> tuple[Data, Data]:
        del context
        return (1 - t) * x, jnp.broadcast_to(t + (1 - t) * self.delta, x.shape)


class VariancePreserving(AbstractGaussianProcess):
    r"""The fixed variance-preserving process with a linear log-SNR schedule ("VDM").

    With $\gamma(t) = \gamma_{\min} + (\gamma_{\max} - \gamma_{\min})\,t$ (minus the
    log signal-to-noise ratio): $\mu = \sqrt{\mathrm{sigmoid}(-\gamma)}\,x$ and
    $\sigma = \sqrt{\mathrm{sigmoid}(\gamma)}$. Paired with
    [`nfdm_sciml.LinearSNRVolatility`][] of the same schedule this is the VP-SDE.
    $q(z_1 \mid x)$ is only close to $\mathcal{N}(0, I)$, so the prior term is small
    but not zero.
    """

    gamma_min: float = eqx.field(static=True, default=-10.0)
    gamma_max: float = eqx.field(static=True, default=10.0)

    def __check_init__(self):
        if not self.gamma_min < self.gamma_max:
            raise ValueError(
                "`VariancePreserving` needs gamma_min < gamma_max (noise must grow "
                f"with t); got {self.gamma_min} and {self.gamma_max}."
            )

    def mean_and_scale(
        self, t: Time, x: Data, context: Context = None
    ) -> tuple[Data, Data]:
        del context
        gamma = self.gamma_min + (self.gamma_max - self.gamma_min) * t
        alpha = jnp.sqrt(jax.nn.sigmoid(-gamma))
        sigma = jnp.sqrt(jax.nn.sigmoid(gamma))
        return alpha * x, jnp.broadcast_to(sigma, x.shape)
