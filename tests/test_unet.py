from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import nfdm_sciml as nf
from nfdm_sciml import testing
from nfdm_sciml._images import load_digits_images
from nfdm_sciml._unet import (
    build_image_model,
    IMAGE_MODEL_KINDS,
    ImageNFDMGaussian,
    ImagePredictor,
    UNet,
)

from .helpers import randomise


# Tiny networks: two resolutions, one block each, 8 channels in groups of 4.
TINY: dict[str, Any] = dict(
    width_size=8, channel_multipliers=(1, 2), num_res_blocks=1, num_groups=4
)


def tiny_unet(in_channels, out_channels, size, *, key, **kwargs):
    return UNet(in_channels, out_channels, size, **(TINY | kwargs), key=key)


# Calls are jitted: op-by-op, a U-Net pass dispatches hundreds of small operations.
@eqx.filter_jit
def call(net, t, x, context=None):
    return net(t, x, context)


@pytest.mark.parametrize("size", [8, 16])
@pytest.mark.parametrize("attention", [False, True])
def test_output_shape(size, attention):
    # With attention, at both resolutions (and so in the middle block too).
    resolutions = (size, size // 2) if attention else ()
    net = tiny_unet(2, 3, size, attention_resolutions=resolutions, key=jr.key(0))
    assert (net.middle_attention is None) != attention
    # Batched with vmap, as every caller does.
    xs = jr.normal(jr.key(1), (2, 2, size, size))
    outs = eqx.filter_jit(jax.vmap(net))(jnp.array([0.3, 0.6]), xs)
    assert outs.shape == (2, 3, size, size)
    assert outs.dtype == net.conv_in.weight.dtype
    assert np.all(np.isfinite(outs)) and not np.allclose(outs[0], outs[1])


def test_rectangular_images():
    net = tiny_unet(1, 1, (8, 16), attention_resolutions=(4,), key=jr.key(0))
    assert call(net, jnp.array(0.5), jnp.ones((1, 8, 16))).shape == (1, 8, 16)


@pytest.mark.parametrize("attention", [(), (4,)])
def test_time_derivative_matches_finite_difference(attention):
    # Float64 (conftest enables x64, and the weights follow the default dtype).
    net = randomise(
        tiny_unet(1, 2, 8, attention_resolutions=attention, key=jr.key(2)), jr.key(3)
    )
    assert net.conv_in.weight.dtype == jnp.float64
    x = jr.normal(jr.key(4), (1, 8, 8), jnp.float64)
    t, h = jnp.array(0.37), 1e-6

    @eqx.filter_jit
    def derivative_and_difference(net):
        _, derivative = jax.jvp(lambda s: net(s, x), (t,), (jnp.ones_like(t),))
        return derivative, (net(t + h, x) - net(t - h, x)) / (2 * h)

    derivative, difference = derivative_and_difference(net)
    assert float(jnp.max(jnp.abs(derivative))) > 1e-3  # time really enters
    np.testing.assert_allclose(derivative, difference, rtol=1e-6, atol=1e-6)


def test_context_channels():
    net = tiny_unet(1, 1, 8, context_channels=2, key=jr.key(5))
    x, t = jnp.ones((1, 8, 8)), jnp.array(0.5)
    vector = jnp.array([0.5, -2.0])
    planes = jnp.broadcast_to(vector[:, None, None], (2, 8, 8))
    # A vector context is the same as constant planes.
    out = call(net, t, x, vector)
    np.testing.assert_allclose(out, call(net, t, x, planes), rtol=1e-12)
    assert not np.allclose(out, call(net, t, x, -vector))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=10, channel_multipliers=(1, 2, 2)), "divisible by 4"),
        (dict(image_size=(8, 6), channel_multipliers=(1, 2, 2)), "divisible by 4"),
        (dict(attention_resolutions=(2,)), "heights 8, 4"),
        (dict(num_groups=3), "divide `width_size`"),
        (dict(num_heads=3, attention_resolutions=(4,)), "`num_heads` to divide"),
        (dict(channel_multipliers=()), "at least one channel multiplier"),
        (dict(num_res_blocks=0), "`num_res_blocks`"),
        (dict(image_size=(8,)), "`image_size`"),
        (dict(image_size=0), "`image_size`"),
        (dict(max_frequency=0.5), "`max_frequency`"),
        (dict(in_channels=0), "`in_channels`"),
    ],
)
def test_bad_configs(kwargs, match):
    config = dict(in_channels=1, out_channels=1, image_size=8) | TINY | kwargs
    with pytest.raises(ValueError, match=match):
        UNet(**config, key=jr.key(0))


