"""Qwen2 / Qwen2.5, a Flax NNX port of `transformers`' `modeling_qwen2.py`.

Reads top to bottom like the original: config, RMSNorm, MLP, attention, decoder layer, model, LM head,
sequence classifier. Parameter names and layouts are HF's (`q_proj.weight` is `[out, in]`), with the decoder
layers stacked as in `llama.py` (`model.layers.self_attn.q_proj.weight` is `[num_layers, out, in]`).
Qwen2 is Llama with biases on q/k/v (none on o_proj or the MLP) and a sliding window on the layers
`config.layer_types` marks "sliding_attention".
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.models.attention import (
    attention,
    attn_implementation_from_hf,
    positions_from_mask,
    segments_from_inputs,
)
from jaxpt.models.kv_cache import CacheStep, KVCache, LayerCache, begin_decode, begin_prefill, cached_attention
from jaxpt.models.layers import (
    BATCH_AXES,
    Embed,
    Linear,
    activation,
    constrain,
    last_token_index,
    project_to_vocab,
    scan_layers,
    stack_layers,
)
from jaxpt.models.rope import RopeConfig, apply_rope, rope_cos_sin

# How each parameter is laid out on the mesh ("data", "fsdp", "tensor"), by HF name; the first rule that
# matches wins. Matrices are [out, in]: column-parallel layers shard `out` over "tensor", row-parallel ones
# shard `in`; the other dimension is split over "fsdp". Dimensions that do not divide stay replicated. Rules
# describe one layer: a stacked decoder-layer parameter gets an unsharded leading layer axis
# (`jaxpt.sharding.partition_spec`).
# Copied from jaxpt.models.llama.PARTITION_RULES
PARTITION_RULES = (
    (r"embed_tokens\.weight$", ("tensor", "fsdp")),  # [vocab, hidden]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$", ("tensor", "fsdp")),  # [out, hidden]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.bias$", ("tensor",)),
    (r"(o_proj|down_proj)\.weight$", ("fsdp", "tensor")),  # [hidden, in]
    (r"(o_proj|down_proj)\.bias$", (None,)),
    (r"lm_head\.weight$", ("tensor", "fsdp")),  # [vocab, hidden]
    (r"score\.weight$", (None, "fsdp")),  # [num_labels, hidden]
    (r"norm\.weight$", (None,)),
)


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """What the port reads from a `transformers` `Qwen2Config` (see `from_hf`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope: RopeConfig
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # None unless use_sliding_window
    layer_types: tuple[str, ...] = ()  # per layer: "full_attention" or "sliding_attention"
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    attn_implementation: str = "xla"  # jaxpt.models.attention.ATTN_IMPLEMENTATIONS
    model_type: str = "qwen2"
    hf_config_json: str = dataclasses.field(default="{}", repr=False)  # the full HF config, for save_pretrained

    @classmethod
    def from_hf(cls, hf_config) -> Qwen2Config:
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=hf_config.num_attention_heads,
            num_key_value_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
            head_dim=head_dim,
            rope=RopeConfig.from_hf(
                hf_config.rope_parameters, head_dim=head_dim, max_position_embeddings=hf_config.max_position_embeddings
            ),
            hidden_act=hf_config.hidden_act,
            rms_norm_eps=hf_config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            sliding_window=hf_config.sliding_window,  # HF's config already set it to None without use_sliding_window
            layer_types=tuple(hf_config.layer_types),
            initializer_range=hf_config.initializer_range,
            pad_token_id=getattr(hf_config, "pad_token_id", None),
            attn_implementation=attn_implementation_from_hf(hf_config),
            model_type=hf_config.model_type,
            hf_config_json=hf_config.to_json_string(use_diff=False),
        )

    # Copied from jaxpt.models.llama.LlamaConfig.to_hf
    def to_hf(self):
        import transformers

        return transformers.AutoConfig.for_model(**json.loads(self.hf_config_json))


