r"""Penalties that give the generative dynamics chosen properties, without simulation.

Because the forward process is learned, properties of the generative trajectories can
be asked for by adding terms to the training objective. Every term here is evaluated
on a forward sample $z_t = F(\varepsilon, t, x)$ drawn for the loss anyway, so nothing
is integrated: the generative process matches the forward marginals, and so inherits
what the penalties impose on them.

A penalty sees a [`nfdm_sciml.PathPoint`][]: the time, the sample, its conditional
velocity $\partial F / \partial t$, the context, and two functions, the forward path
$t \mapsto F(\varepsilon, t, x)$ through the sample and the generative ODE drift
$f_\theta(z, t)$. Penalties are combined with weights in [`nfdm_sciml.Penalties`][],
which training adds to the NELBO. A user penalty is a function
`fn(z, velocity, t, context) -> scalar`, or a subclass of
[`nfdm_sciml.AbstractPenalty`][] when it needs the path or the drift.
"""

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import cast

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float

from ._custom_types import Context, Data, Scalar, Time


# A point given as an array or a plain list of numbers.
Coordinates = ArrayLike | Sequence[float]


class PathPoint(eqx.Module):
    r"""One point of a conditional forward path, as the penalties see it.

    - `t`: the time, a scalar.
    - `z`: the forward sample $z_t = F(\varepsilon, t, x)$.
    - `velocity`: its conditional velocity $\partial F(\varepsilon, t, x)/\partial t$.
    - `context`: the example's context (or `None`).
    - `path`: $s \mapsto F(\varepsilon, s, x)$ with $\varepsilon$ and $x$ held fixed,
      differentiable in $s$.
    - `drift`: $(z, s) \mapsto f_\theta(z, s)$, the drift of the generative ODE (the
      sampler of `sample_ode`), with the predictor plugged in. Called as
      `drift(z, s, freeze_predictor=True)` it passes no gradient to the predictor,
      so a penalty on it shapes only the forward process.
    """

    t: Time
    z: Data
    velocity: Data
    context: Context
    path: Callable[[Time], Data]
    drift: Callable[..., Data]


class AbstractPenalty(eqx.Module):
    """The interface of a penalty: `penalty(point) -> scalar >= 0` for one
    [`nfdm_sciml.PathPoint`][]. Training averages it over the batch."""

    @abc.abstractmethod
    def __call__(self, point: PathPoint) -> Scalar:
        """**Returns:** the penalty at this point, a scalar array."""


class FunctionPenalty(AbstractPenalty):
    """A penalty from a plain function `fn(z, velocity, t, context) -> scalar`.

    This is the quickest way to write a penalty of one's own, e.g. a cost on the speed
    late in the path: `FunctionPenalty(lambda z, v, t, c: t * jnp.sum(v**2))`.
    """

    fn: Callable[[Data, Data, Time, Context], ArrayLike] = eqx.field(static=True)

    def __check_init__(self):
        if not callable(self.fn):
            raise TypeError(
                "`FunctionPenalty` needs a function fn(z, velocity, t, context) -> "
                f"scalar; got {type(self.fn).__name__}."
            )

    def __call__(self, point: PathPoint) -> Scalar:
        value = jnp.asarray(self.fn(point.z, point.velocity, point.t, point.context))
        if value.shape != ():
            raise ValueError(
                "A penalty function must return a scalar for one example, but "
                f"returned shape {value.shape}; reduce it, e.g. with `jnp.sum`."
            )
        return value


class TimeWeighted(AbstractPenalty):
    r"""Another penalty multiplied by a weight $w(t) \ge 0$ of the time.

    Use it to apply a penalty only where it can be met. An obstacle that the prior
    $\mathcal{N}(0, I)$ itself covers cannot be avoided near $t = 1$; penalising it
    there is met only by spreading the paths out (diluting the density inside the
    obstacle), so fade it out: `TimeWeighted(Obstacle(disk), lambda t: (1 - t) ** 2)`.
    """

    penalty: AbstractPenalty
    weight: Callable[[Time], ArrayLike] = eqx.field(static=True)

    def __check_init__(self):
        if not isinstance(self.penalty, AbstractPenalty) or not callable(self.weight):
            raise TypeError(
                "`TimeWeighted` needs a penalty (AbstractPenalty) and a function "
                "weight(t) -> scalar."
            )

    def __call__(self, point: PathPoint) -> Scalar:
        weight = jnp.asarray(self.weight(point.t))
        if weight.shape != ():
            raise ValueError(
                "A time weight must return a scalar, but returned shape "
                f"{weight.shape}."
            )
        return weight * self.penalty(point)


