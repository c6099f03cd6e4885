"""The training loop for real runs: schedules, clipping, EMA, chunks of steps under one
`jit`, periodic evaluation, metrics, checkpoints and resumption, data parallelism."""

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Int, PRNGKeyArray, PyTree

from ._checkpoint import load_checkpoint, save_checkpoint
from ._constraints import Penalties
from ._custom_types import Batch
from ._model import LossTerms
from ._progress import AbstractProgress, NoProgress
from ._train import make_train_step


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a training run; every field is checked on construction.

    - `steps`: total optimisation steps.
    - `batch_size`: examples per step (divisible by the number of devices).
    - `learning_rate`: peak learning rate of Adam.
    - `warmup_steps`: linear warm-up from zero to the peak.
    - `schedule`: `"constant"` after warm-up, or `"cosine"` decay to
      `min_learning_rate` at `steps`.
    - `clip_norm`: clip gradients to this global norm (`None`: no clipping).
    - `ema_decay`: decay of the parameter average used for evaluation and sampling
      (`None`: no average); it ramps up from 0.1 as `(1 + step) / (10 + step)`.
    - `steps_per_call`: steps per jitted `lax.scan`; host work (metrics, progress,
      checkpoints, evaluation) happens only between calls.
    - `eval_every`, `checkpoint_every`: in steps (multiples of `steps_per_call`);
      `None` turns them off. A final checkpoint is always written when the trainer
      has a run folder.
    - `keep_checkpoints`: how many recent checkpoints to keep.
    - `objective`: `"nelbo"` or `"diffusion"` (see `NFDM.batch_loss`).
    - `seed`: the only source of randomness in a run.
    """

    steps: int = 3000
    batch_size: int = 1024
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_learning_rate: float = 0.0
    clip_norm: float | None = None
    ema_decay: float | None = 0.999
    steps_per_call: int = 250
    eval_every: int | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3
    objective: Literal["nelbo", "diffusion"] = "nelbo"
    seed: int = 0

    def __post_init__(self):
        def positive_int(name, allow_zero=False):
            value = getattr(self, name)
            low = 0 if allow_zero else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"`{name}` must be an integer >= {low}, got {value!r}."
                )

        for name in ("steps", "batch_size", "steps_per_call", "keep_checkpoints"):
            positive_int(name)
        positive_int("warmup_steps", allow_zero=True)
        positive_int("seed", allow_zero=True)
        if not self.learning_rate > 0 or not 0 <= self.min_learning_rate:
            raise ValueError(
                "`learning_rate` must be > 0 and `min_learning_rate` >= 0; got "
                f"{self.learning_rate} and {self.min_learning_rate}."
            )
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(
                f"`schedule` must be 'constant' or 'cosine', got {self.schedule!r}."
            )
        if self.objective not in ("nelbo", "diffusion"):
            raise ValueError(
                f"`objective` must be 'nelbo' or 'diffusion', got {self.objective!r}."
            )
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"`clip_norm` must be > 0 or None, got {self.clip_norm}.")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(
                f"`ema_decay` must lie in (0, 1) or be None, got {self.ema_decay}."
            )
        for name in ("eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, int) or value < 1 or value % self.steps_per_call:
                raise ValueError(
                    f"`{name}` must be None or a positive multiple of steps_per_call "
                    f"({self.steps_per_call}), got {value!r}."
                )

    def learning_rate_schedule(self) -> optax.Schedule:
        """The learning rate as a function of the step."""
        peak = self.learning_rate
        if self.schedule == "cosine":
            return optax.warmup_cosine_decay_schedule(
                0.0, peak, self.warmup_steps, self.steps, self.min_learning_rate
            )
        if self.warmup_steps == 0:
            return optax.constant_schedule(peak)
        return optax.linear_schedule(0.0, peak, self.warmup_steps)

    def optimiser(self) -> optax.GradientTransformation:
        """Adam on the schedule, after gradient clipping if asked for."""
        adam = optax.adam(self.learning_rate_schedule())
        if self.clip_norm is None:
            return adam
        return optax.chain(optax.clip_by_global_norm(self.clip_norm), adam)


class TrainState(eqx.Module):
    """Everything a run needs to continue exactly: model, parameter average,
    optimiser state, step counter and the run's base key."""

    model: eqx.Module
    ema: eqx.Module | None
    opt_state: PyTree
    step: Int[Array, ""]
    key: PRNGKeyArray


