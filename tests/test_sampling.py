"""`jaxpt.sampling.generate`: reproducible sampling, log-probs equal to a teacher-forced pass, truncation
filters, EOS handling and early stopping, argument checks, and a mesh giving the same completions as none.

Greedy parity with `transformers` for every family is in tests/models/test_decode.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx

import jaxpt.models
import jaxpt.sampling
from jaxpt.losses.logprobs import token_logps
from jaxpt.sampling import _categorical, _generate, _nucleus
from jaxpt.sharding import make_mesh
from jaxpt.train_state import TrainState
from tests.models import parity

# vocab 300: the sampler's two-level draw then has several blocks (of 32) and a ragged last one.
CONFIG = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  pad_token_id=0, initializer_range=0.2)
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model():
    return jaxpt.models.from_config(CONFIG, seed=0)


@pytest.fixture(scope="module")
def split(model):
    return nnx.split(model, nnx.Param)


@pytest.fixture(scope="module")
def prompts():
    lengths = (10, 6, 3, 8)
    seq = max(lengths)
    mask = (np.arange(seq)[None, :] >= seq - np.asarray(lengths)[:, None]).astype(np.int32)
    return parity.random_ids(CONFIG.vocab_size, (len(lengths), seq), seed=4) * mask, mask


def generate(split, prompts, **kwargs):
    kwargs = {"key": jax.random.key(0), "max_new_tokens": MAX_NEW_TOKENS, **kwargs}
    out = jaxpt.sampling.generate(*split, *prompts, **kwargs)
    return jax.tree.map(np.asarray, out)


@pytest.fixture(scope="module")
def greedy(split, prompts):
    return generate(split, prompts, greedy=True)


def test_same_key_same_samples_other_key_other_samples(split, prompts):
    first = generate(split, prompts, key=jax.random.key(1))
    compiled = _generate._cache_size()
    again = generate(split, prompts, key=jax.random.key(1))
    other = generate(split, prompts, key=jax.random.key(2))
    assert _generate._cache_size() == compiled  # same shapes and options: no new compilation
    np.testing.assert_array_equal(first.completion_ids, again.completion_ids)
    np.testing.assert_array_equal(first.completion_logps, again.completion_logps)
    assert np.mean(first.completion_ids != other.completion_ids) > 0.5
    assert np.all(first.lengths == MAX_NEW_TOKENS) and np.all(first.completion_mask == 1)


def test_logps_equal_teacher_forced_forward(model, split, prompts):
    """The sampler's log-probs are log softmax(logits / T) of a forward pass over prompt + completion, before
    top-k/top-p truncation; with EOS tokens, positions after a row's end are masked, padded and 0."""
    temperature = 0.7
    out = generate(split, prompts, temperature=temperature, top_k=50, top_p=0.9, key=jax.random.key(3))
    eos = [int(out.completion_ids[0, 4]), int(out.completion_ids[1, 7])]  # rows 0 and 1 end early
    out = generate(split, prompts, temperature=temperature, top_k=50, top_p=0.9, key=jax.random.key(3),
                   eos_token_ids=eos, pad_token_id=5)
    assert out.lengths[0] <= 5 and out.lengths[1] <= 8 and out.finished[:2].all()
    prompt, prompt_mask = prompts
    ids = np.concatenate([prompt, out.completion_ids], axis=1)
    mask = np.concatenate([prompt_mask, out.completion_mask], axis=1)
    logits = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    prompt_len = prompt.shape[1]
    expected = token_logps(logits[:, prompt_len - 1 : -1], jnp.asarray(out.completion_ids), temperature=temperature)
    expected = np.where(out.completion_mask == 1, np.asarray(expected), 0.0)
    np.testing.assert_allclose(out.completion_logps, expected, atol=1e-5, rtol=0)
    assert np.all(out.completion_ids[out.completion_mask == 0] == 5)