class GenerativeCurvature(AbstractPenalty):
    r"""$\|\tfrac{\mathrm{d}}{\mathrm{d}t} f_\theta(F(\varepsilon, t, x), t)\|^2$:
    how fast the generative ODE drift changes along the forward path (NFDM-OT).

    Averaged over $x$ given $z_t$, the inner derivative is the acceleration
    $\partial_t f + (\nabla f) f$ of the generative ODE's trajectories only where the
    conditional and generative velocities agree; by Jensen the penalty bounds the
    mean squared acceleration from above. Zero curvature means straight trajectories
    at constant speed, which the Euler method integrates exactly, so a model trained
    with this term samples well in a few ODE steps. It costs one forward-mode
    derivative through the forward process and the predictor.

    **Arguments:**

    - `train_predictor`: whether the penalty's gradient also reaches the predictor.
      With `False` (default) the predictor learns from the bound alone and the
      penalty shapes only the forward process (and through it the drift): trained
      on the penalty, the predictor learns to ignore $z$, which makes the paths
      straight by making the samples wrong.
    """

    train_predictor: bool = eqx.field(static=True, default=False)

    def __call__(self, point: PathPoint) -> Scalar:
        freeze = not self.train_predictor

        def drift_along_path(s):
            return point.drift(point.path(s), s, freeze_predictor=freeze)

        _, acceleration = jax.jvp(
            drift_along_path, (point.t,), (jnp.ones_like(point.t),)
        )
        return jnp.sum(acceleration**2)


class ConditionalCurvature(AbstractPenalty):
    r"""$\|\partial^2 F(\varepsilon, t, x)/\partial t^2\|^2$: the curvature of each
    conditional forward path.

    Provided for comparison with [`nfdm_sciml.GenerativeCurvature`][]. It is minimised
    by straight conditional paths such as flow matching's interpolant, which do not
    make the generative (marginal) trajectories straight: their directions still
    average over all the data points that could have produced $z_t$.
    """

    def __call__(self, point: PathPoint) -> Scalar:
        one = jnp.ones_like(point.t)

        def velocity(s):
            return jax.jvp(point.path, (s,), (one,))[1]

        _, acceleration = jax.jvp(velocity, (point.t,), (one,))
        return jnp.sum(acceleration**2)


class KineticEnergy(AbstractPenalty):
    r"""$\|v\|^2$: the kinetic energy of the paths (up to the factor 1/2).

    With `generative=False` (default) $v$ is the conditional velocity
    $\partial F/\partial t$, whose mean bounds the generative ODE's kinetic energy from
    above (Jensen); with `generative=True` it is the generative ODE drift at $z_t$.
    """

    generative: bool = eqx.field(static=True, default=False)

    def __call__(self, point: PathPoint) -> Scalar:
        if self.generative:
            return jnp.sum(point.drift(point.z, point.t) ** 2)
        return jnp.sum(point.velocity**2)


class AbstractShape(eqx.Module):
    """A region of data space given by its signed distance: negative inside, zero on
    the boundary, positive outside. Used for obstacles and allowed regions."""

    @abc.abstractmethod
    def signed_distance(self, z: Data) -> Scalar:
        """**Returns:** the signed distance of one point to the boundary."""

    def contains(self, z: Float[Array, " *batch dims"]) -> Bool[Array, " *batch"]:
        """Whether each point (the last axis holds the coordinates) lies inside."""
        z = jnp.asarray(z)
        flat = z.reshape(-1, z.shape[-1])
        inside = jax.vmap(self.signed_distance)(flat) < 0
        return inside.reshape(z.shape[:-1])


def _vector(value, name: str, cls: str) -> Array:
    array = jnp.asarray(value)
    if array.ndim != 1 or array.shape[0] == 0:
        raise ValueError(
            f"`{cls}` needs `{name}` as a non-empty vector of coordinates, got shape "
            f"{array.shape}."
        )
    if not jnp.issubdtype(array.dtype, jnp.floating):
        array = array.astype(float)
    return array


def _norm(v: Array) -> Scalar:
    # The gradient of a norm is undefined at 0; there it is taken to be 0.
    squared = jnp.sum(v**2)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1)), 0)


def _check_point(z, size: int, cls: str) -> None:
    if jnp.shape(z) != (size,):
        raise ValueError(
            f"`{cls}` is defined in {size} dimensions, but got a point of shape "
            f"{jnp.shape(z)}; shapes act on one flat point (use `contains` for many)."
        )


class Disk(AbstractShape):
    """A disk (a ball in more than two dimensions) of `radius` around `centre`."""

    centre: Float[Array, " dims"]
    radius: float = eqx.field(static=True)

    def __init__(self, centre: Coordinates, radius: float):
        self.centre = _vector(centre, "centre", "Disk")
        self.radius = float(radius)

    def __check_init__(self):
        if not self.radius > 0:
            raise ValueError(f"`Disk` needs radius > 0, got {self.radius}.")

    def signed_distance(self, z: Data) -> Scalar:
        _check_point(z, self.centre.shape[0], "Disk")
        return _norm(z - self.centre.astype(z.dtype)) - self.radius


