"""Time series with irregular observation times and missing values: the data of the
latent SDE models ([`nfdm_sciml.LatentSDE`][])."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ._checks import _is_traced


class TimeSeries(eqx.Module):
    """A batch of multivariate time series, each observed at its own times, with
    missing values marked by a mask.

    - `times`: observation times, shape `(series, steps)`, strictly increasing along
      each series (a one-dimensional `(steps,)` array is shared by every series).
    - `values`: shape `(series, steps, channels)` (or `(series, steps)` for one
      channel). Missing entries may hold anything, NaN included, if `mask` says so.
    - `mask`: `True` where an entry was observed, same shape as `values`. Without a
      mask every entry must be observed, and a NaN is an error: say which entries are
      missing with `mask=~np.isnan(values)` (or [`nfdm_sciml.TimeSeries.from_nan`][]).

    Series of different lengths are padded to a common number of steps with
    [`nfdm_sciml.TimeSeries.from_lists`][]: a row (one time) whose channels are all
    missing is allowed anywhere. Every series needs at least one observed entry.

    A `TimeSeries` is a pytree: index it (`series[:10]`, `series[idx]`) to take a
    batch, inside `jit` too.
    """

    times: Float[Array, "series steps"]
    values: Float[Array, "series steps channels"]
    mask: Bool[Array, "series steps channels"]

    def __init__(self, times: Any, values: Any, mask: Any = None):
        if _is_traced(values) or _is_traced(times) or _is_traced(mask):
            # Rebuilt inside a transformation: checked when it was made.
            self.times, self.values = jnp.asarray(times), jnp.asarray(values)
            self.mask = jnp.asarray(mask, bool)
            return
        values = np.asarray(values)
        if not np.issubdtype(values.dtype, np.floating):
            if not np.issubdtype(values.dtype, np.integer):
                raise TypeError(
                    f"`values` must hold numbers, got dtype {values.dtype}; convert "
                    "it with `np.asarray(values, float)`."
                )
            values = values.astype(np.float64)
        if values.ndim == 2:
            values = values[..., None]
        if values.ndim != 3 or values.shape[0] == 0 or values.shape[1] == 0:
            raise ValueError(
                "`values` must have shape (series, steps, channels) (or (series, "
                f"steps) for one channel) with at least one series and step; got "
                f"{values.shape}."
            )
        n, steps, _ = values.shape
        times = np.asarray(times, dtype=np.float64)
        if times.ndim == 1:
            times = np.broadcast_to(times, (n, times.shape[0]))
        if times.shape != (n, steps):
            raise ValueError(
                f"`times` must have shape (steps,) = ({steps},) or (series, steps) = "
                f"{(n, steps)} to match `values`; got {times.shape}."
            )
        if not np.all(np.isfinite(times)):
            raise ValueError(
                "`times` holds NaN or infinite values; every row needs "
                "a finite time (mark a row missing in `mask` instead)."
            )
        gaps = np.diff(times, axis=1)
        if np.any(gaps <= 0):
            i, j = np.argwhere(gaps <= 0)[0]
            raise ValueError(
                f"`times` must be strictly increasing along each series; series {i} "
                f"has t[{j}] = {times[i, j]} followed by t[{j + 1}] = "
                f"{times[i, j + 1]}. Sort each series by time (and its values with "
                "it) and merge repeated times."
            )
        if mask is None:
            bad = np.isnan(values)
            if np.any(bad):
                i, j, k = np.argwhere(bad)[0]
                raise ValueError(
                    f"`values` holds {int(bad.sum())} NaN entries that are not "
                    f"marked missing (the first at series {i}, step {j}, channel "
                    f"{k}). If they are missing observations, pass "
                    "`mask=~np.isnan(values)` or use `TimeSeries.from_nan`; "
                    "otherwise fix the data."
                )
            mask = np.ones(values.shape, bool)
        else:
            mask = np.asarray(mask)
            if mask.dtype != bool:
                raise TypeError(
                    f"`mask` must be boolean (True where observed), got dtype "
                    f"{mask.dtype}."
                )
            if mask.ndim == 2:
                mask = mask[..., None]
            if mask.shape != values.shape:
                raise ValueError(
                    f"`mask` must have the shape of `values`, {values.shape}; got "
                    f"{mask.shape}."
                )
        observed_bad = mask & ~np.isfinite(values)
        if np.any(observed_bad):
            i, j, k = np.argwhere(observed_bad)[0]
            raise ValueError(
                f"`values` holds {int(observed_bad.sum())} NaN or infinite entries "
                f"marked as observed (the first at series {i}, step {j}, channel "
                f"{k}); mark them missing in `mask` or fix the data."
            )
        empty = ~mask.any(axis=(1, 2))
        if np.any(empty):
            raise ValueError(
                f"{int(empty.sum())} series have no observed entry (the first is "
                f"series {int(np.argmax(empty))}); drop them before building a "
                "`TimeSeries`."
            )
        dtype = jnp.result_type(float)
        self.times = jnp.asarray(times, dtype)
        self.values = jnp.asarray(np.where(mask, values, 0.0), dtype)
        self.mask = jnp.asarray(mask)

    @classmethod
    def from_nan(cls, times: Any, values: Any) -> "TimeSeries":
        """Series whose missing entries are the NaNs of `values`."""
        values = np.asarray(values, dtype=np.float64)
        return cls(times, values, ~np.isnan(values))

    @classmethod
    def from_lists(
        cls, times: list[Any], values: list[Any], *, missing_nan: bool = False
    ) -> "TimeSeries":
        """Series of different lengths (`times[i]` of shape `(steps_i,)`, `values[i]`
        of shape `(steps_i, channels)`), padded at the end to the longest with rows
        marked missing, at times just after each series' last one. With
        `missing_nan`, NaNs in `values` are missing entries too."""
        if len(times) != len(values) or not times:
            raise ValueError(
                "`from_lists` needs one array of times per array of values and at "
                f"least one series; got {len(times)} and {len(values)}."
            )
        arrays = [np.asarray(v, np.float64) for v in values]
        arrays = [a[:, None] if a.ndim == 1 else a for a in arrays]
        steps = max(a.shape[0] for a in arrays)
        channels = {a.shape[1] for a in arrays}
        if len(channels) != 1:
            raise ValueError(
                f"Every series needs the same number of channels; got {channels}."
            )
        (c,) = channels
        t_out = np.zeros((len(arrays), steps))
        v_out = np.zeros((len(arrays), steps, c))
        m_out = np.zeros((len(arrays), steps, c), bool)
        for i, (t, a) in enumerate(zip(times, arrays, strict=True)):
            t = np.asarray(t, np.float64)
            if t.shape != (a.shape[0],):
                raise ValueError(
                    f"Series {i} has {a.shape[0]} rows of values but times of shape "
                    f"{t.shape}."
                )
            k = a.shape[0]
            span = max(float(t[-1] - t[0]), 1.0) if k else 1.0
            pad = t[-1] + span * 1e-6 * np.arange(1, steps - k + 1)
            t_out[i] = np.concatenate([t, pad])
            v_out[i, :k] = a
            m_out[i, :k] = ~np.isnan(a) if missing_nan else True
        return cls(t_out, v_out, m_out)

    @property
    def num_series(self) -> int:
        return self.values.shape[0]

    @property
    def num_steps(self) -> int:
        return self.values.shape[1]

    @property
    def num_channels(self) -> int:
        return self.values.shape[2]

    def __len__(self) -> int:
        return self.num_series

    def __getitem__(self, index) -> "TimeSeries":
        def take(a):
            out = a[index]
            return out[None] if out.ndim == a.ndim - 1 else out

        return jax.tree.map(take, self)

    def observed_rows(self) -> Bool[Array, "series steps"]:
        """Whether any channel of each row was observed."""
        return jnp.any(self.mask, axis=-1)

    def last_time(self) -> Float[Array, " series"]:
        """The time of each series' last observed row."""
        rows = self.observed_rows()
        return jnp.max(jnp.where(rows, self.times, -jnp.inf), axis=1)

    def until(self, t: float) -> "TimeSeries":
        """The same series with every observation after time `t` marked missing (the
        history a forecast from `t` may use). Each series must keep one."""
        mask = self.mask & (self.times <= t)[..., None]
        if not _is_traced(mask) and not bool(jnp.all(jnp.any(mask, axis=(1, 2)))):
            raise ValueError(
                f"Some series have no observation at or before t = {t}; forecast "
                "from a later time."
            )
        return eqx.tree_at(lambda s: s.mask, self, mask)

    def after(self, t: float) -> "TimeSeries":
        """The same series with every observation at or before time `t` marked
        missing (the targets of a forecast from `t`); a series may be left empty."""
        return eqx.tree_at(
            lambda s: s.mask, self, self.mask & (self.times > t)[..., None]
        )

    def split(
        self, num_test: int, *, key: PRNGKeyArray
    ) -> tuple["TimeSeries", "TimeSeries"]:
        """A random split into `(train, test)` series, `num_test` of them in `test`."""
        if not 0 < num_test < self.num_series:
            raise ValueError(
                f"`num_test` must be between 1 and {self.num_series - 1}, got "
                f"{num_test}."
            )
        order = np.asarray(jr.permutation(key, self.num_series))
        return self[np.sort(order[num_test:])], self[np.sort(order[:num_test])]

    def channel_stats(
        self,
    ) -> tuple[Float[Array, " channels"], Float[Array, " channels"]]:
        """The mean and standard deviation of each channel over observed entries."""
        count = jnp.sum(self.mask, axis=(0, 1)).astype(self.values.dtype)
        mean = jnp.sum(jnp.where(self.mask, self.values, 0.0), axis=(0, 1)) / count
        centred = jnp.where(self.mask, self.values - mean[None, None], 0.0)
        var = jnp.sum(centred**2, axis=(0, 1)) / count
        return mean, jnp.sqrt(var)

    def standardise(self, mean: Array, scale: Array) -> "TimeSeries":
        """Each channel shifted by `mean` and divided by `scale` (fit them on the
        training series with [`nfdm_sciml.TimeSeries.channel_stats`][])."""
        mean, scale = jnp.asarray(mean), jnp.asarray(scale)
        if mean.shape != (self.num_channels,) or scale.shape != mean.shape:
            raise ValueError(
                f"`mean` and `scale` must have shape (channels,) = "
                f"({self.num_channels},); got {mean.shape} and {scale.shape}."
            )
        scaled = (self.values - mean[None, None]) / scale[None, None]
        values = jnp.where(self.mask, scaled, 0.0)
        return eqx.tree_at(lambda s: s.values, self, values.astype(self.values.dtype))

    def sampler(self, batch_size: int) -> Callable[[PRNGKeyArray], "TimeSeries"]:
        """`key -> TimeSeries` of `batch_size` series drawn with replacement:
        traceable, for [`nfdm_sciml.Trainer.fit`][]."""
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(
                f"`batch_size` must be a positive integer, got {batch_size!r}."
            )
        n = self.num_series

        def sample(key):
            return self[jr.randint(key, (batch_size,), 0, n)]

        return sample


