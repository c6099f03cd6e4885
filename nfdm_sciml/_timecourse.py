r"""Trajectory inference: continuous dynamics in real time from population snapshots.

A population is observed at times $t_0 < \dots < t_K$ without following any
individual. [`nfdm_sciml.TimeCourseNFDM`][] learns one generative SDE (and ODE) in
real time whose marginals pass through every snapshot. Its forward process is NFDM's,
conditioned on a whole *chain* $c = (x_0, \dots, x_K)$, one sample per snapshot,
linked by couplings from consecutive snapshots (`AbstractCoupling.match`): on the
interval $[t_k, t_{k+1}]$, with $u = (t - t_k)/(t_{k+1} - t_k)$,
$$\mu(t; c) = H_k(u; c) + u(1 - u)\,\bar\mu_\phi(t, c), \qquad
\sigma(t; c) = \delta + 4u(1 - u)\,s\,e^{\bar\ell_\phi(t, c)},$$
where $H_k$ is the cubic Hermite spline through the chain with the slopes of the
parabolas through consecutive triples of points (Catmull-Rom's on even knots), so
that each conditional path is smooth across snapshots and bends as its neighbours
say, and $z_{t_k} = x_k + \delta\varepsilon$ exactly.

The generative drift is Markov in $(z, t)$: a predictor guesses the whole chain from
the current state, $\hat c_\theta(z, t)$, and the drift is the conditional forward
drift with the guess plugged in, as NFDM does with $\hat x_\theta$. The loss is the KL
between the forward and generative path measures in forward time, simulation-free:
$$\mathcal{L} = \mathbb{E}_{c, t, \varepsilon}\,
\frac{\|f_q(z_t, t; c) - f_q(z_t, t; \hat c_\theta(z_t, t))\|^2}{2 g(t)^2}, \qquad
f_q = \partial_t \mu + \partial_t \sigma\, \varepsilon
+ \tfrac{g^2}{2} \nabla_z \log q(z_t \mid c).$$
Generation starts from a snapshot and integrates $\mathrm{d}z = f_\theta\,\mathrm{d}t +
g\,\mathrm{d}W$ (or the ODE with the conditional velocity) forward in time.

Internally time is normalised, $r = (t - t_0)/(t_K - t_0) \in [0, 1]$; the
volatility, the penalties and the networks see $r$, users pass real times.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, cast, Literal

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import check_batch
from ._constraints import PathPoint, Penalties
from ._couplings import AbstractCoupling, ExactOTCoupling, SinkhornCoupling
from ._custom_types import Scalar
from ._forward import _check_delta
from ._nets import TimeMLP
from ._volatility import AbstractVolatility, NeuralVolatility


# ---------------------------------------------------------------------------------
# Data: snapshots of a population.


class Snapshots:
    """Samples of one population at a few increasing times, each its own array.

    Build it from arrays (`Snapshots(times, populations)`), from one array with a time
    label per row ([`nfdm_sciml.Snapshots.from_labels`][]), or from an AnnData object
    ([`nfdm_sciml.Snapshots.from_anndata`][]). Populations may differ in size; every
    one needs at least one sample, all of one dimension, with no NaN or infinity.

    **Arguments:**

    - `times`: the observation times, strictly increasing, at least two.
    - `populations`: one array of shape `(n_k, dim)` per time.
    """

    times: tuple[float, ...]
    populations: tuple[np.ndarray, ...]

    def __init__(self, times: Sequence[float] | np.ndarray, populations: Sequence[Any]):
        times = tuple(float(t) for t in np.asarray(times, dtype=float).ravel())
        if len(times) != len(populations):
            raise ValueError(
                f"Got {len(times)} times but {len(populations)} populations; pass one "
                "population array per observation time."
            )
        if len(times) < 2:
            raise ValueError(
                "A time course needs snapshots at two or more times; got "
                f"{len(times)}. With a single time point there are no dynamics to fit."
            )
        if not all(math.isfinite(t) for t in times):
            raise ValueError(f"The times must be finite numbers; got {times}.")
        if not all(a < b for a, b in zip(times, times[1:], strict=False)):
            raise ValueError(
                f"The times must be strictly increasing, got {times}; sort the "
                "snapshots by time (`Snapshots.from_labels` does this for you) and "
                "merge repeated times."
            )
        arrays = []
        for t, x in zip(times, populations, strict=True):
            x = np.asarray(x)
            if not np.issubdtype(x.dtype, np.floating):
                x = x.astype(np.float64) if np.issubdtype(x.dtype, np.number) else x
            if x.ndim != 2 or x.shape[0] == 0 or not np.issubdtype(x.dtype, np.number):
                raise ValueError(
                    f"The population at t = {t} must be a non-empty numeric array of "
                    f"shape (samples, dim); got {x.dtype} of shape {x.shape}."
                )
            if not np.all(np.isfinite(x)):
                bad = int(np.sum(~np.all(np.isfinite(x), axis=1)))
                raise ValueError(
                    f"The population at t = {t} has {bad} rows with NaN or infinite "
                    "values; drop or impute them before building the snapshots."
                )
            arrays.append(x)
        dims = {x.shape[1] for x in arrays}
        if len(dims) != 1:
            raise ValueError(
                f"Every population needs the same dimension; got dimensions "
                f"{[x.shape[1] for x in arrays]} at times {times}."
            )
        self.times, self.populations = times, tuple(arrays)

    @classmethod
    def from_labels(cls, x: Any, labels: Any) -> "Snapshots":
        """Groups the rows of `x` (shape `(n, dim)`) by their time label (shape
        `(n,)`), sorted by time. Labels must be numbers, none missing."""
        x, labels = np.asarray(x), np.asarray(labels)
        if labels.ndim != 1 or x.ndim != 2 or labels.shape[0] != x.shape[0]:
            raise ValueError(
                "`from_labels` needs data of shape (n, dim) and one time label per "
                f"row, shape (n,); got {x.shape} and {labels.shape}."
            )
        try:
            numeric = labels.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError(
                "The time labels must be numbers (e.g. days or hours); got values "
                f"such as {labels[:3].tolist()}. Map them to numeric times first."
            ) from None
        missing = ~np.isfinite(numeric)
        if np.any(missing):
            raise ValueError(
                f"{int(missing.sum())} samples have a missing (NaN) or infinite time "
                "label; drop them or give them a time."
            )
        times = np.unique(numeric)
        return cls(times.tolist(), [x[numeric == t] for t in times])

    @classmethod
    def from_anndata(
        cls, adata: Any, time_key: str, obsm_key: str | None = None
    ) -> "Snapshots":
        """From an `anndata.AnnData`: the time of each cell from the column
        `adata.obs[time_key]`, the coordinates from the embedding
        `adata.obsm[obsm_key]` (for example `"X_pca"`) or from `adata.X` if no key
        is given."""
        obs = getattr(adata, "obs", None)
        if obs is None or not hasattr(adata, "obsm"):
            raise TypeError(
                f"`from_anndata` needs an anndata.AnnData, got {type(adata).__name__}."
            )
        if time_key not in obs.columns:
            raise KeyError(
                f"No time column {time_key!r} in adata.obs; it has {list(obs.columns)}."
            )
        if obsm_key is None:
            x = adata.X
            x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
        else:
            if obsm_key not in adata.obsm:
                raise KeyError(
                    f"No embedding {obsm_key!r} in adata.obsm; it has "
                    f"{list(adata.obsm.keys())}."
                )
            x = np.asarray(adata.obsm[obsm_key])
        return cls.from_labels(x, np.asarray(obs[time_key], dtype=object))

    @property
    def dim(self) -> int:
        """The dimension of one sample."""
        return int(self.populations[0].shape[1])

    def __len__(self) -> int:
        return len(self.times)

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{t:g}: {len(x)}" for t, x in zip(self, self.populations, strict=True)
        )
        return f"Snapshots(dim={self.dim}, {{{sizes}}})"

    def __iter__(self):
        return iter(self.times)

    def drop(self, index: int) -> "Snapshots":
        """The snapshots without the one at position `index` (the held-out time of
        leave-one-out)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"No snapshot {index}; there are {len(self)}.")
        index %= len(self)
        keep = [i for i in range(len(self)) if i != index]
        return Snapshots(
            [self.times[i] for i in keep], [self.populations[i] for i in keep]
        )

    def map(self, fn: Callable[[np.ndarray], Any]) -> "Snapshots":
        """The snapshots with `fn` applied to every population (e.g. a
        [`nfdm_sciml.Standardiser`][]'s `transform`)."""
        return Snapshots(self.times, [np.asarray(fn(x)) for x in self.populations])

    def sampler(
        self, batch_size: int, dtype: Any = None
    ) -> Callable[[PRNGKeyArray], Float[Array, "batch times dim"]]:
        """A traceable `key -> batch` for [`nfdm_sciml.Trainer`][]: `batch_size`
        independent draws from every snapshot, shape `(batch, times, dim)`. The
        populations are copied to the device once."""
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"`batch_size` must be a positive integer: {batch_size}.")
        dtype = jnp.result_type(float) if dtype is None else dtype
        largest = max(len(x) for x in self.populations)
        padded = np.zeros((len(self), largest, self.dim))
        for i, x in enumerate(self.populations):
            padded[i, : len(x)] = x
        table = jnp.asarray(padded, dtype)
        counts = [len(x) for x in self.populations]
        sizes = jnp.asarray(counts, jnp.float32)
        last = jnp.asarray(counts, jnp.int32) - 1

        def sample(key: PRNGKeyArray) -> Float[Array, "batch times dim"]:
            u = jr.uniform(key, (batch_size, len(counts)), jnp.float32)
            rows = jnp.minimum((u * sizes[None]).astype(jnp.int32), last[None])
            return table[jnp.arange(len(counts))[None, :], rows]

        return sample

    def chain_sampler(
        self,
        batch_size: int,
        coupling: AbstractCoupling | None = None,
        *,
        max_size: int = 2000,
        seed: int = 0,
        dtype: Any = None,
    ) -> Callable[[PRNGKeyArray], Float[Array, "batch times dim"]]:
        """A traceable `key -> batch` of *chains*, shape `(batch, times, dim)`: a
        sample of the first snapshot, then at each later time a partner drawn from
        the coupling of the two whole populations (the plan's row for the previous
        link). The plans are computed once, here, so training pays nothing per step
        for them; use it with a model built with `coupling=None`.

        Coupling whole populations also avoids the bias of minibatch couplings. Each
        population is subsampled to at most `max_size` points (with `seed`), since the
        plans take `max_size**2` entries each; `ExactOTCoupling` needs equal sizes,
        so with it every population is subsampled to the smallest one.
        """
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"`batch_size` must be a positive integer: {batch_size}.")
        if not (isinstance(max_size, int) and max_size > 0):
            raise ValueError(f"`max_size` must be a positive integer: {max_size}.")
        coupling = _check_coupling(coupling)
        dtype = jnp.result_type(float) if dtype is None else dtype
        rng = np.random.default_rng(seed)
        sizes = [min(len(x), max_size) for x in self.populations]
        if isinstance(coupling, ExactOTCoupling):
            sizes = [min(sizes)] * len(sizes)
        pops = [
            jnp.asarray(x[rng.choice(len(x), n, replace=False)], dtype)
            for x, n in zip(self.populations, sizes, strict=True)
        ]
        largest = max(sizes)
        table = jnp.stack([jnp.pad(x, ((0, largest - len(x)), (0, 0))) for x in pops])
        log_plans = []
        for a, b in zip(pops[:-1], pops[1:], strict=True):
            plan = coupling.plan(a, b)
            # Rows carry the conditional of the next link; a row with no mass at all
            # (possible for an unbalanced plan) falls back to a uniform choice.
            empty = jnp.sum(plan, axis=1, keepdims=True) <= 0
            log_plan = jnp.where(empty, 0.0, jnp.log(plan)).astype(dtype)
            padded = jnp.full((largest, largest), -jnp.inf, dtype)
            log_plans.append(padded.at[: len(a), : len(b)].set(log_plan))
        log_plans = jnp.stack(log_plans)
        first = sizes[0]

        def sample(key: PRNGKeyArray) -> Float[Array, "batch times dim"]:
            keys = jr.split(key, len(sizes))
            rows = [jr.randint(keys[0], (batch_size,), 0, first)]
            for k in range(len(sizes) - 1):
                rows.append(jr.categorical(keys[k + 1], log_plans[k][rows[-1]], axis=1))
            index = jnp.stack(rows, axis=1)
            return table[jnp.arange(len(sizes))[None, :], index]

        return sample


