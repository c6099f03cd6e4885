"""Fitting a time-course model to snapshots, and the leave-one-out protocol of
trajectory inference: hide one time point, train on the others, push the snapshot
before it to the hidden time and measure the exact W1 to the hidden population."""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, cast, Literal

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._constraints import Penalties
from ._couplings import AbstractCoupling, ExactOTCoupling, SinkhornCoupling
from ._data import Standardiser
from ._metrics import wasserstein
from ._progress import NoProgress
from ._timecourse import (
    Snapshots,
    TimeCourseFlowMatching,
    TimeCourseNFDM,
    TimeCourseSolution,
)
from ._trainer import TrainConfig, Trainer


MethodName = Literal["nfdm", "ot-cfm", "ot-interpolation"]
_MODELS = {"nfdm": TimeCourseNFDM, "ot-cfm": TimeCourseFlowMatching}


class FittedTimeCourse(eqx.Module):
    """A trained time-course model with the standardisation of its training data;
    `simulate` takes and returns populations in data units.

    - `model`: a [`nfdm_sciml.TimeCourseNFDM`][] or
      [`nfdm_sciml.TimeCourseFlowMatching`][], trained on standardised data.
    - `standardiser`: the [`nfdm_sciml.Standardiser`][] fitted to the training
      snapshots.
    """

    model: TimeCourseNFDM | TimeCourseFlowMatching
    standardiser: Standardiser

    def simulate(
        self,
        x0: Float[Array, "n dim"],
        t_start: float,
        t_end: float,
        *,
        key: PRNGKeyArray,
        stochastic: bool | None = None,
        num_steps: int = 100,
        save_times: Sequence[float] | None = None,
    ) -> TimeCourseSolution:
        """Carries the population `x0` (data units) from `t_start` to `t_end`; the
        SDE for an NFDM and the ODE for flow matching unless `stochastic` says
        otherwise. **Returns:** a [`nfdm_sciml.TimeCourseSolution`][] in data
        units."""
        if stochastic is None:
            stochastic = isinstance(self.model, TimeCourseNFDM)
        z0 = self.standardiser.transform(jnp.asarray(x0, self.standardiser.mean.dtype))
        sol = self.model.simulate(
            z0,
            t_start,
            t_end,
            key=key,
            stochastic=stochastic,
            num_steps=num_steps,
            save_times=save_times,
        )
        return TimeCourseSolution(
            sol.times, self.standardiser.inverse(sol.trajectories)
        )


def default_time_course_config(seed: int = 0) -> TrainConfig:
    """The training set-up of [`nfdm_sciml.fit_time_course`][] when none is given:
    3000 Adam steps at 1e-3 with a cosine decay, batch 256, gradient clipping at
    norm 1, EMA 0.999."""
    return TrainConfig(
        steps=3000,
        batch_size=256,
        schedule="cosine",
        clip_norm=1.0,
        steps_per_call=500,
        seed=seed,
    )


def fit_time_course(
    snapshots: Snapshots,
    *,
    method: Literal["nfdm", "ot-cfm"] = "nfdm",
    seed: int = 0,
    config: TrainConfig | None = None,
    penalties: Penalties | None = None,
    trainer: Trainer | None = None,
    coupling: AbstractCoupling | Literal["minibatch"] | None = None,
    max_plan_size: int = 2000,
    **model_kwargs: Any,
) -> FittedTimeCourse:
    """Trains a time-course model on all the given snapshots.

    The data are standardised per feature (fitted to every training sample
    together) before training, so penalties see standardised units.

    **Arguments:**

    - `snapshots`: the training populations, [`nfdm_sciml.Snapshots`][].
    - `method`: `"nfdm"` ([`nfdm_sciml.TimeCourseNFDM`][]) or `"ot-cfm"`
      ([`nfdm_sciml.TimeCourseFlowMatching`][]).
    - `seed`: of the network initialisation (and of training unless `config` says).
    - `config`: a [`nfdm_sciml.TrainConfig`][]; by default
      `default_time_course_config(seed)`.
    - `penalties`: for `"nfdm"`, e.g. `Penalties(energy=(0.1, KineticEnergy()))`.
    - `trainer`: a ready [`nfdm_sciml.Trainer`][] (for a run folder or progress);
      built from `config` and `penalties` otherwise.
    - `coupling`: how samples of consecutive snapshots are linked into chains: a
      coupling of the whole (standardised) populations, computed once
      ([`nfdm_sciml.Snapshots.chain_sampler`][]; `SinkhornCoupling(epsilon=0.01)`
      if `None`), or `"minibatch"` for entropic OT between the minibatches of every
      step (slower: five couplings of 256 points cost about 0.1–0.5 s a step here).
    - `max_plan_size`: the most points of each population in the plans.
    - `model_kwargs`: passed to the model's constructor.

    **Returns:** a [`nfdm_sciml.FittedTimeCourse`][].
    """
    if not isinstance(snapshots, Snapshots):
        raise TypeError(
            f"`snapshots` must be an nfdm_sciml.Snapshots, got {type(snapshots)}; "
            "build one with Snapshots(times, populations) or Snapshots.from_labels."
        )
    if method not in _MODELS:
        raise ValueError(f"`method` must be one of {sorted(_MODELS)}, got {method!r}.")
    if isinstance(coupling, str) and coupling != "minibatch":
        raise ValueError(
            f"`coupling` must be a coupling, None or 'minibatch'; got {coupling!r}."
        )
    if penalties is not None and method != "nfdm":
        raise ValueError(
            "Penalties shape the NFDM's forward process; use method='nfdm'."
        )
    if trainer is None:
        config = default_time_course_config(seed) if config is None else config
        trainer = Trainer(config, penalties=penalties, progress=NoProgress())
    dtype = jnp.result_type(float)
    standardiser = Standardiser.fit(
        jnp.asarray(np.concatenate(snapshots.populations), dtype)
    )
    scaled = snapshots.map(lambda x: standardiser.transform(jnp.asarray(x, dtype)))
    minibatch = isinstance(coupling, str)
    model = _MODELS[method](
        snapshots.times,
        snapshots.dim,
        key=jr.key(seed),
        coupling=SinkhornCoupling(epsilon=0.01) if minibatch else None,
        **model_kwargs,
    )
    if minibatch:
        sampler = scaled.sampler(trainer.config.batch_size, dtype)
    else:
        sampler = scaled.chain_sampler(
            trainer.config.batch_size,
            cast(AbstractCoupling | None, coupling),
            max_size=max_plan_size,
            seed=seed,
            dtype=dtype,
        )
    state, _ = trainer.fit(trainer.init(model), sampler)
    trained = state.ema if state.ema is not None else state.model
    return FittedTimeCourse(cast(Any, trained), standardiser)