class Box(AbstractShape):
    """An axis-aligned box with corners `low` and `high`."""

    low: Float[Array, " dims"]
    high: Float[Array, " dims"]

    def __init__(self, low: Coordinates, high: Coordinates):
        self.low = _vector(low, "low", "Box")
        self.high = _vector(high, "high", "Box").astype(self.low.dtype)

    def __check_init__(self):
        if self.low.shape != self.high.shape or not bool(jnp.all(self.low < self.high)):
            raise ValueError(
                "`Box` needs `low` and `high` of one length with low < high in every "
                f"coordinate; got {self.low} and {self.high}."
            )

    def signed_distance(self, z: Data) -> Scalar:
        _check_point(z, self.low.shape[0], "Box")
        low, high = self.low.astype(z.dtype), self.high.astype(z.dtype)
        half, centre = (high - low) / 2, (high + low) / 2
        q = jnp.abs(z - centre) - half
        return _norm(jnp.maximum(q, 0)) + jnp.minimum(jnp.max(q), 0)


class SignedDistance(AbstractShape):
    """A shape from a user's signed-distance function `fn(z) -> scalar` (negative
    inside). Only the sign matters for `contains`; the penalties also use its size,
    so a true distance (or anything growing with depth) works best."""

    fn: Callable[[Data], ArrayLike] = eqx.field(static=True)

    def __check_init__(self):
        if not callable(self.fn):
            raise TypeError(
                "`SignedDistance` needs a function fn(z) -> scalar signed distance; "
                f"got {type(self.fn).__name__}."
            )

    def signed_distance(self, z: Data) -> Scalar:
        value = jnp.asarray(self.fn(z))
        if value.shape != ():
            raise ValueError(
                "A signed-distance function must return a scalar for one point, but "
                f"returned shape {value.shape}."
            )
        return value


class Union(AbstractShape):
    """The union of several shapes (the smallest of their signed distances)."""

    shapes: tuple[AbstractShape, ...]

    def __init__(self, *shapes: AbstractShape):
        if not shapes or not all(isinstance(s, AbstractShape) for s in shapes):
            raise TypeError("`Union` needs one or more shapes (AbstractShape).")
        self.shapes = tuple(shapes)

    def signed_distance(self, z: Data) -> Scalar:
        return jnp.min(jnp.stack([s.signed_distance(z) for s in self.shapes]))


def _check_hinge(cls: str, shape, margin: float, power: float) -> None:
    if not isinstance(shape, AbstractShape):
        raise TypeError(
            f"`{cls}` needs an AbstractShape such as Disk, Box or SignedDistance; got "
            f"{type(shape).__name__}."
        )
    if not margin >= 0 or not power >= 1:
        raise ValueError(
            f"`{cls}` needs margin >= 0 and power >= 1; got {margin} and {power}."
        )


class Obstacle(AbstractPenalty):
    r"""$\max(0, m - d(z_t))^p$ for the signed distance $d$ of `shape`: a cost for
    forward samples inside the obstacle (or within the margin $m$ of it).

    Points farther than the margin cost nothing. With `power=1` (default) the push
    out of the obstacle has the same strength at any depth; `power=2` is smoother at
    the boundary but weaker near it. A small positive margin keeps the few-step
    solvers' points clear of the boundary.
    """

    shape: AbstractShape
    margin: float = eqx.field(static=True, default=0.0)
    power: float = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        _check_hinge("Obstacle", self.shape, self.margin, self.power)

    def __call__(self, point: PathPoint) -> Scalar:
        depth = self.margin - self.shape.signed_distance(_flat(point.z))
        return jnp.maximum(depth, 0) ** self.power


class StayInside(AbstractPenalty):
    r"""$\max(0, d(z_t) + m)^p$: a cost for forward samples outside `shape` (or within
    the margin $m$ of its boundary), to keep the paths inside a region."""

    shape: AbstractShape
    margin: float = eqx.field(static=True, default=0.0)
    power: float = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        _check_hinge("StayInside", self.shape, self.margin, self.power)

    def __call__(self, point: PathPoint) -> Scalar:
        excess = self.shape.signed_distance(_flat(point.z)) + self.margin
        return jnp.maximum(excess, 0) ** self.power


def _flat(z: Data) -> Array:
    return jnp.reshape(z, (-1,))


PenaltyFn = Callable[[Data, Data, Time, Context], ArrayLike]
PenaltyLike = AbstractPenalty | PenaltyFn


