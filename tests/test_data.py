import csv
import io
import math
import sys
import types

import equinox as eqx
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.sparse
from hypothesis import given

import nfdm_sciml as nf


TOY_NAMES = (
    "eight_gaussians",
    "moons",
    "checkerboard",
    "spirals",
    "rings",
    "pinwheel",
    "swiss_roll",
)


# ---------------------------------------------------------------------------------
# Toy samplers
# ---------------------------------------------------------------------------------


def test_registry_lists_every_sampler():
    assert tuple(nf.TOY_DATASETS) == TOY_NAMES
    for name in TOY_NAMES:
        assert nf.toy_dataset(name) is nf.TOY_DATASETS[name] is getattr(nf, name)


def test_registry_unknown_name():
    message = "Unknown data set 'foo'; choose one of eight_gaussians, moons, "
    with pytest.raises(ValueError, match=message):
        nf.toy_dataset("foo")


# One sample size throughout, so that eager calls reuse compiled operations.
N = 2000


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_sampler_shape_dtype_and_spread(name):
    sampler = nf.toy_dataset(name)
    x = sampler(jr.key(0), N, dtype=jnp.float64)
    assert x.shape == (N, 2) and x.dtype == jnp.float64
    assert bool(jnp.all(jnp.isfinite(x)))
    # Centred, with a standard deviation of unit order in each coordinate.
    assert np.all(np.abs(np.mean(x, axis=0)) < 0.4)
    assert np.all((np.std(x, axis=0) > 0.8) & (np.std(x, axis=0) < 2.5))
    assert sampler(jr.key(0), N).dtype == jnp.float32


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_sampler_deterministic_jit_and_scan(name):
    # In float64, so that compiled and eager arithmetic agree closely.
    sampler = nf.toy_dataset(name)
    keys = jr.split(jr.key(3), 2)
    eager = jnp.stack([sampler(k, N, dtype=jnp.float64) for k in keys])
    np.testing.assert_array_equal(eager[0], sampler(keys[0], N, dtype=jnp.float64))
    assert not np.allclose(eager[0], eager[1])

    @jax.jit
    def scanned(keys):
        def step(carry, key):
            return carry, sampler(key, N, dtype=jnp.float64)

        return jax.lax.scan(step, None, keys)[1]

    np.testing.assert_allclose(scanned(keys), eager, rtol=1e-10, atol=1e-12)


def test_checkerboard_only_dark_squares():
    x = np.asarray(nf.checkerboard(jr.key(1), N, dtype=jnp.float64))
    assert np.all(np.abs(x) <= 2)
    column, row = np.floor(x[:, 0] + 2), np.floor(x[:, 1] + 2)
    assert np.all((column + row) % 2 == 0)
    # All 8 dark squares are used.
    assert len(set(zip(column, row, strict=True))) == 8


def test_rings_radii_and_proportions():
    x = np.asarray(nf.rings(jr.key(2), N, dtype=jnp.float64))
    radius = np.linalg.norm(x, axis=-1)
    ring = np.round(radius)
    assert np.all(np.abs(radius - ring) < 0.45) and set(ring) == {1.0, 2.0, 3.0}
    fractions = [np.mean(ring == r) for r in (1, 2, 3)]
    np.testing.assert_allclose(fractions, [1 / 6, 2 / 6, 3 / 6], atol=0.04)


@pytest.mark.parametrize(
    ("name", "low", "high"), [("spirals", 0, 3), ("swiss_roll", 0.5, 2.5)]
)
def test_spiral_radii(name, low, high):
    x = np.asarray(nf.toy_dataset(name)(jr.key(4), N, dtype=jnp.float64))
    radius = np.linalg.norm(x, axis=-1)
    assert radius.min() > low - 0.4 and radius.max() < high + 0.4


@pytest.mark.parametrize("name", TOY_NAMES[1:])
@pytest.mark.parametrize("num_samples", [0, -3, 2.5, True])
def test_toy_sampler_bad_num_samples(name, num_samples, no_typecheck):
    with pytest.raises(ValueError, match="`num_samples` must be a positive"):
        nf.toy_dataset(name)(jr.key(0), num_samples)


@pytest.mark.parametrize("name", TOY_NAMES[1:])
def test_toy_sampler_bad_dtype(name):
    with pytest.raises(TypeError, match="floating-point dtype"):
        nf.toy_dataset(name)(jr.key(0), 4, dtype=jnp.int32)


