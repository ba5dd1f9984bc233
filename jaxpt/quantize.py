"""Quantized base weights for QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314): int8 and NF4.

The base model's decoder-layer linear weights are stored quantized and dequantized on the fly, inside the jitted
step, in the compute dtype; LoRA adapters (`jaxpt.lora`) train on top in float32. `lm_head`, the embeddings, norms
and a classifier's `score` stay in float, as bitsandbytes leaves them.

```python
model = jaxpt.models.from_pretrained(BASE)
apply_lora(model, LoraConfig(use_peft=True, load_in_4bit=True, lora_dropout=0.0))   # quantize_model + adapters
state = TrainState.create(model, tx)      # trains the adapters; the quantized base sits frozen in state.frozen
```

Formats, per `Linear` (`weight` `[..., out, in]`, leading layer axis when stacked):
- `"nf4"` (4-bit NormalFloat, `--load_in_4bit`): each block of `block_size` (64, bitsandbytes' default) consecutive
  input features of an output row is scaled by its absolute maximum and each value replaced by the index of the
  nearest of the 16 NF4 levels (`NF4_LEVELS`, the paper's appendix E). Two indices share a byte (the even feature in
  the high nibble): `weight` becomes uint8 `[..., out, in / 2]` and `weight_scale` float32 `[..., out, in / 64]`:
  4.5 bits per weight (bitsandbytes without double quantization stores the same).
- `"int8"` (`--load_in_8bit`): symmetric absmax int8, `round(w * 127 / absmax)`, with one scale per output channel
  (the rows LLM.int8 scales by; `block_size=None`) or per block: `weight` int8 `[..., out, in]`, `weight_scale`
  float32 `[..., out, in / block_size]` (`[..., out, 1]` per channel). bitsandbytes' outlier decomposition
  (LLM.int8's fp16 columns) is not done: the weights are dequantized before the matmul, so there is no int8 matmul
  whose outliers would need it.

The packed weight keeps the name `weight` and the scales follow its partition rule (`jaxpt.sharding.rule_axes`), so
both are split like the float weight was: the layer axis whole, `out`/`in` over "fsdp"/"tensor". Inside the layer
scan (`jaxpt.models.layers.gather_layer_params`) a quantized weight is gathered over "fsdp" in its packed form (a
4-bit all-gather moves a quarter of a bfloat16 one) and dequantized after; the backward pass dequantizes it again
(`dequantized_matmul`) rather than keeping a dequantized copy of every layer. Nothing of it is differentiated: it is
`nnx.Param` state outside the adapters, so `TrainState` puts it in `frozen` (no gradient, no optimizer state).

Why not qwix (Google's JAX quantization library; 0.1.8 installs from PyPI, with nf4 and a LoRA provider): qwix
quantizes by intercepting the `dot_general`/`einsum` calls a module makes and recognising the module's own parameters
among the operands. jaxpt's `Linear` reads its stacked `[layers, ...]` weight inside `lax.scan`, after
`gather_layer_params` has sliced, cast and gathered it, and under FSDP multiplies inside `fsdp_matmul`'s `shard_map`:
the operands qwix would see are no longer module parameters. Its quantized arrays (`QArray` pytrees) and its own LoRA
parameters also follow neither the families' partition rules nor peft's adapter format (`jaxpt.lora.save_adapter`).
The dequantizing linear below is ~150 lines.
"""

from __future__ import annotations

import dataclasses
import functools
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxpt.models.layers import Linear, matmul_transposed_weight
from jaxpt.sharding import partition_spec

__all__ = ["NF4_LEVELS", "Quantization", "quantize_nf4", "dequantize_nf4", "quantize_int8", "dequantize_int8",
           "quantize_model", "dequantize_model", "is_quantized", "quantization_from_config", "quantize_from_config",
           "check_trainable", "parameter_bytes", "quantization_settings", "quantized_linears",
           "quantize_layer_by_layer"]

