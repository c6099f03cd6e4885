import itertools

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given

import nfdm_sciml as nf

from .helpers import make_model


def _point_mass_model(x_star):
    # Data is the single point x*, and the predictor knows it: the generative ODE
    # drift is then the FM-OT conditional velocity -x* + (1 - delta) eps, which is
    # constant along each forward path.
    return nf.NFDM(
        nf.LinearInterpolant(),
        nf.FunctionPredictor(lambda z, t, c: x_star),
        nf.ConstantVolatility(1.0),
        data_shape=x_star.shape,
    )


def _random_point(model, key, t=0.37):
    xkey, ekey = jr.split(key)
    x = jr.normal(xkey, model.data_shape, jnp.float64)
    eps = jr.normal(ekey, model.data_shape, jnp.float64)
    return x, jnp.asarray(t), eps


def test_straight_constant_speed_paths_have_zero_curvature(getkey):
    x_star = jnp.array([1.5, -0.5])
    model = _point_mass_model(x_star)
    for t in (0.1, 0.5, 0.9):
        _, t, eps = _random_point(model, getkey(), t)
        point = model.path_point(x_star, t, eps)
        assert float(nf.GenerativeCurvature()(point)) < 1e-20
        assert float(nf.ConditionalCurvature()(point)) < 1e-20
        velocity = -x_star + (1 - 0.01) * eps
        np.testing.assert_allclose(
            nf.KineticEnergy()(point), jnp.sum(velocity**2), rtol=1e-12
        )
        np.testing.assert_allclose(
            nf.KineticEnergy(generative=True)(point), jnp.sum(velocity**2), rtol=1e-12
        )


@pytest.mark.parametrize("process", ["nfdm_gaussian", "flow_affine"])
def test_curvatures_match_finite_differences(process, getkey):
    model = make_model(process, key=getkey())
    x, t, eps = _random_point(model, getkey())
    point = model.path_point(x, t, eps)
    h = 1e-4

    def drift_along(s):
        s = jnp.asarray(s)
        return model.ode_drift(model.forward(eps, s, x), s)

    acceleration = (drift_along(t + h) - drift_along(t - h)) / (2 * h)
    np.testing.assert_allclose(
        nf.GenerativeCurvature()(point), jnp.sum(acceleration**2), rtol=1e-6
    )
    path = lambda s: model.forward(eps, jnp.asarray(s), x)  # noqa: E731
    second = (path(t + h) - 2 * path(t) + path(t - h)) / h**2
    np.testing.assert_allclose(
        nf.ConditionalCurvature()(point), jnp.sum(second**2), rtol=1e-5
    )
    velocity = (path(t + h) - path(t - h)) / (2 * h)
    np.testing.assert_allclose(
        nf.KineticEnergy()(point), jnp.sum(velocity**2), rtol=1e-7
    )
    # A learned forward process is not straight: both curvatures are positive.
    assert float(nf.GenerativeCurvature()(point)) > 0
    assert float(nf.ConditionalCurvature()(point)) > 0


def _box_distance(z, low, high):
    # Brute force: outside, the distance to the nearest point of the box; inside,
    # minus the distance to the nearest face.
    nearest = np.clip(z, low, high)
    if np.any(nearest != z):
        return np.linalg.norm(z - nearest)
    return -np.min(np.minimum(z - low, high - z))


@given(
    dim=st.sampled_from([2, 3]),
    seed=st.integers(0, 2**16),
)
def test_shapes_signed_distance(dim, seed):
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=dim)
    radius = float(rng.uniform(0.2, 2))
    low = rng.normal(size=dim)
    high = low + rng.uniform(0.1, 2, size=dim)
    points = rng.normal(scale=2, size=(20, dim))
    disk, box = nf.Disk(centre, radius), nf.Box(low, high)
    for z in points:
        zz = jnp.asarray(z)
        expected = np.linalg.norm(z - centre) - radius
        np.testing.assert_allclose(disk.signed_distance(zz), expected, rtol=1e-10)
        np.testing.assert_allclose(
            box.signed_distance(zz), _box_distance(z, low, high), atol=1e-12
        )
    np.testing.assert_array_equal(
        disk.contains(jnp.asarray(points)),
        np.linalg.norm(points - centre, axis=1) < radius,
    )
    union = nf.Union(disk, box)
    np.testing.assert_array_equal(
        union.contains(jnp.asarray(points)),
        np.asarray(disk.contains(jnp.asarray(points)))
        | np.asarray(box.contains(jnp.asarray(points))),
    )


