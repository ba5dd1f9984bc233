"""Read and write Hugging Face safetensors without going through a framework.

The format is an 8-byte little-endian header length, a JSON header (`name -> {dtype, shape, data_offsets}`)
and the raw tensor bytes. Reading memory-maps each file, so a tensor (or one shard of it, on a mesh) is read
straight from the page cache into the array that needs it: no full host copy per device, bfloat16 included.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class SafetensorsReader:
    """All tensors of a checkpoint directory (one `model.safetensors` or a sharded index), by name."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        if index_path.exists():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_FILE).exists():
            files = [SINGLE_FILE]
        else:
            found = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not found:
                raise FileNotFoundError(
                    f"No safetensors weights in {self.directory}: looked for {SINGLE_FILE} and {INDEX_FILE} "
                    "(only the safetensors format is read; convert .bin/.pt checkpoints with transformers first)."
                )
            files = found
        self._entries: dict[str, tuple[Path, dict, int]] = {}
        for file_name in files:
            path = self.directory / file_name
            header, data_start = read_header(path)
            for name, entry in header.items():
                if name != "__metadata__":
                    self._entries[name] = (path, entry, data_start)
        self._maps: dict[Path, np.memmap] = {}

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self._entries[name][1]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of the tensor; slicing it reads only the slice."""
        path, entry, data_start = self._entries[name]
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        raw = self._maps[path][data_start + begin : data_start + end]
        return raw.view(dtype).reshape(entry["shape"])


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """`(header, data_start)` of a safetensors file; `ValueError` naming the file when it is truncated or not a
    safetensors file (an interrupted download or copy), instead of a raw struct/JSON/memmap error later."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if header_size is None or 8 + header_size > size:
            raise ValueError(f"{path} is truncated or not a safetensors file ({size} bytes; the header alone "
                             "needs more): download or save it again.")
        try:
            header = json.loads(f.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} has a damaged safetensors header ({error}): download or save it again.") from None
    data_end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    if 8 + header_size + data_end > size:
        raise ValueError(f"{path} is truncated: its header describes {8 + header_size + data_end} bytes, the file has "
                         f"{size}. Download or save it again.")
    return header, 8 + header_size


def load_array(
    reader: SafetensorsReader,
    name: str,
    *,
    dtype,
    sharding: jax.sharding.Sharding | None = None,
) -> jax.Array:
    """Tensor `name` as a jax array of `dtype`; with a `sharding`, each device reads only its own slice."""
    view = reader.get(name)
    if sharding is None:
        return jax.numpy.asarray(np.asarray(view).astype(dtype))
    return jax.make_array_from_callback(view.shape, sharding, lambda index: np.asarray(view[index]).astype(dtype))


def load_stacked_array(
    reader: SafetensorsReader,
    names: list[str],
    *,
    dtype,
    sharding: jax.sharding.Sharding | None = None,
) -> jax.Array:
    """Tensors `names` (one per decoder layer, equal shapes) stacked along a new leading axis, as one jax array of
    `dtype`; with a `sharding`, each device reads only its own slice of each layer's tensor."""
    views = [reader.get(name) for name in names]
    shape = (len(views), *views[0].shape)
    if sharding is None:
        return jax.numpy.asarray(np.stack([np.asarray(view).astype(dtype) for view in views]))

    def read(index):
        rows = range(len(views))[index[0]]
        return np.stack([np.asarray(views[row][index[1:]]).astype(dtype) for row in rows])

    return jax.make_array_from_callback(shape, sharding, read)


