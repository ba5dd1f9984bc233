"""Exact importance ratios in bfloat16: old log-probs from the training forward pass, never from the sampler.

A bfloat16 model (parameters and compute) on the CPU: the sampler's log-probs (decode loop, KV cache) differ from
the training forward pass's by ~1e-2 nats, so any ratio built on them is off by ~1% before the first update. The
tests use epsilon=1e-3: a ratio that is not 1 to 0.1% counts as clipped, and the clip fractions must be exactly 0.
"""

import itertools

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpt.models
from jaxpt import cli, grpo, rloo
from jaxpt.losses.sampler_mismatch import (
    SAMPLER_IMPORTANCE_SAMPLING_MODES,
    combine_extremes,
    sampler_importance_weights,
    sampler_mismatch_metrics,
)
from jaxpt.rollout import make_logps_fn
from jaxpt.train_state import TrainState
from tests.helpers import char_tokenizer, tiny_llama, tiny_llama_config

TOKENIZER = char_tokenizer()
VOCAB = len(TOKENIZER)
PROMPTS = datasets.Dataset.from_list([{"prompt": p} for p in ["ab", "cde", "f", "ghij"] * 4])
TIGHT = 1e-3  # epsilon: a ratio off by more than 0.1% is clipped


def odd_reward(completions, **kwargs):
    """Dense toy reward (the fraction of characters with an odd code, ~0.5 for a random policy): groups differ."""
    return [sum(ord(ch) % 2 for ch in c) / max(len(c), 1) for c in completions]


def bf16_model():
    return jaxpt.models.from_config(tiny_llama_config(VOCAB), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, seed=0)


def settings(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=16,
                  max_completion_length=8, learning_rate=3e-2, max_steps=1, logging_steps=1, mesh_fsdp=1,
                  disable_tqdm=True, save_steps=0, save_final_model=False, seed=0, epsilon=TIGHT)
    values.update(overrides)
    return values


def on_policy_loss(arrays, weights=None):
    """DAPO's loss when every ratio is exactly 1: -sum(A * w * mask) / tokens (float64)."""
    mask = arrays["completion_mask"].astype(np.float64)
    weights = 1.0 if weights is None else weights
    return -np.sum(arrays["advantages"][:, None] * weights * mask) / mask.sum()


# --------------------------------------------------------------------------------------------------------------
# GRPO: the rollout's arrays in a custom loop (one step per rollout)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_rollout(tmp_path_factory):
    cfg = grpo.GRPOConfig(**settings(tmp_path_factory.mktemp("bf16")))
    state = TrainState.create(bf16_model(), optax.sgd(1.0))
    prompts = grpo.data.prepare_prompts(PROMPTS, TOKENIZER, method="GRPO")[:4]
    arrays, _, _ = grpo.rollout(state, prompts, [odd_reward], TOKENIZER, cfg, key=jax.random.key(0), mesh=None,
                                prompt_buckets=[16])
    trainer_logps = make_logps_fn(state.graphdef, temperature=cfg.temperature, chunk_size=cfg.logits_chunk_size,
                                  micro_batch=16)(state.params, arrays)
    return cfg, arrays, trainer_logps


def one_step(cfg, arrays):
    state = TrainState.create(bf16_model(), optax.sgd(1.0))
    batch = {k: v[None] for k, v in arrays.items()}
    _, metrics = grpo.make_train_step(cfg)(state, batch)
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def test_grpo_on_policy_ratio_is_exactly_one_in_bfloat16(bf16_rollout):
    cfg, arrays, trainer_logps = bf16_rollout
    mask = arrays["completion_mask"].astype(bool)
    gap = np.abs(trainer_logps - arrays["sampler_logps"])[mask]
    assert gap.max() > 2 * TIGHT  # the sampler's log-probs would clip: the assertions below can fail
    metrics = one_step(cfg, arrays)
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert metrics[name] == 0.0, name
    assert metrics["loss"] == pytest.approx(on_policy_loss(arrays), rel=1e-5)
    # the sampler/trainer gap, logged with TRL's names
    assert metrics["sampling/sampling_logp_difference/max"] == pytest.approx(gap.max(), rel=1e-6)
    assert metrics["sampling/sampling_logp_difference/mean"] == pytest.approx(gap.mean(), rel=1e-5)
    ratios = np.exp(trainer_logps - arrays["sampler_logps"])[mask]
    assert metrics["sampling/importance_sampling_ratio/min"] == pytest.approx(ratios.min(), rel=1e-6)
    assert metrics["sampling/importance_sampling_ratio/max"] == pytest.approx(ratios.max(), rel=1e-6)
    assert metrics["sampling/importance_sampling_ratio/mean"] == pytest.approx(ratios.mean(), rel=1e-5)


