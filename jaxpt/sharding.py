"""Meshes, partition rules -> `NamedSharding`s, and batches placed on a mesh (one host or many).

Mesh axes are `("data", "fsdp", "tensor")`. Parameters are laid out by per-family partition rules declared
next to each model (`jaxpt/models/llama.py: PARTITION_RULES`): `(regex over the HF parameter name, one mesh
axis or None per dimension)`, written for one decoder layer: a parameter under `layers` with one more dimension
than its rule is a stacked decoder-layer parameter (`[num_layers, ...]`) and gets an unsharded leading layer
axis. The batch is split over `("data", "fsdp")`.

Any leaf of any pytree that mirrors the parameters (gradients, optimizer moments inside an optax state, a
`TrainState`) gets the sharding of the parameter it mirrors: its name is read from the dictionary keys on its
path, which are the parameter's HF name, whatever optimizer wraps it.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

PartitionRules = Sequence[tuple[str, tuple[str | None, ...]]]


def make_mesh(*, data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `("data", "fsdp", "tensor")` mesh; one axis may be -1 (all remaining devices).

    Axis types are `Auto` (sharding propagated by XLA), which is what the models and steps are written for.
    """
    devices = list(devices) if devices is not None else jax.devices()
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    unknown = [name for name, size in sizes.items() if size == -1]
    if len(unknown) > 1:
        raise ValueError(f"Only one mesh axis may be -1, got {sizes}.")
    known = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {sizes}: fix the axis sizes.")
        sizes[unknown[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"Mesh {sizes} needs {math.prod(sizes.values())} devices but {len(devices)} are given: "
            "make data * fsdp * tensor equal the device count (or pass `devices=`)."
        )
    shape = tuple(sizes[name] for name in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def path_name(path: Sequence[Any]) -> str:
    """HF-style dotted name from a pytree key path, keeping only dictionary keys (attribute names, layer
    indices): `(.., DictKey('model'), DictKey('layers'), DictKey(0), .., GetAttrKey('value'))` -> `model.layers.0`."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, (str, int)):
            parts.append(str(key))
    return ".".join(parts)


def partition_spec(name: str, shape: Sequence[int], rules: PartitionRules, mesh: Mesh) -> PartitionSpec:
    """The first rule whose regex matches `name`; a dimension that its mesh axis does not divide is replicated.

    Rules describe one layer; a stacked decoder-layer parameter (`model.layers.mlp.up_proj.weight`
    `[num_layers, out, in]`: named under `layers`, one dimension more than its rule) keeps its layer axis unsharded.
    """
    axes = rule_axes(name, len(shape), rules)
    if axes is None:
        return PartitionSpec()
    spec = []
    for size, axis in zip(shape, axes, strict=True):
        if axis is not None and axis in mesh.shape and mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0:
            spec.append(axis)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def rule_axes(name: str, ndim: int, rules: PartitionRules) -> tuple[str | None, ...] | None:
    """The mesh axis (or None) per dimension the first matching rule gives a parameter of `ndim` dimensions.

    A LoRA matrix (`q_proj.lora_a` `[r, in]`, `q_proj.lora_b` `[out, r]`, `jaxpt.lora`) follows the rule of its
    layer's `weight` `[out, in]`: `lora_a` splits `in` as the weight does, `lora_b` its `out`; the rank stays whole.
    A quantized weight's scales (`weight_scale` `[out, in / block]`, `jaxpt.quantize`) follow the weight's rule.
    """
    for suffix, keep in ((".lora_a", 1), (".lora_b", 0)):
        if name.endswith(suffix):
            weight_axes = rule_axes(name[: -len(suffix)] + ".weight", ndim, rules)
            if weight_axes is None:
                return None
            *layer_axis, out_axis, in_axis = weight_axes
            return (*layer_axis, None, in_axis) if keep else (*layer_axis, out_axis, None)
    if name.endswith(".weight_scale"):  # a quantized weight's block scales [out, in / block] (jaxpt.quantize)
        return rule_axes(name[: -len("_scale")], ndim, rules)
    stacked = "layers" in name.split(".")
    for pattern, axes in rules:
        if stacked and len(axes) + 1 == ndim:
            axes = (None, *axes)
        if re.search(pattern, name) and len(axes) == ndim:
            return tuple(axes)
    return None


def tree_shardings(tree: Any, mesh: Mesh, rules: PartitionRules) -> Any:
    """A `NamedSharding` for every array leaf of `tree` (params, grads, optimizer state, TrainState)."""

    def sharding(path, leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, partition_spec(path_name(path), shape, rules, mesh))

    return jax.tree_util.tree_map_with_path(sharding, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, *, batch_axis: int = 0) -> NamedSharding:
    """Dimension `batch_axis` split over `("data", "fsdp")`, the rest replicated (`batch_axis=1` for the
    `[accumulation, micro_batch, ...]` arrays of a train step)."""
    return NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), BATCH_AXES))


def batch_divisor(mesh: Mesh | None) -> int:
    """How many ways the batch is split: `data * fsdp`."""
    if mesh is None:
        return 1
    return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh | None, *, batch_axis: int = 0,
                global_batch: bool = False, check_shapes: bool = True) -> dict[str, jax.Array]:
    """Place a host batch on the mesh, dimension `batch_axis` split over `("data", "fsdp")`.

    By default each process passes its own rows (`jax.process_count() == 1`: all of them) and the global batch
    is those of every process (`jax.make_array_from_process_local_data`). With `global_batch=True` every process
    passes an array of the global batch's shape and puts only its own rows on its devices (the rows of other
    processes' devices are never read: they may be stand-ins, as in the `train()` loops, which prepare only their
    own rows).
    On several processes, all must pass the same fields with the same shapes and dtypes (`check_same_shapes`, one
    small collective): a mismatch is a `ValueError` naming the field and each process's shape, not a failed
    collective. `check_shapes=False` skips that collective, for callers whose processes already agreed on the
    shapes (the `train()` loops agree on every batch's padded length before the first step,
    `jaxpt.distributed.DataShare.agree_steps`).
    """
    if mesh is None:
        return {key: jax.numpy.asarray(value) for key, value in batch.items()}
    batch = {key: np.asarray(value) for key, value in batch.items()}
    if jax.process_count() > 1 and check_shapes:
        check_same_shapes(batch, what="shard_batch")
    sharding = batch_sharding(mesh, batch_axis=batch_axis)
    divisor = batch_divisor(mesh)
    out = {}
    for key, value in batch.items():
        global_rows = value.shape[batch_axis] * (1 if global_batch else _process_share(mesh))
        if global_rows % divisor:
            raise ValueError(
                f"Batch field {key!r} has {global_rows} rows, which the mesh's data*fsdp={divisor} does not "
                "divide: make the (per-step) batch size a multiple of data*fsdp."
            )
        if global_batch and jax.process_count() == 1:
            out[key] = jax.device_put(value, sharding)
        elif global_batch:  # each process copies only its own shards' rows: the others may be stand-ins
            out[key] = jax.make_array_from_callback(value.shape, sharding, lambda index, value=value: value[index])
        else:
            global_shape = (*value.shape[:batch_axis], global_rows, *value.shape[batch_axis + 1:])
            out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def process_rows(mesh: Mesh, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """`(own, first_owner)`, booleans `[rows]` for a batch dimension of `rows` split over `("data", "fsdp")`: the
    rows this process's devices hold, and those of them no lower-numbered process holds (so sums over rows count
    each once where a row is replicated on several processes, e.g. a `tensor` axis across hosts)."""
    owners = np.full(rows, jax.process_count(), np.int64)
    own = np.zeros(rows, bool)
    for device, index in NamedSharding(mesh, PartitionSpec(BATCH_AXES)).devices_indices_map((rows,)).items():
        owners[index[0]] = np.minimum(owners[index[0]], device.process_index)
        if device.process_index == jax.process_index():
            own[index[0]] = True
    return own, owners == jax.process_index()


def _process_share(mesh: Mesh) -> int:
    """How many times this process's rows go into the global batch: batch shards in all / this process's."""
    coordinates = np.argwhere(np.vectorize(lambda d: d.process_index == jax.process_index())(mesh.devices))
    axes = [MESH_AXES.index(name) for name in BATCH_AXES]
    local_shards = {tuple(c[axes]) for c in coordinates}
    return batch_divisor(mesh) // max(len(local_shards), 1)


DESCRIPTION_BYTES = 4096  # room for every process's field list in the mismatch report


def check_same_shapes(batch: Mapping[str, Any], *, what: str = "batch") -> None:
    """On several processes: `ValueError` unless every process holds the same field names, shapes and dtypes.

    One small collective (a digest per process) in the normal case; only on a mismatch a second one gathers each
    process's description for the message. Every process must call it at the same point (all do, or the
    collective waits)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    description = json.dumps({key: [list(np.shape(v)), str(np.asarray(v).dtype)] for key, v in sorted(batch.items())},
                             separators=(",", ":"))
    digest = np.asarray([zlib.crc32(description.encode()), len(description)], np.int64)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    if (digests == digests[0]).all():
        return
    encoded = np.zeros(DESCRIPTION_BYTES, np.uint8)
    raw = np.frombuffer(description.encode()[:DESCRIPTION_BYTES], np.uint8)
    encoded[:len(raw)] = raw
    gathered = np.asarray(multihost_utils.process_allgather(encoded))
    per_process = [bytes(row).rstrip(b"\0").decode(errors="replace") for row in gathered]
    try:
        fields = [json.loads(text) for text in per_process]
    except json.JSONDecodeError:
        fields = None
    if fields is not None:
        names = sorted(set().union(*fields))
        lines = []
        for name in names:
            seen = [tuple(f[name][0]) if name in f else None for f in fields]
            dtypes = [f[name][1] if name in f else None for f in fields]
            if len(set(seen)) > 1 or len(set(dtypes)) > 1:
                each = ", ".join(f"process {i}: " + ("missing" if s is None else f"{s} {d}")
                                 for i, (s, d) in enumerate(zip(seen, dtypes, strict=True)))
                lines.append(f"field {name!r}: {each}")
        detail = "; ".join(lines)
    else:
        detail = "; ".join(f"process {i}: {text}" for i, text in enumerate(per_process))
    raise ValueError(f"{what}: the {jax.process_count()} processes disagree on the batch's shapes ({detail}). Every "
                     "process must build its rows with the same fields, row count and padded length: pad to one "
                     "length agreed by all processes (e.g. jaxpt.sharding.agreed_max(local_longest)) or a fixed "
                     "max_length.")