def test_bad_inputs():
    net = tiny_unet(1, 1, 8, key=jr.key(0))
    t = jnp.array(0.5)
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\).*jax.vmap"):
        net(t, jnp.ones((1, 4, 4)))
    with pytest.raises(ValueError, match="takes no `context`"):
        net(t, jnp.ones((1, 8, 8)), jnp.ones((1, 8, 8)))
    with_context = tiny_unet(1, 1, 8, context_channels=2, key=jr.key(0))
    with pytest.raises(ValueError, match="needs a `context`"):
        with_context(t, jnp.ones((1, 8, 8)))
    with pytest.raises(ValueError, match=r"context of shape \(2, 8, 8\) or \(2,\)"):
        with_context(t, jnp.ones((1, 8, 8)), jnp.ones((3, 8, 8)))


def image_process(shape, *, key, pin_prior=True, **kwargs):
    channels, size = shape[0], shape[1:]
    net = tiny_unet(channels, 2 * channels, size, key=key, **kwargs)
    return ImageNFDMGaussian(randomise(net, key, 0.3), 0.01, pin_prior)


@pytest.mark.parametrize("seed", range(2))
def test_image_forward_is_pinned(seed):
    process = image_process((1, 8, 8), key=jr.key(seed), attention_resolutions=(4,))
    ekey, xkey = jr.split(jr.key(100 + seed))
    eps = jr.normal(ekey, (1, 8, 8), jnp.float64)
    x = jr.uniform(xkey, (1, 8, 8), jnp.float64, -1, 1)
    # z_0 = x + delta * eps, z_1 = eps, zero prior KL: as for NFDMGaussian.
    testing.check_boundary(process, eps, x, delta=0.01)
    mid = eqx.filter_jit(process)(eps, jnp.array(0.5), x)
    assert not np.allclose(mid, 0.5 * x + 0.5 * eps)


def test_image_forward_unpinned_prior():
    process = image_process((1, 8, 8), key=jr.key(7), pin_prior=False)
    eps, x = jnp.ones((1, 8, 8)), jnp.zeros((1, 8, 8))
    z0, z1 = eqx.filter_jit(jax.vmap(process, (None, 0, None)))(
        eps, jnp.array([0.0, 1.0]), x
    )
    np.testing.assert_allclose(z0, x + 0.01 * eps, rtol=1e-12)
    assert not np.allclose(z1, eps)
    assert float(eqx.filter_jit(process.prior_kl)(eps, x)) > 0


def test_image_forward_velocity():
    # The closed-form velocity (one JVP of the U-Net in t) against a finite difference
    # of the process itself.
    process = image_process((1, 8, 8), key=jr.key(8))
    ekey, xkey = jr.split(jr.key(108))
    eps = jr.normal(ekey, (1, 8, 8), jnp.float64)
    x = jr.uniform(xkey, (1, 8, 8), jnp.float64, -1, 1)
    testing.check_velocity(process, eps, 0.3, x)


def test_image_predictor():
    net = randomise(tiny_unet(1, 1, 8, key=jr.key(9)), jr.key(9), 0.3)
    predictor = ImagePredictor(net, 0.01)
    z = jr.normal(jr.key(10), (1, 8, 8), jnp.float64)
    # Checked through a jitted copy: the check differentiates it in t, op by op.
    jitted = eqx.filter_jit(predictor)
    testing.check_predictor(nf.FunctionPredictor(lambda *a: jitted(*a)), z, 0.4)
    # At t = 0 the prediction is z plus a delta-sized correction.
    zero = jnp.array(0.0)
    np.testing.assert_allclose(
        eqx.filter_jit(predictor)(z, zero), z + 0.01 * call(net, zero, z), rtol=1e-12
    )


