import itertools

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, strategies as st

from nfdm_sciml._couplings import (
    AbstractCoupling,
    ExactOTCoupling,
    IndependentCoupling,
    SinkhornCoupling,
    UnbalancedCoupling,
)


# Each new shape, dtype or option compiles the solvers again, so the tests share a few
# batch sizes: N samples of `x0`, and N (exact) or M samples of `x1`.
N, M = 6, 4
COUPLINGS = [
    IndependentCoupling(),
    ExactOTCoupling(),
    SinkhornCoupling(),
    UnbalancedCoupling(),
]


def ids(coupling) -> str:
    return type(coupling).__name__


@pytest.fixture
def normal():
    """Standard normal arrays drawn with NumPy (`jax.random` would compile anew for
    every shape and dtype)."""
    rng = np.random.default_rng(0)
    return lambda shape, dtype=jnp.float64: jnp.asarray(rng.normal(size=shape), dtype)


def _batches(normal, coupling, dtype=jnp.float64, example_shape=(2,)):
    m = N if isinstance(coupling, ExactOTCoupling) else M
    x0 = normal((N, *example_shape), dtype)
    x1 = normal((m, *example_shape), dtype) + 2.0
    return x0, x1


def _rows_of(rows, source) -> bool:
    """Whether every row of `rows` is (exactly) a row of `source`."""
    rows, source = np.asarray(rows), np.asarray(source)
    axes = tuple(range(2, rows.ndim + 1))
    return bool(np.all(np.any(np.all(rows[:, None] == source[None], axis=axes), 1)))


def _sorted_rows(x):
    flat = np.asarray(x).reshape(len(x), -1)
    return flat[np.lexsort(flat.T[::-1])]


def _total_cost(x0, x1) -> float:
    diff = np.asarray(x0).reshape(len(x0), -1) - np.asarray(x1).reshape(len(x1), -1)
    return float(np.sum(diff**2))


def test_independent_plan_is_uniform(normal):
    x0, x1 = _batches(normal, IndependentCoupling())
    plan = IndependentCoupling().plan(x0, x1)
    assert plan.shape == (N, M) and plan.dtype == jnp.float64
    np.testing.assert_array_equal(plan, np.full((N, M), 1 / (N * M)))


def test_sinkhorn_marginals_are_uniform(normal):
    x0, x1 = _batches(normal, SinkhornCoupling())
    threshold = SinkhornCoupling().threshold
    plan = SinkhornCoupling().plan(x0, x1)
    assert plan.shape == (N, M) and bool(jnp.all(plan >= 0))
    np.testing.assert_allclose(jnp.sum(plan), 1.0, rtol=1e-12)
    assert float(jnp.sum(jnp.abs(jnp.sum(plan, 1) - 1 / N))) <= threshold
    assert float(jnp.sum(jnp.abs(jnp.sum(plan, 0) - 1 / M))) <= threshold


def test_unbalanced_gives_outlier_less_mass(normal):
    x0 = normal((N, 2)).at[0].set(jnp.array([30.0, 30.0]))
    x1 = normal((M, 2))
    balanced = SinkhornCoupling().plan(x0, x1)
    unbalanced = UnbalancedCoupling(tau_a=0.5, tau_b=0.5).plan(x0, x1)
    np.testing.assert_allclose(jnp.sum(unbalanced), 1.0, rtol=1e-12)
    outlier_balanced = float(jnp.sum(balanced[0]))
    outlier_unbalanced = float(jnp.sum(unbalanced[0]))
    np.testing.assert_allclose(outlier_balanced, 1 / N, atol=1e-3)
    assert outlier_unbalanced < 0.5 * outlier_balanced
    # The mass the outlier loses goes to the other points, so the marginal of `x0` is
    # no longer uniform.
    assert float(jnp.max(jnp.sum(unbalanced, 1))) > 1 / N + 1e-3


