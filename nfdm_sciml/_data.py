"""Data sets: built-in 2D toy samplers that draw on the device (so training needs no
host loop), loaders for arrays on disk, and a standardiser stored with the model.

The toy samplers share one signature, `sampler(key, num_samples, *, dtype)`, and are
listed by name in [`nfdm_sciml.TOY_DATASETS`][]. The loaders return NumPy arrays of
shape `(examples, features)` and check them on the host, once, before training.
"""

import csv
import importlib
import math
import os
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray
from numpy.typing import DTypeLike

from ._checks import _is_traced, check_floating


def eight_gaussians(
    key: PRNGKeyArray, num_samples: int, *, dtype=jnp.float32
) -> Float[Array, "n 2"]:
    """The mixture of 8 Gaussians of the NFDM paper's 2D experiments.

    Centres at radius 4 in the directions 0°, 45°, ..., 315°, component standard
    deviation 0.5, and the whole sample divided by $\\sqrt 2$ (so radius about 2.83,
    component standard deviation about 0.354, about 2.0 per coordinate overall). Its
    differential entropy is about 2.832 nats.
    """
    if not (isinstance(num_samples, int) and num_samples > 0):
        raise ValueError(
            f"`num_samples` must be a positive integer, got {num_samples}."
        )
    ckey, nkey = jr.split(key)
    angles = jr.randint(ckey, (num_samples,), 0, 8).astype(dtype) * (math.pi / 4)
    centres = 4 * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    noise = 0.5 * jr.normal(nkey, (num_samples, 2), dtype=dtype)
    return (centres + noise) / math.sqrt(2)


def eight_gaussians_log_prob(x: Float[Array, "n 2"]) -> Float[Array, " n"]:
    """The exact log-density of [`nfdm_sciml.eight_gaussians`][] at `x`."""
    angles = jnp.arange(8, dtype=x.dtype) * (math.pi / 4)
    centres = 4 / math.sqrt(2) * jnp.stack([jnp.cos(angles), jnp.sin(angles)], -1)
    var = 0.25 / 2
    d2 = jnp.sum((x[:, None, :] - centres[None]) ** 2, axis=-1)
    log_components = -d2 / (2 * var) - math.log(2 * math.pi * var)
    return jax.nn.logsumexp(log_components, axis=-1) - math.log(8)


def _check_sampler_args(num_samples, dtype) -> None:
    if isinstance(num_samples, bool) or not (
        isinstance(num_samples, int) and num_samples > 0
    ):
        raise ValueError(
            f"`num_samples` must be a positive Python integer, got {num_samples!r}; "
            "under `jax.jit`, mark it static (`static_argnums=1`)."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"`dtype` must be a floating-point dtype such as `jnp.float32`, got "
            f"{dtype!r}."
        )


def moons(
    key: PRNGKeyArray, num_samples: int, *, dtype=jnp.float32
) -> Float[Array, "n 2"]:
    """Two interleaved half-circles ("moons"), in equal proportion.

    The upper moon is $(\\cos\\theta, \\sin\\theta)$ and the lower one
    $(1 - \\cos\\theta, \\tfrac12 - \\sin\\theta)$, with $\\theta$ uniform on
    $[0, \\pi]$. The pair is centred (its mean is $(\\tfrac12, \\tfrac14)$), doubled,
    and blurred with Gaussian noise of standard deviation 0.15, so the sample spans
    about $[-3, 3] \\times [-1.6, 1.6]$ with standard deviations of about 1.75 and 1.
    """
    _check_sampler_args(num_samples, dtype)
    mkey, tkey, nkey = jr.split(key, 3)
    lower = jr.bernoulli(mkey, 0.5, (num_samples,))
    theta = jr.uniform(tkey, (num_samples,), dtype, minval=0.0, maxval=math.pi)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    x = jnp.where(lower, 1 - cos, cos)
    y = jnp.where(lower, 0.5 - sin, sin)
    points = 2 * jnp.stack([x - 0.5, y - 0.25], axis=-1)
    return points + 0.15 * jr.normal(nkey, (num_samples, 2), dtype)