# A method of the protocol: (training snapshots, source population, source time,
# target time, seed) -> the predicted population at the target time.
Method = Callable[[Snapshots, np.ndarray, float, float, int], np.ndarray]


def model_method(
    method: Literal["nfdm", "ot-cfm"] = "nfdm",
    *,
    config: Callable[[int], TrainConfig] | None = None,
    stochastic: bool | None = None,
    num_steps: int = 100,
    penalties: Penalties | None = None,
    **model_kwargs: Any,
) -> Method:
    """A leave-one-out method that trains a model with
    [`nfdm_sciml.fit_time_course`][] and simulates it; `config(seed)` gives each
    run's [`nfdm_sciml.TrainConfig`][] (default: `default_time_course_config`)."""

    def run(train, source, t_source, t_target, seed):
        fitted = fit_time_course(
            train,
            method=method,
            seed=seed,
            config=(config or default_time_course_config)(seed),
            penalties=penalties,
            **model_kwargs,
        )
        sol = fitted.simulate(
            jnp.asarray(source, fitted.standardiser.mean.dtype),
            t_source,
            t_target,
            key=jr.key(10_000 + seed),
            stochastic=stochastic,
            num_steps=num_steps,
        )
        return np.asarray(sol.final)

    return run


def ot_interpolation(
    train: Snapshots, source: np.ndarray, t_source: float, t_target: float, seed: int
) -> np.ndarray:
    """The straight-line baseline: pairs the source with the next training snapshot
    by exact optimal transport and moves each point along its line to `t_target`."""
    later = [i for i, t in enumerate(train.times) if t > t_target]
    if not later:
        raise ValueError(f"No training snapshot after t = {t_target} to move toward.")
    target = train.populations[later[0]]
    rng = np.random.default_rng(seed)
    target = target[
        rng.choice(len(target), len(source), replace=len(target) < len(source))
    ]
    partners = ExactOTCoupling().match(jnp.asarray(source), jnp.asarray(target))
    u = (t_target - t_source) / (train.times[later[0]] - t_source)
    return np.asarray((1 - u) * source + u * np.asarray(partners))


@dataclasses.dataclass(frozen=True)
class LeaveOneOutResult:
    """The held-out W1 of every (left-out time, seed), with summaries.

    - `rows`: dicts with `time`, `index` (of the left-out snapshot), `seed` and
      `w1`.
    """

    rows: tuple[dict[str, float], ...]

    @property
    def w1(self) -> np.ndarray:
        return np.array([row["w1"] for row in self.rows])

    @property
    def mean(self) -> float:
        """The mean W1 over every left-out time and seed."""
        return float(np.mean(self.w1))

    @property
    def std(self) -> float:
        """Its standard deviation over every left-out time and seed."""
        return float(np.std(self.w1))

    def per_time(self) -> dict[float, tuple[float, float]]:
        """`{time: (mean, std)}` over seeds, for each left-out time."""
        out = {}
        for t in sorted({row["time"] for row in self.rows}):
            values = [row["w1"] for row in self.rows if row["time"] == t]
            out[t] = (float(np.mean(values)), float(np.std(values)))
        return out


