"""Checkpoints for long training runs: atomic, checksummed files, so that a crash
costs nothing but the time since the last checkpoint.

Each checkpoint is one file, `ckpt_{step:08d}.eqx`, laid out as

| bytes | content |
| --- | --- |
| 8 | magic bytes `b"\\x89NFDMCK\\n"` |
| 4 | format version, little-endian `uint32` (now 1) |
| 8 | header length $n$, little-endian `uint64` |
| 32 | SHA-256 of the header |
| $n$ | header: UTF-8 JSON |
| rest | payload |

The JSON header holds `step`, `metadata`, `payload_length`, `payload_sha256` and
`leaves`, the structure fingerprint: one record per leaf of the state, in
`jax.tree_util` order, with its path (`jax.tree_util.keystr`) and kind:

- `"array"`: a JAX or NumPy array, with `shape` and `dtype`;
- `"key"`: a typed PRNG key array, with `shape`, `dtype` (e.g. `"key<fry>"`), `impl`
    (e.g. `"threefry2x32"`) and the `data_shape`/`data_dtype` of its
    `jax.random.key_data`;
- `"python"`: a Python `bool`, `int`, `float`, `complex` or `str`, whose `value` is
    stored in the header itself (floats exactly, as `float.hex`);
- `"static"`: anything Equinox treats as static (functions, classes, enums, bytes);
    not stored, but taken from the template `like` when loading.

The payload is the raw bytes of the `"array"` leaves and of the key data of the
`"key"` leaves, in leaf order, each in C order and little-endian, with no padding:
given the header, NumPy alone can read it back.
"""

import contextlib
import enum
import hashlib
import json
import os
import pathlib
import re
import secrets
import struct
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ._checks import _is_traced


_MAGIC = b"\x89NFDMCK\n"
_FORMAT_VERSION = 1
_PREFIX = struct.Struct("<IQ32s")  # version, header length, header SHA-256
_PREFIX_SIZE = len(_MAGIC) + _PREFIX.size
_NAME = re.compile(r"ckpt_(\d{8,})\.eqx")
# Temporary files start with a dot and end in `.tmp`, so that neither `ckpt_*.eqx`
# nor `list_checkpoints` ever sees a half-written file.
_TEMP_NAME = re.compile(r"\.ckpt_\d{8,}\.eqx\.[0-9a-f]+\.tmp")
_PYTHON_TYPES = (bool, int, float, complex, str)


class CheckpointError(ValueError):
    """Raised by [`nfdm_sciml.load_checkpoint`][] for a checkpoint that cannot be
    used: truncated, corrupt (a checksum fails), not a checkpoint at all, written in
    another format version, or saved from a state whose structure differs from the
    template `like`.

    The message names the file, says what is wrong and what to do. The attribute
    `path` is the unusable file, and `intact` the newest earlier checkpoint in the
    same directory that does load with the same `like` (or `None` if there is none):
    a script that wants to resume from it must say so, by loading `intact`
    explicitly.
    """

    path: pathlib.Path | None = None
    intact: pathlib.Path | None = None


class _Unusable(Exception):
    """Internal: why one file cannot be loaded, as a clause that follows its name."""

    def __init__(self, problem: str, *, structure: bool = False):
        super().__init__(problem)
        self.problem = problem
        self.structure = structure


def _checkpoint_name(step: int) -> str:
    return f"ckpt_{step:08d}.eqx"


def _step_of(path: pathlib.Path) -> int | None:
    match = _NAME.fullmatch(path.name)
    return None if match is None else int(match[1])


