"""Hugging Face models in Flax NNX: `from_pretrained` / `save_pretrained`, dispatching on `model_type`.

```python
model = jaxpt.models.from_pretrained("path/to/hf_dir")          # causal LM: model(ids) -> [b, s, vocab]
rm = jaxpt.models.from_pretrained("path/to/hf_dir", num_labels=1)  # classifier: rm(ids) -> [b, 1]
jaxpt.models.save_pretrained(model, "out_dir")                   # transformers loads it back
```
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.models import gemma, llama, qwen2, qwen3
from jaxpt.models.attention import resolve_attn_implementation
from jaxpt.models.safetensors_io import (
    SafetensorsReader,
    TensorToWrite,
    load_array,
    load_stacked_array,
    write_checkpoint,
)
from jaxpt.sharding import partition_spec, path_name

# model_type (config.json) -> the family module that ports it.
FAMILIES = {
    "llama": llama,
    "mistral": llama,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "gemma2": gemma,
    "gemma3_text": gemma,
}

__all__ = ["from_pretrained", "save_pretrained", "from_config", "load_hf_config", "FAMILIES", "param_names",
           "hf_tensor_names", "set_gradient_checkpointing", "export_dtype", "gather_to_host", "merge_adapter"]


def resolve_checkpoint_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a Hub id fetched (config + safetensors only) to the HF cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; from_pretrained needs a directory with config.json and *.safetensors.")
    name = str(name_or_path)
    looked = path.resolve()
    # only a local path can look like this (a Hub id is org/name): fail now, not after the Hub's retries
    if (name.count("/") > 1 or name.startswith((".", "/", "~")) or "\\" in name
            or name.endswith((".safetensors", ".json", ".bin"))):
        raise FileNotFoundError(f"No model directory at {looked} (model_name_or_path={name!r}): check the path; a "
                                "Hub id has the form org/name.")
    try:
        import huggingface_hub

        return Path(huggingface_hub.snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as error:  # offline, unknown repo, gated ...
        raise FileNotFoundError(
            f"{name!r} is not a local directory (looked in {looked}) and could not be fetched from the Hugging "
            f"Face Hub: {type(error).__name__}: {error}. Pass a local directory with config.json and "
            "*.safetensors, or make the Hub reachable."
        ) from error


def load_hf_config(directory: str | os.PathLike):
    """The `transformers` config of a checkpoint directory (legacy fields normalised by transformers)."""
    import transformers

    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"No config.json in {directory}.")
    return transformers.AutoConfig.from_pretrained(directory)


def _family(model_type: str):
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type={model_type!r} is not supported by jaxpt; supported: {sorted(FAMILIES)}."
        )
    return FAMILIES[model_type]


def from_config(
    hf_config,
    *,
    num_labels: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs | None = None,
    seed: int = 0,
    attn_implementation: str | None = None,
) -> nnx.Module:
    """A freshly initialised model for a `transformers` config object (e.g. `transformers.LlamaConfig(...)`).

    `attn_implementation` (one of `jaxpt.models.attention.ATTN_IMPLEMENTATIONS`: "xla", "cudnn", "splash",
    "flash"; transformers' "eager" / "sdpa" mean "xla") picks the attention kernel; by default the one the
    config names (`hf_config._attn_implementation`), else "xla".
    """
    family = _family(hf_config.model_type)
    config = family.CONFIG.from_hf(hf_config)
    if attn_implementation is not None:
        config = dataclasses.replace(config, attn_implementation=resolve_attn_implementation(attn_implementation))
    rngs = rngs if rngs is not None else nnx.Rngs(seed)
    if num_labels is None:
        return family.CAUSAL_LM[hf_config.model_type](config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return family.SEQUENCE_CLASSIFICATION[hf_config.model_type](
        config, num_labels=num_labels, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


def set_gradient_checkpointing(model: nnx.Module, enabled: bool = True) -> nnx.Module:
    """Rematerialise every decoder layer in the backward pass (`jax.checkpoint`), or stop doing so. Set it before
    `TrainState.create` / jitting: it is part of the model's static structure. Returns the model."""
    backbone = getattr(model, "model", None)
    if backbone is None or not hasattr(backbone, "gradient_checkpointing"):
        raise ValueError(f"{type(model).__name__} has no decoder stack to checkpoint.")
    backbone.gradient_checkpointing = bool(enabled)
    return model


def param_names(model: nnx.Module) -> list[str]:
    """Names of the model's parameters: HF's, except that decoder layers are stacked, so
    `model.layers.self_attn.q_proj.weight` (`[num_layers, out, in]`) holds HF's `model.layers.{i}.self_attn...`
    in row i (`hf_tensor_names`)."""
    return [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]]


