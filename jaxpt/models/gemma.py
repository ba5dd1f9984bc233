"""Gemma 2 and Gemma 3 (text), a Flax NNX port of `transformers`' `modeling_gemma2.py` / `modeling_gemma3.py`.

Reads top to bottom like the original: config, RMSNorm, MLP, attention, decoder layer, scaled embedding,
model, LM head, sequence classifier. Parameter names and layouts are HF's, with the decoder layers stacked as in
`llama.py` (`model.layers.self_attn.q_proj.weight` is `[num_layers, out, in]`) and scanned; each layer's type
(sliding or global) is a per-layer option of `layers.scan_layers`. What Gemma adds to Llama:

- RMSNorm scales by `1 + weight` (weights are zero-centred), in float32, then casts back;
- four norms per layer ("sandwich" norms around attention and around the MLP);
- embeddings multiplied by `sqrt(hidden_size)` (cast to the compute dtype, as HF casts it to the weights');
- attention scale `query_pre_attn_scalar ** -0.5`; sliding-window and global layers (`config.layer_types`);
- `final_logit_softcapping` on the logits (both, when set); Gemma 2's `attn_logit_softcapping` on scores;
- Gemma 3 is Gemma 2 plus RMSNorm on queries and keys and a rope per layer type (the local base frequency on
  sliding layers). Like `transformers`, it never soft-caps attention scores, whatever the config says.
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
PARTITION_RULES = (
    (r"embed_tokens\.weight$", ("tensor", "fsdp")),  # [vocab, hidden]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$", ("tensor", "fsdp")),  # [out, hidden]
    (r"(q_proj|k_proj|v_proj)\.bias$", ("tensor",)),
    (r"(o_proj|down_proj)\.weight$", ("fsdp", "tensor")),  # [hidden, in]
    (r"o_proj\.bias$", (None,)),
    (r"lm_head\.weight$", ("tensor", "fsdp")),  # [vocab, hidden]
    (r"score\.weight$", (None, "fsdp")),  # [num_labels, hidden]
    (r"norm\.weight$", (None,)),  # the four layer norms, q_norm / k_norm [head_dim], the final norm
)

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """What the port reads from a `transformers` `Gemma2Config` / `Gemma3TextConfig` (see `from_hf`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope: RopeConfig  # full-attention (global) layers
    sliding_rope: RopeConfig  # sliding-window (local) layers; the same as `rope` in Gemma 2
    layer_types: tuple[str, ...]  # "sliding_attention" / "full_attention", one per layer
    query_pre_attn_scalar: float = 256.0
    sliding_window: int | None = None
    attn_logit_softcapping: float | None = None  # Gemma 2 only
    final_logit_softcapping: float | None = None
    use_qk_norm: bool = False  # Gemma 3
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    attn_implementation: str = "xla"  # jaxpt.models.attention.ATTN_IMPLEMENTATIONS
    model_type: str = "gemma2"
    hf_config_json: str = dataclasses.field(default="{}", repr=False)  # the full HF config, for save_pretrained

    @classmethod
    def from_hf(cls, hf_config) -> GemmaConfig:
        model_type = hf_config.model_type
        if getattr(hf_config, "use_bidirectional_attention", None):
            raise ValueError(
                f"use_bidirectional_attention={hf_config.use_bidirectional_attention!r} ({model_type}) is not "
                "supported: jaxpt's Gemma port is a causal language model. Set use_bidirectional_attention=False."
            )
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        layer_types = tuple(hf_config.layer_types)
        if len(layer_types) != hf_config.num_hidden_layers or not set(layer_types) <= set(LAYER_TYPES):
            raise ValueError(
                f"layer_types={list(layer_types)!r} must name one of {LAYER_TYPES} for each of the "
                f"num_hidden_layers={hf_config.num_hidden_layers} layers."
            )

        def rope(layer_type: str) -> RopeConfig:
            params = hf_config.rope_parameters
            if layer_type in params:  # Gemma 3: one entry per layer type
                params = params[layer_type]
            return RopeConfig.from_hf(params, head_dim=head_dim,
                                      max_position_embeddings=hf_config.max_position_embeddings)

        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=hf_config.num_attention_heads,
            num_key_value_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
            head_dim=head_dim,
            rope=rope("full_attention"),
            sliding_rope=rope("sliding_attention"),
            layer_types=layer_types,
            query_pre_attn_scalar=hf_config.query_pre_attn_scalar,
            sliding_window=getattr(hf_config, "sliding_window", None),
            # Gemma3Attention does not pass its softcap to the attention function: transformers ignores it.
            attn_logit_softcapping=hf_config.attn_logit_softcapping if model_type == "gemma2" else None,
            final_logit_softcapping=hf_config.final_logit_softcapping,
            use_qk_norm=model_type == "gemma3_text",
            hidden_activation=hf_config.hidden_activation,
            rms_norm_eps=hf_config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
            attention_bias=bool(getattr(hf_config, "attention_bias", False)),
            initializer_range=hf_config.initializer_range,
            pad_token_id=getattr(hf_config, "pad_token_id", None),
            attn_implementation=attn_implementation_from_hf(hf_config),
            model_type=model_type,
            hf_config_json=hf_config.to_json_string(use_diff=False),
        )

    # Copied from jaxpt.models.llama.LlamaConfig.to_hf
    def to_hf(self):
        import transformers

        return transformers.AutoConfig.for_model(**json.loads(self.hf_config_json))