def list_checkpoints(directory: str | os.PathLike) -> list[pathlib.Path]:
    """Lists the checkpoint files in a directory, oldest step first.

    Only complete files named `ckpt_{step:08d}.eqx` are listed: the temporary files
    of a save that was interrupted are not. The files are not read, so a damaged one
    is listed too; [`nfdm_sciml.load_checkpoint`][] checks them.

    **Arguments:**

    - `directory`: the directory given to [`nfdm_sciml.save_checkpoint`][].

    **Returns:**

    The paths, sorted by step; an empty list if the directory holds none or does not
    exist yet (so that a script can decide whether to resume or start).
    """
    directory = pathlib.Path(directory)
    if not directory.exists():
        return []
    if not directory.is_dir():
        raise NotADirectoryError(
            f"{directory} is a file, not a directory; pass the directory that "
            "`save_checkpoint` writes to, or the file itself to `load_checkpoint`."
        )
    found = []
    for entry in directory.iterdir():
        step = _step_of(entry)
        if step is not None and entry.is_file():
            found.append((step, entry.name, entry))
    return [entry for _, _, entry in sorted(found)]


#
# Leaves: what each one is, and how it is stored.
#


def _is_key(leaf) -> bool:
    return jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _is_storable_dtype(dtype) -> bool:
    # Numbers and booleans, including the ML dtypes JAX adds (bfloat16, float8);
    # not objects, strings, dates or structured records.
    return dtype == np.bool_ or jnp.issubdtype(dtype, np.number)


def _is_static(leaf) -> bool:
    return callable(leaf) or isinstance(leaf, enum.Enum | bytes)


def _unstorable(path: str, leaf, why: str) -> TypeError:
    return TypeError(
        f"The leaf `{path}` is {why}, which a checkpoint cannot store: leaves must be "
        "JAX or NumPy arrays of numbers or booleans, typed PRNG keys, Python "
        "numbers or strings, or static objects such as functions; mark other fields "
        "`eqx.field(static=True)`, or pass the value through `metadata`."
    )


def _describe(path: str, leaf, *, template: bool) -> dict[str, Any]:
    """The structure record of one leaf (see the module docstring)."""
    if _is_traced(leaf):
        raise TypeError(
            f"The leaf `{path}` is a traced value: checkpoints are written and read "
            "outside `jax.jit`, `jax.vmap` and `jax.grad`; call them on concrete "
            "arrays, after the jitted step returns."
        )
    is_shape_only = template and isinstance(leaf, jax.ShapeDtypeStruct)
    if isinstance(leaf, jax.Array) or is_shape_only:
        kind = "key" if _is_key(leaf) else "array"
    elif isinstance(leaf, np.ndarray | np.generic):
        if not _is_storable_dtype(leaf.dtype):
            raise _unstorable(path, leaf, f"a NumPy array of dtype {leaf.dtype}")
        kind = "array"
    else:
        kind = None
    if kind is not None:
        shape = list(leaf.shape)
        return {"path": path, "kind": kind, "shape": shape, "dtype": str(leaf.dtype)}
    if isinstance(leaf, _PYTHON_TYPES):
        return {"path": path, "kind": "python", "type": type(leaf).__name__}
    if _is_static(leaf):
        return {"path": path, "kind": "static", "type": type(leaf).__qualname__}
    raise _unstorable(path, leaf, f"an object of type {type(leaf).__qualname__}")


def _python_value(leaf) -> Any:
    if isinstance(leaf, float):
        return leaf.hex()
    if isinstance(leaf, complex):
        return [leaf.real.hex(), leaf.imag.hex()]
    return leaf


def _python_leaf(record: dict[str, Any]) -> Any:
    value = record["value"]
    if record["type"] == "float":
        return float.fromhex(value)
    if record["type"] == "complex":
        return complex(float.fromhex(value[0]), float.fromhex(value[1]))
    return value


