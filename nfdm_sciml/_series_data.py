"""Time-series data for latent SDEs: two generated stochastic systems with known
dynamics (solved with Diffrax) and a real measured series from an optional package."""

from collections.abc import Callable
from typing import Any, cast

import diffrax
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
from jaxtyping import PRNGKeyArray

from ._series import TimeSeries


def _euler_maruyama(drift, diffusion, z0, t_end, num_times, inner_steps, key):
    """Paths of `dz = drift dt + diag(diffusion) dW` from each row of `z0`, saved at
    `num_times` uniform times on [0, t_end] (Euler–Maruyama, `inner_steps` steps
    between saves)."""
    ts = jnp.linspace(0.0, t_end, num_times)
    dt = t_end / ((num_times - 1) * inner_steps)

    def one(y0, k):
        bm = diffrax.UnsafeBrownianPath(y0.shape, k)
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda t, y, a: drift(y)),
            diffrax.ControlTerm(
                lambda t, y, a: lx.DiagonalLinearOperator(diffusion(y)), bm
            ),
        )
        sol = diffrax.diffeqsolve(
            terms,
            diffrax.Euler(),
            0.0,
            t_end,
            dt,
            y0,
            saveat=diffrax.SaveAt(ts=ts),
            max_steps=(num_times - 1) * inner_steps + 8,
            adjoint=diffrax.ForwardMode(),
        )
        return sol.ys

    ys = jax.jit(jax.vmap(one))(z0, jr.split(key, z0.shape[0]))
    return np.asarray(ts, np.float64), np.asarray(ys, np.float64)


def _check_counts(num_series: int, num_times: int, missing: float) -> None:
    if not (isinstance(num_series, int) and num_series > 0):
        raise ValueError(
            f"`num_series` must be a positive integer, got {num_series!r}."
        )
    if not (isinstance(num_times, int) and num_times >= 2):
        raise ValueError(f"`num_times` must be an integer >= 2, got {num_times!r}.")
    if not 0.0 <= missing < 1.0:
        raise ValueError(f"`missing` must be a fraction in [0, 1), got {missing}.")


def _mark_missing(values, missing, rng) -> np.ndarray:
    mask = rng.random(values.shape) >= missing
    # Every series keeps its first row, so it has at least one observation.
    mask[:, 0] = True
    return mask


def stochastic_lorenz(
    num_series: int = 1024,
    *,
    num_times: int = 41,
    t_end: float = 1.0,
    noise: float = 0.15,
    observation_noise: float = 0.01,
    inner_steps: int = 100,
    missing: float = 0.0,
    standardise: bool = True,
    key: PRNGKeyArray,
) -> TimeSeries:
    r"""The stochastic Lorenz system of the SDE Matching notebook:
    $dx = 10(y - x)\,dt$, $dy = (x(28 - z) - y)\,dt$, $dz = (xy - \tfrac83 z)\,dt$,
    each with multiplicative noise $g_i = \text{noise}\cdot x_i$, from
    $\mathcal{N}(0, I)$, observed at `num_times` uniform times on $[0, t_{end}]$,
    solved by Euler–Maruyama with `inner_steps` steps between observations. With
    `standardise` each channel is scaled to zero mean and unit variance over all
    series and times (the notebook's convention); then Gaussian observation noise of
    standard deviation `observation_noise` is added, and a fraction `missing` of
    the entries is marked missing at random.
    """
    _check_counts(num_series, num_times, missing)
    zkey, skey, nkey = jr.split(key, 3)

    def drift(y):
        x1, x2, x3 = y[0], y[1], y[2]
        return jnp.stack(
            [10.0 * (x2 - x1), x1 * (28.0 - x3) - x2, x1 * x2 - 8.0 / 3.0 * x3]
        )

    z0 = jr.normal(zkey, (num_series, 3))
    ts, ys = _euler_maruyama(
        drift, lambda y: noise * y, z0, t_end, num_times, inner_steps, skey
    )
    if standardise:
        ys = (ys - ys.mean(axis=(0, 1))) / ys.std(axis=(0, 1))
    rng = np.random.default_rng(np.asarray(jr.key_data(nkey)).ravel())
    ys = ys + observation_noise * rng.standard_normal(ys.shape)
    return TimeSeries(ts, ys, _mark_missing(ys, missing, rng))


