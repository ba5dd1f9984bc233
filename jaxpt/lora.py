"""LoRA adapters (Hu et al., 2021, https://arxiv.org/abs/2106.09685) on jaxpt models, in PEFT's format.

A LoRA adapter on a linear layer `y = x W^T` adds `scale * (x A^T) B^T`, with `A` `[r, in]` and `B` `[out, r]`
(`scale = lora_alpha / r`, or `lora_alpha / sqrt(r)` with rank-stabilised LoRA, Kalajdzievski 2023,
https://arxiv.org/abs/2312.03732). The adapter matrices live in each `jaxpt.models.layers.Linear` as
`lora_a` / `lora_b` (`LoRAParam`); in the stacked decoder layers they are stacked too (`[num_layers, r, in]`).

```python
config = LoraConfig(use_peft=True, lora_r=8, lora_dropout=0.05)
apply_lora(model, config)                   # adds adapters (A random, B = 0): the model's output is unchanged
state = TrainState.create(model, tx)        # trains only the adapters (the base goes to state.frozen)
save_adapter(state.model(), "out")          # adapter_config.json + adapter_model.safetensors, as peft writes them
model = jaxpt.models.from_pretrained(BASE, adapter="out")   # or load_adapter(model, "out"); peft's too
merged = merge_adapter(model)               # W += scale * B A, adapters removed: a plain model again
```

The reference model of DPO/KTO/GRPO under LoRA is the same model with the adapters off (`without_adapters`):
every `lora_b` zeroed, no second copy of the base.

LoRA dropout (`lora_dropout`, peft's: `scale * B A dropout(x)`, the base path untouched) acts only in training
steps: every method's step differentiates through `value_and_grad`, which draws the masks from the run's seed, the
optimizer step and the micro-batch (a resumed run draws the same ones). Evaluation, sampling and the reference's
forward passes never drop anything.

peft itself is not needed at run time; its file format is followed (tensor names
`base_model.model.<module>.lora_A.weight`, `adapter_config.json`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.models.layers import Linear, LoRAParam
from jaxpt.sharding import partition_spec

__all__ = ["LoraConfig", "LoRAParam", "AdapterSettings", "apply_lora", "load_adapter", "save_adapter",
           "merge_adapter", "without_adapters", "with_adapters_off", "check_reference_without_adapters", "has_adapters",
           "trainable_filter", "adapter_parameter_count", "value_and_grad", "dropout_key", "ADAPTER_CONFIG_NAME",
           "ADAPTER_WEIGHTS_NAME"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# peft's default targets (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`) for the families jaxpt ports.
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")
# peft adds these to modules_to_save of a sequence classifier (task SEQ_CLS): the freshly initialised head trains.
CLASSIFIER_HEADS = ("score",)


@dataclass
class LoraConfig:
    """TRL's `ModelConfig` LoRA fields (same names and defaults): what `apply_lora` and `--use_peft` read."""

    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of every parameter."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA alpha: the adapter output is scaled by "
                                                            "lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapters' input while training "
                                                                "(TRL's default 0.05); off in evaluation, sampling "
                                                                "and reference forwards."})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "Module names to adapt (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj), 'all-linear', or "
                "one regex matched against full module names (default: peft's for the architecture, q_proj v_proj)."})
    lora_modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained in full beside the adapters (e.g. score); saved in the adapter file."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA: scale lora_alpha / sqrt(r)."})
    # QLoRA (`jaxpt.quantize`): the base's decoder-layer linear weights stored quantized, the adapters on top
    load_in_8bit: bool = field(default=False, metadata={"help": "QLoRA: store the base's linear weights in int8 "
                                                                "(per-output-channel scales); needs use_peft."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: store the base's linear weights in 4 bits "
                                                                "(bnb_4bit_quant_type, blocks of 64); needs use_peft."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit format with load_in_4bit: nf4 "
                                                                      "(4-bit NormalFloat).", "choices": ["nf4"]})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        if self.lora_r < 1:
            raise ValueError(f"lora_r={self.lora_r} must be >= 1.")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha} must be > 0.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout} must be in [0, 1).")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit=True and load_in_8bit=True: choose one quantization of the base.")
        if (self.load_in_4bit or self.load_in_8bit) and not self.use_peft:
            raise ValueError(f"load_in_{4 if self.load_in_4bit else 8}bit=True quantizes the base model, which then "
                             "cannot be trained itself: add use_peft=True (--use_peft) to train LoRA adapters on it.")
        if self.bnb_4bit_quant_type != "nf4":
            raise ValueError(f"bnb_4bit_quant_type={self.bnb_4bit_quant_type!r} is not supported: jaxpt's 4-bit "
                             "format is 'nf4'.")
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ValueError("lora_target_modules=[] names no module: pass names (e.g. q_proj v_proj), 'all-linear', "
                             "or leave it unset for peft's default.")

    def check_trainable(self) -> None:
        """What training with these adapters needs and jaxpt does not do fails here, before any work (nothing
        at present: kept for the command line's early check)."""