def _little_endian(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    return array.astype(array.dtype.newbyteorder("<"), copy=False)


def _encode(state) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The structure records of `state` and the payload's chunks, one per array."""
    records, chunks = [], []
    # TODO: arrays sharded over several hosts are not fully addressable, so
    # `np.asarray` fails on them; `Trainer.save` gathers replicated state to the host
    # first, but a user saving a host-sharded state directly hits this. Writing one
    # payload per host would lift the limit.
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        record = _describe(jax.tree_util.keystr(key_path), leaf, template=False)
        if record["kind"] == "key":
            record["impl"] = str(jax.random.key_impl(leaf))
            data = np.asarray(jax.random.key_data(leaf))
            record["data_shape"] = list(data.shape)
            record["data_dtype"] = str(data.dtype)
            chunks.append(_little_endian(data).tobytes())
        elif record["kind"] == "array":
            chunks.append(_little_endian(np.asarray(leaf)).tobytes())
        elif record["kind"] == "python":
            record["value"] = _python_value(leaf)
        records.append(record)
    return records, chunks


def _first_non_string_key(value, where: str) -> str | None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{where}[{k!r}]"
            found = _first_non_string_key(v, f"{where}[{k!r}]")
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = _first_non_string_key(v, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def _check_metadata(metadata) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise TypeError(
            f"`metadata` must be a dict, got a {type(metadata).__qualname__}; wrap "
            "the value, for example `metadata={'config': value}`."
        )
    bad_key = _first_non_string_key(metadata, "metadata")
    if bad_key is not None:
        raise TypeError(
            f"`{bad_key}` has a key that is not a string, which JSON would silently "
            "turn into one; use string keys throughout `metadata`."
        )
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"`metadata` must be JSON-serialisable, but {error}; use dicts, lists, "
            "strings, Python numbers, booleans and None (convert arrays with "
            "`.tolist()` and NumPy numbers with `float()` or `int()`)."
        ) from None
    return metadata


#
# Saving.
#


def _write_chunks(file, chunks: Sequence[bytes]) -> None:
    for chunk in chunks:
        file.write(chunk)


def _fsync_directory(directory: pathlib.Path) -> None:
    # Makes the rename itself durable. POSIX only: Windows cannot open a directory.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: pathlib.Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    state: PyTree,
    *,
    metadata: dict | None = None,
    keep: int = 3,
) -> pathlib.Path:
    """Saves a training state to `directory/ckpt_{step:08d}.eqx`, atomically.

    The file is written under a temporary name in the same directory, flushed to
    disk, and only then renamed onto its final name (and the directory flushed too),
    so a crash at any point leaves either the complete new checkpoint or none:
    never a partial file under a checkpoint's name. After the save succeeds, the
    oldest checkpoints beyond the newest `keep` are deleted, and so are temporary
    files left by earlier saves that were interrupted.

    The state can be any pytree of JAX and NumPy arrays: models, EMA copies, optax
    states (their integer step counters included), typed PRNG keys from
    `jax.random.key` and raw `uint32` keys. Python numbers and strings among its
    leaves are stored too; static leaves such as activation functions are not, and
    are taken from the template when loading. Values are not checked: a state with
    NaNs saves as it is.

    !!! warning

        One run writes to one directory. Saving a step below one already in the
        directory raises a `ValueError` (the newer file would shadow the new one when
        resuming); saving the same step again replaces that checkpoint.

    **Arguments:**

    - `directory`: where to save; created if needed.
    - `step`: the training step, a non-negative integer; it names the file.
    - `state`: the pytree to save, with concrete (not traced) arrays.
    - `metadata`: JSON-serialisable extras stored in the header: the configuration,
        data standardisation statistics, and so on. Its keys must be strings, and
        tuples come back as lists.
    - `keep`: how many of the newest checkpoints to keep, at least 1.

    **Returns:**

    The path of the checkpoint written.
    """
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(
            f"`step` must be an int, got a {type(step).__qualname__}; pass the "
            "training step as a Python int, for example `int(step)`."
        )
    if step < 0:
        raise ValueError(f"`step` must be non-negative, got {step}.")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(
            f"`keep` must be an integer of at least 1, got {keep!r}: the checkpoint "
            "just written is always kept."
        )
    metadata = _check_metadata(metadata)
    records, chunks = _encode(state)
    directory = pathlib.Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(
            f"{directory} is a file, not a directory; pass a directory to save into."
        )
    later = [p for p in list_checkpoints(directory) if (_step_of(p) or 0) > step]
    if later:
        raise ValueError(
            f"{directory} already holds {later[-1].name}, from a step after {step}; "
            "save this run into a new directory, or delete the later checkpoints "
            "first if it resumes from an earlier one."
        )

    payload_hash = hashlib.sha256()
    for chunk in chunks:
        payload_hash.update(chunk)
    header = {
        "step": step,
        "metadata": metadata,
        "leaves": records,
        "payload_length": sum(len(chunk) for chunk in chunks),
        "payload_sha256": payload_hash.hexdigest(),
    }
    header_bytes = json.dumps(header).encode("utf-8")
    header_hash = hashlib.sha256(header_bytes).digest()
    prefix = _MAGIC + _PREFIX.pack(_FORMAT_VERSION, len(header_bytes), header_hash)

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / _checkpoint_name(step)
    temp = directory / f".{final.name}.{secrets.token_hex(8)}.tmp"
    # `os.open` with mode 0o666 so that the file gets the permissions the umask
    # allows, like any other file (`tempfile.mkstemp` would make it owner-only).
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        with os.fdopen(os.open(temp, flags, 0o666), "wb") as file:
            _write_chunks(file, [prefix, header_bytes, *chunks])
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, final)
    except BaseException:
        _remove_quietly(temp)
        raise
    _fsync_directory(directory)

    for old in list_checkpoints(directory)[:-keep]:
        if old != final:
            _remove_quietly(old)
    for entry in directory.iterdir():
        if _TEMP_NAME.fullmatch(entry.name):
            _remove_quietly(entry)
    return final