# ---------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_load_digits(dtype):
    pytest.importorskip("sklearn")
    x = nf.load_digits(dtype=dtype)
    assert x.shape == (1797, 64) and x.dtype == dtype
    np.testing.assert_array_equal(np.unique(x), np.arange(17) / 8 - 1)
    # Every bin centre lies on the grid of a 17-level discretised decoder.
    decoder = nf.DiscretisedGaussianDecoder(num_bins=17)
    levels = decoder.bin_index(jnp.asarray(x[:5], dtype=jnp.float64))
    np.testing.assert_array_equal(levels, (x[:5] + 1) * 8)


def test_load_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        nf.load_digits()


# ---------------------------------------------------------------------------------
# Loading arrays: round trips
# ---------------------------------------------------------------------------------


def _data():
    return np.random.default_rng(0).normal(size=(7, 3))


def _write_csv(path, rows, header=None):
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        if header is not None:
            writer.writerow(header)
        writer.writerows([[repr(float(v)) for v in row] for row in rows])


def test_load_npy(tmp_path):
    x = _data()
    np.save(tmp_path / "x.npy", x)
    loaded = nf.load_array(tmp_path / "x.npy", dtype=np.float64)
    np.testing.assert_array_equal(loaded, x)
    assert nf.load_array(str(tmp_path / "x.npy")).dtype == np.float32
    np.testing.assert_array_equal(
        nf.load_array(tmp_path / "x.npy", columns=[2, -3], expected_dim=2),
        x[:, [2, 0]].astype(np.float32),
    )
    np.save(tmp_path / "ints.npy", np.arange(6).reshape(3, 2))
    np.testing.assert_array_equal(
        nf.load_array(tmp_path / "ints.npy"), np.arange(6.0).reshape(3, 2)
    )


def test_load_npz(tmp_path):
    x = _data()
    np.savez(tmp_path / "one.npz", data=x)
    np.savez_compressed(tmp_path / "two.npz", a=x, b=2 * x)
    np.testing.assert_array_equal(
        nf.load_array(tmp_path / "one.npz", dtype=np.float64), x
    )
    np.testing.assert_array_equal(
        nf.load_array(tmp_path / "two.npz", key="b", dtype=np.float64), 2 * x
    )


def test_load_csv(tmp_path):
    x = _data()
    _write_csv(tmp_path / "plain.csv", x)
    _write_csv(tmp_path / "named.csv", x, header=["a", "b", "c"])
    for name in ("plain.csv", "named.csv"):
        loaded = nf.load_array(tmp_path / name, dtype=np.float64)
        np.testing.assert_array_equal(loaded, x)
    np.testing.assert_array_equal(
        nf.load_array(tmp_path / "named.csv", columns=["c", "a"], dtype=np.float64),
        x[:, [2, 0]],
    )
    np.testing.assert_array_equal(
        nf.load_array(tmp_path / "named.csv", columns="b", dtype=np.float64), x[:, [1]]
    )
    # An explicit `header=` overrides the guess, e.g. for numeric column names.
    _write_csv(tmp_path / "numbered.csv", x, header=["1", "2", "3"])
    loaded = nf.load_array(tmp_path / "numbered.csv", header=True, dtype=np.float64)
    np.testing.assert_array_equal(loaded, x)
    assert nf.load_array(tmp_path / "numbered.csv", header=False).shape == (8, 3)


def test_load_h5ad(tmp_path):
    anndata = pytest.importorskip("anndata")
    x = _data()
    adata = anndata.AnnData(X=x)
    adata.var_names = ["a", "b", "c"]
    adata.write_h5ad(tmp_path / "dense.h5ad")
    adata.X = scipy.sparse.csr_matrix(x)
    adata.write_h5ad(tmp_path / "sparse.h5ad")
    for name in ("dense.h5ad", "sparse.h5ad"):
        loaded = nf.load_array(tmp_path / name, dtype=np.float64)
        np.testing.assert_array_equal(loaded, x)
    loaded = nf.load_array(tmp_path / "sparse.h5ad", columns=["c"], dtype=np.float64)
    np.testing.assert_array_equal(loaded, x[:, [2]])


