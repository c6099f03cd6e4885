"""The `nfdm` command line: train, sample, evaluate and plot runs from a TOML config.

This is the reporting layer of the package: the library itself prints nothing, and
everything a run shows on the terminal is written here. A run lives in one folder,

    <dir>/config.toml      the resolved configuration (rerunnable with --config)
    <dir>/config.json      the TrainConfig, as the Trainer writes it
    <dir>/metrics.jsonl    one record per chunk of training steps
    <dir>/checkpoints/     ckpt_<step>.eqx, the newest few
    <dir>/summary.json     held-out likelihoods and timings after `train`
    <dir>/evaluation.json  the same likelihoods, recomputed by `evaluate`
    <dir>/*.png            the figures

User errors (a bad config, an unknown data set, a wrong type) print one line
`nfdm: error: ...` and exit with status 2; failures of a valid command (a corrupt
checkpoint, an unreadable run folder) print one line and exit with status 1.
"""

import argparse
import dataclasses
import json
import math
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from matplotlib.figure import Figure

from . import plotting
from ._checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from ._constraints import (
    ConditionalCurvature,
    Disk,
    GenerativeCurvature,
    KineticEnergy,
    Obstacle,
    Penalties,
)
from ._data import load_array, load_digits, Standardiser, toy_dataset, TOY_DATASETS
from ._images import IMAGE_DATASETS, load_images
from ._likelihood import nelbo_estimate, ode_log_likelihood
from ._metrics import mmd
from ._model import NFDM
from ._progress import default_progress
from ._recipes import build_model, MODEL_KINDS
from ._solve import sample_ode, sample_sde
from ._trainer import (
    _to_host,
    initialise_distributed,
    TrainConfig,
    Trainer,
    TrainState,
)
from ._unet import build_image_model, IMAGE_MODEL_KINDS


class _UsageError(Exception):
    """A mistake in the command or its configuration: exit status 2."""


class _RunError(Exception):
    """A valid command that could not be carried out: exit status 1."""


# Keys whose value may be "none" (TOML has no null), mapped to Python's None.
_OPTIONAL = {
    ("train", "clip_norm"),
    ("train", "ema_decay"),
    ("train", "eval_every"),
    ("train", "checkpoint_every"),
}
_TRAIN_DEFAULTS = {
    field.name: field.default for field in dataclasses.fields(TrainConfig)
} | {"steps": 8000, "batch_size": 1024, "steps_per_call": 500, "ema_decay": 0.99}
DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {
        "name": "eight_gaussians",
        "path": "",
        "columns": [],
        "standardise": False,
        "eval_size": 2000,
    },
    "model": {
        "kind": "nfdm",
        # "mlp" for vector data; "unet" for images (see `_load_images`).
        "network": "mlp",
        "width_size": 64,
        "depth": 4,
        "delta": 0.01,
        "pin_prior": True,
        # The U-Net's options (see `UNet`), used with network = "unet" only.
        "channel_multipliers": [1, 2, 2],
        "num_res_blocks": 2,
        "attention_resolutions": [],
        "num_groups": 8,
        "num_heads": 1,
    },
    "train": _TRAIN_DEFAULTS,
    # Weights of the built-in penalties (0 turns one off); the obstacle is a disk.
    "penalties": {
        "curvature": 0.0,
        "conditional_curvature": 0.0,
        "kinetic": 0.0,
        "obstacle": 0.0,
        "obstacle_centre": [],
        "obstacle_radius": 1.0,
        "obstacle_margin": 0.0,
    },
    "eval": {"num_times": 128, "ode_size": 500, "sample_size": 4096, "sde_steps": 300},
    "run": {"dir": "runs/demo"},
}
_INTEGER_LISTS = {("model", "channel_multipliers"), ("model", "attention_resolutions")}
_NETWORKS = ("mlp", "unet")
_ARRAY_EXTENSIONS = (".npy", ".npz", ".csv", ".h5ad")
_PATHS = 16  # trajectories drawn in the 2D figure
_GRID = 64  # images in the sample grid of an image run
# Image sets without an official test split (the digits, folders) hold out this share
# of their images, always the same ones: the split's seed is fixed, not train.seed, so
# that runs of any seed and model are scored on the same images.
_HELD_OUT_FRACTION, _SPLIT_SEED = 0.2, 0


#
# Configuration: defaults, TOML files and --set overrides, checked key by key.
#


def _type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    return names.get(type(value), "a list")