# ---------------------------------------------------------------------------------
# The chain spline and the two models.


class _Knots(eqx.Module):
    # The normalised snapshot times, static: they decide the interval of every time.
    knots: tuple[float, ...] = eqx.field(static=True)
    start: float = eqx.field(static=True)
    span: float = eqx.field(static=True)

    @classmethod
    def of(cls, times: Sequence[float] | np.ndarray) -> "_Knots":
        times = [float(t) for t in times]
        if len(times) < 2 or not all(
            a < b for a, b in zip(times, times[1:], strict=False)
        ):
            raise ValueError(
                f"`times` must be two or more strictly increasing times; got {times}."
            )
        span = times[-1] - times[0]
        return cls(tuple((t - times[0]) / span for t in times), times[0], span)

    def real_times(self) -> tuple[float, ...]:
        return tuple(self.start + r * self.span for r in self.knots)

    def normalise(self, t) -> Any:
        return (t - self.start) / self.span

    def interval(self, r: Array) -> tuple[Array, Array, Array]:
        """`(k, u, h)`: the interval holding `r`, the position in it and its width."""
        knots = jnp.asarray(self.knots, r.dtype)
        k = jnp.clip(jnp.searchsorted(knots, r, side="right") - 1, 0, len(knots) - 2)
        h = knots[k + 1] - knots[k]
        return k, (r - knots[k]) / h, h

    def tangents(self, chain: Float[Array, "times dim"]) -> Float[Array, "times dim"]:
        """The slope at every knot of the parabola through it and its two neighbours
        (one-sided at the ends; the chord with only two knots). Exact for a
        quadratic, so the spline reproduces any quadratic path on any knots."""
        h = jnp.diff(jnp.asarray(self.knots, chain.dtype))
        d = jnp.diff(chain, axis=0) / h[:, None]
        if len(self.knots) == 2:
            return jnp.concatenate([d, d])
        left, right = h[:-1, None], h[1:, None]
        inner = (left * d[1:] + right * d[:-1]) / (left + right)
        first = ((2 * h[0] + h[1]) * d[0] - h[0] * d[1]) / (h[0] + h[1])
        last = ((2 * h[-1] + h[-2]) * d[-1] - h[-1] * d[-2]) / (h[-1] + h[-2])
        return jnp.concatenate([first[None], inner, last[None]])

    def spline(
        self, r: Array, chain: Float[Array, "times dim"], cubic: bool
    ) -> Float[Array, " dim"]:
        k, u, h = self.interval(r)
        if not cubic:
            return (1 - u) * chain[k] + u * chain[k + 1]
        m = self.tangents(chain)
        h00, h10 = 2 * u**3 - 3 * u**2 + 1, u**3 - 2 * u**2 + u
        h01, h11 = -2 * u**3 + 3 * u**2, u**3 - u**2
        return h00 * chain[k] + h10 * h * m[k] + h01 * chain[k + 1] + h11 * h * m[k + 1]


