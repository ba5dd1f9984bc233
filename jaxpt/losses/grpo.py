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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpt.losses.metrics import MetricPairs, mean_metrics, sum_and_count
from jaxpt.losses.sampled_rewards import combine_rewards, nanstd
from jaxpt.losses.sampled_rewards import reward_metrics as reward_metrics  # its former home: keep importable

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def grpo_advantages(
    rewards: jax.Array,
    *,
    num_generations: int,
    scale_rewards: str = "group",
    reward_weights: jax.Array | None = None,
) -> jax.Array:
    """Group-relative advantages `[n]` (see the module docstring); `rewards` `[n]` or `[n, num_functions]`."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}; use one of {SCALE_REWARDS}.")
    rewards = combine_rewards(rewards, reward_weights)
    if rewards.shape[0] % num_generations:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of num_generations={num_generations}.")
    grouped = rewards.reshape(-1, num_generations)
    mean = jnp.repeat(jnp.nanmean(grouped, axis=1), num_generations)
    advantages = rewards - mean
    if scale_rewards == "group":
        advantages = advantages / (jnp.repeat(nanstd(grouped, axis=1), num_generations) + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (nanstd(rewards) + 1e-4)
    return jnp.nan_to_num(advantages, nan=0.0)


def high_entropy_mask(entropies: jax.Array, completion_mask: jax.Array, top_quantile: float) -> jax.Array:
    """1 on the completion tokens whose entropy is in the top `top_quantile` fraction (TRL's
    `top_entropy_quantile`, Wang et al. 2025 "80/20"): entropy >= the (1 - top_quantile) quantile."""
    valid = completion_mask.astype(bool)
    threshold = jnp.nanquantile(jnp.where(valid, entropies, jnp.nan), 1.0 - top_quantile)
    return ((entropies >= threshold) & valid).astype(jnp.float32)


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
    num_tokens: jax.Array | float | None = None,
    num_sequences: jax.Array | float | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array] | MetricPairs]:
    """GRPO loss from per-token log-probs `[batch, completion_length]` (see the module docstring).

    `old_logps` None means on-policy (`stop_gradient(logps)`, ratio 1); `ref_logps` is needed when
    `beta != 0`. `advantages` `[batch]`. `entropy_mask` (from `high_entropy_mask`) keeps only those tokens in
    the policy term. `importance_sampling_weights` (`[batch, length]` or `[batch, 1]`, from
    `jaxpt.losses.sampler_mismatch.sampler_importance_weights`) multiply the policy term, correcting for a
    sampler whose distribution differs from the trainer's (TRL's `vllm_importance_sampling_correction`).
    Metrics: `kl` (when beta != 0), `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean`:
    means over the completion tokens (the clip ratios over the sequences with `importance_sampling_level=
    "sequence"`), or with `return_counts` `(sum, count)` pairs.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not a GRPO loss; use one of {GRPO_LOSS_TYPES}.")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r}; use one of "
                         f"{IMPORTANCE_SAMPLING_LEVELS}.")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps (the reference model's per-token log-probs).")
    mask = completion_mask.astype(jnp.float32)
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if old_logps is None:
        old_logps = jax.lax.stop_gradient(logps)
    advantages = advantages[:, None]

    log_ratio = logps - old_logps
    if importance_sampling_level == "sequence":
        log_ratio = (jnp.sum(log_ratio * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0))[:, None]
    ratio = jnp.exp(log_ratio)  # [batch, length] or [batch, 1]
    clipped = jnp.clip(ratio, 1 - epsilon, 1 + epsilon_high)
    unclipped = ratio if delta is None else jnp.minimum(ratio, delta)
    per_token = -jnp.minimum(unclipped * advantages, clipped * advantages)
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    if importance_sampling_weights is not None:
        per_token = per_token * jax.lax.stop_gradient(importance_sampling_weights)
    metrics = {}
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
    if loss_type == "grpo":
        per_sequence = jnp.sum(per_token * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
        loss = jnp.sum(per_sequence) / sequences
    elif loss_type in ("bnpo", "dapo"):
        loss = jnp.sum(per_token * mask) / jnp.maximum(tokens, 1.0)
    else:  # dr_grpo
        length = max_completion_length or mask.shape[1]
        loss = jnp.sum(per_token * mask) / (sequences * length)

    # Counted on the delta-capped ratio, as TRL (with delta <= 1 + epsilon_high nothing counts as high-clipped).
    low = ((unclipped < 1 - epsilon) & (advantages < 0)).astype(jnp.float32)
    high = ((unclipped > 1 + epsilon_high) & (advantages > 0)).astype(jnp.float32)
    if importance_sampling_level == "sequence":  # one value per sequence, as TRL averages them
        clip_mask = (jnp.sum(mask, axis=-1, keepdims=True) > 0).astype(jnp.float32)
    else:
        clip_mask = mask
    metrics["clip_ratio/low_mean"] = sum_and_count(low, clip_mask)
    metrics["clip_ratio/high_mean"] = sum_and_count(high, clip_mask)
    metrics["clip_ratio/region_mean"] = sum_and_count(jnp.maximum(low, high), clip_mask)
    return loss, metrics if return_counts else mean_metrics(metrics)
