r"""Sampling the generative process with Diffrax: reverse SDE and deterministic ODE.

Generation runs from $t = 1$ (noise) to $t = 0$ (data). Internally every solve uses
the reversed clock $s = 1 - t$, so that Diffrax integrates forward in $s$ and the
reverse-time Wiener process $\bar w$ of the generative SDE is an ordinary Brownian
motion in $s$:
$$\mathrm{d}y = -\hat f(y, 1 - s)\,\mathrm{d}s + g(1 - s)\,\mathrm{d}W_s,
\qquad y(s) = z(1 - s).$$
Each example is solved on its own (the solve is `jax.vmap`ped), so adaptive solvers
choose steps per example.
"""

from typing import cast, Literal, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._checks import check_batch
from ._custom_types import Context
from ._flow_matching import FlowMatching
from ._model import NFDM


SDESolver = Literal["euler", "heun", "shark", "spark"]
ODESolver = Literal["euler", "heun", "tsit5"]

_SDE_SOLVERS = {
    # name: (solver, Levy area it needs, can adapt its steps)
    "euler": (diffrax.Euler, diffrax.BrownianIncrement, False),
    "heun": (diffrax.Heun, diffrax.BrownianIncrement, True),
    "shark": (diffrax.ShARK, diffrax.SpaceTimeLevyArea, False),
    "spark": (diffrax.SPaRK, diffrax.SpaceTimeLevyArea, True),
}
_ODE_SOLVERS = {
    "euler": (diffrax.Euler, False),
    "heun": (diffrax.Heun, True),
    "tsit5": (diffrax.Tsit5, True),
}


class ReverseSolution(eqx.Module):
    """The result of a generative solve.

    - `samples`: the states at $t = 0$, shape `(num_samples, *data_shape)`.
    - `ts`: the saved times in decreasing order, from 1 to 0, or `None`.
    - `trajectories`: the states at `ts`, shape `(num_samples, len(ts), *data_shape)`,
      or `None` when no trajectory was asked for.
    - `num_steps`: the number of accepted solver steps for each sample.
    """

    samples: Float[Array, " n *dims"]
    ts: Float[Array, " times"] | None
    trajectories: Float[Array, " n times *dims"] | None
    num_steps: Int[Array, " n"]


def model_dtype(model) -> jnp.dtype:
    """The floating dtype of the model's parameters (the default float if none)."""
    leaves = [x for x in jax.tree.leaves(model) if eqx.is_inexact_array(x)]
    return leaves[0].dtype if leaves else jnp.dtype(jnp.result_type(float))


def _initial_noise(model, num_samples, z1, key, dtype, stochastic=False) -> Array:
    if stochastic and not isinstance(model, NFDM):
        raise TypeError(
            f"`sample_sde` needs an `NFDM`, got {type(model).__name__}; a model with "
            "only an ODE drift (such as FlowMatching) is sampled with `sample_ode`."
        )
    if not (hasattr(model, "ode_drift") and hasattr(model, "data_shape")):
        raise TypeError(
            "`model` must be an `NFDM` or another model with `ode_drift` and "
            f"`data_shape` (such as FlowMatching), got {type(model).__name__}."
        )
    if z1 is not None:
        return check_batch(z1, model.data_shape, "z1")
    if not (isinstance(num_samples, int) and num_samples > 0):
        raise ValueError(
            f"`num_samples` must be a positive integer (or pass `z1`), got "
            f"{num_samples!r}."
        )
    return jr.normal(key, (num_samples, *model.data_shape), dtype=dtype)


def _check_steps(adaptive: bool, num_steps: int, num_saves: int | None) -> None:
    if not adaptive and not (isinstance(num_steps, int) and num_steps > 0):
        raise ValueError(f"`num_steps` must be a positive integer, got {num_steps!r}.")
    if num_saves is not None and not (isinstance(num_saves, int) and num_saves >= 2):
        raise ValueError(
            "`num_saves` must be None or an integer >= 2 (the saved times include "
            f"both ends), got {num_saves!r}."
        )