# The 16 NF4 levels (QLoRA, appendix E; bitsandbytes' table): quantiles of N(0, 1) normalised to [-1, 1], with an
# exact 0 — 7 negative and 8 positive levels.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
NF4_BLOCK_SIZE = 64  # bitsandbytes' default block size for 4-bit weights
INT8_MAX = 127


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How a `Linear`'s weight is stored (its static `quantization` attribute): `kind` "nf4" or "int8", and the
    number of input features sharing a scale (`None`: one scale per output channel)."""

    kind: str
    block_size: int | None

    def dequantize(self, weight: jax.Array, weight_scale: jax.Array, dtype: Any) -> jax.Array:
        """The weight `[..., out, in]` in `dtype` from its stored form."""
        if self.kind == "nf4":
            return dequantize_nf4(weight, weight_scale, dtype=dtype)
        return dequantize_int8(weight, weight_scale, dtype=dtype)

    def quantize(self, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`(weight, weight_scale)`, the stored form of a float weight `[..., out, in]`."""
        if self.kind == "nf4":
            return quantize_nf4(weight, block_size=self.block_size)
        return quantize_int8(weight, block_size=self.block_size)

    def matmul(self, x: jax.Array, weight: jax.Array, weight_scale: jax.Array, dtype: Any) -> jax.Array:
        """`x [rows, in] @ dequantize(weight).T -> [rows, out]` in `dtype` (what `Linear.__call__` computes)."""
        return dequantized_matmul(x, weight, weight_scale, self, jnp.dtype(dtype))


# --------------------------------------------------------------------------------------------------------------
# The two formats, on arrays (any leading dimensions; blocks run along the last, `in`, axis)
# --------------------------------------------------------------------------------------------------------------