@eqx.filter_jit
def _train_chunk(step_fn, sample_batch, ema_decay, sharding, state, num_steps):
    params, static = eqx.partition(state.model, eqx.is_array)
    ema = None if state.ema is None else eqx.filter(state.ema, eqx.is_array)

    def body(carry, _):
        params, opt_state, ema, step = carry
        # Keys come from the step number, not from a running split, so a resumed run
        # draws exactly what the uninterrupted run would have.
        dkey, lkey = jr.split(jr.fold_in(state.key, step))
        xs = sample_batch(dkey)
        if sharding is not None:
            xs = jax.lax.with_sharding_constraint(xs, sharding)
        model, opt_state, terms = step_fn(
            eqx.combine(params, static), opt_state, xs, lkey
        )
        params = eqx.filter(model, eqx.is_array)
        if ema is not None:
            # The decay ramps up as (1 + n) / (10 + n), so that early in a run the
            # average is not dominated by the initial parameters.
            n = step.astype(jnp.float32)
            decay = jnp.minimum(ema_decay, (1 + n) / (10 + n))
            ema = jax.tree.map(
                lambda e, p: (
                    decay.astype(e.dtype) * e + (1 - decay.astype(e.dtype)) * p
                    if jnp.issubdtype(p.dtype, jnp.inexact)
                    else p
                ),
                ema,
                params,
            )
        return (params, opt_state, ema, step + 1), terms

    carry = (params, state.opt_state, ema, state.step)
    (params, opt_state, ema, step), terms = jax.lax.scan(
        body, carry, None, length=num_steps
    )
    new = TrainState(
        eqx.combine(params, static),
        None if ema is None else eqx.combine(ema, static),
        opt_state,
        step,
        state.key,
    )
    return new, terms


