"""Cached decoding in every family: prefill + decode steps give the full forward pass's logits, and greedy
`jaxpt.sampling.generate` gives `transformers` `generate(do_sample=False)`'s tokens, on left-padded prompts.

Sliding windows are 4 tokens, shorter than the prompts, so decoding crosses them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import jaxpt.models
import jaxpt.sampling
from tests.models import parity

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, initializer_range=0.2)
GEMMA = dict(TINY, head_dim=16, sliding_window=4, query_pre_attn_scalar=24, final_logit_softcapping=3.0)

FAMILIES = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**TINY)),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig(**TINY, sliding_window=4)),
    # layer 0 full attention, layer 1 a window of 4.
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
        **TINY, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**TINY, head_dim=16)),
    "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config(**GEMMA, attn_logit_softcapping=5.0)),
    "gemma3_text": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
        **GEMMA, sliding_window_pattern=2, rope_local_base_freq=100.0,
        rope_scaling=dict(rope_type="linear", factor=2.0))),
}

PROMPT_LENGTHS = (9, 5, 2)  # left-padded to 9
NEW_TOKENS = 10


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    hf_class, config = FAMILIES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = parity.make_hf_checkpoint(hf_class, config, directory)
    return hf_model, jaxpt.models.from_pretrained(directory)


def left_padded_prompts(vocab_size, lengths=PROMPT_LENGTHS, seed=0):
    seq = max(lengths)
    mask = (np.arange(seq)[None, :] >= seq - np.asarray(lengths)[:, None]).astype(np.int32)
    return parity.random_ids(vocab_size, (len(lengths), seq), seed) * mask, mask


def test_decode_steps_match_full_forward(checkpoint):
    """Logits from prefill then one decode step per token equal the logits of one forward pass over it all."""
    _, model = checkpoint
    prompt, prompt_mask = left_padded_prompts(model.config.vocab_size)
    batch, prompt_len = prompt.shape
    continuation = parity.random_ids(model.config.vocab_size, (batch, NEW_TOKENS), seed=1)
    ids = np.concatenate([prompt, continuation], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(continuation)], axis=1)
    expected = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))

    cache = model.init_cache(batch, ids.shape[1])
    logits, cache = model.prefill(jnp.asarray(prompt), cache, attention_mask=jnp.asarray(prompt_mask))
    actual = [logits]
    decode_step = nnx.jit(lambda model, token, cache: model.decode_step(token, cache))
    # The decode loop's form (sampling.generate): one cache per layer, the layers unrolled; the same numbers up to
    # float32 rounding (XLA fuses the unrolled layers differently: bit-equal for Llama, ~1e-6 apart with soft-capping).
    per_layer_cache = cache.split_layers()
    for t in range(NEW_TOKENS - 1):
        logits, cache = decode_step(model, jnp.asarray(continuation[:, t]), cache)
        per_layer_logits, per_layer_cache = decode_step(model, jnp.asarray(continuation[:, t]), per_layer_cache)
        np.testing.assert_allclose(per_layer_logits, logits, atol=1e-5, rtol=0)
        actual.append(logits)
    assert int(cache.length) == prompt_len + NEW_TOKENS - 1
    np.testing.assert_allclose(np.stack(actual, axis=1), expected[:, prompt_len - 1 : -1], atol=2e-5, rtol=0)
    assert per_layer_cache.per_layer and len(per_layer_cache.layers) == model.config.num_hidden_layers
    for layer, per_layer in enumerate(per_layer_cache.layers):
        np.testing.assert_allclose(per_layer.key, cache.layers.key[layer], atol=1e-5, rtol=0)
        np.testing.assert_allclose(per_layer.value, cache.layers.value[layer], atol=1e-5, rtol=0)


def test_greedy_generate_matches_transformers(checkpoint):
    hf_model, model = checkpoint
    prompt, prompt_mask = left_padded_prompts(model.config.vocab_size, seed=2)
    with torch.no_grad():
        expected = hf_model.generate(
            torch.tensor(prompt, dtype=torch.long), attention_mask=torch.tensor(prompt_mask, dtype=torch.long),
            do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0,
        )[:, prompt.shape[1]:].numpy()
    graphdef, params = nnx.split(model, nnx.Param)
    out = jaxpt.sampling.generate(graphdef, params, prompt, prompt_mask, key=jax.random.key(0),
                                  max_new_tokens=NEW_TOKENS, greedy=True)
    np.testing.assert_array_equal(np.asarray(out.completion_ids), expected)
    assert np.all(np.asarray(out.lengths) == NEW_TOKENS) and not np.any(np.asarray(out.finished))
