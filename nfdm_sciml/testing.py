r"""Checks that a forward process, volatility or predictor is what the bound assumes.

Every built-in component passes these checks in our own test suite; run them on your
own components the same way. Three lines validate a new forward process:

```python
from nfdm_sciml.testing import check_forward_process

check_forward_process(MyProcess(...), data_shape=(2,), delta=0.01)
```

Each `check_*` raises an `AssertionError` naming the property, the inputs and the
size of the violation; `check_forward_process` draws the inputs with hypothesis (so a
failure is shrunk to a small counterexample). Tolerances follow the dtype: run in
float64 (`jax.config.update("jax_enable_x64", True)`) for tight checks.
"""

import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from jax.typing import DTypeLike

from ._custom_types import Context, Data
from ._forward import AbstractForwardProcess, AbstractGaussianProcess
from ._predictor import AbstractPredictor, FunctionPredictor
from ._volatility import AbstractVolatility


def _tolerance(dtype) -> float:
    return 1e-6 if jnp.dtype(dtype) == jnp.float64 else 2e-3


def _assert_close(name, actual, expected, rtol, atol, where) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{name}: shape {actual.shape} does not match the expected "
            f"{expected.shape} "
            f"({where})."
        )
    if not np.all(np.isfinite(actual)):
        raise AssertionError(f"{name}: non-finite values {actual} ({where}).")
    excess = np.abs(actual - expected) - (atol + rtol * np.abs(expected))
    if np.any(excess > 0):
        worst = int(np.argmax(excess))
        raise AssertionError(
            f"{name}: got {actual.ravel()[worst]!r}, expected "
            f"{expected.ravel()[worst]!r}"
            f" (largest violation, tolerance rtol={rtol:g}, atol={atol:g}; {where})."
        )


def _where(t, x) -> str:
    return f"t={float(t):.6g}, x={np.asarray(x).ravel()[:4]}"


def check_round_trip(
    process: AbstractForwardProcess, eps: Data, t, x: Data, context: Context = None
) -> None:
    """$F^{-1}(F(\\varepsilon, t, x), t, x) = \\varepsilon$."""
    t = jnp.asarray(t, eps.dtype)
    tol = _tolerance(eps.dtype)
    _assert_close(
        "inverse round trip",
        _round_trip(process, eps, t, x, context),
        eps,
        10 * tol,
        10 * tol,
        _where(t, x),
    )


@eqx.filter_jit
def _round_trip(process, eps, t, x, context):
    return process.inverse(process(eps, t, x, context), t, x, context)


def check_log_det(
    process: AbstractForwardProcess, eps: Data, t, x: Data, context: Context = None
) -> None:
    """`log_det_jacobian` equals $\\log|\\det|$ of the autodiff Jacobian in `eps`,
    and `log_prob` at $z = F(\\varepsilon)$ is $\\log\\mathcal{N}(\\varepsilon)$
    minus it."""
    t = jnp.asarray(t, eps.dtype)
    sign, expected, actual, log_prob = _log_dets(process, eps, t, x, context)
    if float(sign) == 0:
        raise AssertionError(
            f"F is not invertible in eps here: det = 0 ({_where(t, x)})."
        )
    tol = _tolerance(eps.dtype)
    _assert_close("log-determinant", actual, expected, 10 * tol, 10 * tol, _where(t, x))
    log_normal = -0.5 * jnp.sum(eps**2) - 0.5 * eps.size * math.log(2 * math.pi)
    _assert_close(
        "log_prob", log_prob, log_normal - expected, 10 * tol, 10 * tol, _where(t, x)
    )


@eqx.filter_jit
def _log_dets(process, eps, t, x, context):
    def flat_map(e):
        return process(e.reshape(eps.shape), t, x, context).reshape(-1)

    sign, expected = jnp.linalg.slogdet(jax.jacfwd(flat_map)(eps.reshape(-1)))
    log_det = process.log_det_jacobian(eps, t, x, context)
    log_prob = process.log_prob(process(eps, t, x, context), t, x, context)
    return sign, expected, log_det, log_prob