def test_grpo_sampler_correction_weights_the_on_policy_loss(bf16_rollout):
    """The correction multiplies each token's policy loss by the trainer/sampler ratio, truncated at clip_max
    (the other modes: the float64 and TRL parity tests; the step's wiring is the same)."""
    cfg, arrays, trainer_logps = bf16_rollout
    mask = arrays["completion_mask"].astype(np.float64)
    ratios = np.exp((trainer_logps.astype(np.float64) - arrays["sampler_logps"]) * mask)
    clip_max = float(np.quantile(ratios[mask > 0], 0.7))  # a cap the bf16 gap exceeds: the truncation matters
    weights = np.minimum(ratios, clip_max)
    corrected = cfg.replace(sampler_importance_sampling_correction=True,
                            sampler_importance_sampling_mode="token_truncate",
                            sampler_importance_sampling_clip_max=clip_max)
    metrics = one_step(corrected, arrays)
    assert metrics["loss"] == pytest.approx(on_policy_loss(arrays, weights), rel=1e-5)
    assert metrics["loss"] != pytest.approx(on_policy_loss(arrays), rel=1e-3)
    assert metrics["clip_ratio/region_mean"] == 0.0
    assert metrics["sampling/importance_sampling_ratio/max"] == pytest.approx(clip_max, rel=1e-6)
    assert metrics["sampling/importance_sampling_ratio/mean"] == pytest.approx(weights[mask > 0].mean(), rel=1e-5)


# --------------------------------------------------------------------------------------------------------------
# train(): several steps per rollout, and RLOO's KL penalty
# --------------------------------------------------------------------------------------------------------------


def test_grpo_two_iterations_first_pass_ratio_is_exactly_one(tmp_path, monkeypatch):
    """num_iterations=2: the old log-probs come from the training forward pass before the first update, so the
    first pass over the rollout is exactly on-policy; the second is not (the assertion can fail)."""
    rollouts = []
    real_rollout = grpo.rollout

    def recording_rollout(*args, **kwargs):
        rollouts.append(real_rollout(*args, **kwargs))
        return rollouts[-1]

    monkeypatch.setattr(grpo, "rollout", recording_rollout)
    cfg = grpo.GRPOConfig(**settings(tmp_path, num_iterations=2, max_steps=2))
    result = grpo.train(bf16_model(), TOKENIZER, PROMPTS, cfg, reward_funcs=[odd_reward])
    first, second = result.metrics
    arrays = rollouts[0][0]
    assert first["clip_ratio/region_mean"] == 0.0
    # (~0 when every completion has the same length; ratios off by ~1% would move it by ~1e-3)
    assert first["loss"] == pytest.approx(on_policy_loss(arrays), rel=1e-5, abs=1e-6)
    assert second["clip_ratio/region_mean"] > 0
    assert first["sampling/sampling_logp_difference/max"] > 2 * TIGHT  # the sampler's log-probs would clip
    mask = arrays["completion_mask"].astype(bool)
    gap = np.abs(arrays["old_logps"] - arrays["sampler_logps"])[mask]
    assert first["sampling/sampling_logp_difference/max"] == pytest.approx(gap.max(), rel=1e-6)


def test_rloo_kl_is_exactly_zero_at_step_0_in_bfloat16(tmp_path):
    """beta > 0 and the reference = the initial policy: the KL penalty is exactly 0 before the first update (the
    policy's log-probs for the penalty come from the reference's jitted forward pass), and with num_iterations=2
    the first pass's sequence ratios are exactly 1."""
    cfg = rloo.RLOOConfig(**settings(tmp_path, beta=0.1, num_iterations=2, max_steps=2))
    result = rloo.train(bf16_model(), TOKENIZER, PROMPTS, cfg, reward_funcs=[odd_reward])
    first, second = result.metrics
    assert first["kl"] == 0.0
    assert first["clip_ratio/region_mean"] == 0.0
    assert second["clip_ratio/region_mean"] > 0
    assert first["sampling/sampling_logp_difference/max"] > 2 * TIGHT


def test_reference_in_another_dtype_fails_early(tmp_path):
    cfg = grpo.GRPOConfig(**settings(tmp_path, beta=0.1))
    with pytest.raises(ValueError, match=r"ref_model parameter .* is float32 but the policy's is bfloat16"):
        grpo.train(bf16_model(), TOKENIZER, PROMPTS, cfg, reward_funcs=[odd_reward], ref_model=tiny_llama(VOCAB))


