import math
import pickle

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import nfdm_sciml as nf
from nfdm_sciml import plotting
from nfdm_sciml._images import (
    bits_per_dim,
    ImageDataset,
    load_cifar10,
    load_digits_images,
    load_image_folder,
    load_images,
)


def test_digits():
    digits = load_digits_images()
    assert digits.images.shape == (1797, 1, 8, 8)
    assert digits.images.dtype == np.float32
    assert digits.num_levels == 17 and digits.num_dims == 64
    assert digits.data_shape == (1, 8, 8)
    # The 17 levels 0..16 sit on the bin centres k/8 - 1 of [-1, 1].
    np.testing.assert_array_equal(np.unique(digits.images), np.linspace(-1, 1, 17))
    assert digits.labels is not None
    np.testing.assert_array_equal(np.unique(digits.labels), np.arange(10))
    # The same pixels as the flat loader, image by image.
    np.testing.assert_array_equal(
        digits.images.reshape(1797, 64), nf.load_digits(dtype=np.float32)
    )
    assert load_images("digits").images.shape == (1797, 1, 8, 8)


def test_decoder_bins_match_the_data():
    # That the decoder is normalised over its levels is tested in test_decoder.py
    # (`test_discretised_decoder_is_normalised`); here, that the loaders put the
    # pixels on its bin centres.
    digits = load_digits_images(dtype=np.float64)
    decoder = digits.decoder()
    assert decoder.num_bins == 17 and (decoder.low, decoder.high) == (-1.0, 1.0)
    x = jnp.asarray(digits.images[:16])
    np.testing.assert_array_equal(decoder.sample(x), x)
    np.testing.assert_array_equal(decoder.bin_index(x), (x + 1) * 8)


def test_bits_per_dim_closed_forms():
    dims = 64
    # A uniform distribution over 17 levels per pixel: D ln 17 nats, log2 17 bits/dim.
    assert float(bits_per_dim(dims * math.log(17), dims)) == pytest.approx(
        math.log2(17), rel=1e-12
    )
    # The same from a discretised decoder so broad that it is uniform over its bins.
    decoder = nf.DiscretisedGaussianDecoder(num_bins=17, scale=1e6)
    x = jnp.asarray(load_digits_images(dtype=np.float64).images[0])
    nll = decoder.nll(x, jnp.zeros_like(x))
    np.testing.assert_allclose(bits_per_dim(nll, dims), math.log2(17), rtol=1e-9)
    # 8-bit images under a uniform model: 8 bits/dim; arrays keep their shape.
    nats = jnp.full((3,), 3072 * math.log(256))
    np.testing.assert_allclose(bits_per_dim(nats, 3072), [8.0, 8.0, 8.0], rtol=1e-12)


@pytest.mark.parametrize("num_dims", [0, -3, True, 2.0])
def test_bits_per_dim_bad_dims(num_dims, no_typecheck):
    with pytest.raises(ValueError, match="positive integer"):
        bits_per_dim(1.0, num_dims)


def write_cifar(folder, names=None, n=3, seed=0):
    """Tiny fake CIFAR-10 python batches, pickled as the real ones (protocol 2, bytes
    keys); returns the pixels of each batch."""
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    rng = np.random.default_rng(seed)
    written = {}
    for name in names:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(k) for k in rng.integers(0, 10, n)]
        with open(folder / name, "wb") as file:
            pickle.dump({b"data": data, b"labels": labels}, file, protocol=2)
        written[name] = (data, labels)
    return written


