"""GRPO and RLOO advantages and losses against formulas written out in float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt.losses.grpo import grpo_advantages, grpo_loss, high_entropy_mask, reward_metrics
from jaxpt.losses.rloo import rloo_advantages, rloo_loss

RNG = np.random.RandomState(0)
B, T, G = 6, 5, 3
LOGPS = RNG.randn(B, T) * 0.3 - 1.0
OLD = LOGPS + RNG.randn(B, T) * 0.3
REF = LOGPS + RNG.randn(B, T) * 0.2
ADV = RNG.randn(B)
MASK = (np.arange(T)[None, :] < np.array([5, 3, 4, 1, 5, 2])[:, None]).astype(np.float64)


def np_std(x):
    return np.std(x, ddof=1)


def test_group_advantages_formula_and_none_rewards():
    rewards = np.array([[1.0, 0.0], [0.0, np.nan], [1.0, 1.0], [np.nan, np.nan], [0.0, 0.5], [2.0, 0.0]])
    weights = np.array([1.0, 2.0])
    total = np.array([1.0, 0.0, 3.0, np.nan, 1.0, 2.0])  # nansum of weighted functions; all-NaN row unscorable
    expected = np.zeros(6)
    for group in (slice(0, 3), slice(3, 6)):
        values = total[group]
        scored = values[~np.isnan(values)]
        expected[group] = (values - scored.mean()) / (np_std(scored) + 1e-4)
    expected = np.nan_to_num(expected)
    advantages = grpo_advantages(rewards, num_generations=3, reward_weights=weights)
    np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-6)
    assert advantages[3] == 0.0


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantage_scaling(scale):
    rewards = RNG.rand(B)
    grouped = rewards.reshape(-1, G)
    centred = (grouped - grouped.mean(1, keepdims=True)).reshape(-1)
    if scale == "group":
        expected = centred / (np.repeat(np.std(grouped, axis=1, ddof=1), G) + 1e-4)
    elif scale == "batch":
        expected = centred / (np_std(rewards) + 1e-4)
    else:
        expected = centred
    np.testing.assert_allclose(grpo_advantages(rewards, num_generations=G, scale_rewards=scale), expected,
                               rtol=1e-5, atol=1e-6)


def test_reward_metrics():
    rewards = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, np.nan], [0.0, 0.0]])
    metrics = reward_metrics(rewards, num_generations=3, reward_names=("acc", "fmt"))
    total = np.array([1, 1, 1, 1, 1, 0.0])
    assert float(metrics["reward"]) == pytest.approx(total.mean())
    assert float(metrics["reward_std"]) == pytest.approx(np_std(total), rel=1e-5)
    assert float(metrics["frac_reward_zero_std"]) == pytest.approx(0.5)  # the first group has zero std
    assert float(metrics["rewards/fmt/mean"]) == pytest.approx(0.2)  # NaN ignored


def reference_grpo(loss_type, epsilon=0.2, epsilon_high=None, delta=None, beta=0.0, level="token",
                   bias_correction=True, max_len=None):
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    log_ratio = LOGPS - OLD
    if level == "sequence":
        log_ratio = ((log_ratio * MASK).sum(1) / MASK.sum(1))[:, None] * np.ones_like(MASK)
    ratio = np.exp(log_ratio)
    unclipped = ratio if delta is None else np.minimum(ratio, delta)
    per_token = -np.minimum(unclipped * ADV[:, None], np.clip(ratio, 1 - epsilon, 1 + epsilon_high) * ADV[:, None])
    if beta:
        d = REF - LOGPS
        kl = np.exp(d) - d - 1
        per_token = per_token + beta * (kl * ratio if bias_correction else kl)
    if loss_type == "grpo":
        return ((per_token * MASK).sum(1) / MASK.sum(1)).mean()
    if loss_type in ("bnpo", "dapo"):
        return (per_token * MASK).sum() / MASK.sum()
    return (per_token * MASK).sum() / (B * (max_len or T))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("options", [
    {}, {"epsilon_high": 0.28}, {"delta": 1.1}, {"beta": 0.04}, {"beta": 0.04, "use_bias_correction_kl": False},
    {"importance_sampling_level": "sequence"},
])
def test_grpo_loss_matches_formula(loss_type, options):
    reference_options = {k: v for k, v in options.items() if k not in ("importance_sampling_level",
                                                                      "use_bias_correction_kl")}
    expected = reference_grpo(loss_type, level=options.get("importance_sampling_level", "token"),
                              bias_correction=options.get("use_bias_correction_kl", True), **reference_options)
    loss, metrics = grpo_loss(LOGPS, OLD, REF, ADV, MASK, loss_type=loss_type, **options)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # TRL counts clipping on the delta-capped ratio, per token or per sequence.
    log_ratio = LOGPS - OLD
    if options.get("importance_sampling_level") == "sequence":
        log_ratio = ((log_ratio * MASK).sum(1) / MASK.sum(1))[:, None]
    capped = np.minimum(np.exp(log_ratio), options.get("delta", np.inf))
    clipped = ((capped < 0.8) & (ADV[:, None] < 0)) | ((capped > 1 + options.get("epsilon_high", 0.2)) &
                                                        (ADV[:, None] > 0))
    expected_region = clipped.mean() if clipped.shape[1] == 1 else (clipped * MASK).sum() / MASK.sum()
    assert float(metrics["clip_ratio/region_mean"]) == pytest.approx(expected_region, abs=1e-7)
    if options.get("beta"):
        d = REF - LOGPS
        kl = np.exp(d) - d - 1
        if options.get("use_bias_correction_kl", True):
            kl = kl * np.exp(LOGPS - OLD)
        assert float(metrics["kl"]) == pytest.approx((kl * MASK).sum() / MASK.sum(), rel=1e-5)


def test_clip_ratio_metrics():
    ratio = np.exp(LOGPS - OLD)
    low = (ratio < 0.8) & (ADV[:, None] < 0)
    high = (ratio > 1.2) & (ADV[:, None] > 0)
    _, metrics = grpo_loss(LOGPS, OLD, None, ADV, MASK)
    assert float(metrics["clip_ratio/low_mean"]) == pytest.approx((low * MASK).sum() / MASK.sum())
    assert float(metrics["clip_ratio/high_mean"]) == pytest.approx((high * MASK).sum() / MASK.sum())
    assert float(metrics["clip_ratio/region_mean"]) == pytest.approx(((low | high) * MASK).sum() / MASK.sum())


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_on_policy_zero_mean_advantages_give_zero_loss_but_a_gradient(loss_type):
    """Ratio 1 and group-centred advantages: the loss is 0, its gradient (the policy gradient) is not."""
    advantages = grpo_advantages(RNG.rand(B), num_generations=G)
    full = np.ones((B, T))
    loss, grad = jax.value_and_grad(lambda x: grpo_loss(x, None, None, advantages, full, loss_type=loss_type)[0])(
        jnp.asarray(LOGPS))
    assert abs(float(loss)) < 1e-6
    assert float(jnp.abs(grad).max()) > 1e-2
    # d loss / d logp_it = -A_i / normaliser for on-policy tokens
    scale = {"grpo": B * T, "bnpo": B * T, "dapo": B * T, "dr_grpo": B * T}[loss_type]
    np.testing.assert_allclose(grad, -np.repeat(np.asarray(advantages)[:, None], T, 1) / scale, rtol=1e-5)


def test_micro_batch_normalisers_add_up_to_the_big_batch():
    entropies = RNG.uniform(0.0, 2.0, (B, T))
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"):
        options = dict(loss_type=loss_type, entropies=entropies, entropy_coef=0.1)
        big, _ = grpo_loss(LOGPS, OLD, None, ADV, MASK, **options)
        parts = [grpo_loss(LOGPS[s], OLD[s], None, ADV[s], MASK[s], num_tokens=MASK.sum(), num_sequences=B,
                           max_completion_length=T, num_entropy_tokens=MASK.sum(),
                           **{**options, "entropies": entropies[s]})[0] for s in (slice(0, 2), slice(2, 6))]
        assert float(sum(parts)) == pytest.approx(float(big), rel=1e-5), loss_type


def test_normalize_then_sum_advantages_gdpo():
    """GDPO: each reward function normalised within its group, the weighted sum standardised over the batch; a
    completion no function scored gets 0 and is left out of the batch statistics."""
    rewards = RNG.randn(B, 2)
    rewards[1, 0] = np.nan  # one function returned None
    rewards[4] = np.nan  # unscorable
    weights = np.array([1.0, 0.5])
    with jax.enable_x64(True):
        advantages = np.asarray(grpo_advantages(rewards, num_generations=G, reward_weights=weights,
                                                multi_objective_aggregation="normalize_then_sum"))
    grouped = rewards.reshape(-1, G, 2)
    normalized = (grouped - np.nanmean(grouped, 1, keepdims=True)) / (np.nanstd(grouped, 1, ddof=1, keepdims=True)
                                                                      + 1e-4)
    summed = np.nansum(normalized.reshape(B, 2) * weights, axis=1)
    summed[4] = np.nan
    expected = np.nan_to_num((summed - np.nanmean(summed)) / (np.nanstd(summed, ddof=1) + 1e-4))
    np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-6)
    assert advantages[4] == 0 and np.abs(advantages).min() < np.abs(advantages).max()
    with pytest.raises(ValueError, match="multi_objective_aggregation='sum'"):
        grpo_advantages(rewards, num_generations=G, multi_objective_aggregation="sum")


def test_high_entropy_mask_keeps_the_top_quantile():
    entropies = np.arange(B * T, dtype=np.float64).reshape(B, T)
    kept = np.asarray(high_entropy_mask(entropies, MASK, 0.2))
    valid = entropies[MASK.astype(bool)]
    threshold = np.quantile(valid, 0.8)
    np.testing.assert_array_equal(kept, (entropies >= threshold) & MASK.astype(bool))


def test_unknown_loss_type_and_missing_reference():
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        grpo_loss(LOGPS, None, None, ADV, MASK, loss_type="ppo")
    with pytest.raises(ValueError, match="beta != 0 needs ref_logps"):
        grpo_loss(LOGPS, None, None, ADV, MASK, beta=0.1)


def test_rloo_advantages_leave_one_out_with_kl_penalty():
    rewards = np.array([1.0, 0.0, 2.0, np.nan, 1.0, 3.0])
    kl = np.array([0.5, -0.2, 0.1, 0.3, 0.0, 1.0])
    penalised = rewards - 0.1 * kl
    expected = np.zeros(6)
    for group in (range(0, 3), range(3, 6)):
        for i in group:
            others = [penalised[j] for j in group if j != i and not np.isnan(penalised[j])]
            expected[i] = 0.0 if np.isnan(penalised[i]) else penalised[i] - np.mean(others)
    advantages = rloo_advantages(rewards, num_generations=3, sequence_kl=kl, beta=0.1)
    np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-6)
    normalised = rloo_advantages(rewards, num_generations=3, normalize_advantages=True)
    raw = np.asarray(rloo_advantages(rewards, num_generations=3))
    scored = raw[[0, 1, 2, 4, 5]]
    np.testing.assert_allclose(np.asarray(normalised)[[0, 1, 2, 4, 5]],
                               (scored - scored.mean()) / (np_std(scored) + 1e-4), rtol=1e-5)


def test_rloo_loss_clips_the_sequence_ratio():
    ratio = np.exp((LOGPS * MASK).sum(1) - (OLD * MASK).sum(1))
    expected = np.mean(-np.minimum(ratio * ADV, np.clip(ratio, 0.8, 1.28) * ADV))
    loss, metrics = rloo_loss(LOGPS, OLD, ADV, MASK, epsilon=0.2, epsilon_high=0.28)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    high = (ratio > 1.28) & (ADV > 0)
    assert float(metrics["clip_ratio/high_mean"]) == pytest.approx(high.mean())
    grad = jax.grad(lambda x: rloo_loss(x, None, jnp.asarray(ADV), MASK)[0])(jnp.asarray(LOGPS))
    np.testing.assert_allclose(grad, -ADV[:, None] * MASK / B, rtol=1e-5, atol=1e-7)