#
# Loading.
#


def _template_records(like) -> tuple[list[tuple[dict[str, Any], Any]], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    described = [
        (_describe(jax.tree_util.keystr(key_path), leaf, template=True), leaf)
        for key_path, leaf in flat
    ]
    return described, treedef


def _signature(record: dict[str, Any]) -> str:
    """How a leaf reads in an error message: `float64[8,3]`, `key<fry>[]`, ..."""
    if record["kind"] in ("array", "key"):
        return f"{record['dtype']}[{','.join(str(n) for n in record['shape'])}]"
    if record["kind"] == "python":
        return f"a Python {record['type']}"
    return "a static (non-array) leaf"


def _comparable(record: dict[str, Any]) -> tuple:
    if record["kind"] in ("array", "key"):
        return (record["kind"], tuple(record["shape"]), record["dtype"])
    if record["kind"] == "python":
        return (record["kind"], record["type"])
    return (record["kind"],)


def _check_structure(saved: list[dict[str, Any]], template) -> None:
    saved_paths = [record["path"] for record in saved]
    template_paths = [record["path"] for record, _ in template]
    if saved_paths != template_paths:
        missing = [p for p in saved_paths if p not in set(template_paths)]
        extra = [p for p in template_paths if p not in set(saved_paths)]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"the leaf `{missing[0]}` is in the checkpoint only")
            if extra:
                parts.append(f"the leaf `{extra[0]}` is in `like` only")
            detail = " and ".join(parts)
        else:
            detail = "its leaves come in another order than those of `like`"
        raise _Unusable(
            f"its state has {len(saved_paths)} leaves and `like` has "
            f"{len(template_paths)}, and {detail}",
            structure=True,
        )
    for record, (expected, _) in zip(saved, template, strict=True):
        if _comparable(record) != _comparable(expected):
            raise _Unusable(
                f"the leaf `{record['path']}` is {_signature(record)} in the "
                f"checkpoint but {_signature(expected)} in `like`",
                structure=True,
            )


def _check_header(header) -> None:
    fields = {
        "step": int,
        "metadata": dict,
        "leaves": list,
        "payload_length": int,
        "payload_sha256": str,
    }
    for name, kind in fields.items():
        if not isinstance(header, dict) or not isinstance(header.get(name), kind):
            raise _Unusable(f"its header has no valid `{name}` field")
    for record in header["leaves"]:
        if not (isinstance(record, dict) and "path" in record and "kind" in record):
            raise _Unusable("its header lists a leaf without a path or kind")


