import functools

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from hypothesis import given, settings

from nfdm_sciml._spline import _knots, rational_quadratic_spline


# Duplicated from the (future) tests/conftest.py so this module runs on its own.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

BOUND = 3.0
N = 8
K = 5
# Dense grids share one length, so that their calls share compilations too.
M = 301
# Every array is built in NumPy and every JAX call is jitted with fixed shapes: each
# function compiles once, which keeps this module fast.
quick = settings(derandomize=True, database=None, deadline=None, max_examples=20)


@functools.partial(jax.jit, static_argnums=4)
def _jitted_spline(x, width_logits, height_logits, derivative_params, inverse):
    return rational_quadratic_spline(
        x, width_logits, height_logits, derivative_params, bound=BOUND, inverse=inverse
    )


def spline(x, width_logits, height_logits, derivative_params, inverse=False):
    # `inverse` is always passed on positionally, so that leaving it out and passing
    # its default hit the same compiled function.
    return _jitted_spline(x, width_logits, height_logits, derivative_params, inverse)


def _floats(shape, low, high):
    elements = st.floats(low, high, allow_nan=False, width=64)
    return hnp.arrays(np.float64, shape, elements=elements)


inputs_strategy = _floats((N,), -1.5 * BOUND, 1.5 * BOUND)
params_strategy = st.tuples(
    _floats((N, K), -3.0, 3.0),
    _floats((N, K), -3.0, 3.0),
    _floats((N, K - 1), -3.0, 3.0),
)


def _random_params(seed, scale=2.0, dtype=np.float64, rows=N):
    rng = np.random.default_rng(seed)
    shapes = [(rows, K), (rows, K), (rows, K - 1)]
    return tuple((scale * rng.standard_normal(shape)).astype(dtype) for shape in shapes)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("inverse", [False, True])
def test_zero_parameters_give_identity(dtype, inverse):
    # Steps of 0.04 hit the knots of the uniform bins and the edges; half the points
    # lie outside.
    x = np.linspace(-2 * BOUND, 2 * BOUND, M, dtype=dtype)
    zeros = np.zeros((M, K), dtype)
    outputs, log_det = spline(x, zeros, zeros, zeros[:, 1:], inverse=inverse)
    tol = 10 * np.finfo(dtype).eps
    assert outputs.dtype == log_det.dtype == dtype
    np.testing.assert_allclose(outputs, x, rtol=0, atol=BOUND * tol)
    np.testing.assert_allclose(log_det, 0.0, rtol=0, atol=tol)


@quick
@given(inputs_strategy, params_strategy)
def test_inverse_round_trip(x, params):
    y, log_det = spline(x, *params)
    x_back, log_det_back = spline(y, *params, inverse=True)
    np.testing.assert_allclose(x_back, x, rtol=0, atol=1e-9)
    np.testing.assert_allclose(log_det + log_det_back, 0.0, rtol=0, atol=1e-10)
    # The same draw read as outputs checks the other composition.
    x_from_y, _ = spline(x, *params, inverse=True)
    y_back, _ = spline(x_from_y, *params)
    np.testing.assert_allclose(y_back, x, rtol=0, atol=1e-10)


def _scalar_map(x, width_logits, height_logits, derivative_params, inverse):
    outputs, _ = rational_quadratic_spline(
        x[None],
        width_logits[None],
        height_logits[None],
        derivative_params[None],
        bound=BOUND,
        inverse=inverse,
    )
    return outputs[0]


@functools.partial(jax.jit, static_argnames="inverse")
def _autodiff_log_det(x, width_logits, height_logits, derivative_params, inverse):
    derivative = jax.vmap(jax.grad(_scalar_map), in_axes=(0, 0, 0, 0, None))(
        x, width_logits, height_logits, derivative_params, inverse
    )
    return jnp.log(derivative)


@quick
@given(inputs_strategy, params_strategy, st.booleans())
def test_log_det_matches_autodiff(x, params, inverse):
    _, log_det = spline(x, *params, inverse=inverse)
    expected = _autodiff_log_det(x, *params, inverse)
    np.testing.assert_allclose(log_det, expected, rtol=1e-9, atol=1e-9)


@quick
@given(params_strategy, st.booleans())
def test_strictly_increasing(params, inverse):
    # One spline (the first row) on a dense grid that extends past the edges.
    grid = np.linspace(-1.2 * BOUND, 1.2 * BOUND, M)
    rows = [np.broadcast_to(p[:1], (M, p.shape[1])) for p in params]
    outputs, _ = spline(grid, *rows, inverse=inverse)
    assert np.all(np.diff(outputs) > 0)