@pytest.mark.parametrize("single_token_filter", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_filters_that_keep_one_token_equal_greedy(split, prompts, greedy, single_token_filter):
    out = generate(split, prompts, temperature=0.5, key=jax.random.key(4), **single_token_filter)
    np.testing.assert_array_equal(out.completion_ids, greedy.completion_ids)


def test_rows_stop_at_eos_and_the_loop_stops_when_all_have(split, prompts, greedy):
    # Several EOS ids: each row's first occurrence of any of them (in the greedy run without EOS) ends it.
    eos = sorted({int(greedy.completion_ids[row, step]) for row, step in [(0, 2), (1, 5), (2, 1), (3, 6)]})
    is_eos = np.isin(greedy.completion_ids, eos)
    expected_lengths = np.argmax(is_eos, axis=1) + 1
    out = generate(split, prompts, greedy=True, eos_token_ids=eos, pad_token_id=7)
    np.testing.assert_array_equal(out.lengths, expected_lengths)
    assert out.finished.all()
    for row, length in enumerate(expected_lengths):
        np.testing.assert_array_equal(out.completion_ids[row, :length], greedy.completion_ids[row, :length])
        assert np.all(out.completion_ids[row, length:] == 7) and np.all(out.completion_logps[row, length:] == 0)
        np.testing.assert_array_equal(out.completion_mask[row], np.arange(MAX_NEW_TOKENS) < length)
    assert int(out.num_steps) == expected_lengths.max() < MAX_NEW_TOKENS  # no step after the last row ended

    # An EOS only row 0 produces: the others run to max_new_tokens and are not `finished`.
    only_row_0 = [int(greedy.completion_ids[0, 2])]
    if np.isin(greedy.completion_ids[1:], only_row_0).any():
        pytest.skip("the chosen EOS token also occurs in other rows")
    out = generate(split, prompts, greedy=True, eos_token_ids=only_row_0)
    assert out.finished.tolist() == [True, False, False, False] and int(out.num_steps) == MAX_NEW_TOKENS
    assert out.lengths[0] <= 3 and np.all(out.lengths[1:] == MAX_NEW_TOKENS)


def test_categorical_draws_follow_softmax():
    """The sampler's two-level inverse-CDF draw: frequencies match softmax; -inf entries never come up."""
    rng = np.random.RandomState(0)
    logits = (2 * rng.randn(300)).astype(np.float32)
    logits[rng.rand(300) < 0.3] = -np.inf
    rows = 100_000
    draws = np.asarray(jax.jit(_categorical)(jax.random.key(0), jnp.broadcast_to(jnp.asarray(logits), (rows, 300))))
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    frequencies = np.bincount(draws, minlength=300) / rows
    assert frequencies[probs == 0].sum() == 0
    assert np.abs(frequencies - probs).max() < 5 * np.sqrt(probs.max() / rows)


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
def test_nucleus_keeps_the_smallest_top_set_reaching_top_p(top_p):
    """The sort-free top-p mask equals the textbook one: sort, keep a token while the mass before it < top_p."""
    rng = np.random.RandomState(1)
    logits = (rng.randn(16, 300) * np.array([0.1, 1.0, 5.0, 20.0]).repeat(4)[:, None]).astype(np.float32)
    logits[rng.rand(16, 300) < 0.1] = -np.inf
    mask = np.asarray(_nucleus(jnp.asarray(logits), top_p)) & np.isfinite(logits)
    for row, row_logits in enumerate(logits):
        probs = np.exp(row_logits.astype(np.float64) - row_logits.max())
        probs /= probs.sum()
        order = np.argsort(-row_logits, kind="stable")
        mass_before = np.empty(300)
        mass_before[order] = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
        clear = np.abs(mass_before - top_p) > 1e-6  # float32 sums cannot decide closer calls
        np.testing.assert_array_equal(mask[row][clear], (mass_before < top_p)[clear])


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(temperature=0.0), "temperature"),
    (dict(key=None), "key"),
    (dict(eos_token_ids=[-1]), "eos_token_ids"),
])
def test_bad_arguments_raise(split, prompts, kwargs, field):
    with pytest.raises(ValueError, match=field):
        jaxpt.sampling.generate(*split, *prompts, **{"key": jax.random.key(0), "max_new_tokens": 4, **kwargs})


