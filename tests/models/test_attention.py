"""The shared attention kernel (blocked loops, hand-written backward) against a naive masked softmax
attention differentiated by JAX: values and gradients, with padding, packing, windows, soft-capping, GQA."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from jax.experimental.pallas import tpu as pltpu

import jaxpt.models
from jaxpt.demo import tiny_llama_config
from jaxpt.models.attention import attention, positions_from_mask, resolve_attn_implementation, segments_from_inputs


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
        return jnp.sum(attention(q, k, v, segment_ids=segment_ids, block_size=chunk, **kwargs) * cotangent)

    def reference(q, k, v):
        return jnp.sum(naive_attention(q, k, v, segment_ids, **kwargs) * cotangent)

    np.testing.assert_allclose(
        attention(query, key, value, segment_ids=segment_ids, block_size=chunk, **kwargs),
        naive_attention(query, key, value, segment_ids, **kwargs), atol=1e-5)
    grads = jax.grad(ours, argnums=(0, 1, 2))(query, key, value)
    ref_grads = jax.grad(reference, argnums=(0, 1, 2))(query, key, value)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert float(jnp.abs(ref).max()) > 1e-2
        np.testing.assert_allclose(grad, ref, atol=2e-5)


@pytest.mark.parametrize("query_start,chunk", [(20, 8), (5, 16)])
def test_query_start_leaves_the_read_queries_and_every_gradient_unchanged(query_start, chunk):
    """`query_start`: the outputs of earlier queries are not read (what a completion's own row `[prompt, completion]`
    needs of shared prompts). Later queries' outputs, and the gradients through them, equal the naive attention's,
    with the kernel skipping the query blocks wholly before it (2 of 5 blocks of 8; none of 3 blocks of 16)."""
    rng = np.random.RandomState(1)
    batch, seq, q_heads, kv_heads, head_dim = 2, 37, 4, 2, 8
    query = jnp.asarray(rng.randn(batch, seq, q_heads, head_dim), jnp.float32)
    key = jnp.asarray(rng.randn(batch, seq, kv_heads, head_dim), jnp.float32)
    value = jnp.asarray(rng.randn(batch, seq, kv_heads, head_dim), jnp.float32)
    segment_ids = np.ones((batch, seq), np.int32)
    segment_ids[1, :3] = 0  # left padding
    segment_ids[1, 30:] = 0
    segment_ids = jnp.asarray(segment_ids)
    read = (np.arange(seq) >= query_start)[None, :, None, None]
    cotangent = jnp.asarray(rng.randn(batch, seq, q_heads, head_dim) * read, jnp.float32)
    kwargs = dict(scale=0.3, sliding_window=9, logit_softcap=None)

    def ours(q, k, v):
        out = attention(q, k, v, segment_ids=segment_ids, block_size=chunk, query_start=query_start, **kwargs)
        return jnp.sum(out * cotangent), out

    def reference(q, k, v):
        out = naive_attention(q, k, v, segment_ids, **kwargs)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True)(query, key, value)
    (_, expected), ref_grads = jax.value_and_grad(reference, argnums=(0, 1, 2), has_aux=True)(query, key, value)
    np.testing.assert_allclose(np.asarray(out)[:, query_start:], np.asarray(expected)[:, query_start:], atol=1e-5)
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


# --------------------------------------------------------------------------------------------------------------
# Backends (`attn_implementation`) against the "xla" kernel
# --------------------------------------------------------------------------------------------------------------


def _backend_inputs(seq, *, packed):
    """Two rows: right padding, and (packed=True) three packed segments then padding, else all tokens; GQA."""
    rng = np.random.RandomState(1)
    batch, q_heads, kv_heads, head_dim = 2, 4, 2, 16
    query = jnp.asarray(rng.randn(batch, seq, q_heads, head_dim), jnp.float32)
    key = jnp.asarray(rng.randn(batch, seq, kv_heads, head_dim), jnp.float32)
    value = jnp.asarray(rng.randn(batch, seq, kv_heads, head_dim), jnp.float32)
    segment_ids = np.ones((batch, seq), np.int32)
    segment_ids[0, seq - 30:] = 0
    if packed:
        segment_ids[1, :50], segment_ids[1, 50:120], segment_ids[1, 120:seq - 9], segment_ids[1, seq - 9:] = 1, 2, 3, 0
    real = jnp.asarray(segment_ids != 0)[:, :, None, None]  # padded queries' outputs are backend-specific
    cotangent = jnp.asarray(rng.randn(batch, seq, q_heads, head_dim), jnp.float32) * real
    return query, key, value, jnp.asarray(segment_ids), cotangent, real


def _assert_backend_matches_xla(implementation, seq, *, packed, atol=2e-5, **features):
    query, key, value, segment_ids, cotangent, real = _backend_inputs(seq, packed=packed)

    def loss(implementation, q, k, v):
        out = attention(q, k, v, segment_ids=segment_ids, implementation=implementation, **features)
        return jnp.sum(out * cotangent), out * real

    def value_and_grads(implementation):
        return jax.jit(jax.value_and_grad(lambda *a: loss(implementation, *a), argnums=(0, 1, 2), has_aux=True))(
            query, key, value)

    (_, out), grads = value_and_grads(implementation)
    (_, ref_out), ref_grads = value_and_grads("xla")
    assert float(jnp.abs(ref_out).max()) > 0.1
    np.testing.assert_allclose(out, ref_out, atol=atol)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert float(jnp.abs(ref).max()) > 1e-2
        np.testing.assert_allclose(grad, ref, atol=atol)


@pytest.mark.parametrize("packed,sliding_window", [(False, None), (False, 40), (True, None)])
def test_cudnn_backend_matches_xla_kernel(packed, sliding_window):
    """On CPU `jax.nn.dot_product_attention` runs its XLA reference: the same code path as cuDNN on GPU
    (right-padded rows as sequence lengths); packed rows take the "xla" kernel."""
    _assert_backend_matches_xla("cudnn", 160, packed=packed, scale=0.3, sliding_window=sliding_window)


def test_cudnn_backend_falls_back_for_softcap_with_a_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="jaxpt"):
        _assert_backend_matches_xla("cudnn", 40, packed=False, scale=0.3, logit_softcap=2.5)
    assert "logit soft-capping" in caplog.text


def test_splash_backend_matches_xla_kernel_in_interpret_mode():
    """Pallas splash attention (TPU) in interpret mode: padding, packed segments, a sliding window, soft-capping,
    GQA, and a sequence that is not a multiple of its block (padded)."""
    _assert_backend_matches_xla("splash", 200, packed=True, scale=0.3, sliding_window=90, logit_softcap=2.5)


def test_flash_backend_matches_xla_kernel_in_interpret_mode(caplog):
    """Pallas flash attention (TPU) in interpret mode: padding, packed segments, GQA; it lacks windows (logged
    fallback)."""
    with pltpu.force_tpu_interpret_mode():
        _assert_backend_matches_xla("flash", 200, packed=True, scale=0.3)
    with caplog.at_level(logging.INFO, logger="jaxpt"):
        _assert_backend_matches_xla("flash", 40, packed=False, scale=0.3, sliding_window=9)
    assert "sliding windows" in caplog.text


def test_attn_implementation_names():
    assert resolve_attn_implementation(None) == resolve_attn_implementation("sdpa") == "xla"
    assert resolve_attn_implementation("eager") == "xla"
    assert resolve_attn_implementation("splash") == "splash"
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'"):
        resolve_attn_implementation("flash_attention_2")


def test_attn_implementation_on_the_config_and_from_config():
    """The HF config's attn_implementation is read (transformers' names mean "xla"); `from_config(...,
    attn_implementation=)` overrides it; the model's logits equal the "xla" model's (Llama, padded and packed)."""
    hf_config = tiny_llama_config(64, attn_implementation="sdpa")
    assert jaxpt.models.from_config(hf_config).config.attn_implementation == "xla"
    hf_config._attn_implementation = "splash"
    assert jaxpt.models.from_config(hf_config).config.attn_implementation == "splash"
    with pytest.raises(ValueError, match="attn_implementation='sliding'"):
        jaxpt.models.from_config(hf_config, attn_implementation="sliding")
    xla_model = jaxpt.models.from_config(hf_config, attn_implementation="eager")
    cudnn_model = jaxpt.models.from_config(hf_config, attn_implementation="cudnn")
    assert cudnn_model.model.layers.self_attn.attn_implementation == "cudnn"  # the stacked layers
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 64, (2, 24)))
    mask = jnp.asarray([[1] * 24, [1] * 17 + [0] * 7])
    packed = jnp.asarray([[1] * 10 + [2] * 14, [1] * 5 + [2] * 12 + [0] * 7])
    run = jax.jit(lambda model, ids, mask, packed: (model(ids, attention_mask=mask), model(ids, segment_ids=packed)))
    real = (mask != 0)[..., None], (packed != 0)[..., None]
    for logits, reference, keep in zip(run(cudnn_model, ids, mask, packed), run(xla_model, ids, mask, packed), real,
                                       strict=True):
        np.testing.assert_allclose(logits * keep, reference * keep, atol=1e-5)


def test_gemma2_splash_logits_match_xla_in_interpret_mode():
    """Gemma 2 (a sliding-window layer and a global one, attention soft-capping) on packed segments."""
    hf_config = transformers.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, sliding_window=8,
        query_pre_attn_scalar=24, initializer_range=0.2, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    xla_model = jaxpt.models.from_config(hf_config)
    splash_model = jaxpt.models.from_config(hf_config, attn_implementation="splash")
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 64, (2, 40)))
    packed = jnp.asarray([[1] * 15 + [2] * 25, [1] * 22 + [2] * 12 + [0] * 6])
    real = (packed != 0)[..., None]
    logits = jax.jit(lambda ids, segment_ids: splash_model(ids, segment_ids=segment_ids))(ids, packed)
    reference = jax.jit(lambda ids, segment_ids: xla_model(ids, segment_ids=segment_ids))(ids, packed)
    assert float(jnp.abs(reference - reference[:, :1]).max()) > 0.1
    np.testing.assert_allclose(logits * real, reference * real, atol=1e-4)