def test_cifar10(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    written = write_cifar(folder)
    train = load_cifar10(folder)
    assert train.images.shape == (15, 3, 32, 32) and train.num_levels == 256
    assert train.images.dtype == np.float32
    first, labels = written["data_batch_1"]
    # A row is 1024 red, then 1024 green, then 1024 blue values, row by row.
    np.testing.assert_allclose(
        train.images[0, 1, 2, 5], first[0, 1024 + 2 * 32 + 5] / 127.5 - 1
    )
    assert train.labels is not None
    np.testing.assert_array_equal(train.labels[:3], labels)
    test = load_cifar10(folder, split="test", dtype=np.float64)
    np.testing.assert_allclose(
        (test.images + 1) * 127.5,
        written["test_batch"][0].reshape(3, 3, 32, 32),
        rtol=1e-12,
    )
    assert load_cifar10(folder, split="all").images.shape[0] == 18
    # The folder that contains `cifar-10-batches-py` is accepted too.
    assert load_cifar10(tmp_path, split="test").images.shape[0] == 3
    assert load_images("cifar10", root=folder, split="test").name == "cifar10-test"


def test_cifar10_default_root(tmp_path, monkeypatch):
    write_cifar(tmp_path / "cifar-10-batches-py", ["test_batch"])
    monkeypatch.setenv("NFDM_DATA", str(tmp_path))
    assert load_images("cifar10", split="test").images.shape == (3, 3, 32, 32)
    monkeypatch.setenv("NFDM_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="set NFDM_DATA to look elsewhere"):
        load_cifar10(split="test")


def test_cifar10_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz") as info:
        load_cifar10(tmp_path / "nowhere")
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in str(info.value)
    assert "data_batch_1" in str(info.value) and "test_batch" in str(info.value)
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, ["data_batch_1", "data_batch_2", "test_batch"])
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3, data_batch_4, "):
        load_cifar10(folder)
    assert load_cifar10(folder, split="test").images.shape[0] == 3


def test_unknown_arguments(tmp_path, no_typecheck):
    # Without the test suite's type checker, as users call them.
    with pytest.raises(ValueError, match="Unknown CIFAR-10 split 'valid'"):
        load_cifar10(tmp_path, split="valid")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="`channels` must be 1, 3 or None"):
        load_image_folder(tmp_path, channels=2)  # pyright: ignore[reportArgumentType]


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x80\x02}q\x00(X", "truncated, corrupt"),
        (b"not a pickle at all", "truncated, corrupt"),
        (pickle.dumps([1, 2, 3], protocol=2), "holds a list"),
        (pickle.dumps({b"data": np.zeros((2, 10), np.uint8)}), "found data: ndarray"),
        (pickle.dumps({b"data": np.zeros((2, 3072)), b"labels": [0, 1]}), "uint8"),
        (pickle.dumps({b"data": _RunsCode()}), "refusing to load builtins.print"),
    ],
)
def test_cifar10_corrupt(tmp_path, capsys, content, match):
    write_cifar(tmp_path, ["test_batch"])
    (tmp_path / "test_batch").write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        load_cifar10(tmp_path, split="test")
    assert str(tmp_path / "test_batch") in str(info.value)
    assert "download" in str(info.value).lower()
    assert capsys.readouterr().out == ""


def test_cifar10_numpy_pickles(tmp_path):
    # Batches re-saved with today's NumPy and pickle protocol load too.
    data = np.arange(2 * 3072).astype(np.uint8).reshape(2, 3072)
    with open(tmp_path / "test_batch", "wb") as file:
        pickle.dump({"data": data, "labels": np.array([3, 4])}, file, protocol=5)
    test = load_cifar10(tmp_path, split="test")
    np.testing.assert_array_equal(test.labels, [3, 4])
    assert test.images.shape == (2, 3, 32, 32)


def save_png(path, array, mode=None):
    Image.fromarray(array, mode).save(path)


def test_image_folder(tmp_path):
    grey = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    save_png(tmp_path / "b.png", grey)
    save_png(tmp_path / "a.PNG", 255 - grey)
    (tmp_path / "notes.txt").write_text("ignored")
    images = load_image_folder(tmp_path)
    assert images.images.shape == (2, 1, 4, 6) and images.num_levels == 256
    assert images.labels is None
    # Sorted by name: a.PNG first.
    np.testing.assert_allclose(images.images[0, 0], (255 - grey) / 127.5 - 1)
    np.testing.assert_allclose(images.images[1, 0], grey / 127.5 - 1)
    same = load_images("folder", root=tmp_path)
    np.testing.assert_array_equal(same.images, images.images)