def _fake_anndata(monkeypatch, matrix=None, error=None):
    """Stands in for anndata, so that our handling of `.X` is tested without it."""

    def read_h5ad(path):
        if error is not None:
            raise error
        return types.SimpleNamespace(X=matrix, var_names=["a", "b", "c"])

    module = types.ModuleType("anndata")
    module.read_h5ad = read_h5ad  # pyright: ignore[reportAttributeAccessIssue]
    monkeypatch.setitem(sys.modules, "anndata", module)


def test_load_h5ad_handling_without_anndata(tmp_path, monkeypatch):
    path = tmp_path / "x.h5ad"
    path.write_bytes(b"placeholder")
    x = _data()
    _fake_anndata(monkeypatch, scipy.sparse.csr_matrix(x))
    np.testing.assert_array_equal(
        nf.load_array(path, columns=["b"], dtype=np.float64), x[:, [1]]
    )
    _fake_anndata(monkeypatch, None)
    with pytest.raises(ValueError, match="has no `.X` matrix"):
        nf.load_array(path)
    _fake_anndata(monkeypatch, error=OSError("truncated HDF5 header"))
    with pytest.raises(ValueError, match="as an .h5ad file.*truncated HDF5 header"):
        nf.load_array(path)
    monkeypatch.setitem(sys.modules, "anndata", None)
    with pytest.raises(ImportError, match="pip install anndata"):
        nf.load_array(path)


# ---------------------------------------------------------------------------------
# Loading arrays: bad input
# ---------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="No file at .*nothing.npy"):
        nf.load_array(tmp_path / "nothing.npy")
    with pytest.raises(ValueError, match="is a directory"):
        nf.load_array(tmp_path)


@pytest.mark.parametrize("name", ["x.txt", "x"])
def test_unknown_extension(tmp_path, name):
    (tmp_path / name).write_text("1,2\n")
    with pytest.raises(ValueError, match="unknown extension .*; save the data as"):
        nf.load_array(tmp_path / name)


@pytest.mark.parametrize("extension", [".npy", ".npz", ".csv", ".h5ad"])
def test_empty_file(tmp_path, extension):
    (tmp_path / f"x{extension}").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is empty \(0 bytes\)"):
        nf.load_array(tmp_path / f"x{extension}")


def _truncated(path, save):
    buffer = io.BytesIO()
    save(buffer)
    path.write_bytes(buffer.getvalue()[:-20])
    return path


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("garbage.npy", b"this is not an array"),
        ("garbage.npz", b"this is not an archive"),
        ("binary.csv", b"\xff\xfe\x00\x81 not text"),
    ],
)
def test_corrupt_file(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match="Could not read") as info:
        nf.load_array(tmp_path / name)
    # The underlying error is kept, in the message and as the cause.
    assert info.value.__cause__ is not None
    assert str(info.value.__cause__) in str(info.value)


def test_truncated_files(tmp_path):
    x = _data()
    npy = _truncated(tmp_path / "x.npy", lambda f: np.save(f, x))
    npz = _truncated(tmp_path / "x.npz", lambda f: np.savez(f, x=x))
    for path in (npy, npz):
        with pytest.raises(ValueError, match="Could not read"):
            nf.load_array(path)


def test_npz_choices(tmp_path):
    x = _data()
    np.savez(tmp_path / "two.npz", a=x, b=x)
    with pytest.raises(ValueError, match=r"holds 2 arrays \(a, b\); pick one with"):
        nf.load_array(tmp_path / "two.npz")
    with pytest.raises(ValueError, match="has no array 'c'; its arrays are a, b"):
        nf.load_array(tmp_path / "two.npz", key="c")
    np.savez(tmp_path / "none.npz")
    with pytest.raises(ValueError, match="empty .npz archive"):
        nf.load_array(tmp_path / "none.npz")
    with open(tmp_path / "single.npz", "wb") as file:
        np.save(file, x)
    with pytest.raises(ValueError, match="rename it to end in .npy"):
        nf.load_array(tmp_path / "single.npz")
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(ValueError, match="`key` only applies to .npz"):
        nf.load_array(tmp_path / "x.npy", key="a")


def test_zero_rows_or_columns(tmp_path):
    np.save(tmp_path / "rows.npy", np.zeros((0, 3)))
    np.save(tmp_path / "cols.npy", np.zeros((3, 0)))
    (tmp_path / "header.csv").write_text("a,b\n")
    (tmp_path / "blank.csv").write_text("\n\n  \n")
    with pytest.raises(ValueError, match=r"with no rows \(examples\)"):
        nf.load_array(tmp_path / "rows.npy")
    with pytest.raises(ValueError, match=r"with no columns \(features\)"):
        nf.load_array(tmp_path / "cols.npy")
    with pytest.raises(ValueError, match=r"with no rows \(examples\)"):
        nf.load_array(tmp_path / "header.csv")
    with pytest.raises(ValueError, match="has no rows; it holds only blank lines"):
        nf.load_array(tmp_path / "blank.csv")