def hf_tensor_names(name: str, num_layers: int) -> list[str]:
    """The Hugging Face tensor(s) a parameter holds: `[name]`, or for a stacked decoder-layer parameter
    (`model.layers.mlp.up_proj.weight`) one name per layer (`model.layers.{i}.mlp.up_proj.weight`, row i)."""
    prefix, sep, rest = name.partition("layers.")
    if not sep or (prefix and not prefix.endswith(".")):
        return [name]
    return [f"{prefix}layers.{index}.{rest}" for index in range(num_layers)]


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    num_labels: int | None = None,
    seed: int = 0,
    attn_implementation: str | None = None,
    adapter: str | os.PathLike | None = None,
    quantization: str | None = None,
) -> nnx.Module:
    """Load a Hugging Face checkpoint directory (or Hub id) into a jaxpt model.

    `quantization`: "nf4" (TRL's `load_in_4bit`) or "int8" (`load_in_8bit`) stores the decoder layers' linear
    weights quantized (`jaxpt.quantize`, for QLoRA), quantized layer by layer while they are read: at most one
    layer's float weight exists at a time, never the float model. The result equals `quantize_model` of the float
    model, bit for bit.

    `adapter`: a LoRA adapter directory in peft's format (`adapter_config.json` + `adapter_model.safetensors`,
    written by peft or `jaxpt.lora.save_adapter`), attached to the loaded model (`jaxpt.lora.load_adapter`).

    `dtype` is the compute dtype, `param_dtype` the stored one (`"auto"`: the checkpoint's own, as transformers'
    `dtype="auto"`). The checkpoint's dtype is recorded on `model.config` (its HF config's `dtype`):
    `save_pretrained` exports in it by default. With `num_labels`, the
    `*ForSequenceClassification` variant (`score` head, freshly initialised when the checkpoint has none, as
    `transformers` does). With `mesh`, each parameter is read shard by shard straight onto its devices,
    laid out by the family's partition rules. `attn_implementation` picks the attention kernel (see
    `from_config`).
    """
    if attn_implementation is not None:
        resolve_attn_implementation(attn_implementation)  # a bad name fails before any file is read
    directory = resolve_checkpoint_dir(name_or_path)
    hf_config = load_hf_config(directory)
    family = _family(hf_config.model_type)
    reader = SafetensorsReader(directory)
    stored_dtype = _config_dtype(hf_config) or _first_floating_dtype(reader)
    if stored_dtype is not None:  # recorded on model.config: save_pretrained exports in it by default
        hf_config.dtype = stored_dtype.name
    if isinstance(param_dtype, str) and param_dtype == "auto":  # transformers' dtype="auto": as stored
        param_dtype = stored_dtype if stored_dtype is not None else jnp.float32
    abstract = nnx.eval_shape(
        lambda: from_config(hf_config, num_labels=num_labels, dtype=dtype, param_dtype=param_dtype, seed=seed,
                            attn_implementation=attn_implementation)
    )
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    rules = family.PARTITION_RULES
    quantized = {}  # QLoRA: module name -> its Linear, for the weights quantized while they are read
    if quantization is not None:
        from jaxpt import quantize

        quantization = quantize.quantization_settings(quantization)
        quantized = dict(quantize.quantized_linears(abstract, quantization))
    scales = {}
    init_std = getattr(hf_config, "initializer_range", 0.02)

    num_layers = hf_config.num_hidden_layers

    def load(path, leaf):
        name = path_name(path)
        sharding = None
        if mesh is not None:
            sharding = jax.sharding.NamedSharding(mesh, partition_spec(name, leaf.shape, rules, mesh))
        tensors = hf_tensor_names(name, num_layers)
        if tensors[0] not in reader:  # a new classifier head (checked below): normal(0, initializer_range), as HF
            key = jax.random.fold_in(jax.random.key(seed), len(name))
            init = jax.jit(lambda: init_std * jax.random.normal(key, leaf.shape, leaf.dtype), out_shardings=sharding)
            return init()
        stacked = tensors != [name]  # a decoder-layer parameter: one tensor per layer, even for one layer
        expected = tuple(leaf.shape[1:]) if stacked else tuple(leaf.shape)
        for tensor in tensors:
            if reader.shape(tensor) != expected:
                raise ValueError(
                    f"Tensor {tensor!r} in {directory} has shape {reader.shape(tensor)}, the model expects {expected}."
                )
        module_name = name.removesuffix(".weight")
        if stacked and name.endswith(".weight") and module_name in quantized:
            stored, scales[module_name] = quantize.quantize_layer_by_layer(
                lambda index, placement: load_array(reader, tensors[index], dtype=leaf.dtype, sharding=placement),
                jax.ShapeDtypeStruct(expected, leaf.dtype), len(tensors), quantization, name=module_name,
                rules=rules, mesh=mesh)
            return stored
        if stacked:
            return load_stacked_array(reader, tensors, dtype=leaf.dtype, sharding=sharding)
        return load_array(reader, name, dtype=leaf.dtype, sharding=sharding)

    names = [tensor for path, _ in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
             for tensor in hf_tensor_names(path_name(path), num_layers)]
    missing = [n for n in names if n not in reader and not (n.startswith("score.") and num_labels is not None)]
    if missing:
        raise ValueError(
            f"Checkpoint {directory} lacks {len(missing)} tensor(s) a {hf_config.model_type} model needs: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}."
        )
    params = jax.tree_util.tree_map_with_path(load, abstract_params)
    model = nnx.merge(graphdef, params, rest)
    modules = dict(nnx.iter_graph(model)) if quantized else {}
    for path, module in modules.items():  # as quantize_model leaves a quantized Linear
        module_name = ".".join(str(p) for p in path)
        if module_name in scales:
            module.weight_scale = nnx.Param(scales[module_name])
            module.quantization = quantization
    if adapter is not None:
        from jaxpt.lora import load_adapter

        load_adapter(model, adapter)
        model.lora_settings = dataclasses.replace(model.lora_settings, base_model_name_or_path=str(name_or_path))
    return model