class GemmaRMSNorm(nnx.Module):
    """`x / rms(x) * (1 + weight)` in float32, cast back to the input dtype (Llama casts before scaling)."""

    def __init__(self, dim: int, *, eps: float, param_dtype: Any):
        self.eps = eps
        self.weight = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


class GemmaMLP(nnx.Module):
    def __init__(self, config: GemmaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        dense = dict(dtype=dtype, param_dtype=param_dtype, init_std=config.initializer_range, rngs=rngs)
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, **dense)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, **dense)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, **dense)
        self.act_fn = activation(config.hidden_activation)

    # Copied from jaxpt.models.llama.LlamaMLP.__call__
    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class GemmaAttention(nnx.Module):
    def __init__(self, config: GemmaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.attn_implementation = config.attn_implementation
        self.scale = config.query_pre_attn_scalar**-0.5
        self.logit_softcap = config.attn_logit_softcapping
        dense = dict(use_bias=config.attention_bias, dtype=dtype, param_dtype=param_dtype,
                     init_std=config.initializer_range, rngs=rngs)
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, **dense)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, **dense)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, **dense)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, **dense)
        if config.use_qk_norm:  # Gemma 3
            self.q_norm = GemmaRMSNorm(self.head_dim, eps=config.rms_norm_eps, param_dtype=param_dtype)
            self.k_norm = GemmaRMSNorm(self.head_dim, eps=config.rms_norm_eps, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None

    def project_qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Query `[batch, seq, heads, head_dim]`, key and value `[batch, seq, kv_heads, head_dim]`, rope applied."""
        batch, seq, _ = x.shape
        query = self.q_proj(x).reshape(batch, seq, self.num_heads, self.head_dim)
        key = self.k_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        value = self.v_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query = constrain(apply_rope(query, cos, sin), BATCH_AXES, None, "tensor", None)
        key = constrain(apply_rope(key, cos, sin), BATCH_AXES, None, "tensor", None)
        return query, key, value

    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array, *, sliding_window: int | None
    ) -> jax.Array:
        batch, seq, _ = x.shape
        query, key, value = self.project_qkv(x, cos, sin)
        out = attention(query, key, value, segment_ids=segment_ids, scale=self.scale, sliding_window=sliding_window,
                        logit_softcap=self.logit_softcap, implementation=self.attn_implementation)
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim))

    def call_with_cache(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: LayerCache, step: CacheStep, *,
        sliding_window: int | None,
    ) -> tuple[jax.Array, LayerCache]:
        """`__call__` for generation: this call's keys/values go into `cache` (`kv_cache.cached_attention`)."""
        batch, seq, _ = x.shape
        query, key, value = self.project_qkv(x, cos, sin)
        out, cache = cached_attention(query, key, value, cache, step, scale=self.scale, sliding_window=sliding_window,
                                      logit_softcap=self.logit_softcap)
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim)), cache


class GemmaDecoderLayer(nnx.Module):
    def __init__(self, config: GemmaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.self_attn = GemmaAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = GemmaMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, **norm)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, **norm)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, **norm)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, **norm)

    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array, *, sliding_window: int | None
    ) -> jax.Array:
        attn_out = self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, sliding_window=sliding_window)
        x = x + self.post_attention_layernorm(attn_out)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return constrain(x, BATCH_AXES, None, None)

    def call_with_cache(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: LayerCache, step: CacheStep, *,
        sliding_window: int | None,
    ) -> tuple[jax.Array, LayerCache]:
        attn_out, cache = self.self_attn.call_with_cache(self.input_layernorm(x), cos, sin, cache, step,
                                                         sliding_window=sliding_window)
        x = x + self.post_attention_layernorm(attn_out)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return constrain(x, BATCH_AXES, None, None), cache