def check_velocity(
    process: AbstractForwardProcess, eps: Data, t, x: Data, context: Context = None
) -> None:
    """The velocity equals a central finite difference of $F$ in $t$, both through
    `velocity(z, ...)` and through `sample_terms(eps, ...)`.

    `t` is moved into `[h, 1 - h]` so that the difference stays inside the domain.
    """
    dtype = eps.dtype
    h = 1e-5 if jnp.dtype(dtype) == jnp.float64 else 1e-2
    t = jnp.clip(jnp.asarray(t, dtype), h, 1 - h)
    expected, z, velocity, z2, velocity2 = _velocities(process, eps, t, x, context, h)
    tol = _tolerance(dtype)
    rtol, atol = 100 * tol, 100 * tol
    where = _where(t, x)
    _assert_close(
        "velocity vs finite difference", velocity, expected, rtol, atol, where
    )
    _assert_close("sample_terms sample", z2, z, tol, tol, where)
    _assert_close("sample_terms velocity", velocity2, expected, rtol, atol, where)


@eqx.filter_jit
def _velocities(process, eps, t, x, context, h):
    after, before = process(eps, t + h, x, context), process(eps, t - h, x, context)
    z = process(eps, t, x, context)
    z2, velocity2, _ = process.sample_terms(eps, t, x, context)
    return (
        (after - before) / (2 * h),
        z,
        process.velocity(z, t, x, context),
        z2,
        velocity2,
    )


def check_score(
    process: AbstractForwardProcess, eps: Data, t, x: Data, context: Context = None
) -> None:
    """The score equals the gradient of the conditional log-density, computed
    independently: $\\log\\mathcal{N}(\\varepsilon) - \\log|\\det J|$ with the dense
    autodiff Jacobian $J$ at $\\varepsilon = F^{-1}(z)$."""
    t = jnp.asarray(t, eps.dtype)
    expected, score, score2, score3, velocity3, velocity = _scores(
        process, eps, t, x, context
    )
    tol = 10 * _tolerance(eps.dtype)
    where = _where(t, x)
    _assert_close("score vs autodiff", score, expected, tol, tol, where)
    _assert_close("sample_terms score", score2, expected, tol, tol, where)
    _assert_close("velocity_and_score score", score3, expected, tol, tol, where)
    _assert_close("velocity_and_score velocity", velocity3, velocity, tol, tol, where)


@eqx.filter_jit
def _scores(process, eps, t, x, context):
    shape = eps.shape

    def log_density(z_flat):
        e = process.inverse(z_flat.reshape(shape), t, x, context).reshape(-1)
        jacobian = jax.jacfwd(
            lambda u: process(u.reshape(shape), t, x, context).reshape(-1)
        )(e)
        log_normal = -0.5 * jnp.sum(e**2) - 0.5 * e.size * math.log(2 * math.pi)
        return log_normal - jnp.linalg.slogdet(jacobian)[1]

    z = process(eps, t, x, context)
    expected = jax.grad(log_density)(z.reshape(-1)).reshape(shape)
    _, _, score2 = process.sample_terms(eps, t, x, context)
    velocity3, score3 = process.velocity_and_score(z, t, x, context)
    return (
        expected,
        process.score(z, t, x, context),
        score2,
        score3,
        velocity3,
        process.velocity(z, t, x, context),
    )


def check_boundary(
    process: AbstractForwardProcess,
    eps: Data,
    x: Data,
    context: Context = None,
    *,
    delta: float,
) -> None:
    """The NFDM boundary conditions: $F(\\varepsilon, 0, x) = x + \\delta\\varepsilon$
    and $F(\\varepsilon, 1, x) = \\varepsilon$, so that $q(z_1 \\mid x) =
    \\mathcal{N}(0, I)$ exactly and the prior KL is zero."""
    z0, z1, kl = _boundaries(process, eps, x, context)
    tol = _tolerance(eps.dtype)
    where = f"x={np.asarray(x).ravel()[:4]}"
    _assert_close("boundary at t=0", z0, x + delta * eps, tol, tol, where)
    _assert_close("boundary at t=1", z1, eps, tol, tol, where)
    _assert_close("prior KL", kl, jnp.zeros((), eps.dtype), tol, tol, where)