@functools.partial(jax.jit, static_argnames="inverse")
def _gradients_at_knots_and_outside(params, inverse):
    # Each row is evaluated at every knot of its own spline, at the edges just
    # outside, and far outside; the knots are where the bin index jumps.
    knots = _knots(params[1 if inverse else 0], 1e-3, BOUND)
    outside = jnp.array([-10.0, -BOUND - 1e-9, BOUND + 1e-9, 10.0])
    points = jnp.concatenate([knots, jnp.broadcast_to(outside, (N, 4))], axis=1)

    def loss(x, params):
        outputs, log_det = rational_quadratic_spline(
            x, *params, bound=BOUND, inverse=inverse
        )
        return jnp.sum(outputs) + jnp.sum(log_det)

    return jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(1, None))(points, params)


@pytest.mark.parametrize("inverse", [False, True])
def test_gradients_finite_outside_and_at_knots(inverse):
    grads = _gradients_at_knots_and_outside(_random_params(0), inverse)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_time_jvp_and_reverse_over_forward():
    # As in the forward process: parameters scaled by t (1 - t), derivatives in t.
    params = _random_params(1)
    x = jnp.asarray(np.linspace(-1.5 * BOUND, 1.5 * BOUND, N))

    def at_time(t, params):
        scaled = [t * (1 - t) * p for p in params]
        return rational_quadratic_spline(x, *scaled, bound=BOUND)

    def time_derivative(t, params):
        return jax.jvp(lambda s: at_time(s, params), (t,), (jnp.ones_like(t),))[1]

    @jax.jit
    def check(t, params):
        def loss(params):
            return jnp.sum(time_derivative(t, params)[0] ** 2)

        return at_time(t, params), time_derivative(t, params), jax.grad(loss)(params)

    for t in (0.0, 0.3, 1.0):
        (outputs, log_det), tangents, grads = check(np.float64(t), params)
        assert all(np.all(np.isfinite(a)) for a in (*tangents, *grads))
        if t in (0.0, 1.0):
            np.testing.assert_allclose(outputs, x, rtol=0, atol=1e-12)
            np.testing.assert_allclose(log_det, 0.0, rtol=0, atol=1e-12)


def test_vmap_agrees_with_single_calls():
    batch = [_random_params(seed) for seed in (2, 3, 4)]
    x = 4 * np.random.default_rng(5).standard_normal((3, N))
    stacked = [np.stack(p) for p in zip(*batch, strict=True)]
    mapped = jax.vmap(spline)(x, *stacked)
    for i in range(3):
        single = spline(x[i], *batch[i])
        for got, want in zip((mapped[0][i], mapped[1][i]), single, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_float32():
    params = _random_params(6, scale=1.0, dtype=np.float32, rows=M)
    x = np.linspace(-1.5 * BOUND, 1.5 * BOUND, M, dtype=np.float32)
    y, log_det = spline(x, *params)
    x_back, log_det_back = spline(y, *params, inverse=True)
    y_back, _ = spline(x_back, *params)
    assert y.dtype == log_det.dtype == x_back.dtype == log_det_back.dtype == np.float32
    # The forward map is well conditioned, so float32 must match float64 closely.
    params64 = [p.astype(np.float64) for p in params]
    y64, log_det64 = spline(x.astype(np.float64), *params64)
    np.testing.assert_allclose(np.asarray(y, np.float64), y64, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(log_det, np.float64), log_det64, atol=1e-4)
    # Where the spline is nearly flat, the rounding of y moves the inverse a long way
    # in x; that is conditioning, so the inverse is checked in y (backward error).
    np.testing.assert_allclose(y_back, y, rtol=0, atol=2e-5)
    # float64 parameters are cast to the dtype of the inputs, not promoted.
    y_from_params64, _ = spline(x, *params64)
    assert y_from_params64.dtype == np.float32


_x = np.zeros(N)
_w = np.zeros((N, K))
_d = np.zeros((N, K - 1))


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((_x[None], _w, _w, _d), {}, "one-dimensional"),
        ((_x.astype(np.int32), _w, _w, _d), {}, "floating"),
        ((_x, _w[1:], _w, _d), {}, "width_logits"),
        ((_x, _w, _w[:, 1:], _d), {}, "height_logits"),
        ((_x, _w, _w, _w), {}, "derivative_params"),
        ((_x, _w, _w, _d), {"bound": 0.0}, "bound"),
        ((_x, _w, _w, _d), {"bound": -1.0}, "bound"),
        ((_x, _w, _w, _d), {"min_bin_width": 0.2}, "min_bin_width"),
        ((_x, _w, _w, _d), {"min_bin_height": 0.5}, "min_bin_height"),
        ((_x, _w, _w, _d), {"min_derivative": 1.0}, "min_derivative"),
        ((_x, _w, _w, _d), {"min_derivative": 0.0}, "min_derivative"),
    ],
)
def test_invalid_arguments_raise(args, kwargs, match, monkeypatch):
    # Under the jaxtyping pytest hook, some of these shapes would be rejected by the
    # annotations first; the ValueErrors are what users without that hook see.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    with pytest.raises(ValueError, match=match):
        rational_quadratic_spline(*args, **{"bound": BOUND, **kwargs})