def stochastic_van_der_pol(
    num_series: int = 512,
    *,
    num_times: int = 100,
    t_end: float = 10.0,
    mu: float = 1.0,
    noise: float = 0.5,
    observation_noise: float = 0.05,
    keep: float = 0.5,
    missing: float = 0.0,
    inner_steps: int = 10,
    key: PRNGKeyArray,
) -> TimeSeries:
    r"""A stochastic Van der Pol oscillator seen through its position only, at
    irregular times: $dx = y\,dt$, $dy = (\mu(1 - x^2)y - x)\,dt + \text{noise}\,dW$
    from $(x, y) \sim \mathcal{U}[-3, 3]^2$, solved on `num_times` uniform times of
    $[0, t_{end}]$; each series then keeps a random fraction `keep` of those times
    (its own, always including $t = 0$), and only $x$ (plus Gaussian noise of
    `observation_noise`) is observed: the velocity is a hidden coordinate. A fraction
    `missing` of the kept entries is marked missing on top. `keep=1` gives regular,
    fully timed series (used to score generated trajectories).
    """
    _check_counts(num_series, num_times, missing)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"`keep` must be a fraction in (0, 1], got {keep}.")
    zkey, skey, nkey = jr.split(key, 3)

    def drift(v):
        return jnp.stack([v[1], mu * (1.0 - v[0] ** 2) * v[1] - v[0]])

    z0 = jr.uniform(zkey, (num_series, 2), minval=-3.0, maxval=3.0)
    ts, ys = _euler_maruyama(
        drift,
        lambda v: jnp.array([0.0, noise], v.dtype),
        z0,
        t_end,
        num_times,
        inner_steps,
        skey,
    )
    rng = np.random.default_rng(np.asarray(jr.key_data(nkey)).ravel())
    x = ys[..., :1] + observation_noise * rng.standard_normal(ys[..., :1].shape)
    if keep == 1.0:
        return TimeSeries(ts, x, _mark_missing(x, missing, rng))
    count = max(2, int(round(keep * num_times)))
    times, values = [], []
    for i in range(num_series):
        rows = np.sort(rng.choice(np.arange(1, num_times), count - 1, replace=False))
        rows = np.concatenate([[0], rows])
        times.append(ts[rows])
        values.append(x[i, rows])
    series = TimeSeries(np.stack(times), np.stack(values))
    mask = _mark_missing(np.asarray(series.values), missing, rng)
    return TimeSeries(series.times, series.values, mask)


def load_basic_motions(split: str = "train") -> tuple[TimeSeries, np.ndarray]:
    """The BasicMotions data set (UEA archive) bundled with the `aeon` package: 80
    recordings (40 train, 40 test) of a smartwatch's 3D accelerometer and 3D
    gyroscope at 10 Hz for 10 s, while standing, walking, running or playing
    badminton; 6 channels, 100 times, given here in units of the 10 s span (on
    $[0, 0.99]$), as recorded (standardise with the training series'
    `channel_stats`).

    Install the optional extra: `pip install "nfdm_sciml[series]"`.

    **Returns:** `(series, labels)`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}.")
    try:
        from aeon.datasets import load_basic_motions as _load
    except ImportError as error:
        raise ImportError(
            "BasicMotions ships with the optional package `aeon`; install it with "
            '`pip install "nfdm_sciml[series]"` (or `pip install aeon`).'
        ) from error
    x, labels = cast(tuple[Any, Any], _load(split=split))
    x = np.asarray(x, np.float64).transpose(0, 2, 1)
    times = np.arange(x.shape[1]) / x.shape[1]
    return TimeSeries(times, x), np.asarray(labels)


SERIES_DATASETS: dict[str, Callable[..., TimeSeries]] = {
    "lorenz": stochastic_lorenz,
    "van_der_pol": stochastic_van_der_pol,
}


def series_dataset(name: str, **kwargs) -> TimeSeries:
    """A generated time-series data set by name (see `SERIES_DATASETS`)."""
    if name not in SERIES_DATASETS:
        raise ValueError(
            f"Unknown time-series data set {name!r}; choose one of "
            f"{', '.join(sorted(SERIES_DATASETS))}, or load BasicMotions with "
            "`load_basic_motions`."
        )
    return SERIES_DATASETS[name](**kwargs)