def to_host(array: jax.Array) -> np.ndarray:
    """A full numpy copy of a (possibly sharded, possibly multi-host) array."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, *, metadata: dict | None = None) -> None:
    """Write `tensors` as one safetensors file (`{"format": "pt"}` metadata, as `transformers` writes)."""
    ordered = sorted(tensors.items())
    specs = [TensorToWrite(name, tuple(array.shape), array.dtype, lambda array=array: np.asarray(array))
             for name, array in ordered]
    _write_file(Path(path), specs, metadata=metadata, write=True)


@dataclasses.dataclass(frozen=True)
class TensorToWrite:
    """One tensor of a checkpoint being written: its name, shape and dtype (known before any data moves, so file
    headers and shard boundaries are fixed up front) and `fetch`, called once when its bytes are due, on every
    process in the same order, returning the host copy on the writing process (None on the others)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fetch: Callable[[], np.ndarray | None]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def shard_file_names(count: int) -> list[str]:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` for `count > 1` (transformers' names)."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def plan_shards(tensors: Sequence[TensorToWrite], max_shard_bytes: int) -> list[list[TensorToWrite]]:
    """Tensors split, in order, into files of at most `max_shard_bytes` (a larger tensor gets a file of its own)."""
    shards: list[list[TensorToWrite]] = [[]]
    shard_bytes = 0
    for tensor in tensors:
        if shards[-1] and shard_bytes + tensor.nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(tensor)
        shard_bytes += tensor.nbytes
    return shards


def write_checkpoint(
    tensors: Sequence[TensorToWrite],
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 1024**3,
    write: bool | None = None,
) -> list[str]:
    """Stream `tensors` into `model.safetensors`, or into `model-0000i-of-0000n.safetensors` files of at most
    `max_shard_bytes` plus `model.safetensors.index.json`: each tensor is fetched, written and dropped before the
    next, so host memory holds one tensor at a time. Every process must call it (fetches may be collectives); only
    the writing one (`write`, default: process 0) touches the disk. Returns the file names written."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_size={max_shard_bytes} must be > 0 bytes.")
    write = jax.process_index() == 0 if write is None else write
    directory = Path(directory)
    shards = plan_shards(tensors, max_shard_bytes)
    names = shard_file_names(len(shards))
    if write:
        directory.mkdir(parents=True, exist_ok=True)
        _remove_stale_weights(directory, keep=names)
    for file_name, shard in zip(names, shards, strict=True):
        _write_file(directory / file_name, shard, write=write)
    if write and len(shards) > 1:
        weight_map = {tensor.name: file_name
                      for file_name, shard in zip(names, shards, strict=True) for tensor in shard}
        total = sum(tensor.nbytes for tensor in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return names if write else []


def _remove_stale_weights(directory: Path, *, keep: list[str]) -> None:
    """Weights files of an earlier export into the same directory that this one does not overwrite (a single file
    left beside a new sharded index, or shards of another count) would be read as part of the new checkpoint."""
    stale = [directory / SINGLE_FILE, directory / INDEX_FILE, *directory.glob("model-*-of-*.safetensors")]
    for path in stale:
        if path.name not in keep and path.is_file():
            path.unlink()


def _write_file(path: Path, tensors: Sequence[TensorToWrite], *, metadata: dict | None = None, write: bool) -> None:
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for tensor in tensors:
        dtype = np.dtype(tensor.dtype)
        if dtype not in _NAMES:
            raise ValueError(f"Cannot save tensor {tensor.name!r} of dtype {dtype} to safetensors; supported: "
                             f"{sorted(str(d) for d in _NAMES)}.")
        if tensor.name in header:
            raise ValueError(f"Tensor name {tensor.name!r} appears twice in one checkpoint.")
        header[tensor.name] = {"dtype": _NAMES[dtype], "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    if not write:
        for tensor in tensors:
            tensor.fetch()  # this process's part in each gather; the writer's copy is the one written
        return
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # keep the data 8-byte aligned
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for tensor in tensors:
            host = tensor.fetch()
            if host is None or tuple(host.shape) != tuple(tensor.shape) or host.dtype != np.dtype(tensor.dtype):
                got = None if host is None else (tuple(host.shape), host.dtype)
                raise RuntimeError(f"Tensor {tensor.name!r} came back as {got}, not the planned "
                                   f"{(tuple(tensor.shape), np.dtype(tensor.dtype))}.")
            f.write(memoryview(np.ascontiguousarray(host).reshape(-1).view(np.uint8)))
            del host  # one tensor on the host at a time
    os.replace(partial, path)  # a complete file or none: an interrupted export never leaves a truncated one


def save_checkpoint(
    named_arrays: Iterable[tuple[str, jax.Array | np.ndarray]] | Mapping[str, jax.Array | np.ndarray],
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 1024**3,
) -> list[str]:
    """Write arrays as `model.safetensors`, or as `model-0000i-of-0000n.safetensors` + index when larger than
    `max_shard_bytes`, streaming one array at a time to the host. Only process 0 writes; every process must call it
    (sharded arrays are gathered)."""
    items = named_arrays.items() if isinstance(named_arrays, Mapping) else named_arrays
    tensors = [TensorToWrite(name, tuple(array.shape), np.dtype(array.dtype), lambda array=array: to_host(array))
               for name, array in items]
    return write_checkpoint(tensors, directory, max_shard_bytes=max_shard_bytes)