# Copied from jaxpt.models.llama.LlamaRMSNorm with Llama->Qwen2
class Qwen2RMSNorm(nnx.Module):
    def __init__(self, hidden_size: int, *, eps: float, param_dtype: Any):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((hidden_size,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class Qwen2MLP(nnx.Module):
    def __init__(self, config: Qwen2Config, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        dense = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype,
                     init_std=config.initializer_range, rngs=rngs)
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, **dense)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, **dense)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, **dense)
        self.act_fn = activation(config.hidden_act)

    # Copied from jaxpt.models.llama.LlamaMLP.__call__
    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Qwen2Attention(nnx.Module):
    def __init__(self, config: Qwen2Config, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.attn_implementation = config.attn_implementation
        self.scale = config.head_dim**-0.5
        dense = dict(dtype=dtype, param_dtype=param_dtype, init_std=config.initializer_range, rngs=rngs)
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, use_bias=True, **dense)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, use_bias=True, **dense)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, use_bias=True, **dense)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, use_bias=False, **dense)

    # Copied from jaxpt.models.llama.LlamaAttention.project_qkv
    def project_qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Query `[batch, seq, heads, head_dim]`, key and value `[batch, seq, kv_heads, head_dim]`, rope applied."""
        batch, seq, _ = x.shape
        query = self.q_proj(x).reshape(batch, seq, self.num_heads, self.head_dim)
        key = self.k_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        value = self.v_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        query = constrain(apply_rope(query, cos, sin), BATCH_AXES, None, "tensor", None)
        key = constrain(apply_rope(key, cos, sin), BATCH_AXES, None, "tensor", None)
        return query, key, value

    # Copied from jaxpt.models.llama.LlamaAttention.__call__
    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array, *, sliding_window: int | None
    ) -> jax.Array:
        batch, seq, _ = x.shape
        query, key, value = self.project_qkv(x, cos, sin)
        out = attention(query, key, value, segment_ids=segment_ids, scale=self.scale, sliding_window=sliding_window,
                        implementation=self.attn_implementation)
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim))

    # Copied from jaxpt.models.llama.LlamaAttention.call_with_cache
    def call_with_cache(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: LayerCache, step: CacheStep, *,
        sliding_window: int | None,
    ) -> tuple[jax.Array, LayerCache]:
        """`__call__` for generation: this call's keys/values go into `cache` (`kv_cache.cached_attention`)."""
        batch, seq, _ = x.shape
        query, key, value = self.project_qkv(x, cos, sin)
        out, cache = cached_attention(query, key, value, cache, step, scale=self.scale, sliding_window=sliding_window)
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim)), cache


class Qwen2DecoderLayer(nnx.Module):
    def __init__(self, config: Qwen2Config, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.self_attn = Qwen2Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = Qwen2MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = Qwen2RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype
        )

    # Copied from jaxpt.models.llama.LlamaDecoderLayer.__call__
    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array, *, sliding_window: int | None
    ) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, sliding_window=sliding_window)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, BATCH_AXES, None, None)

    # Copied from jaxpt.models.llama.LlamaDecoderLayer.call_with_cache
    def call_with_cache(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: LayerCache, step: CacheStep, *,
        sliding_window: int | None,
    ) -> tuple[jax.Array, LayerCache]:
        attn_out, cache = self.self_attn.call_with_cache(self.input_layernorm(x), cos, sin, cache, step,
                                                         sliding_window=sliding_window)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, BATCH_AXES, None, None), cache


