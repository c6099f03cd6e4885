"""nfdm_sciml: neural flow diffusion models with learnable forward processes."""

import importlib.metadata

from . import plotting as plotting, testing as testing
from ._bridge import (
    GaussianBridge as GaussianBridge,
    NeuralFlowBridge as NeuralFlowBridge,
)
from ._checkpoint import (
    CheckpointError as CheckpointError,
    list_checkpoints as list_checkpoints,
    load_checkpoint as load_checkpoint,
    save_checkpoint as save_checkpoint,
)
from ._constraints import (
    AbstractPenalty as AbstractPenalty,
    AbstractShape as AbstractShape,
    Box as Box,
    ConditionalCurvature as ConditionalCurvature,
    Disk as Disk,
    FunctionPenalty as FunctionPenalty,
    GenerativeCurvature as GenerativeCurvature,
    KineticEnergy as KineticEnergy,
    Obstacle as Obstacle,
    path_straightness as path_straightness,
    PathPoint as PathPoint,
    Penalties as Penalties,
    SignedDistance as SignedDistance,
    StayInside as StayInside,
    TimeWeighted as TimeWeighted,
    Union as Union,
    violation_fraction as violation_fraction,
)
from ._couplings import (
    AbstractCoupling as AbstractCoupling,
    ExactOTCoupling as ExactOTCoupling,
    IndependentCoupling as IndependentCoupling,
    SinkhornCoupling as SinkhornCoupling,
    UnbalancedCoupling as UnbalancedCoupling,
)
from ._data import (
    checkerboard as checkerboard,
    eight_gaussians as eight_gaussians,
    eight_gaussians_log_prob as eight_gaussians_log_prob,
    load_array as load_array,
    load_digits as load_digits,
    moons as moons,
    pinwheel as pinwheel,
    rings as rings,
    spirals as spirals,
    Standardiser as Standardiser,
    swiss_roll as swiss_roll,
    toy_dataset as toy_dataset,
    TOY_DATASETS as TOY_DATASETS,
)
from ._decoder import (
    AbstractDecoder as AbstractDecoder,
    DiscretisedGaussianDecoder as DiscretisedGaussianDecoder,
    GaussianDecoder as GaussianDecoder,
)
from ._flow import NeuralFlowProcess as NeuralFlowProcess
from ._flow_matching import FlowMatching as FlowMatching
from ._forward import (
    AbstractFlowProcess as AbstractFlowProcess,
    AbstractForwardProcess as AbstractForwardProcess,
    AbstractGaussianProcess as AbstractGaussianProcess,
    LinearInterpolant as LinearInterpolant,
    NFDMGaussian as NFDMGaussian,
    VariancePreserving as VariancePreserving,
)
from ._images import (
    bits_per_dim as bits_per_dim,
    IMAGE_DATASETS as IMAGE_DATASETS,
    ImageDataset as ImageDataset,
    load_cifar10 as load_cifar10,
    load_digits_images as load_digits_images,
    load_image_folder as load_image_folder,
    load_images as load_images,
)
from ._latent_sde import (
    AbstractDiffusion as AbstractDiffusion,
    DiagonalDiffusion as DiagonalDiffusion,
    forecast_error as forecast_error,
    GaussianObservation as GaussianObservation,
    LatentSDE as LatentSDE,
    LatentSolution as LatentSolution,
    matched_drift as matched_drift,
    PriorSDE as PriorSDE,
    SeriesEncoder as SeriesEncoder,
    SolverLatentSDE as SolverLatentSDE,
)
from ._likelihood import (
    LikelihoodEstimate as LikelihoodEstimate,
    nelbo_estimate as nelbo_estimate,
    ode_log_likelihood as ode_log_likelihood,
)
from ._metrics import mmd as mmd, wasserstein as wasserstein
from ._model import LossTerms as LossTerms, NFDM as NFDM
from ._nets import TimeMLP as TimeMLP
from ._predictor import (
    AbstractPredictor as AbstractPredictor,
    FunctionPredictor as FunctionPredictor,
    Predictor as Predictor,
)
from ._progress import (
    AbstractProgress as AbstractProgress,
    BarProgress as BarProgress,
    default_progress as default_progress,
    NoProgress as NoProgress,
    TextProgress as TextProgress,
)
from ._recipes import build_model as build_model, MODEL_KINDS as MODEL_KINDS
from ._series import energy_distance as energy_distance, TimeSeries as TimeSeries
from ._series_data import (
    load_basic_motions as load_basic_motions,
    series_dataset as series_dataset,
    SERIES_DATASETS as SERIES_DATASETS,
    stochastic_lorenz as stochastic_lorenz,
    stochastic_van_der_pol as stochastic_van_der_pol,
)
from ._solve import (
    ReverseSolution as ReverseSolution,
    sample_ode as sample_ode,
    sample_sde as sample_sde,
)
from ._timecourse import (
    Snapshots as Snapshots,
    TimeCourseFlowMatching as TimeCourseFlowMatching,
    TimeCourseNFDM as TimeCourseNFDM,
    TimeCourseSolution as TimeCourseSolution,
)
from ._timecourse_data import (
    double_well as double_well,
    noisy_lorenz as noisy_lorenz,
    oscillator as oscillator,
    TIME_COURSES as TIME_COURSES,
)
from ._timecourse_eval import (
    default_time_course_config as default_time_course_config,
    fit_time_course as fit_time_course,
    FittedTimeCourse as FittedTimeCourse,
    held_out_floor as held_out_floor,
    leave_one_out as leave_one_out,
    LeaveOneOutResult as LeaveOneOutResult,
    model_method as model_method,
    ot_interpolation as ot_interpolation,
)
from ._train import make_train_step as make_train_step, run_steps as run_steps
from ._trainer import (
    initialise_distributed as initialise_distributed,
    TrainConfig as TrainConfig,
    Trainer as Trainer,
    TrainState as TrainState,
)
from ._unet import (
    build_image_model as build_image_model,
    IMAGE_MODEL_KINDS as IMAGE_MODEL_KINDS,
    ImageNFDMGaussian as ImageNFDMGaussian,
    ImagePredictor as ImagePredictor,
    UNet as UNet,
)
from ._volatility import (
    AbstractVolatility as AbstractVolatility,
    ConstantVolatility as ConstantVolatility,
    LinearSNRVolatility as LinearSNRVolatility,
    NeuralVolatility as NeuralVolatility,
)


__version__ = importlib.metadata.version("nfdm_sciml")