@dataclass(frozen=True)
class AdapterSettings:
    """What a model with adapters records (static, `model.lora_settings`): enough to save the adapter in peft's
    format and to know which parameters train."""

    r: int
    lora_alpha: float
    use_rslora: bool
    lora_dropout: float
    target_modules: tuple[str, ...]  # module names as peft's `target_modules` (short names, or full ones)
    modules_to_save: tuple[str, ...]
    task_type: str  # "CAUSAL_LM" or "SEQ_CLS"
    base_model_name_or_path: str | None = None

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


# --------------------------------------------------------------------------------------------------------------
# Which modules
# --------------------------------------------------------------------------------------------------------------


def _linear_modules(model: nnx.Module) -> list[tuple[str, Linear]]:
    """`(dotted path, module)` of every `Linear`, e.g. `("model.layers.self_attn.q_proj", ...)`."""
    return [(".".join(str(p) for p in path), module) for path, module in nnx.iter_graph(model)
            if isinstance(module, Linear)]


def _num_layers(model: nnx.Module) -> int:
    return model.config.num_hidden_layers


def _is_stacked(name: str) -> bool:
    return "layers" in name.split(".")


def _hf_module_names(name: str, num_layers: int) -> list[str]:
    """The Hugging Face module name(s) of a jaxpt module path: one per decoder layer for a stacked module."""
    from jaxpt.models import hf_tensor_names

    return [tensor[: -len(".weight")] for tensor in hf_tensor_names(name + ".weight", num_layers)]