def checkerboard(
    key: PRNGKeyArray, num_samples: int, *, dtype=jnp.float32
) -> Float[Array, "n 2"]:
    """The uniform distribution on the dark squares of a 4 x 4 checkerboard.

    The board covers $[-2, 2]^2$ with unit squares; a square is dark when the sum of
    its column and row numbers (0 to 3, from the bottom left) is even, so 8 of the 16
    are dark. Each coordinate is uniform on $[-2, 2]$ (standard deviation about
    1.15); the density is $1/8$ on the dark squares and zero elsewhere.
    """
    _check_sampler_args(num_samples, dtype)
    xkey, rkey, ykey = jr.split(key, 3)
    x = jr.uniform(xkey, (num_samples,), dtype, minval=-2.0, maxval=2.0)
    column = jnp.clip(jnp.floor(x + 2), 0, 3).astype(jnp.int32)
    # A row of the same parity as the column, chosen uniformly among the two.
    row = 2 * jr.randint(rkey, (num_samples,), 0, 2, dtype=jnp.int32) + column % 2
    y = row.astype(dtype) - 2 + jr.uniform(ykey, (num_samples,), dtype)
    return jnp.stack([x, y], axis=-1)


def spirals(
    key: PRNGKeyArray, num_samples: int, *, dtype=jnp.float32
) -> Float[Array, "n 2"]:
    """Two interleaved spiral arms, in equal proportion.

    Each arm is the Archimedean spiral $r = 3s$, $\\theta = 3\\pi s$ (one and a half
    turns out to radius 3), the second arm turned by $\\pi$. The arc parameter is
    $s = \\sqrt u$ with $u$ uniform on $[0, 1]$, so that points are spread about
    evenly along the arms. Gaussian noise of standard deviation 0.1 blurs them;
    neighbouring turns are 1 apart, and each coordinate has a standard deviation of
    about 1.5.
    """
    _check_sampler_args(num_samples, dtype)
    akey, skey, nkey = jr.split(key, 3)
    arm = jr.bernoulli(akey, 0.5, (num_samples,)).astype(dtype)
    s = jnp.sqrt(jr.uniform(skey, (num_samples,), dtype))
    theta = 3 * math.pi * s + math.pi * arm
    radius = 3 * s
    points = jnp.stack([radius * jnp.cos(theta), radius * jnp.sin(theta)], axis=-1)
    return points + 0.1 * jr.normal(nkey, (num_samples, 2), dtype)


_RING_RADII = (1.0, 2.0, 3.0)


def rings(
    key: PRNGKeyArray, num_samples: int, *, dtype=jnp.float32
) -> Float[Array, "n 2"]:
    """Three concentric circles of radii 1, 2 and 3 about the origin.

    Points are spread evenly along the total length of the circles (so the rings hold
    1/6, 2/6 and 3/6 of the sample) and blurred with Gaussian noise of standard
    deviation 0.08. Each coordinate has a standard deviation of about 1.7.
    """
    _check_sampler_args(num_samples, dtype)
    rkey, akey, nkey = jr.split(key, 3)
    radii = jnp.asarray(_RING_RADII, dtype=dtype)
    ring = jr.categorical(rkey, jnp.log(radii), shape=(num_samples,))
    radius = radii[ring]
    angle = jr.uniform(akey, (num_samples,), dtype, minval=0.0, maxval=2 * math.pi)
    points = jnp.stack([radius * jnp.cos(angle), radius * jnp.sin(angle)], axis=-1)
    return points + 0.08 * jr.normal(nkey, (num_samples, 2), dtype)


