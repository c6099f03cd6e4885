"""The bare training step: one optax update of an [`nfdm_sciml.NFDM`][] under `jit`,
and a `lax.scan` over many steps with data drawn on the device."""

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.random as jr
import optax
from jaxtyping import Array, PRNGKeyArray, PyTree

from ._bridge import NeuralFlowBridge
from ._constraints import Penalties
from ._custom_types import Batch
from ._model import LossTerms, NFDM
from ._timecourse import TimeCourseNFDM


StepFn = Callable[
    [eqx.Module, optax.OptState, Batch, PRNGKeyArray],
    tuple[eqx.Module, optax.OptState, LossTerms | dict[str, Array]],
]


def make_train_step(
    optimiser: optax.GradientTransformation,
    *,
    objective: Literal["nelbo", "diffusion"] = "nelbo",
    penalties: Penalties | None = None,
) -> StepFn:
    """Builds `step(model, opt_state, xs, key) -> (model, opt_state, terms)`.

    For an [`nfdm_sciml.NFDM`][] the step minimises the batch mean of the
    single-sample NELBO ([`nfdm_sciml.NFDM.batch_loss`][], or its diffusion term
    alone with `objective="diffusion"`), plus the weighted `penalties` if given, over
    every inexact array of the model (forward process, predictor and volatility
    together) and returns the batch means of the terms. Any other model with a
    method `batch_loss(xs, *, key) -> (loss, terms)` (such as the flow-matching
    baselines) is trained on its own loss. The step is pure and
    `eqx.filter_jit`-ted; initialise the optimiser state with
    `optimiser.init(eqx.filter(model, eqx.is_inexact_array))`.
    """
    if objective not in ("nelbo", "diffusion"):
        raise ValueError(
            f"`objective` must be 'nelbo' or 'diffusion', got {objective!r}."
        )
    if penalties is not None and not isinstance(penalties, Penalties):
        raise TypeError(
            f"`penalties` must be an `nfdm_sciml.Penalties`, got {type(penalties)}."
        )

    def loss_fn(model, xs, key):
        if isinstance(model, NFDM):
            return model.batch_loss(
                xs, key=key, objective=objective, penalties=penalties
            )
        if (
            isinstance(model, NeuralFlowBridge | TimeCourseNFDM)
            and objective == "nelbo"
        ):
            return model.batch_loss(xs, key=key, penalties=penalties)
        if objective != "nelbo" or penalties is not None:
            raise TypeError(
                "`objective` and `penalties` apply to NFDM, bridge and time-course "
                f"NFDM models only; a {type(model).__name__} is trained on its own "
                "`batch_loss`."
            )
        return model.batch_loss(xs, key=key)

    @eqx.filter_jit
    def step(model, opt_state, xs, key):
        (_, terms), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            model, xs, key
        )
        params = eqx.filter(model, eqx.is_inexact_array)
        # optax mixes Python floats with its int32 step counter; allow that even when
        # the caller runs JAX with strict dtype promotion.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimiser.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, terms

    return step


def run_steps(
    step: StepFn,
    model: eqx.Module,
    opt_state: PyTree,
    sample_batch: Callable[[PRNGKeyArray], Batch],
    num_steps: int,
    *,
    key: PRNGKeyArray,
) -> tuple[eqx.Module, PyTree, LossTerms | dict[str, Array]]:
    """Runs `num_steps` training steps inside one `jax.lax.scan`, drawing each batch
    with `sample_batch(key)` on the device: no host round trip between steps.

    **Returns:** `(model, opt_state, terms)` with `terms` holding each step's batch
    means, shape `(num_steps,)`.
    """
    if not (isinstance(num_steps, int) and num_steps > 0):
        raise ValueError(f"`num_steps` must be a positive integer, got {num_steps!r}.")
    return _scan_steps(step, sample_batch, model, opt_state, jr.split(key, num_steps))


@eqx.filter_jit
def _scan_steps(step, sample_batch, model, opt_state, keys):
    # Module-level and jitted on (step, sample_batch) by identity, so repeated calls
    # with the same functions reuse one compilation.
    params, static = eqx.partition(model, eqx.is_array)

    def body(carry, step_key):
        params, opt_state = carry
        dkey, lkey = jr.split(step_key)
        model = eqx.combine(params, static)
        model, opt_state, terms = step(model, opt_state, sample_batch(dkey), lkey)
        return (eqx.filter(model, eqx.is_array), opt_state), terms

    (params, opt_state), terms = jax.lax.scan(body, (params, opt_state), keys)
    return eqx.combine(params, static), opt_state, terms
