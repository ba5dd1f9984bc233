"""What GRPO and RLOO share (jaxpt/rollout.py): evaluation over rollouts of a fixed shape."""

import jax
import numpy as np
import pytest

from jaxpt import grpo, rloo
from jaxpt.rollout import evaluate_rollouts, rollout_shape


def test_both_methods_use_the_shared_batch_arithmetic(tmp_path):
    assert grpo.rollout_shape is rloo.rollout_shape is rollout_shape
    cfg = rloo.RLOOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8,
                          generation_batch_size=32)
    assert rollout_shape(cfg, devices=2) == (16, 2, 8)


def test_evaluate_rollouts_fills_the_last_rollout_and_averages_over_rollouts(tmp_path):
    cfg = grpo.GRPOConfig(output_dir=str(tmp_path), seed=3)
    calls = []

    def fake_rollout(state, prompts, reward_funcs, tokenizer, config, *, key, mesh, prompt_buckets,
                     ref_logps_fn=None, policy_logps_fn=None):
        calls.append(([p["id"] for p in prompts], np.asarray(jax.random.key_data(key)), ref_logps_fn))
        return None, {"reward": float(sum(p["id"] for p in prompts)), "completions/mean_length": 2.0}, []

    prompts = [{"id": i} for i in range(5)]
    metrics = evaluate_rollouts(fake_rollout, None, prompts, [], None, cfg, mesh=None, prompt_buckets=[16],
                                prompts_per_rollout=2)
    assert [ids for ids, _, _ in calls] == [[0, 1], [2, 3], [4, 4]]  # one shape: the last prompt repeats
    assert not np.array_equal(calls[0][1], calls[1][1])  # a fresh key per rollout
    assert metrics == {"eval_reward": pytest.approx((1 + 5 + 8) / 3), "eval_completions/mean_length": 2.0}
    # a reference for the rollout (RLOO's KL penalty) reaches every rollout
    calls.clear()
    evaluate_rollouts(fake_rollout, None, prompts, [], None, cfg, mesh=None, prompt_buckets=[16],
                      prompts_per_rollout=5, ref_logps_fn=len)
    assert [fn for _, _, fn in calls] == [len]
