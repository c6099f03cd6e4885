import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given

import nfdm_sciml as nf
from nfdm_sciml import testing

from .helpers import FORWARD_PROCESSES, make_model, randomise, VOLATILITIES


@pytest.mark.parametrize("process", sorted(FORWARD_PROCESSES))
def test_perfect_predictor_gives_zero_diffusion_loss(process):
    model = make_model(process, key=jr.key(0))
    x = jnp.array([0.7, -1.3])
    # x_hat = x exactly: the generative drift is the conditional drift.
    model = eqx.tree_at(
        lambda m: m.predictor, model, nf.FunctionPredictor(lambda z, t, c: x)
    )
    for t in (0.0, 0.01, 0.5, 0.99, 1.0):
        loss = model.diffusion_loss(x, jnp.array(t), jnp.array([0.3, 2.0]))
        assert float(loss) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("process", sorted(FORWARD_PROCESSES))
@pytest.mark.parametrize("volatility", sorted(VOLATILITIES))
@given(inputs=testing.example_inputs((2,), np.float64))
def test_diffusion_loss_nonnegative_and_finite(process, volatility, inputs):
    model = make_model(process, volatility, key=jr.key(1))
    eps, t, x = (jnp.asarray(u) for u in inputs)
    loss = _diffusion_loss(model, x, jnp.asarray(t), eps)
    assert np.isfinite(loss) and float(loss) >= 0


@eqx.filter_jit
def _diffusion_loss(model, x, t, eps):
    return model.diffusion_loss(x, t, eps)


def test_diffusion_loss_closed_form():
    # For the linear interpolant with constant g, compute the loss by hand.
    g, delta = 0.8, 0.01
    x, x_hat = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.0])
    model = nf.NFDM(
        nf.LinearInterpolant(delta),
        nf.FunctionPredictor(lambda z, t, c: x_hat),
        nf.ConstantVolatility(g),
        data_shape=(2,),
    )
    t, eps = 0.3, jnp.array([0.2, -0.4])
    sigma = t + (1 - t) * delta
    z = (1 - t) * x + sigma * eps

    def reverse_drift(data):
        velocity = -data + (1 - delta) * (z - (1 - t) * data) / sigma
        score = -(z - (1 - t) * data) / sigma**2
        return velocity - 0.5 * g**2 * score

    expected = 0.5 * jnp.sum((reverse_drift(x) - reverse_drift(x_hat)) ** 2) / g**2
    actual = model.diffusion_loss(x, jnp.array(t), eps)
    np.testing.assert_allclose(actual, expected, rtol=1e-12)
    # The generative drift is that same formula at x_hat.
    np.testing.assert_allclose(
        model.reverse_drift(z, jnp.array(t)), reverse_drift(x_hat), rtol=1e-12
    )


def test_reconstruction_and_prior_terms():
    model = make_model("nfdm_gaussian", key=jr.key(2))
    x, eps = jnp.array([0.1, 0.2]), jnp.array([1.0, -1.0])
    # z_0 = x + 0.01 eps, decoder scale 0.01: -log N(x; z_0, 0.01^2) in closed form.
    expected = 0.5 * 2 + 2 * (np.log(0.01) + 0.5 * np.log(2 * np.pi))
    np.testing.assert_allclose(model.reconstruction_loss(x, eps), expected, rtol=1e-9)
    assert float(model.prior_loss(x, eps)) == 0.0


def test_batch_loss_matches_per_example_mean():
    model = make_model("flow_affine", key=jr.key(3))
    xs = jr.normal(jr.key(4), (5, 2), jnp.float64)
    loss, terms = model.batch_loss(xs, key=jr.key(5))
    tkey, ekey = jr.split(jr.key(5))
    ts, eps = jr.uniform(tkey, (5,), jnp.float64), jr.normal(ekey, (5, 2), jnp.float64)
    per = [
        nf.LossTerms(
            model.diffusion_loss(x, t, e),
            model.prior_loss(x, e),
            model.reconstruction_loss(x, e),
        )
        for x, t, e in zip(xs, ts, eps, strict=True)
    ]
    np.testing.assert_allclose(loss, np.mean([p.nelbo for p in per]), rtol=1e-10)
    np.testing.assert_allclose(
        terms.diffusion, np.mean([p.diffusion for p in per]), rtol=1e-10
    )


def test_gradients_reach_every_component():
    model = make_model("nfdm_gaussian", key=jr.key(6))
    xs = jr.normal(jr.key(7), (8, 2), jnp.float64)
    grads = eqx.filter_grad(lambda m: m.batch_loss(xs, key=jr.key(8))[0])(model)
    for part in (grads.forward, grads.predictor, grads.volatility):
        norms = [jnp.linalg.norm(g) for g in jax.tree.leaves(part)]
        assert all(np.isfinite(norms)) and sum(norms) > 0


