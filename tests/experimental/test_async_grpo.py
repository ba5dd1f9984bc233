"""Asynchronous GRPO: the staleness bound (recorded behaviour versions), the importance ratio against the behaviour
policy's log-probs recomputed in float64, max_staleness=0 equal to synchronous GRPO, and a reward that rises."""

import json

import datasets
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpt import data, grpo
from jaxpt.experimental import async_grpo
from jaxpt.rollout import make_logps_fn
from jaxpt.train_state import TrainState
from tests.experimental.helpers import TOKENIZER, VOCAB
from tests.helpers import tiny_llama

PROMPTS = datasets.Dataset.from_list([{"prompt": p} for p in ["ab", "cde", "f", "ghij"] * 4])
SETTINGS = dict(num_generations=4, per_device_train_batch_size=8, max_completion_length=8, learning_rate=3e-2,
                lr_scheduler_type="linear", logging_steps=1, mesh_fsdp=1, disable_tqdm=True, save_steps=0,
                save_final_model=False, seed=0)


def digits_reward(completions, **kwargs):
    """Dense toy reward: the fraction of characters that are digits (about 10% for a random policy)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def scattered_reward(completions, **kwargs):
    """Rewards that differ within every group (so every advantage is nonzero)."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


def config(tmp_path, **overrides):
    return async_grpo.AsyncGRPOConfig(output_dir=str(tmp_path), **{**SETTINGS, "max_steps": 4, **overrides})


@pytest.mark.parametrize("overrides,message", [
    ({"max_staleness": -1}, "max_staleness=-1"),
    ({"num_iterations": 2}, "num_iterations=2"),
    ({"steps_per_generation": 2}, "steps_per_generation=2"),
    ({"sync_ref_model": True, "beta": 0.1}, "sync_ref_model"),
])
def test_config_validation(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)  # validated on construction (TrainingConfig.__post_init__)


def test_behaviour_versions_trail_by_at_most_max_staleness():
    versions = [async_grpo.behaviour_version(k, max_staleness=2) for k in range(6)]
    assert versions == [0, 0, 0, 1, 2, 3]
    assert [async_grpo.behaviour_version(k, max_staleness=2, start_step=4) for k in (4, 5, 6, 7)] == [4, 4, 4, 5]
    assert [async_grpo.behaviour_version(k, max_staleness=0) for k in range(3)] == [0, 1, 2]


def float64_logps(graphdef, params, arrays, temperature):
    """log softmax(logits / T) of each completion token, the logits of the float32 model, the rest in float64."""
    model = nnx.merge(graphdef, params)
    ids = np.concatenate([arrays["prompt_ids"], arrays["completion_ids"]], 1)
    mask = np.concatenate([arrays["prompt_mask"], arrays["attention_mask"]], 1)
    prompt_length = arrays["prompt_ids"].shape[1]
    logits = np.asarray(model(ids, attention_mask=mask), np.float64)[:, prompt_length - 1:-1] / temperature
    logits -= logits.max(-1, keepdims=True)
    logps = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return np.take_along_axis(logps, arrays["completion_ids"][..., None], -1)[..., 0]