def _check_value(section: str, key: str, value: Any) -> Any:
    default = DEFAULTS[section][key]
    optional = (section, key) in _OPTIONAL
    if optional and isinstance(value, str) and value.lower() == "none":
        return None
    if default is None:  # an optional key whose default is None: use its kind
        default = 1.0 if key == "clip_norm" else 1
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int | float):
        # Integers are accepted where a float is expected, never the other way.
        kinds = int if isinstance(default, int) else int | float
        ok = isinstance(value, kinds) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        extra = ' or "none"' if optional else ""
        raise _UsageError(
            f"`{section}.{key}` must be {_type_name(default)}{extra}, got {value!r}."
        )
    if isinstance(default, float):
        return float(value)
    if (section, key) == ("penalties", "obstacle_centre"):
        value = cast(list, value)  # its type was checked against the default
        if not all(
            isinstance(c, int | float) and not isinstance(c, bool) for c in value
        ):
            raise _UsageError(
                f"`penalties.obstacle_centre` must list coordinates, got {value!r}."
            )
        return [float(c) for c in value]
    if (section, key) in _INTEGER_LISTS:
        value = cast(list, value)
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in value):
            raise _UsageError(f"`{section}.{key}` must list integers, got {value!r}.")
        return value
    if isinstance(value, list) and not all(
        isinstance(c, str | int) and not isinstance(c, bool) for c in value
    ):
        raise _UsageError(
            f"`{section}.{key}` must list column names or indices, got {value!r}."
        )
    return value


def _set(config: dict[str, dict[str, Any]], section: str, key: str, value: Any):
    if section not in DEFAULTS:
        raise _UsageError(
            f"Unknown config section [{section}]; the sections are "
            f"{', '.join(DEFAULTS)}."
        )
    if key not in DEFAULTS[section]:
        raise _UsageError(
            f"Unknown key `{key}` in [{section}]; its keys are "
            f"{', '.join(DEFAULTS[section])}."
        )
    config[section][key] = _check_value(section, key, value)


