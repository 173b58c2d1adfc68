"""An ONNX source brought into the work as one self-contained file.

A model saved with external data keeps its weights in sidecar files named by each tensor's
``location``. Those are read here, only from inside the model's own directory (an absolute path,
``..`` or a symlink that leads out is refused, and so is a hidden file), with each tensor's
offset, length and dims checked against the file, and written inline: every later pass, and the
cache that keys passes by the model file's sha256, then sees the weights in the one file it
hashes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelpack.errors import ConfigError
from optimize.npz import nbytes

PROTOBUF_LIMIT = (2 << 30) - 1  # a serialized ModelProto past this cannot be written inline


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Any) -> Iterator[Any]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for graph in attr.graphs:
                yield from _graph_tensors(graph)


def _tensors(model: Any) -> Iterator[Any]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def _sidecar(source: Path, root: Path, location: str) -> Path:
    """The sidecar ``location`` names, refused unless it is a regular file inside ``root``."""
    where = f"{source.name}: external data {location!r}"
    bad = ("\\", ":", "\x00")  # a NUL makes every path call raise ValueError
    if not location or Path(location).is_absolute() or any(c in location for c in bad):
        raise ConfigError(f"{where} is not a relative path inside the model's directory")
    if any(part.startswith(".") and part not in (".", "..") for part in Path(location).parts):
        # Exporters name sidecars after the model; a model kept in a home directory would
        # otherwise reach ~/.aws/credentials or ~/.ssh/id_ed25519 without leaving its directory.
        raise ConfigError(
            f"{where} is hidden or in a hidden directory, where credentials live, not weights;"
            " it is not read: keep the model's data in plainly named files beside it"
        )
    path = (root / location).resolve()
    if not path.is_relative_to(root) or path == root:
        raise ConfigError(f"{where} leads out of the model's directory {root}; it is not read")
    if not path.exists():
        raise ConfigError(f"{where} is missing (looked for {path})")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise ConfigError(f"{where} is not a regular file")
    return path


def _int(entries: dict[str, str], key: str, where: str) -> int | None:
    if key not in entries:
        return None
    try:
        value = int(entries[key])
    except ValueError as exc:
        raise ConfigError(f"{where}: {key} {entries[key]!r} is not a number") from exc
    if value < 0:
        raise ConfigError(f"{where}: {key} {value} is negative")
    return value


def _expected_bytes(tensor: Any) -> int | None:
    """The raw size the dims and type give; None for strings, which have no fixed size."""
    import onnx

    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"tensor {tensor.name!r} has no known data type ({exc})") from exc
    return nbytes(tensor.dims, dtype)


def _inline(source: Path, root: Path, tensor: Any) -> int:
    """Read one tensor's external bytes into ``raw_data``; return how many were read."""
    import onnx

    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    where = f"{source.name}: tensor {tensor.name!r}"
    path = _sidecar(source, root, location)
    offset = _int(entries, "offset", where) or 0
    size = path.stat().st_size
    if offset > size:
        raise ConfigError(f"{where} starts at byte {offset} of {location}, which has {size}")
    length = _int(entries, "length", where)
    length = size - offset if length is None else length
    if offset + length > size:
        raise ConfigError(
            f"{where} wants bytes {offset}..{offset + length} of {location}, which has {size}"
        )
    expected = _expected_bytes(tensor)
    if expected is not None and expected != length:
        raise ConfigError(
            f"{where} has dims {list(tensor.dims)} ({expected} bytes) but {length} bytes of data"
        )
    if length > PROTOBUF_LIMIT:
        raise ConfigError(f"{where} is {length} bytes; ONNX tensors past 2 GiB are not supported")
    with path.open("rb") as sidecar:
        sidecar.seek(offset)
        tensor.raw_data = sidecar.read(length)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    return length


def copy_onnx(source: Path, dst: Path) -> None:
    """Write ``source`` to ``dst`` with any external data inlined from inside its directory."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(source), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{source.name} is not a readable ONNX model: {exc}") from exc
    external = [t for t in _tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        dst.write_bytes(source.read_bytes())  # the exact bytes: the cache key stays the file's
        return
    root = source.parent.resolve()
    total = source.stat().st_size
    for tensor in external:
        total += _inline(source, root, tensor)
        if total > PROTOBUF_LIMIT:
            raise ConfigError(
                f"{source.name} with its external data is past 2 GiB, the most one ONNX file"
                " holds; models that large are not supported by edgebento optimize"
            )
    onnx.save(model, str(dst))
