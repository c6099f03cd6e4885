import os

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import nfdm_sciml as nf
from nfdm_sciml import _checkpoint


def _state(seed=0):
    """A small training state: model, EMA copy, adam state after two updates, keys."""
    model = nf.build_model("nfdm", 2, key=jr.key(seed), width_size=8, depth=1)
    optimiser = optax.adam(1e-2)
    params = eqx.filter(model, eqx.is_inexact_array)
    opt_state = optimiser.init(params)
    # Jitted: compiling the update once is quicker than running optax op by op.
    update = eqx.filter_jit(optimiser.update)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(2):
        with jax.numpy_dtype_promotion("standard"):
            _, opt_state = update(grads, opt_state, params)
    return {
        "model": model,
        "ema": jax.tree.map(lambda x: 0.5 * x, params),
        "opt_state": opt_state,
        "key": jr.key(seed + 1),
        "keys": jr.split(jr.key(seed + 2), 3),
        "raw_key": jr.PRNGKey(seed + 3),
        "host": np.arange(6, dtype=np.int16).reshape(2, 3) + seed,
        "scalar": np.float32(0.25 + seed),
        "python": [seed + 7, 0.1 + seed, "adam"],
    }


def _assert_same(a, b, *, same_types=True):
    flat_a, tree_a = jax.tree_util.tree_flatten(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b, strict=True):
        assert type(x) is type(y) or not same_types
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(jr.key_data(x), jr.key_data(y))
        elif isinstance(x, jax.Array | np.ndarray | np.generic):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)
        else:
            assert x is y or x == y


def _temp_files(directory):
    return [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_round_trip(tmp_path):
    state = _state(0)
    path = nf.save_checkpoint(tmp_path, 12, state)
    assert path == tmp_path / "ckpt_00000012.eqx"
    loaded, header = nf.load_checkpoint(tmp_path, _state(1))
    _assert_same(loaded, state)
    assert loaded["opt_state"][0].count.dtype == jnp.int32
    assert int(loaded["opt_state"][0].count) == 2
    assert header["step"] == 12 and header["metadata"] == {}
    assert header["path"] == path
    # The loaded keys draw what the saved ones did.
    np.testing.assert_array_equal(jr.normal(loaded["key"]), jr.normal(state["key"]))


def test_shape_only_template(tmp_path):
    state = _state(0)
    nf.save_checkpoint(tmp_path, 0, state)
    loaded, _ = nf.load_checkpoint(tmp_path, eqx.filter_eval_shape(_state, 1))
    # NumPy leaves come back as JAX arrays, as `like` has only their shape and dtype.
    _assert_same(loaded, state, same_types=False)
    assert isinstance(loaded["host"], jax.Array)


def test_metadata_round_trip(tmp_path):
    metadata = {
        "config": {"kind": "nfdm", "width_size": 8, "lr": 1e-3, "ema": None},
        "standardiser": {"mean": [0.5, -1.25], "scale": [2.0, 3.0]},
        "flags": [True, False],
        "note": "résumé ✓",
    }
    nf.save_checkpoint(tmp_path, 3, {"x": jnp.ones(2)}, metadata=metadata)
    _, header = nf.load_checkpoint(tmp_path, {"x": jnp.zeros(2)})
    assert header["metadata"] == metadata


def test_keep_last(tmp_path):
    for step in range(1, 6):
        nf.save_checkpoint(tmp_path, step * 10, {"x": jnp.full(2, step)}, keep=2)
    names = [p.name for p in nf.list_checkpoints(tmp_path)]
    assert names == ["ckpt_00000040.eqx", "ckpt_00000050.eqx"]
    nf.save_checkpoint(tmp_path, 60, {"x": jnp.zeros(2, int)}, keep=1)
    assert [p.name for p in nf.list_checkpoints(tmp_path)] == ["ckpt_00000060.eqx"]


def test_list_checkpoints(tmp_path):
    assert nf.list_checkpoints(tmp_path / "missing") == []
    for name in ["ckpt_00000100.eqx", "ckpt_00000020.eqx", "ckpt_123456789.eqx"]:
        (tmp_path / name).write_bytes(b"")
    for name in ["notes.txt", "ckpt_7.eqx", ".ckpt_00000200.eqx.0a1b.tmp"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "ckpt_00000300.eqx").mkdir()
    names = [p.name for p in nf.list_checkpoints(tmp_path)]
    assert names == ["ckpt_00000020.eqx", "ckpt_00000100.eqx", "ckpt_123456789.eqx"]


def test_failed_rename_keeps_previous(tmp_path, monkeypatch):
    state = {"x": jnp.arange(3.0)}
    first = nf.save_checkpoint(tmp_path, 1, state)
    before = first.read_bytes()

    def fail(*args):
        raise OSError("simulated failure of the rename")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="simulated"):
        nf.save_checkpoint(tmp_path, 2, {"x": jnp.zeros(3)})
    monkeypatch.undo()
    assert nf.list_checkpoints(tmp_path) == [first]
    assert _temp_files(tmp_path) == []
    assert first.read_bytes() == before
    _assert_same(nf.load_checkpoint(tmp_path, state)[0], state)


