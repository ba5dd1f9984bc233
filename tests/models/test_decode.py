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
from jaxpt.models.attention import shared_prompt_inputs, shared_prompt_predictions
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


def test_shared_prompt_rows_match_one_row_per_completion(checkpoint):
    """Each prompt packed once with its completions (`attention.shared_prompt_inputs`, what the GRPO/RLOO updates
    run): the hidden states that predict the completions' tokens, and their gradients with respect to every
    parameter, equal those of one `[prompt, completion]` row per completion. Prompts of up to 40 tokens (more than
    a CPU kernel block, so the completions' prompt queries are skipped), left-padded; right-padded completions;
    windows of 4 and soft-capping where the family has them."""
    _, model = checkpoint
    group, completion_len = 3, 7
    vocab = model.config.vocab_size
    prompt, prompt_mask = left_padded_prompts(vocab, lengths=(40, 33, 2))
    prompt, prompt_mask = np.repeat(prompt, group, axis=0), np.repeat(prompt_mask, group, axis=0)
    rows, prompt_len = prompt.shape
    completion_mask = np.ones((rows, completion_len), np.int32)
    completion_mask[1, 4:], completion_mask[5, 1:], completion_mask[8, 6:] = 0, 0, 0
    completion = parity.random_ids(vocab, (rows, completion_len), seed=2) * completion_mask
    graphdef, params = nnx.split(model)
    cotangent = np.random.RandomState(3).randn(rows, completion_len, model.config.hidden_size)
    cotangent = cotangent * completion_mask[..., None]

    def predictions(params, group):
        model = nnx.merge(graphdef, params)
        if group == 1:
            hidden = model.hidden_states(jnp.asarray(np.concatenate([prompt, completion], 1)),
                                         attention_mask=jnp.asarray(np.concatenate([prompt_mask, completion_mask], 1)))
            out = hidden[:, prompt_len - 1:-1]
        else:
            ids, positions, segments = shared_prompt_inputs(prompt, prompt_mask, completion, completion_mask,
                                                            group=group)
            assert ids.shape == (rows // group, prompt_len + group * completion_len)
            out = shared_prompt_predictions(model.hidden_states(ids, positions=positions, segment_ids=segments),
                                            prompt_len=prompt_len, group=group)
        return jnp.sum(out * cotangent), out

    (_, separate), separate_grads = jax.value_and_grad(predictions, has_aux=True)(params, 1)
    (_, shared), shared_grads = jax.value_and_grad(predictions, has_aux=True)(params, group)
    parity.assert_close_on(shared, separate, completion_mask, tol=1e-5)
    shared_grads = dict(nnx.to_flat_state(shared_grads))
    nonzero = 0
    for path, expected in nnx.to_flat_state(separate_grads):  # the output projection's are 0: not on this path
        scale = float(jnp.abs(expected[...]).max())
        nonzero += scale > 0
        np.testing.assert_allclose(shared_grads[path][...], expected[...], atol=2e-5 * max(scale, 1.0),
                                   err_msg=str(path))
    assert nonzero >= len(shared_grads) - 1


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