def test_non_numeric(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n3,abc\n4,?\n")
    message = r"2 non-numeric value\(s\) \(line 3, column 1: 'abc'; line 4, column 1"
    with pytest.raises(ValueError, match=message):
        nf.load_array(tmp_path / "x.csv")
    # A column of text can be left out.
    (tmp_path / "named.csv").write_text("name,x,y\nA,1,2\nB,3,4\n")
    with pytest.raises(ValueError, match=r"line 2, column 0: 'A'; line 3"):
        nf.load_array(tmp_path / "named.csv")
    loaded = nf.load_array(tmp_path / "named.csv", columns=["x", "y"])
    np.testing.assert_array_equal(loaded, [[1.0, 2.0], [3.0, 4.0]])
    (tmp_path / "id.csv").write_text("id,0,1\n1,2,3\n")
    with pytest.raises(ValueError, match="If the first line is a header, pass"):
        nf.load_array(tmp_path / "id.csv")
    np.save(tmp_path / "text.npy", np.array([["a", "b"]]))
    with pytest.raises(ValueError, match=r"non-numeric data \(dtype <U1\)"):
        nf.load_array(tmp_path / "text.npy")
    np.save(tmp_path / "complex.npy", np.ones((2, 2), dtype=np.complex64))
    with pytest.raises(ValueError, match="non-numeric data"):
        nf.load_array(tmp_path / "complex.npy")
    np.save(tmp_path / "object.npy", np.array([[{}, 1]], dtype=object))
    with pytest.raises(ValueError, match="Could not read.*Object arrays"):
        nf.load_array(tmp_path / "object.npy")


def test_ragged_csv(tmp_path):
    (tmp_path / "x.csv").write_text("1,2,3\n4,5\n")
    with pytest.raises(ValueError, match="Line 2 of .* has 2 fields but line 1 has 3"):
        nf.load_array(tmp_path / "x.csv")


def test_non_finite(tmp_path):
    x = _data()
    x[1, 2], x[4, 0], x[4, 1] = np.nan, np.inf, -np.inf
    np.save(tmp_path / "x.npy", x)
    message = (
        r"3 NaN or infinite value\(s\) in 2 row\(s\), first at \(row 1, column 2\), "
        r"\(row 4, column 0\), \(row 4, column 1\)"
    )
    with pytest.raises(ValueError, match=message):
        nf.load_array(tmp_path / "x.npy")
    # Only the selected columns are checked, and reported by their original labels.
    with pytest.raises(ValueError, match=r"first at \(row 4, column 1\)"):
        nf.load_array(tmp_path / "x.npy", columns=[1])
    (tmp_path / "x.csv").write_text("a,b\n1,2\n3,\nnan,4\n")
    message = r"first at \(row 1, column 'b'\), \(row 2, column 'a'\)"
    with pytest.raises(ValueError, match=message):
        nf.load_array(tmp_path / "x.csv")


def test_too_large_for_dtype(tmp_path):
    np.save(tmp_path / "x.npy", np.full((2, 2), 1e300))
    with pytest.raises(ValueError, match="too large for float32"):
        nf.load_array(tmp_path / "x.npy")
    assert nf.load_array(tmp_path / "x.npy", dtype=np.float64)[0, 0] == 1e300


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((4, 2, 3), r"shape \(4, 2, 3\) \(3D\).*x.reshape\(len\(x\), -1\)"),
        ((5,), r"shape \(5,\) \(1D\).*reshape it to \(5, 1\)"),
        ((), r"shape \(\) \(0D\)"),
    ],
)
def test_wrong_rank(tmp_path, shape, message):
    np.save(tmp_path / "x.npy", np.ones(shape))
    with pytest.raises(ValueError, match=message):
        nf.load_array(tmp_path / "x.npy")