class _SolveOptions(NamedTuple):
    # Everything static about a solve, hashable, so that `filter_jit` compiles once
    # per distinct set of options.
    stochastic: bool
    solver: str
    adaptive: bool
    rtol: float
    atol: float
    num_steps: int
    num_saves: int | None
    max_steps: int


@eqx.filter_jit
def _solve(model, z1, keys, contexts, options: _SolveOptions) -> ReverseSolution:
    stochastic, solver, adaptive, rtol, atol, num_steps, num_saves, max_steps = options
    shape, size = model.data_shape, model.data_size
    if stochastic:
        cls, levy_area, _ = _SDE_SOLVERS[solver]
    else:
        (cls, _), levy_area = _ODE_SOLVERS[solver], diffrax.BrownianIncrement
    if adaptive:
        controller, dt0 = diffrax.PIDController(rtol=rtol, atol=atol), 1e-2
    else:
        controller, dt0 = diffrax.ConstantStepSize(), 1.0 / num_steps
    if num_saves is None:
        saveat, ts = diffrax.SaveAt(t1=True), None
    else:
        s_saves = jnp.linspace(0.0, 1.0, num_saves, dtype=z1.dtype)
        saveat, ts = diffrax.SaveAt(ts=s_saves), 1 - s_saves

    def one(y1, key, context):
        drift_fn = model.reverse_drift if stochastic else model.ode_drift

        def drift(s, y, args):
            return -drift_fn(y.reshape(shape), 1 - s, context).reshape(-1)

        terms = diffrax.ODETerm(drift)
        if stochastic:
            if adaptive:
                # Step rejection revisits times, which only a Brownian tree allows.
                bm = diffrax.VirtualBrownianTree(
                    0.0, 1.0, tol=2.0**-14, shape=(size,), key=key, levy_area=levy_area
                )
            else:
                bm = diffrax.UnsafeBrownianPath((size,), key, levy_area=levy_area)

            def diffusion(s, y, args):
                g = model.volatility(jnp.asarray(1 - s, y.dtype))
                return lx.DiagonalLinearOperator(jnp.broadcast_to(g, (size,)))

            terms = diffrax.MultiTerm(terms, diffrax.ControlTerm(diffusion, bm))
        return diffrax.diffeqsolve(
            terms,
            cls(),
            0.0,
            1.0,
            dt0,
            y1.reshape(-1),
            saveat=saveat,
            stepsize_controller=controller,
            max_steps=max_steps,
            # The fast fixed-step Brownian path cannot be replayed backwards, so
            # it does not support reverse-mode differentiation through the solve.
            adjoint=diffrax.ForwardMode()
            if stochastic and not adaptive
            else diffrax.RecursiveCheckpointAdjoint(),
        )

    context_axis = None if contexts is None else 0
    sol = jax.vmap(one, in_axes=(0, 0, context_axis))(z1, keys, contexts)
    ys = cast(Array, sol.ys).reshape(z1.shape[0], -1, *shape)
    return ReverseSolution(
        ys[:, -1],
        ts,
        None if ts is None else ys,
        sol.stats["num_accepted_steps"],
    )