def pinwheel(
    key: PRNGKeyArray, num_samples: int, *, dtype=jnp.float32
) -> Float[Array, "n 2"]:
    """Five curved arms turning about the origin, in equal proportion.

    A point of arm $k$ starts as $(a, b)$ with radial part $a \\sim \\mathcal N(1.5,
    0.5^2)$ and tangential part $b \\sim \\mathcal N(0, 0.12^2)$, and is then turned
    by the angle $2\\pi k / 5 + 0.6\\,a$: the farther out, the more it is turned, which
    bends each arm into a hook. Each coordinate has a standard deviation of about 1.1.
    """
    _check_sampler_args(num_samples, dtype)
    akey, nkey = jr.split(key)
    arm = jr.randint(akey, (num_samples,), 0, 5, dtype=jnp.int32).astype(dtype)
    noise = jr.normal(nkey, (num_samples, 2), dtype)
    radial = 1.5 + 0.5 * noise[:, 0]
    tangential = 0.12 * noise[:, 1]
    angle = (2 * math.pi / 5) * arm + 0.6 * radial
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return jnp.stack(
        [radial * cos - tangential * sin, radial * sin + tangential * cos], axis=-1
    )


def swiss_roll(
    key: PRNGKeyArray, num_samples: int, *, dtype=jnp.float32
) -> Float[Array, "n 2"]:
    """The swiss roll seen end-on: a single spiral arm of two turns.

    The angle $\\theta$ is uniform on $[\\pi, 5\\pi]$ and the radius is
    $r = \\theta / 2\\pi$ (from 0.5 to 2.5, so neighbouring turns are 1 apart); the
    point $r(\\cos\\theta, \\sin\\theta)$ is blurred with Gaussian noise of standard
    deviation 0.05. Uniform in angle rather than in length, the roll is denser near
    its centre, which sets it apart from [`nfdm_sciml.spirals`][]. Each coordinate has
    a standard deviation of about 1.1. (The 3D roll adds a uniform height, which this
    projection drops.)
    """
    _check_sampler_args(num_samples, dtype)
    tkey, nkey = jr.split(key)
    theta = jr.uniform(tkey, (num_samples,), dtype, minval=math.pi, maxval=5 * math.pi)
    radius = theta / (2 * math.pi)
    points = jnp.stack([radius * jnp.cos(theta), radius * jnp.sin(theta)], axis=-1)
    return points + 0.05 * jr.normal(nkey, (num_samples, 2), dtype)


TOY_DATASETS: dict[str, Callable[..., Float[Array, "n 2"]]] = {
    "eight_gaussians": eight_gaussians,
    "moons": moons,
    "checkerboard": checkerboard,
    "spirals": spirals,
    "rings": rings,
    "pinwheel": pinwheel,
    "swiss_roll": swiss_roll,
}
"""The built-in toy samplers by name; see [`nfdm_sciml.toy_dataset`][]."""


def toy_dataset(name: str) -> Callable[..., Float[Array, "n 2"]]:
    """Looks up a built-in 2D toy sampler by name.

    **Arguments:**

    - `name`: one of `eight_gaussians`, `moons`, `checkerboard`, `spirals`, `rings`,
        `pinwheel` and `swiss_roll` (the keys of [`nfdm_sciml.TOY_DATASETS`][]).

    **Returns:**

    The sampler, called as `sampler(key, num_samples, *, dtype=jnp.float32)` and
    returning an array of shape `(num_samples, 2)`. It draws on the device, so it can
    be called inside `jax.jit` (with `num_samples` static) and `jax.lax.scan`.
    """
    if not isinstance(name, str) or name not in TOY_DATASETS:
        raise ValueError(
            f"Unknown data set {name!r}; choose one of {', '.join(TOY_DATASETS)}."
        )
    return TOY_DATASETS[name]


def load_digits(*, dtype: DTypeLike = np.float32) -> Float[np.ndarray, "1797 64"]:
    """The 1797 handwritten digits of 8 x 8 pixels bundled with scikit-learn.

    Each row is one image, flattened row by row (`x.reshape(-1, 8, 8)` gives the
    images back). The pixels are counts from 0 to 16, mapped to the bin centres
    $k/8 - 1$ in $[-1, 1]$, so the data suit
    `DiscretisedGaussianDecoder(num_bins=17)`. The data ship inside scikit-learn:
    nothing is downloaded.

    **Arguments:**

    - `dtype`: the floating-point dtype of the result.

    **Returns:**

    A NumPy array of shape `(1797, 64)` with 17 distinct values, from -1 to 1.
    """
    if np.dtype(dtype).kind != "f":
        raise TypeError(f"`dtype` must be a floating-point dtype, got {dtype!r}.")
    try:
        datasets = importlib.import_module("sklearn.datasets")
    except ImportError as err:
        raise ImportError(
            "`load_digits` reads the digits bundled with scikit-learn, which is not "
            "installed; install it with `pip install scikit-learn`."
        ) from err
    counts = np.asarray(datasets.load_digits().data, dtype=np.float64)
    return (counts / 8 - 1).astype(dtype)


