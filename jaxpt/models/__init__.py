"""Hugging Face models in Flax NNX: `from_pretrained` / `save_pretrained`, dispatching on `model_type`.

```python
model = jaxpt.models.from_pretrained("path/to/hf_dir")          # causal LM: model(ids) -> [b, s, vocab]
rm = jaxpt.models.from_pretrained("path/to/hf_dir", num_labels=1)  # classifier: rm(ids) -> [b, 1]
jaxpt.models.save_pretrained(model, "out_dir")                   # transformers loads it back
```
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpt.models import gemma, llama, qwen2, qwen3
from jaxpt.models.attention import resolve_attn_implementation
from jaxpt.models.safetensors_io import SafetensorsReader, load_array, load_stacked_array, save_checkpoint
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
           "hf_tensor_names", "set_gradient_checkpointing", "merge_adapter"]


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
) -> nnx.Module:
    """Load a Hugging Face checkpoint directory (or Hub id) into a jaxpt model.

    `adapter`: a LoRA adapter directory in peft's format (`adapter_config.json` + `adapter_model.safetensors`,
    written by peft or `jaxpt.lora.save_adapter`), attached to the loaded model (`jaxpt.lora.load_adapter`).

    `dtype` is the compute dtype, `param_dtype` the stored one. With `num_labels`, the
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
    abstract = nnx.eval_shape(
        lambda: from_config(hf_config, num_labels=num_labels, dtype=dtype, param_dtype=param_dtype, seed=seed,
                            attn_implementation=attn_implementation)
    )
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    reader = SafetensorsReader(directory)
    rules = family.PARTITION_RULES
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
    if adapter is not None:
        from jaxpt.lora import load_adapter

        load_adapter(model, adapter)
        model.lora_settings = dataclasses.replace(model.lora_settings, base_model_name_or_path=str(name_or_path))
    return model


def merge_adapter(model: nnx.Module) -> nnx.Module:
    """Fold a model's LoRA adapters into its weights, in place (`jaxpt.lora.merge_adapter`); returns the model."""
    from jaxpt.lora import merge_adapter as merge

    return merge(model)


def save_pretrained(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_size: int = 5 * 1024**3,
) -> Path:
    """Write `config.json` + safetensors that `transformers` loads with the same logits.

    `dtype` casts the saved weights (default: as stored). Sharded / multi-host parameters are gathered;
    only process 0 writes.
    """
    import numpy as np

    path = Path(path)
    if getattr(model, "lora_settings", None) is not None:
        raise ValueError("The model has LoRA adapters: save them with jaxpt.lora.save_adapter(model, path), or fold "
                         "them in first with jaxpt.models.merge_adapter(model) to save a full checkpoint.")
    hf_config = model.config.to_hf()
    params = nnx.state(model, nnx.Param)
    leaves = [(path_name(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]
    # One HF tensor per layer of a stacked parameter, sliced only as it is written.
    named = ((tensor, leaf if tensor == name else leaf[index])
             for name, leaf in leaves
             for index, tensor in enumerate(hf_tensor_names(name, hf_config.num_hidden_layers)))
    saved_dtype = jnp.dtype(dtype) if dtype is not None else leaves[0][1].dtype
    num_labels = getattr(model, "num_labels", None)
    causal_lm, classifier = _family(hf_config.model_type).HF_ARCHITECTURES[hf_config.model_type]
    if num_labels is not None:
        hf_config.architectures = [classifier]
        hf_config.num_labels = num_labels
    else:
        hf_config.architectures = [causal_lm]
    hf_config.dtype = str(jnp.dtype(saved_dtype).name)
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        hf_config.save_pretrained(path)
    save_checkpoint(named, path, max_shard_bytes=max_shard_size, convert=lambda a: a.astype(np.dtype(saved_dtype)))
    return path
