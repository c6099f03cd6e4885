r"""Likelihoods: the variational bound (NELBO) and the ODE log-likelihood.

Both are reported in nats per example and in bits per dimension,
$\text{bits/dim} = \text{nats} / (D \ln 2)$, with standard errors over the examples.
"""

import math
from typing import Literal

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import check_batch
from ._custom_types import Batch, Context
from ._forward import standard_normal_log_prob
from ._model import LossTerms, NFDM


class LikelihoodEstimate(eqx.Module):
    """A likelihood estimate over a set of examples.

    - `per_example`: the estimate for each example, in nats (a negative
      log-likelihood: lower is better).
    - `nats`, `nats_stderr`: their mean and its standard error.
    - `bits_per_dim`, `bits_per_dim_stderr`: the same per dimension, in bits.
    - `terms`: for the NELBO, the mean of each bound term (else `None`).
    """

    per_example: Float[Array, " n"]
    nats: Float[Array, ""]
    nats_stderr: Float[Array, ""]
    bits_per_dim: Float[Array, ""]
    bits_per_dim_stderr: Float[Array, ""]
    terms: LossTerms | None = None


def _summarise(per_example, data_size: int, terms=None) -> LikelihoodEstimate:
    n = per_example.shape[0]
    mean = jnp.mean(per_example)
    stderr = jnp.std(per_example, ddof=1) / math.sqrt(n) if n > 1 else jnp.nan
    stderr = jnp.asarray(stderr)
    scale = 1 / (data_size * math.log(2))
    return LikelihoodEstimate(
        per_example, mean, stderr, mean * scale, stderr * scale, terms
    )


@eqx.filter_jit
def _nelbo_per_example(model, xs, keys, contexts, num_times, chunk_size):
    def one(args):
        x, key, context = args
        ukey, ekey = jr.split(key)
        # Stratified times: one uniform draw in each of `num_times` equal strata.
        offsets = jr.uniform(ukey, (num_times,), dtype=x.dtype)
        ts = (jnp.arange(num_times, dtype=x.dtype) + offsets) / num_times
        eps = jr.normal(ekey, (num_times, *x.shape), dtype=x.dtype)

        def terms_at(t, e):
            return LossTerms(
                model.diffusion_loss(x, t, e, context),
                model.prior_loss(x, e, context),
                model.reconstruction_loss(x, e, context),
            )

        return jax.tree.map(jnp.mean, jax.vmap(terms_at)(ts, eps))

    return jax.lax.map(one, (xs, keys, contexts), batch_size=chunk_size)


def nelbo_estimate(
    model: NFDM,
    xs: Batch,
    *,
    key: PRNGKeyArray,
    num_times: int = 128,
    contexts: Context = None,
    chunk_size: int = 64,
) -> LikelihoodEstimate:
    r"""Estimates the negative ELBO of each example, an upper bound on its NLL.

    For every example the diffusion term is averaged over `num_times` stratified times
    ($t_k = (k + u_k)/K$) with fresh noise at each, which removes most of the variance
    of the single-sample estimate used for training; the prior and reconstruction terms
    are averaged over the same noise draws.

    **Arguments:**

    - `model`: an [`nfdm_sciml.NFDM`][].
    - `xs`: held-out examples, shape `(n, *data_shape)`.
    - `key`: a JAX PRNG key.
    - `num_times`: Monte Carlo times per example.
    - `contexts`: per-example contexts with a leading axis, or `None`.
    - `chunk_size`: examples evaluated at once (bounds memory).

    **Returns:** a [`nfdm_sciml.LikelihoodEstimate`][]; for data on discrete levels
    with a discretised decoder, `bits_per_dim` is a bound on the discrete likelihood.
    """
    xs = check_batch(xs, model.data_shape)
    if not (isinstance(num_times, int) and num_times > 0):
        raise ValueError(f"`num_times` must be a positive integer, got {num_times!r}.")
    keys = jr.split(key, xs.shape[0])
    terms = _nelbo_per_example(model, xs, keys, contexts, num_times, chunk_size)
    return _summarise(terms.nelbo, model.data_size, jax.tree.map(jnp.mean, terms))