def _targets(target_modules, key: str) -> bool:
    """peft's rule: one string is a regex matched against the whole module name; a list matches a name equal to
    an entry or ending in `.entry`."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    return key in target_modules or any(key.endswith(f".{target}") for target in target_modules)


def _under(module_name: str, names) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(name)}($|\..*)", module_name) for name in names)


def _targeted_layers(model: nnx.Module, target_modules, *, exclude_modules=None,
                     modules_to_save=()) -> dict[str, list[int] | None]:
    """`{jaxpt module path: decoder-layer indices it adapts (None: not stacked)}` for peft-style `target_modules`.

    "all-linear" (peft's special value) is every linear layer of the decoder layers (not the output head).
    """
    num_layers = _num_layers(model)
    out = {}
    for name, _ in _linear_modules(model):
        stacked = _is_stacked(name)
        if _under(name, modules_to_save):
            continue
        if target_modules == "all-linear" or target_modules == ["all-linear"]:
            if stacked:
                out[name] = list(range(num_layers))
            continue
        hits = []
        for index, key in enumerate(_hf_module_names(name, num_layers)):
            excluded = exclude_modules is not None and _targets(exclude_modules, key)
            if not excluded and _targets(target_modules, key):
                hits.append(index)
        if hits:
            out[name] = hits if stacked else None
    if not out:
        raise ValueError(f"lora_target_modules={target_modules!r} matches no linear layer of this "
                         f"{model.config.model_type} model; its linear layers are "
                         f"{sorted({n.rsplit('.', 1)[-1] for n, _ in _linear_modules(model)})} (or 'all-linear').")
    head = [name for name in out if name.endswith("lm_head")]
    if head:
        raise ValueError(f"lora_target_modules={target_modules!r} targets {head[0]}: jaxpt does not put adapters on "
                         "the output head yet; target the decoder's linear layers, or train it with "
                         "lora_modules_to_save=['lm_head'].")
    return out


def has_adapters(model: nnx.Module) -> bool:
    return getattr(model, "lora_settings", None) is not None


def has_adapter_dropout(model: nnx.Module) -> bool:
    """Whether training drops out some adapter's inputs (`lora_dropout > 0`): each token of each row then draws its
    own masks, so rows cannot share the computation of a common prompt (`rollout.shared_prompt_group`)."""
    return any(module.lora_a is not None and module.lora_dropout > 0 for _, module in _linear_modules(model))


def _module_to_save_filter(names: tuple[str, ...]):
    def is_module_to_save(path, value) -> bool:
        module_path = ".".join(str(p) for p in path[:-1])  # without the parameter's own name
        return isinstance(value, nnx.Param) and _under(module_path, names)

    return is_module_to_save


def trainable_filter(model: nnx.Module):
    """The nnx filter of the parameters a `TrainState` trains: every `nnx.Param`, or with adapters only the
    `LoRAParam`s and the parameters of `modules_to_save`. A module made of several models (PPO's policy and value
    model) gives its own filter through a `trainable_parameters()` method (each model's part by these rules)."""
    own = getattr(model, "trainable_parameters", None)
    if callable(own):
        return own()
    settings = getattr(model, "lora_settings", None)
    if settings is None:
        return nnx.Param
    return _adapter_filter(settings)


def _adapter_filter(settings: AdapterSettings):
    return nnx.Any(LoRAParam, _module_to_save_filter(settings.modules_to_save))


def adapter_parameter_count(model: nnx.Module) -> int:
    """Number of trained parameters under LoRA: the adapters and the modules to save."""
    settings = getattr(model, "lora_settings", None)
    params = nnx.state(model, nnx.Param if settings is None else _adapter_filter(settings))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


# --------------------------------------------------------------------------------------------------------------
# Adding adapters
# --------------------------------------------------------------------------------------------------------------


def _placed(value: jax.Array, name: str, weight: jax.Array, model: nnx.Module) -> jax.Array:
    """`value` laid out on the mesh the base `weight` lives on (by the family's rules for `name`), if any."""
    sharding = getattr(weight, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return value
    mesh = sharding.mesh
    spec = partition_spec(name, value.shape, getattr(model, "partition_rules", ()), mesh)
    return jax.device_put(value, jax.sharding.NamedSharding(mesh, spec))


def _attach(model: nnx.Module, module_name: str, module: Linear, lora_a: jax.Array, lora_b: jax.Array,
            settings: AdapterSettings, index: int) -> None:
    weight = module.weight[...]
    module.lora_a = LoRAParam(_placed(lora_a, module_name + ".lora_a", weight, model))
    module.lora_b = LoRAParam(_placed(lora_b, module_name + ".lora_b", weight, model))
    module.lora_scale = float(settings.scale)
    module.lora_dropout = float(settings.lora_dropout)
    module.lora_index = index  # distinct dropout masks per adapter


def _settings_from_config(model: nnx.Module, config: LoraConfig, targets) -> AdapterSettings:
    modules_to_save = tuple(config.lora_modules_to_save or ())
    is_classifier = getattr(model, "num_labels", None) is not None
    if is_classifier:  # peft (task SEQ_CLS) always trains the classifier head
        modules_to_save = tuple(dict.fromkeys((*modules_to_save, *CLASSIFIER_HEADS)))
    return AdapterSettings(r=config.lora_r, lora_alpha=config.lora_alpha, use_rslora=config.use_rslora,
                           lora_dropout=config.lora_dropout, target_modules=tuple(targets),
                           modules_to_save=modules_to_save, task_type="SEQ_CLS" if is_classifier else "CAUSAL_LM")


def _check_modules_to_save(model: nnx.Module, names) -> None:
    module_names = {".".join(str(p) for p in path) for path, _ in nnx.iter_graph(model)}
    for name in names:
        if not any(_under(module, [name]) for module in module_names):
            raise ValueError(f"lora_modules_to_save contains {name!r}, which is no module of this "
                             f"{model.config.model_type} model (e.g. lm_head, embed_tokens, score).")


def apply_lora(model: nnx.Module, config: LoraConfig, *, seed: int = 0) -> nnx.Module:
    """Add LoRA adapters to `model` in place (and return it): `A` drawn like peft's default (Kaiming-uniform,
    bound `1 / sqrt(in_features)`), `B` zero, so the model computes exactly what it did before.

    `config.lora_target_modules` as peft's `target_modules` (None: peft's default for the architecture, `q_proj`
    and `v_proj`); `lora_modules_to_save` train in full. Adapter matrices are float32 (as peft keeps them) and are
    placed like their layer's weight when the model lives on a mesh.

    `config.load_in_4bit` / `load_in_8bit` (QLoRA): the base is quantized first (`jaxpt.quantize.quantize_model`).
    """
    config.validate()
    if has_adapters(model):
        raise ValueError("The model already has LoRA adapters: merge_adapter(model) first, or load a fresh model.")
    config.check_trainable()
    targets = config.lora_target_modules or list(DEFAULT_TARGET_MODULES)
    if len(targets) == 1 and targets[0] != "all-linear" and not re.fullmatch(r"[\w]+", targets[0]):
        targets = targets[0]  # one regex, as peft reads a string
    settings = _settings_from_config(model, config, [targets] if isinstance(targets, str) else targets)
    _check_modules_to_save(model, settings.modules_to_save)
    layers = _targeted_layers(model, targets, modules_to_save=settings.modules_to_save)
    from jaxpt.quantize import quantize_from_config

    quantize_from_config(model, config)  # QLoRA: the base is quantized before the adapters go on
    key = jax.random.key(seed)
    modules = dict(_linear_modules(model))
    for index, (name, layer_indices) in enumerate(sorted(layers.items())):
        module = modules[name]
        stacked = layer_indices is not None
        leading = (module.weight.shape[0],) if stacked else ()
        bound = 1.0 / math.sqrt(module.in_features)
        lora_a = jax.random.uniform(jax.random.fold_in(key, index), (*leading, config.lora_r, module.in_features),
                                    jnp.float32, -bound, bound)
        lora_b = jnp.zeros((*leading, module.out_features, config.lora_r), jnp.float32)
        if stacked and len(layer_indices) < leading[0]:  # untargeted layers: an adapter that adds exactly 0
            targeted = jnp.zeros(leading, bool).at[jnp.asarray(layer_indices)].set(True)
            lora_a = jnp.where(targeted[:, None, None], lora_a, 0.0)
        _attach(model, name, module, lora_a, lora_b, settings, index)
    model.lora_settings = settings
    return model


# --------------------------------------------------------------------------------------------------------------
# PEFT format in and out
# --------------------------------------------------------------------------------------------------------------

# adapter_config.json fields that change what the adapter computes and that jaxpt does not implement: they must
# hold these values (their peft defaults).
UNSUPPORTED_DEFAULTS = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "bias": "none",
                        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
                        "layer_replication": None, "target_parameters": None, "trainable_token_indices": None,
                        "use_qalora": False, "alora_invocation_tokens": None}


def load_adapter(model: nnx.Module, directory: str | os.PathLike, *, lora_dropout: float | None = None
                 ) -> nnx.Module:
    """Attach the LoRA adapter saved in `directory` (`adapter_config.json` + `adapter_model.safetensors`, as
    peft's `save_pretrained` or `save_adapter` write them) to `model`, in place; returns the model.

    Modules peft adapted in only some decoder layers get an adapter adding exactly 0 in the others.
    `lora_dropout` replaces the file's value (the dropout a further training run applies).
    """
    from safetensors.numpy import load_file

    directory = Path(directory).expanduser()
    config_path = directory / ADAPTER_CONFIG_NAME
    weights_path = directory / ADAPTER_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"No {path.name} in {directory} ({path.absolute()}): an adapter directory holds "
                                    f"{ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} (peft's save_pretrained).")
    if has_adapters(model):
        raise ValueError("The model already has LoRA adapters: merge_adapter(model) first, or load a fresh model.")
    adapter_config = json.loads(config_path.read_text())
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type={adapter_config['peft_type']!r}; jaxpt loads LoRA adapters only.")
    for name, default in UNSUPPORTED_DEFAULTS.items():
        value = adapter_config.get(name, default)
        if value != default and not (default is None and value in ([], {})) and not (default == {} and not value):
            raise ValueError(f"{config_path}: {name}={value!r} is not supported by jaxpt (only {default!r}).")
    target_modules = adapter_config.get("target_modules")
    if target_modules is None:
        target_modules = list(DEFAULT_TARGET_MODULES)
    modules_to_save = tuple(adapter_config.get("modules_to_save") or ())
    is_classifier = getattr(model, "num_labels", None) is not None
    if is_classifier:
        modules_to_save = tuple(dict.fromkeys((*modules_to_save, *CLASSIFIER_HEADS)))
    r = int(adapter_config["r"])
    settings = AdapterSettings(
        r=r, lora_alpha=adapter_config.get("lora_alpha", 8), use_rslora=bool(adapter_config.get("use_rslora", False)),
        lora_dropout=float(adapter_config.get("lora_dropout", 0.0) if lora_dropout is None else lora_dropout),
        target_modules=(target_modules,) if isinstance(target_modules, str) else tuple(target_modules),
        modules_to_save=modules_to_save, task_type="SEQ_CLS" if is_classifier else "CAUSAL_LM",
        base_model_name_or_path=adapter_config.get("base_model_name_or_path"))
    _check_modules_to_save(model, settings.modules_to_save)
    layers = _targeted_layers(model, target_modules, exclude_modules=adapter_config.get("exclude_modules"),
                              modules_to_save=settings.modules_to_save)
    tensors = {name.removeprefix(PEFT_PREFIX): value for name, value in load_file(weights_path).items()}
    used = set()
    num_layers = _num_layers(model)
    modules = dict(_linear_modules(model))
    for module_index, (name, layer_indices) in enumerate(sorted(layers.items())):
        module = modules[name]
        hf_names = _hf_module_names(name, num_layers)
        a_shape, b_shape = (r, module.in_features), (module.out_features, r)
        a_rows, b_rows = [], []
        for index, hf_name in enumerate(hf_names):
            if layer_indices is not None and index not in layer_indices:
                a_rows.append(np.zeros(a_shape, np.float32))
                b_rows.append(np.zeros(b_shape, np.float32))
                continue
            for kind, shape, rows in (("lora_A", a_shape, a_rows), ("lora_B", b_shape, b_rows)):
                tensor = f"{hf_name}.{kind}.weight"
                if tensor not in tensors:
                    raise ValueError(f"{weights_path} lacks {PEFT_PREFIX}{tensor}, which its adapter_config.json "
                                     f"targets (target_modules={target_modules!r}).")
                if tuple(tensors[tensor].shape) != shape:
                    raise ValueError(f"{weights_path}: {PEFT_PREFIX}{tensor} has shape {tensors[tensor].shape}; this "
                                     f"model and r={r} need {shape}.")
                rows.append(tensors[tensor].astype(np.float32))
                used.add(tensor)
        stacked = layer_indices is not None
        lora_a = jnp.asarray(np.stack(a_rows) if stacked else a_rows[0])
        lora_b = jnp.asarray(np.stack(b_rows) if stacked else b_rows[0])
        _attach(model, name, module, lora_a, lora_b, settings, module_index)
    _load_modules_to_save(model, settings.modules_to_save, tensors, used, weights_path)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{weights_path} holds {len(unused)} tensor(s) this model has no place for: "
                         f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''} (is it an adapter for another "
                         "architecture?).")
    model.lora_settings = settings
    return model


