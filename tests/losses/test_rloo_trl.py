"""RLOO parity with TRL 1.16's own `RLOOTrainer` code, run on fixed log-probs and rewards.

TRL's `_generate_and_score_completions` (leave-one-out advantages, the KL penalty in the reward, reward clipping,
normalisation, truncated-completion masking and the logged reward / KL metrics) and `_compute_loss` are driven
without a model: a bare `RLOOTrainer` (no `__init__`) gets the attributes they read, and generation, reward
functions and the log-prob forward return fixed values. jaxpt's side is `jaxpt.rloo.rollout` (with sampling
replaced by the same fixed completions) and `jaxpt.losses.rloo_loss`. One micro-batch: jaxpt normalises gradient
accumulation like one big batch on purpose (README "How jaxpt differs").
"""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import trl  # a test dependency: parity must fail, never skip, without it
from accelerate import Accelerator

import jaxpt.rloo
from jaxpt.losses.rloo import rloo_loss
from jaxpt.rollout import Rollout, loss_mask

GENERATIONS, PROMPTS = 3, 3
BATCH = GENERATIONS * PROMPTS
EOS, PAD = 2, 0
LENGTHS = np.array([4, 2, 5, 1, 3, 5, 5, 2, 4])
REWARD_NAMES = ("correct", "format")
# Two reward functions; NaN = the function returned None. Completion 4 is unscored by both (advantage 0, left
# out of its group's baseline); the last group is tied on the first function.
REWARDS = np.array([[1.0, 0.5], [0.0, np.nan], [2.0, 0.0],
                    [0.5, 1.0], [np.nan, np.nan], [1.5, 0.25],
                    [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
ACCELERATOR = Accelerator(cpu=True)


def fixed_inputs(seed=5):
    rng = np.random.default_rng(seed)
    shape = (BATCH, LENGTHS.max())
    old_logps = -rng.uniform(0.05, 2.0, shape)
    # Sequence ratios exp(sum_t logp - old_logp) spread on both sides of the clipping range.
    logps = old_logps + rng.normal(0.0, 0.15, shape)
    ref_logps = old_logps + rng.normal(0.0, 0.3, shape)
    completion_ids = [[5 + (i + t) % 7 for t in range(n - 1)] + [EOS if i % 4 else 9] for i, n in enumerate(LENGTHS)]
    return dict(logps=logps, old_logps=old_logps, ref_logps=ref_logps, completion_ids=completion_ids)


def trl_rloo(inputs, *, beta, epsilon, epsilon_high, reward_weights, reward_clip_range, normalize_advantages,
             mask_truncated_completions):
    """TRL's rollout scoring then loss: (advantages, rollout metrics, loss, d loss / d logps, loss metrics)."""
    trainer = object.__new__(trl.RLOOTrainer)
    trainer.args = types.SimpleNamespace(per_device_train_batch_size=BATCH, gradient_checkpointing_kwargs=None)
    trainer.model = types.SimpleNamespace(training=True, is_gradient_checkpointing=False)
    trainer.ref_model = object()
    trainer.accelerator = ACCELERATOR
    trainer._tokenizer = types.SimpleNamespace(pad_token_id=PAD)
    trainer.eos_token_ids = [EOS]
    trainer.pad_to_multiple_of = None
    trainer.mask_truncated_completions = mask_truncated_completions
    trainer.num_generations = trainer.num_generations_eval = GENERATIONS
    trainer.beta, trainer.epsilon_low, trainer.epsilon_high = beta, epsilon, epsilon_high
    trainer.reward_weights = torch.tensor(reward_weights, dtype=torch.float64)
    trainer.reward_clip_range = reward_clip_range
    trainer.normalize_advantages = normalize_advantages
    trainer.reward_func_names = list(REWARD_NAMES)
    trainer.aux_loss_enabled = False
    trainer.log_multimodal = False
    trainer._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    trainer._logs = {"prompt": [], "completion": [], "advantages": [], "rewards": collections.defaultdict(list),
                     "extra": collections.defaultdict(list)}
    trainer._pending_extra_logs, trainer._pending_metrics = {}, {}
    completion_ids = inputs["completion_ids"]
    trainer._generate = lambda prompts: ([[7, 8]] * BATCH, completion_ids, ["text"] * BATCH)
    trainer._calculate_rewards = lambda *args: torch.tensor(REWARDS, dtype=torch.float64)
    fixed = {"policy": torch.tensor(inputs["old_logps"], dtype=torch.float64),
             "ref": torch.tensor(inputs["ref_logps"], dtype=torch.float64)}
    trainer._get_per_token_logps_and_entropies = lambda model, *args, **kwargs: (
        fixed["ref" if model is trainer.ref_model else "policy"], None, None)

    rollout = trainer._generate_and_score_completions([{"prompt": "p"}] * BATCH)
    rollout_metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    trainer._metrics["train"].clear()

    logps = torch.tensor(inputs["logps"], dtype=torch.float64, requires_grad=True)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, torch.zeros_like(logps), None)
    loss = trainer._compute_loss(None, rollout)
    loss.backward()
    loss_metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return (rollout["advantages"].numpy(), rollout["completion_mask"].numpy(), rollout_metrics, loss.item(),
            logps.grad.numpy(), loss_metrics)


def jaxpt_rollout(inputs, monkeypatch, tmp_path, *, beta, reward_weights, reward_clip_range, normalize_advantages,
                  mask_truncated_completions, **_):
    """`jaxpt.rloo.rollout` with sampling replaced by the fixed completions: (arrays, metrics)."""
    config = jaxpt.rloo.RLOOConfig(output_dir=str(tmp_path), num_generations=GENERATIONS, beta=beta,
                                   reward_weights=reward_weights, reward_clip_range=reward_clip_range,
                                   normalize_advantages=normalize_advantages,
                                   mask_truncated_completions=mask_truncated_completions)
    width = LENGTHS.max()
    completion_ids = np.array([ids + [PAD] * (width - len(ids)) for ids in inputs["completion_ids"]])
    attention_mask = (np.arange(width)[None, :] < LENGTHS[:, None]).astype(np.int32)
    finished = np.array([ids[-1] == EOS for ids in inputs["completion_ids"]])
    sampled = Rollout(arrays={"prompt_ids": np.full((BATCH, 2), 7), "prompt_mask": np.ones((BATCH, 2), np.int32),
                              "completion_ids": completion_ids, "attention_mask": attention_mask,
                              # the sampler's log-probs, unlike the training forward pass's: never in the KL
                              "sampler_logps": inputs["old_logps"] - 0.25,
                              "completion_mask": loss_mask(attention_mask, finished,
                                                           mask_truncated_completions=mask_truncated_completions)},
                      rewards=REWARDS, reward_names=REWARD_NAMES, prompts=["p"] * BATCH,
                      completions=["text"] * BATCH, lengths=LENGTHS, finished=finished)
    monkeypatch.setattr(jaxpt.rloo, "sample_and_score", lambda *args, **kwargs: sampled)
    ref_logps_fn = (lambda arrays: inputs["ref_logps"]) if beta else None
    policy = types.SimpleNamespace(full_params=lambda: None)  # TRL's old_per_token_logps: the training forward pass's
    arrays, metrics, _ = jaxpt.rloo.rollout(policy, [{"prompt": "p"}] * PROMPTS, [], None, config, key=None,
                                            mesh=None, prompt_buckets=[2], ref_logps_fn=ref_logps_fn,
                                            policy_logps_fn=lambda params, arrays: inputs["old_logps"])
    return arrays, metrics


def jaxpt_loss(logps, old_logps, advantages, mask, *, epsilon, epsilon_high):
    """`rloo_loss` as `jaxpt.rloo`'s step calls it for one micro-batch, in float64: (loss, gradient, metrics)."""
    with jax.enable_x64(True):
        def loss_of(logps):
            return rloo_loss(logps, jnp.asarray(old_logps), jnp.asarray(advantages), jnp.asarray(mask, jnp.float64),
                             epsilon=epsilon, epsilon_high=epsilon_high, num_sequences=BATCH)

        (loss, metrics), grad = jax.value_and_grad(loss_of, has_aux=True)(jnp.asarray(logps))
        return float(loss), np.asarray(grad), {key: float(value) for key, value in metrics.items()}


DEFAULTS = dict(beta=0.05, epsilon=0.2, epsilon_high=0.2, reward_weights=[1.0, 1.0], reward_clip_range=None,
                normalize_advantages=False, mask_truncated_completions=False)
CASES = [dict(beta=0.0), dict(), dict(reward_weights=[1.0, 2.0], epsilon_high=0.28),
         dict(reward_clip_range=[0.0, 1.25]), dict(normalize_advantages=True), dict(mask_truncated_completions=True)]
LOSS_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
# TRL also logs the min / max over sequences of the clipped indicators; jaxpt's steps accumulate metrics as sums
# over micro-batches and do not log them. Entropy is logged by jaxpt.rloo's step from the model's logits.
NOT_IN_JAXPT = {"clip_ratio/low_min", "clip_ratio/high_max", "entropy"}


def case_id(case):
    return "-".join(f"{key}={value}" for key, value in case.items()) or "defaults"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_rollout_advantages_loss_gradient_and_metrics_match_trl(case, monkeypatch, tmp_path):
    inputs = fixed_inputs()
    options = {**DEFAULTS, **case}
    trl_advantages, trl_mask, trl_rollout_metrics, trl_loss, trl_grad, trl_loss_metrics = trl_rloo(inputs, **options)
    arrays, rollout_metrics = jaxpt_rollout(inputs, monkeypatch, tmp_path, **options)

    np.testing.assert_array_equal(arrays["completion_mask"], trl_mask)
    # jaxpt keeps rewards and advantages in float32.
    np.testing.assert_allclose(arrays["advantages"], trl_advantages, rtol=1e-6, atol=1e-6)
    assert trl_advantages[4] == 0.0 and np.abs(trl_advantages).max() > 0.1
    rollout_metrics = {key: value for key, value in rollout_metrics.items() if not key.startswith("completions/")}
    assert set(rollout_metrics) == set(trl_rollout_metrics)
    for key, value in trl_rollout_metrics.items():
        assert rollout_metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key

    # The loss on TRL's own rollout (float64 advantages): the loss code alone, at float64 precision.
    loss, grad, loss_metrics = jaxpt_loss(inputs["logps"], inputs["old_logps"], trl_advantages, trl_mask,
                                          epsilon=options["epsilon"], epsilon_high=options["epsilon_high"])
    assert loss == pytest.approx(trl_loss, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(grad, trl_grad, rtol=1e-9, atol=1e-12)
    assert np.abs(trl_grad).max() > 1e-3
    assert set(trl_loss_metrics) - NOT_IN_JAXPT == set(loss_metrics) == set(LOSS_METRICS)
    for key in LOSS_METRICS:  # TRL counts clipped sequences in float32
        assert loss_metrics[key] == pytest.approx(trl_loss_metrics[key], rel=1e-6, abs=1e-12), key


def test_the_fixed_inputs_clip_on_both_sides():
    """The parity above is only meaningful if some sequence ratios leave the clipping range on each side."""
    metrics = trl_rloo(fixed_inputs(), **DEFAULTS)[-1]
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
    assert metrics["clip_ratio/region_mean"] < 1