def _check_dim(dim) -> None:
    if not (isinstance(dim, int) and dim > 0):
        raise ValueError(f"`dim` must be a positive integer, got {dim!r}.")


def _check_snapshot_batch(batch, num_times: int, dim: int) -> Array:
    return check_batch(batch, (num_times, dim), "batch (draws from every snapshot)")


def _chain(coupling: AbstractCoupling | None, batch: Array, key: PRNGKeyArray) -> Array:
    """Links independent draws from each snapshot into chains: each sample at time
    $t_k$ gets a partner at $t_{k+1}$ from the coupling of the two minibatches.
    Without a coupling the batch holds chains already."""
    if coupling is None:
        return batch
    links = [batch[:, 0]]
    for k, lkey in enumerate(jr.split(key, batch.shape[1] - 1), start=1):
        links.append(coupling.match(links[-1], batch[:, k], key=lkey))
    return jnp.stack(links, axis=1)


def _check_coupling(coupling) -> AbstractCoupling:
    coupling = SinkhornCoupling(epsilon=0.01) if coupling is None else coupling
    if not isinstance(coupling, AbstractCoupling):
        raise TypeError(
            "`coupling` must be an AbstractCoupling such as SinkhornCoupling or "
            f"ExactOTCoupling; got {type(coupling).__name__}."
        )
    return coupling


