"""Generation with a preallocated key/value cache.

`KVCache` holds every layer's keys and values (`LayerCache`, stacked along a leading layer axis and scanned
with the stacked decoder layers, or, for a decode loop, one array per layer: `KVCache.split_layers`);
`begin_prefill` / `begin_decode` say where a call's tokens go and what they attend to (`CacheStep`);
`cached_attention` writes a layer's new keys and values and attends: a prefill runs the training kernel
`attention.attention` over the prompt, a decode step attends over the whole cache.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from jaxpt.models.attention import MASK_VALUE, attention, positions_from_mask, segments_from_inputs
from jaxpt.models.layers import BATCH_AXES, constrain


class LayerCache(flax.struct.PyTreeNode):
    """One layer's cached keys `[batch, kv_heads, head_dim, max_length]` and values `[batch, kv_heads, max_length,
    head_dim]` (in `KVCache.layers`, every layer's, with a leading `[num_layers]` axis).

    Heads first, and keys stored transposed, so that both products of a decode step are plain `[rows, k] x [k, n]`
    matmuls on the cache as it is: `scores = q @ key`, `out = probs @ value`. On XLA-CPU a matmul whose right
    operand is contracted on its minor dimension repacks that operand on every call; with keys laid out like
    values, the score product was 3x slower than with transposed keys.
    """

    key: jax.Array
    value: jax.Array


class KVCache(flax.struct.PyTreeNode):
    """Every layer's keys and values, preallocated to `max_length` slots, and which slots hold real tokens.

    Slots fill left to right, the same slot in every row: a left-padded prompt `[batch, prompt_len]` takes
    slots `[0, prompt_len)`, then each decode step takes the next one. `mask` marks the slots that hold real
    tokens (not padding); `length` is the number of slots written, i.e. the slot of the next token. The
    position id of a new token is the number of real tokens before it, which is HF's
    `cumsum(attention_mask) - 1` for left-padded prompts. Writing past `max_length` is not detected inside
    `jit` (`dynamic_update_slice` clamps): size the cache `prompt_len + max_new_tokens`.
    """

    # Stacked: keys [num_layers, batch, kv_heads, head_dim, max_length], values [..., max_length, head_dim]; or, after
    # `split_layers`, a tuple of one LayerCache per layer (keys [batch, kv_heads, head_dim, max_length], ...).
    layers: LayerCache | tuple[LayerCache, ...]
    mask: jax.Array  # [batch, max_length] bool
    length: jax.Array  # [] int32

    @classmethod
    def create(cls, *, batch_size: int, max_length: int, num_layers: int, num_kv_heads: int, head_dim: int,
               dtype: Any) -> KVCache:
        key_shape = (num_layers, batch_size, num_kv_heads, head_dim, max_length)
        value_shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        layers = LayerCache(key=jnp.zeros(key_shape, dtype), value=jnp.zeros(value_shape, dtype))
        return cls(layers=layers, mask=jnp.zeros((batch_size, max_length), bool), length=jnp.zeros((), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.mask.shape[1]

    @property
    def per_layer(self) -> bool:
        """Whether `layers` holds one cache per layer (`split_layers`) rather than one stacked cache."""
        return isinstance(self.layers, tuple)

    def split_layers(self) -> KVCache:
        """The same cache with one `LayerCache` per layer instead of the stacked one, for a decode loop.

        A decoder layer reads a stacked cache (and stacked weights) through a slice at a traced layer index, which
        XLA (on CPU) copies before each matmul: every generated token copied every layer's whole cache and weights.
        With one array per layer, the decode step runs its layers unrolled (`layers.scan_layers(unroll=True)`):
        each layer updates its own cache in place and attends over it as it is, and its weights, sliced at a fixed
        index, are the same every token (XLA slices them once, outside the decode loop).
        """
        if self.per_layer:
            return self
        count = self.layers.key.shape[0]
        layers = tuple(
            LayerCache(key=constrain(self.layers.key[i], BATCH_AXES, "tensor", None, None),
                       value=constrain(self.layers.value[i], BATCH_AXES, "tensor", None, None))
            for i in range(count)
        )
        return self.replace(layers=layers)

    def repeat_rows(self, repeats: int) -> KVCache:
        """Each row repeated `repeats` times in a row (`[b0, b0, ..., b1, b1, ...]`, like `jnp.repeat`): a prompt
        prefilled once serves `repeats` completions, whose decode steps then write their own slots."""
        if repeats == 1:
            return self

        def repeat(cache: jax.Array, batch_axis: int) -> jax.Array:
            spec = (None,) * batch_axis + (BATCH_AXES, "tensor", None, None)
            return constrain(jnp.repeat(cache, repeats, axis=batch_axis), *spec)

        if self.per_layer:
            layers = tuple(LayerCache(key=repeat(layer.key, 0), value=repeat(layer.value, 0)) for layer in self.layers)
        else:
            layers = LayerCache(key=repeat(self.layers.key, 1), value=repeat(self.layers.value, 1))
        mask = constrain(jnp.repeat(self.mask, repeats, axis=0), BATCH_AXES, None)
        return self.replace(layers=layers, mask=mask)


class CacheStep(NamedTuple):
    """Where one call's tokens go in the cache and what they attend to (built by `begin_prefill` /
    `begin_decode`, passed unchanged to every layer).

    `start`: slot of the call's first token. `kv_mask` `[batch, max_length]`: slots holding real tokens, this
    call's included. `segment_ids` `[batch, seq]`: set for a prefill, whose queries attend only to each other
    through the training kernel `attention`; None for decoding, whose queries attend over the cache.
    `layer`: which layer of the cache a layer reads and writes (the loop over layers sets it per layer; a Python or
    numpy int for a per-layer cache, `KVCache.split_layers`).
    """

    start: jax.Array | int
    kv_mask: jax.Array
    segment_ids: jax.Array | None = None
    layer: jax.Array | int = 0


def begin_prefill(
    cache: KVCache, input_ids: jax.Array, attention_mask: jax.Array | None
) -> tuple[jax.Array, CacheStep, KVCache]:
    """Positions `[batch, seq]`, the `CacheStep` and the cache's new mask/length for running a left-padded
    prompt `input_ids` `[batch, seq]` into slots `[0, seq)` of an empty cache."""
    batch, seq = input_ids.shape
    if seq > cache.max_length:
        raise ValueError(f"The prompt has {seq} tokens but the cache only {cache.max_length} slots: "
                         "create it with max_length >= prompt length + new tokens.")
    if attention_mask is None:
        attention_mask = jnp.ones((batch, seq), jnp.int32)
    positions = positions_from_mask(attention_mask, None, (batch, seq))
    segments = segments_from_inputs(input_ids, attention_mask, None)
    mask = jnp.zeros_like(cache.mask).at[:, :seq].set(attention_mask.astype(bool))
    mask = constrain(mask, BATCH_AXES, None)
    cache = cache.replace(mask=mask, length=jnp.asarray(seq, jnp.int32))
    return positions, CacheStep(start=0, kv_mask=mask, segment_ids=segments), cache


def begin_decode(cache: KVCache, num_tokens: int = 1) -> tuple[jax.Array, CacheStep, KVCache]:
    """Positions `[batch, num_tokens]`, the `CacheStep` and the cache's new mask/length for appending
    `num_tokens` real tokens per row at slot `cache.length`."""
    batch = cache.mask.shape[0]
    start = cache.length
    count = jnp.sum(cache.mask, axis=1, dtype=jnp.int32)  # real tokens so far = the next position
    positions = count[:, None] + jnp.arange(num_tokens, dtype=jnp.int32)[None, :]
    mask = jax.lax.dynamic_update_slice(cache.mask, jnp.ones((batch, num_tokens), bool), (0, start))
    cache = cache.replace(mask=mask, length=start + num_tokens)
    return positions, CacheStep(start=start, kv_mask=mask, segment_ids=None), cache


def cached_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    cache: LayerCache | tuple[LayerCache, ...],
    step: CacheStep,
    *,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
) -> tuple[jax.Array, LayerCache | tuple[LayerCache, ...]]:
    """Attention for generation: write this call's keys/values into layer `step.layer` of the cache, then attend.

    query `[batch, seq, q_heads, head_dim]`, key/value `[batch, seq, kv_heads, head_dim]` (rope applied),
    stored at slots `[step.start, step.start + seq)` of the stacked `cache` (every layer's, `[num_layers, ...]`), or
    of `cache[step.layer]` when it holds one cache per layer (`KVCache.split_layers`).
    A prefill (`step.segment_ids` set) runs the training kernel `attention` over the prompt alone; a decode step
    (one or a few tokens) attends over the layer's whole cache: a key is visible when its slot holds a real token
    (`step.kv_mask`), is not after the query's slot, and, with `sliding_window`, is fewer than `sliding_window`
    slots before it (HF's window, by index). Returns `[batch, seq, q_heads, head_dim]` and the updated cache.

    The stacked cache travels in the layer scan's carry and only the new slots are written, at
    `[step.layer, ..., step.start]`, which XLA does in place. Scanning the cache as per-layer inputs and outputs
    instead copied every layer's whole cache at every decode step (greedy generation ~30% slower on CPU). A per-layer
    cache is written in place the same way and attended over without the copy of the layer's slice that a stacked
    cache still needs.
    """
    if isinstance(cache, tuple):
        return _cached_attention_per_layer(query, key, value, cache, step, scale, sliding_window, logit_softcap)
    new_key = key.transpose(0, 2, 3, 1).astype(cache.key.dtype)[None]  # [1, b, kvh, d, s]
    new_value = value.transpose(0, 2, 1, 3).astype(cache.value.dtype)[None]  # [1, b, kvh, s, d]
    cache = LayerCache(
        key=constrain(jax.lax.dynamic_update_slice(cache.key, new_key, (step.layer, 0, 0, 0, step.start)),
                      None, BATCH_AXES, "tensor", None, None),
        value=constrain(jax.lax.dynamic_update_slice(cache.value, new_value, (step.layer, 0, 0, step.start, 0)),
                        None, BATCH_AXES, "tensor", None, None),
    )
    if step.segment_ids is not None:
        out = attention(query, key, value, segment_ids=step.segment_ids, scale=scale, sliding_window=sliding_window,
                        logit_softcap=logit_softcap)
        return out, cache
    layer_cache = LayerCache(key=jax.lax.dynamic_index_in_dim(cache.key, step.layer, keepdims=False),
                             value=jax.lax.dynamic_index_in_dim(cache.value, step.layer, keepdims=False))
    return _attention_over_cache(query, layer_cache, step, scale, sliding_window, logit_softcap), cache


def _cached_attention_per_layer(query, key, value, caches, step, scale, sliding_window, logit_softcap):
    layer = int(step.layer)  # static: each layer's cache is its own array
    cache = caches[layer]
    new_key = key.transpose(0, 2, 3, 1).astype(cache.key.dtype)  # [b, kvh, d, s]
    new_value = value.transpose(0, 2, 1, 3).astype(cache.value.dtype)  # [b, kvh, s, d]
    cache = LayerCache(
        key=constrain(jax.lax.dynamic_update_slice(cache.key, new_key, (0, 0, 0, step.start)),
                      BATCH_AXES, "tensor", None, None),
        value=constrain(jax.lax.dynamic_update_slice(cache.value, new_value, (0, 0, step.start, 0)),
                        BATCH_AXES, "tensor", None, None),
    )
    caches = (*caches[:layer], cache, *caches[layer + 1:])
    if step.segment_ids is not None:
        out = attention(query, key, value, segment_ids=step.segment_ids, scale=scale, sliding_window=sliding_window,
                        logit_softcap=logit_softcap)
        return out, caches
    return _attention_over_cache(query, cache, step, scale, sliding_window, logit_softcap), caches


def _attention_over_cache(query, cache, step, scale, sliding_window, logit_softcap):
    batch, seq, q_heads, head_dim = query.shape
    _, kv_heads, _, max_length = cache.key.shape
    groups = q_heads // kv_heads
    # Heads first; the query heads sharing a kv head fold into the rows of one matmul against the cache.
    q = query.reshape(batch, seq, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, kv_heads, groups * seq, head_dim).astype(cache.key.dtype)
    scores = jnp.einsum("bhqd,bhdk->bhqk", q, cache.key, preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        scores = jnp.tanh(scores / logit_softcap) * logit_softcap
    q_index = step.start + jnp.arange(seq, dtype=jnp.int32)[:, None]  # [seq, 1]
    k_index = jnp.arange(max_length, dtype=jnp.int32)[None, :]  # [1, max_length]
    allowed = k_index <= q_index
    if sliding_window is not None:
        allowed = allowed & (q_index - k_index < sliding_window)
    allowed = allowed[None] & step.kv_mask[:, None, :]  # [b, seq, max_length]
    scores = scores.reshape(batch, kv_heads, groups, seq, max_length)
    scores = jnp.where(allowed[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).reshape(batch, kv_heads, groups * seq, max_length)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(cache.value.dtype), cache.value)
    out = out.reshape(batch, kv_heads, groups, seq, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, seq, q_heads, head_dim).astype(query.dtype)