def test_bad_prompts_raise(split, prompts):
    prompt, mask = prompts
    with pytest.raises(ValueError, match="left-padded"):
        jaxpt.sampling.generate(*split, prompt[:, ::-1], mask[:, ::-1], key=jax.random.key(0), max_new_tokens=4)
    with pytest.raises(ValueError, match="must match"):
        jaxpt.sampling.generate(*split, prompt, mask[:, 1:], key=jax.random.key(0), max_new_tokens=4)
    with pytest.raises(ValueError, match="data\\*fsdp"):
        jaxpt.sampling.generate(*split, prompt[:3], mask[:3], key=jax.random.key(0), max_new_tokens=4,
                                mesh=make_mesh(data=2, fsdp=2, tensor=2))


def test_mesh_gives_the_same_completions(model, prompts, greedy):
    """Sampling with a TrainState's sharded parameters on a data x fsdp x tensor mesh, the batch split over
    ("data", "fsdp"), gives the unsharded completions."""
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    state = TrainState.create(model, optax.sgd(0.1), mesh=mesh)
    out = jaxpt.sampling.generate(state.graphdef, state.params, *prompts, key=jax.random.key(0),
                                  max_new_tokens=MAX_NEW_TOKENS, greedy=True, mesh=mesh)
    assert out.completion_ids.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(out.completion_ids), greedy.completion_ids)
    np.testing.assert_allclose(np.asarray(out.completion_logps), greedy.completion_logps, atol=1e-5)


def test_shared_prefill_gives_the_repeated_prompts_completions(split, prompts):
    """`num_return_sequences=3` prefills each prompt once and repeats its cache rows: the completions (sampled,
    same key) and their log-probs are those of passing every prompt three times, grouped by prompt."""
    prompt, mask = prompts
    repeated = (np.repeat(prompt, 3, axis=0), np.repeat(mask, 3, axis=0))
    for options in (dict(greedy=True), dict(key=jax.random.key(5), temperature=0.8, top_p=0.95)):
        shared = generate(split, prompts, num_return_sequences=3, **options)
        expected = generate(split, repeated, **options)
        assert shared.completion_ids.shape == (3 * len(prompt), MAX_NEW_TOKENS)
        np.testing.assert_array_equal(shared.completion_ids, expected.completion_ids)
        np.testing.assert_array_equal(shared.lengths, expected.lengths)
        np.testing.assert_allclose(shared.completion_logps, expected.completion_logps, atol=1e-5)
    # Sampled rows of one prompt differ (each row draws its own numbers): the cache is shared, not the samples.
    sampled = generate(split, prompts, num_return_sequences=3, key=jax.random.key(5))
    assert len({tuple(row) for row in sampled.completion_ids[:3]}) > 1


def test_shared_prefill_cache_equals_per_row_prefill(model, prompts):
    """The repeated cache of a shared prefill holds, row for row, what prefilling the repeated prompts writes."""
    prompt, mask = (jnp.asarray(x) for x in prompts)
    length = prompt.shape[1] + 4
    logits, cache = model.prefill(prompt, model.init_cache(len(prompt), length), attention_mask=mask)
    cache = cache.repeat_rows(2)
    expected_logits, expected = model.prefill(jnp.repeat(prompt, 2, axis=0), model.init_cache(2 * len(prompt), length),
                                              attention_mask=jnp.repeat(mask, 2, axis=0))
    np.testing.assert_allclose(np.repeat(np.asarray(logits), 2, axis=0), expected_logits, atol=1e-5)
    np.testing.assert_allclose(cache.layers.key, expected.layers.key, atol=1e-5)
    np.testing.assert_allclose(cache.layers.value, expected.layers.value, atol=1e-5)
    np.testing.assert_array_equal(cache.mask, expected.mask)
    assert int(cache.length) == int(expected.length)