class Trainer:
    """Runs training for an [`nfdm_sciml.NFDM`][] from a batch sampler.

    **Arguments:**

    - `config`: a [`nfdm_sciml.TrainConfig`][].
    - `run_dir`: the run folder for `config.json`, `metrics.jsonl` and `checkpoints/`;
      `None` keeps the run in memory.
    - `progress`: where to report progress (default: nowhere).
    - `devices`: devices for data-parallel training (default: all local devices).
      With more than one, each batch is split across them and the state replicated;
      the result equals single-device training up to floating-point reassociation.
    - `metadata`: extra JSON-serialisable data stored in every checkpoint (for
      example the data standardisation).
    - `penalties`: [`nfdm_sciml.Penalties`][] added to the objective of an NFDM
      (their unweighted batch means are logged as `penalty/<name>`).

    Besides an NFDM, any Equinox model with `batch_loss(xs, *, key) -> (loss, terms)`
    (a dict of scalars) can be trained, such as
    [`nfdm_sciml.FlowMatching`][].

    A run is fully determined by the config (its seed) and the sampler.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        run_dir: str | Path | None = None,
        progress: AbstractProgress | None = None,
        devices: Sequence[Any] | None = None,
        metadata: dict[str, Any] | None = None,
        penalties: Penalties | None = None,
    ):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"`config` must be a TrainConfig, got {type(config)}.")
        self.config = config
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.progress = progress or NoProgress()
        self.metadata = dict(metadata or {})
        self.penalties = penalties
        self.step_fn = make_train_step(
            config.optimiser(), objective=config.objective, penalties=penalties
        )
        # All devices of all processes: with `jax.distributed` initialised, every
        # process runs this same program on its share of each batch.
        devices = list(jax.devices() if devices is None else devices)
        if len(devices) > 1:
            if config.batch_size % len(devices):
                raise ValueError(
                    f"`batch_size` ({config.batch_size}) must be divisible by the "
                    f"number of devices ({len(devices)}) for data-parallel training."
                )
            mesh = Mesh(np.array(devices), ("data",))
            self.batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
            self.state_sharding = NamedSharding(mesh, PartitionSpec())
        else:
            self.batch_sharding = self.state_sharding = None

    def init(self, model: eqx.Module) -> TrainState:
        """The state at step 0 for `model`."""
        opt_state = self.config.optimiser().init(
            eqx.filter(model, eqx.is_inexact_array)
        )
        ema = model if self.config.ema_decay is not None else None
        state = TrainState(
            model, ema, opt_state, jnp.zeros((), jnp.int32), jr.key(self.config.seed)
        )
        return self._place(state)

    def _place(self, state: TrainState) -> TrainState:
        if self.state_sharding is None:
            return state
        sharding = self.state_sharding
        if jax.process_count() == 1:
            arrays, static = eqx.partition(state, eqx.is_array)
            return eqx.combine(jax.device_put(arrays, sharding), static)

        # Several processes: every process holds the same full value (same seed, same
        # checkpoint), from which each builds the shards on its own devices.
        def place(x):
            if not eqx.is_array(x):
                return x
            if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jr.wrap_key_data(place(jr.key_data(x)))
            value = _local_value(x)
            return jax.make_array_from_callback(
                value.shape, sharding, lambda index: value[index]
            )

        return jax.tree.map(place, state, is_leaf=eqx.is_array)

    def restore(self, like: TrainState, path: str | Path | None = None) -> TrainState:
        """Loads the newest checkpoint of the run folder (or `path`) into a state
        shaped like `like`. Raises `CheckpointError` for an unusable checkpoint."""
        if path is None:
            if self.run_dir is None:
                raise ValueError(
                    "`restore` needs a `path` or a trainer with a run_dir."
                )
            path = self.run_dir / "checkpoints"
        state, _ = load_checkpoint(path, like)
        return self._place(state)

    def save(self, state: TrainState) -> Path:
        """Writes a checkpoint of `state` to the run folder (from the first process
        only, when several processes train together)."""
        if self.run_dir is None:
            raise ValueError("`save` needs a trainer with a run_dir.")
        metadata = {"config": dataclasses.asdict(self.config), **self.metadata}
        directory = self.run_dir / "checkpoints"
        step = int(_local_value(state.step))
        if jax.process_index() != 0:
            return directory / f"ckpt_{step:08d}.eqx"
        return save_checkpoint(
            directory,
            step,
            _to_host(state),
            metadata=metadata,
            keep=self.config.keep_checkpoints,
        )

    def fit(
        self,
        state: TrainState,
        sample_batch: Callable[[PRNGKeyArray], Batch],
        *,
        evaluate: Callable[[Any, int], dict[str, float]] | None = None,
        until: int | None = None,
    ) -> tuple[TrainState, list[dict[str, Any]]]:
        """Trains from `state.step` to `config.steps`.

        **Arguments:**

        - `state`: from `init` or `restore`.
        - `sample_batch`: `key -> batch`, traceable (it runs inside the scan): a
          built-in sampler, or indexing into an on-device array.
        - `evaluate`: called on the host every `eval_every` steps with the averaged
          model (or the model without EMA) and the step; returns metrics to log.
        - `until`: stop at this step instead of `config.steps` (a later call goes
          on from there).

        **Returns:** `(state, records)`: the final state and the metric records, also
        appended to `metrics.jsonl` in the run folder.
        """
        config, records = self.config, []
        metrics_file, main_process = None, jax.process_index() == 0
        progress = self.progress if main_process else NoProgress()
        if self.run_dir is not None and main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(
                json.dumps(dataclasses.asdict(config), indent=2)
            )
            metrics_file = (self.run_dir / "metrics.jsonl").open("a")
        end = config.steps if until is None else until
        if not 0 < end <= config.steps:
            raise ValueError(f"`until` must lie in [1, {config.steps}], got {until}.")
        schedule = config.learning_rate_schedule()
        step = int(_local_value(state.step))
        progress.start(config.steps, step)
        try:
            while step < end:
                n = min(config.steps_per_call, end - step)
                t0 = time.perf_counter()
                state, terms = _train_chunk(
                    self.step_fn,
                    sample_batch,
                    config.ema_decay,
                    self.batch_sharding,
                    state,
                    n,
                )
                means = {
                    k: float(np.mean(_local_value(v)))
                    for k, v in _term_dict(terms, config.objective).items()
                }
                seconds = time.perf_counter() - t0
                step += n
                record = {
                    "step": step,
                    **means,
                    "learning_rate": float(jnp.asarray(schedule(step - 1))),
                    "steps_per_second": n / seconds,
                }
                if (
                    evaluate is not None
                    and config.eval_every
                    and (step % config.eval_every == 0 or step == config.steps)
                ):
                    model = state.ema if state.ema is not None else state.model
                    record.update(
                        {
                            f"eval/{k}": float(v)
                            for k, v in evaluate(model, step).items()
                        }
                    )
                records.append(record)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if self.run_dir is not None and (
                    step == config.steps
                    or (config.checkpoint_every and step % config.checkpoint_every == 0)
                ):
                    self.save(state)
                shown = {
                    k: v
                    for k, v in record.items()
                    if k in ("nelbo", "diffusion", "loss")
                }
                progress.update(step, shown)
        finally:
            progress.close()
            if metrics_file is not None:
                metrics_file.close()
        return state, records


def initialise_distributed(
    coordinator_address: str, num_processes: int, process_id: int
) -> None:
    """Joins a multi-process (multi-host) run through `jax.distributed`.

    Call it first thing in every process, before any other JAX work, with the same
    `coordinator_address` (`"host:port"` of process 0) and `num_processes`, and each
    process's own `process_id`. A [`nfdm_sciml.Trainer`][] then shards each batch over
    the devices of all processes; process 0 alone writes metrics and checkpoints (to a
    folder every process can read, for resuming). On CPU the processes exchange
    gradients through Gloo.
    """
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(
            f"`num_processes` must be a positive integer, got {num_processes}."
        )
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(
            f"`process_id` must lie in [0, {num_processes - 1}], got {process_id}."
        )
    if not coordinator_address or ":" not in coordinator_address:
        raise ValueError(
            "`coordinator_address` must be 'host:port' of process 0, got "
            f"{coordinator_address!r}."
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


def _local_value(x) -> np.ndarray:
    """The value of a replicated array as a host array, also when other processes
    hold copies of it (such an array is not fully addressable from one process)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def _to_host(state: TrainState) -> TrainState:
    def local(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jr.wrap_key_data(jnp.asarray(_local_value(jr.key_data(x))))
        return jnp.asarray(_local_value(x))

    return jax.tree.map(local, state, is_leaf=eqx.is_array)


def _term_dict(terms, objective: str) -> dict[str, Array]:
    if not isinstance(terms, LossTerms):
        return dict(terms)
    out = {"diffusion": terms.diffusion}
    # With the diffusion objective the other terms are not computed (NaN placeholders);
    # otherwise every term is logged, NaN included, so that a diverged run shows.
    if objective != "diffusion":
        out["prior"], out["reconstruction"] = terms.prior, terms.reconstruction
        out["nelbo"] = terms.nelbo
    out.update({f"penalty/{k}": v for k, v in terms.penalties.items()})
    return out
