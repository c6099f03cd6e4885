r"""A time-conditioned U-Net for images, and the image forward process, predictor and
models built on it.

The vector components ([`nfdm_sciml.NFDMGaussian`][], [`nfdm_sciml.Predictor`][])
see an example as one flat vector through an MLP. For images of shape
`(channels, height, width)` the same parametrisations are kept and only the network
changes: [`nfdm_sciml.ImageNFDMGaussian`][] reads $(\bar\mu_\phi, \bar\ell_\phi)$ off
the $2C$ output channels of a [`nfdm_sciml.UNet`][], and
[`nfdm_sciml.ImagePredictor`][] the correction of $\hat x_\theta$ off its $C$ output
channels. [`nfdm_sciml.build_image_model`][] puts them together with a volatility and
the discretised decoder that gives bits per dimension, for NFDM and for the fixed
baselines (VDM, FM-OT) with the same predictor.

Every network here acts on one image; batch with `jax.vmap`.
"""

import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._custom_types import Context, Data, Scalar, Time
from ._decoder import DiscretisedGaussianDecoder
from ._forward import (
    _check_delta,
    _pinned_moments,
    AbstractGaussianProcess,
    LinearInterpolant,
    VariancePreserving,
)
from ._model import NFDM
from ._predictor import AbstractPredictor
from ._volatility import LinearSNRVolatility, NeuralVolatility


class _TimeEmbedding(eqx.Module):
    """Fourier features of the raw time, $(\\sin \\omega_k t, \\cos \\omega_k t)$ with
    $\\omega_k$ geometric from 1 to `max_frequency`, followed by a two-layer MLP."""

    num_frequencies: int = eqx.field(static=True)
    max_frequency: float = eqx.field(static=True)
    linear_in: eqx.nn.Linear
    linear_out: eqx.nn.Linear

    def __init__(
        self,
        num_frequencies: int,
        embedding_size: int,
        max_frequency: float,
        *,
        key: PRNGKeyArray,
    ):
        ikey, okey = jr.split(key)
        self.num_frequencies = num_frequencies
        self.max_frequency = max_frequency
        self.linear_in = eqx.nn.Linear(2 * num_frequencies, embedding_size, key=ikey)
        self.linear_out = eqx.nn.Linear(embedding_size, embedding_size, key=okey)

    def __call__(self, t: Array) -> Array:
        # The frequencies are recomputed rather than stored: as an array leaf they
        # would be trained along with the weights.
        dtype = self.linear_in.weight.dtype
        log_max = math.log(self.max_frequency)
        frequencies = jnp.exp(
            jnp.linspace(0.0, log_max, self.num_frequencies, dtype=dtype)
        )
        angles = frequencies * t.astype(dtype)
        features = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])
        return self.linear_out(jax.nn.silu(self.linear_in(features)))


def _conv3x3(in_channels: int, out_channels: int, key: PRNGKeyArray) -> eqx.nn.Conv2d:
    return eqx.nn.Conv2d(in_channels, out_channels, 3, padding=1, key=key)


# TODO: no dropout (image diffusion U-Nets often use 0.1 on CIFAR-10). It would need
# a PRNG key in every call of a forward process and predictor, which the interfaces
# do not carry yet.
class _ResBlock(eqx.Module):
    norm_in: eqx.nn.GroupNorm
    conv_in: eqx.nn.Conv2d
    time_proj: eqx.nn.Linear
    norm_out: eqx.nn.GroupNorm
    conv_out: eqx.nn.Conv2d
    skip: eqx.nn.Conv2d | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        embedding_size: int,
        num_groups: int,
        *,
        key: PRNGKeyArray,
    ):
        ikey, tkey, okey, skey = jr.split(key, 4)
        self.norm_in = eqx.nn.GroupNorm(num_groups, in_channels)
        self.conv_in = _conv3x3(in_channels, out_channels, ikey)
        self.time_proj = eqx.nn.Linear(embedding_size, out_channels, key=tkey)
        self.norm_out = eqx.nn.GroupNorm(num_groups, out_channels)
        self.conv_out = _conv3x3(out_channels, out_channels, okey)
        self.skip = (
            None
            if in_channels == out_channels
            else eqx.nn.Conv2d(in_channels, out_channels, 1, key=skey)
        )

    def __call__(self, h: Array, embedding: Array) -> Array:
        out = self.conv_in(jax.nn.silu(self.norm_in(h)))
        out = out + self.time_proj(jax.nn.silu(embedding))[:, None, None]
        out = self.conv_out(jax.nn.silu(self.norm_out(out)))
        return out + (h if self.skip is None else self.skip(h))