def _modules_to_save_params(model: nnx.Module, names) -> list[tuple[str, nnx.Variable]]:
    """`(dotted parameter name, variable)` of the parameters under `modules_to_save`."""
    state = nnx.state(model, _module_to_save_filter(tuple(names)))
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        keys = [k for k in keys if k != "value"]
        module = model
        for key in keys[:-1]:
            module = getattr(module, key)
        out.append((".".join(keys), getattr(module, keys[-1])))
    return out


def _load_modules_to_save(model, names, tensors, used, weights_path) -> None:
    num_layers = _num_layers(model)
    for name, variable in _modules_to_save_params(model, names):
        from jaxpt.models import hf_tensor_names

        hf_names = hf_tensor_names(name, num_layers)
        missing = [n for n in hf_names if n not in tensors]
        if missing:
            continue  # peft saves only what it trained; the model keeps the base values
        rows = [tensors[n] for n in hf_names]
        value = np.stack(rows) if hf_names != [name] else rows[0]
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(f"{weights_path}: {PEFT_PREFIX}{hf_names[0]} has shape {value.shape}; the model's "
                             f"{name} is {variable.shape}.")
        current = variable[...]
        loaded = jnp.asarray(value, current.dtype)
        sharding = getattr(current, "sharding", None)
        variable[...] = jax.device_put(loaded, sharding) if sharding is not None else loaded
        used.update(hf_names)