@eqx.filter_jit
def _boundaries(process, eps, x, context):
    zero, one = jnp.zeros((), eps.dtype), jnp.ones((), eps.dtype)
    return (
        process(eps, zero, x, context),
        process(eps, one, x, context),
        process.prior_kl(eps, x, context),
    )


def check_volatility(volatility: AbstractVolatility, ts) -> None:
    """$g(t)$ is a finite scalar $> 0$ at every `t` in `ts` (any 1D array-like)."""
    ts = jnp.asarray(ts, jnp.result_type(float)).reshape(-1)
    g = eqx.filter_jit(jax.vmap(volatility))(ts)
    if g.shape != ts.shape:
        raise AssertionError(f"g(t) must be a scalar, got shape {g.shape[1:]}.")
    bad = ~(np.isfinite(np.asarray(g)) & (np.asarray(g) > 0))
    if np.any(bad):
        i = int(np.argmax(bad))
        raise AssertionError(f"g(t) must be finite and > 0; got g({ts[i]}) = {g[i]}.")


def check_predictor(
    predictor: AbstractPredictor, z: Data, t, context: Context = None
) -> None:
    """$\\hat x(z, t)$ has the shape of `z`, is finite, and has a finite derivative in
    $t$ (time must enter smoothly: velocities are JVPs in $t$)."""
    t = jnp.asarray(t, z.dtype)
    x_hat, dx_hat = jax.jvp(
        lambda s: predictor(z, s, context), (t,), (jnp.ones_like(t),)
    )
    if x_hat.shape != z.shape:
        raise AssertionError(f"x_hat has shape {x_hat.shape}, expected {z.shape}.")
    if not (np.all(np.isfinite(x_hat)) and np.all(np.isfinite(dx_hat))):
        raise AssertionError(
            f"x_hat or its t-derivative is not finite at t={float(t)}."
        )


def example_inputs(
    data_shape: Sequence[int], dtype: DTypeLike = np.float32, *, scale: float = 3.0
) -> st.SearchStrategy:
    """A hypothesis strategy of `(eps, t, x)` for one example of `data_shape`.

    Values vary but shapes do not (a new shape would recompile); `t` covers `[0, 1]`
    with both ends.
    """
    width = 64 if np.dtype(dtype) == np.float64 else 32
    values = st.floats(-scale, scale, width=width)
    arrays = hnp.arrays(np.dtype(dtype), tuple(data_shape), elements=values)
    times = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0, width=width))
    return st.tuples(arrays, times, arrays)


def check_forward_process(
    process: AbstractForwardProcess,
    data_shape: Sequence[int],
    *,
    context: Context = None,
    delta: float | None = None,
    dtype=None,
    max_examples: int = 20,
) -> None:
    """Runs every forward-process check on inputs drawn by hypothesis.

    **Arguments:**

    - `process`: the forward process to check.
    - `data_shape`: the shape of one example.
    - `context`: a fixed context to condition on, if the process uses one.
    - `delta`: if given, also check the NFDM boundary conditions with this floor.
    - `dtype`: of the inputs; defaults to the default float dtype.
    - `max_examples`: how many inputs hypothesis draws.

    Raises `AssertionError` with the smallest failing input found.
    """
    dtype = jnp.dtype(jnp.result_type(float) if dtype is None else dtype)

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True)
    @given(example_inputs(data_shape, dtype))
    def run(inputs):
        eps, t, x = (jnp.asarray(u) for u in inputs)
        t = jnp.asarray(t, dtype)
        check_round_trip(process, eps, t, x, context)
        check_log_det(process, eps, t, x, context)
        check_velocity(process, eps, t, x, context)
        check_score(process, eps, t, x, context)
        if delta is not None:
            check_boundary(process, eps, x, context, delta=delta)

    run()