class Penalties(eqx.Module):
    r"""Named penalties with weights, added to the training objective as
    $\sum_k \lambda_k\, \mathbb{E}_{t, x, \varepsilon}[\text{penalty}_k]$.

    Each keyword is a name (used in the logged metrics) and either a penalty (weight
    1) or a pair `(weight, penalty)`; a penalty is an
    [`nfdm_sciml.AbstractPenalty`][] or a plain function
    `fn(z, velocity, t, context) -> scalar`.

    ```python
    penalties = nf.Penalties(
        curvature=(0.1, nf.GenerativeCurvature()),
        obstacle=(10.0, nf.Obstacle(nf.Disk([1.5, 1.5], 0.5))),
        slow=lambda z, v, t, c: 1e-3 * jnp.sum(v**2),
    )
    ```
    """

    names: tuple[str, ...] = eqx.field(static=True)
    weights: tuple[float, ...] = eqx.field(static=True)
    terms: tuple[AbstractPenalty, ...]

    def __init__(self, **terms: PenaltyLike | tuple[float, PenaltyLike]):
        names, weights, penalties = [], [], []
        for name, value in terms.items():
            weight, penalty = value if isinstance(value, tuple) else (1.0, value)
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise TypeError(
                    f"The weight of penalty {name!r} must be a number, got {weight!r}."
                )
            if not weight >= 0:
                raise ValueError(
                    f"The weight of penalty {name!r} must be >= 0, got {weight}."
                )
            if not isinstance(penalty, AbstractPenalty):
                if not callable(penalty):
                    raise TypeError(
                        f"Penalty {name!r} must be an AbstractPenalty or a function "
                        f"fn(z, velocity, t, context); got {type(penalty).__name__}."
                    )
                penalty = FunctionPenalty(cast(PenaltyFn, penalty))
            names.append(name)
            weights.append(float(weight))
            penalties.append(penalty)
        self.names, self.weights, self.terms = (
            tuple(names),
            tuple(weights),
            tuple(penalties),
        )

    def __call__(self, point: PathPoint) -> dict[str, Scalar]:
        """The unweighted value of every penalty at one point."""
        return {name: p(point) for name, p in zip(self.names, self.terms, strict=True)}

    def total(self, values: Mapping[str, Array]) -> Scalar:
        """The weighted sum of penalty values (as returned by `__call__`)."""
        weight = dict(zip(self.names, self.weights, strict=True))
        total = sum((weight[name] * value for name, value in values.items()), 0.0)
        return jnp.asarray(total)


def violation_fraction(
    trajectories: Float[Array, " *batch dims"], shape: AbstractShape
) -> Float[Array, ""]:
    """The fraction of trajectory points (any leading axes; the last axis holds the
    coordinates) that lie inside `shape`: the rate at which an obstacle is violated."""
    return jnp.mean(shape.contains(trajectories).astype(jnp.float32))


def path_straightness(
    trajectories: Float[Array, " n steps *dims"], ts: Sequence[float] | Array
) -> Float[Array, ""]:
    r"""The normalised path energy minus one, averaged over trajectories:
    $\frac{|t_K - t_0| \int \|\dot z\|^2\,\mathrm{d}t}{\|z_{t_K} - z_{t_0}\|^2} - 1$,
    computed on the saved points as a piecewise-linear path.

    It is $\ge 0$ by the Cauchy–Schwarz inequality, and zero exactly for straight
    paths traversed at constant speed, the ones a one-step Euler solve gets right.

    **Arguments:**

    - `trajectories`: shape `(n, steps, *dims)`, e.g. `ReverseSolution.trajectories`.
    - `ts`: the `steps` times of the saved points (increasing or decreasing).
    """
    trajectories = jnp.asarray(trajectories)
    ts = jnp.asarray(ts, dtype=trajectories.dtype)
    if trajectories.ndim < 3 or ts.shape != trajectories.shape[1:2]:
        raise ValueError(
            "`path_straightness` needs trajectories of shape (n, steps, *dims) and "
            f"`ts` of shape (steps,); got {trajectories.shape} and {ts.shape}."
        )
    if ts.shape[0] < 2 or not bool(jnp.all(jnp.diff(ts) != 0)):
        raise ValueError("`ts` needs at least two distinct, strictly ordered times.")
    paths = trajectories.reshape(trajectories.shape[:2] + (-1,))
    steps = jnp.diff(paths, axis=1)
    dt = jnp.abs(jnp.diff(ts))
    energy = jnp.sum(jnp.sum(steps**2, axis=-1) / dt[None], axis=1)
    chord = jnp.sum((paths[:, -1] - paths[:, 0]) ** 2, axis=-1)
    span = jnp.abs(ts[-1] - ts[0])
    tiny = jnp.finfo(paths.dtype).tiny
    return jnp.mean(span * energy / jnp.maximum(chord, tiny) - 1)