def _host(array: jax.Array) -> np.ndarray:
    if not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        array = multihost_utils.process_allgather(array, tiled=True)
    return np.asarray(jax.device_get(array))


def save_adapter(model: nnx.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None
                 ) -> Path:
    """Write the model's adapter as peft does: `adapter_config.json` + `adapter_model.safetensors` (float32), which
    `peft.PeftModel.from_pretrained(base, directory)` and `load_adapter` load. Process 0 writes."""
    from safetensors.numpy import save_file

    settings = getattr(model, "lora_settings", None)
    if settings is None:
        raise ValueError("The model has no LoRA adapters to save (apply_lora / load_adapter add them); save a full "
                         "model with jaxpt.models.save_pretrained.")
    num_layers = _num_layers(model)
    tensors = {}
    for name, module in _linear_modules(model):
        if module.lora_a is None:
            continue
        lora_a, lora_b = _host(module.lora_a[...]), _host(module.lora_b[...])
        for index, hf_name in enumerate(_hf_module_names(name, num_layers)):
            stacked = _is_stacked(name)
            tensors[f"{PEFT_PREFIX}{hf_name}.lora_A.weight"] = np.ascontiguousarray(
                lora_a[index] if stacked else lora_a, np.float32)
            tensors[f"{PEFT_PREFIX}{hf_name}.lora_B.weight"] = np.ascontiguousarray(
                lora_b[index] if stacked else lora_b, np.float32)
    from jaxpt.models import hf_tensor_names

    for name, variable in _modules_to_save_params(model, settings.modules_to_save):
        value = _host(variable[...])
        names = hf_tensor_names(name, num_layers)
        for index, tensor in enumerate(names):
            tensors[f"{PEFT_PREFIX}{tensor}"] = np.ascontiguousarray(value[index] if names != [name] else value)
    # The adapted modules by name: every stacked layer's adapter is saved (zeros where one was loaded for only some
    # layers), so the short names describe exactly what the file holds.
    target_modules = sorted({name.rsplit(".", 1)[-1] for name, module in _linear_modules(model)
                             if module.lora_a is not None})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": settings.task_type,
        "base_model_name_or_path": base_model_name_or_path or settings.base_model_name_or_path,
        "r": settings.r,
        "lora_alpha": settings.lora_alpha,
        "lora_dropout": settings.lora_dropout,
        "use_rslora": settings.use_rslora,
        "target_modules": target_modules,
        "modules_to_save": list(settings.modules_to_save) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
    }
    directory = Path(directory)
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + "\n")
        save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