def test_failed_write_keeps_previous(tmp_path, monkeypatch):
    state = {"x": jnp.arange(3.0)}
    first = nf.save_checkpoint(tmp_path, 1, state)

    def write_half(file, chunks):
        data = b"".join(chunks)
        file.write(data[: len(data) // 2])
        raise OSError("simulated full disk")

    monkeypatch.setattr(_checkpoint, "_write_chunks", write_half)
    with pytest.raises(OSError, match="full disk"):
        nf.save_checkpoint(tmp_path, 2, {"x": jnp.zeros(3)})
    monkeypatch.undo()
    assert nf.list_checkpoints(tmp_path) == [first]
    assert _temp_files(tmp_path) == []
    _assert_same(nf.load_checkpoint(tmp_path, state)[0], state)


class _Killed(BaseException):
    pass


def test_killed_save_is_ignored_then_cleaned(tmp_path, monkeypatch):
    # A process killed mid-write runs no cleanup: the half-written temporary file
    # stays behind. Simulate that by failing the write and disabling the cleanup.
    state = {"x": jnp.arange(3.0)}
    first = nf.save_checkpoint(tmp_path, 1, state)

    def write_half(file, chunks):
        data = b"".join(chunks)
        file.write(data[: len(data) // 2])
        file.flush()
        raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(_checkpoint, "_write_chunks", write_half)
        patch.setattr(_checkpoint, "_remove_quietly", lambda path: None)
        with pytest.raises(_Killed):
            nf.save_checkpoint(tmp_path, 2, {"x": jnp.zeros(3)})
    (leftover,) = _temp_files(tmp_path)
    assert leftover.stat().st_size > 0
    assert nf.list_checkpoints(tmp_path) == [first]
    _assert_same(nf.load_checkpoint(tmp_path, state)[0], state)

    second = nf.save_checkpoint(tmp_path, 2, {"x": jnp.zeros(3)})
    assert nf.list_checkpoints(tmp_path) == [first, second]
    assert _temp_files(tmp_path) == []


@pytest.mark.parametrize("keep_bytes", [0, 5, 30, "header", "payload"])
def test_truncated(tmp_path, keep_bytes):
    path = nf.save_checkpoint(tmp_path, 1, {"x": jnp.arange(8.0)})
    data = path.read_bytes()
    if keep_bytes == "header":
        keep_bytes = _checkpoint._PREFIX_SIZE + 10
    elif keep_bytes == "payload":
        keep_bytes = len(data) - 3
    path.write_bytes(data[:keep_bytes])
    with pytest.raises(nf.CheckpointError, match="truncated") as info:
        nf.load_checkpoint(path, {"x": jnp.zeros(8)})
    assert str(path) in str(info.value)


def test_flipped_payload_byte(tmp_path):
    path = nf.save_checkpoint(tmp_path, 1, {"x": jnp.arange(8.0)})
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(nf.CheckpointError, match="payload fails its SHA-256"):
        nf.load_checkpoint(path, {"x": jnp.zeros(8)})


def test_flipped_header_byte(tmp_path):
    path = nf.save_checkpoint(tmp_path, 1, {"x": jnp.arange(8.0)}, metadata={"a": 1})
    data = bytearray(path.read_bytes())
    data[_checkpoint._PREFIX_SIZE + 3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(nf.CheckpointError, match="header fails its SHA-256"):
        nf.load_checkpoint(path, {"x": jnp.zeros(8)})


def test_trailing_bytes(tmp_path):
    path = nf.save_checkpoint(tmp_path, 1, {"x": jnp.arange(8.0)})
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(nf.CheckpointError, match="1 unexpected bytes"):
        nf.load_checkpoint(path, {"x": jnp.zeros(8)})


@pytest.mark.parametrize(
    "content", [b"hello, this is not a checkpoint at all", b"PK\x03", b'{"step": 1}']
)
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "ckpt_00000001.eqx"
    path.write_bytes(content)
    with pytest.raises(nf.CheckpointError, match="not an nfdm_sciml checkpoint"):
        nf.load_checkpoint(path, {"x": jnp.zeros(8)})


def test_wrong_format_version(tmp_path):
    path = nf.save_checkpoint(tmp_path, 1, {"x": jnp.arange(8.0)})
    data = bytearray(path.read_bytes())
    data[8:12] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(nf.CheckpointError, match="format version 99"):
        nf.load_checkpoint(path, {"x": jnp.zeros(8)})


def test_structure_mismatch(tmp_path):
    def model(width):
        return nf.build_model("nfdm", 2, key=jr.key(0), width_size=width, depth=1)

    nf.save_checkpoint(tmp_path, 1, {"model": model(8), "step": jnp.array(1)})
    with pytest.raises(nf.CheckpointError) as info:
        nf.load_checkpoint(tmp_path, {"model": model(16), "step": jnp.array(0)})
    message = str(info.value)
    assert "['model'].forward.net.mlp.layers[0].weight" in message
    assert "float64[8,3] in the checkpoint but float64[16,3] in `like`" in message
    assert "build `like`" in message


@pytest.mark.parametrize(
    "like, found",
    [
        ({"x": jnp.zeros(3), "y": jnp.zeros(2)}, "`['y']` is in `like` only"),
        ({"w": jnp.zeros(3)}, "`['x']` is in the checkpoint only"),
        ({"x": jnp.zeros(3, jnp.float32)}, "float64[3] in the checkpoint but float32"),
        ({"x": jr.key(0)}, "float64[3] in the checkpoint but key<fry>[]"),
        ({"x": 3.0}, "but a Python float in `like`"),
    ],
)
def test_structure_mismatch_names_the_leaf(tmp_path, like, found):
    nf.save_checkpoint(tmp_path, 1, {"x": jnp.arange(3.0)})
    with pytest.raises(nf.CheckpointError, match="ckpt_00000001.eqx") as info:
        nf.load_checkpoint(tmp_path, like)
    assert found in str(info.value)


def test_newest_corrupt_names_the_intact_one(tmp_path):
    state = {"x": jnp.arange(4.0), "key": jr.key(3)}
    good = nf.save_checkpoint(tmp_path, 1000, state)
    bad_too = nf.save_checkpoint(tmp_path, 1500, state)
    newest = nf.save_checkpoint(tmp_path, 2000, state)
    bad_too.write_bytes(bad_too.read_bytes()[:-1])
    newest.write_bytes(newest.read_bytes()[:40])
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(nf.CheckpointError) as info:
        nf.load_checkpoint(tmp_path, state)
    message = str(info.value)
    assert "ckpt_00002000.eqx" in message and "truncated" in message
    assert f"pass {good} to `load_checkpoint` explicitly" in message
    assert "ckpt_00001500.eqx" not in message
    assert info.value.path == newest and info.value.intact == good
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before
    # Loading the damaged file by name says the same.
    with pytest.raises(nf.CheckpointError, match="ckpt_00001000.eqx"):
        nf.load_checkpoint(bad_too, state)
    loaded, header = nf.load_checkpoint(good, state)
    _assert_same(loaded, state)
    assert header["step"] == 1000


def test_no_intact_checkpoint(tmp_path):
    path = nf.save_checkpoint(tmp_path, 1, {"x": jnp.arange(4.0)})
    path.write_bytes(b"\x89NFDMCK\n" + b"\x00" * 60)
    with pytest.raises(nf.CheckpointError, match="start a new run") as info:
        nf.load_checkpoint(tmp_path, {"x": jnp.zeros(4)})
    assert info.value.intact is None


def test_earlier_checkpoint_of_another_structure(tmp_path):
    nf.save_checkpoint(tmp_path, 1, {"x": jnp.arange(4.0)})
    newest = nf.save_checkpoint(tmp_path, 2, {"x": jnp.arange(4.0)})
    newest.write_bytes(newest.read_bytes()[:-1])
    with pytest.raises(nf.CheckpointError) as info:
        nf.load_checkpoint(tmp_path, {"x": jnp.zeros(5)})
    message = str(info.value)
    assert "ckpt_00000002.eqx: the file is truncated" in message
    assert "ckpt_00000001.eqx is undamaged, but the leaf `['x']` is" in message
    assert info.value.intact is None


def test_missing_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nf.load_checkpoint(tmp_path / "nowhere", {"x": jnp.zeros(4)})
    with pytest.raises(FileNotFoundError, match=f"no checkpoint in {tmp_path}"):
        nf.load_checkpoint(tmp_path, {"x": jnp.zeros(4)})
    (tmp_path / ".ckpt_00000001.eqx.00ff.tmp").write_bytes(b"\x89NFDMCK\n")
    with pytest.raises(FileNotFoundError, match="holds no `ckpt_\\*.eqx` file"):
        nf.load_checkpoint(tmp_path, {"x": jnp.zeros(4)})


def test_save_into_later_run_refused(tmp_path):
    nf.save_checkpoint(tmp_path, 5, {"x": jnp.zeros(2)})
    with pytest.raises(ValueError, match="already holds ckpt_00000005.eqx"):
        nf.save_checkpoint(tmp_path, 4, {"x": jnp.zeros(2)})
    # The same step again replaces the checkpoint.
    nf.save_checkpoint(tmp_path, 5, {"x": jnp.ones(2)})
    loaded, _ = nf.load_checkpoint(tmp_path, {"x": jnp.zeros(2)})
    np.testing.assert_array_equal(loaded["x"], jnp.ones(2))


@pytest.mark.parametrize("keep", [0, -1])
def test_bad_keep(tmp_path, keep):
    with pytest.raises(ValueError, match="`keep` must be an integer of at least 1"):
        nf.save_checkpoint(tmp_path, 1, {"x": jnp.zeros(2)}, keep=keep)
    assert not any(tmp_path.iterdir())


def test_bad_step(tmp_path, no_typecheck):
    with pytest.raises(ValueError, match="non-negative"):
        nf.save_checkpoint(tmp_path, -1, {"x": jnp.zeros(2)})
    with pytest.raises(TypeError, match="`step` must be an int"):
        nf.save_checkpoint(tmp_path, 1.0, {"x": jnp.zeros(2)})  # pyright: ignore


@pytest.mark.parametrize(
    "leaf, found",
    [
        (object(), "an object of type object"),
        (np.array(["a"]), "a NumPy array of dtype <U1"),
        (np.array([None]), "a NumPy array of dtype object"),
    ],
)
def test_unstorable_leaf(tmp_path, leaf, found):
    with pytest.raises(TypeError, match="`\\['y'\\]\\[0\\]` is") as info:
        nf.save_checkpoint(tmp_path, 1, {"x": jnp.zeros(2), "y": [leaf]})
    assert found in str(info.value)
    assert not any(tmp_path.iterdir())


def test_traced_state(tmp_path):
    with pytest.raises(TypeError, match="traced value"):
        jax.jit(lambda x: nf.save_checkpoint(tmp_path, 1, {"x": x}))(jnp.zeros(2))


@pytest.mark.parametrize(
    "metadata, found",
    [
        ({"mean": np.zeros(2)}, "JSON-serialisable"),
        ({"config": {1: "a"}}, "`metadata['config'][1]` has a key that is not a str"),
    ],
)
def test_bad_metadata(tmp_path, metadata, found):
    with pytest.raises(TypeError, match="metadata") as info:
        nf.save_checkpoint(tmp_path, 1, {"x": jnp.zeros(2)}, metadata=metadata)
    assert found in str(info.value)


def test_metadata_not_a_dict(tmp_path, no_typecheck):
    with pytest.raises(TypeError, match="`metadata` must be a dict"):
        nf.save_checkpoint(tmp_path, 1, {"x": jnp.zeros(2)}, metadata=[1])  # pyright: ignore
