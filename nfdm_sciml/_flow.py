r"""A learnable non-Gaussian forward process built from conditional coupling layers."""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PRNGKeyArray

from ._custom_types import Context, Data, Scalar, Time
from ._forward import AbstractFlowProcess, AbstractGaussianProcess, NFDMGaussian
from ._nets import TimeMLP
from ._spline import rational_quadratic_spline


# Raw coupling parameters pass through B tanh(raw / B) before the t (1 - t) factor.
_PARAM_BOUND = 3.0


class NeuralFlowProcess(AbstractFlowProcess):
    r"""A learnable forward process with non-Gaussian marginals $q(z_t \mid x)$.

    $$F(\varepsilon, t, x) = \mu(x, t) + \sigma(x, t) \odot T_{x, t}(\varepsilon),$$

    where $(\mu, \sigma)$ are those of a Gaussian part ([`nfdm_sciml.NFDMGaussian`][]
    by default) and $T_{x, t}$ is a stack of coupling layers on $\varepsilon$ whose
    transforms (affine, or monotone rational-quadratic splines) are conditioned on
    $(x, t)$, the context and the other half of $\varepsilon$. The coupling parameters
    are multiplied by $t(1 - t)$, so $T$ is the identity at both ends and the process
    keeps the end points of its Gaussian part: with NFDM-Gaussian,
    $z_0 = x + \delta\varepsilon$ and $z_1 = \varepsilon$ exactly; with a
    [`nfdm_sciml.GaussianBridge`][] (pass `gaussian=`), $z_1 = x_1 + \delta\varepsilon$,
    a non-Gaussian bridge. The log-determinant is exact; the velocity and score come
    from automatic differentiation, and the prior term is the Gaussian part's.

    The last layer of every conditioner starts at zero, so an untrained process equals
    its Gaussian part and training moves away from it only where that helps.

    **Arguments:**

    - `data_size`: number of entries of one (vector) example.
    - `context_size`: number of entries of the flattened context.
    - `num_layers`: coupling layers; they alternate which half is transformed.
    - `transform`: `"affine"` or `"spline"`.
    - `num_bins`, `bound`: of the splines (identity outside `[-bound, bound]`).
    - `width_size`, `depth`: of the Gaussian network and of each conditioner.
    - `delta`: the noise floor at $t = 0$.
    - `gaussian`: the Gaussian part, any [`nfdm_sciml.AbstractGaussianProcess`][] on
      examples of `data_size` entries; by default an [`nfdm_sciml.NFDMGaussian`][]
      built from `width_size`, `depth`, `delta` and `context_size` (which must then
      be the size of the context the whole process sees).
    - `key`: a JAX PRNG key.
    """

    gaussian: AbstractGaussianProcess
    conditioners: tuple[TimeMLP, ...]
    # Index tuples (hashable, so they can be static) of each layer's two halves.
    transformed: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    conditioning: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    transform: Literal["affine", "spline"] = eqx.field(static=True)
    num_bins: int = eqx.field(static=True)
    bound: float = eqx.field(static=True)

    def __init__(
        self,
        data_size: int,
        *,
        context_size: int = 0,
        num_layers: int = 4,
        transform: Literal["affine", "spline"] = "spline",
        num_bins: int = 8,
        bound: float = 5.0,
        width_size: int = 64,
        depth: int = 4,
        delta: float = 0.01,
        gaussian: AbstractGaussianProcess | None = None,
        key: PRNGKeyArray,
    ):
        if transform not in ("affine", "spline"):
            raise ValueError(
                f"`transform` must be 'affine' or 'spline', got {transform!r}."
            )
        if num_layers < 1 or num_bins < 2 or bound <= 0:
            raise ValueError(
                "`NeuralFlowProcess` needs num_layers >= 1, num_bins >= 2 and "
                f"bound > 0; got {num_layers=}, {num_bins=}, {bound=}."
            )
        gkey, *ckeys = jr.split(key, num_layers + 1)
        if gaussian is None:
            gaussian = NFDMGaussian(
                data_size,
                context_size=context_size,
                width_size=width_size,
                depth=depth,
                delta=delta,
                key=gkey,
            )
        elif not isinstance(gaussian, AbstractGaussianProcess):
            raise TypeError(
                "`gaussian` must be an AbstractGaussianProcess (for example "
                f"NFDMGaussian or GaussianBridge); got {type(gaussian).__name__}."
            )
        self.gaussian = gaussian
        index = np.arange(data_size)
        transformed, conditioning, conditioners = [], [], []
        for layer, ckey in enumerate(ckeys):
            # With one dimension there is nothing to condition on but (x, t): every
            # layer then transforms that coordinate.
            mask = index % 2 == layer % 2 if data_size > 1 else index >= 0
            transformed.append(tuple(int(i) for i in index[mask]))
            conditioning.append(tuple(int(i) for i in index[~mask]))
            width = int(mask.sum())
            per_entry = 2 if transform == "affine" else 3 * num_bins - 1
            net = TimeMLP(
                int((~mask).sum()) + data_size + context_size,
                width * per_entry,
                width_size=width_size,
                depth=depth,
                key=ckey,
            )
            last = jax.tree.map(jnp.zeros_like, net.mlp.layers[-1])
            conditioners.append(eqx.tree_at(lambda n: n.mlp.layers[-1], net, last))
        self.conditioners = tuple(conditioners)
        self.transformed = tuple(transformed)
        self.conditioning = tuple(conditioning)
        self.transform = transform
        self.num_bins = num_bins
        self.bound = bound

    def _layer(self, layer: int, u, t, x, context, inverse: bool):
        idx_b = np.asarray(self.transformed[layer], dtype=np.int32)
        idx_a = np.asarray(self.conditioning[layer], dtype=np.int32)
        raw = self.conditioners[layer](t, u[idx_a], x, context).astype(u.dtype)
        # A soft bound on every raw parameter keeps each layer's slopes within a fixed
        # range (the spline's inverse and the score stay well conditioned); the factor
        # t (1 - t) makes the layer the identity at both ends.
        bounded = _PARAM_BOUND * jnp.tanh(raw / _PARAM_BOUND)
        params = t * (1 - t) * bounded.reshape(len(idx_b), -1)
        b = u[idx_b]
        if self.transform == "affine":
            log_scale, shift = params[:, 0], params[:, 1]
            if inverse:
                new_b, log_det = (b - shift) * jnp.exp(-log_scale), -log_scale
            else:
                new_b, log_det = b * jnp.exp(log_scale) + shift, log_scale
        else:
            k = self.num_bins
            new_b, log_det = rational_quadratic_spline(
                b,
                params[:, :k],
                params[:, k : 2 * k],
                params[:, 2 * k :],
                bound=self.bound,
                inverse=inverse,
            )
        return u.at[idx_b].set(new_b), jnp.sum(log_det)

    def _transform(self, eps, t, x, context):
        u, log_det = eps, jnp.zeros((), eps.dtype)
        for layer in range(len(self.conditioners)):
            u, ld = self._layer(layer, u, t, x, context, inverse=False)
            log_det = log_det + ld
        return u, log_det

    def __call__(self, eps: Data, t: Time, x: Data, context: Context = None) -> Data:
        mu, sigma = self.gaussian.mean_and_scale(t, x, context)
        return mu + sigma * self._transform(eps, t, x, context)[0]

    def inverse_and_log_det(
        self, z: Data, t: Time, x: Data, context: Context = None
    ) -> tuple[Data, Scalar]:
        mu, sigma = self.gaussian.mean_and_scale(t, x, context)
        u, log_det = (z - mu) / sigma, jnp.sum(jnp.log(sigma))
        for layer in reversed(range(len(self.conditioners))):
            # Each inverse layer returns the log-det of the inverse map.
            u, inverse_log_det = self._layer(layer, u, t, x, context, inverse=True)
            log_det = log_det - inverse_log_det
        return u, log_det

    def log_det_jacobian(
        self, eps: Data, t: Time, x: Data, context: Context = None
    ) -> Scalar:
        _, sigma = self.gaussian.mean_and_scale(t, x, context)
        return jnp.sum(jnp.log(sigma)) + self._transform(eps, t, x, context)[1]

    def prior_kl(self, eps: Data, x: Data, context: Context = None) -> Scalar:
        # At t = 1 the couplings are the identity, so q(z_1 | x) is the Gaussian
        # part's and so is its KL to the prior.
        return self.gaussian.prior_kl(eps, x, context)