def _parse(data: bytes) -> tuple[dict[str, Any], memoryview]:
    """Checks the framing and both checksums; returns the header and the payload."""
    if not data:
        raise _Unusable("the file is empty (it is truncated)")
    if len(data) < len(_MAGIC):
        if _MAGIC.startswith(data):
            raise _Unusable(f"the file is truncated after {len(data)} bytes")
        raise _Unusable("it is not an nfdm_sciml checkpoint (wrong magic bytes)")
    if data[: len(_MAGIC)] != _MAGIC:
        raise _Unusable("it is not an nfdm_sciml checkpoint (wrong magic bytes)")
    if len(data) < _PREFIX_SIZE:
        raise _Unusable(f"the file is truncated after {len(data)} bytes")
    version, header_length, header_hash = _PREFIX.unpack_from(data, len(_MAGIC))
    if version != _FORMAT_VERSION:
        raise _Unusable(
            f"it has format version {version}, but this nfdm_sciml reads version "
            f"{_FORMAT_VERSION} only (load it with the nfdm_sciml release that wrote "
            "it)"
        )
    header_end = _PREFIX_SIZE + header_length
    if len(data) < header_end:
        raise _Unusable(
            f"the file is truncated: its header needs {header_end} bytes but the "
            f"file has {len(data)}"
        )
    header_bytes = data[_PREFIX_SIZE:header_end]
    if hashlib.sha256(header_bytes).digest() != header_hash:
        raise _Unusable("its header fails its SHA-256 check (the file is corrupt)")
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _Unusable("its header is not valid JSON (the file is corrupt)") from None
    _check_header(header)

    payload = memoryview(data)[header_end:]
    expected = header["payload_length"]
    if len(payload) < expected:
        raise _Unusable(
            f"the file is truncated: its payload should have {expected} bytes but has "
            f"{len(payload)}"
        )
    if len(payload) > expected:
        raise _Unusable(
            f"it has {len(payload) - expected} unexpected bytes after its payload "
            "(the file is corrupt)"
        )
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise _Unusable("its payload fails its SHA-256 check (the file is corrupt)")
    return header, payload


def _place(value, like_leaf):
    """Puts a restored array where the template's array lives."""
    sharding = getattr(like_leaf, "sharding", None)
    if isinstance(like_leaf, jax.Array) and sharding is not None:
        return jax.device_put(value, sharding)
    return value


def _restore_leaf(record: dict[str, Any], like_leaf, payload: memoryview, offset: int):
    """One leaf from the payload at `offset`; returns it and the next offset."""
    if record["kind"] == "key":
        shape, dtype = record["data_shape"], jnp.dtype(record["data_dtype"])
    else:
        shape, dtype = record["shape"], jnp.dtype(record["dtype"])
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.frombuffer(
        payload[offset : offset + size], dtype=dtype.newbyteorder("<")
    ).reshape(shape)
    array = np.array(raw, dtype=dtype)  # a native-order, writable copy
    if record["kind"] == "key":
        keys = jax.random.wrap_key_data(jnp.asarray(array), impl=record["impl"])
        return _place(keys, like_leaf), offset + size
    if isinstance(like_leaf, np.generic):
        return array[()], offset + size
    if isinstance(like_leaf, np.ndarray):
        return array, offset + size
    return _place(jnp.asarray(array), like_leaf), offset + size


