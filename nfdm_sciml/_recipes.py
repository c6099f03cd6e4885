"""Ready-made models by name: the configurations of the paper's 2D experiments."""

import math

import jax
import jax.random as jr
from jaxtyping import PRNGKeyArray

from ._decoder import GaussianDecoder
from ._flow import NeuralFlowProcess
from ._forward import LinearInterpolant, NFDMGaussian, VariancePreserving
from ._model import NFDM
from ._predictor import Predictor
from ._volatility import LinearSNRVolatility, NeuralVolatility


MODEL_KINDS = ("nfdm", "flow", "fmot", "vdm")


def build_model(
    kind: str,
    data_size: int,
    *,
    key: PRNGKeyArray,
    width_size: int = 64,
    depth: int = 4,
    delta: float = 0.01,
    pin_prior: bool = True,
) -> NFDM:
    r"""Builds a model for vector data by name, with MLPs of the given size.

    - `"nfdm"`: NFDM-Gaussian forward process, learned volatility (the paper's
      recipe); `pin_prior=False` learns its end point $q(z_1 \mid x)$ as well (see
      [`nfdm_sciml.NFDMGaussian`][]), the choice for NFDM-OT.
    - `"flow"`: the non-Gaussian [`nfdm_sciml.NeuralFlowProcess`][] (spline couplings)
      with a learned volatility.
    - `"fmot"`: the fixed linear interpolant (FM-OT) with a learned volatility.
    - `"vdm"`: the fixed variance-preserving process with its matching linear-SNR
      volatility (the VP-SDE).

    Each uses the stabilised [`nfdm_sciml.Predictor`][] and a Gaussian decoder whose
    scale is the process's noise level at $t = 0$.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(
            f"Unknown model kind {kind!r}; choose one of {', '.join(MODEL_KINDS)}."
        )
    fkey, pkey, vkey = jr.split(key, 3)
    volatility = NeuralVolatility(width_size=width_size, depth=depth, key=vkey)
    scale = delta
    if kind == "nfdm":
        forward = NFDMGaussian(
            data_size,
            width_size=width_size,
            depth=depth,
            delta=delta,
            pin_prior=pin_prior,
            key=fkey,
        )
    elif kind == "flow":
        forward = NeuralFlowProcess(
            data_size, width_size=width_size, depth=depth, delta=delta, key=fkey
        )
    elif kind == "fmot":
        forward = LinearInterpolant(delta)
    else:
        forward = VariancePreserving()
        volatility = LinearSNRVolatility()
        scale = math.sqrt(float(jax.nn.sigmoid(forward.gamma_min)))
    predictor = Predictor(
        data_size, width_size=width_size, depth=depth, delta=delta, key=pkey
    )
    return NFDM(
        forward, predictor, volatility, GaussianDecoder(scale), data_shape=(data_size,)
    )