def _blocks(weight: jax.Array, block_size: int) -> jax.Array:
    """`[..., out, in]` -> `[..., out, in / block_size, block_size]`."""
    return weight.reshape(*weight.shape[:-1], weight.shape[-1] // block_size, block_size)


def _absmax(blocks: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(blocks), axis=-1)  # [..., out, num_blocks]


def quantize_nf4(weight: jax.Array, *, block_size: int = NF4_BLOCK_SIZE) -> tuple[jax.Array, jax.Array]:
    """`(packed uint8 [..., out, in / 2], absmax float32 [..., out, in / block_size])` of a float weight: per block,
    `w / absmax` rounded to the nearest NF4 level, two 4-bit level indices per byte (even feature high)."""
    blocks = _blocks(weight.astype(jnp.float32), block_size)
    absmax = _absmax(blocks)
    normalized = blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None]
    # nearest level = how many midpoints between neighbouring levels lie below the value (a tie goes down)
    midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    codes = jnp.searchsorted(midpoints, normalized, side="left").astype(jnp.uint8).reshape(weight.shape)
    pairs = codes.reshape(*weight.shape[:-1], weight.shape[-1] // 2, 2)
    return (pairs[..., 0] << 4) | pairs[..., 1], absmax


def dequantize_nf4(packed: jax.Array, absmax: jax.Array, *, dtype: Any = jnp.float32) -> jax.Array:
    """The weight `[..., out, in]` in `dtype` from `quantize_nf4`'s output: level times block absmax, computed in
    `dtype` (the compute dtype: a bfloat16 step never forms a float32 weight)."""
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    levels = jnp.take(jnp.asarray(NF4_LEVELS, dtype), codes.astype(jnp.int32), axis=0)
    block_size = codes.shape[-1] // absmax.shape[-1]
    return (_blocks(levels, block_size) * absmax.astype(dtype)[..., None]).reshape(codes.shape)


def quantize_int8(weight: jax.Array, *, block_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """`(int8 [..., out, in], scale float32 [..., out, in / block_size])`, `w ≈ q * scale` with
    `scale = absmax / 127` per output channel (`block_size=None`: `[..., out, 1]`) or per block of inputs."""
    blocks = _blocks(weight.astype(jnp.float32), block_size or weight.shape[-1])
    scale = _absmax(blocks) / INT8_MAX
    quantized = jnp.round(blocks / jnp.where(scale == 0, 1.0, scale)[..., None])
    return jnp.clip(quantized, -INT8_MAX, INT8_MAX).astype(jnp.int8).reshape(weight.shape), scale


def dequantize_int8(quantized: jax.Array, scale: jax.Array, *, dtype: Any = jnp.float32) -> jax.Array:
    """The weight `[..., out, in]` in `dtype` from `quantize_int8`'s output."""
    block_size = quantized.shape[-1] // scale.shape[-1]
    return (_blocks(quantized.astype(dtype), block_size) * scale.astype(dtype)[..., None]).reshape(quantized.shape)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def dequantized_matmul(x: jax.Array, weight: jax.Array, weight_scale: jax.Array, quantization: Quantization,
                       dtype: Any) -> jax.Array:
    """`x @ dequantize(weight).T`, whose backward pass dequantizes the weight again for `d_x` rather than keeping
    the dequantized copy from the forward pass: without gradient checkpointing, plain autodiff would save every
    layer's weight in the compute dtype (a bfloat16 copy of the whole base) for the backward pass. The stored
    weight gets no gradient (it is frozen; integers have none)."""
    return matmul_transposed_weight(x, quantization.dequantize(weight, weight_scale, dtype))


def _dequantized_matmul_fwd(x, weight, weight_scale, quantization, dtype):
    return dequantized_matmul(x, weight, weight_scale, quantization, dtype), (weight, weight_scale)


def _dequantized_matmul_bwd(quantization, dtype, residuals, d_y):
    weight, weight_scale = residuals
    d_x = jax.lax.dot_general(d_y, quantization.dequantize(weight, weight_scale, dtype), (((1,), (0,)), ((), ())))
    return d_x.astype(dtype), np.zeros(weight.shape, jax.dtypes.float0), jnp.zeros_like(weight_scale)


dequantized_matmul.defvjp(_dequantized_matmul_fwd, _dequantized_matmul_bwd)


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def _quantized_modules(model: nnx.Module) -> list[tuple[str, Linear]]:
    """`(dotted path, Linear)` of the linear layers a quantized base stores quantized: those of the decoder layers
    (not `lm_head` nor a classifier's `score`, which bitsandbytes keeps in float too)."""
    return [(".".join(str(p) for p in path), module) for path, module in nnx.iter_graph(model)
            if isinstance(module, Linear) and "layers" in [str(p) for p in path]]


def quantization_settings(kind: str, *, block_size: int | None = None) -> Quantization:
    """The `Quantization` for `kind` "nf4" (`block_size` default 64) or "int8" (default None: one scale per output
    channel); `ValueError` for anything else."""
    if kind not in ("nf4", "int8"):
        raise ValueError(f"kind={kind!r} is not a quantization jaxpt has: 'nf4' (--load_in_4bit) or 'int8' "
                         "(--load_in_8bit).")
    block_size = (NF4_BLOCK_SIZE if kind == "nf4" else None) if block_size is None else block_size
    if block_size is not None and (block_size < 1 or (kind == "nf4" and block_size % 2)):
        raise ValueError(f"block_size={block_size} must be a positive (for nf4: even) number of input features.")
    return Quantization(kind=kind, block_size=block_size)


def quantized_linears(model: nnx.Module, quantization: Quantization) -> list[tuple[str, Linear]]:
    """`(dotted path, Linear)` of the layers `quantization` stores quantized in `model` (concrete or abstract);
    `ValueError` when there are none or a layer's inputs do not split into its blocks."""
    modules = _quantized_modules(model)
    if not modules:
        raise ValueError(f"The {type(model).__name__} has no decoder-layer linear layers to quantize.")
    block_size = quantization.block_size
    for name, module in modules:
        if block_size is not None and module.in_features % block_size:
            raise ValueError(f"{name} has in_features={module.in_features}, not a multiple of the "
                             f"{quantization.kind} block size {block_size}: pass a block_size that divides it.")
    return modules


def quantize_layer_by_layer(load_layer, layer: jax.ShapeDtypeStruct, num_layers: int, quantization: Quantization, *,
                            name: str, rules=(), mesh: jax.sharding.Mesh | None = None) -> tuple[jax.Array, jax.Array]:
    """`(weight, weight_scale)` of the stacked `[num_layers, out, in]` weight of Linear `name` (e.g.
    `model.layers.mlp.up_proj`) quantized while it is read: `load_layer(index, sharding)` returns layer `index`'s
    float weight (`layer`: its shape and dtype), placed by `sharding` (None without a mesh); it is quantized and
    dropped before the next layer is read, so at most one layer's float weight exists at a time. Equal bit for bit
    to `quantize_model` of the float model (the same per-layer computation); on a mesh, placed by the family's
    partition rules as `quantize_model` places it."""
    stacked = jax.ShapeDtypeStruct((num_layers, *layer.shape), layer.dtype)
    outputs = jax.eval_shape(jax.vmap(quantization.quantize), stacked)  # (weight, weight_scale), stacked
    if mesh is None:
        float_sharding, layer_shardings, stacked_shardings = None, None, (None, None)
    else:
        def sharding(spec, *, per_layer):
            return jax.sharding.NamedSharding(mesh, P(*spec[1:]) if per_layer else spec)

        specs = [partition_spec(f"{name}.{suffix}", out.shape, rules, mesh)
                 for suffix, out in zip(("weight", "weight_scale"), outputs, strict=True)]
        float_sharding = sharding(partition_spec(f"{name}.weight", stacked.shape, rules, mesh), per_layer=True)
        layer_shardings = tuple(sharding(spec, per_layer=True) for spec in specs)
        stacked_shardings = tuple(sharding(spec, per_layer=False) for spec in specs)
    quantize = jax.jit(quantization.quantize, out_shardings=layer_shardings)
    stored_layers, scale_layers = [], []
    for index in range(num_layers):
        weight = load_layer(index, float_sharding)
        stored, scale = quantize(weight)
        del weight  # the float layer is gone before the next is read
        stored_layers.append(stored)
        scale_layers.append(scale)
    return tuple(jax.jit(jnp.stack, out_shardings=placement)(parts)
                 for parts, placement in zip((stored_layers, scale_layers), stacked_shardings, strict=True))


def is_quantized(model: nnx.Module) -> bool:
    return any(module.quantization is not None for _, module in _quantized_modules(model))


def _mesh_of(array) -> jax.sharding.Mesh | None:
    sharding = getattr(array, "sharding", None) if isinstance(array, jax.Array) else None
    return sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None


@functools.cache
def _jitted_quantize(quantization: Quantization, stacked: bool, out_shardings: tuple | None = None):
    """`quantization.quantize` jitted, one decoder layer at a time over a stacked weight (lax.map over the layer
    axis: the float temporaries stay one layer's size). Cached, so modules of the same shape (q and o, gate and up,
    every model quantized alike in this process) compile it once."""
    run = (lambda w: jax.lax.map(quantization.quantize, w)) if stacked else quantization.quantize
    return jax.jit(run, out_shardings=out_shardings)


def quantize_model(model: nnx.Module, *, kind: str = "nf4", block_size: int | None = None) -> nnx.Module:
    """Store the decoder layers' linear weights of `model` quantized, in place (and return it): `kind` "nf4"
    (`block_size` default 64) or "int8" (`block_size` default None: one scale per output channel).

    Module by module, so the extra memory at any moment is one module's float weight. On a mesh, the quantized
    weight and its scales are placed by the family's partition rules, like the float weight was. Adapters
    (`jaxpt.lora.apply_lora`) go on after; a model with adapters already is refused.
    """
    if getattr(model, "lora_settings", None) is not None:
        raise ValueError("The model already has LoRA adapters: quantize the base first, then add the adapters "
                         "(apply_lora with load_in_4bit / load_in_8bit does both in that order).")
    if is_quantized(model):
        raise ValueError("The model's base is already quantized.")
    quantization = quantization_settings(kind, block_size=block_size)
    modules = quantized_linears(model, quantization)
    rules = tuple(getattr(model, "partition_rules", ()))
    for name, module in modules:
        weight = module.weight[...]
        mesh = _mesh_of(weight)
        stacked = weight.ndim == 3
        if mesh is None:
            stored, scale = _jitted_quantize(quantization, stacked)(weight)
        else:
            shapes = jax.eval_shape(_jitted_quantize(quantization, stacked), weight)
            shardings = tuple(jax.sharding.NamedSharding(mesh, partition_spec(f"{name}.{suffix}", shape.shape, rules,
                                                                              mesh))
                              for suffix, shape in zip(("weight", "weight_scale"), shapes, strict=True))
            stored, scale = _jitted_quantize(quantization, stacked, shardings)(weight)
        del weight
        module.weight = nnx.Param(stored)
        module.weight_scale = nnx.Param(scale)
        module.quantization = quantization
    return model


@functools.cache
def _jitted_dequantize(quantization: Quantization, dtype: Any, out_shardings=None):
    """`quantization.dequantize` to `dtype`, jitted; cached like `_jitted_quantize`."""
    return jax.jit(partial(quantization.dequantize, dtype=dtype), out_shardings=out_shardings)


def dequantize_model(model: nnx.Module, *, param_dtype: Any = jnp.float32) -> nnx.Module:
    """The reverse of `quantize_model`, in place: every quantized weight back to a float `nnx.Param` (`param_dtype`)
    holding its dequantized values, so the model can be merged with its adapters and saved as a full checkpoint."""
    rules = tuple(getattr(model, "partition_rules", ()))
    for name, module in _quantized_modules(model):
        if module.quantization is None:
            continue
        stored, scale = module.weight[...], module.weight_scale[...]
        mesh = _mesh_of(stored)
        if mesh is None:
            weight = _jitted_dequantize(module.quantization, param_dtype)(stored, scale)
        else:
            shape = jax.eval_shape(_jitted_dequantize(module.quantization, param_dtype), stored, scale).shape
            sharding = jax.sharding.NamedSharding(mesh, partition_spec(f"{name}.weight", shape, rules, mesh))
            weight = _jitted_dequantize(module.quantization, param_dtype, sharding)(stored, scale)
        module.weight = nnx.Param(weight)
        module.weight_scale = nnx.data(None)
        module.quantization = None
    return model


def quantization_from_config(config: Any) -> str | None:
    """"nf4" / "int8" / None from TRL's `ModelConfig` flags (`load_in_4bit`, `load_in_8bit`, `bnb_4bit_quant_type`),
    on a `jaxpt.lora.LoraConfig` or anything with those fields."""
    if getattr(config, "load_in_4bit", False):
        return getattr(config, "bnb_4bit_quant_type", "nf4")
    if getattr(config, "load_in_8bit", False):
        return "int8"
    return None


def quantize_from_config(model: nnx.Module, config: Any) -> nnx.Module:
    """Quantize `model`'s base as `config`'s TRL flags say (`quantization_from_config`), in place; nothing without
    them. A base quantized already must be in the format asked for."""
    kind = quantization_from_config(config)
    if kind is None:
        return model
    current = {module.quantization.kind for _, module in _quantized_modules(model) if module.quantization is not None}
    if current and current != {kind}:
        raise ValueError(f"The model's base is quantized as {sorted(current)}, but the config asks for {kind!r} "
                         "(load_in_4bit / load_in_8bit): load the float model again.")
    return model if current else quantize_model(model, kind=kind)


def check_trainable(model: nnx.Module) -> None:
    """A quantized base trains only through adapters (integer weights have no gradient): fail before any work."""
    if is_quantized(model) and getattr(model, "lora_settings", None) is None:
        raise ValueError("The model's base is quantized (load_in_4bit / load_in_8bit) but it has no LoRA adapters: a "
                         "quantized base cannot be trained itself. Add adapters (--use_peft, or "
                         "jaxpt.lora.apply_lora), or load the model without quantization.")


def parameter_bytes(tree: Any) -> int:
    """Bytes the arrays of a pytree hold (a model's `nnx.state`, a `TrainState`'s `frozen`/`params`/`opt_state`)."""
    return sum(int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)
               if hasattr(leaf, "dtype"))