def check_bridge_boundary(
    process: AbstractForwardProcess,
    eps: Data,
    x0: Data,
    x1: Data,
    *,
    delta: float,
) -> None:
    """The bridge boundary conditions: $F(\\varepsilon, 0, x_0, x_1) = x_0 +
    \\delta\\varepsilon$ and $F(\\varepsilon, 1, x_0, x_1) = x_1 +
    \\delta\\varepsilon$ (the source $x_1$ is the context), with a zero prior
    term."""
    z0, z1, kl = _boundaries(process, eps, x0, x1)
    tol = _tolerance(eps.dtype)
    where = f"x0={np.asarray(x0).ravel()[:4]}, x1={np.asarray(x1).ravel()[:4]}"
    _assert_close("bridge boundary at t=0", z0, x0 + delta * eps, tol, tol, where)
    _assert_close("bridge boundary at t=1", z1, x1 + delta * eps, tol, tol, where)
    _assert_close("prior KL", kl, jnp.zeros((), eps.dtype), tol, tol, where)


def check_bridge_process(
    process: AbstractForwardProcess,
    data_shape: Sequence[int],
    *,
    delta: float,
    dtype=None,
    max_examples: int = 20,
) -> None:
    """Runs every forward-process check on a bridge, with the source sample $x_1$
    drawn by hypothesis along with $(\\varepsilon, t, x_0)$ and passed as the
    context, and the bridge boundary conditions
    ([`nfdm_sciml.testing.check_bridge_boundary`][]) in place of NFDM's.

    **Arguments:** as [`nfdm_sciml.testing.check_forward_process`][]; `delta` is the
    bridge's floor at both ends.
    """
    dtype = jnp.dtype(jnp.result_type(float) if dtype is None else dtype)
    width = 64 if dtype == jnp.float64 else 32
    sources = hnp.arrays(
        np.dtype(dtype), tuple(data_shape), elements=st.floats(-3, 3, width=width)
    )

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True)
    @given(example_inputs(data_shape, dtype), sources)
    def run(inputs, x1):
        eps, t, x0 = (jnp.asarray(u) for u in inputs)
        t, x1 = jnp.asarray(t, dtype), jnp.asarray(x1)
        check_round_trip(process, eps, t, x0, x1)
        check_log_det(process, eps, t, x0, x1)
        check_velocity(process, eps, t, x0, x1)
        check_score(process, eps, t, x0, x1)
        check_bridge_boundary(process, eps, x0, x1, delta=delta)

    run()


def gaussian_posterior_mean(
    process: AbstractGaussianProcess, data_mean: float, data_std: float
) -> FunctionPredictor:
    r"""The exact $\mathbb{E}[x \mid z_t]$ for data $x \sim \mathcal{N}(m, s^2 I)$ under
    a Gaussian process whose mean is affine in $x$ elementwise and whose scale does not
    depend on $x$ (such as [`nfdm_sciml.LinearInterpolant`][] and
    [`nfdm_sciml.VariancePreserving`][]).

    With $\mu = a_t x + b_t$: $\mathbb{E}[x\mid z] = m + \frac{a_t s^2}{a_t^2 s^2 +
    \sigma_t^2}(z - a_t m - b_t)$. It is the optimal predictor for such processes, so it
    makes analytic checks of the bound and of the likelihoods possible.
    """

    def predict(z, t, context):
        mu0, sigma = process.mean_and_scale(t, jnp.zeros_like(z), context)
        a = process.mean_and_scale(t, jnp.ones_like(z), context)[0] - mu0
        gain = a * data_std**2 / (a**2 * data_std**2 + sigma**2)
        return data_mean + gain * (z - a * data_mean - mu0)

    return FunctionPredictor(predict)