def test_expected_dim_and_columns(tmp_path):
    x = _data()
    np.save(tmp_path / "x.npy", x)
    _write_csv(tmp_path / "x.csv", x, header=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"has 3 features \(columns\) but 2 were"):
        nf.load_array(tmp_path / "x.npy", expected_dim=2)
    with pytest.raises(ValueError, match="has no column names"):
        nf.load_array(tmp_path / "x.npy", columns=["a"])
    with pytest.raises(ValueError, match="has no column 'z'; its columns are a, b, c"):
        nf.load_array(tmp_path / "x.csv", columns=["a", "z"])
    with pytest.raises(ValueError, match="Column index 3 is out of range"):
        nf.load_array(tmp_path / "x.csv", columns=[3])
    with pytest.raises(ValueError, match="`columns` is empty"):
        nf.load_array(tmp_path / "x.csv", columns=[])
    with pytest.raises(ValueError, match="`header` only applies to .csv"):
        nf.load_array(tmp_path / "x.npy", header=True)


# ---------------------------------------------------------------------------------
# Standardiser
# ---------------------------------------------------------------------------------


def test_standardiser_round_trip_and_constant_column():
    x = np.random.default_rng(1).normal(3.0, 5.0, size=(50, 3))
    x[:, 1] = 7.0
    standardiser = nf.Standardiser.fit(x)
    z = standardiser.transform(x)
    assert z.dtype == jnp.float64 and bool(jnp.all(jnp.isfinite(z)))
    np.testing.assert_allclose(jnp.mean(z, axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(jnp.std(z[:, ::2], axis=0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(z[:, 1], 0.0, atol=1e-6)
    assert float(standardiser.scale[1]) == 1e-6
    np.testing.assert_allclose(standardiser.inverse(z), x, rtol=1e-12)

    # One example, or any leading batch shape, along the trailing axis.
    np.testing.assert_allclose(standardiser.transform(x[3]), z[3], rtol=1e-12)
    batched = standardiser.transform(jnp.reshape(jnp.asarray(x), (5, 10, 3)))
    np.testing.assert_allclose(jnp.reshape(batched, (50, 3)), z, rtol=1e-12)
    # Float32 data keep their dtype under strict promotion.
    z32 = standardiser.transform(jnp.asarray(x, dtype=jnp.float32))
    assert z32.dtype == jnp.float32


@given(
    x=hnp.arrays(
        np.float64,
        (6, 3),
        elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False),
    )
)
def test_standardiser_round_trip_property(x):
    standardiser = nf.Standardiser.fit(x)
    recovered = standardiser.inverse(standardiser.transform(x))
    np.testing.assert_allclose(recovered, x, rtol=1e-9, atol=1e-9)


def test_standardiser_is_a_pytree():
    x = jnp.asarray(_data())
    standardiser = nf.Standardiser.fit(x)
    round_trip = eqx.filter_jit(lambda s, x: s.inverse(s.transform(x)))
    np.testing.assert_allclose(round_trip(standardiser, x), x, rtol=1e-12)

    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, standardiser)
    buffer.seek(0)
    template = nf.Standardiser(np.zeros(3), np.ones(3))
    loaded = eqx.tree_deserialise_leaves(buffer, template)
    np.testing.assert_array_equal(loaded.mean, standardiser.mean)
    np.testing.assert_array_equal(loaded.scale, standardiser.scale)


def test_standardiser_errors(no_typecheck):
    standardiser = nf.Standardiser.fit(_data())
    with pytest.raises(ValueError, match="must have 3 features on its last axis"):
        standardiser.transform(jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"needs a 2D batch.*got shape \(3,\)"):
        nf.Standardiser.fit(jnp.ones(3))
    with pytest.raises(ValueError, match=r"needs a 2D batch.*got shape \(0, 3\)"):
        nf.Standardiser.fit(jnp.ones((0, 3)))
    with pytest.raises(ValueError, match="contains 1 NaN or infinite"):
        nf.Standardiser.fit(jnp.array([[1.0, math.nan], [2.0, 3.0]]))
    with pytest.raises(TypeError, match="must be a floating-point array"):
        nf.Standardiser.fit(jnp.ones((3, 2), dtype=jnp.int32))
    with pytest.raises(ValueError, match="`min_scale` must be positive"):
        nf.Standardiser.fit(jnp.ones((3, 2)), min_scale=0.0)
    with pytest.raises(ValueError, match="needs `scale` > 0"):
        nf.Standardiser(jnp.zeros(2), jnp.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="of the same shape"):
        nf.Standardiser(jnp.zeros(2), jnp.ones(3))
