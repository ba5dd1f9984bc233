"""The shared attention kernel (chunked queries, hand-written backward) against a naive masked softmax
attention differentiated by JAX: values and gradients, with padding, packing, windows, soft-capping, GQA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt.models.attention import attention, positions_from_mask, segments_from_inputs


def naive_attention(query, key, value, segment_ids, scale, sliding_window=None, logit_softcap=None):
    """Every score computed, then masked: the textbook formula."""
    groups = query.shape[2] // key.shape[2]
    key = jnp.repeat(key, groups, axis=2)
    value = jnp.repeat(value, groups, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) * scale
    if logit_softcap is not None:
        scores = jnp.tanh(scores / logit_softcap) * logit_softcap
    index = jnp.arange(query.shape[1])
    allowed = index[None, :] <= index[:, None]
    if sliding_window is not None:
        allowed = allowed & (index[:, None] - index[None, :] < sliding_window)
    allowed = allowed[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    scores = jnp.where(allowed[:, None], scores, -1e30)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), value)


@pytest.mark.parametrize("sliding_window,logit_softcap,kv_heads,chunk", [
    (None, None, 2, 16),   # GQA, several chunks, ragged last chunk
    (7, None, 1, 8),       # MQA with a window shorter than a chunk
    (12, 2.5, 4, 64),      # MHA, soft-capped, one chunk bigger than the sequence
])
def test_attention_matches_naive_values_and_gradients(sliding_window, logit_softcap, kv_heads, chunk):
    rng = np.random.RandomState(0)
    batch, seq, q_heads, head_dim = 3, 37, 4, 8
    query = jnp.asarray(rng.randn(batch, seq, q_heads, head_dim), jnp.float32)
    key = jnp.asarray(rng.randn(batch, seq, kv_heads, head_dim), jnp.float32)
    value = jnp.asarray(rng.randn(batch, seq, kv_heads, head_dim), jnp.float32)
    # row 0: full; row 1: right padding; row 2: three packed segments then padding
    segment_ids = np.ones((batch, seq), np.int32)
    segment_ids[1, 25:] = 0
    segment_ids[2, :10], segment_ids[2, 10:22], segment_ids[2, 22:33], segment_ids[2, 33:] = 1, 2, 3, 0
    segment_ids = jnp.asarray(segment_ids)
    cotangent = jnp.asarray(rng.randn(batch, seq, q_heads, head_dim), jnp.float32)
    kwargs = dict(scale=0.3, sliding_window=sliding_window, logit_softcap=logit_softcap)

    def ours(q, k, v):
        return jnp.sum(attention(q, k, v, segment_ids=segment_ids, query_chunk_size=chunk, **kwargs) * cotangent)

    def reference(q, k, v):
        return jnp.sum(naive_attention(q, k, v, segment_ids, **kwargs) * cotangent)

    np.testing.assert_allclose(
        attention(query, key, value, segment_ids=segment_ids, query_chunk_size=chunk, **kwargs),
        naive_attention(query, key, value, segment_ids, **kwargs), atol=1e-5)
    grads = jax.grad(ours, argnums=(0, 1, 2))(query, key, value)
    ref_grads = jax.grad(reference, argnums=(0, 1, 2))(query, key, value)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert float(jnp.abs(ref).max()) > 1e-2
        np.testing.assert_allclose(grad, ref, atol=2e-5)


def test_positions_and_segments_from_inputs():
    mask = jnp.array([[1, 1, 1, 0], [0, 0, 1, 1]])
    np.testing.assert_array_equal(positions_from_mask(mask, None, mask.shape), [[0, 1, 2, 2], [0, 0, 0, 1]])
    packed = jnp.array([[1, 1, 2, 2, 2, 0]])
    np.testing.assert_array_equal(positions_from_mask(None, packed, packed.shape), [[0, 1, 0, 1, 2, 0]])
    np.testing.assert_array_equal(segments_from_inputs(packed, jnp.array([[1, 1, 1, 1, 0, 0]]), packed),
                                  [[1, 1, 2, 2, 0, 0]])