def merge_adapter(model: nnx.Module) -> nnx.Module:
    """Fold a model's LoRA adapters into its weights, in place (`jaxpt.lora.merge_adapter`); returns the model."""
    from jaxpt.lora import merge_adapter as merge

    return merge(model)


def _first_floating_dtype(reader: SafetensorsReader) -> np.dtype | None:
    """The dtype of the checkpoint's first floating tensor (transformers' fallback for a config without `dtype`)."""
    for name in reader.names():
        if jnp.issubdtype(reader.dtype(name), jnp.floating):
            return np.dtype(reader.dtype(name))
    return None


def save_pretrained(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_size: int | str = 5 * 1024**3,
) -> Path:
    """Write `config.json` + safetensors that `transformers` loads with the same logits.

    Streams tensor by tensor: each one (one layer of a stacked decoder parameter) is cast to `dtype` on its devices,
    gathered once in that dtype, written and dropped, so host memory holds about one tensor, never the model.
    `dtype`: default the dtype of the checkpoint the model was loaded from (the HF config's `dtype` recorded on
    `model.config`: a bfloat16 checkpoint exports bfloat16), else the parameters' own. Files of at most
    `max_shard_size` (bytes, or "5GB" / "500MB" as transformers writes it), with `model.safetensors.index.json` when
    there are several. Every process must call it (the gathers are collectives); only process 0 writes.
    """
    path = Path(path)
    if getattr(model, "lora_settings", None) is not None:
        raise ValueError("The model has LoRA adapters: save them with jaxpt.lora.save_adapter(model, path), or fold "
                         "them in first with jaxpt.models.merge_adapter(model) to save a full checkpoint.")
    if any(getattr(module, "quantization", None) is not None for _, module in nnx.iter_graph(model)):
        raise ValueError("The model's base is quantized (jaxpt.quantize): jaxpt saves float checkpoints only; "
                         "jaxpt.quantize.dequantize_model(model) first to save its dequantized weights.")
    hf_config = model.config.to_hf()
    max_shard_bytes = parse_size(max_shard_size, field_name="max_shard_size")
    params = nnx.state(model, nnx.Param)
    leaves = [(path_name(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]
    saved_dtype = export_dtype(model, dtype)
    tensors = []
    for name, leaf in leaves:
        names = hf_tensor_names(name, hf_config.num_hidden_layers)
        stacked = names != [name]  # one HF tensor per layer, sliced on device only when it is written
        shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
        for index, tensor in enumerate(names):
            fetch = functools.partial(_export_tensor, leaf, index if stacked else None, saved_dtype)
            tensors.append(TensorToWrite(tensor, shape, saved_dtype, fetch))
    num_labels = getattr(model, "num_labels", None)
    causal_lm, classifier = _family(hf_config.model_type).HF_ARCHITECTURES[hf_config.model_type]
    if num_labels is not None:
        hf_config.architectures = [classifier]
        hf_config.num_labels = num_labels
    else:
        hf_config.architectures = [causal_lm]
    hf_config.dtype = saved_dtype.name
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        hf_config.save_pretrained(path)
    write_checkpoint(tensors, path, max_shard_bytes=max_shard_bytes)
    if jax.process_count() > 1:  # every process returns once the files exist (a reader may be on any process)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxpt_save_pretrained")
    return path


def export_dtype(model: nnx.Module, dtype: Any = None) -> np.dtype:
    """The dtype `save_pretrained(model, dtype=dtype)` writes: `dtype`, else the one recorded on `model.config`
    (the checkpoint's own, by `from_pretrained`), else the first floating parameter's."""
    if dtype is None:
        dtype = _config_dtype(model.config.to_hf())
    if dtype is None:
        floating = [leaf.dtype for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
                    if jnp.issubdtype(leaf.dtype, jnp.floating)]
        dtype = floating[0] if floating else jnp.float32
    try:
        resolved = np.dtype(jnp.dtype(dtype))
    except TypeError:
        raise ValueError(f"dtype={dtype!r} is not a dtype: pass e.g. jnp.bfloat16, 'bfloat16' or 'float32'.") from None
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"dtype={dtype!r} is not a floating dtype: pass e.g. 'bfloat16' or 'float32'.")
    return resolved


def _config_dtype(hf_config) -> np.dtype | None:
    """The HF config's `dtype` (transformers 5; `torch_dtype` before), as a numpy dtype, or None when unset."""
    recorded = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if recorded is None:
        return None
    return np.dtype(jnp.dtype(str(recorded).removeprefix("torch.")))


@functools.partial(jax.jit, static_argnames=("dtype",))
def _layer_in_dtype(array: jax.Array, index: jax.Array | None, *, dtype) -> jax.Array:
    """Row `index` of a stacked parameter (or the whole parameter for `index=None`), cast on its devices and laid
    out as they hold it. Always a new buffer: a host copy taken of it is cached on it, and must go when it does."""
    if index is not None:
        array = jax.lax.dynamic_index_in_dim(array, index, keepdims=False)
    return jnp.copy(array.astype(dtype))


def _export_tensor(leaf: jax.Array, index: int | None, dtype: np.dtype) -> np.ndarray | None:
    return gather_to_host(_layer_in_dtype(leaf, index, dtype=dtype))


def gather_to_host(array: jax.Array) -> np.ndarray | None:
    """The whole of `array` as a numpy array on process 0, None on the others. A sharded single-process array is
    copied shard by shard into one host array; a multi-host one is first replicated across the devices (a
    collective every process joins), then process 0 copies one replica."""
    if array.is_fully_addressable:
        return np.asarray(array) if jax.process_index() == 0 else None
    return _replicated_to_host(array)


def _replicated_to_host(array: jax.Array) -> np.ndarray | None:
    sharding = array.sharding
    if not isinstance(sharding, jax.sharding.NamedSharding):
        from jax.experimental import multihost_utils

        whole = multihost_utils.process_allgather(array, tiled=True)
        return np.asarray(whole) if jax.process_index() == 0 else None
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    whole = jax.jit(jnp.copy, out_shardings=replicated)(array)
    # Every process waits for its gather before the next is dispatched. The gathers of an export do not depend on
    # each other, so a process that only dispatched them (not the writer) would queue many at once, and the CPU
    # backend may start independent executions out of order: two processes then wait in different all-gathers
    # forever (seen as an export hanging on 2 processes under load).
    whole.block_until_ready()
    return np.asarray(whole.addressable_data(0)) if jax.process_index() == 0 else None


_SIZE_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "TB": 10**12, "B": 1}


def parse_size(size: int | str, *, field_name: str) -> int:
    """Bytes from an int or a transformers-style size string ("5GB" = 5e9 bytes, "2GiB" = 2 * 2**30)."""
    if isinstance(size, str):
        text = size.strip().upper()
        for unit, factor in _SIZE_UNITS.items():
            if text.endswith(unit):
                try:
                    size = int(float(text[: -len(unit)]) * factor)
                except ValueError:
                    break
                break
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"{field_name}={size!r} must be a positive number of bytes or a size like '5GB' / '500MB'.")
    return size