class TimeCourseSolution(eqx.Module):
    """Simulated populations of a time-course model.

    - `times`: the saved real times, increasing, shape `(saves,)`.
    - `trajectories`: the states there, shape `(n, saves, dim)`.
    """

    times: Float[Array, " saves"]
    trajectories: Float[Array, "n saves dim"]

    @property
    def final(self) -> Float[Array, "n dim"]:
        """The states at the last saved time."""
        return self.trajectories[:, -1]


def _simulate(
    knots: _Knots,
    drift: Callable[[Array, Array], Array],
    volatility: Callable[[Array], Array] | None,
    z0: Array,
    t_start: float,
    t_end: float,
    save_times: Sequence[float] | None,
    num_steps: int,
    key: PRNGKeyArray,
) -> TimeCourseSolution:
    """Fixed-step Euler (Euler–Maruyama with `volatility`) from `t_start` to `t_end`
    on a grid that also steps on every snapshot time (where the drift switches
    interval) and every saved time, so nothing is interpolated."""
    t_start, t_end = float(t_start), float(t_end)
    if not t_end > t_start:
        raise ValueError(
            f"`t_end` must come after `t_start`; got {t_start} -> {t_end}. The model "
            "runs forward in time."
        )
    if not (isinstance(num_steps, int) and num_steps > 0):
        raise ValueError(f"`num_steps` must be a positive integer, got {num_steps!r}.")
    saves = [t_end] if save_times is None else sorted(float(t) for t in save_times)
    if not saves or saves[0] < t_start or saves[-1] > t_end:
        raise ValueError(
            f"`save_times` must lie in [t_start, t_end] = [{t_start}, {t_end}]; got "
            f"{saves}."
        )
    r0, r1 = knots.normalise(t_start), knots.normalise(t_end)
    r_saves = [knots.normalise(t) for t in saves]
    inside = [r for r in knots.knots if r0 < r < r1]
    grid = np.unique(np.concatenate([np.linspace(r0, r1, num_steps + 1), inside]))
    grid = np.unique(np.concatenate([grid, r_saves]))
    # Times closer than float32 can tell apart (a save time next to a uniform step)
    # would make the steps non-increasing: keep the first of each such cluster.
    keep = np.concatenate([[True], np.diff(grid) > 1e-6])
    grid = grid[keep]
    return _solve_grid(drift, volatility, z0, tuple(grid), tuple(r_saves), key, saves)