def _at(z):
    z = jnp.asarray(z, jnp.float64)
    return nf.PathPoint(
        jnp.asarray(0.5), z, jnp.zeros_like(z), None, lambda s: z, lambda y, s, **kw: y
    )


@given(
    seed=st.integers(0, 2**16),
    margin=st.sampled_from([0.0, 0.2]),
    power=st.sampled_from([1.0, 2.0]),
)
def test_obstacle_and_region_costs(seed, margin, power):
    rng = np.random.default_rng(seed)
    centre, radius = rng.normal(size=2), float(rng.uniform(0.3, 1.5))
    disk = nf.Disk(centre, radius)
    obstacle = nf.Obstacle(disk, margin=margin, power=power)
    inside = nf.StayInside(disk, margin=margin, power=power)
    for z in rng.normal(scale=2, size=(20, 2)):
        d = np.linalg.norm(z - centre) - radius
        cost = obstacle(_at(z))
        # Points farther out than the margin cost nothing; inside, the cost is the
        # depth (plus the margin) to the power.
        np.testing.assert_allclose(cost, max(margin - d, 0) ** power, atol=1e-12)
        np.testing.assert_allclose(
            inside(_at(z)), max(d + margin, 0) ** power, atol=1e-12
        )
        if d > margin:
            assert float(cost) == 0.0
        grad = jax.grad(lambda y: obstacle(_at(y)))(jnp.asarray(z))
        if d < margin - 1e-3:
            # The push points away from the centre, with the finite-difference size.
            h = 1e-6
            fd = [
                (obstacle(_at(z + h * e)) - obstacle(_at(z - h * e))) / (2 * h)
                for e in np.eye(2)
            ]
            np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)
            assert float(jnp.dot(grad, jnp.asarray(z - centre))) < 0


def test_user_signed_distance_and_function_penalty():
    # A capsule (a thick segment) written by hand as a signed-distance function.
    a, b, r = jnp.array([-1.0, 0.0]), jnp.array([1.0, 0.0]), 0.25

    def capsule(z):
        s = jnp.clip(jnp.dot(z - a, b - a) / jnp.dot(b - a, b - a), 0, 1)
        return jnp.linalg.norm(z - (a + s * (b - a))) - r

    shape = nf.SignedDistance(capsule)
    assert bool(shape.contains(jnp.array([0.5, 0.1])))
    assert not bool(shape.contains(jnp.array([0.5, 0.3])))
    np.testing.assert_allclose(nf.Obstacle(shape)(_at([0.0, 0.05])), 0.2, rtol=1e-12)
    late_speed = nf.FunctionPenalty(lambda z, v, t, c: t * jnp.sum(v**2))
    point = nf.PathPoint(
        jnp.asarray(0.25),
        jnp.zeros(2),
        jnp.array([1.0, 2.0]),
        None,
        lambda s: jnp.zeros(2),
        lambda y, s: y,
    )
    np.testing.assert_allclose(late_speed(point), 0.25 * 5, rtol=1e-12)


def test_batch_loss_adds_weighted_penalties(getkey):
    model = make_model(key=getkey())
    xs = jr.normal(getkey(), (16, 2), jnp.float64)
    key = getkey()
    penalties = nf.Penalties(
        curvature=(0.3, nf.GenerativeCurvature()),
        obstacle=(2.0, nf.Obstacle(nf.Disk([0.0, 0.0], 1.0))),
        speed=lambda z, v, t, c: jnp.sum(v**2),
    )
    plain, terms0 = model.batch_loss(xs, key=key)
    loss, terms = model.batch_loss(xs, key=key, penalties=penalties)
    assert set(terms.penalties) == {"curvature", "obstacle", "speed"}
    np.testing.assert_allclose(terms.nelbo, terms0.nelbo, rtol=1e-12)
    expected = (
        plain
        + 0.3 * terms.penalties["curvature"]
        + 2.0 * terms.penalties["obstacle"]
        + terms.penalties["speed"]
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-12)

    # The penalties are the batch means of the per-example values at the same z_t
    # as the diffusion term.
    tkey, ekey = jr.split(key)
    ts = jr.uniform(tkey, (16,), jnp.float64)
    eps = jr.normal(ekey, xs.shape, jnp.float64)
    by_hand = np.mean(
        [
            penalties(model.path_point(x, t, e))["curvature"]
            for x, t, e in zip(xs, ts, eps, strict=True)
        ]
    )
    np.testing.assert_allclose(terms.penalties["curvature"], by_hand, rtol=1e-10)