def test_image_folder_colour(tmp_path):
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (5, 5), dtype=np.uint8)
    save_png(tmp_path / "0.png", colour)
    save_png(tmp_path / "1.png", grey)
    palette = Image.fromarray(colour).convert("P")
    palette.save(tmp_path / "2.png")
    opaque = np.concatenate([colour, np.full((5, 5, 1), 255, np.uint8)], -1)
    save_png(tmp_path / "3.png", opaque)
    images = load_image_folder(tmp_path, dtype=np.float64)
    assert images.images.shape == (4, 3, 5, 5)
    levels = (images.images + 1) * 127.5
    np.testing.assert_allclose(levels[0], colour.transpose(2, 0, 1))
    # Grey is repeated into three equal channels; an opaque alpha is dropped.
    np.testing.assert_allclose(levels[1], np.broadcast_to(grey, (3, 5, 5)))
    np.testing.assert_allclose(levels[3], levels[0])
    expected = np.asarray(palette.convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_allclose(levels[2], expected)
    # channels=1 uses Pillow's own luma transform.
    grey_images = load_image_folder(tmp_path, channels=1, dtype=np.float64)
    assert grey_images.images.shape == (4, 1, 5, 5)
    np.testing.assert_allclose(
        (grey_images.images[0, 0] + 1) * 127.5,
        np.asarray(Image.fromarray(colour).convert("L")),
    )


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No image folder at"):
        load_image_folder(tmp_path / "nowhere")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_image_folder(tmp_path / "file.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="No .png files.*it is empty"):
        load_image_folder(empty)
    (empty / "photo.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="it holds photo.jpg"):
        load_image_folder(empty)


@pytest.mark.parametrize(
    "second, match",
    [
        (np.zeros((4, 5), np.uint8), "differ in size: a.png is 4 x 4.*b.png is 4 x 5"),
        (np.zeros((4, 4, 4), np.uint8), "transparent pixels"),
        (np.zeros((4, 4), np.uint16), "mode 'I;16'"),
        (b"\x89PNG\r\n\x1a\n garbage", "truncated or corrupt"),
    ],
)
def test_image_folder_bad_files(tmp_path, second, match):
    save_png(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    if isinstance(second, bytes):
        (tmp_path / "b.png").write_bytes(second)
    else:
        save_png(tmp_path / "b.png", second)
    with pytest.raises(ValueError, match=match):
        load_image_folder(tmp_path)


def test_load_images_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown image data set 'mnist'.*'digits'"):
        load_images("mnist")
    with pytest.raises(ValueError, match="`root` does not apply to the 'digits'"):
        load_images("digits", root=tmp_path)
    with pytest.raises(ValueError, match="`split` does not apply to the 'folder'"):
        load_images("folder", root=tmp_path, split="test")
    with pytest.raises(ValueError, match="`channels` does not apply to the 'cifar10'"):
        load_images("cifar10", root=tmp_path, channels=1)
    with pytest.raises(ValueError, match="needs `root`"):
        load_images("folder")
    with pytest.raises(TypeError, match="floating-point dtype"):
        load_images("digits", dtype=np.int32)


def test_image_dataset_checks(no_typecheck):
    with pytest.raises(ValueError, match=r"\(n, channels, height, width\)"):
        ImageDataset(np.zeros((2, 8, 8)), 17)
    with pytest.raises(ValueError, match="num_levels >= 2"):
        ImageDataset(np.zeros((2, 1, 8, 8)), 1)
    with pytest.raises(ValueError, match="one label per image"):
        ImageDataset(np.zeros((2, 1, 8, 8)), 17, np.zeros(3, np.int64))


def test_split():
    digits = load_digits_images()
    train, held_out = digits.split(0.2, seed=0)
    # 20 % of 1797, rounded; every image on exactly one side, labels alongside.
    assert held_out.images.shape == (359, 1, 8, 8) and train.images.shape[0] == 1438
    assert held_out.num_levels == train.num_levels == 17
    both = np.concatenate([train.images, held_out.images]).reshape(1797, -1)
    assert len(np.unique(both, axis=0)) == len(
        np.unique(digits.images.reshape(1797, -1), axis=0)
    )
    assert train.labels is not None and held_out.labels is not None
    order = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(held_out.images, digits.images[order[:359]])
    assert digits.labels is not None
    np.testing.assert_array_equal(held_out.labels, digits.labels[order[:359]])
    # The same seed, the same split; another seed, another.
    np.testing.assert_array_equal(digits.split(0.2, seed=0)[1].images, held_out.images)
    assert not np.array_equal(digits.split(0.2, seed=1)[1].images, held_out.images)
    unlabelled = ImageDataset(digits.images[:10], 17)
    assert unlabelled.split(0.3)[1].labels is None
    assert unlabelled.split(0.3)[1].images.shape[0] == 3


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.01, -0.5])
def test_split_bad_fraction(fraction):
    with pytest.raises(ValueError, match="leaves images on both sides"):
        ImageDataset(np.zeros((10, 1, 8, 8)), 17).split(fraction)


def test_plot_images(tmp_path):
    grey = load_digits_images().images[:10]
    colour = np.random.default_rng(0).uniform(-1, 1, (5, 3, 4, 6))
    colour[0, :, 1, 1] = np.nan  # drawn white
    path = plotting.plot_images(
        {"digits": grey, "colour": colour}, tmp_path / "grid.png", num_columns=4
    )
    with Image.open(path) as image:
        assert image.size[0] > 100
    with pytest.raises(ValueError, match="at least one"):
        plotting.plot_images({}, tmp_path / "bad.png")


def test_plot_images_bad_shape(tmp_path, no_typecheck):
    flat = load_digits_images().images[:10].reshape(10, 64)
    with pytest.raises(ValueError, match=r"shape \(n, 1 or 3, height, width\)"):
        plotting.plot_images({"flat": flat}, tmp_path / "bad.png")
