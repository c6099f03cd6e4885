"""The bare training step: one optax update of an [`nfdm_sciml.NFDM`][] under `jit`,
and a `lax.scan` over many steps with data drawn on the device."""

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.random as jr
import optax
from jaxtyping import PRNGKeyArray, PyTree

from ._custom_types import Batch
from ._model import LossTerms, NFDM


StepFn = Callable[
    [NFDM, optax.OptState, Batch, PRNGKeyArray],
    tuple[NFDM, optax.OptState, LossTerms],
]


def make_train_step(
    optimiser: optax.GradientTransformation,
    *,
    objective: Literal["nelbo", "diffusion"] = "nelbo",
) -> StepFn:
    """Builds `step(model, opt_state, xs, key) -> (model, opt_state, terms)`.

    The step minimises the batch mean of the single-sample NELBO
    ([`nfdm_sciml.NFDM.batch_loss`][], or its diffusion term alone with
    `objective="diffusion"`) over every inexact array of the model (forward process,
    predictor and volatility together) and returns the batch means of the bound
    terms. It is pure and `eqx.filter_jit`-ted; initialise the optimiser state with
    `optimiser.init(eqx.filter(model, eqx.is_inexact_array))`.
    """
    if objective not in ("nelbo", "diffusion"):
        raise ValueError(
            f"`objective` must be 'nelbo' or 'diffusion', got {objective!r}."
        )

    def loss_fn(model, xs, key):
        return model.batch_loss(xs, key=key, objective=objective)

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
    model: NFDM,
    opt_state: PyTree,
    sample_batch: Callable[[PRNGKeyArray], Batch],
    num_steps: int,
    *,
    key: PRNGKeyArray,
) -> tuple[NFDM, PyTree, LossTerms]:
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