def _solve_grid(drift, volatility, z0, grid, r_saves, key, saves):
    dtype = z0.dtype
    ts = jnp.asarray(grid, dtype)
    saveat = diffrax.SaveAt(ts=jnp.asarray(r_saves, dtype))
    dim = z0.shape[-1]

    def one(y0, key):
        terms = diffrax.ODETerm(lambda r, y, args: drift(y, r))
        if volatility is not None:
            bm = diffrax.UnsafeBrownianPath((dim,), key)

            def diffusion(r, y, args):
                g = volatility(jnp.asarray(r, dtype))
                return lx.DiagonalLinearOperator(jnp.broadcast_to(g, (dim,)))

            terms = diffrax.MultiTerm(terms, diffrax.ControlTerm(diffusion, bm))
        sol = diffrax.diffeqsolve(
            terms,
            diffrax.Euler(),
            ts[0],
            ts[-1],
            None,
            y0,
            saveat=saveat,
            stepsize_controller=diffrax.StepTo(ts=ts),
            max_steps=len(grid),
            adjoint=diffrax.ForwardMode()
            if volatility is not None
            else diffrax.RecursiveCheckpointAdjoint(),
        )
        return sol.ys

    keys = jr.split(key, z0.shape[0])
    ys = jax.vmap(one)(z0, keys)
    return TimeCourseSolution(jnp.asarray(saves, dtype), cast(Array, ys))


_solve_grid = eqx.filter_jit(_solve_grid)