_EXTENSIONS = (".npy", ".npz", ".csv", ".h5ad")
_MAX_LISTED = 5


def _listing(items: Sequence, limit: int = 10) -> str:
    shown = ", ".join(str(item) for item in items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"


def _unreadable(path: str, kind: str, err: Exception) -> ValueError:
    return ValueError(
        f"Could not read {path!r} as {kind} ({type(err).__name__}: {err}); check "
        "that the file is complete and was written in that format."
    )


def _read_npy(path: str) -> np.ndarray:
    # `read_array` reads the .npy format only (`np.load` would also open archives
    # and pickles), and refuses object arrays rather than unpickling them.
    try:
        with open(path, "rb") as file:
            return np.lib.format.read_array(file, allow_pickle=False)
    except Exception as err:
        raise _unreadable(path, "a .npy array", err) from err


def _read_npz(path: str, key: str | None) -> np.ndarray:
    # The file is opened here, so that it is closed even when `np.load` fails.
    with open(path, "rb") as file:
        try:
            archive = np.load(file, allow_pickle=False)
        except Exception as err:
            raise _unreadable(path, "a .npz archive", err) from err
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError(
                f"{path!r} holds a single .npy array rather than a .npz archive; "
                "rename it to end in .npy."
            )
        with archive:
            keys = list(archive.files)
            if not keys:
                raise ValueError(
                    f"{path!r} is an empty .npz archive; it holds no arrays."
                )
            if key is None:
                if len(keys) > 1:
                    raise ValueError(
                        f"{path!r} holds {len(keys)} arrays ({_listing(keys)}); pick "
                        "one with `key=`."
                    )
                key = keys[0]
            elif key not in keys:
                raise ValueError(
                    f"{path!r} has no array {key!r}; its arrays are {_listing(keys)}."
                )
            try:
                return archive[key]
            except Exception as err:
                raise _unreadable(path, f"a .npz archive (array {key!r})", err) from err


def _number(cell: str) -> float | None:
    """A CSV cell as a float: empty means missing (NaN), `None` means not a number."""
    cell = cell.strip()
    if not cell:
        return math.nan
    try:
        return float(cell)
    except ValueError:
        return None


def _read_csv(
    path: str, header: bool | None
) -> tuple[np.ndarray, list[str] | None, list[tuple[int, int, str]], str]:
    """Returns the values (NaN in place of non-numbers), the header if there is one,
    and the non-numeric cells as (line, column, cell), with a hint for their error."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            lines = [
                (reader.line_num, row)
                for row in reader
                if any(cell.strip() for cell in row)
            ]
    except Exception as err:
        raise _unreadable(path, "a .csv file", err) from err
    if not lines:
        raise ValueError(f"{path!r} has no rows; it holds only blank lines.")

    first = [_number(cell) for cell in lines[0][1]]
    if header is None:
        # A header row has no numbers in it (empty cells, e.g. an unnamed index
        # column, are allowed); a row with some numbers is data.
        header = all(
            value is None or (math.isnan(value) and not cell.strip())
            for value, cell in zip(first, lines[0][1], strict=True)
        ) and any(value is None for value in first)
    names = [cell.strip() for cell in lines[0][1]] if header else None
    width = len(lines[0][1])
    body = lines[1:] if header else lines

    values, bad = [], []
    for line, row in body:
        if len(row) != width:
            raise ValueError(
                f"Line {line} of {path!r} has {len(row)} fields but line "
                f"{lines[0][0]} has {width}; every row needs the same number of "
                "columns."
            )
        parsed = [_number(cell) for cell in row]
        for j, value in enumerate(parsed):
            if value is None:
                bad.append((line, j, row[j]))
                parsed[j] = math.nan
        values.append(parsed)
    array = np.array(values, dtype=np.float64).reshape(len(values), width)
    first_is_data = bad and not header and bad[0][0] == lines[0][0]
    hint = (
        " If the first line is a header, pass `header=True`." if first_is_data else ""
    )
    return array, names, bad, hint


def _non_numeric(path: str, bad: list[tuple[int, int, str]], hint: str) -> ValueError:
    where = "; ".join(
        f"line {line}, column {j}: {cell!r}" for line, j, cell in bad[:_MAX_LISTED]
    )
    return ValueError(
        f"{path!r} has {len(bad)} non-numeric value(s) ({where}; columns count from "
        "0); only numbers, and empty cells for missing values, can be loaded: fix "
        f"those cells, or leave their columns out with `columns=`.{hint}"
    )


def _read_h5ad(path: str) -> tuple[np.ndarray, list[str]]:
    try:
        anndata = importlib.import_module("anndata")
    except ImportError as err:
        raise ImportError(
            "Loading .h5ad files needs anndata, which is not installed; install it "
            "with `pip install anndata` (or `pip install nfdm_sciml[anndata]`)."
        ) from err
    try:
        adata = anndata.read_h5ad(path)
        matrix = adata.X
        names = [str(name) for name in adata.var_names]
        if matrix is not None and hasattr(matrix, "toarray"):  # scipy sparse
            matrix = matrix.toarray()
    except Exception as err:
        raise _unreadable(path, "an .h5ad file", err) from err
    if matrix is None:
        raise ValueError(
            f"{path!r} has no `.X` matrix; store the data to model in `adata.X`."
        )
    return np.asarray(matrix), names


def _column_indices(
    width: int, names: list[str] | None, columns, path: str
) -> list[int]:
    """The indices of the `columns` to keep, out of `width`."""
    if columns is None:
        return list(range(width))
    if isinstance(columns, str | int):
        columns = [columns]
    indices = []
    for column in columns:
        if isinstance(column, str):
            if names is None:
                raise ValueError(
                    f"{path!r} has no column names, so column {column!r} cannot be "
                    "found; select columns by index instead."
                )
            if column not in names:
                raise ValueError(
                    f"{path!r} has no column {column!r}; its columns are "
                    f"{_listing(names)}."
                )
            indices.append(names.index(column))
        elif isinstance(column, int | np.integer) and not isinstance(column, bool):
            if not -width <= column < width:
                raise ValueError(
                    f"Column index {column} is out of range for {path!r}, which has "
                    f"{width} columns."
                )
            indices.append(int(column) % width)
        else:
            raise TypeError(
                f"`columns` must hold column names (str) or indices (int), got "
                f"{column!r}."
            )
    if not indices:
        raise ValueError(
            "`columns` is empty; select at least one column, or pass None."
        )
    return indices


def load_array(
    path: str | os.PathLike,
    *,
    columns: str | int | Sequence[str | int] | None = None,
    key: str | None = None,
    header: bool | None = None,
    expected_dim: int | None = None,
    dtype: DTypeLike = np.float32,
) -> Float[np.ndarray, "n d"]:
    """Loads a data matrix (examples x features) from a file, and checks it.

    The format follows the extension:

    - `.npy`: one array.
    - `.npz`: an archive; the array named `key`, which may be left out when the
        archive holds just one.
    - `.csv`: comma-separated numbers, with or without a header row of column names.
        Empty cells are missing values (NaN, and so refused below); columns of text,
        such as identifiers, must be left out with `columns=`. The file is parsed in
        Python: for large data sets, `.npy` loads much faster.
    - `.h5ad`: an AnnData file (needs `pip install anndata`); its `.X` matrix, dense
        or sparse (made dense), with `var_names` as column names.

    The data must be a 2D array of real numbers with at least one row and column,
    no NaN or infinite values, and (if given) `expected_dim` columns; anything else
    raises a `ValueError` that says what was found and where.

    **Arguments:**

    - `path`: the file to read.
    - `columns`: the columns to keep, by name (`.csv` with a header, `.h5ad`) or by
        index (any format; negative indices count from the end). `None` keeps all.
    - `key`: for `.npz` archives, the name of the array to load.
    - `header`: for `.csv` files, whether the first row holds column names. `None`
        decides from the row: it is a header if it holds no numbers.
    - `expected_dim`: the number of features the data must have, if known (for
        example the `data_shape` of a trained model).
    - `dtype`: the floating-point dtype of the result.

    **Returns:**

    A NumPy array of shape `(examples, features)`.
    """
    if np.dtype(dtype).kind != "f":
        raise TypeError(f"`dtype` must be a floating-point dtype, got {dtype!r}.")
    if expected_dim is not None and not (
        isinstance(expected_dim, int) and expected_dim > 0
    ):
        raise ValueError(
            f"`expected_dim` must be a positive integer or None, got {expected_dim!r}."
        )
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No file at {path!r}; check the path (relative paths start from "
            f"{os.getcwd()!r})."
        )
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; pass the path of a data file.")
    extension = os.path.splitext(path)[1].lower()
    if extension not in _EXTENSIONS:
        raise ValueError(
            f"Cannot load {path!r}: unknown extension {extension or '(none)'!r}; save "
            f"the data as one of {', '.join(_EXTENSIONS)}."
        )
    if key is not None and extension != ".npz":
        raise ValueError(f"`key` only applies to .npz archives, not to {path!r}.")
    if header is not None and extension != ".csv":
        raise ValueError(f"`header` only applies to .csv files, not to {path!r}.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path!r} is empty (0 bytes); it holds no data.")

    names, bad, hint = None, [], ""
    if extension == ".npy":
        array = _read_npy(path)
    elif extension == ".npz":
        array = _read_npz(path, key)
    elif extension == ".csv":
        array, names, bad, hint = _read_csv(path, header)
    else:
        array, names = _read_h5ad(path)

    if array.dtype.kind not in "biuf":
        raise ValueError(
            f"{path!r} holds non-numeric data (dtype {array.dtype}); only real "
            "numbers can be loaded: convert the values, or drop those fields, first."
        )
    if array.ndim != 2:
        if array.ndim < 2:
            n = array.size
            fix = (
                f"reshape it to ({n}, 1) if it is one feature, or to (1, {n}) if it "
                "is one example, and save it again"
            )
        else:
            fix = (
                "flatten each example, e.g. `x.reshape(len(x), -1)`, and save it again"
            )
        raise ValueError(
            f"{path!r} holds an array of shape {array.shape} ({array.ndim}D), but a "
            f"2D array of examples x features is needed; {fix}."
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(
            f"{path!r} holds an array of shape {array.shape}, with no "
            f"{'rows (examples)' if array.shape[0] == 0 else 'columns (features)'}."
        )

    indices = _column_indices(array.shape[1], names, columns, path)
    kept = set(indices)
    bad = [cell for cell in bad if cell[1] in kept]
    if bad:
        raise _non_numeric(path, bad, hint)
    array = array[:, indices].astype(np.float64)
    labels = [j if names is None else repr(names[j]) for j in indices]
    non_finite = ~np.isfinite(array)
    if non_finite.any():
        rows, cols = np.nonzero(non_finite)
        where = ", ".join(
            f"(row {i}, column {labels[j]})"
            for i, j in zip(rows[:_MAX_LISTED], cols[:_MAX_LISTED], strict=True)
        )
        raise ValueError(
            f"{path!r} holds {len(rows)} NaN or infinite value(s) in "
            f"{len(np.unique(rows))} row(s), first at {where} (data rows count from "
            "0); remove or impute them before training."
        )
    if expected_dim is not None and array.shape[1] != expected_dim:
        raise ValueError(
            f"{path!r} has {array.shape[1]} features (columns) but {expected_dim} "
            "were expected; select the right columns with `columns=` or check the "
            "file."
        )
    # `finfo` of an empty array of the target dtype: NumPy's stubs accept no DTypeLike.
    target = np.empty(0, dtype=dtype)
    if np.abs(array).max() > np.finfo(target.dtype).max:
        raise ValueError(
            f"Some values of {path!r} are too large for {target.dtype.name}; "
            "rescale the data or pass `dtype=np.float64`."
        )
    return array.astype(dtype)


class Standardiser(eqx.Module):
    """A per-feature affine rescaling, $z = (x - \\mu) / s$, fitted to data.

    Fit it once to the training data with [`nfdm_sciml.Standardiser.fit`][], train
    on `transform(x)`, and map samples back with `inverse(z)`. It is a pytree of two
    arrays, so it can be kept with the model and saved with it
    (`eqx.tree_serialise_leaves`).

    Both methods act on the trailing axis: on one example of shape `(features,)` or
    on a batch of any leading shape.
    """

    mean: Float[Array, " d"] = eqx.field(converter=jnp.asarray)
    scale: Float[Array, " d"] = eqx.field(converter=jnp.asarray)

    def __check_init__(self):
        if jnp.ndim(self.mean) != 1 or jnp.shape(self.mean) != jnp.shape(self.scale):
            raise ValueError(
                "`Standardiser` needs `mean` and `scale` of the same shape "
                f"(features,), got {jnp.shape(self.mean)} and {jnp.shape(self.scale)}."
            )
        if not _is_traced(self.scale) and not bool(jnp.all(self.scale > 0)):
            raise ValueError(
                "`Standardiser` needs `scale` > 0 for every feature; fit it with "
                "`Standardiser.fit`, which floors the scale at `min_scale`."
            )

    @classmethod
    def fit(
        cls, x: Float[Array | np.ndarray, "n d"], *, min_scale: float = 1e-6
    ) -> "Standardiser":
        """Fits the mean and standard deviation of each feature of `x`.

        **Arguments:**

        - `x`: the training data, of shape `(examples, features)`.
        - `min_scale`: the smallest scale used. A feature whose standard deviation is
            below it (e.g. a constant column) is divided by `min_scale` instead, so it
            maps to values near zero rather than to infinities.

        **Returns:**

        The fitted `Standardiser`, with arrays of the dtype of `x`.
        """
        check_floating(x, "x")
        if jnp.ndim(x) != 2 or jnp.shape(x)[0] == 0:
            raise ValueError(
                "`Standardiser.fit` needs a 2D batch of shape (examples, features) "
                f"with at least one example, got shape {jnp.shape(x)}."
            )
        if not min_scale > 0:
            raise ValueError(f"`min_scale` must be positive, got {min_scale}.")
        x = jnp.asarray(x)
        if not _is_traced(x) and not bool(jnp.all(jnp.isfinite(x))):
            count = int(jnp.sum(~jnp.isfinite(x)))
            raise ValueError(
                f"`x` contains {count} NaN or infinite value(s); remove or impute "
                "them before fitting."
            )
        scale = jnp.maximum(jnp.std(x, axis=0), min_scale)
        return cls(jnp.mean(x, axis=0), scale)

    def _parameters(self, x) -> tuple[Array, Array, Array]:
        check_floating(x, "x")
        x = jnp.asarray(x)
        features = self.mean.shape[0]
        if x.ndim == 0 or x.shape[-1] != features:
            raise ValueError(
                f"`x` must have {features} features on its last axis (the number the "
                f"standardiser was fitted to), but has shape {x.shape}."
            )
        shape = (1,) * (x.ndim - 1) + (features,)
        mean = self.mean.astype(x.dtype).reshape(shape)
        return x, mean, self.scale.astype(x.dtype).reshape(shape)

    def transform(
        self, x: Float[Array | np.ndarray, "*batch d"]
    ) -> Float[Array, "*batch d"]:
        """**Returns:** the standardised data $(x - \\mu) / s$, in the dtype of `x`."""
        x, mean, scale = self._parameters(x)
        return (x - mean) / scale

    def inverse(
        self, z: Float[Array | np.ndarray, "*batch d"]
    ) -> Float[Array, "*batch d"]:
        """**Returns:** `z` in the original units, $\\mu + s z$, in the dtype of `z`."""
        z, mean, scale = self._parameters(z)
        return mean + scale * z
