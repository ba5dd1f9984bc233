"""GRPO: group-relative advantages and the clipped policy-gradient losses (TRL's `GRPOTrainer` semantics).

Advantages (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300). Completions are grouped contiguously,
`num_generations` per prompt. With rewards `r` (a weighted sum over reward functions; `NaN` = a function that
returned None, ignored by the sums; a completion no function scored is "unscorable"):

    A_i = (r_i - mean_group(r)) / (std(r) + 1e-4)

`std` is the unbiased (n-1) standard deviation of the group (`scale_rewards="group"`), of the whole batch
(`"batch"`), or no scaling at all (`"none"`, Dr. GRPO). Unscorable completions get advantage 0.

Loss, per token t of completion i, with the importance ratio `w = exp(logp - old_logp)` (token level) or the
exponentiated mean log-ratio of the sequence (`importance_sampling_level="sequence"`, GSPO, Zheng et al. 2025):

    l_it = -min(w A_i, clip(w, 1 - epsilon, 1 + epsilon_high) A_i) + beta * KL_it
    KL_it = exp(ref - logp) - (ref - logp) - 1          (k3 estimator, Schulman 2020; times w when
                                                          use_bias_correction_kl, as TRL)

`delta` caps `w` from above on the unclipped side (two-sided clipping, Magistral/INTELLECT-2). Optional
`importance_sampling_weights` multiply the policy term (not the KL), correcting for a sampler whose log-probs differ
from the trainer's (`jaxpt/losses/sampler_mismatch.py`, TRL's `vllm_importance_sampling_correction`). The per-token
losses are reduced according to `loss_type`:

    grpo     mean over sequences of (sum over tokens / sequence length)
    bnpo     sum over all tokens / number of tokens                          (Yu et al. 2025 / TRL)
    dr_grpo  sum over all tokens / (number of sequences * max_completion_length)   (Liu et al. 2025)
    dapo     sum over all tokens / number of tokens of the whole accumulated batch (DAPO, Yu et al. 2025)

`num_tokens` / `num_sequences` pass the counts of the whole accumulated batch, so micro-batch losses add up
to the big-batch loss. (TRL normalises `grpo`, `bnpo` and `dr_grpo` per micro-batch and divides by the
accumulation steps, which differs when micro-batches hold different token counts; jaxpt always uses the
whole batch.)

Newer loss types (TRL 1.16's names and defaults), each a different policy term with the same KL term:

    cispo  -sg(min(w, epsilon_high)) A_i logp_it: the ratio clipped from above only, as a detached weight of the
           REINFORCE term, so clipped tokens still get a gradient (CISPO, MiniMax-M1, arXiv:2506.13585;
           `epsilon_high` is then an absolute cap, 5.0 in ScaleRL, arXiv:2510.13786). Reduced like dapo.
    sapo   -(4 / tau) sigmoid(tau (w - 1)) A_i: a smooth gate in place of the hard clip, tau = sapo_temperature_pos
           when A_i > 0 else sapo_temperature_neg (SAPO, Gao et al. 2025, arXiv:2511.20347). Reduced like grpo.
    luspo  the clipped objective, each sequence's loss summed over its tokens (scaled by its length), mean over
           sequences (LUSPO, arXiv:2602.05261; meant with importance_sampling_level="sequence", GSPO).
    vespo  -sg(phi(W_i)) A_i logp_it with W_i = exp(sum_t log w_it) the sequence ratio (times the sampler
           correction ratios when given) and phi(W) = exp(lambda) W^k exp(-lambda W), a Gamma-shaped weight that
           is 1 at W = 1 (k, lambda = vespo_k_pos/vespo_lambda_pos when A_i >= 0, else the _neg pair; VESPO,
           arXiv:2602.10693). Reduced like dapo.

`off_policy_mask_threshold` delta drops the sequences with A_i < 0 whose mean log-ratio sampler/current,
mean_t(sampler_logp - logp), exceeds delta (off-policy sequence masking, DeepSeek-V3.2, arXiv:2512.02556, eq. 9).
`entropy_coef` c subtracts c * H from the loss, H the mean per-token entropy over the policy term's tokens
(an exploration bonus, the same for every loss type; Skywork-OR1, arXiv:2505.22312).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxpt.losses.metrics import MetricPairs, mean_metrics, sum_and_count
from jaxpt.losses.sampled_rewards import combine_rewards, nanstd
from jaxpt.losses.sampled_rewards import reward_metrics as reward_metrics  # its former home: keep importable

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # the PPO-style clip; they log clip_ratio/*
SCALE_REWARDS = ("group", "batch", "none")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def grpo_advantages(
    rewards: jax.Array,
    *,
    num_generations: int,
    scale_rewards: str = "group",
    reward_weights: jax.Array | None = None,
    multi_objective_aggregation: str = "sum_then_normalize",
) -> jax.Array:
    """Group-relative advantages `[n]` (see the module docstring); `rewards` `[n]` or `[n, num_functions]`.

    `multi_objective_aggregation="normalize_then_sum"` (GDPO, arXiv:2601.05242) first normalises each reward
    function within its group, `(r_k - mean_group(r_k)) / (std_group(r_k) + 1e-4)`, sums those with the weights, and
    standardises the sum over the whole batch, `(s - mean(s)) / (std(s) + 1e-4)` (`scale_rewards` is then unused,
    as TRL); the default sums the weighted rewards first and normalises per `scale_rewards`."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}; use one of {SCALE_REWARDS}.")
    if multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
        raise ValueError(f"multi_objective_aggregation={multi_objective_aggregation!r}; use one of "
                         f"{MULTI_OBJECTIVE_AGGREGATIONS}.")
    if jnp.shape(rewards)[0] % num_generations:
        raise ValueError(f"{jnp.shape(rewards)[0]} rewards do not split into groups of "
                         f"num_generations={num_generations}.")
    if multi_objective_aggregation == "normalize_then_sum":
        summed = normalized_reward_sum(rewards, num_generations=num_generations, reward_weights=reward_weights)
        return jnp.nan_to_num((summed - jnp.nanmean(summed)) / (nanstd(summed) + 1e-4), nan=0.0)
    rewards = combine_rewards(rewards, reward_weights)
    grouped = rewards.reshape(-1, num_generations)
    mean = jnp.repeat(jnp.nanmean(grouped, axis=1), num_generations)
    advantages = rewards - mean
    if scale_rewards == "group":
        advantages = advantages / (jnp.repeat(nanstd(grouped, axis=1), num_generations) + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (nanstd(rewards) + 1e-4)
    return jnp.nan_to_num(advantages, nan=0.0)


def normalized_reward_sum(rewards: jax.Array, *, num_generations: int,
                          reward_weights: jax.Array | None = None) -> jax.Array:
    """GDPO's aggregated reward `[n]`: each function's rewards normalised within the group, then the weighted sum
    (NaN where no function scored the completion)."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim == 1:
        rewards = rewards[:, None]
    grouped = rewards.reshape(-1, num_generations, rewards.shape[1])  # [groups, num_generations, functions]
    normalized = (grouped - jnp.nanmean(grouped, axis=1, keepdims=True)) / (
        nanstd(grouped, axis=1, keepdims=True) + 1e-4)
    weights = jnp.ones(rewards.shape[1]) if reward_weights is None else jnp.asarray(reward_weights, jnp.float32)
    total = jnp.nansum(normalized.reshape(rewards.shape) * weights[None, :], axis=1)
    # unscorable: no function scored it (a function's group with one score normalises to NaN and adds 0, as TRL)
    return jnp.where(jnp.all(jnp.isnan(rewards), axis=1), jnp.nan, total)


def high_entropy_mask(entropies: jax.Array, completion_mask: jax.Array, top_quantile: float) -> jax.Array:
    """1 on the completion tokens whose entropy is in the top `top_quantile` fraction (TRL's
    `top_entropy_quantile`, Wang et al. 2025 "80/20"): entropy >= the (1 - top_quantile) quantile."""
    valid = completion_mask.astype(bool)
    threshold = jnp.nanquantile(jnp.where(valid, entropies, jnp.nan), 1.0 - top_quantile)
    return ((entropies >= threshold) & valid).astype(jnp.float32)


def off_policy_sequence_mask(advantages: jax.Array, logps: jax.Array, sampler_logps: jax.Array,
                             completion_mask: jax.Array, threshold: float) -> jax.Array:
    """`[batch, 1]`: 0 for the sequences to drop, those with a negative advantage whose mean per-token
    `sampler_logp - logp` (a KL estimate of how far the policy moved off the sampling one) exceeds `threshold`
    (DeepSeek-V3.2's off-policy sequence masking, arXiv:2512.02556 eq. 9; TRL's `off_policy_mask_threshold`).
    Tokens the sampler could not score (NaN) count as no evidence."""
    mask = completion_mask.astype(jnp.float32)
    kl = jnp.nan_to_num(sampler_logps - jax.lax.stop_gradient(logps), nan=0.0)
    mean_kl = jnp.sum(kl * mask, axis=-1, keepdims=True) / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)
    return ((advantages[:, None] >= 0) | (mean_kl <= threshold)).astype(jnp.float32)


def vespo_weights(advantages: jax.Array, log_ratio: jax.Array, completion_mask: jax.Array, *,
                  importance_sampling_weights: jax.Array | None = None, k_pos: float = 2.0, lambda_pos: float = 3.0,
                  k_neg: float = 3.0, lambda_neg: float = 2.0) -> jax.Array:
    """VESPO's Gamma weights `[batch, 1]`, detached: `phi(W) = exp(lambda + k log W - lambda W)` with `log W` the
    sum over the completion of the per-token log-ratios (each clamped to [-20, 20]), plus the log of the sampler
    correction ratios when given, clamped to [log 1e-8, 20] (as the paper's code)."""
    floor = math.log(1e-8)
    mask = completion_mask.astype(log_ratio.dtype)
    log_w = jnp.sum(jnp.clip(log_ratio, -20.0, 20.0) * mask, axis=-1, keepdims=True)
    if importance_sampling_weights is not None:  # token weights; 1 (log 0) outside the completion
        log_w = log_w + jnp.sum(jnp.clip(jnp.log(importance_sampling_weights), floor, 20.0), axis=-1, keepdims=True)
    log_w = jnp.clip(log_w, floor, 20.0)
    nonnegative = advantages[:, None] >= 0
    k = jnp.where(nonnegative, k_pos, k_neg)
    lam = jnp.maximum(jnp.where(nonnegative, lambda_pos, lambda_neg), 1e-4)
    phi = jnp.exp(lam + k * log_w - lam * jnp.exp(log_w))
    return jax.lax.stop_gradient(jnp.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0))


def grpo_loss(
    logps: jax.Array,
    old_logps: jax.Array | None,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    completion_mask: jax.Array,
    *,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    use_bias_correction_kl: bool = True,
    entropy_mask: jax.Array | None = None,
    importance_sampling_weights: jax.Array | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    off_policy_mask_threshold: float | None = None,
    sampler_logps: jax.Array | None = None,
    entropies: jax.Array | None = None,
    entropy_coef: float | jax.Array = 0.0,
    num_tokens: jax.Array | float | None = None,
    num_sequences: jax.Array | float | None = None,
    num_entropy_tokens: jax.Array | float | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array] | MetricPairs]:
    """GRPO loss from per-token log-probs `[batch, completion_length]` (see the module docstring).

    `old_logps` None means on-policy (`stop_gradient(logps)`, ratio 1); `ref_logps` is needed when
    `beta != 0`. `advantages` `[batch]`. `entropy_mask` (from `high_entropy_mask`) keeps only those tokens in
    the policy term. `importance_sampling_weights` (`[batch, length]` or `[batch, 1]`, from
    `jaxpt.losses.sampler_mismatch.sampler_importance_weights`) multiply the policy term, correcting for a
    sampler whose distribution differs from the trainer's (TRL's `vllm_importance_sampling_correction`); under
    `vespo` they enter the sequence weight instead (token weights only). `off_policy_mask_threshold` masks
    sequences by their KL from `sampler_logps` (default: `old_logps`). `entropies` `[batch, length]`
    (differentiable: `chunked_token_logps(..., entropy_gradient=True)`) with `entropy_coef != 0` subtract
    `entropy_coef` times their mean over the policy term's tokens (`num_entropy_tokens` of the whole batch).
    Metrics: `kl` (when beta != 0); `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean` (the
    clipped types), `cispo_clip_ratio` or `vespo/phi_seq_mean`: means over the completion tokens (over the sequences
    for per-sequence values); with an entropy bonus `policy_loss` (the loss without it) and `entropy_coef`; with
    `return_counts` `(sum, count)` pairs.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not a GRPO loss; use one of {GRPO_LOSS_TYPES}.")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r}; use one of "
                         f"{IMPORTANCE_SAMPLING_LEVELS}.")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps (the reference model's per-token log-probs).")
    entropy_bonus = not (isinstance(entropy_coef, (int, float)) and entropy_coef == 0.0)
    if entropy_bonus and entropies is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropies (the per-token entropies, differentiable).")
    if (loss_type == "vespo" and importance_sampling_weights is not None
            and importance_sampling_weights.shape[-1] != logps.shape[-1]):
        raise ValueError("loss_type='vespo' takes per-token importance_sampling_weights (a token_* sampler "
                         "importance-sampling mode), not one weight per sequence.")
    mask = completion_mask.astype(jnp.float32)
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if old_logps is None:
        old_logps = jax.lax.stop_gradient(logps)
    advantages = advantages[:, None]

    token_log_ratio = logps - old_logps
    log_ratio = token_log_ratio
    if importance_sampling_level == "sequence":
        log_ratio = (jnp.sum(log_ratio * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0))[:, None]
    ratio = jnp.exp(log_ratio)  # [batch, length] or [batch, 1]
    metrics = {}
    if importance_sampling_level == "sequence":  # one value per sequence, as TRL averages them
        sequence_mask = (jnp.sum(mask, axis=-1, keepdims=True) > 0).astype(jnp.float32)
    else:
        sequence_mask = mask
    if loss_type in CLIPPED_LOSS_TYPES:
        clipped = jnp.clip(ratio, 1 - epsilon, 1 + epsilon_high)
        unclipped = ratio if delta is None else jnp.minimum(ratio, delta)
        per_token = -jnp.minimum(unclipped * advantages, clipped * advantages)
        # Counted on the delta-capped ratio, as TRL (with delta <= 1 + epsilon_high nothing counts as high-clipped).
        low = ((unclipped < 1 - epsilon) & (advantages < 0)).astype(jnp.float32)
        high = ((unclipped > 1 + epsilon_high) & (advantages > 0)).astype(jnp.float32)
        metrics["clip_ratio/low_mean"] = sum_and_count(low, sequence_mask)
        metrics["clip_ratio/high_mean"] = sum_and_count(high, sequence_mask)
        metrics["clip_ratio/region_mean"] = sum_and_count(jnp.maximum(low, high), sequence_mask)
    elif loss_type == "cispo":
        per_token = -jax.lax.stop_gradient(jnp.minimum(ratio, epsilon_high)) * advantages * logps
        capped = ((ratio > epsilon_high) & (advantages > 0)).astype(jnp.float32)
        metrics["cispo_clip_ratio"] = sum_and_count(jax.lax.stop_gradient(capped), sequence_mask)
    elif loss_type == "sapo":
        temperature = jnp.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token = -jax.nn.sigmoid(temperature * (ratio - 1)) * 4 / temperature * advantages
    else:  # vespo
        phi = vespo_weights(advantages[:, 0], token_log_ratio, mask,
                            importance_sampling_weights=importance_sampling_weights, k_pos=vespo_k_pos,
                            lambda_pos=vespo_lambda_pos, k_neg=vespo_k_neg, lambda_neg=vespo_lambda_neg)
        per_token = -phi * advantages * logps
        metrics["vespo/phi_seq_mean"] = sum_and_count(phi, (jnp.sum(mask, axis=-1, keepdims=True) > 0))
    if off_policy_mask_threshold is not None:
        behaviour = old_logps if sampler_logps is None else sampler_logps
        per_token = per_token * off_policy_sequence_mask(advantages[:, 0], logps, behaviour, mask,
                                                         off_policy_mask_threshold)
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    if importance_sampling_weights is not None and loss_type != "vespo":
        per_token = per_token * jax.lax.stop_gradient(importance_sampling_weights)
    if beta != 0.0:
        ref_minus_logp = ref_logps - logps
        kl = jnp.exp(ref_minus_logp) - ref_minus_logp - 1
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl
        metrics["kl"] = sum_and_count(jax.lax.stop_gradient(kl), mask)
    per_token = per_token * jnp.ones_like(mask)  # sequence-level ratios broadcast over tokens

    tokens = jnp.sum(mask) if num_tokens is None else jnp.asarray(num_tokens, jnp.float32)
    sequences = mask.shape[0] if num_sequences is None else jnp.asarray(num_sequences, jnp.float32)
    if loss_type in ("grpo", "sapo"):
        per_sequence = jnp.sum(per_token * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
        loss = jnp.sum(per_sequence) / sequences
    elif loss_type in ("bnpo", "dapo", "cispo", "vespo"):
        loss = jnp.sum(per_token * mask) / jnp.maximum(tokens, 1.0)
    elif loss_type == "luspo":
        loss = jnp.sum(per_token * mask) / sequences
    else:  # dr_grpo
        length = max_completion_length or mask.shape[1]
        loss = jnp.sum(per_token * mask) / (sequences * length)

    if entropy_bonus:
        bonus_mask = mask if entropy_mask is None else mask * entropy_mask
        bonus_tokens = jnp.sum(bonus_mask) if num_entropy_tokens is None else jnp.asarray(num_entropy_tokens)
        mean_entropy = jnp.sum(entropies * bonus_mask) / jnp.maximum(bonus_tokens, 1.0)
        metrics["policy_loss"] = (jax.lax.stop_gradient(loss), jnp.float32(1.0))
        metrics["entropy_coef"] = (jnp.asarray(entropy_coef, jnp.float32), jnp.float32(1.0))
        loss = loss - entropy_coef * mean_entropy
    return loss, metrics if return_counts else mean_metrics(metrics)