class _Attention(eqx.Module):
    """Self-attention over the pixels of a feature map, with a residual connection."""

    norm: eqx.nn.GroupNorm
    attention: eqx.nn.MultiheadAttention

    def __init__(
        self, channels: int, num_groups: int, num_heads: int, *, key: PRNGKeyArray
    ):
        self.norm = eqx.nn.GroupNorm(num_groups, channels)
        self.attention = eqx.nn.MultiheadAttention(
            num_heads, channels, use_output_bias=True, key=key
        )

    def __call__(self, h: Array) -> Array:
        channels, height, width = h.shape
        tokens = self.norm(h).reshape(channels, height * width).T
        out = self.attention(tokens, tokens, tokens)
        return h + out.T.reshape(channels, height, width)


class _Upsample(eqx.Module):
    conv: eqx.nn.Conv2d

    def __call__(self, h: Array) -> Array:
        # Nearest-neighbour doubling, then a convolution to smooth the blocks.
        return self.conv(jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))


class _Level(eqx.Module):
    """The blocks of one resolution, and the resampling that leaves it (or None)."""

    blocks: list[_ResBlock]
    attentions: list[_Attention | None]
    resample: eqx.nn.Conv2d | _Upsample | None


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"`UNet` needs `{name}` to be an integer >= {minimum}, got {value!r}."
        )
    return value