@pytest.mark.parametrize(
    "penalty",
    [
        nf.GenerativeCurvature(),
        nf.ConditionalCurvature(),
        nf.KineticEnergy(),
        nf.Obstacle(nf.Disk([0.0, 0.0], 3.0)),
    ],
    ids=["generative_curvature", "conditional_curvature", "kinetic", "obstacle"],
)
def test_penalty_gradients_reach_the_forward_process(penalty, getkey):
    model = make_model(key=getkey())
    xs = jr.normal(getkey(), (8, 2), jnp.float64)
    key = getkey()

    def penalty_only(m):
        _, terms = m.batch_loss(xs, key=key, penalties=nf.Penalties(p=penalty))
        return terms.penalties["p"]

    grads = eqx.filter_grad(penalty_only)(model)
    forward_grads = jax.tree.leaves(eqx.filter(grads.forward, eqx.is_inexact_array))
    assert sum(float(jnp.sum(g**2)) for g in forward_grads) > 0


def test_training_with_a_penalty_lowers_it(getkey):
    # A few steps of Adam on the curvature alone (weight large) must reduce it.
    model = make_model(key=getkey())
    penalties = nf.Penalties(curvature=(100.0, nf.GenerativeCurvature()))
    config = nf.TrainConfig(
        steps=60, batch_size=64, learning_rate=3e-3, steps_per_call=30, ema_decay=None
    )
    trainer = nf.Trainer(config, penalties=penalties)
    sample = lambda k: jr.normal(k, (64, 2), jnp.float64)  # noqa: E731
    _, records = trainer.fit(trainer.init(model), sample)
    first, last = records[0]["penalty/curvature"], records[-1]["penalty/curvature"]
    assert last < first


def test_path_straightness_closed_forms():
    ts = jnp.linspace(0.0, 1.0, 2001)
    line = ts[:, None] * jnp.array([[2.0, -1.0]])
    # A straight line at constant speed: 0.
    assert abs(float(nf.path_straightness(line[None], ts))) < 1e-10
    # The same line at speed 2t: energy 4/3 over a chord of 1, so 1/3.
    accelerating = (ts**2)[:, None] * jnp.array([[1.0, 0.0]])
    np.testing.assert_allclose(
        nf.path_straightness(accelerating[None], ts), 1 / 3, rtol=1e-5
    )
    # A half circle at constant speed: (pi r)^2 / (2r)^2 - 1 = pi^2/4 - 1.
    angle = jnp.pi * ts
    half_circle = jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1)
    np.testing.assert_allclose(
        nf.path_straightness(half_circle[None], ts[::-1]), np.pi**2 / 4 - 1, rtol=1e-5
    )


def test_violation_fraction():
    disk = nf.Disk([0.0, 0.0], 1.0)
    trajectories = jnp.array([[[0.0, 0.0], [2.0, 0.0]], [[0.5, 0.5], [3.0, 3.0]]])
    np.testing.assert_allclose(nf.violation_fraction(trajectories, disk), 0.5)


