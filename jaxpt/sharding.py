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

import math
import re
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
    """
    for suffix, keep in ((".lora_a", 1), (".lora_b", 0)):
        if name.endswith(suffix):
            weight_axes = rule_axes(name[: -len(suffix)] + ".weight", ndim, rules)
            if weight_axes is None:
                return None
            *layer_axis, out_axis, in_axis = weight_axes
            return (*layer_axis, None, in_axis) if keep else (*layer_axis, out_axis, None)
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


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh | None, *, batch_axis: int = 0) -> dict[str, jax.Array]:
    """Place a host batch on the mesh, dimension `batch_axis` split over `("data", "fsdp")`.

    Each process passes its own rows (`jax.process_count() == 1`: all of them); the global batch is
    `process_count * local rows` and is built with `jax.make_array_from_process_local_data`.
    """
    if mesh is None:
        return {key: jax.numpy.asarray(value) for key, value in batch.items()}
    sharding = batch_sharding(mesh, batch_axis=batch_axis)
    divisor = batch_divisor(mesh)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        global_rows = value.shape[batch_axis] * jax.process_count()
        if global_rows % divisor:
            raise ValueError(
                f"Batch field {key!r} has {global_rows} rows, which the mesh's data*fsdp={divisor} does not "
                "divide: make the (per-step) batch size a multiple of data*fsdp."
            )
        global_shape = (*value.shape[:batch_axis], global_rows, *value.shape[batch_axis + 1:])
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def mesh_from_config(config) -> Mesh:
    """The mesh a `TrainingConfig` asks for (`mesh_data`, `mesh_fsdp`, `mesh_tensor`; one may be -1 for the
    remaining devices). Fixed sizes that need fewer devices than exist use the first ones.

    This is what the batteries-included `train()` loops use, and they feed every process the whole global
    batch: they run on one host (any number of devices). On several hosts, write the loop with the method's
    `make_train_step` and give each process its own rows through `shard_batch`."""
    if jax.process_count() > 1:
        raise ValueError(f"The train() loops run on one host, but jax.process_count()={jax.process_count()}: on "
                         "several hosts, call make_train_step yourself and shard_batch each process's own rows.")
    sizes = {"data": config.mesh_data, "fsdp": config.mesh_fsdp, "tensor": config.mesh_tensor}
    devices = jax.devices()
    if -1 not in sizes.values():
        needed = math.prod(sizes.values())
        if needed > len(devices):
            raise ValueError(f"Mesh {sizes} needs {needed} devices; only {len(devices)} exist: lower mesh_data / "
                             "mesh_fsdp / mesh_tensor.")
        devices = devices[:needed]
    return make_mesh(**sizes, devices=devices)