class UNet(eqx.Module):
    r"""A U-Net for one image of shape `(channels, height, width)`, conditioned on a
    scalar time.

    Time enters through Fourier features of the raw float $t$,
    $(\sin\omega_k t, \cos\omega_k t)$ with $\omega_k$ geometric from 1 to
    `max_frequency`, followed by an MLP whose output is added inside every residual
    block. The embedding is smooth in $t$, as it must be: the forward process takes
    `jax.jvp` of its network in $t$, and a rounded or table-lookup time embedding would
    make every such derivative silently zero.

    The layout is the usual one: a $3\times3$ convolution to `width_size` channels;
    at each resolution `num_res_blocks` residual blocks (group norm, SiLU,
    convolution, the time added per channel, and again) with `width_size *
    multiplier` channels, then a strided convolution that halves height and width;
    a middle of two residual blocks; the mirror image on the way up, each block
    taking the matching skip connection as extra channels, with nearest-neighbour
    upsampling; a final group norm, SiLU and convolution to `out_channels`.
    Self-attention over the pixels follows every block whose feature map has a
    height in `attention_resolutions` (and sits between the middle blocks when the
    lowest resolution is listed).

    **Arguments:**

    - `in_channels`: channels of the input image.
    - `out_channels`: channels of the output, which has the input's height and width.
    - `image_size`: `(height, width)` of the input, or one integer for square images.
        Both must be divisible by $2^{L-1}$, with $L$ the number of resolutions.
    - `context_channels`: channels of an optional context, concatenated to the input
        (0 for none). A context of shape `(context_channels, height, width)` is taken
        as it is; one of shape `(context_channels,)` is broadcast over the pixels.
    - `width_size`: channels at the full resolution.
    - `channel_multipliers`: one multiplier of `width_size` per resolution, from the
        full one down; $L$ resolutions halve the image $L - 1$ times.
    - `num_res_blocks`: residual blocks per resolution on the way down (one more on
        the way up, for the extra skip connection).
    - `attention_resolutions`: the feature-map heights at which to add
        self-attention, e.g. `(16,)` for CIFAR-10; each must be a height the network
        reaches. Empty for none.
    - `num_groups`: groups of every group norm; must divide `width_size`.
    - `num_heads`: attention heads; must divide the channels where attention is.
    - `max_frequency`: the highest angular frequency of the time features. High
        frequencies let the network change quickly in $t$, and make its time
        derivatives, and so the velocities, large.
    - `key`: a JAX PRNG key for initialisation.

    Call it as `unet(t, x)` or `unet(t, x, context)`; the output has the dtype of
    the weights.
    """

    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)
    context_channels: int = eqx.field(static=True)
    image_size: tuple[int, int] = eqx.field(static=True)
    time_embedding: _TimeEmbedding
    conv_in: eqx.nn.Conv2d
    down: list[_Level]
    middle: list[_ResBlock]
    middle_attention: _Attention | None
    up: list[_Level]
    norm_out: eqx.nn.GroupNorm
    conv_out: eqx.nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_size: int | Sequence[int],
        *,
        context_channels: int = 0,
        width_size: int = 64,
        channel_multipliers: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (),
        num_groups: int = 8,
        num_heads: int = 1,
        max_frequency: float = 100.0,
        key: PRNGKeyArray,
    ):
        _positive_int(in_channels, "in_channels")
        _positive_int(out_channels, "out_channels")
        _positive_int(context_channels, "context_channels", 0)
        _positive_int(width_size, "width_size")
        _positive_int(num_res_blocks, "num_res_blocks")
        _positive_int(num_groups, "num_groups")
        _positive_int(num_heads, "num_heads")
        multipliers = tuple(channel_multipliers)
        if not multipliers:
            raise ValueError(
                "`UNet` needs at least one channel multiplier (one per resolution), "
                "e.g. `channel_multipliers=(1, 2, 2)`."
            )
        for multiplier in multipliers:
            _positive_int(multiplier, "channel_multipliers")
        size = (image_size, image_size) if isinstance(image_size, int) else image_size
        size = tuple(size)
        if len(size) != 2 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size
        ):
            raise ValueError(
                "`UNet` needs `image_size` as (height, width) or one integer, with "
                f"positive sizes; got {image_size!r}."
            )
        height, width = size
        factor = 2 ** (len(multipliers) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"`UNet` with {len(multipliers)} resolutions halves the image "
                f"{len(multipliers) - 1} time(s), so its height and width must be "
                f"divisible by {factor}; got {height} x {width}. Pad or crop the "
                "images, or pass fewer `channel_multipliers`."
            )
        heights = [height // 2**level for level in range(len(multipliers))]
        attention = set(attention_resolutions)
        missing = sorted(attention - set(heights))
        if missing:
            raise ValueError(
                f"`UNet` has no resolution of height {missing} for attention; for "
                f"{height} x {width} images its feature maps have heights "
                f"{', '.join(map(str, heights))}: choose `attention_resolutions` "
                "among these."
            )
        if width_size % num_groups:
            raise ValueError(
                f"`UNet` needs `num_groups` to divide `width_size` (every group norm "
                f"splits channels into groups); got {num_groups} and {width_size}."
            )
        for h, multiplier in zip(heights, multipliers, strict=True):
            if h in attention and (width_size * multiplier) % num_heads:
                raise ValueError(
                    f"`UNet` needs `num_heads` to divide the {width_size * multiplier} "
                    f"channels of the attention at height {h}; got {num_heads}."
                )
        if not max_frequency >= 1:
            raise ValueError(
                f"`UNet` needs `max_frequency` >= 1 (the lowest time frequency is 1); "
                f"got {max_frequency}."
            )

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.context_channels = context_channels
        self.image_size = (height, width)
        keys = iter(jr.split(key, 8 + 4 * len(multipliers) * (num_res_blocks + 2)))
        embedding_size = 4 * width_size
        self.time_embedding = _TimeEmbedding(
            max(width_size // 2, 1), embedding_size, max_frequency, key=next(keys)
        )
        self.conv_in = _conv3x3(in_channels + context_channels, width_size, next(keys))

        def res_block(c_in, c_out):
            return _ResBlock(c_in, c_out, embedding_size, num_groups, key=next(keys))

        def attention_at(h, channels):
            if h not in attention:
                return None
            return _Attention(channels, num_groups, num_heads, key=next(keys))

        # The channels of every skip connection, in the order the way up uses them.
        skips = [width_size]
        channels = width_size
        self.down = []
        for level, (h, multiplier) in enumerate(zip(heights, multipliers, strict=True)):
            blocks, attentions = [], []
            for _ in range(num_res_blocks):
                blocks.append(res_block(channels, width_size * multiplier))
                channels = width_size * multiplier
                attentions.append(attention_at(h, channels))
                skips.append(channels)
            resample = None
            if level < len(multipliers) - 1:
                resample = eqx.nn.Conv2d(
                    channels, channels, 3, stride=2, padding=1, key=next(keys)
                )
                skips.append(channels)
            self.down.append(_Level(blocks, attentions, resample))
        self.middle = [res_block(channels, channels), res_block(channels, channels)]
        self.middle_attention = attention_at(heights[-1], channels)
        self.up = []
        for level in reversed(range(len(multipliers))):
            blocks, attentions = [], []
            for _ in range(num_res_blocks + 1):
                out = width_size * multipliers[level]
                blocks.append(res_block(channels + skips.pop(), out))
                channels = out
                attentions.append(attention_at(heights[level], channels))
            resample = None
            if level > 0:
                resample = _Upsample(_conv3x3(channels, channels, next(keys)))
            self.up.append(_Level(blocks, attentions, resample))
        self.norm_out = eqx.nn.GroupNorm(num_groups, channels)
        self.conv_out = _conv3x3(channels, out_channels, next(keys))

    def __call__(
        self,
        t: Float[Array, ""],
        x: Float[Array, "channels height width"],
        context: Float[Array, "context_channels height width"]
        | Float[Array, " context_channels"]
        | None = None,
    ) -> Float[Array, "out_channels height width"]:
        expected = (self.in_channels, *self.image_size)
        if x.shape != expected:
            raise ValueError(
                f"This `UNet` takes one image of shape {expected} (channels, height, "
                f"width), got shape {x.shape}; batch with `jax.vmap`."
            )
        if jnp.shape(t) != ():
            raise ValueError(
                f"`UNet` takes a scalar time `t`, got shape {jnp.shape(t)}; batch "
                "with `jax.vmap`."
            )
        # Everything is cast to the weights' dtype so that float32 networks accept
        # float64 data (and vice versa) under strict dtype promotion.
        # TODO: no mixed precision. Computing here in bfloat16 with float32 weights
        # is easy, but the bound compares velocities from JVPs of this network at x
        # and at x_hat and divides their gap by g(t)^2: bfloat16 rounding there does
        # not cancel and biases the NELBO. It needs the boundary terms and the loss
        # kept in float32 and a check of the bound against float32 on a GPU.
        dtype = self.conv_in.weight.dtype
        h = x.astype(dtype)
        if self.context_channels:
            if context is None:
                raise ValueError(
                    f"This `UNet` was built with context_channels="
                    f"{self.context_channels} and needs a `context`."
                )
            if context.shape == (self.context_channels,):
                context = jnp.broadcast_to(
                    context[:, None, None], (self.context_channels, *self.image_size)
                )
            if context.shape != (self.context_channels, *self.image_size):
                raise ValueError(
                    f"This `UNet` takes a context of shape ({self.context_channels}, "
                    f"{self.image_size[0]}, {self.image_size[1]}) or "
                    f"({self.context_channels},), got shape {context.shape}."
                )
            h = jnp.concatenate([h, context.astype(dtype)])
        elif context is not None:
            raise ValueError(
                "This `UNet` was built with context_channels=0 and takes no "
                "`context`; build it with `context_channels=` to condition on one."
            )

        embedding = self.time_embedding(t)
        h = self.conv_in(h)
        skips = [h]
        for level in self.down:
            for block, attention in zip(level.blocks, level.attentions, strict=True):
                h = block(h, embedding)
                h = h if attention is None else attention(h)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = self.middle[0](h, embedding)
        h = h if self.middle_attention is None else self.middle_attention(h)
        h = self.middle[1](h, embedding)
        for level in self.up:
            for block, attention in zip(level.blocks, level.attentions, strict=True):
                h = block(jnp.concatenate([h, skips.pop()]), embedding)
                h = h if attention is None else attention(h)
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class ImageNFDMGaussian(AbstractGaussianProcess):
    r"""The learnable Gaussian forward process of NFDM for images, with a
    [`nfdm_sciml.UNet`][] as its network.

    The parametrisation is that of [`nfdm_sciml.NFDMGaussian`][], per pixel:
    $$\mu = (1 - t)\,x + t(1 - t)\,\bar\mu_\phi(x, t), \qquad
    \log\sigma = (1 - t)\log\delta + t(1 - t)\,\bar\ell_\phi(x, t),$$
    with $\bar\mu_\phi$ the first $C$ and $\bar\ell_\phi$ the last $C$ output
    channels of the U-Net. So $q(z_0 \mid x) = \mathcal{N}(x, \delta^2 I)$ and
    $q(z_1 \mid x) = \mathcal{N}(0, I)$ exactly; with `pin_prior=False` the factor
    $t(1 - t)$ becomes $t$ and the end point is learned, as for `NFDMGaussian`.

    **Arguments:**

    - `net`: a `UNet` with `in_channels` $C$ and `out_channels` $2C$; its
        `image_size` fixes the shape `(C, height, width)` of the data. A context, if
        any, reaches it as extra input channels.
    - `delta`: the noise floor at $t = 0$. Keep it well below half the spacing of the
        data's levels (1/255 for 8-bit images on $[-1, 1]$), so that $z_0$ stays in
        its bin and the reconstruction term is small.
    - `pin_prior`: whether $z_1 = \varepsilon$ exactly (default) or learned.
    """

    net: UNet
    delta: float = eqx.field(static=True, default=0.01)
    pin_prior: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        _check_delta(self.delta, "ImageNFDMGaussian")
        if self.net.out_channels != 2 * self.net.in_channels:
            raise ValueError(
                "`ImageNFDMGaussian` reads the mean and log-scale off the output "
                "channels of its U-Net, which needs out_channels = 2 * in_channels; "
                f"got {self.net.in_channels} in and {self.net.out_channels} out."
            )

    def mean_and_scale(
        self, t: Time, x: Data, context: Context = None
    ) -> tuple[Data, Data]:
        out = self.net(t, x, context).astype(x.dtype)
        # The boundary parametrisation of `NFDMGaussian`, shared with it.
        return _pinned_moments(out, t, x, self.delta, self.pin_prior)

    def prior_kl(self, eps: Data, x: Data, context: Context = None) -> Scalar:
        if not self.pin_prior:
            return super().prior_kl(eps, x, context)
        # Exact by construction (mu_1 = 0, sigma_1 = 1): skip the network pass.
        del eps, context
        return jnp.zeros((), x.dtype)


class ImagePredictor(AbstractPredictor):
    r"""A U-Net data predictor for images, with the stabilising reparameterisation of
    [`nfdm_sciml.Predictor`][]: $\hat x = (1 - t)\,z + (t + \delta)\,\mathrm{Net}(z,
    t)$.

    **Arguments:**

    - `net`: a [`nfdm_sciml.UNet`][] with as many output channels as input channels.
    - `delta`: the offset in $(t + \delta)$.
    """

    net: UNet
    delta: float = eqx.field(static=True, default=0.01)

    def __check_init__(self):
        if not self.delta > 0:
            raise ValueError(f"`ImagePredictor` needs delta > 0, got {self.delta}.")
        if self.net.out_channels != self.net.in_channels:
            raise ValueError(
                "`ImagePredictor` predicts an image of the input's shape, which needs "
                f"a U-Net with out_channels = in_channels; got {self.net.in_channels} "
                f"in and {self.net.out_channels} out."
            )

    def __call__(self, z: Data, t: Time, context: Context = None) -> Data:
        out = self.net(t, z, context).astype(z.dtype)
        return (1 - t) * z + (t + self.delta) * out


IMAGE_MODEL_KINDS = ("nfdm", "vdm", "fmot")
# The end of the variance-preserving schedule, as for vector data: sigmoid(-10) leaves
# a signal fraction of 4.5e-5 at t = 1, so the prior term is negligible.
_VP_GAMMA_MAX = 10.0


def build_image_model(
    data_shape: Sequence[int],
    *,
    key: PRNGKeyArray,
    kind: str = "nfdm",
    num_levels: int = 256,
    context_channels: int = 0,
    width_size: int = 64,
    channel_multipliers: Sequence[int] = (1, 2, 2),
    num_res_blocks: int = 2,
    attention_resolutions: Sequence[int] = (),
    num_groups: int = 8,
    num_heads: int = 1,
    delta: float = 1e-3,
    pin_prior: bool = True,
) -> NFDM:
    r"""Builds a diffusion model for images on `num_levels` discrete levels per pixel,
    by name, with U-Nets of the given configuration.

    - `"nfdm"`: the learned forward process [`nfdm_sciml.ImageNFDMGaussian`][] (a
        U-Net of its own) and a learned [`nfdm_sciml.NeuralVolatility`][].
    - `"vdm"`: the fixed [`nfdm_sciml.VariancePreserving`][] process with its
        matching [`nfdm_sciml.LinearSNRVolatility`][] (the VP-SDE), on the schedule
        $\gamma(t)$ from $\gamma_{\min} = \log(\delta^2 / (1 - \delta^2))$ to 10, so
        that its noise at $t = 0$ is $\sigma_0 = \delta$ as for the other kinds.
    - `"fmot"`: the fixed [`nfdm_sciml.LinearInterpolant`][] of noise floor $\delta$
        with a learned volatility.

    Every kind has the same predictor, an [`nfdm_sciml.ImagePredictor`][] on a
    [`nfdm_sciml.UNet`][] of the given configuration (initialised the same for the
    same `key`), and the decoder `DiscretisedGaussianDecoder(num_levels,
    scale=delta)`, so the data must lie on its bin centres $-1 + 2k/(L - 1)$ (as every
    loader of [`nfdm_sciml.load_images`][] returns them) and the NELBO bounds the
    discrete negative log-likelihood.

    !!! note
        With the same U-Net options, `"nfdm"` has about twice the parameters of the
        fixed kinds: its forward process is a second U-Net, of the same size as the
        predictor's.

    **Arguments:**

    - `data_shape`: `(channels, height, width)` of one image.
    - `key`: a JAX PRNG key.
    - `kind`: `"nfdm"`, `"vdm"` or `"fmot"` (see above).
    - `num_levels`: levels per pixel (256 for 8-bit images, 17 for the digits).
    - `context_channels`, `width_size`, `channel_multipliers`, `num_res_blocks`,
        `attention_resolutions`, `num_groups`, `num_heads`: of every U-Net, see
        `UNet`.
    - `delta`: the noise floor at $t = 0$ and the decoder's scale; the default is a
        quarter of the half-spacing of 8-bit levels.
    - `pin_prior`: see `ImageNFDMGaussian`; only for `kind="nfdm"`.

    **Returns:** an [`nfdm_sciml.NFDM`][] with `data_shape` set.
    """
    if kind not in IMAGE_MODEL_KINDS:
        raise ValueError(
            f"Unknown image model kind {kind!r}; choose one of "
            f"{', '.join(IMAGE_MODEL_KINDS)}."
        )
    if kind != "nfdm" and not pin_prior:
        raise ValueError(
            f"`pin_prior=False` learns the end point of the forward process, which "
            f"only kind='nfdm' has; the fixed process of kind={kind!r} cannot learn "
            "it: leave `pin_prior` at True."
        )
    shape = tuple(data_shape)
    if len(shape) != 3:
        raise ValueError(
            "`build_image_model` needs `data_shape` as (channels, height, width), got "
            f"{shape}."
        )
    _check_delta(delta, "build_image_model")
    channels, height, width = shape
    fkey, pkey, vkey = jr.split(key, 3)

    def unet(out_channels, unet_key):
        return UNet(
            channels,
            out_channels,
            (height, width),
            context_channels=context_channels,
            width_size=width_size,
            channel_multipliers=channel_multipliers,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            num_groups=num_groups,
            num_heads=num_heads,
            key=unet_key,
        )

    predictor = ImagePredictor(unet(channels, pkey), delta)
    if kind == "nfdm":
        forward = ImageNFDMGaussian(unet(2 * channels, fkey), delta, pin_prior)
        volatility = NeuralVolatility(key=vkey)
    elif kind == "fmot":
        forward = LinearInterpolant(delta)
        volatility = NeuralVolatility(key=vkey)
    else:
        # sigmoid(gamma_min) = delta^2: the VP noise at t = 0 is the same floor.
        gamma_min = math.log(delta**2 / (1 - delta**2))
        forward = VariancePreserving(gamma_min, _VP_GAMMA_MAX)
        volatility = LinearSNRVolatility(gamma_min, _VP_GAMMA_MAX)
    return NFDM(
        forward,
        predictor,
        volatility,
        DiscretisedGaussianDecoder(num_levels, scale=delta),
        data_shape=shape,
    )
