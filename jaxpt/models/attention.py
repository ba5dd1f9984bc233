"""Causal dot-product attention for training and prefill, shared by every model family.

- `segments_from_inputs` / `positions_from_mask`: who attends to whom, and the default position ids, for
  padded or packed batches.
- `attention`: the kernel (causal, padding, packed segments, sliding window, logit soft-capping,
  grouped-query heads), with a hand-written flash-attention-style backward pass (`jax.custom_vjp`).

Performance notes (XLA on CPU, measured in benchmarks/forward_backward.py): attention puts heads first, folds
the query heads that share a key/value head into the rows of one matmul (no repeated K/V), and splits queries
into causal chunks so the masked upper triangle is never computed.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

# --------------------------------------------------------------------------------------------------------------
# Segments and positions
# --------------------------------------------------------------------------------------------------------------


def segments_from_inputs(
    input_ids: jax.Array, attention_mask: jax.Array | None, segment_ids: jax.Array | None
) -> jax.Array:
    """One int `[batch, seq]` array that says who attends to whom: equal ids attend (causally) to each other.

    `attention_mask` (1 = token, 0 = padding) becomes segments {1: tokens, 0: padding}, so padding never feeds
    real tokens and no row of the attention matrix is empty. Packed `segment_ids` (0 = padding) are used as
    they are, masked by `attention_mask` when both are given.
    """
    if segment_ids is None:
        if attention_mask is None:
            return jnp.ones(input_ids.shape, jnp.int32)
        return attention_mask.astype(jnp.int32)
    if attention_mask is None:
        return segment_ids.astype(jnp.int32)
    return segment_ids.astype(jnp.int32) * attention_mask.astype(jnp.int32)


def positions_from_mask(attention_mask: jax.Array | None, segment_ids: jax.Array | None, shape) -> jax.Array:
    """Default position ids `[batch, seq]`.

    - packed `segment_ids`: positions restart at 0 at the start of every segment;
    - `attention_mask`: `cumsum(mask) - 1` (0 on leading padding), which equals `arange` on the tokens of a
      right-padded row and is what HF `generate` uses for left-padded rows;
    - neither: `arange(seq)`.
    """
    batch, seq = shape
    index = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
        previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
        starts = jnp.where(segment_ids != previous, index, 0)
        return index - jax.lax.cummax(starts, axis=1)
    if attention_mask is not None:
        return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    return index


# --------------------------------------------------------------------------------------------------------------
# The attention kernel
# --------------------------------------------------------------------------------------------------------------


MASK_VALUE = float(np.finfo(np.float32).min)


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    segment_ids: jax.Array,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    query_chunk_size: int = 128,
) -> jax.Array:
    """Causal dot-product attention over one sequence (training / prefill).

    query `[batch, seq, q_heads, head_dim]`, key/value `[batch, seq, kv_heads, head_dim]`,
    segment_ids `[batch, seq]` (a token attends to earlier tokens with the same id, see
    `segments_from_inputs`). Returns `[batch, seq, q_heads, head_dim]`.

    Scores are float32; `logit_softcap` is Gemma 2's `tanh(s / cap) * cap`; `sliding_window` keeps keys with
    `q_index - k_index < sliding_window` (HF's sliding-window overlay). Queries are split into chunks of
    `query_chunk_size`; each chunk only multiplies against the keys it can see. The backward pass is written
    by hand (flash-attention style): it keeps only each row's log-sum-exp and recomputes the probabilities,
    so memory stays linear in the sequence length apart from one chunk's scores.
    """
    batch, seq, q_heads, head_dim = query.shape
    kv_heads = key.shape[2]
    groups = q_heads // kv_heads
    # Heads first; the `groups` query heads that share a kv head stay together so they fold into rows.
    q = query.reshape(batch, seq, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)  # [b, kvh, g, s, d]
    k = key.transpose(0, 2, 1, 3)  # [b, kvh, s, d]
    v = value.transpose(0, 2, 1, 3)  # [b, kvh, s, d]
    blocks = _attention_blocks(seq, query_chunk_size, sliding_window)
    out = _attention(q, k, v, segment_ids, (float(scale), logit_softcap, sliding_window, blocks))
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, q_heads, head_dim)


def _attention_blocks(seq: int, chunk: int, window: int | None) -> tuple[tuple[int, int, int], ...]:
    """(query start, query end, first visible key) for each query chunk."""
    blocks = []
    for q_start in range(0, seq, chunk):
        q_end = min(q_start + chunk, seq)
        k_start = 0 if window is None else max(0, q_start - window + 1)
        blocks.append((q_start, q_end, k_start))
    return tuple(blocks)


def _chunk_scores(q_chunk, k_chunk, segment_ids, block, scale, softcap, window):
    """Masked float32 scores `[b, kvh, g * chunk, keys]` of one query chunk, and the pre-softcap ones."""
    q_start, q_end, k_start = block
    batch, kv_heads, rows, _ = q_chunk.shape
    chunk = q_end - q_start
    raw = jnp.einsum("bhqd,bhkd->bhqk", q_chunk, k_chunk, preferred_element_type=jnp.float32) * scale
    scores = raw if softcap is None else jnp.tanh(raw / softcap) * softcap
    q_index = jnp.arange(q_start, q_end)[:, None]
    k_index = jnp.arange(k_start, q_end)[None, :]
    allowed = k_index <= q_index  # [chunk, keys]
    if window is not None:
        allowed = allowed & (q_index - k_index < window)
    same_segment = segment_ids[:, q_start:q_end, None] == segment_ids[:, None, k_start:q_end]  # [b, chunk, keys]
    allowed = allowed[None] & same_segment
    scores = scores.reshape(batch, kv_heads, rows // chunk, chunk, q_end - k_start)
    scores = jnp.where(allowed[:, None, None], scores, MASK_VALUE)
    return raw, scores.reshape(batch, kv_heads, rows, q_end - k_start)


def _q_chunk(q, block):
    batch, kv_heads, groups, _, head_dim = q.shape
    q_start, q_end, _ = block
    return q[:, :, :, q_start:q_end].reshape(batch, kv_heads, groups * (q_end - q_start), head_dim)


def _attention_forward(q, k, v, segment_ids, options):
    scale, softcap, window, blocks = options
    batch, kv_heads, groups, _, head_dim = q.shape
    outputs, logsumexps = [], []
    for block in blocks:
        q_start, q_end, k_start = block
        _, scores = _chunk_scores(_q_chunk(q, block), k[:, :, k_start:q_end], segment_ids, block, scale, softcap,
                                  window)
        row_max = jnp.max(scores, axis=-1, keepdims=True)
        unnormalised = jnp.exp(scores - row_max)
        row_sum = jnp.sum(unnormalised, axis=-1, keepdims=True)
        # normalise the [rows, head_dim] output rather than the [rows, keys] probabilities: one pass fewer
        out = jnp.einsum("bhqk,bhkd->bhqd", unnormalised.astype(v.dtype), v[:, :, k_start:q_end],
                         preferred_element_type=jnp.float32)
        out = (out / row_sum).astype(v.dtype)
        chunk = q_end - q_start
        outputs.append(out.reshape(batch, kv_heads, groups, chunk, head_dim))
        logsumexps.append((row_max + jnp.log(row_sum)).reshape(batch, kv_heads, groups, chunk))
    concat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=3)
    return concat(outputs), concat(logsumexps)  # [b, kvh, g, s, d], [b, kvh, g, s]


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segment_ids, options):
    return _attention_forward(q, k, v, segment_ids, options)[0]


def _attention_fwd(q, k, v, segment_ids, options):
    out, logsumexp = _attention_forward(q, k, v, segment_ids, options)
    return out, (q, k, v, segment_ids, out, logsumexp)


def _attention_bwd(options, residuals, d_out):
    scale, softcap, window, blocks = options
    q, k, v, segment_ids, out, logsumexp = residuals
    batch, kv_heads, groups, _, head_dim = q.shape
    # softmax backward: d_scores = p * (d_p - rowsum(d_out * out))
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [b, kvh, g, s]
    d_q_chunks = []
    d_k = jnp.zeros(k.shape, jnp.float32)
    d_v = jnp.zeros(v.shape, jnp.float32)
    for block in blocks:
        q_start, q_end, k_start = block
        chunk = q_end - q_start
        rows = groups * chunk
        q_chunk = _q_chunk(q, block)
        k_chunk, v_chunk = k[:, :, k_start:q_end], v[:, :, k_start:q_end]
        raw, scores = _chunk_scores(q_chunk, k_chunk, segment_ids, block, scale, softcap, window)
        probs = jnp.exp(scores - logsumexp[:, :, :, q_start:q_end].reshape(batch, kv_heads, rows, 1))
        d_out_chunk = d_out[:, :, :, q_start:q_end].reshape(batch, kv_heads, rows, head_dim)
        d_v = d_v.at[:, :, k_start:q_end].add(
            jnp.einsum("bhqk,bhqd->bhkd", probs.astype(v.dtype), d_out_chunk, preferred_element_type=jnp.float32)
        )
        d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out_chunk, v_chunk, preferred_element_type=jnp.float32)
        d_scores = probs * (d_probs - delta[:, :, :, q_start:q_end].reshape(batch, kv_heads, rows, 1))
        if softcap is not None:
            d_scores = d_scores * (1.0 - jnp.tanh(raw / softcap) ** 2)
        d_scores = (d_scores * scale).astype(q.dtype)
        d_q = jnp.einsum("bhqk,bhkd->bhqd", d_scores, k_chunk, preferred_element_type=jnp.float32)
        d_q_chunks.append(d_q.reshape(batch, kv_heads, groups, chunk, head_dim))
        d_k = d_k.at[:, :, k_start:q_end].add(
            jnp.einsum("bhqk,bhqd->bhkd", d_scores, q_chunk, preferred_element_type=jnp.float32)
        )
    d_q = d_q_chunks[0] if len(d_q_chunks) == 1 else jnp.concatenate(d_q_chunks, axis=3)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)