# --------------------------------------------------------------------------------------------------------------
# Merging and switching off
# --------------------------------------------------------------------------------------------------------------


def merge_adapter(model: nnx.Module) -> nnx.Module:
    """Fold the adapters into the base weights (`W += scale * B @ A`, computed in float32) and remove them, in
    place; returns the model, now a plain one (`jaxpt.models.save_pretrained` writes it as a full checkpoint).
    Modules to save keep their trained values."""
    if not has_adapters(model):
        raise ValueError("The model has no LoRA adapters to merge.")
    from jaxpt.quantize import dequantize_model

    dequantize_model(model)  # a quantized (QLoRA) base merges in float32: its dequantized weights plus B A
    for _, module in _linear_modules(model):
        if module.lora_a is None:
            continue
        weight = module.weight[...]
        delta = jnp.einsum("...or,...ri->...oi", module.lora_b[...].astype(jnp.float32),
                           module.lora_a[...].astype(jnp.float32)) * module.lora_scale
        merged = (weight.astype(jnp.float32) + delta).astype(weight.dtype)
        sharding = getattr(weight, "sharding", None)
        module.weight[...] = jax.device_put(merged, sharding) if sharding is not None else merged
        module.lora_a = None
        module.lora_b = None
        module.lora_scale = None
        module.lora_dropout = 0.0
        module.lora_index = 0
    model.lora_settings = None
    return model