def test_stale_rollout_ratio_divides_by_the_behaviour_policy(tmp_path):
    """A rollout sampled with version 0 and trained on at version 1: its `old_logps` are version 0's log-probs
    (float64 recomputation), not the current policy's, and the update's loss is the clipped surrogate with the ratio
    current / behaviour, computed in float64."""
    cfg = config(tmp_path, max_staleness=1)  # temperature 1: the sampler compiled once for the file
    state = TrainState.create(tiny_llama(VOCAB), optax.adam(3e-2))
    prompts = data.prepare_prompts(PROMPTS.select(range(2)), TOKENIZER, method="test", max_prompt_length=None)
    logps_fn = make_logps_fn(state.graphdef, temperature=1.0, chunk_size=cfg.logits_chunk_size, micro_batch=8)
    step = async_grpo.make_train_step(cfg)
    options = dict(mesh=None, prompt_buckets=[16], logps_fn=logps_fn)

    behaviour = async_grpo.snapshot(state, 0, copy=True)
    fresh, _, _ = async_grpo.rollout(async_grpo.snapshot(state, 0, copy=False), prompts, [scattered_reward],
                                     TOKENIZER, cfg, staleness=0, key=jax.random.key(0), **options)
    assert "old_logps" not in fresh  # on-policy: synchronous GRPO's update
    # the first update with the stale batch's structure (old = current log-probs): the step compiles once
    fresh["old_logps"] = logps_fn(state.params, fresh)
    state, _ = step(state, {k: v[None] for k, v in fresh.items()})  # now version 1
    stale, _, _ = async_grpo.rollout(behaviour, prompts, [scattered_reward], TOKENIZER, cfg, staleness=1,
                                     key=jax.random.key(1), **options)

    mask = stale["completion_mask"] > 0
    old = float64_logps(state.graphdef, behaviour.params, stale, 1.0)
    current = float64_logps(state.graphdef, jax.device_get(state.params), stale, 1.0)
    np.testing.assert_allclose(stale["old_logps"][mask], old[mask], atol=3e-5)
    assert np.abs(current - old)[mask].max() > 0.05  # the two policies differ: the test can tell them apart
    advantages = stale["advantages"][:, None].astype(np.float64)
    assert np.abs(advantages).max() > 0.1
    ratio = np.exp(current - old)
    per_token = -np.minimum(ratio * advantages, np.clip(ratio, 0.8, 1.2) * advantages)
    expected = per_token[mask].sum() / mask.sum()  # loss_type="dapo": over the step's tokens
    _, metrics = step(state, {k: v[None] for k, v in stale.items()})
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-4, atol=1e-6)
    assert abs(expected) > 1e-3


def test_max_staleness_zero_is_synchronous_grpo(tmp_path):
    """The same rollouts (keys, prompts) and updates: losses, rewards and parameters equal `jaxpt.grpo`'s."""
    sync = grpo.train(tiny_llama(VOCAB), TOKENIZER, PROMPTS, grpo.GRPOConfig(output_dir=str(tmp_path / "sync"),
                                                                              max_steps=2, **SETTINGS),
                      reward_funcs=[digits_reward])
    result = async_grpo.train(tiny_llama(VOCAB), TOKENIZER, PROMPTS, config(tmp_path / "async", max_steps=2,
                                                                            max_staleness=0),
                              reward_funcs=[digits_reward])
    assert result.behaviour_versions == [0, 1]
    for ours, theirs in zip(result.metrics, sync.metrics, strict=True):
        for name in ("loss", "grad_norm", "reward", "entropy"):
            np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, err_msg=name)
        assert ours["sample/staleness_max"] == 0
    for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(sync.state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)


def test_stale_pipeline_respects_the_bound_and_raises_the_reward(tmp_path):
    """max_staleness=2: every step's samples come from the policy two versions back (fewer at the start), as the
    recorded versions and the logged staleness say, and the mean reward still rises."""
    result = async_grpo.train(tiny_llama(VOCAB), TOKENIZER, PROMPTS, config(tmp_path, max_steps=16, max_staleness=2,
                                                                            learning_rate=6e-2),
                              reward_funcs=[digits_reward])
    steps = range(16)
    assert result.behaviour_versions == [max(k - 2, 0) for k in steps]
    assert all(k - v <= 2 for k, v in zip(steps, result.behaviour_versions, strict=True))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["sample/staleness_max"] for r in records] == [min(k, 2) for k in steps]
    assert {"loss", "reward", "clip_ratio/region_mean", "sample/staleness_mean", "perf/rollout_wait_s"} <= set(
        records[0])
    rewards = [r["reward"] for r in records]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1, rewards