class TimeCourseNFDM(eqx.Module):
    r"""A neural flow diffusion model of a time course: one generative SDE (and ODE)
    in real time, trained on population snapshots without simulation.

    Each training batch holds one chain per row, shape `(batch, times, dim)`: a
    sample of every snapshot, linked across consecutive times by a coupling, either
    of the whole populations ([`nfdm_sciml.Snapshots.chain_sampler`][]) or of the
    minibatch (independent draws from [`nfdm_sciml.Snapshots.sampler`][] and a
    `coupling` given to the model). The forward process of a chain is a cubic
    spline through it (`interpolation="cubic"`, or piecewise linear) reshaped by a
    network between the snapshots, with a spread that vanishes to `delta` at every
    snapshot; see the module docstring for the equations. The predictor guesses the
    whole chain from `(z, t)`, which makes the generative drift Markov. The
    penalties of [`nfdm_sciml.Penalties`][] apply to the forward paths, in normalised
    time $r = (t - t_0)/(t_K - t_0)$; [`nfdm_sciml.KineticEnergy`][] is the one most
    used here.

    **Arguments:**

    - `times`: the snapshot times the model is trained on, strictly increasing.
    - `dim`: the dimension of one sample.
    - `key`: a JAX PRNG key.
    - `coupling`: `None` (the default) if the batches are chains already, drawn
      from couplings of whole populations by [`nfdm_sciml.Snapshots.chain_sampler`][]
      (what [`nfdm_sciml.fit_time_course`][] does); or a coupling that links
      independent draws ([`nfdm_sciml.Snapshots.sampler`][]) minibatch by minibatch.
    - `width_size`, `depth`: of every network.
    - `delta`: the spread of each conditional path at the snapshots.
    - `spread`: the base spread half-way between snapshots, before the network
      reshapes it (in the units of the data, which are best standardised).
    - `interpolation`: `"cubic"` or `"linear"`: the base path through a chain.
    - `volatility`: $g(r)$; a learned [`nfdm_sciml.NeuralVolatility`][] by default.
    """

    forward_net: TimeMLP
    predictor: TimeMLP
    velocity: TimeMLP
    volatility: AbstractVolatility
    coupling: AbstractCoupling | None
    knots: _Knots
    dim: int = eqx.field(static=True)
    delta: float = eqx.field(static=True)
    spread: float = eqx.field(static=True)
    cubic: bool = eqx.field(static=True)

    def __init__(
        self,
        times: Sequence[float] | np.ndarray,
        dim: int,
        *,
        key: PRNGKeyArray,
        coupling: AbstractCoupling | None = None,
        width_size: int = 64,
        depth: int = 3,
        delta: float = 0.02,
        spread: float = 0.1,
        interpolation: Literal["cubic", "linear"] = "cubic",
        volatility: AbstractVolatility | None = None,
    ):
        _check_delta(delta, "TimeCourseNFDM")
        if not spread > 0:
            raise ValueError(f"`spread` must be > 0, got {spread}.")
        if interpolation not in ("cubic", "linear"):
            raise ValueError(
                f"`interpolation` must be 'cubic' or 'linear', got {interpolation!r}."
            )
        _check_dim(dim)
        self.knots = _Knots.of(times)
        self.dim, self.delta, self.spread = dim, float(delta), float(spread)
        self.cubic = interpolation == "cubic"
        self.coupling = None if coupling is None else _check_coupling(coupling)
        fkey, pkey, vkey, okey = jr.split(key, 4)
        size = len(self.knots.knots) * dim
        self.forward_net = TimeMLP(
            size, 2 * dim, width_size=width_size, depth=depth, key=fkey
        )
        self.predictor = TimeMLP(
            dim, size, width_size=width_size, depth=depth, key=pkey
        )
        self.velocity = TimeMLP(dim, dim, width_size=width_size, depth=depth, key=okey)
        if volatility is None:
            volatility = NeuralVolatility(width_size=width_size, depth=2, key=vkey)
        self.volatility = volatility

    @property
    def times(self) -> tuple[float, ...]:
        """The real snapshot times the model was built on."""
        return self.knots.real_times()

    def mean_and_scale(
        self, r: Scalar, chain: Float[Array, "times dim"]
    ) -> tuple[Float[Array, " dim"], Float[Array, " dim"]]:
        """The conditional mean and scale of $z_r$ given a chain (normalised time)."""
        k, u, h = self.knots.interval(r)
        out = self.forward_net(r, chain).astype(chain.dtype)
        mean_bar, log_scale_bar = jnp.split(out, 2)
        bump = u * (1 - u)
        mu = self.knots.spline(r, chain, self.cubic) + bump * mean_bar
        sigma = self.delta + 4 * bump * self.spread * jnp.exp(log_scale_bar)
        return mu, sigma

    def _moments(self, r, chain):
        """`(mu, sigma, dmu/dr, dsigma/dr)` by one forward-mode pass."""
        (mu, sigma), (dmu, dsigma) = jax.jvp(
            lambda s: self.mean_and_scale(s, chain), (r,), (jnp.ones_like(r),)
        )
        return mu, sigma, dmu, dsigma

    def predict_chain(
        self, z: Float[Array, " dim"], r: Scalar, *, freeze: bool = False
    ) -> Float[Array, "times dim"]:
        """$\\hat c_\\theta(z, r)$: the chain the predictor expects through `z`."""
        predictor = jax.lax.stop_gradient(self.predictor) if freeze else self.predictor
        out = predictor(r, z).astype(z.dtype)
        return z[None] + out.reshape(len(self.knots.knots), self.dim)

    def ode_drift(
        self, z: Float[Array, " dim"], r: Scalar, freeze_predictor: bool = False
    ) -> Float[Array, " dim"]:
        """The generative ODE velocity $v_\\psi(z, r)$ at normalised time `r`, which
        regresses the conditional velocity of the forward paths (so that it
        estimates $\\mathbb{E}[\\partial_r z_r \\mid z_r = z]$, the probability flow of
        the forward marginals, the same marginals as the SDE's). With
        `freeze_predictor` it passes no gradient to its network."""
        net = (
            jax.lax.stop_gradient(self.velocity) if freeze_predictor else self.velocity
        )
        return net(r, z).astype(z.dtype)

    def sde_drift(self, z: Float[Array, " dim"], r: Scalar) -> Float[Array, " dim"]:
        """The generative SDE drift $f_\\theta(z, r)$ in forward time: the
        conditional forward drift of the predicted chain."""
        chain = self.predict_chain(z, r)
        mu, sigma, dmu, dsigma = self._moments(r, chain)
        g2 = self.volatility(r).astype(z.dtype) ** 2
        return dmu + (dsigma / sigma - g2 / (2 * sigma**2)) * (z - mu)

    def loss_terms(
        self,
        chain: Float[Array, "times dim"],
        r: Scalar,
        eps: Float[Array, " dim"],
        penalties: Penalties | None = None,
    ) -> tuple[Scalar, dict[str, Scalar]]:
        """The per-example path KL at `(r, eps)` for one chain, and the penalties."""
        mu, sigma, dmu, dsigma = self._moments(r, chain)
        z = mu + sigma * eps
        velocity = dmu + dsigma * eps
        g2 = self.volatility(r).astype(z.dtype) ** 2
        drift_q = velocity - g2 / 2 * eps / sigma
        kl = jnp.sum((drift_q - self.sde_drift(z, r)) ** 2) / (2 * g2)
        # The ODE's velocity is fitted to the forward velocity without moving the
        # forward process: it is not part of the bound.
        target = jax.lax.stop_gradient((z, velocity))
        fit = jnp.sum((self.ode_drift(target[0], r) - target[1]) ** 2)
        values = {"velocity_fit": fit}
        if penalties is not None:

            def path(s):
                m, sd = self.mean_and_scale(s, chain)
                return m + sd * eps

            point = PathPoint(r, z, velocity, None, path=path, drift=self.ode_drift)
            values.update(penalties(point))
        return kl, values

    def batch_loss(
        self,
        batch: Float[Array, "batch times dim"],
        *,
        key: PRNGKeyArray,
        penalties: Penalties | None = None,
    ) -> tuple[Scalar, dict[str, Array]]:
        """The objective on a batch of chains (or of independent draws from every
        snapshot, linked here by the model's coupling).

        **Returns:** `(loss, terms)` with the path KL as `"diffusion"`, the fit of
        the ODE velocity as `"velocity_fit"`, the unweighted penalties as
        `"penalty/<name>"` and the total as `"loss"`."""
        batch = _check_snapshot_batch(batch, len(self.knots.knots), self.dim)
        ckey, rkey, ekey = jr.split(key, 3)
        chains = _chain(self.coupling, batch, ckey)
        n = batch.shape[0]
        # Stratified times: one per slice of [0, 1], for a lower-variance mean.
        r = (jnp.arange(n, dtype=batch.dtype) + jr.uniform(rkey, (n,), batch.dtype)) / n
        eps = jr.normal(ekey, (n, self.dim), dtype=batch.dtype)
        kl, values = jax.vmap(lambda c, s, e: self.loss_terms(c, s, e, penalties))(
            chains, r, eps
        )
        fit = jnp.mean(values.pop("velocity_fit"))
        terms = {"diffusion": jnp.mean(kl), "velocity_fit": fit}
        terms.update({f"penalty/{k}": jnp.mean(v) for k, v in values.items()})
        loss = terms["diffusion"] + fit
        if penalties is not None:
            loss = loss + penalties.total({k: jnp.mean(v) for k, v in values.items()})
        terms["loss"] = loss
        return loss, terms

    def simulate(
        self,
        z0: Float[Array, "n dim"],
        t_start: float,
        t_end: float,
        *,
        key: PRNGKeyArray,
        stochastic: bool = True,
        num_steps: int = 100,
        save_times: Sequence[float] | None = None,
    ) -> TimeCourseSolution:
        """Carries a population from `t_start` to `t_end` (real times within the
        trained span; the start need not be a snapshot time) with the generative SDE
        (Euler–Maruyama) or ODE (`stochastic=False`, Euler): `num_steps` uniform
        steps plus a step on every snapshot and saved time. Each state starts with
        the model's `delta` noise added, as the forward process has at a snapshot.

        **Returns:** a [`nfdm_sciml.TimeCourseSolution`][] at `save_times` (default:
        `t_end` only).
        """
        z0 = check_batch(z0, (self.dim,), "z0")
        _check_span(self, t_start, t_end)
        nkey, skey = jr.split(key)
        z0 = z0 + self.delta * jr.normal(nkey, z0.shape, dtype=z0.dtype)
        if stochastic:
            drift, volatility = self.sde_drift, self.volatility
        else:
            drift, volatility = self.ode_drift, None
        return _simulate(
            self.knots,
            drift,
            volatility,
            z0,
            t_start,
            t_end,
            save_times,
            num_steps,
            skey,
        )