def _read(path: pathlib.Path, template, treedef) -> tuple[PyTree, dict[str, Any]]:
    """Loads one file against the flattened template, or raises `_Unusable`."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise _Unusable("it is a directory, not a file") from None
    header, payload = _parse(data)
    _check_structure(header["leaves"], template)

    leaves, offset = [], 0
    for record, (_, like_leaf) in zip(header["leaves"], template, strict=True):
        if record["kind"] in ("array", "key"):
            leaf, offset = _restore_leaf(record, like_leaf, payload, offset)
        elif record["kind"] == "python":
            leaf = _python_leaf(record)
        else:
            leaf = like_leaf
        leaves.append(leaf)
    if offset != len(payload):
        raise _Unusable(
            "its leaves do not add up to its payload's length (the file is corrupt)"
        )
    state = jax.tree_util.tree_unflatten(treedef, leaves)
    info = {
        "step": header["step"],
        "metadata": header["metadata"],
        "path": path,
        "format_version": _FORMAT_VERSION,
    }
    return state, info


def _earlier_checkpoints(path: pathlib.Path) -> list[pathlib.Path]:
    """The checkpoints in `path`'s directory with an earlier step, newest first."""
    step = _step_of(path)
    if step is None:
        return []
    return [
        earlier
        for earlier in reversed(list_checkpoints(path.parent))
        if (_step_of(earlier) or 0) < step
    ]


def load_checkpoint(
    path_or_directory: str | os.PathLike, like: PyTree
) -> tuple[PyTree, dict[str, Any]]:
    """Loads a checkpoint written by [`nfdm_sciml.save_checkpoint`][].

    Given a directory, it loads the newest checkpoint there. Every check runs before
    anything is returned: the file's framing, the SHA-256 of its header and of its
    payload, and its structure against `like`. If the checkpoint fails one, a
    [`nfdm_sciml.CheckpointError`][] says what is wrong and names the newest earlier
    checkpoint that is intact (and loads with this `like`), if any: it never falls
    back to that one by itself, and it never modifies or deletes a file.

    **Arguments:**

    - `path_or_directory`: a checkpoint file, or the directory to take the newest
        from.
    - `like`: a pytree of the same structure as the saved state, such as a freshly
        initialised model and optimiser state, or its `eqx.filter_eval_shape`.
        Its arrays give the expected shapes and dtypes (and where the loaded arrays
        are placed); its static leaves, such as activation functions, are used as
        they are.

    **Returns:**

    `(state, header)`: the state, with the structure of `like`, and a dict with the
    checkpoint's `step`, `metadata`, `path` and `format_version`.
    """
    path = pathlib.Path(path_or_directory)
    if not path.exists():
        raise FileNotFoundError(
            f"There is no checkpoint at {path} (the path does not exist); pass a "
            "checkpoint file or the directory that `save_checkpoint` wrote to."
        )
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise FileNotFoundError(
                f"There is no checkpoint in {path} (it holds no `ckpt_*.eqx` file); "
                "pass the directory that `save_checkpoint` wrote to, or start a new "
                "run."
            )
        path = found[-1]
    template, treedef = _template_records(like)
    try:
        return _read(path, template, treedef)
    except _Unusable as unusable:
        failure = unusable

    # Find the newest earlier checkpoint that loads with this `like`, and note the
    # newest undamaged one that does not, to tell the user which one to take.
    intact, mismatched = None, None
    for earlier in _earlier_checkpoints(path):
        try:
            _read(earlier, template, treedef)
        except OSError:
            continue
        except _Unusable as unusable:
            if unusable.structure and mismatched is None:
                mismatched = (earlier, unusable)
            continue
        intact = earlier
        break

    if intact is not None:
        advice = (
            f"the newest earlier checkpoint, {intact.name}, is intact: pass {intact} "
            "to `load_checkpoint` explicitly, or start a new run"
        )
    elif failure.structure:
        advice = (
            "build `like` the way the run that saved it did (the same model kind, "
            "sizes and optimiser), or start a new run"
        )
    elif mismatched is not None:
        advice = (
            f"the earlier checkpoint {mismatched[0].name} is undamaged, but "
            f"{mismatched[1].problem}: build `like` the way the run that saved it "
            "did, or start a new run"
        )
    elif _step_of(path) is None:
        advice = "load another checkpoint, or start a new run"
    else:
        advice = f"no earlier checkpoint in {path.parent} is intact: start a new run"
    error = CheckpointError(f"Cannot load {path}: {failure.problem}; {advice}.")
    error.path = path
    error.intact = intact
    raise error