# --------------------------------------------------------------------------------------------------------------
# The correction weights against an independent float64 implementation of TRL's rule
# --------------------------------------------------------------------------------------------------------------


def reference_weights(trainer, sampler, mask, mode, clip_min, clip_max):
    """TRL's vLLM importance-sampling weights, written out in numpy float64."""
    diff = (trainer - sampler) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(axis=1, keepdims=True)
    ratio = np.exp(diff)
    low = -np.inf if clip_min is None else clip_min
    high = np.inf if clip_max is None else clip_max
    if mode.endswith("truncate"):
        return np.minimum(np.maximum(ratio, low), high)
    return np.where((ratio >= low) & (ratio <= high), ratio, 0.0)


@pytest.mark.parametrize("mode,bounds", list(itertools.product(
    SAMPLER_IMPORTANCE_SAMPLING_MODES, [(None, 1.5), (0.8, 1.25), (0.6, None)])))
def test_importance_weights_match_a_float64_reference(mode, bounds):
    rng = np.random.default_rng(0)
    sampler = -rng.uniform(0.05, 3.0, (6, 9))
    trainer = sampler + rng.normal(0.0, 0.6, (6, 9))
    mask = (np.arange(9)[None] < np.array([9, 4, 1, 7, 0, 5])[:, None]).astype(np.float64)
    expected = reference_weights(trainer, sampler, mask, mode, *bounds)
    assert 0 < np.mean((expected == 0) | (expected == bounds[0]) | (expected == bounds[1])) < 1  # bounds bite
    with jax.enable_x64(True):
        weights = sampler_importance_weights(jnp.asarray(trainer), jnp.asarray(sampler), jnp.asarray(mask),
                                             mode=mode, clip_min=bounds[0], clip_max=bounds[1])
        np.testing.assert_allclose(np.asarray(weights), expected, rtol=1e-12)
        pairs, extremes = sampler_mismatch_metrics(jnp.asarray(trainer), jnp.asarray(sampler), jnp.asarray(mask),
                                                   importance_weights=weights)
        extremes = combine_extremes(extremes)
    applied = expected.ravel() if mode.startswith("sequence") else expected[mask > 0]
    total, count = pairs["sampling/importance_sampling_ratio/mean"]
    assert float(total / count) == pytest.approx(applied.mean(), rel=1e-6)
    assert float(extremes["sampling/importance_sampling_ratio/max"]) == pytest.approx(applied.max(), rel=1e-6)
    assert float(extremes["sampling/importance_sampling_ratio/min"]) == pytest.approx(applied.min(), rel=1e-6)
    gap = np.abs(trainer - sampler)[mask > 0]
    total, count = pairs["sampling/sampling_logp_difference/mean"]
    assert float(total / count) == pytest.approx(gap.mean(), rel=1e-6)
    assert float(extremes["sampling/sampling_logp_difference/max"]) == pytest.approx(gap.max(), rel=1e-6)


def test_correction_config_is_checked(tmp_path):
    _, _, parsed = cli.parse(grpo.GRPOConfig, [
        "--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", str(tmp_path),
        "--sampler_importance_sampling_correction", "true", "--sampler_importance_sampling_mode", "token_mask",
        "--sampler_importance_sampling_clip_min", "0.5", "--sampler_importance_sampling_clip_max", "2"])
    assert (parsed.sampler_importance_sampling_correction, parsed.sampler_importance_sampling_mode,
            parsed.sampler_importance_sampling_clip_min, parsed.sampler_importance_sampling_clip_max) == (
        True, "token_mask", 0.5, 2.0)
    with pytest.raises(ValueError, match="sampler_importance_sampling_mode='tokens'"):
        grpo.GRPOConfig(output_dir=str(tmp_path), sampler_importance_sampling_mode="tokens")
    with pytest.raises(ValueError, match="sampler_importance_sampling_clip_min=3.0 must be below"):
        grpo.GRPOConfig(output_dir=str(tmp_path), sampler_importance_sampling_clip_min=3.0)
    with pytest.raises(ValueError, match="set sampler_importance_sampling_clip_min or"):
        grpo.GRPOConfig(output_dir=str(tmp_path), sampler_importance_sampling_correction=True,
                        sampler_importance_sampling_mode="token_truncate", sampler_importance_sampling_clip_max=None)


def test_rloo_kl_penalty_without_the_policy_forward_pass_is_refused(tmp_path):
    cfg = rloo.RLOOConfig(**settings(tmp_path, beta=0.1))
    with pytest.raises(ValueError, match="needs policy_logps_fn"):
        rloo.rollout(None, [], [], None, cfg, key=None, mesh=None, prompt_buckets=[16], ref_logps_fn=len)