def leave_one_out(
    snapshots: Snapshots,
    method: MethodName | Method = "nfdm",
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    left_out: Sequence[int] | None = None,
    eval_size: int = 1000,
    **method_kwargs: Any,
) -> LeaveOneOutResult:
    """The leave-one-out protocol of trajectory inference, on the user's snapshots.

    For each left-out snapshot $k$ (every interior one by default) and each seed:
    the method sees the snapshots without $k$ only; it carries (a subsample of) the
    snapshot $k - 1$ to $t_k$; the result is compared with (a subsample of) the
    held-out population by the exact $W_1$ (optimal assignment, in data units).

    **Arguments:**

    - `snapshots`: all the snapshots, [`nfdm_sciml.Snapshots`][], three or more.
    - `method`: `"nfdm"`, `"ot-cfm"`, `"ot-interpolation"`, or a function
      `(train, source, t_source, t_target, seed) -> predicted population`.
    - `seeds`: one run per seed and left-out time.
    - `left_out`: indices of the snapshots to hold out; not the first or the last,
      which have no earlier snapshot or no later one to train across.
    - `eval_size`: the most points in each W1 (it costs $O(n^3)$: about 3 s for
      1000 on 2 CPU cores).
    - `method_kwargs`: for `"nfdm"` and `"ot-cfm"`, passed to
      [`nfdm_sciml.model_method`][] (`config`, `stochastic`, `num_steps`,
      `penalties` and model arguments).

    **Returns:** a [`nfdm_sciml.LeaveOneOutResult`][].
    """
    if not isinstance(snapshots, Snapshots):
        raise TypeError(f"`snapshots` must be an nfdm_sciml.Snapshots: {snapshots!r}.")
    if len(snapshots) < 3:
        raise ValueError(
            f"Leave-one-out needs three or more snapshots (got {len(snapshots)}): one "
            "held out between two that the model is trained on."
        )
    interior = range(1, len(snapshots) - 1)
    left_out = list(interior) if left_out is None else [int(i) for i in left_out]
    if not left_out or any(i not in interior for i in left_out):
        raise ValueError(
            f"`left_out` must name interior snapshots, 1 to {len(snapshots) - 2}; got "
            f"{left_out}."
        )
    if not (isinstance(eval_size, int) and eval_size > 0):
        raise ValueError(f"`eval_size` must be a positive integer, got {eval_size!r}.")
    if isinstance(method, str):
        if method == "ot-interpolation":
            if method_kwargs:
                raise TypeError(
                    f"'ot-interpolation' takes no options: {method_kwargs}."
                )
            run: Method = ot_interpolation
        elif method in _MODELS:
            name = cast(Literal["nfdm", "ot-cfm"], method)
            run = model_method(name, **method_kwargs)
        else:
            raise ValueError(
                f"Unknown method {method!r}; choose 'nfdm', 'ot-cfm', "
                "'ot-interpolation' or pass a function."
            )
    elif callable(method):
        if method_kwargs:
            raise TypeError(f"Options {method_kwargs} apply to built-in methods only.")
        run = method
    else:
        raise TypeError(f"`method` must be a name or a function, got {method!r}.")

    rows = []
    for k in left_out:
        train = snapshots.drop(k)
        held, source = snapshots.populations[k], snapshots.populations[k - 1]
        n = min(eval_size, len(held), len(source))
        for seed in seeds:
            rng = np.random.default_rng([seed, k])
            src = source[rng.choice(len(source), n, replace=False)]
            ref = held[rng.choice(len(held), n, replace=False)]
            predicted = np.asarray(
                run(train, src, snapshots.times[k - 1], snapshots.times[k], seed)
            )
            if predicted.shape != src.shape or not np.all(np.isfinite(predicted)):
                raise ValueError(
                    f"The method returned {predicted.shape} with "
                    f"{int(np.sum(~np.isfinite(predicted)))} non-finite values for "
                    f"held-out time {snapshots.times[k]} (seed {seed}); expected a "
                    f"finite array of shape {src.shape}."
                )
            w1 = float(wasserstein(jnp.asarray(predicted), jnp.asarray(ref), p=1))
            rows.append(
                {"time": snapshots.times[k], "index": k, "seed": seed, "w1": w1}
            )
    return LeaveOneOutResult(tuple(rows))


def held_out_floor(
    snapshots: Snapshots,
    reference: Snapshots,
    *,
    left_out: Sequence[int] | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    eval_size: int = 1000,
) -> LeaveOneOutResult:
    """The floor of the protocol for generated data: the W1 between the held-out
    population and an independent sample of the same population (`reference`, the
    same generator with another seed), with the subsample sizes of `leave_one_out`.
    """
    if reference.times != snapshots.times:
        raise ValueError("`reference` must have the same times as `snapshots`.")

    def truth(train, source, t_source, t_target, seed):
        population = reference.populations[reference.times.index(t_target)]
        rng = np.random.default_rng([seed, 7])
        size = len(population)
        return population[rng.choice(size, len(source), replace=size < len(source))]

    return leave_one_out(
        snapshots, truth, seeds=seeds, left_out=left_out, eval_size=eval_size
    )