def test_drifts_are_finite_at_both_ends():
    model = make_model("flow_spline", key=jr.key(9))
    z = jnp.array([0.3, -0.2])
    for t in (0.0, 1.0):
        assert np.all(np.isfinite(model.reverse_drift(z, jnp.array(t))))
        assert np.all(np.isfinite(model.ode_drift(z, jnp.array(t))))


def test_bad_inputs(no_typecheck):
    model = make_model(key=jr.key(10))
    x, eps = jnp.zeros(2), jnp.zeros(2)
    with pytest.raises(ValueError, match=r"must have shape \(2,\)"):
        model.diffusion_loss(jnp.zeros(3), jnp.array(0.5), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        model.diffusion_loss(x, jnp.array(1.5), eps)
    with pytest.raises(ValueError, match="scalar time"):
        model.diffusion_loss(x, jnp.array([0.5]), eps)
    with pytest.raises(TypeError, match="floating-point"):
        model.batch_loss(jnp.zeros((4, 2), jnp.int32), key=jr.key(0))
    with pytest.raises(ValueError, match=r"shape \(batch, \*\(2,\)\)"):
        model.batch_loss(jnp.zeros((4, 3)), key=jr.key(0))
    with pytest.raises(ValueError, match="NaN"):
        model.batch_loss(jnp.array([[0.0, jnp.nan]]), key=jr.key(0))
    with pytest.raises(ValueError, match="empty"):
        model.batch_loss(jnp.zeros((0, 2)), key=jr.key(0))
    # Inside jit the same mistakes still fail loudly rather than giving NaNs.
    with pytest.raises(Exception, match="NaN"):
        eqx.filter_jit(lambda m, xs: m.batch_loss(xs, key=jr.key(0)))(
            model, jnp.array([[0.0, jnp.inf]])
        )
    with pytest.raises(Exception, match=r"in \[0, 1\]"):
        eqx.filter_jit(lambda m, t: m.diffusion_loss(x, t, eps))(model, jnp.array(-0.1))


def test_bad_construction(no_typecheck):
    process = nf.LinearInterpolant()
    predictor = nf.Predictor(2, key=jr.key(0))
    with pytest.raises(TypeError, match="`volatility` must be"):
        nf.NFDM(process, predictor, 1.0, data_shape=(2,))  # pyright: ignore
    with pytest.raises(ValueError, match="data_shape"):
        nf.NFDM(process, predictor, nf.ConstantVolatility(), data_shape=())


def test_randomise_helper_changes_every_parameter():
    model = make_model(key=jr.key(11))
    other = randomise(model, jr.key(12))
    for a, b in zip(
        jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)),
        jax.tree.leaves(eqx.filter(other, eqx.is_inexact_array)),
        strict=True,
    ):
        assert not np.allclose(a, b)


def test_diffusion_objective_has_the_nelbo_gradient_for_nfdm_gaussian():
    # The prior and reconstruction terms of NFDM-Gaussian do not depend on the
    # parameters, so training on L_diff alone (the authors' recipe) is the same.
    model = make_model("nfdm_gaussian", key=jr.key(13))
    xs = jr.normal(jr.key(14), (8, 2), jnp.float64)

    def grads(objective):
        return eqx.filter_grad(
            lambda m: m.batch_loss(xs, key=jr.key(15), objective=objective)[0]
        )(model)

    nelbo, diffusion = grads("nelbo"), grads("diffusion")
    for a, b in zip(jax.tree.leaves(nelbo), jax.tree.leaves(diffusion), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    loss, terms = model.batch_loss(xs, key=jr.key(15), objective="diffusion")
    np.testing.assert_allclose(loss, terms.diffusion)
    assert np.isnan(terms.prior) and np.isnan(terms.reconstruction)
    with pytest.raises((ValueError, TypeError), match="objective"):
        model.batch_loss(xs, key=jr.key(15), objective="elbo")  # pyright: ignore


@pytest.mark.parametrize("kind", nf.MODEL_KINDS)
def test_build_model_kinds(kind):
    model = nf.build_model(kind, 3, key=jr.key(16), width_size=8, depth=1)
    xs = jr.normal(jr.key(17), (4, 3), jnp.float32)
    loss, terms = model.batch_loss(xs, key=jr.key(18))
    assert np.isfinite(float(loss)) and model.data_shape == (3,)
    if kind in ("nfdm", "flow", "fmot"):
        assert float(terms.prior) == 0.0


def test_build_model_unknown_kind():
    with pytest.raises(ValueError, match="Unknown model kind 'ndfm'; choose one of"):
        nf.build_model("ndfm", 2, key=jr.key(0))
