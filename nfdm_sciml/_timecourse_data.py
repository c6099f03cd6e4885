"""Generated time courses with known dynamics, to develop and test trajectory
inference on: each returns [`nfdm_sciml.Snapshots`][] whose populations are
independent (no individual appears at two times), simulated by Euler–Maruyama with
NumPy on a fine grid. Calling again with another `seed` gives an independent sample of
the same populations, the reference for the floor of any distance."""

from collections.abc import Callable, Sequence

import numpy as np

from ._timecourse import Snapshots


def _simulate_snapshots(
    drift: Callable[[np.ndarray, float], np.ndarray],
    noise: float | np.ndarray,
    initial: Callable[[np.random.Generator, int], np.ndarray],
    n: int,
    times: Sequence[float],
    seed: int,
    dt: float,
) -> Snapshots:
    if not (isinstance(n, int) and n > 0):
        raise ValueError(f"`n` (samples per snapshot) must be a positive integer: {n}.")
    times = [float(t) for t in times]
    if len(times) < 2 or any(a >= b for a, b in zip(times, times[1:], strict=False)):
        raise ValueError(
            f"`times` must be two or more strictly increasing times; got {times}."
        )
    if times[0] < 0:
        raise ValueError(f"The process starts at t = 0; got times from {times[0]}.")
    rng = np.random.default_rng(seed)
    # One independent group of particles per snapshot, all simulated together.
    x = initial(rng, n * len(times))
    populations, t = [], 0.0
    for k, target in enumerate(times):
        while t < target - 1e-12:
            step = min(dt, target - t)
            x = x + drift(x, t) * step
            x = x + noise * np.sqrt(step) * rng.normal(size=x.shape)
            t += step
        populations.append(x[k * n : (k + 1) * n].copy())
    return Snapshots(times, populations)


def double_well(
    n: int = 1000,
    *,
    times: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5),
    tilt: float = 0.15,
    noise: float = 0.25,
    seed: int = 0,
) -> Snapshots:
    r"""A bifurcation in 2D: particles start at the saddle of a tilted double well
    in $x$, $U(x) = 3(x^4/4 - x^2/2) - \mathrm{tilt}\,x$, and split into two branches
    of unequal size while drifting at unit speed in $y$:
    $\mathrm{d}x = -U'(x)\,\mathrm{d}t + \sigma\,\mathrm{d}W$,
    $\mathrm{d}y = \mathrm{d}t + \sigma\,\mathrm{d}W$, from $N(0, 0.1^2 I)$.

    **Returns:** [`nfdm_sciml.Snapshots`][] of `n` samples at each of `times`.
    """

    def drift(x, t):
        dx = -3 * (x[:, 0] ** 3 - x[:, 0]) + tilt
        return np.stack([dx, np.ones_like(dx)], axis=1)

    return _simulate_snapshots(
        drift,
        noise,
        lambda rng, m: 0.1 * rng.normal(size=(m, 2)),
        n,
        times,
        seed,
        1e-3,
    )


def noisy_lorenz(
    n: int = 1000,
    *,
    times: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
    noise: float = 2.0,
    seed: int = 0,
) -> Snapshots:
    r"""A population on the Lorenz system ($\sigma = 10$, $\rho = 28$,
    $\beta = 8/3$) with additive noise of scale `noise`, started from
    $N((1, 1, 25), I)$, so that it stretches along the attractor.

    **Returns:** [`nfdm_sciml.Snapshots`][] of `n` samples in 3D at each of `times`.
    """

    def drift(x, t):
        a, b, c = x[:, 0], x[:, 1], x[:, 2]
        return np.stack([10 * (b - a), a * (28 - c) - b, a * b - 8 / 3 * c], axis=1)

    return _simulate_snapshots(
        drift,
        noise,
        lambda rng, m: np.array([1.0, 1.0, 25.0]) + rng.normal(size=(m, 3)),
        n,
        times,
        seed,
        1e-3,
    )


def oscillator(
    n: int = 1000,
    *,
    dim: int = 5,
    times: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5),
    frequency: float = 1.5,
    noise: float = 0.1,
    seed: int = 0,
) -> Snapshots:
    r"""A limit cycle mixed into `dim` >= 3 dimensions: a Stuart–Landau oscillator
    ($\dot w = (1 - |w|^2)w + i\omega w$ in the plane, started near phase 0 on the
    cycle) alongside `dim - 2` Ornstein–Uhlenbeck coordinates relaxing from 1.5 to 0
    at unit rate, all rotated by a fixed random orthogonal matrix (the same for every
    seed) so that the cycle spreads over every coordinate.

    **Returns:** [`nfdm_sciml.Snapshots`][] of `n` samples in `dim` dimensions.
    """
    if not (isinstance(dim, int) and dim >= 3):
        raise ValueError(f"`dim` must be an integer >= 3, got {dim!r}.")
    rotation, _ = np.linalg.qr(np.random.default_rng(12345).normal(size=(dim, dim)))

    def drift(y, t):
        x = y @ rotation  # back to the unrotated coordinates
        w = x[:, 0] + 1j * x[:, 1]
        dw = (1 - np.abs(w) ** 2) * w + 1j * frequency * w
        dx = np.concatenate([np.stack([dw.real, dw.imag], 1), -x[:, 2:]], axis=1)
        return dx @ rotation.T

    def initial(rng, m):
        phase = 0.3 * rng.normal(size=m)
        radius = 1 + 0.1 * rng.normal(size=m)
        plane = np.stack([radius * np.cos(phase), radius * np.sin(phase)], 1)
        rest = 1.5 + 0.1 * rng.normal(size=(m, dim - 2))
        return np.concatenate([plane, rest], axis=1) @ rotation.T

    return _simulate_snapshots(drift, noise, initial, n, times, seed, 2e-3)


TIME_COURSES: dict[str, Callable[..., Snapshots]] = {
    "double_well": double_well,
    "lorenz": noisy_lorenz,
    "oscillator": oscillator,
}