@eqx.filter_jit
def _ode_log_prob(model, xs, probes, contexts, exact, solver, rtol, atol, max_steps):
    shape = model.data_shape

    def one(args):
        x, probe, context = args

        def drift(z_flat, t):
            return model.ode_drift(z_flat.reshape(shape), t, context).reshape(-1)

        def vector_field(t, state, args):
            z, _ = state
            if exact:
                # D forward-mode passes: exact, and cheap in low dimension.
                velocity, jacobian = drift(z, t), jax.jacfwd(drift)(z, t)
                divergence = jnp.trace(jacobian)
            else:
                # Hutchinson: E[v^T J v] = tr J for Rademacher v, one JVP per probe.
                def jvp(v):
                    return jax.jvp(lambda y: drift(y, t), (z,), (v,))

                velocity, jv = jax.vmap(jvp, out_axes=(None, 0))(probe)
                divergence = jnp.mean(jnp.sum(probe * jv, axis=-1))
            return velocity, divergence

        y0 = (x.reshape(-1), jnp.zeros((), x.dtype))
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            solver(),
            0.0,
            1.0,
            1e-2,
            y0,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=max_steps,
        )
        z1, integral = jax.tree.map(lambda y: y[-1], sol.ys)
        # Change of variables along the flow: log p_0(x) = log p_1(z_1) + int div f dt.
        return standard_normal_log_prob(z1) + integral

    return jax.lax.map(one, (xs, probes, contexts), batch_size=64)


def ode_log_likelihood(
    model: NFDM,
    xs: Batch,
    *,
    key: PRNGKeyArray | None = None,
    trace: Literal["exact", "hutchinson"] = "exact",
    num_probes: int = 4,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    contexts: Context = None,
    max_steps: int = 16384,
) -> LikelihoodEstimate:
    r"""The negative log-likelihood of each example under the deterministic model.

    Integrates $\mathrm{d}z = f(z, t, \hat x_\theta(z, t))\,\mathrm{d}t$ from the data
    at $t = 0$ to $t = 1$ with Tsit5, accumulating the divergence of the drift:
    $\log p_0(x) = \log\mathcal{N}(z_1; 0, I) + \int_0^1 \nabla\cdot f\,\mathrm{d}t$.
    This is the likelihood of the ODE model (see [`nfdm_sciml.NFDM.ode_drift`][]), not
    a bound on the SDE model's.

    **Arguments:**

    - `model`, `xs`: as for [`nfdm_sciml.nelbo_estimate`][].
    - `key`: needed for `trace="hutchinson"` (the probe vectors).
    - `trace`: `"exact"` (Jacobian trace; use in low dimension) or `"hutchinson"`
      (an unbiased estimate with `num_probes` Rademacher probes, fixed along each
      solve; use in high dimension).
    - `rtol`, `atol`: tolerances of the adaptive solver.
    - `contexts`: per-example contexts, or `None`.
    - `max_steps`: the most solver steps per example.

    **Returns:** a [`nfdm_sciml.LikelihoodEstimate`][] of negative log-likelihoods of
    the continuous density at `x` (no dequantisation).
    """
    xs = check_batch(xs, model.data_shape)
    if trace not in ("exact", "hutchinson"):
        raise ValueError(f"`trace` must be 'exact' or 'hutchinson', got {trace!r}.")
    n, size = xs.shape[0], model.data_size
    if trace == "hutchinson":
        if key is None:
            raise ValueError("`trace='hutchinson'` needs a `key` for its probes.")
        if not (isinstance(num_probes, int) and num_probes > 0):
            raise ValueError(
                f"`num_probes` must be a positive integer, got {num_probes}."
            )
        probes = jr.rademacher(key, (n, num_probes, size), dtype=xs.dtype)
    else:
        probes = jnp.zeros((n, 1, 1), xs.dtype)
    log_probs = _ode_log_prob(
        model,
        xs,
        probes,
        contexts,
        trace == "exact",
        diffrax.Tsit5,
        rtol,
        atol,
        max_steps,
    )
    return _summarise(-log_probs, size)