def _parse_literal(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise _UsageError(f"No config file at {str(path)!r}.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise _UsageError(f"Cannot read the config file {str(path)!r}: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise _UsageError(f"{str(path)!r} is not valid TOML: {err}.") from None


def resolve_config(
    file: str | Path | None = None,
    overrides: Sequence[str] = (),
    shortcuts: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """The run configuration: the defaults, then `file`, then `--set` overrides, then
    the shortcut options (`{"train.steps": 100, ...}`), each checked as it is set."""
    config = {section: dict(values) for section, values in DEFAULTS.items()}
    if file is not None:
        for section, values in _read_toml(Path(file)).items():
            if not isinstance(values, dict):
                raise _UsageError(
                    f"`{section}` in {str(file)!r} must be a [section] of keys."
                )
            for key, value in values.items():
                _set(config, section, key, value)
    for item in overrides:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot:
            raise _UsageError(
                f"`--set {item}` must read section.key=value, e.g. train.steps=500."
            )
        _set(config, section, key, _parse_literal(text.strip()))
    for name, value in (shortcuts or {}).items():
        section, _, key = name.partition(".")
        _set(config, section, key, value)
    return config


def _toml_value(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def write_config(config: dict[str, dict[str, Any]], path: Path) -> None:
    """Writes a resolved configuration as TOML (flat sections of plain values)."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def _train_config(config: dict[str, dict[str, Any]]) -> TrainConfig:
    try:
        return TrainConfig(**config["train"])
    except (TypeError, ValueError) as err:
        raise _UsageError(f"[train] {err}") from None


#
# Data: a training sampler that runs inside the jitted scan, and held-out examples.
#


@dataclasses.dataclass
class _Data:
    sample_batch: Callable  # key -> batch of training examples, in model units
    held_out: np.ndarray  # eval_size examples, in the original units
    standardiser: Standardiser | None
    info: dict[str, Any]
    num_levels: int | None = None  # of image data, whose pixels lie on levels

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one example: `(dim,)`, or `(channels, height, width)`."""
        return tuple(int(n) for n in self.held_out.shape[1:])

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    @property
    def images(self) -> bool:
        return self.num_levels is not None

    def to_model(self, x) -> jax.Array:
        x = jnp.asarray(x)
        return x if self.standardiser is None else self.standardiser.transform(x)

    def to_data(self, z) -> np.ndarray:
        z = jnp.asarray(z)
        return np.asarray(
            z if self.standardiser is None else self.standardiser.inverse(z)
        )


def _float_dtype() -> np.dtype:
    # The models' parameters take JAX's default float dtype, so the data does too.
    return np.dtype(jnp.result_type(float))


def _is_image_run(config: dict[str, dict[str, Any]]) -> bool:
    network, name = config["model"]["network"], config["data"]["name"]
    if network not in _NETWORKS:
        raise _UsageError(
            f'`model.network` must be "mlp" (vector data) or "unet" (images), got '
            f"{network!r}."
        )
    if network == "mlp" and name in IMAGE_DATASETS and name != "digits":
        raise _UsageError(
            f'{name!r} is an image data set: set model.network = "unet" to train a '
            "U-Net on it."
        )
    return network == "unet"


def _load_data(config: dict[str, dict[str, Any]]) -> _Data:
    data, train = config["data"], config["train"]
    name, eval_size, seed = data["name"], data["eval_size"], train["seed"]
    batch_size, dtype = train["batch_size"], _float_dtype()
    images = _is_image_run(config)
    if eval_size < 1:
        raise _UsageError(f"`data.eval_size` must be positive, got {eval_size}.")
    if not images and not 0 < config["eval"]["ode_size"] <= eval_size:
        raise _UsageError(
            f"`eval.ode_size` must lie in [1, data.eval_size = {eval_size}], got "
            f"{config['eval']['ode_size']}."
        )
    for key in ("num_times", "sample_size", "sde_steps"):
        if config["eval"][key] < 1:
            raise _UsageError(f"`eval.{key}` must be positive.")
    if images:
        return _load_images(config)
    # The data keys are folded from the seed apart from the Trainer's own key.
    held_key, fit_key = jr.split(jr.fold_in(jr.key(seed), 1))

    if name in TOY_DATASETS:
        sampler = toy_dataset(name)
        held_out = np.asarray(sampler(held_key, eval_size, dtype=dtype))
        standardiser = (
            Standardiser.fit(sampler(fit_key, 10_000, dtype=dtype))
            if data["standardise"]
            else None
        )

        def sample_toy(key):
            x = sampler(key, batch_size, dtype=dtype)
            return x if standardiser is None else standardiser.transform(x)

        info = {"name": name, "kind": "toy", "dim": 2}
        return _Data(sample_toy, held_out, standardiser, info)

    if name == "digits":
        array = load_digits(dtype=dtype)
    elif name == "file":
        if not data["path"]:
            raise _UsageError('`data.name = "file"` needs `data.path`.')
        try:
            array = load_array(
                data["path"], columns=data["columns"] or None, dtype=dtype
            )
        except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
            raise _UsageError(str(err)) from None
    else:
        raise _UsageError(
            f"Unknown data set {name!r}; choose one of {', '.join(TOY_DATASETS)}, "
            '"digits", or "file" with `data.path`.'
        )
    n = array.shape[0]
    if eval_size >= n:
        raise _UsageError(
            f"`data.eval_size` ({eval_size}) must be below the number of examples "
            f"({n}), so that some are left to train on."
        )
    order = np.random.default_rng(seed).permutation(n)
    held_out, train_x = array[order[:eval_size]], array[order[eval_size:]]
    standardiser = Standardiser.fit(train_x) if data["standardise"] else None
    on_device = jnp.asarray(
        train_x if standardiser is None else standardiser.transform(train_x)
    )

    def sample_rows(key):
        return on_device[jr.randint(key, (batch_size,), 0, on_device.shape[0])]

    info = {
        "name": name,
        "kind": "array",
        "path": data["path"],
        "dim": int(array.shape[1]),
        "train_size": int(train_x.shape[0]),
        "eval_size": eval_size,
    }
    return _Data(sample_rows, held_out, standardiser, info)


def _load_images(config: dict[str, dict[str, Any]]) -> _Data:
    """Image data for a U-Net: the pixels on their levels in [-1, 1], never
    standardised (the discretised decoder needs them there)."""
    data, batch_size = config["data"], config["train"]["batch_size"]
    name, root = data["name"], data["path"] or None
    if name not in IMAGE_DATASETS:
        raise _UsageError(
            f'`model.network = "unet"` trains on images; choose data.name among '
            f"{', '.join(map(repr, IMAGE_DATASETS))}, got {name!r}."
        )
    if data["standardise"]:
        raise _UsageError(
            "`data.standardise` must be false for images: the discretised decoder "
            "needs the pixels on their levels in [-1, 1]."
        )
    if name == "digits" and root is not None:
        raise _UsageError(
            "The digits ship with scikit-learn and take no `data.path`; leave it empty."
        )
    if name == "folder" and root is None:
        raise _UsageError(
            '`data.name = "folder"` needs `data.path`, the folder of the .png files.'
        )
    try:
        if name == "cifar10":
            train_set = load_images(
                name, root=root, split="train", dtype=_float_dtype()
            )
            held_out_set = load_images(
                name, root=root, split="test", dtype=_float_dtype()
            )
            held_out_from = "the official CIFAR-10 test split"
        else:
            full = load_images(name, root=root, dtype=_float_dtype())
            train_set, held_out_set = full.split(_HELD_OUT_FRACTION, seed=_SPLIT_SEED)
            held_out_from = (
                f"a fixed random {_HELD_OUT_FRACTION:.0%} of the set (seed "
                f"{_SPLIT_SEED}, whatever train.seed): {name} has no official split"
            )
    except (ValueError, TypeError, OSError, ImportError) as err:
        raise _UsageError(str(err)) from None
    held_out = held_out_set.images[: data["eval_size"]]
    on_device = jnp.asarray(train_set.images)

    def sample_images(key):
        return on_device[jr.randint(key, (batch_size,), 0, on_device.shape[0])]

    info = {
        "name": name,
        "kind": "images",
        "path": data["path"],
        "shape": list(train_set.data_shape),
        "num_levels": train_set.num_levels,
        "train_size": int(train_set.images.shape[0]),
        "eval_size": int(held_out.shape[0]),
        "held_out": f"the first {held_out.shape[0]} of the "
        f"{held_out_set.images.shape[0]} images of {held_out_from}",
    }
    return _Data(sample_images, held_out, None, info, train_set.num_levels)


#
# Model and run folder.
#


def _build(config: dict[str, dict[str, Any]], data: _Data) -> NFDM:
    model = config["model"]
    if data.images:
        return _build_image_model(config, data)
    if model["kind"] not in MODEL_KINDS:
        raise _UsageError(
            f"Unknown model kind {model['kind']!r}; choose one of "
            f"{', '.join(MODEL_KINDS)}."
        )
    for key in ("width_size", "depth"):
        if model[key] < 1:
            raise _UsageError(f"`model.{key}` must be positive, got {model[key]}.")
    if not model["delta"] > 0:
        raise _UsageError(f"`model.delta` must be positive, got {model['delta']}.")
    try:
        return build_model(
            model["kind"],
            data.dim,
            key=jr.key(config["train"]["seed"]),
            width_size=model["width_size"],
            depth=model["depth"],
            delta=model["delta"],
            pin_prior=model["pin_prior"],
        )
    except (TypeError, ValueError) as err:
        raise _UsageError(str(err)) from None


def _build_image_model(config: dict[str, dict[str, Any]], data: _Data) -> NFDM:
    model, num_levels = config["model"], cast(int, data.num_levels)
    if model["kind"] not in IMAGE_MODEL_KINDS:
        raise _UsageError(
            f"Unknown image model kind {model['kind']!r}; with a U-Net choose one of "
            f"{', '.join(IMAGE_MODEL_KINDS)}."
        )
    # Half the spacing of the levels on [-1, 1]: a noise floor beyond it moves z_0
    # out of the bin of x and the reconstruction term swamps the bound.
    half_spacing = 1 / (num_levels - 1)
    if not 0 < model["delta"] < half_spacing:
        raise _UsageError(
            f"`model.delta` must lie in (0, {half_spacing:.4g}), below half the "
            f"spacing of the {num_levels} levels of these images, got "
            f"{model['delta']}; 0.001 suits 8-bit images, 0.035 the digits."
        )
    try:
        return build_image_model(
            data.shape,
            key=jr.key(config["train"]["seed"]),
            kind=model["kind"],
            num_levels=num_levels,
            width_size=model["width_size"],
            channel_multipliers=model["channel_multipliers"],
            num_res_blocks=model["num_res_blocks"],
            attention_resolutions=model["attention_resolutions"],
            num_groups=model["num_groups"],
            num_heads=model["num_heads"],
            delta=model["delta"],
            pin_prior=model["pin_prior"],
        )
    except (TypeError, ValueError) as err:
        raise _UsageError(str(err)) from None


def _penalties(config: dict[str, dict[str, Any]], data: _Data) -> Penalties | None:
    """The training penalties named in [penalties], or None when all are off."""
    section = config["penalties"]
    terms: dict[str, Any] = {}
    for name, penalty in (
        ("curvature", GenerativeCurvature()),
        ("conditional_curvature", ConditionalCurvature()),
        ("kinetic", KineticEnergy()),
    ):
        if section[name] < 0:
            raise _UsageError(f"`penalties.{name}` must be >= 0, got {section[name]}.")
        if section[name] > 0:
            terms[name] = (section[name], penalty)
    if section["obstacle"] > 0:
        if data.images:
            raise _UsageError(
                "`penalties.obstacle` needs vector data (its disk lives in the data "
                "space); for images use the curvature or kinetic penalties."
            )
        centre, dim = section["obstacle_centre"], data.dim
        if len(centre) != dim:
            raise _UsageError(
                f"`penalties.obstacle_centre` must give {dim} coordinates for this "
                f"data, got {centre!r}."
            )
        try:
            disk = Disk(centre, section["obstacle_radius"])
            obstacle = Obstacle(disk, margin=section["obstacle_margin"])
        except ValueError as err:
            raise _UsageError(str(err)) from None
        terms["obstacle"] = (section["obstacle"], obstacle)
    return Penalties(**terms) if terms else None


@dataclasses.dataclass
class _Run:
    dir: Path
    config: dict[str, dict[str, Any]]
    data: _Data
    trainer: Trainer
    state: TrainState

    @property
    def model(self) -> NFDM:
        model = self.state.ema if self.state.ema is not None else self.state.model
        return cast(NFDM, model)  # the command line builds only NFDM models


def _open_run(run_dir: str) -> _Run:
    """Rebuilds a finished run from its config.toml and newest checkpoint."""
    path = Path(run_dir)
    if not (path / "config.toml").is_file():
        raise _RunError(
            f"{run_dir!r} holds no config.toml; is it an `nfdm` run folder?"
        )
    try:
        config = resolve_config(path / "config.toml")
    except _UsageError as err:
        raise _RunError(f"{run_dir}/config.toml is unusable: {err}") from None
    data = _load_data(config)
    trainer = Trainer(_train_config(config), run_dir=path)
    like = trainer.init(_build(config, data))
    state, header = load_checkpoint(path / "checkpoints", like)
    saved = header["metadata"].get("standardiser")
    if saved is not None:
        data.standardiser = Standardiser(
            np.asarray(saved["mean"], _float_dtype()),
            np.asarray(saved["scale"], _float_dtype()),
        )
    return _Run(path, config, data, trainer, state)


#
# Evaluation, sampling and figures.
#


def evaluate_run(run: _Run, key) -> dict[str, float]:
    """Held-out NELBO (stratified times) and ODE NLL, in nats and bits/dim, in the
    units of the original data (the standardisation's log-Jacobian is added back).

    For images the NELBO alone, with the mean of each of its terms: with the
    discretised decoder it bounds the discrete likelihood of the pixels."""
    nelbo_key, ode_key = jr.split(key)
    xs = run.data.to_model(run.data.held_out)
    nelbo = nelbo_estimate(
        run.model, xs, key=nelbo_key, num_times=run.config["eval"]["num_times"]
    )
    estimates = [("nelbo", nelbo)]
    # TODO: no ODE likelihood for images. The exact trace takes one JVP of the drift
    # per pixel at every solver step, far too slow through a U-Net; a Hutchinson
    # estimate (`trace="hutchinson"`) would lift this at the cost of its variance.
    if not run.data.images:
        ode = ode_log_likelihood(
            run.model, xs[: run.config["eval"]["ode_size"]], key=ode_key
        )
        estimates.append(("ode_nll", ode))
    std = run.data.standardiser
    shift = 0.0 if std is None else float(jnp.sum(jnp.log(std.scale)))
    per_bit = run.data.dim * math.log(2)
    out = {}
    for name, estimate in estimates:
        nats = float(estimate.nats) + shift
        out[f"{name}_nats"] = nats
        out[f"{name}_nats_stderr"] = float(estimate.nats_stderr)
        out[f"{name}_bits_per_dim"] = nats / per_bit
        out[f"{name}_bits_per_dim_stderr"] = float(estimate.nats_stderr) / per_bit
    if run.data.images and nelbo.terms is not None:
        for term in ("diffusion", "prior", "reconstruction"):
            out[f"nelbo_{term}_nats"] = float(getattr(nelbo.terms, term))
    return out


def _digits_grid(samples: np.ndarray, path: Path, title: str) -> Path:
    # The digits are 8 x 8 images with pixels in [-1, 1] (see `load_digits`).
    images = np.clip(samples[:64].reshape(-1, 8, 8), -1, 1)
    fig = Figure(figsize=(6, 6))
    axes = np.atleast_1d(fig.subplots(8, 8)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, image in zip(axes, images, strict=False):
        ax.imshow(image, cmap="gray_r", vmin=-1, vmax=1)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def draw_figures(run: _Run, key) -> dict[str, str]:
    """The loss curve from metrics.jsonl; for 2D data samples beside the data and
    reverse-SDE trajectories; for digits a grid of samples."""
    kind, figures = run.config["model"]["kind"], {}
    records = [r for r in _read_metrics(run.dir) if "step" in r]
    curves = {
        name: ([float(r["step"]) for r in records], [r[name] for r in records])
        for name in ("nelbo", "diffusion")
        if records and all(name in r for r in records)
    }
    if curves:
        figures["loss"] = plotting.plot_curves(
            curves, run.dir / "loss.png", title=f"{kind}: training loss per chunk"
        )
    evaluated = [r for r in records if "eval/nelbo_nats" in r]
    if evaluated:
        figures["likelihood"] = plotting.plot_curves(
            {
                "held-out NELBO": (
                    [float(r["step"]) for r in evaluated],
                    [r["eval/nelbo_nats"] for r in evaluated],
                )
            },
            run.dir / "likelihood.png",
            ylabel="nats",
            title=f"{kind}: held-out NELBO during training",
        )
    steps = run.config["eval"]["sde_steps"]
    if run.data.images:
        # The decoder's point estimates: the levels the model generates.
        solution = sample_sde(run.model, _GRID, key=key, num_steps=steps)
        samples = np.array(jax.vmap(run.model.decoder.sample)(solution.samples))
        # An undertrained model can send some samples to infinity: those are drawn
        # blank and counted in the title.
        finite = np.isfinite(np.asarray(solution.samples)).reshape(_GRID, -1).all(1)
        samples[~finite] = np.nan
        dropped = (
            f" ({int(np.sum(~finite))} non-finite, blank)" if not finite.all() else ""
        )
        name = run.data.info["name"]
        figures["samples"] = plotting.plot_images(
            {f"{steps} Euler-Maruyama steps": samples},
            run.dir / "samples.png",
            title=f"{kind} on {name}: SDE samples{dropped}",
            grey_cmap="gray_r" if name == "digits" else "gray",
        )
    elif run.data.dim == 2:
        solution = sample_sde(
            run.model,
            run.config["eval"]["sample_size"],
            key=key,
            num_steps=steps,
            num_saves=61,
        )
        assert solution.trajectories is not None
        # An undertrained model can send some paths to infinity; those are left out of
        # the figures (and counted in their titles) rather than breaking the axes.
        samples = run.data.to_data(solution.samples)
        paths = run.data.to_data(solution.trajectories)
        finite = np.all(np.isfinite(paths), axis=(1, 2))
        dropped = (
            f" ({int(np.sum(~finite))} non-finite left out)" if not finite.all() else ""
        )
        if finite.any():
            figures["samples"] = plotting.plot_samples_2d(
                run.data.held_out,
                {f"SDE ({steps} Euler-Maruyama steps)": samples[finite]},
                run.dir / "samples.png",
                title=f"{kind}: held-out data and samples{dropped}",
            )
            figures["trajectories"] = plotting.plot_trajectories_2d(
                {"reverse SDE z1 -> x": paths[finite][:_PATHS]},
                run.dir / "trajectories.png",
                title=f"{kind}: trajectories{dropped}",
            )
    elif run.data.info["name"] == "digits":
        solution = sample_sde(run.model, 64, key=key, num_steps=steps)
        figures["samples"] = _digits_grid(
            run.data.to_data(solution.samples),
            run.dir / "samples.png",
            f"{kind}: SDE samples",
        )
    return {name: str(path) for name, path in figures.items()}


#
# Commands.
#


def _write(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _shortcuts(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    if args.steps is not None:
        out["train.steps"] = args.steps
    if args.seed is not None:
        out["train.seed"] = args.seed
    if args.out is not None:
        out["run.dir"] = args.out
    if args.model is not None:
        out["model.kind"] = args.model
    if args.data is not None:
        if args.data.lower().endswith(_ARRAY_EXTENSIONS):
            out["data.name"], out["data.path"] = "file", args.data
        else:
            out["data.name"] = args.data
    return out


def cmd_train(args: argparse.Namespace) -> int:
    if args.num_processes > 1:
        # Before any other JAX work: join the other processes of a multi-host run.
        try:
            initialise_distributed(
                args.coordinator or "", args.num_processes, args.process_id
            )
        except ValueError as err:
            raise _UsageError(str(err)) from err
    main_process = jax.process_index() == 0
    config = resolve_config(args.config, args.set, _shortcuts(args))
    train_config = _train_config(config)
    run_dir = Path(config["run"]["dir"])
    data = _load_data(config)
    model = _build(config, data)
    found = list_checkpoints(run_dir / "checkpoints") if run_dir.is_dir() else []
    if found and not args.resume:
        raise _UsageError(
            f"{run_dir} already holds checkpoints; pass --resume to continue that run, "
            "or choose another folder with --out."
        )
    std = data.standardiser
    metadata = {
        "data": data.info,
        "model": config["model"],
        "standardiser": None
        if std is None
        else {
            "mean": np.asarray(std.mean).tolist(),
            "scale": np.asarray(std.scale).tolist(),
        },
    }
    trainer = Trainer(
        train_config,
        run_dir=run_dir,
        progress=default_progress(),
        metadata=metadata,
        penalties=_penalties(config, data),
    )
    state = trainer.init(model)
    if found:
        state = trainer.restore(state)
        if int(state.step) > train_config.steps:
            raise _UsageError(
                f"The newest checkpoint is at step {int(state.step)}, beyond "
                f"train.steps = {train_config.steps}; raise train.steps to resume."
            )
    elif main_process and (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()  # left by a run that saved no checkpoint
    if main_process:
        write_config(config, run_dir / "config.toml")

    eval_key, sample_key, hook_key = jr.split(
        jr.fold_in(jr.key(train_config.seed), 2), 3
    )
    held_out = data.to_model(data.held_out[:512])

    def hook(model, step):
        estimate = nelbo_estimate(
            model, held_out, key=hook_key, num_times=config["eval"]["num_times"]
        )
        if data.images:
            # An MMD on raw pixels says little about images; the bound alone.
            return {"nelbo_nats": float(estimate.nats)}
        # A sample metric too: MMD between SDE samples and the held-out points.
        samples = sample_sde(model, held_out.shape[0], key=hook_key).samples
        return {
            "nelbo_nats": float(estimate.nats),
            "sample_mmd": float(mmd(samples, held_out)),
        }

    start_step, t0 = int(state.step), time.perf_counter()
    # With several processes the model is sharded across them during training; the
    # held-out evaluation hook runs only in single-process runs.
    single = jax.process_count() == 1
    state, _ = trainer.fit(state, data.sample_batch, evaluate=hook if single else None)
    train_seconds = time.perf_counter() - t0
    if not main_process:
        return 0
    # Evaluation, sampling and figures run on the first process's own devices.
    state = _to_host(state)
    run = _Run(run_dir, config, data, trainer, state)
    results = evaluate_run(run, eval_key)
    figures = draw_figures(run, sample_key)
    summary = {
        "model": config["model"]["kind"],
        "data": data.info,
        "steps": train_config.steps,
        "steps_this_call": train_config.steps - start_step,
        "train_seconds": train_seconds,
        **results,
        "figures": figures,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    s = summary
    _write(
        f"{s['model']} on {data.info['name']}: {s['steps']} steps "
        f"({s['steps_this_call']} now, {train_seconds:.1f} s)"
    )
    _write(
        f"held-out NELBO {s['nelbo_nats']:.3f} ± {s['nelbo_nats_stderr']:.3f} nats "
        f"({s['nelbo_bits_per_dim']:.3f} bits/dim)"
    )
    if "ode_nll_nats" in s:
        _write(
            f"ODE NLL {s['ode_nll_nats']:.3f} ± {s['ode_nll_nats_stderr']:.3f} nats "
            f"({s['ode_nll_bits_per_dim']:.3f} bits/dim)"
        )
    _write(f"run folder: {run_dir}")
    _write("figures: " + (", ".join(figures.values()) or "none for this data"))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    if args.num < 1 or args.steps < 1:
        raise _UsageError("--num and --steps must be positive.")
    run = _open_run(args.run_dir)
    key = jr.fold_in(jr.key(args.seed), 3)
    if args.ode:
        solution = sample_ode(
            run.model, args.num, key=key, solver="euler", num_steps=args.steps
        )
    else:
        solution = sample_sde(run.model, args.num, key=key, num_steps=args.steps)
    out = Path(args.out) if args.out else run.dir / "samples.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    samples = solution.samples
    if run.data.images:
        samples = jax.vmap(run.model.decoder.sample)(samples)  # onto the levels
    np.save(out, run.data.to_data(samples))
    _write(f"wrote {args.num} {'ODE' if args.ode else 'SDE'} samples to {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    run = _open_run(args.run_dir)
    results = {"step": int(run.state.step), **evaluate_run(run, jr.key(args.seed))}
    text = json.dumps(results, indent=2)
    (run.dir / "evaluation.json").write_text(text)
    _write(text)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    run = _open_run(args.run_dir)
    figures = draw_figures(run, jr.key(args.seed))
    _write("figures: " + (", ".join(figures.values()) or "none for this data"))
    return 0


#
# Argument parsing and the entry point.
#


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise _UsageError(message)


_TRAIN_HELP = """Train a model, then evaluate it, sample it and draw figures.

Writes to the run folder (run.dir, default runs/demo): config.toml (the resolved
config), config.json, metrics.jsonl, checkpoints/ckpt_<step>.eqx, summary.json
(held-out NELBO and ODE NLL in nats and bits/dim) and PNG figures (loss.png; for 2D
data samples.png and trajectories.png; for digits and images a samples.png grid).

Images: set model.network = "unet" and data.name to "digits" (8 x 8, 17 levels),
"cifar10" (data.path: the cifar-10-batches-py folder; held out: the test split) or
"folder" (data.path: a folder of PNG files). The digits and folders have no official
split: a fixed random 20 % (the same for every seed) is held out. summary.json then
holds the NELBO alone (bits/dim bounding the discrete likelihood), no ODE NLL.

Config sections and keys (defaults in brackets):
  [data]  name (eight_gaussians; a toy set, "digits" or "file"; with a U-Net
          "digits", "cifar10" or "folder"), path, columns, standardise (false),
          eval_size (2000; for images the most held-out images to evaluate)
  [model] kind (nfdm; nfdm/flow/fmot/vdm, with a U-Net nfdm/vdm/fmot),
          network (mlp; "unet" for images), width_size (64), depth (4; MLPs),
          delta (0.01; for images below half the level spacing: 0.001 for
          8-bit images, 0.035 for the digits),
          pin_prior (true); U-Net only: channel_multipliers ([1, 2, 2]),
          num_res_blocks (2), attention_resolutions ([]), num_groups (8),
          num_heads (1)
  [train] every TrainConfig field: steps (8000), batch_size (1024),
          learning_rate (1e-3), steps_per_call (500), ema_decay (0.99), seed (0), ...
          ("none" turns clip_norm, ema_decay, eval_every, checkpoint_every off)
  [eval]  num_times (128), ode_size (500), sample_size (4096), sde_steps (300)
  [run]   dir (runs/demo)
"""


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a TOML config file (see above)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one key; the value is a TOML literal (repeatable)",
    )
    parser.add_argument("--steps", type=int, help="shortcut for train.steps")
    parser.add_argument("--seed", type=int, help="shortcut for train.seed")
    parser.add_argument("--out", help="shortcut for run.dir, the run folder")
    parser.add_argument(
        "--data", help="shortcut for data.name (a .csv/.npy/.npz/.h5ad path: a file)"
    )
    parser.add_argument("--model", help="shortcut for model.kind")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint of the run folder",
    )
    parser.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="multi-host training: the address of process 0 (with --num-processes)",
    )
    parser.add_argument(
        "--num-processes",
        type=int,
        default=1,
        help="multi-host training: how many processes run this same command",
    )
    parser.add_argument(
        "--process-id",
        type=int,
        default=0,
        help="multi-host training: this process's index, 0 to num-processes - 1",
    )


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="nfdm",
        description="Neural flow diffusion models: train, sample, evaluate and plot "
        "runs. Without a command, runs `demo`.",
        formatter_class=fmt,
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name, summary in (
        ("train", "train, evaluate, sample and plot a run from a config"),
        ("demo", "`train` with the built-in defaults (8 Gaussians, nfdm, runs/demo)"),
    ):
        p = sub.add_parser(
            name, help=summary, description=_TRAIN_HELP, formatter_class=fmt
        )
        _add_run_options(p)
        p.set_defaults(handler=cmd_train)
    p = sub.add_parser(
        "sample",
        help="draw samples from a trained run",
        description="Rebuild the model from RUN_DIR/config.toml and its newest "
        "checkpoint (the EMA model), sample it, undo the standardisation and save a "
        ".npy array of shape (num, features) (default RUN_DIR/samples.npy); for "
        "images, shape (num, channels, height, width) on the pixel levels.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--num", type=int, default=1000, help="number of samples (1000)")
    p.add_argument("--ode", action="store_true", help="the ODE (Euler) instead of SDE")
    p.add_argument("--steps", type=int, default=300, help="solver steps (300)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument("--out", metavar="FILE.npy", help="where to save the samples")
    p.set_defaults(handler=cmd_sample)
    p = sub.add_parser(
        "evaluate",
        help="recompute held-out likelihoods of a run",
        description="Recompute the held-out NELBO and ODE NLL (nats and bits/dim; for "
        "images the NELBO alone) of RUN_DIR's newest checkpoint; print them as JSON "
        "and write RUN_DIR/evaluation.json.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (0)")
    p.set_defaults(handler=cmd_evaluate)
    p = sub.add_parser(
        "plot",
        help="redraw the figures of a run",
        description="Redraw RUN_DIR's figures (loss.png from metrics.jsonl; "
        "samples.png and trajectories.png from the newest checkpoint) in RUN_DIR.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.set_defaults(handler=cmd_plot)
    return parser


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Runs the `nfdm` command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["demo", *argv]
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as exit_:  # --help
            return exit_.code if isinstance(exit_.code, int) else 0
        return args.handler(args)
    except _UsageError as err:
        sys.stderr.write(f"nfdm: error: {_one_line(err)}\n")
        return 2
    except (_RunError, CheckpointError, OSError, ValueError) as err:
        sys.stderr.write(f"nfdm: error: {_one_line(err)}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