def _check_span(model, t_start, t_end) -> None:
    times = model.times
    tol = 1e-9 * (times[-1] - times[0])
    if not (times[0] - tol <= t_start and t_end <= times[-1] + tol):
        raise ValueError(
            f"The model was trained on [{times[0]}, {times[-1]}]; it cannot simulate "
            f"from {t_start} to {t_end}. Extrapolation past the last snapshot is not "
            "supported."
        )


class TimeCourseFlowMatching(eqx.Module):
    r"""The baseline of trajectory inference: OT conditional flow matching in real
    time (OT-CFM, Tong et al. 2024). Chains are linked as for
    [`nfdm_sciml.TimeCourseNFDM`][] (the same `coupling` argument); on each
    interval the velocity network regresses the straight line between consecutive
    chain points,
    $\|v_\theta(z, r) - (x_{k+1} - x_k)/(r_{k+1} - r_k)\|^2$ at
    $z = (1 - u)x_k + u x_{k+1} + \sigma\xi$; generation integrates the ODE.

    **Arguments:** `times`, `dim`, `key`, `coupling`, `width_size`, `depth` as for
    `TimeCourseNFDM`; `sigma` the noise around the straight lines.
    """

    velocity: TimeMLP
    coupling: AbstractCoupling | None
    knots: _Knots
    dim: int = eqx.field(static=True)
    sigma: float = eqx.field(static=True)

    def __init__(
        self,
        times: Sequence[float] | np.ndarray,
        dim: int,
        *,
        key: PRNGKeyArray,
        coupling: AbstractCoupling | None = None,
        width_size: int = 64,
        depth: int = 3,
        sigma: float = 0.0,
    ):
        if not sigma >= 0:
            raise ValueError(f"`sigma` must be >= 0, got {sigma}.")
        _check_dim(dim)
        self.knots = _Knots.of(times)
        self.dim, self.sigma = dim, float(sigma)
        self.coupling = None if coupling is None else _check_coupling(coupling)
        self.velocity = TimeMLP(dim, dim, width_size=width_size, depth=depth, key=key)

    @property
    def times(self) -> tuple[float, ...]:
        """The real snapshot times the model was built on."""
        return self.knots.real_times()

    def ode_drift(self, z: Float[Array, " dim"], r: Scalar) -> Float[Array, " dim"]:
        """The learned velocity $v_\\theta(z, r)$ in normalised time."""
        return self.velocity(r, z).astype(z.dtype)

    def batch_loss(
        self, batch: Float[Array, "batch times dim"], *, key: PRNGKeyArray
    ) -> tuple[Scalar, dict[str, Array]]:
        """The flow-matching loss; **returns** `(loss, {"loss": loss})`."""
        batch = _check_snapshot_batch(batch, len(self.knots.knots), self.dim)
        ckey, rkey, nkey = jr.split(key, 3)
        chains = _chain(self.coupling, batch, ckey)
        n = batch.shape[0]
        r = (jnp.arange(n, dtype=batch.dtype) + jr.uniform(rkey, (n,), batch.dtype)) / n
        noise = self.sigma * jr.normal(nkey, (n, self.dim), dtype=batch.dtype)

        def one(chain, r, noise):
            k, u, h = self.knots.interval(r)
            z = (1 - u) * chain[k] + u * chain[k + 1] + noise
            target = (chain[k + 1] - chain[k]) / h
            return jnp.sum((self.ode_drift(z, r) - target) ** 2)

        loss = jnp.mean(jax.vmap(one)(chains, r, noise))
        return loss, {"loss": loss}

    def simulate(
        self,
        z0: Float[Array, "n dim"],
        t_start: float,
        t_end: float,
        *,
        key: PRNGKeyArray,
        stochastic: bool = False,
        num_steps: int = 100,
        save_times: Sequence[float] | None = None,
    ) -> TimeCourseSolution:
        """Integrates the learned ODE (Euler) from `t_start` to `t_end`, as
        [`nfdm_sciml.TimeCourseNFDM.simulate`][]."""
        if stochastic:
            raise ValueError(
                "Flow matching learns an ODE only; call `simulate(stochastic=False)`."
            )
        z0 = check_batch(z0, (self.dim,), "z0")
        _check_span(self, t_start, t_end)
        return _simulate(
            self.knots, self.ode_drift, None, z0, t_start, t_end, save_times,
            num_steps, key,
        )  # fmt: skip