@given(
    shape=st.sampled_from([(1, 2), (3, 1), (N, 2)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_exact_ot_minimises_total_cost(shape, seed):
    rng = np.random.default_rng(seed)
    n, dim = shape
    x0_np = rng.normal(size=shape)
    x1_np = rng.normal(size=shape) + rng.normal(size=(dim,))
    x0, x1 = jnp.asarray(x0_np), jnp.asarray(x1_np)
    x0_paired, x1_paired = ExactOTCoupling()(x0, x1)
    permutations = itertools.permutations(range(n))
    best = min(_total_cost(x0_np, x1_np[list(p)]) for p in permutations)
    assert _total_cost(x0_paired, x1_paired) <= best + 1e-9
    plan = np.asarray(ExactOTCoupling().plan(x0, x1))
    costs = np.sum((x0_np[:, None] - x1_np[None]) ** 2, -1)
    np.testing.assert_allclose(n * np.sum(plan * costs), best, rtol=1e-9, atol=1e-12)


def test_exact_ot_is_a_permutation(normal, getkey):
    x0, x1 = _batches(normal, ExactOTCoupling())
    x0_paired, x1_paired = ExactOTCoupling()(x0, x1, key=getkey())
    np.testing.assert_array_equal(x0_paired, x0)
    np.testing.assert_array_equal(_sorted_rows(x1_paired), _sorted_rows(x1))
    plan = ExactOTCoupling().plan(x0, x1)
    np.testing.assert_array_equal(jnp.sum(plan, 0), np.full(N, 1 / N))
    np.testing.assert_array_equal(jnp.sum(plan, 1), np.full(N, 1 / N))
    assert int(jnp.sum(plan > 0)) == N


@pytest.mark.parametrize("coupling", COUPLINGS, ids=ids)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_call_shapes_dtypes_and_rows(normal, getkey, coupling, dtype):
    x0, x1 = _batches(normal, coupling, dtype)
    x0_paired, x1_paired = coupling(x0, x1, key=getkey())
    assert x0_paired.shape == x1_paired.shape == (N, 2)
    assert x0_paired.dtype == x1_paired.dtype == dtype
    assert _rows_of(x0_paired, x0) and _rows_of(x1_paired, x1)
    plan = coupling.plan(x0, x1)
    assert plan.shape == (N, x1.shape[0]) and plan.dtype == dtype
    np.testing.assert_allclose(jnp.sum(plan), 1.0, rtol=1e-5)


@pytest.mark.parametrize("coupling", COUPLINGS, ids=ids)
def test_image_shaped_examples(normal, getkey, coupling):
    x0, x1 = _batches(normal, coupling, example_shape=(3, 4))
    x0_paired, x1_paired = coupling(x0, x1, key=getkey())
    assert x0_paired.shape == x1_paired.shape == (N, 3, 4)
    assert _rows_of(x0_paired, x0) and _rows_of(x1_paired, x1)
    # The cost is that of the flattened examples.
    flat0, flat1 = x0.reshape(N, 12), x1.reshape(len(x1), 12)
    np.testing.assert_allclose(coupling.plan(x0, x1), coupling.plan(flat0, flat1))


def test_mixed_dtypes_keep_each_side(normal, getkey):
    # The unbalanced coupling takes the same path as the Sinkhorn one.
    for coupling in COUPLINGS[:3]:
        x0, x1 = _batches(normal, coupling)
        x0 = x0.astype(jnp.float32)
        x0_paired, x1_paired = coupling(x0, x1, key=getkey())
        assert x0_paired.dtype == jnp.float32 and x1_paired.dtype == jnp.float64
        assert coupling.plan(x0, x1).dtype == jnp.float64


def test_sinkhorn_pairs_matching_clusters(normal, getkey):
    # Two clusters on each side, far apart: every pair joins the left clusters or the
    # right ones, never one of each.
    left_right = jnp.array([[-10.0, 0.0], [10.0, 0.0]])
    x0 = jnp.repeat(left_right, N // 2, axis=0) + 0.1 * normal((N, 2))
    x1 = jnp.repeat(left_right[::-1], M // 2, axis=0) + 0.1 * normal((M, 2)) + 3.0
    x0_paired, x1_paired = SinkhornCoupling()(x0, x1, key=getkey())
    assert bool(jnp.all(jnp.sign(x0_paired[:, 0]) == jnp.sign(x1_paired[:, 0] - 3.0)))
    plan = SinkhornCoupling().plan(x0, x1)
    across = jnp.sign(x0[:, :1]) != jnp.sign(x1[:, 0] - 3.0)[None]
    assert float(jnp.sum(jnp.where(across, plan, 0.0))) < 1e-12


def test_independent_keeps_order(normal, getkey):
    x0, x1 = _batches(normal, ExactOTCoupling())
    x0_paired, x1_paired = IndependentCoupling()(x0, x1, key=getkey())
    assert x0_paired is x0 and x1_paired is x1
    # Fewer sources than targets: a draw without replacement.
    x1 = normal((2 * N, 2))
    x0_paired, x1_paired = IndependentCoupling()(x0, x1, key=getkey())
    np.testing.assert_array_equal(x0_paired, x0)
    assert _rows_of(x1_paired, x1)
    assert len(np.unique(np.asarray(x1_paired), axis=0)) == N


def test_identical_points():
    # Every cost is zero, so the relative epsilon has no scale: the plan is uniform.
    x0, x1 = jnp.ones((N, 2)), jnp.ones((M, 2))
    for coupling in COUPLINGS[2:]:
        np.testing.assert_allclose(coupling.plan(x0, x1), np.full((N, M), 1 / (N * M)))
    single = SinkhornCoupling().plan(x0[:1], x1[:1])
    np.testing.assert_allclose(single, np.ones((1, 1)), rtol=1e-12)


@pytest.mark.parametrize("coupling", COUPLINGS, ids=ids)
def test_jit_and_scan(normal, getkey, coupling):
    x0, x1 = _batches(normal, coupling)
    keys = jr.split(getkey(), 3)

    @jax.jit
    def pairs_per_step(x0, x1, keys):
        def step(total, key):
            a, b = coupling(x0, x1, key=key)
            return total + jnp.sum((a - b) ** 2), (a, b)

        return jax.lax.scan(step, jnp.zeros(()), keys)

    total, (a, b) = pairs_per_step(x0, x1, keys)
    assert a.shape == b.shape == (3, N, 2) and bool(jnp.isfinite(total))
    eager = coupling(x0, x1, key=keys[0])
    np.testing.assert_allclose(a[0], eager[0], rtol=1e-12)
    np.testing.assert_allclose(b[0], eager[1], rtol=1e-12)


def test_gradients_flow_to_rows_not_to_the_choice(normal):
    x0, x1 = _batches(normal, ExactOTCoupling())

    def loss(x1):
        a, b = ExactOTCoupling()(x0, x1)
        return jnp.sum((a - b) ** 2)

    # A permutation of `x1` enters the loss, so the gradient is that of the matched
    # squared distances, with no term from the assignment itself.
    _, paired = ExactOTCoupling()(x0, x1)
    grad = jax.grad(loss)(x1)
    np.testing.assert_allclose(_sorted_rows(grad), _sorted_rows(2 * (paired - x0)))


def test_bad_input(no_typecheck, normal, getkey):
    x = normal((N, 2))
    for coupling in COUPLINGS:
        with pytest.raises(ValueError, match="examples of the same shape"):
            coupling.plan(x, jnp.zeros((N, 3)))
        with pytest.raises(TypeError, match="floating-point"):
            coupling(x, jnp.zeros((N, 2), jnp.int32), key=getkey())
        with pytest.raises(ValueError, match="NaN or infinite values"):
            coupling(x.at[1, 0].set(jnp.nan), x, key=getkey())
        with pytest.raises(ValueError, match="NaN or infinite values"):
            coupling.plan(x, x.at[0, 1].set(jnp.inf))
        with pytest.raises(ValueError, match="empty batch"):
            coupling.plan(jnp.zeros((0, 2)), x)
        with pytest.raises(ValueError, match="leading sample axis"):
            coupling.plan(jnp.zeros(()), x)
    with pytest.raises(ValueError, match="use `SinkhornCoupling` for unequal sizes"):
        ExactOTCoupling()(x, x[:M])
    with pytest.raises(ValueError, match="use `SinkhornCoupling` for unequal sizes"):
        jax.jit(ExactOTCoupling().plan)(x, x[:M])


def test_traced_values_are_not_checked(normal):
    # Inside `jax.jit` a NaN is not looked for (that would cost a device check in every
    # training step); it must not hang or crash the solver either.
    x0, x1 = _batches(normal, ExactOTCoupling())
    jax.jit(ExactOTCoupling().plan)(x0.at[0, 0].set(jnp.nan), x1)


def test_bad_constructor_arguments(no_typecheck):
    with pytest.raises(ValueError, match="epsilon > 0"):
        SinkhornCoupling(epsilon=0.0)
    with pytest.raises(ValueError, match="epsilon > 0"):
        UnbalancedCoupling(epsilon=-1.0)
    with pytest.raises(ValueError, match="max_iterations >= 1"):
        SinkhornCoupling(max_iterations=0)
    with pytest.raises(TypeError, match="integer max_iterations"):
        SinkhornCoupling(max_iterations=10.0)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="threshold >= 0"):
        UnbalancedCoupling(threshold=-1e-3)
    with pytest.raises(ValueError, match="0 < tau_a <= 1"):
        UnbalancedCoupling(tau_a=0.0)
    with pytest.raises(ValueError, match="0 < tau_b <= 1"):
        UnbalancedCoupling(tau_b=1.5)


def test_all_couplings_subclass_the_interface():
    assert all(isinstance(c, AbstractCoupling) for c in COUPLINGS)


@pytest.mark.parametrize("coupling", COUPLINGS, ids=ids)
def test_match_keeps_sources_and_returns_target_rows(normal, getkey, coupling):
    x0, x1 = _batches(normal, coupling, example_shape=(3, 2))
    partners = coupling.match(x0, x1, key=getkey())
    assert partners.shape == x0.shape and partners.dtype == x1.dtype
    assert _rows_of(partners, x1)
    jitted = jax.jit(lambda a, b, k: coupling.match(a, b, key=k))
    key = getkey()
    np.testing.assert_array_equal(jitted(x0, x1, key), coupling.match(x0, x1, key=key))


def test_exact_match_is_the_optimal_assignment(normal):
    x0, x1 = _batches(normal, ExactOTCoupling())
    partners = ExactOTCoupling().match(x0, x1)
    np.testing.assert_array_equal(_sorted_rows(partners), _sorted_rows(x1))
    plan = np.asarray(ExactOTCoupling().plan(x0, x1))
    np.testing.assert_array_equal(partners, x1[np.argmax(plan, axis=1)])


@pytest.mark.parametrize("coupling", COUPLINGS[2:], ids=ids)
def test_entropic_match_draws_from_the_plan_rows(normal, getkey, coupling):
    # A large epsilon spreads every row over several partners: the frequency of each
    # partner over many draws is the row's conditional, within sampling error.
    coupling = type(coupling)(epsilon=0.5)
    x0, x1 = _batches(normal, coupling)
    draws = 4000
    keys = jr.split(getkey(), draws)
    partners = jax.vmap(lambda k: coupling.match(x0, x1, key=k))(keys)
    # Which row of `x1` each draw picked.
    index = np.argmax(
        np.all(np.asarray(partners)[:, :, None] == np.asarray(x1)[None, None], -1), -1
    )
    frequencies = np.stack([np.bincount(row, minlength=M) for row in index.T]) / draws
    plan = np.asarray(coupling.plan(x0, x1))
    conditional = plan / plan.sum(1, keepdims=True)
    assert conditional.max() < 0.95  # the rows really are spread
    # Binomial standard error at 4000 draws is below 0.008.
    np.testing.assert_allclose(frequencies, conditional, atol=0.035)


def test_chained_matches_follow_clusters(normal, getkey):
    # Three snapshots with two far-apart clusters each: chaining `match` keeps every
    # path in its cluster.
    centres = jnp.array([[-10.0, 0.0], [10.0, 0.0]])
    snapshots = [
        jnp.repeat(centres, N // 2, 0) + 0.1 * normal((N, 2)) for _ in range(3)
    ]
    for coupling in (ExactOTCoupling(), SinkhornCoupling()):
        path = [snapshots[0]]
        for nxt in snapshots[1:]:
            path.append(coupling.match(path[-1], nxt, key=getkey()))
        signs = jnp.sign(jnp.stack(path)[..., 0])
        assert bool(jnp.all(signs == signs[:1]))


def test_match_bad_input(no_typecheck, normal, getkey):
    x = normal((N, 2))
    for coupling in COUPLINGS:
        with pytest.raises(ValueError, match="examples of the same shape"):
            coupling.match(x, jnp.zeros((N, 3)), key=getkey())
        with pytest.raises(ValueError, match="NaN or infinite values"):
            coupling.match(x, x.at[0, 1].set(jnp.nan), key=getkey())
    with pytest.raises(ValueError, match="use `SinkhornCoupling` for unequal sizes"):
        ExactOTCoupling().match(x, x[:M])