def test_adapters_check_channels():
    with pytest.raises(ValueError, match="out_channels = 2 \\* in_channels"):
        ImageNFDMGaussian(tiny_unet(1, 1, 8, key=jr.key(0)))
    with pytest.raises(ValueError, match="noise floor `delta`"):
        ImageNFDMGaussian(tiny_unet(1, 2, 8, key=jr.key(0)), delta=0.0)
    with pytest.raises(ValueError, match="out_channels = in_channels"):
        ImagePredictor(tiny_unet(1, 2, 8, key=jr.key(0)))
    with pytest.raises(ValueError, match="delta > 0"):
        ImagePredictor(tiny_unet(1, 1, 8, key=jr.key(0)), delta=0.0)
    with pytest.raises(ValueError, match=r"\(channels, height, width\)"):
        build_image_model((64,), key=jr.key(0))


def test_image_model_on_digits():
    # The whole bound of the image model on real digits. (Its training step is the
    # generic `make_train_step`; `benchmarks/gpu_images.py` runs it.)
    digits = load_digits_images(dtype=np.float64)
    model = build_image_model(digits.data_shape, num_levels=17, **TINY, key=jr.key(11))
    assert model.data_shape == (1, 8, 8)
    assert model.decoder == digits.decoder(scale=1e-3)
    xs = jnp.asarray(digits.images[:4])
    loss, terms = eqx.filter_jit(model.batch_loss)(xs, key=jr.key(12))
    assert np.isfinite(float(loss)) and float(terms.diffusion) > 0
    assert float(terms.prior) == 0.0  # pinned: q(z_1 | x) = N(0, I) exactly
    # z_0 = x + delta * eps sits in the bin of x (half-spacing 1/16 >> delta): the
    # reconstruction term is nearly zero.
    assert 0 <= float(terms.reconstruction) < 1e-6


@pytest.mark.parametrize("kind", IMAGE_MODEL_KINDS)
def test_image_model_kinds_on_digits(kind):
    # Every kind on the same tiny U-Net: the same predictor (same weights for the same
    # key), the digits' decoder, and a finite bound on a batch of real digits.
    digits = load_digits_images(dtype=np.float64)
    model = build_image_model(
        digits.data_shape, kind=kind, num_levels=17, **TINY, key=jr.key(13)
    )
    reference = build_image_model(
        digits.data_shape, num_levels=17, **TINY, key=jr.key(13)
    )
    assert model.data_shape == (1, 8, 8)
    assert model.decoder == digits.decoder(scale=1e-3)
    assert eqx.tree_equal(model.predictor, reference.predictor)
    xs = jnp.asarray(digits.images[:4])
    loss, terms = eqx.filter_jit(model.batch_loss)(xs, key=jr.key(14))
    assert np.isfinite(float(loss)) and float(terms.diffusion) > 0
    assert 0 <= float(terms.reconstruction) < 1e-3
    forward_params = jax.tree.leaves(eqx.filter(model.forward, eqx.is_inexact_array))
    # The baselines' forward processes are fixed: nothing of them is trained.
    assert bool(forward_params) == (kind == "nfdm")
    if kind == "vdm":
        assert 0 < float(terms.prior) < 1e-2  # q(z_1 | x) is only close to N(0, I)
    else:
        assert float(terms.prior) == 0.0  # q(z_1 | x) = N(0, I) exactly
    if kind == "vdm":
        assert isinstance(model.forward, nf.VariancePreserving)
        assert isinstance(model.volatility, nf.LinearSNRVolatility)
        assert jax.tree.leaves(eqx.filter(model.volatility, eqx.is_inexact_array)) == []
        # The schedule starts at the common noise floor: sigma_0 = delta.
        _, sigma = model.forward.mean_and_scale(jnp.array(0.0), xs[0])
        np.testing.assert_allclose(sigma, 1e-3, rtol=1e-10)
    else:
        assert isinstance(model.volatility, nf.NeuralVolatility)


def test_image_model_bad_kinds():
    with pytest.raises(ValueError, match="choose one of nfdm, vdm, fmot"):
        build_image_model((1, 8, 8), kind="flow", key=jr.key(0))
    with pytest.raises(ValueError, match="only kind='nfdm' has"):
        build_image_model((1, 8, 8), kind="vdm", pin_prior=False, key=jr.key(0))
    with pytest.raises(ValueError, match="noise floor `delta`"):
        build_image_model((1, 8, 8), kind="fmot", delta=0.0, key=jr.key(0))