def test_shared_prefill_on_a_mesh(model, prompts, split):
    """On a data x fsdp mesh, num_return_sequences gives the unsharded completions, whether the prompts divide the
    batch axes (shared prefill, split over them) or not (prefilled as repeated rows)."""
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    state = TrainState.create(model, optax.sgd(0.1), mesh=mesh)
    prompt, mask = prompts
    for rows, repeats in ((4, 2), (2, 2)):  # 4 prompts divide data*fsdp=4; 2 prompts do not
        subset = (prompt[:rows], mask[:rows])
        expected = generate(split, subset, num_return_sequences=repeats, greedy=True)
        out = jaxpt.sampling.generate(state.graphdef, state.params, *subset, key=jax.random.key(0),
                                      max_new_tokens=MAX_NEW_TOKENS, greedy=True, num_return_sequences=repeats,
                                      mesh=mesh)
        assert out.completion_ids.sharding.spec[0] == ("data", "fsdp")
        np.testing.assert_array_equal(np.asarray(out.completion_ids), expected.completion_ids)
        np.testing.assert_allclose(np.asarray(out.completion_logps), expected.completion_logps, atol=1e-5)


def test_bad_num_return_sequences_raise(split, prompts):
    for value in (0, 1.5, True):
        with pytest.raises(ValueError, match="num_return_sequences"):
            jaxpt.sampling.generate(*split, *prompts, key=jax.random.key(0), max_new_tokens=4,
                                    num_return_sequences=value)
    with pytest.raises(ValueError, match="num_return_sequences=1"):  # 3 prompts x 1 do not divide data*fsdp=4
        jaxpt.sampling.generate(*split, prompts[0][:3], prompts[1][:3], key=jax.random.key(0), max_new_tokens=4,
                                mesh=make_mesh(data=2, fsdp=2, tensor=2))


def test_repetition_penalty_logits_match_transformers():
    """`repetition_penalty_logits` on fixed logits (both signs, repeated ids) equals transformers'
    `RepetitionPenaltyLogitsProcessor`, for penalties above and below 1."""
    import torch

    from jaxpt.sampling import repetition_penalty_logits, tokens_seen

    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, (3, 40)).astype(np.float32)
    ids = rng.integers(0, 40, (3, 9))
    ids[0, :4] = 7  # a repeated id counts once
    for penalty in (1.3, 0.7):
        expected = transformers.RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(ids), torch.tensor(logits))
        seen = tokens_seen(jnp.asarray(ids), jnp.ones(ids.shape), 40)
        got = repetition_penalty_logits(jnp.asarray(logits), seen, penalty)
        np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-6)
        assert np.abs(np.asarray(got) - logits).max() > 0.1


def test_repetition_penalty_greedy_equals_transformers_processor_step_by_step(model, split, prompts, greedy):
    """Greedy decoding with `repetition_penalty` picks, at every step, the argmax of a full forward pass's logits
    after transformers' processor over the row's real tokens so far (prompt without its padding + completion)."""
    import torch

    penalty = 1.8
    out = generate(split, prompts, greedy=True, repetition_penalty=penalty)
    assert np.mean(out.completion_ids != greedy.completion_ids) > 0.2  # the penalty changes the completions
    prompt, prompt_mask = prompts
    ids = np.concatenate([prompt, out.completion_ids], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(out.completion_ids)], axis=1)
    logits = np.asarray(jax.jit(lambda i, m: model(i, attention_mask=m))(jnp.asarray(ids), jnp.asarray(mask)))
    processor = transformers.RepetitionPenaltyLogitsProcessor(penalty)
    for row in range(len(prompt)):
        for step in range(MAX_NEW_TOKENS):
            position = prompt.shape[1] + step
            history = ids[row, :position][mask[row, :position] == 1]
            scores = processor(torch.tensor(history[None]), torch.tensor(logits[row, position - 1][None]))
            assert int(scores.argmax()) == out.completion_ids[row, step], (row, step)
    bad = dict(key=jax.random.key(0), max_new_tokens=4, repetition_penalty=0.0)
    with pytest.raises(ValueError, match="repetition_penalty=0.0"):
        jaxpt.sampling.generate(*split, *prompts, **bad)