def test_wasserstein_against_brute_force(getkey):
    x = jr.normal(getkey(), (6, 2), jnp.float64)
    y = jr.normal(getkey(), (6, 2), jnp.float64) + 1.0
    cost = np.sum((np.asarray(x)[:, None] - np.asarray(y)[None]) ** 2, -1)
    best = min(
        np.mean(cost[np.arange(6), list(p)]) for p in itertools.permutations(range(6))
    )
    np.testing.assert_allclose(nf.wasserstein(x, y), np.sqrt(best), rtol=1e-6)
    dist = np.sqrt(cost)
    best1 = min(
        np.mean(dist[np.arange(6), list(p)]) for p in itertools.permutations(range(6))
    )
    np.testing.assert_allclose(nf.wasserstein(x, y, p=1), best1, rtol=1e-6)
    # A translated copy is exactly the translation away.
    np.testing.assert_allclose(
        nf.wasserstein(x, x + jnp.array([[3.0, 4.0]])), 5.0, rtol=1e-6
    )


def test_bad_input(no_typecheck):
    with pytest.raises(ValueError, match="radius > 0"):
        nf.Disk([0.0, 0.0], -1.0)
    with pytest.raises(ValueError, match="low < high"):
        nf.Box([0.0, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="2 dimensions"):
        nf.Disk([0.0, 0.0], 1.0).signed_distance(jnp.zeros(3))
    with pytest.raises(ValueError, match="margin >= 0"):
        nf.Obstacle(nf.Disk([0.0, 0.0], 1.0), margin=-1.0)
    with pytest.raises(TypeError, match="AbstractShape"):
        nf.Obstacle(lambda z: z)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match=">= 0"):
        nf.Penalties(a=(-1.0, nf.KineticEnergy()))
    with pytest.raises(TypeError, match="must be a number"):
        nf.Penalties(a=("big", nf.KineticEnergy()))  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="AbstractPenalty or a function"):
        nf.Penalties(a=3)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="must return a scalar"):
        nf.FunctionPenalty(lambda z, v, t, c: v)(_at([1.0, 2.0]))
    with pytest.raises(ValueError, match="shape \\(n, \\*dims\\)"):
        nf.wasserstein(jnp.zeros((3, 2)), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        nf.wasserstein(jnp.full((3, 2), jnp.nan), jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="strictly ordered"):
        nf.path_straightness(jnp.zeros((1, 2, 2)), jnp.zeros(2))
    model = _point_mass_model(jnp.zeros(2))
    with pytest.raises(TypeError, match="Penalties"):
        model.batch_loss(
            jnp.zeros((2, 2)),
            key=jr.key(0),
            penalties=nf.KineticEnergy(),  # pyright: ignore[reportArgumentType]
        )


@given(seed=st.integers(0, 2**16), dim=st.sampled_from([1, 3]))
def test_straightness_of_random_paths(seed, dim):
    rng = np.random.default_rng(seed)
    ts = jnp.asarray(np.sort(rng.uniform(0, 1, size=9)))
    start, end = rng.normal(size=(2, 4, dim))
    # Straight at constant speed (on any time grid): exactly zero.
    fraction = (ts - ts[0]) / (ts[-1] - ts[0])
    line = start[:, None] + fraction[None, :, None] * (end - start)[:, None]
    np.testing.assert_allclose(nf.path_straightness(line, ts), 0.0, atol=1e-9)
    # Any other path through the same end points costs more (Cauchy-Schwarz).
    wiggle = (
        line
        + rng.normal(size=line.shape)
        * np.asarray(fraction * (1 - fraction))[None, :, None]
    )
    assert float(nf.path_straightness(jnp.asarray(wiggle), ts)) > 0


def test_time_weighted_penalty():
    disk = nf.Disk([0.0, 0.0], 1.0)
    faded = nf.TimeWeighted(nf.Obstacle(disk), lambda t: (1 - t) ** 2)
    z = jnp.array([0.2, 0.0])
    for t, weight in ((0.0, 1.0), (0.5, 0.25), (1.0, 0.0)):
        point = nf.PathPoint(
            jnp.asarray(t), z, jnp.zeros(2), None, lambda s: z, lambda y, s, **kw: y
        )
        np.testing.assert_allclose(faded(point), weight * 0.8, atol=1e-12)
    with pytest.raises(TypeError, match="TimeWeighted"):
        nf.TimeWeighted(disk, lambda t: t)  # pyright: ignore[reportArgumentType]
    vector = nf.TimeWeighted(nf.Obstacle(disk), lambda t: jnp.ones(2))
    with pytest.raises(ValueError, match="must return a scalar"):
        vector(_at([0.0, 0.0]))