class GemmaScaledWordEmbedding(Embed):
    """Token embedding times `sqrt(hidden_size)`, the scale cast to the compute dtype first (HF rounds it the
    same way in bfloat16: sqrt(3072) = 55.43 becomes 55.5)."""

    def __init__(self, num_embeddings: int, features: int, **kwargs):
        super().__init__(num_embeddings, features, **kwargs)
        self.embed_scale = features**0.5

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        embeddings = super().__call__(input_ids)
        return embeddings * jnp.asarray(self.embed_scale, embeddings.dtype)


class GemmaModel(nnx.Module):
    """Embeddings, decoder layers and the final norm: input ids -> final hidden states `[batch, seq, hidden]`.

    The decoder layers are one stacked module (`layers.stack_layers`, parameters `[num_layers, ...]`) run by
    `layers.scan_layers`, with each layer's type as its option: a sliding layer attends within
    `config.sliding_window` with the local rope, a global one over everything with the global rope.
    """

    def __init__(self, config: GemmaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = GemmaScaledWordEmbedding(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
            init_std=config.initializer_range, rngs=rngs,
        )
        self.layers = stack_layers(
            [GemmaDecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
             for _ in range(config.num_hidden_layers)]
        )
        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.gradient_checkpointing = False  # see jaxpt.models.set_gradient_checkpointing

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
        rope = self.rope_by_layer_type(positions)
        x = constrain(self.embed_tokens(input_ids), BATCH_AXES, None, None)

        def run_layer(layer, x, _, layer_type):
            return layer(x, *rope[layer_type], segments, sliding_window=self.sliding_window(layer_type)), None

        x, _ = scan_layers(self.layers, run_layer, x, options=self.config.layer_types,
                           remat=self.gradient_checkpointing, partition_rules=PARTITION_RULES)
        return self.norm(x)

    def call_with_cache(
        self, input_ids: jax.Array, positions: jax.Array, cache: KVCache, step: CacheStep
    ) -> tuple[jax.Array, KVCache]:
        """`__call__` for generation: hidden states `[batch, seq, hidden]` of tokens written at `step` into `cache`."""
        rope = self.rope_by_layer_type(positions)
        x = constrain(self.embed_tokens(input_ids), BATCH_AXES, None, None)

        # The cache rides in the layer loop's carry; each layer writes only its new slots (kv_cache.cached_attention).
        # A per-layer cache (a decode loop's, KVCache.split_layers) runs the layers unrolled, at static indices.
        def run_layer(layer, carry, index, layer_type):
            x, layer_caches = carry
            return layer.call_with_cache(x, *rope[layer_type], layer_caches, step._replace(layer=index),
                                         sliding_window=self.sliding_window(layer_type)), None

        layer_indices = np.arange(len(self.config.layer_types), dtype=np.int32)
        (x, layer_caches), _ = scan_layers(self.layers, run_layer, (x, cache.layers), layer_indices,
                                           options=self.config.layer_types, unroll=cache.per_layer)
        return self.norm(x), cache.replace(layers=layer_caches)

    def sliding_window(self, layer_type: str) -> int | None:
        """The attention window of a layer of this type: `config.sliding_window` when sliding, else None."""
        return self.config.sliding_window if layer_type == "sliding_attention" else None

    def rope_by_layer_type(self, positions: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
        """cos, sin `[batch, seq, head_dim]` per layer type (computed once when both types share a rope)."""
        full = rope_cos_sin(positions, self.config.rope)
        sliding = full if self.config.sliding_rope == self.config.rope else rope_cos_sin(
            positions, self.config.sliding_rope
        )
        return {"full_attention": full, "sliding_attention": sliding}


class GemmaForCausalLM(nnx.Module):
    """`model(input_ids, *, attention_mask, positions, segment_ids) -> logits [batch, seq, vocab]`."""

    partition_rules = PARTITION_RULES

    # Copied from jaxpt.models.llama.LlamaForCausalLM.__init__ with Llama->Gemma
    def __init__(self, config: GemmaConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.model = GemmaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype=dtype, param_dtype=param_dtype,
                                  init_std=config.initializer_range, rngs=rngs)

    @property
    def final_logit_softcap(self) -> float | None:
        """`tanh(logits / cap) * cap` on the logits (HF `final_logit_softcapping`), for chunked log-probs too."""
        return self.config.final_logit_softcapping

    # Copied from jaxpt.models.llama.LlamaForCausalLM.hidden_states
    def hidden_states(self, input_ids: jax.Array, **inputs) -> jax.Array:
        """Final (normed) hidden states `[batch, seq, hidden]`, the input of the output projection."""
        return self.model(input_ids, **inputs)

    def lm_head_weight(self) -> jax.Array:
        """The output projection `[vocab, hidden]` (the unscaled embedding matrix when embeddings are tied)."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight[...]
        return self.lm_head.weight[...]

    # Copied from jaxpt.models.llama.LlamaForCausalLM.__call__
    def __call__(self, input_ids: jax.Array, **inputs) -> jax.Array:
        hidden = self.hidden_states(input_ids, **inputs)
        return project_to_vocab(hidden, self.lm_head_weight(), logit_softcap=self.final_logit_softcap)

    # Generation with a KV cache (`jaxpt.sampling` drives these): init_cache -> prefill -> decode_step ...

    # Copied from jaxpt.models.llama.LlamaForCausalLM.init_cache
    def init_cache(self, batch_size: int, max_length: int, *, dtype: Any = None) -> KVCache:
        """An empty `KVCache` with `max_length` slots per row (prompt + new tokens), keys
        `[num_layers, batch_size, kv_heads, head_dim, max_length]` and values `[num_layers, batch_size, kv_heads,
        max_length, head_dim]` (`kv_cache.LayerCache`), in the compute dtype unless `dtype` is given."""
        return KVCache.create(
            batch_size=batch_size, max_length=max_length, num_layers=self.config.num_hidden_layers,
            num_kv_heads=self.config.num_key_value_heads, head_dim=self.config.head_dim,
            dtype=dtype if dtype is not None else self.model.embed_tokens.dtype,
        )

    # Copied from jaxpt.models.llama.LlamaForCausalLM.prefill
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

    # Copied from jaxpt.models.llama.LlamaForCausalLM.decode_step
    def decode_step(self, token_ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Append one token per row, `token_ids` `[batch]`, at slot `cache.length`: the logits `[batch, vocab]` of
        the token after it and the updated cache."""
        positions, step, cache = begin_decode(cache)
        hidden, cache = self.model.call_with_cache(token_ids[:, None], positions, cache, step)
        logits = project_to_vocab(hidden[:, 0], self.lm_head_weight(), logit_softcap=self.final_logit_softcap)
        return logits, cache


class GemmaForSequenceClassification(nnx.Module):
    """`model(input_ids, *, attention_mask) -> [batch, num_labels]`, scored at the last real token (no softcap,
    like HF's `Gemma2ForSequenceClassification` / `Gemma3TextForSequenceClassification`)."""

    partition_rules = PARTITION_RULES

    # Copied from jaxpt.models.llama.LlamaForSequenceClassification.__init__ with Llama->Gemma
    def __init__(self, config: GemmaConfig, *, num_labels: int, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.num_labels = num_labels
        self.model = GemmaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.score = Linear(config.hidden_size, num_labels, dtype=dtype, param_dtype=param_dtype,
                            init_std=config.initializer_range, rngs=rngs)

    # Copied from jaxpt.models.llama.LlamaForSequenceClassification.__call__
    def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None, **inputs) -> jax.Array:
        hidden = self.model(input_ids, attention_mask=attention_mask, **inputs)  # [batch, seq, hidden]
        last = last_token_index(attention_mask, input_ids, self.config.pad_token_id)  # [batch]
        pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [batch, hidden]
        return self.score(pooled).astype(jnp.float32)


# What jaxpt.models dispatches on: model_type -> classes, and the HF class names for config.json.
# "gemma3_text" is "Gemma3": its causal LM is `Gemma3ForCausalLM`. Its classifier is
# `Gemma3TextForSequenceClassification`, which this prefix cannot name (save_pretrained writes
# "Gemma3ForSequenceClassification"); AutoModelForSequenceClassification still picks the text class, by config.
CONFIG = GemmaConfig
HF_ARCHITECTURES = {  # model_type -> (causal LM class, sequence classifier class) written to config.json
    "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
}
CAUSAL_LM = {"gemma2": GemmaForCausalLM, "gemma3_text": GemmaForCausalLM}
SEQUENCE_CLASSIFICATION = {"gemma2": GemmaForSequenceClassification, "gemma3_text": GemmaForSequenceClassification}