class Qwen2Model(nnx.Module):
    """Embeddings, decoder layers and the final norm: input ids -> final hidden states `[batch, seq, hidden]`.

    The decoder layers are one stacked module (`layers.stack_layers`, parameters `[num_layers, ...]`) run by
    `layers.scan_layers`; what differs between layers (the sliding window) is a per-layer option.
    """

    def __init__(self, config: Qwen2Config, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                  init_std=config.initializer_range, rngs=rngs)
        self.layers = stack_layers(
            [Qwen2DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
             for _ in range(config.num_hidden_layers)]
        )
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.gradient_checkpointing = False  # see jaxpt.models.set_gradient_checkpointing

    # Copied from jaxpt.models.llama.LlamaModel.__call__
    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        if positions is None:
            positions = positions_from_mask(attention_mask, segment_ids, input_ids.shape)
        segments = segments_from_inputs(input_ids, attention_mask, segment_ids)
        cos, sin = rope_cos_sin(positions, self.config.rope)  # [batch, seq, head_dim]
        x = constrain(self.embed_tokens(input_ids), BATCH_AXES, None, None)

        def run_layer(layer, x, _, sliding_window):
            return layer(x, cos, sin, segments, sliding_window=sliding_window), None

        x, _ = scan_layers(self.layers, run_layer, x, options=self.sliding_windows(),
                           remat=self.gradient_checkpointing, partition_rules=PARTITION_RULES)
        return self.norm(x)

    # Copied from jaxpt.models.llama.LlamaModel.call_with_cache
    def call_with_cache(
        self, input_ids: jax.Array, positions: jax.Array, cache: KVCache, step: CacheStep
    ) -> tuple[jax.Array, KVCache]:
        """`__call__` for generation: hidden states `[batch, seq, hidden]` of tokens written at `step` into `cache`."""
        cos, sin = rope_cos_sin(positions, self.config.rope)  # [batch, seq, head_dim]
        x = constrain(self.embed_tokens(input_ids), BATCH_AXES, None, None)

        # The cache rides in the layer loop's carry; each layer writes only its new slots (kv_cache.cached_attention).
        # A per-layer cache (a decode loop's, KVCache.split_layers) runs the layers unrolled, at static indices.
        def run_layer(layer, carry, index, sliding_window):
            x, layer_caches = carry
            return layer.call_with_cache(x, cos, sin, layer_caches, step._replace(layer=index),
                                         sliding_window=sliding_window), None

        layer_indices = np.arange(len(self.sliding_windows()), dtype=np.int32)
        (x, layer_caches), _ = scan_layers(self.layers, run_layer, (x, cache.layers), layer_indices,
                                           options=self.sliding_windows(), unroll=cache.per_layer)
        return self.norm(x), cache.replace(layers=layer_caches)

    def sliding_windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window: `config.sliding_window` on the layers `config.layer_types` marks
        "sliding_attention", None (full attention) on the others."""
        return tuple(self.config.sliding_window if layer_type == "sliding_attention" else None
                     for layer_type in self.config.layer_types)


# Copied from jaxpt.models.llama.LlamaForCausalLM with Llama->Qwen2
class Qwen2ForCausalLM(nnx.Module):
    """`model(input_ids, *, attention_mask, positions, segment_ids) -> logits [batch, seq, vocab]`."""

    partition_rules = PARTITION_RULES
    final_logit_softcap = None

    def __init__(self, config: Qwen2Config, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.model = Qwen2Model(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype=dtype, param_dtype=param_dtype,
                                  init_std=config.initializer_range, rngs=rngs)

    def hidden_states(self, input_ids: jax.Array, **inputs) -> jax.Array:
        """Final (normed) hidden states `[batch, seq, hidden]`, the input of the output projection."""
        return self.model(input_ids, **inputs)

    def lm_head_weight(self) -> jax.Array:
        """The output projection `[vocab, hidden]` (the embedding matrix when embeddings are tied)."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight[...]
        return self.lm_head.weight[...]

    def __call__(self, input_ids: jax.Array, **inputs) -> jax.Array:
        hidden = self.hidden_states(input_ids, **inputs)
        return project_to_vocab(hidden, self.lm_head_weight(), logit_softcap=self.final_logit_softcap)

    # Generation with a KV cache (`jaxpt.sampling` drives these): init_cache -> prefill -> decode_step ...

    def init_cache(self, batch_size: int, max_length: int, *, dtype: Any = None) -> KVCache:
        """An empty `KVCache` with `max_length` slots per row (prompt + new tokens), keys
        `[num_layers, batch_size, kv_heads, head_dim, max_length]` and values `[num_layers, batch_size, kv_heads,
        max_length, head_dim]` (`kv_cache.LayerCache`), in the compute dtype unless `dtype` is given."""
        return KVCache.create(
            batch_size=batch_size, max_length=max_length, num_layers=self.config.num_hidden_layers,
            num_kv_heads=self.config.num_key_value_heads, head_dim=self.config.head_dim,
            dtype=dtype if dtype is not None else self.model.embed_tokens.dtype,
        )

    def prefill(
        self, input_ids: jax.Array, cache: KVCache, *, attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, KVCache]:
        """Run a left-padded prompt `input_ids` `[batch, seq]` (every row's last token real) into an empty `cache`.

        Positions are `cumsum(attention_mask) - 1`, as HF `generate`. Returns the logits `[batch, vocab]` of the
        token after the prompt and the cache holding the prompt's keys and values in slots `[0, seq)`.
        """
        positions, step, cache = begin_prefill(cache, input_ids, attention_mask)
        hidden, cache = self.model.call_with_cache(input_ids, positions, cache, step)
        return project_to_vocab(hidden[:, -1], self.lm_head_weight(), logit_softcap=self.final_logit_softcap), cache

    def decode_step(self, token_ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Append one token per row, `token_ids` `[batch]`, at slot `cache.length`: the logits `[batch, vocab]` of
        the token after it and the updated cache."""
        positions, step, cache = begin_decode(cache)
        hidden, cache = self.model.call_with_cache(token_ids[:, None], positions, cache, step)
        logits = project_to_vocab(hidden[:, 0], self.lm_head_weight(), logit_softcap=self.final_logit_softcap)
        return logits, cache


# Copied from jaxpt.models.llama.LlamaForSequenceClassification with Llama->Qwen2
class Qwen2ForSequenceClassification(nnx.Module):
    """`model(input_ids, *, attention_mask) -> [batch, num_labels]`, scored at the last real token."""

    partition_rules = PARTITION_RULES

    def __init__(self, config: Qwen2Config, *, num_labels: int, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.num_labels = num_labels
        self.model = Qwen2Model(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.score = Linear(config.hidden_size, num_labels, dtype=dtype, param_dtype=param_dtype,
                            init_std=config.initializer_range, rngs=rngs)

    def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None, **inputs) -> jax.Array:
        hidden = self.model(input_ids, attention_mask=attention_mask, **inputs)  # [batch, seq, hidden]
        last = last_token_index(attention_mask, input_ids, self.config.pad_token_id)  # [batch]
        pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [batch, hidden]
        return self.score(pooled).astype(jnp.float32)


# What jaxpt.models dispatches on: model_type -> classes, and the HF class names for config.json.
CONFIG = Qwen2Config
HF_ARCHITECTURES = {"qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification")}
CAUSAL_LM = {"qwen2": Qwen2ForCausalLM}
SEQUENCE_CLASSIFICATION = {"qwen2": Qwen2ForSequenceClassification}
