"""The plain building blocks every model family shares: activations, HF-layout parameters, sharding hints.

Each family file (`llama.py`, `qwen2.py`, ...) reads top to bottom like its `transformers` counterpart and
uses these pieces, with rotary embeddings from `rope.py`, the attention kernel from `attention.py` and the
generation cache from `kv_cache.py`:

- `activation`: the `hidden_act` functions of `transformers`, by name.
- `Linear` and `Embed` keep Hugging Face's parameter layout (`weight` is `[out_features, in_features]`,
  embeddings are `[vocab, hidden]`), so loading and saving safetensors is a name-for-name copy;
  `matmul_transposed_weight` reads HF-layout weights in place for the few-row matmuls of decode steps on CPU;
  `project_to_vocab` turns final hidden states into logits.
- `constrain`: an activation sharding hint that is a no-op without a mesh.
- `stack_layers` / `scan_layers`: the decoder layers as one module whose parameters have a leading layer axis
  (`[num_layers, ...]`), run with `jax.lax.scan` (rematerialised when gradient checkpointing is on), so a
  step's compile time does not grow with depth.
- `last_token_index`: where a sequence classifier pools.

Performance note (XLA on CPU, measured in benchmarks/forward_backward.py): dense layers multiply 2-D
matrices (`[tokens, features]`), since a matmul on 3-D activations was 2x slower forward+backward.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from jaxpt.models.attention import ATTENTION_RESIDUAL_NAMES


def silu(x: jax.Array) -> jax.Array:
    """`x * sigmoid(x)` with the sigmoid written as `0.5 * tanh(x / 2) + 0.5`: the same function (to float
    rounding), but XLA lowers `tanh` without the division `jax.nn.sigmoid` costs; on CPU the MLP's
    forward+backward ran ~5% faster."""
    return x * (0.5 * jnp.tanh(0.5 * x) + 0.5)


ACTIVATIONS = {
    "silu": silu,
    "swish": silu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str):
    """The activation function `transformers` calls `name` (`hidden_act` / `hidden_activation`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported; supported: {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


# --------------------------------------------------------------------------------------------------------------
# Parameters in Hugging Face layout
# --------------------------------------------------------------------------------------------------------------


FEW_ROWS = 64


def matmul_transposed_weight(x: jax.Array, weight: jax.Array) -> jax.Array:
    """`x [rows, in] @ weight [out, in].T -> [rows, out]`.

    On CPU, a product with at most `FEW_ROWS` rows (a decode step: one token per sequence) is computed
    weight-first, `(weight @ x.T).T`. XLA-CPU's matmul library repacks a right operand contracted on its minor
    dimension at every call, and HF-layout `[out, in]` weights in `x @ weight.T` are exactly that: with 8 rows,
    repacking cost more than multiplying (an MLP matmul took 2x as long as with an `[in, out]` weight). As the
    left operand the weight is read where it lies; an optimisation barrier keeps XLA from turning the product
    back around, and transposing the small `[out, rows]` result is cheap. Training matmuls (thousands of rows)
    and other backends take the plain product.
    """
    if x.shape[0] <= FEW_ROWS and jax.default_backend() == "cpu":
        product = jax.lax.dot_general(weight, x, (((1,), (1,)), ((), ())))  # [out, rows]
        return jax.lax.optimization_barrier(product).T
    return jax.lax.dot_general(x, weight, (((1,), (1,)), ((), ())))


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix (`Linear.lora_a` / `lora_b`): with adapters on, the only parameters trained
    (`jaxpt.lora`)."""


# The key of LoRA dropout while a training step traces its loss (`adapter_dropout`); None everywhere else, so
# evaluation, sampling and reference forwards never drop anything.
_ADAPTER_DROPOUT_KEY: contextvars.ContextVar = contextvars.ContextVar("adapter_dropout_key", default=None)


@contextlib.contextmanager
def adapter_dropout(key: jax.Array | None) -> Iterator[None]:
    """Within this block (while a loss is traced), `Linear`s with a LoRA adapter and `lora_dropout > 0` drop out
    their adapter's input with masks drawn from `key` (folded with each adapter's index; per decoder layer,
    `scan_layers` splits it). `key=None`: no dropout. `jaxpt.lora.value_and_grad` is what enters it."""
    token = _ADAPTER_DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _ADAPTER_DROPOUT_KEY.reset(token)


def adapter_dropout_key() -> jax.Array | None:
    """The LoRA dropout key of the enclosing `adapter_dropout` block, or None."""
    return _ADAPTER_DROPOUT_KEY.get()


class Linear(nnx.Module):
    """`y = x @ weight.T + bias` with `weight` stored `[out_features, in_features]` as in PyTorch/HF, plus
    `lora_scale * (dropout(x) @ lora_a.T) @ lora_b.T` when a LoRA adapter is attached (`jaxpt.lora.apply_lora`);
    the dropout (rate `lora_dropout`, as peft: on the adapter's input only) acts only inside `adapter_dropout`. A
    quantized `weight` (int8 / NF4, `jaxpt.quantize`) is dequantized in the compute dtype at each call."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.weight = nnx.Param(
            init_std * jax.random.normal(rngs.params(), (out_features, in_features), param_dtype)
        )
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        # Set by `scan_layers` on a mesh, for the traced layer only: the layout of a `weight` split over "fsdp" (one
        # mesh axis or None per dimension), which `fsdp_matmul` gathers (forward) and reduce-scatters the gradient
        # along (backward); a "tensor" dimension stays split.
        self.fsdp_spec = None
        # A LoRA adapter (`jaxpt.lora.apply_lora` sets these): `lora_a` [r, in], `lora_b` [out, r], static scale.
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_scale = None
        # A quantized base (`jaxpt.quantize.quantize_model` sets these): `weight` holds the codes (int8, or packed
        # 4-bit in uint8), `weight_scale` their block scales; `quantization` (static) dequantizes them.
        self.weight_scale = nnx.data(None)
        self.quantization = None
        self.lora_dropout = 0.0  # static: the dropout rate on the adapter's input while training
        self.lora_index = 0  # static: this adapter's number in the model, what its dropout key is folded with

    def __call__(self, x: jax.Array) -> jax.Array:
        leading = x.shape[:-1]
        rows = x.reshape(-1, self.in_features).astype(self.dtype)
        # A 2-D matmul: XLA on CPU runs [tokens, in] x [out, in]^T much faster than the 3-D einsum.
        if self.quantization is not None:  # dequantized here, in the compute dtype, for this product only
            y = self.quantization.matmul(rows, self.weight[...], self.weight_scale[...], self.dtype)
        elif self.fsdp_spec is not None:
            y = fsdp_matmul(rows, self.weight[...], self.fsdp_spec, jnp.dtype(self.dtype))
        else:
            y = matmul_transposed_weight(rows, self.weight[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:  # peft's order: base output (with bias), then + scale * B (A dropout(x))
            adapter_rows = rows
            key = adapter_dropout_key() if self.lora_dropout else None
            if key is not None:  # inverted dropout: kept inputs scaled by 1 / (1 - rate), as torch's nn.Dropout
                keep = jax.random.bernoulli(jax.random.fold_in(key, self.lora_index), 1.0 - self.lora_dropout,
                                            rows.shape)
                adapter_rows = jnp.where(keep, rows / (1.0 - self.lora_dropout), 0.0).astype(rows.dtype)
            low_rank = matmul_transposed_weight(adapter_rows, self.lora_a[...].astype(self.dtype))  # [tokens, r]
            y = y + matmul_transposed_weight(low_rank, self.lora_b[...].astype(self.dtype)) * self.lora_scale
        return y.reshape(*leading, self.out_features)


class Embed(nnx.Module):
    """Token embedding `[vocab, hidden]` (HF `nn.Embedding`); `attend` projects onto it for tied LM heads."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.weight = nnx.Param(init_std * jax.random.normal(rngs.params(), (num_embeddings, features), param_dtype))

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return embedding_lookup(self.weight[...], input_ids, self.dtype)


def embedding_lookup(table: jax.Array, input_ids: jax.Array, dtype: Any) -> jax.Array:
    """Rows `[batch, seq, hidden]` of `table [vocab, hidden]` at `input_ids [batch, seq]`, cast to `dtype`.

    On a mesh whose batch axes ("data", "fsdp") split the rows, written in `shard_map` for the table's own layout
    (the embedding rule `("tensor", "fsdp")`: vocabulary over "tensor", hidden over "fsdp", each where it divides):
    every device gathers the token ids of its "fsdp" group (integers), looks them up in its own slice of the table
    (over "tensor": its own vocabulary rows, the others' summed in), and one all-to-all over "fsdp" hands each
    device its own rows with the whole hidden dimension. The backward pass is the all-to-all back and a scatter-add
    into the device's own slice, summed over "data". The table is never gathered and no collective moves more than
    one device's share of the embedded batch (left to itself, XLA replicated the whole embedded batch on meshes
    with a "data" or "tensor" axis of size > 1). Without a mesh, or when the batch axes do not divide the rows, a
    plain `take`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes, ways = splitting_batch_axes(mesh)
    if not batch_axes or input_ids.ndim != 2 or input_ids.shape[0] % ways:
        return jnp.take(table, input_ids, axis=0).astype(dtype)
    hidden_split = "fsdp" in batch_axes and table.shape[1] % mesh.shape["fsdp"] == 0
    vocab_split = mesh.shape.get("tensor", 1) > 1 and table.shape[0] % mesh.shape["tensor"] == 0

    def local(table, input_ids):  # table [vocab / tensor, hidden / fsdp], input_ids [rows / (data * fsdp), seq]
        if hidden_split:  # the ids of every row of this "fsdp" group: [rows / data, seq]
            input_ids = jax.lax.all_gather(input_ids, "fsdp", axis=0, tiled=True)
        if vocab_split:  # this device's vocabulary rows; the others come from the psum over "tensor"
            first = jax.lax.axis_index("tensor") * table.shape[0]
            index = input_ids - first
            owned = (index >= 0) & (index < table.shape[0])
            rows = jnp.where(owned[..., None], jnp.take(table, jnp.where(owned, index, 0), axis=0), 0)
            # summed in float32 (exact: one device owns each id): XLA:CPU widens a bfloat16 all-reduce to float32
            # anyway, and its pass that does so crashes on this one in a forward-only program
            rows = jax.lax.psum(rows.astype(jnp.promote_types(dtype, jnp.float32)), "tensor").astype(dtype)
        else:
            rows = jnp.take(table, input_ids, axis=0).astype(dtype)
        if hidden_split:  # [rows / data, seq, hidden / fsdp] -> [rows / (data * fsdp), seq, hidden]
            rows = jax.lax.all_to_all(rows, "fsdp", split_axis=0, concat_axis=2, tiled=True)
        return rows

    table_spec = PartitionSpec("tensor" if vocab_split else None, "fsdp" if hidden_split else None)
    return jax.shard_map(local, mesh=mesh, in_specs=(table_spec, PartitionSpec(batch_axes, None)),
                         out_specs=PartitionSpec(batch_axes, None, None),
                         axis_names={*batch_axes, *(("tensor",) if vocab_split else ())})(table, input_ids)


def project_to_vocab(hidden_states: jax.Array, weight: jax.Array, *, logit_softcap: float | None = None) -> jax.Array:
    """Logits `[..., vocab]` from hidden states `[..., hidden]` and an output projection `[vocab, hidden]`."""
    leading = hidden_states.shape[:-1]
    logits = matmul_transposed_weight(
        hidden_states.reshape(-1, hidden_states.shape[-1]), weight.astype(hidden_states.dtype)
    ).reshape(*leading, weight.shape[0])
    if logit_softcap is not None:
        logits = jnp.tanh(logits / logit_softcap) * logit_softcap
    return logits


# --------------------------------------------------------------------------------------------------------------
# Sharding hints
# --------------------------------------------------------------------------------------------------------------


BATCH_AXES = ("data", "fsdp")


def splitting_batch_axes(mesh) -> tuple[tuple[str, ...], int]:
    """The batch axes ("data", "fsdp") that split a batch on `mesh` (those of size > 1; none without a mesh) and
    into how many parts they split it together."""
    axes = () if mesh.empty else tuple(axis for axis in BATCH_AXES if mesh.shape.get(axis, 1) > 1)
    return axes, math.prod(mesh.shape[axis] for axis in axes)


def constrain(x: jax.Array, *spec) -> jax.Array:
    """`with_sharding_constraint(x, PartitionSpec(*spec))` inside a mesh context; a no-op outside one.

    Spec entries name mesh axes ("data", "fsdp", "tensor") or BATCH_AXES; axes the current mesh does not have
    are dropped, so the same model code runs on any mesh and on none.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    names = set(mesh.axis_names)

    def keep(entry):
        if entry is None:
            return None
        entries = (entry,) if isinstance(entry, str) else tuple(entry)
        kept = tuple(e for e in entries if e in names)
        return kept if kept else None

    return jax.lax.with_sharding_constraint(x, PartitionSpec(*(keep(e) for e in spec)))


# --------------------------------------------------------------------------------------------------------------
# Small helpers the family files share
# --------------------------------------------------------------------------------------------------------------


def stack_layers(layers: Sequence[nnx.Module]) -> nnx.Module:
    """One module with the structure of `layers[0]` whose every parameter stacks the layers' along a new leading
    axis: `self_attn.q_proj.weight` `[num_layers, out, in]`, row i from `layers[i]` (HF's `model.layers.{i}`).

    The layers must be built alike (same submodules, same static attributes): what differs from layer to layer
    (a sliding window, a rope) is passed to `scan_layers` as an option. Building them one by one and stacking
    draws the same initial values as a Python list of layers would.
    """
    graphdef, first = nnx.split(layers[0])
    states = [first]
    for index, layer in enumerate(layers[1:], start=1):
        layer_graphdef, state = nnx.split(layer)
        if layer_graphdef != graphdef:
            raise ValueError(f"Decoder layer {index} is not built like layer 0; stacked layers must be alike.")
        states.append(state)
    return nnx.merge(graphdef, jax.tree.map(lambda *rows: jnp.stack(rows), *states))


def scan_layers(
    layers: nnx.Module,
    call: Callable[[nnx.Module, Any, Any, Hashable], tuple[Any, Any]],
    x: Any,
    per_layer: Any = None,
    *,
    options: Sequence[Hashable],
    remat: bool = False,
    partition_rules: Sequence[tuple[str, tuple[str | None, ...]]] = (),
    unroll: bool = False,
) -> tuple[Any, Any]:
    """Run the stacked decoder `layers` (`stack_layers`) in order with `jax.lax.scan`, one traced layer for any
    depth: `x, out[i] = call(layer_i, x, per_layer[i], options[i])`. Returns the last `x` and `out` stacked.

    `x`: the carry, an array or any pytree (generation carries `(hidden, stacked KV cache)`, so the cache is
    updated in place rather than copied through the scan's inputs and outputs).
    `per_layer`: arrays (any pytree, or None) with a leading layer axis scanned along (e.g. layer indices).
    `options`: one static value per layer (hashable, e.g. its sliding window). `call` is traced once per distinct
    value and each layer runs its own through `lax.switch`, so options stay Python values (the attention kernel
    specialises on them) while compile time stays independent of depth.
    `remat` (gradient checkpointing): the scanned body is rematerialised; the backward pass keeps only each
    layer's input and recomputes the rest, with the layer's weights read again. Without it, the backward pass
    keeps each layer's weight-matmul outputs and attention outputs and recomputes the cheap rest.
    `partition_rules` (the family's, for one layer): on a mesh, each layer's weights are gathered inside the
    scanned body (`gather_layer_params`), so the backward pass of a checkpointed layer gathers them again
    instead of keeping a gathered copy of every layer alive.
    `unroll`: a Python loop over the layers instead of the scan (the decode step of generation, which runs inside a
    loop over tokens): layer i reads its weights at the fixed index i, the same slice every token, which XLA takes
    once outside the token loop, where a scan's traced index copies every layer's weights at every token.
    `per_layer`'s leaves are then indexed with Python ints (numpy arrays stay numpy: static layer numbers). Compile
    time grows with depth, one traced layer per layer.
    """
    graphdef, params = nnx.split(layers)
    compute_dtype = next((module.dtype for _, module in nnx.iter_graph(layers) if isinstance(module, Linear)), None)
    distinct = tuple(dict.fromkeys(options))
    option_index = jnp.asarray([distinct.index(option) for option in options], jnp.int32)
    dropout_key = adapter_dropout_key()  # training with LoRA dropout: each layer draws its own masks
    layer_keys = None if dropout_key is None else jax.random.split(dropout_key, len(options))

    def body(x, scanned, option):
        layer_params, index, layer_inputs, layer_key = scanned
        layer_params, fsdp_specs = gather_layer_params(layer_params, partition_rules, compute_dtype)
        with adapter_dropout(layer_key):
            if option is not _TRACED_OPTION or len(distinct) == 1:
                option = distinct[0] if option is _TRACED_OPTION else option
                return branch(option, fsdp_specs)(x, layer_params, layer_inputs)
            return jax.lax.switch(index, [branch(option, fsdp_specs) for option in distinct], x, layer_params,
                                  layer_inputs)

    def branch(option, fsdp_specs):
        def run(x, layer_params, layer_inputs):
            layer = nnx.merge(graphdef, layer_params)
            for path, module in nnx.iter_graph(layer):
                if isinstance(module, Linear):
                    module.fsdp_spec = fsdp_specs.get((*path, "weight"))
            return call(layer, x, layer_inputs, option)

        return run

    if unroll:  # generation's decode step (no gradient, so no checkpoint policy): layer i at the static index i
        outs = []
        for i, option in enumerate(options):
            layer_slices = jax.tree.map(lambda leaf, i=i: leaf[i], (params, option_index, per_layer, layer_keys))
            x, out = body(x, layer_slices, option)
            outs.append(out)
        return x, jax.tree.map(lambda *rows: jnp.stack(rows), *outs)
    # prevent_cse=False: inside a scan the recomputation cannot be merged with the forward pass anyway.
    if remat:
        body = jax.checkpoint(body, prevent_cse=False, static_argnums=(2,))  # the option: a static value
    else:
        # Without checkpointing the backward pass keeps only the weight matmuls' outputs and recomputes the rest
        # (norms, activations, the attention kernel) from them: the scan stacks every saved value along the layer
        # axis in a zero-filled buffer, and on CPU writing and copying those buffers for the MLP's elementwise
        # intermediates `[batch, seq, intermediate]` cost more than recomputing them (CPU seconds per step: GRPO
        # update -17%, forward_backward.py -11%, dpo_step.py -12%). Same values and gradients. The attention kernel's
        # output and row log-sum-exps (`ATTENTION_RESIDUAL_NAMES`, one `[batch, seq, heads * head_dim]` array and
        # one `[batch, heads, seq]` per layer) are kept too, so the backward pass does not run the kernel's forward
        # loops again (GRPO train step at benchmarks/grpo_iteration.py's shapes: CPU seconds -22%).
        policy = jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            jax.checkpoint_policies.save_only_these_names(*ATTENTION_RESIDUAL_NAMES))
        body = jax.checkpoint(body, prevent_cse=False, policy=policy, static_argnums=(2,))
    scanned = (params, option_index, per_layer, layer_keys)
    return jax.lax.scan(lambda x, layer: body(x, layer, _TRACED_OPTION), x, scanned)


_TRACED_OPTION = object()  # scan_layers' body: the layer's option is chosen by its traced index


def gather_layer_params(params: Any, partition_rules, compute_dtype: Any) -> tuple[Any, dict]:
    """One layer's parameters as its matmuls read them, and `{path: dim}` of the `Linear` weights left split.

    On a mesh, a `Linear` weight split over "fsdp" stays split here: its matmul (`fsdp_matmul`) gathers it in the
    compute dtype and reduce-scatters its gradient; `{path: dim}` names the split dimension (`path` as
    `nnx.iter_graph` spells a module's, plus "weight"). Every other matrix is cast to `compute_dtype` first (so a
    bfloat16 step moves bfloat16, not float32) and gathered over "fsdp", staying split over "tensor" as the
    family's `partition_rules` say. Without a mesh only the cast happens (the matmuls cast anyway).
    """
    from jaxpt.sharding import partition_spec, path_name

    mesh = jax.sharding.get_abstract_mesh()
    fsdp_specs = {}

    def prepare(path, value):
        spec = () if mesh.empty or not partition_rules else partition_spec(path_name(path), value.shape,
                                                                             partition_rules, mesh)
        keys = tuple(key.key for key in path if isinstance(key, jax.tree_util.DictKey))
        # a quantized (integer) weight is not: it is gathered packed, below, and dequantized by its Linear
        if ("fsdp" in spec and keys[-1:] == ("weight",) and value.ndim == 2 and compute_dtype is not None
                and jnp.issubdtype(value.dtype, jnp.floating)):
            fsdp_specs[keys] = tuple(spec)
            return value
        if compute_dtype is not None and value.ndim >= 2 and jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype(compute_dtype)
        if not spec:
            return value
        return jax.lax.with_sharding_constraint(value, PartitionSpec(*(None if axis == "fsdp" else axis
                                                                       for axis in spec)))

    return jax.tree_util.tree_map_with_path(prepare, params), fsdp_specs


# --------------------------------------------------------------------------------------------------------------
# FSDP matmuls: gather the weight in the compute dtype, reduce-scatter its gradient
# --------------------------------------------------------------------------------------------------------------


def gather_fsdp(weight: jax.Array, spec: tuple[str | None, ...], dtype: Any) -> jax.Array:
    """`weight`, laid out as `spec` (a mesh axis or None per dimension, "fsdp" on one), whole along its "fsdp"
    dimension on every device, in `dtype`: the cast comes before the all-gather (written in `shard_map`, so XLA
    cannot move it after), so a bfloat16 step moves bfloat16. A "tensor" dimension stays split, so the matmul is
    tensor-parallel (left to XLA, an 8B step gathered the MLP weights over "tensor" too). Not differentiable by
    itself: `fsdp_matmul` is."""
    dim = spec.index("fsdp")
    return jax.shard_map(lambda shard: jax.lax.all_gather(shard.astype(dtype), "fsdp", axis=dim, tiled=True),
                         mesh=jax.sharding.get_abstract_mesh(), in_specs=PartitionSpec(*spec),
                         out_specs=PartitionSpec(*(None if axis == "fsdp" else axis for axis in spec)),
                         axis_names={axis for axis in spec if axis}, check_vma=False)(weight)


def _weight_gradient(d_y: jax.Array, x: jax.Array, spec: tuple[str | None, ...], dtype: Any) -> jax.Array:
    """`d_y.T @ x` (`[out, in]`, float32) laid out as `spec` (the weight's): each device multiplies its own rows
    and the partial sums are reduce-scattered over "fsdp" to their owners (and summed over "data"), so no device
    ever holds the whole gradient; a "tensor" dimension stays split. Falls back to XLA's placement when the mesh's
    batch axes do not divide the rows."""
    dim = spec.index("fsdp")
    mesh = jax.sharding.get_abstract_mesh()
    axes, ways = splitting_batch_axes(mesh)
    product = partial(jax.lax.dot_general, dimension_numbers=(((0,), (0,)), ((), ())),
                      preferred_element_type=jnp.float32)
    if x.shape[0] % ways:
        return product(d_y, x).astype(dtype)

    def local(d_y, x):
        partial_sum = jax.lax.psum_scatter(product(d_y, x), "fsdp", scatter_dimension=dim, tiled=True)
        others = tuple(axis for axis in axes if axis != "fsdp")
        return (jax.lax.psum(partial_sum, others) if others else partial_sum).astype(dtype)

    # d_y [rows, out] and x [rows, in]: split over "tensor" where the weight's out / in dimension is
    out_axis, in_axis = (axis if axis == "tensor" else None for axis in spec)
    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(axes, out_axis), PartitionSpec(axes, in_axis)),
                         out_specs=PartitionSpec(*spec), axis_names={*axes, *(axis for axis in spec if axis)})(d_y, x)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def fsdp_matmul(x: jax.Array, weight: jax.Array, spec: tuple[str | None, ...], dtype: Any) -> jax.Array:
    """`x [rows, in] @ weight [out, in].T` for a `weight` laid out as `spec`, split over "fsdp" (rows split over the
    batch axes): the weight is gathered in `dtype` (`gather_fsdp`) for the product and dropped after it; the backward
    pass gathers it again for `d_x` and reduce-scatters `d_weight` to the weight's own split (`_weight_gradient`),
    float32 partial sums, as soon as it is formed. Inside a checkpointed layer nothing gathered outlives the layer.
    """
    return matmul_transposed_weight(x, gather_fsdp(weight, spec, dtype))


def _fsdp_matmul_fwd(x, weight, spec, dtype):
    return fsdp_matmul(x, weight, spec, dtype), (x, weight)


def _fsdp_matmul_bwd(spec, dtype, residuals, d_y):
    x, weight = residuals
    d_x = jax.lax.dot_general(d_y, gather_fsdp(weight, spec, dtype), (((1,), (0,)), ((), ())))
    return d_x.astype(x.dtype), _weight_gradient(d_y, x, spec, weight.dtype)


fsdp_matmul.defvjp(_fsdp_matmul_fwd, _fsdp_matmul_bwd)


def last_token_index(attention_mask: jax.Array | None, input_ids: jax.Array, pad_token_id: int | None) -> jax.Array:
    """Index `[batch]` of the last real token of each row, the token a classifier pools at.

    With an `attention_mask`, the last position whose mask is 1 (works with left and right padding, and when
    the pad token equals the EOS token). Without one, HF's rule: the rightmost token that is not
    `pad_token_id` (or the last position when there is no pad token).
    """
    batch, seq = input_ids.shape
    index = jnp.arange(seq, dtype=jnp.int32)
    if attention_mask is not None:
        is_token = attention_mask.astype(jnp.int32)
    elif pad_token_id is not None:
        is_token = (input_ids != pad_token_id).astype(jnp.int32)
    else:
        return jnp.full((batch,), seq - 1, jnp.int32)
    return jnp.argmax(index * is_token, axis=-1)
