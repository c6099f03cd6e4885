r"""Image data sets read from local files, and bits per dimension.

Every loader returns an [`nfdm_sciml.ImageDataset`][]: images of shape
`(n, channels, height, width)` whose pixels, integer levels $k = 0, \dots, L - 1$, are
mapped to the bin centres $-1 + 2k/(L - 1)$ in $[-1, 1]$, the representation that
[`nfdm_sciml.DiscretisedGaussianDecoder`][] with `num_bins=L` expects (for 8-bit
pixels, `k / 127.5 - 1`). Nothing is downloaded: the digits ship with scikit-learn,
and CIFAR-10 and image folders are read from disk.
"""

import codecs
import dataclasses
import importlib
import math
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int
from numpy.typing import DTypeLike

from ._decoder import DiscretisedGaussianDecoder


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Images on discrete levels, scaled to the bin centres of $[-1, 1]$.

    - `images`: shape `(n, channels, height, width)`; the value of level $k$ out of
        `num_levels` is $-1 + 2k/(\\text{num\\_levels} - 1)$.
    - `num_levels`: the number of levels per pixel (256 for 8-bit images).
    - `labels`: the integer class of each image, where the data set has them.
    - `name`: where the images came from, for messages and reports.

    Train on `images` (as a float array), bound the likelihood with `decoder()`, and
    report `bits_per_dim(nelbo, dataset.num_dims)`.
    """

    images: Float[np.ndarray, "n channels height width"]
    num_levels: int
    labels: Int[np.ndarray, " n"] | None = None
    name: str = ""

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.shape[0] == 0:
            raise ValueError(
                "`ImageDataset` needs images of shape (n, channels, height, width) "
                f"with n >= 1, got shape {self.images.shape}."
            )
        if self.num_levels < 2:
            raise ValueError(
                f"`ImageDataset` needs num_levels >= 2, got {self.num_levels}."
            )
        if self.labels is not None and self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"`ImageDataset` has {self.images.shape[0]} images but labels of shape "
                f"{self.labels.shape}; give one label per image."
            )

    @property
    def data_shape(self) -> tuple[int, int, int]:
        """`(channels, height, width)` of one image."""
        channels, height, width = self.images.shape[1:]
        return channels, height, width

    @property
    def num_dims(self) -> int:
        """Entries of one image, the $D$ of bits per dimension."""
        return math.prod(self.images.shape[1:])

    def decoder(self, scale: float = 1e-3) -> DiscretisedGaussianDecoder:
        """**Returns:** the [`nfdm_sciml.DiscretisedGaussianDecoder`][] over this data
        set's levels, of the given `scale` (the forward process's $\\delta$)."""
        return DiscretisedGaussianDecoder(self.num_levels, scale=scale)

    def split(
        self, held_out_fraction: float = 0.2, *, seed: int = 0
    ) -> tuple["ImageDataset", "ImageDataset"]:
        """Holds out a random part of the images, for data sets without an official
        test split (the digits, image folders).

        The images are permuted by `numpy.random.default_rng(seed)` and the first
        `round(held_out_fraction * n)` of the permutation are held out, so the same
        data and seed give the same split on every machine. Both parts keep
        `num_levels`, `name` and their share of the labels.

        **Arguments:**

        - `held_out_fraction`: the share of the images to hold out, in (0, 1).
        - `seed`: the seed of the permutation. Keep it fixed across the runs you
            compare, so that they are scored on the same images.

        **Returns:** `(train, held_out)`, two [`nfdm_sciml.ImageDataset`][]s.
        """
        n = self.images.shape[0]
        num_held_out = round(held_out_fraction * n) if 0 < held_out_fraction < 1 else 0
        if not 0 < num_held_out < n:
            raise ValueError(
                f"`split` needs a `held_out_fraction` in (0, 1) that leaves images on "
                f"both sides; got {held_out_fraction!r} for {n} images."
            )
        order = np.random.default_rng(seed).permutation(n)

        def part(indices):
            labels = None if self.labels is None else self.labels[indices]
            return ImageDataset(
                self.images[indices], self.num_levels, labels, self.name
            )

        return part(order[num_held_out:]), part(order[:num_held_out])


def bits_per_dim(
    nats: Float[ArrayLike, "*batch"], num_dims: int
) -> Float[Array, "*batch"]:
    r"""Converts a negative log-likelihood (or a NELBO) in nats per example to bits per
    dimension, $\text{nats} / (D \ln 2)$.

    For data on discrete levels with a discretised decoder the result bounds the
    discrete likelihood and needs no dequantisation offset. A uniform distribution
    over $L$ levels per pixel has $\log_2 L$ bits/dim (8 for 8-bit images).

    **Arguments:**

    - `nats`: the value per example, a scalar or an array of them.
    - `num_dims`: $D$, the number of entries of one example (e.g.
        `ImageDataset.num_dims`, 3072 for CIFAR-10).

    **Returns:** bits per dimension, with the shape of `nats`.
    """
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims <= 0:
        raise ValueError(
            f"`num_dims` must be a positive integer (the entries of one example), got "
            f"{num_dims!r}."
        )
    return jnp.asarray(nats) / (num_dims * math.log(2))


def _check_float_dtype(dtype) -> None:
    if np.dtype(dtype).kind != "f":
        raise TypeError(f"`dtype` must be a floating-point dtype, got {dtype!r}.")


def _to_centres(levels: np.ndarray, num_levels: int, dtype) -> np.ndarray:
    return (levels.astype(np.float64) * (2 / (num_levels - 1)) - 1).astype(dtype)


def load_digits_images(*, dtype: DTypeLike = np.float32) -> ImageDataset:
    """The 1797 handwritten digits bundled with scikit-learn, as 8 x 8 images.

    The pixels are counts from 0 to 16 (17 levels), mapped to $k/8 - 1$; the labels
    are the digits 0 to 9. Nothing is downloaded. (The same pixels, flattened, are
    [`nfdm_sciml.load_digits`][].)

    **Arguments:**

    - `dtype`: the floating-point dtype of the images.

    **Returns:** an [`nfdm_sciml.ImageDataset`][] of shape `(1797, 1, 8, 8)` with
    `num_levels=17`.
    """
    _check_float_dtype(dtype)
    try:
        datasets = importlib.import_module("sklearn.datasets")
    except ImportError as err:
        raise ImportError(
            "The digits ship with scikit-learn, which is not installed; install it "
            "with `pip install scikit-learn` (or `pip install nfdm_sciml[digits]`)."
        ) from err
    bunch = datasets.load_digits()
    levels = np.asarray(bunch.images).reshape(-1, 1, 8, 8)
    return ImageDataset(
        _to_centres(levels, 17, dtype),
        17,
        np.asarray(bunch.target, dtype=np.int64),
        "digits",
    )


_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_SPLITS = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_CIFAR_SPLITS["all"] = _CIFAR_SPLITS["train"] + _CIFAR_SPLITS["test"]


def _data_root() -> Path:
    root = os.environ.get("NFDM_DATA")
    return Path(root) if root else Path.home() / ".cache" / "nfdm_sciml"


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: dicts, lists, bytes, numbers and
    NumPy arrays. Anything else (a pickle can name any callable, which runs on
    loading) is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        # NumPy's own pickles name these two functions under module paths that
        # change between versions (`numpy.core` or `numpy._core`); take them from
        # what NumPy pickles today rather than import a deprecated path.
        if module.startswith("numpy") and name == "_reconstruct":
            return np.zeros(1).__reduce__()[0]
        if module.startswith("numpy") and name == "_frombuffer":
            return np.zeros(1).__reduce_ex__(5)[0]
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}, which a CIFAR-10 batch never holds"
        )


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    redownload = (
        f"download 'CIFAR-10 python version' (cifar-10-python.tar.gz) again from "
        f"{_CIFAR_URL} and extract it"
    )
    try:
        with open(path, "rb") as file:
            batch = _ArrayUnpickler(file, encoding="bytes").load()
    except Exception as err:
        raise ValueError(
            f"Could not read {str(path)!r} as a CIFAR-10 batch ({type(err).__name__}: "
            f"{err}); the file is truncated, corrupt or not a CIFAR-10 python batch: "
            f"{redownload}."
        ) from err
    if not isinstance(batch, dict):
        raise ValueError(
            f"{str(path)!r} holds a {type(batch).__name__}, not the dict of a CIFAR-10 "
            f"python batch; {redownload}."
        )
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3 * 32 * 32
        and isinstance(labels, list | np.ndarray)
        and len(labels) == data.shape[0]
    ):
        found = ", ".join(
            f"{k}: {type(v).__name__} {getattr(v, 'shape', '')}".rstrip()
            for k, v in batch.items()
        )
        raise ValueError(
            f"{str(path)!r} is not a CIFAR-10 python batch, which holds 'data' (uint8 "
            f"of shape (n, 3072)) and 'labels' (n integers); found {found or 'nothing'}"
            f". {redownload[0].upper()}{redownload[1:]}."
        )
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def load_cifar10(
    root: str | os.PathLike | None = None,
    *,
    split: Literal["train", "test", "all"] = "train",
    dtype: DTypeLike = np.float32,
) -> ImageDataset:
    """CIFAR-10 (32 x 32 colour images in 10 classes), read from the python batches.

    Nothing is downloaded. Download "CIFAR-10 python version"
    (`cifar-10-python.tar.gz`) by hand from https://www.cs.toronto.edu/~kriz/cifar.html
    and extract it: it unpacks to a folder `cifar-10-batches-py` with the files
    `data_batch_1` to `data_batch_5` (the 50,000 training images) and `test_batch`
    (the 10,000 test images). Pass that folder, or the folder that contains it, as
    `root`; by default it is looked for in `$NFDM_DATA/cifar-10-batches-py`, or in
    `~/.cache/nfdm_sciml/cifar-10-batches-py` when `NFDM_DATA` is not set.

    The batches are Python pickles; they are read with an unpickler that accepts only
    the arrays, lists and numbers a batch holds, so a tampered file cannot run code.

    **Arguments:**

    - `root`: the folder of the batches (see above); `None` for the default.
    - `split`: `"train"` (50,000 images), `"test"` (10,000) or `"all"` (both).
    - `dtype`: the floating-point dtype of the images.

    **Returns:** an [`nfdm_sciml.ImageDataset`][] of shape `(n, 3, 32, 32)` with
    `num_levels=256` and the class labels 0 to 9.
    """
    _check_float_dtype(dtype)
    if split not in _CIFAR_SPLITS:
        raise ValueError(
            f"Unknown CIFAR-10 split {split!r}; choose 'train', 'test' or 'all'."
        )
    folder = Path(root) if root is not None else _data_root() / _CIFAR_FOLDER
    where_from = (
        ""
        if root is not None
        else " (the default: pass `root=` or set NFDM_DATA to look elsewhere)"
    )
    # The archive unpacks to a `cifar-10-batches-py` folder: extract it one level up.
    parent = folder.parent if folder.name == _CIFAR_FOLDER else folder
    how = (
        f"download 'CIFAR-10 python version' (cifar-10-python.tar.gz) from "
        f"{_CIFAR_URL} and extract it with `mkdir -p {str(parent)!r} && tar -xzf "
        f"cifar-10-python.tar.gz -C {str(parent)!r}`, which creates "
        f"{str(parent / _CIFAR_FOLDER)!r} holding {', '.join(_CIFAR_SPLITS['all'])}"
    )
    if not folder.is_dir():
        raise FileNotFoundError(
            f"No CIFAR-10 folder at {str(folder)!r}{where_from}; {how}."
        )
    names = _CIFAR_SPLITS[split]
    if (folder / _CIFAR_FOLDER).is_dir() and not all(
        (folder / name).is_file() for name in names
    ):
        folder = folder / _CIFAR_FOLDER
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"The CIFAR-10 folder {str(folder)!r}{where_from} lacks "
            f"{', '.join(missing)} (needed for split={split!r}); {how}."
        )
    parts = [_read_cifar_batch(folder / name) for name in names]
    levels = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return ImageDataset(
        _to_centres(levels, 256, dtype), 256, labels, f"cifar10-{split}"
    )


_GREY_MODES = ("1", "L", "LA")
_COLOUR_MODES = ("RGB", "RGBA")


def _read_png(path: Path, pillow):
    """One PNG as a loaded Pillow image of mode "L" (grey) or "RGB"."""
    try:
        with pillow.open(path) as image:
            image.load()
            if image.mode == "P":
                # A palette image: its colours, with transparency if it has any.
                rgba = "transparency" in image.info
                image = image.convert("RGBA" if rgba else "RGB")
            mode = image.mode
            opaque = "A" not in mode or image.getchannel("A").getextrema()[0] == 255
            if mode in _GREY_MODES:
                image = image.convert("L")
            elif mode in _COLOUR_MODES:
                image = image.convert("RGB")
    except Exception as err:
        raise ValueError(
            f"Could not read {str(path)!r} as a PNG image ({type(err).__name__}: "
            f"{err}); the file is truncated or corrupt: write it again, or remove it "
            "from the folder."
        ) from err
    if mode not in _GREY_MODES + _COLOUR_MODES:
        raise ValueError(
            f"{str(path)!r} has Pillow mode {mode!r}; only 8-bit grey or colour PNGs "
            "(modes 1, L, LA, P, RGB, RGBA) can be loaded: convert it to 8 bits per "
            "channel first."
        )
    if not opaque:
        raise ValueError(
            f"{str(path)!r} has transparent pixels, which have no colour to model; "
            "flatten it onto a background first (e.g. with Pillow's "
            "`Image.alpha_composite`)."
        )
    return image


def load_image_folder(
    root: str | os.PathLike,
    *,
    channels: Literal[1, 3] | None = None,
    dtype: DTypeLike = np.float32,
) -> ImageDataset:
    """Every PNG file in a folder (not its subfolders), in the order of their names.

    The images must all have the same height and width and 8 bits per channel (256
    levels); palette and 1-bit images are read as their 8-bit colours or greys, and an
    alpha channel is accepted only when fully opaque.

    **Arguments:**

    - `root`: the folder of `.png` files.
    - `channels`: 1 for grey, 3 for colour. `None` gives 1 if every image is grey and
        3 otherwise (grey images are then repeated into three equal channels);
        `channels=1` turns colour images into grey with Pillow's luma transform
        $L = (299R + 587G + 114B)/1000$.
    - `dtype`: the floating-point dtype of the images.

    **Returns:** an [`nfdm_sciml.ImageDataset`][] of shape `(n, channels, height,
    width)` with `num_levels=256` and no labels.
    """
    _check_float_dtype(dtype)
    if channels not in (None, 1, 3):
        raise ValueError(f"`channels` must be 1, 3 or None, got {channels!r}.")
    folder = Path(root)
    if not folder.exists():
        raise FileNotFoundError(
            f"No image folder at {str(folder)!r}; check the path (relative paths "
            f"start from {os.getcwd()!r})."
        )
    if not folder.is_dir():
        raise NotADirectoryError(
            f"{str(folder)!r} is a file; pass the folder that holds the .png files."
        )
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not paths:
        others = sorted(p.name for p in folder.iterdir())
        found = f"it holds {', '.join(others[:5])}" if others else "it is empty"
        if len(others) > 5:
            found += f", ... ({len(others)} entries)"
        raise ValueError(
            f"No .png files in {str(folder)!r} ({found}); put the images there as "
            "PNG files, converting other formats first."
        )
    try:
        pillow = importlib.import_module("PIL.Image")
    except ImportError as err:
        raise ImportError(
            "Reading PNG files needs Pillow, which is not installed; install it with "
            "`pip install pillow`."
        ) from err

    images = [_read_png(path, pillow) for path in paths]
    for path, image in zip(paths, images, strict=True):
        if image.size != images[0].size:
            (w0, h0), (w, h) = images[0].size, image.size
            raise ValueError(
                f"The images in {str(folder)!r} differ in size: {paths[0].name} is "
                f"{h0} x {w0} (height x width) but {path.name} is {h} x {w}; resize "
                "or crop them all to one size first."
            )
    if channels is None:
        channels = 1 if all(image.mode == "L" for image in images) else 3
    mode = "L" if channels == 1 else "RGB"
    levels = np.stack([np.asarray(image.convert(mode)) for image in images])
    levels = levels[:, None] if channels == 1 else levels.transpose(0, 3, 1, 2)
    return ImageDataset(_to_centres(levels, 256, dtype), 256, None, str(folder))


IMAGE_DATASETS = ("digits", "cifar10", "folder")


def load_images(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    split: Literal["train", "test", "all"] | None = None,
    channels: Literal[1, 3] | None = None,
    dtype: DTypeLike = np.float32,
) -> ImageDataset:
    """Loads an image data set by name, from local files only.

    - `"digits"`: [`nfdm_sciml.load_digits_images`][], the 8 x 8 digits bundled with
        scikit-learn (17 levels); takes no `root` or `split`.
    - `"cifar10"`: [`nfdm_sciml.load_cifar10`][] from the python batches in `root`
        (default `$NFDM_DATA/cifar-10-batches-py` or
        `~/.cache/nfdm_sciml/cifar-10-batches-py`); `split` defaults to `"train"`.
    - `"folder"`: [`nfdm_sciml.load_image_folder`][], every PNG in the folder `root`
        (required); takes `channels`, and no `split`.

    **Returns:** an [`nfdm_sciml.ImageDataset`][].
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(
            f"Unknown image data set {name!r}; choose one of "
            f"{', '.join(map(repr, IMAGE_DATASETS))}."
        )
    unused: Sequence[tuple[str, object]] = ()
    if name == "digits":
        unused = (("root", root), ("split", split), ("channels", channels))
    elif name == "cifar10":
        unused = (("channels", channels),)
    else:
        unused = (("split", split),)
    for argument, value in unused:
        if value is not None:
            raise ValueError(f"`{argument}` does not apply to the {name!r} data set.")
    if name == "digits":
        return load_digits_images(dtype=dtype)
    if name == "cifar10":
        return load_cifar10(root, split=split or "train", dtype=dtype)
    if root is None:
        raise ValueError(
            "The 'folder' data set needs `root`, the folder of the .png files."
        )
    return load_image_folder(root, channels=channels, dtype=dtype)