def sample_sde(
    model: NFDM,
    num_samples: int | None = None,
    *,
    key: PRNGKeyArray,
    solver: SDESolver = "euler",
    num_steps: int = 300,
    adaptive: bool = False,
    rtol: float = 1e-3,
    atol: float = 1e-3,
    num_saves: int | None = None,
    contexts: Context = None,
    z1: Float[Array, " n *dims"] | None = None,
    max_steps: int = 16384,
) -> ReverseSolution:
    r"""Samples the generative SDE $\mathrm{d}z = \hat f_{\theta}(z, t)\,\mathrm{d}t +
    g(t)\,\mathrm{d}\bar w$ from $t = 1$ to $t = 0$ with Diffrax.

    **Arguments:**

    - `model`: the trained [`nfdm_sciml.NFDM`][].
    - `num_samples`: how many samples to draw (ignored when `z1` is given).
    - `key`: a JAX PRNG key for the initial noise and the Brownian motion.
    - `solver`: `"euler"` (Euler–Maruyama, as in the authors' code), `"heun"`,
      `"shark"` (high order for additive noise) or `"spark"` (adaptive, additive
      noise). The noise is additive ($g$ depends on $t$ only), so Itô and
      Stratonovich solvers agree.
    - `num_steps`: the number of uniform steps when not adaptive.
    - `adaptive`: adapt the step size with a PID controller (`"heun"` or `"spark"`);
      a virtual Brownian tree then gives consistent noise across rejected steps.
    - `rtol`, `atol`: tolerances for adaptive steps.
    - `num_saves`: if given, also return trajectories at that many uniform times.
    - `contexts`: per-sample contexts with a leading axis, for conditional models.
    - `z1`: the initial states, shape `(n, *data_shape)`; default $\mathcal{N}(0, I)$.
    - `max_steps`: the most steps any one sample may take.

    **Returns:** a [`nfdm_sciml.ReverseSolution`][].
    """
    if solver not in _SDE_SOLVERS:
        raise ValueError(
            f"Unknown SDE solver {solver!r}; choose one of {sorted(_SDE_SOLVERS)}."
        )
    if adaptive and not _SDE_SOLVERS[solver][2]:
        raise ValueError(
            f"The SDE solver {solver!r} has no error estimate, so it cannot adapt its "
            "steps; use solver='heun' or 'spark' with adaptive=True, or set "
            "adaptive=False."
        )
    _check_steps(adaptive, num_steps, num_saves)
    nkey, bkey = jr.split(key)
    z1 = _initial_noise(model, num_samples, z1, nkey, model_dtype(model), True)
    keys = jr.split(bkey, z1.shape[0])
    options = _SolveOptions(
        True, solver, adaptive, rtol, atol, num_steps, num_saves, max_steps
    )
    return _solve(model, z1, keys, contexts, options)


def sample_ode(
    model: NFDM | FlowMatching,
    num_samples: int | None = None,
    *,
    key: PRNGKeyArray,
    solver: ODESolver = "tsit5",
    num_steps: int = 100,
    adaptive: bool | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    num_saves: int | None = None,
    contexts: Context = None,
    z1: Float[Array, " n *dims"] | None = None,
    max_steps: int = 16384,
) -> ReverseSolution:
    r"""Samples the deterministic generative ODE $\mathrm{d}z = f(z, t,
    \hat x_\theta(z, t))\,\mathrm{d}t$ from $t = 1$ to $t = 0$ with Diffrax.

    **Arguments:** as for [`nfdm_sciml.sample_sde`][], except

    - `solver`: `"euler"`, `"heun"` or `"tsit5"`.
    - `adaptive`: defaults to `True` for `"tsit5"` and `False` otherwise (a fixed grid
      of `num_steps` steps: one drift evaluation per step for Euler, two for Heun).
    - `key`: used only to draw the initial noise.

    **Returns:** a [`nfdm_sciml.ReverseSolution`][].
    """
    if solver not in _ODE_SOLVERS:
        raise ValueError(
            f"Unknown ODE solver {solver!r}; choose one of {sorted(_ODE_SOLVERS)}."
        )
    if adaptive is None:
        adaptive = solver == "tsit5"
    if adaptive and not _ODE_SOLVERS[solver][1]:
        raise ValueError(
            f"The ODE solver {solver!r} has no error estimate, so it cannot adapt its "
            "steps; use 'heun' or 'tsit5', or set adaptive=False."
        )
    _check_steps(adaptive, num_steps, num_saves)
    z1 = _initial_noise(model, num_samples, z1, key, model_dtype(model))
    keys = jr.split(key, z1.shape[0])
    options = _SolveOptions(
        False, solver, adaptive, rtol, atol, num_steps, num_saves, max_steps
    )
    return _solve(model, z1, keys, contexts, options)