def without_adapters(params: nnx.State) -> nnx.State:
    """`params` (a model's parameters, or the trained part of a LoRA `TrainState`) with every adapter switched
    off: each `lora_b` replaced by zeros, so the model computes the base model's output exactly. What DPO uses as
    the reference under LoRA: no second copy of the base exists, only zeros of `lora_b`'s size.

    Modules to save are not switched off (their base values are not kept): `check_reference_without_adapters`.
    """
    def switch_off(path, value):
        if isinstance(value, LoRAParam) and str(getattr(path[-1], "key", "")) == "lora_b":
            return value.replace(jnp.zeros_like(value[...]))
        return value

    return jax.tree_util.tree_map_with_path(switch_off, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def with_adapters_off(ref_params: nnx.State, state) -> nnx.State:
    """A reference model's parameters (`nnx.state(ref_model, nnx.Param)`, the policy's base architecture) as the
    policy's graph under LoRA reads them: joined with the policy's adapters switched off (zeros of `lora_b`, copies
    of `lora_a`), so the reference model runs unadapted. Unchanged when the policy has no adapters."""
    if state.frozen is None:
        return ref_params
    adapters = nnx.filter_state(state.params, LoRAParam)
    return nnx.merge_state(jax.tree.map(jnp.copy, without_adapters(adapters)), ref_params)


def check_reference_without_adapters(model: nnx.Module, *, method: str) -> None:
    """The base model with adapters off is the reference only if nothing else trains (no `modules_to_save`)."""
    settings = getattr(model, "lora_settings", None)
    if settings is not None and settings.modules_to_save:
        raise ValueError(f"{method} with LoRA uses the base model (adapters off) as the reference, but "
                         f"lora_modules_to_save={list(settings.modules_to_save)} train in full and their base values "
                         "are not kept: drop lora_modules_to_save, or pass an explicit reference model.")


def lora_config_from_model_args(model_args: Any) -> LoraConfig:
    """A `LoraConfig` from any object with TRL's `ModelConfig` LoRA fields (the CLI's `ModelConfig`)."""
    values = {f.name: getattr(model_args, f.name) for f in dataclasses.fields(LoraConfig)
              if hasattr(model_args, f.name)}
    return LoraConfig(**values)


# --------------------------------------------------------------------------------------------------------------
# Training: what every method's step differentiates (LoRA dropout)
# --------------------------------------------------------------------------------------------------------------

# Folded into the run's seed so the dropout masks are a stream of their own (not the sampler's keys).
DROPOUT_STREAM = 0x4C6F5241


def dropout_key(seed: int, step: jax.Array, micro_index: jax.Array | int = 0) -> jax.Array:
    """The LoRA dropout key of optimizer step `step`, micro-batch `micro_index`, in a run seeded `seed`: a function of
    these alone, so a resumed run (same seed, step from the checkpoint) draws the masks the uninterrupted one did."""
    key = jax.random.fold_in(jax.random.key(seed), DROPOUT_STREAM)
    return jax.random.fold_in(jax.random.fold_in(key, step), micro_index)


def value_and_grad(loss_fn, state, *, seed: int):
    """`grad_fn(params, *args, micro_index=0) -> ((loss, aux), grads)`: `jax.value_and_grad(has_aux=True)` of
    `loss_fn(state.full_params(params), *args)` with respect to the trained parameters `params` (under LoRA the
    adapters; the frozen base joins them here). What every method's train step differentiates.

    Under LoRA, the loss is traced with dropout on the adapters' inputs (`Linear.lora_dropout`, peft's
    semantics), masks from `dropout_key(seed, state.step, micro_index)`: pass each micro-batch's index. Adapters
    with `lora_dropout=0` compute exactly what they would without this; evaluation, sampling and reference forwards
    (which do not come through here) never drop."""
    from jaxpt.models.layers import adapter_dropout

    grad_fn = jax.value_and_grad(lambda params, *args: loss_fn(state.full_params(params), *args), has_aux=True)
    if state.frozen is None:  # every parameter trains: no adapters, no dropout
        return lambda params, *args, micro_index=0: grad_fn(params, *args)

    def with_dropout(params, *args, micro_index=0):
        with adapter_dropout(dropout_key(seed, state.step, micro_index)):
            return grad_fn(params, *args)

    return with_dropout