def check_series(series, channels: int | None = None) -> TimeSeries:
    """Validates the series a model is given."""
    if not isinstance(series, TimeSeries):
        raise TypeError(
            f"Expected an `nfdm_sciml.TimeSeries`, got {type(series).__name__}; "
            "build one with `nfdm_sciml.TimeSeries(times, values, mask)`."
        )
    if channels is not None and series.num_channels != channels:
        raise ValueError(
            f"The series have {series.num_channels} channels but the model was built "
            f"for {channels}."
        )
    return series


def energy_distance(
    x: Float[Array, " n *dims"], y: Float[Array, " m *dims"]
) -> Float[Array, ""]:
    r"""The energy distance $2\mathbb{E}\|X - Y\| - \mathbb{E}\|X - X'\| -
    \mathbb{E}\|Y - Y'\|$ between two samples (examples flattened), with the
    unbiased within-sample means. Zero in expectation for one distribution."""
    x = jnp.reshape(x, (x.shape[0], -1))
    y = jnp.reshape(y, (y.shape[0], -1)).astype(x.dtype)
    if x.shape[1] != y.shape[1] or x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(
            "`energy_distance` needs two samples of at least two examples with the "
            f"same shape; got {x.shape} and {y.shape} (flattened)."
        )

    def mean_dist(a, b, same):
        d = jnp.sqrt(jnp.maximum(jnp.sum((a[:, None] - b[None]) ** 2, -1), 1e-30))
        if same:
            n = a.shape[0]
            return (jnp.sum(d) - jnp.sum(jnp.diag(d))) / (n * (n - 1))
        return jnp.mean(d)

    return 2 * mean_dist(x, y, False) - mean_dist(x, x, True) - mean_dist(y, y, True)