def agreed_max(value: int) -> int:
    """The largest of every process's `value` (one small collective on several processes; `value` itself on
    one): e.g. the padded length all processes use for a batch, from each one's longest row."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray([value], np.int64))))


def put_global(tree: Any, shardings: Any) -> Any:
    """`jax.device_put` for values every process holds whole (numpy, or arrays on its own devices, PRNG keys too)
    onto shardings that may span processes: each process places its own shards. `shardings`: one sharding for
    every leaf, or a matching tree. On one process it is `jax.device_put`."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(value, sharding):
        if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(value), sharding),
                                            impl=jax.random.key_impl(value))
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            return jax.device_put(value, sharding)  # already global: only a change of layout
        return jax.device_put(np.asarray(value), sharding)

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda value: put(value, shardings), tree)
    return jax.tree.map(put, tree, shardings)


def host_array(array: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array as numpy, on every process."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def mesh_from_config(config) -> Mesh:
    """The mesh a `TrainingConfig` asks for (`mesh_data`, `mesh_fsdp`, `mesh_tensor`; one may be -1 for the
    remaining devices). Fixed sizes that need fewer devices than exist use the first ones (one process only: on
    several, the mesh spans every process's devices, `jax.devices()`)."""
    sizes = {"data": config.mesh_data, "fsdp": config.mesh_fsdp, "tensor": config.mesh_tensor}
    devices = jax.devices()
    if -1 not in sizes.values():
        needed = math.prod(sizes.values())
        if needed > len(devices):
            raise ValueError(f"Mesh {sizes} needs {needed} devices; only {len(devices)} exist: lower mesh_data / "
                             "mesh_fsdp / mesh_tensor.")
        if needed < len(devices) and jax.process_count() > 1:
            raise ValueError(f"Mesh {sizes} uses {needed} of the {len(devices)} devices of the "
                             f"{jax.process_count()} processes: on several processes the mesh must span them all "
                             "(set one of mesh_data / mesh_fsdp / mesh_tensor to -1).")
        devices = devices[:needed]
    return make_mesh(**sizes, devices=devices)
