"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, arXiv:2402.14740; TRL's `RLOOTrainer`).

Completions are grouped contiguously, `num_generations` per prompt. The KL to the reference model is a reward
penalty, summed over the sequence with the first-order estimator `old_logp - ref_logp`:

    r_i' = r_i - beta * sum_t (old_logp_it - ref_logp_it)
    A_i  = r_i' - mean_{j != i in the group} r_j'          (NaN rewards, i.e. unscorable, are left out)

optionally normalised over the batch (`normalize_advantages`). The loss clips the *sequence* ratio:

    w_i = exp(sum_t logp_it - sum_t old_logp_it)
    L   = mean_i -min(w_i A_i, clip(w_i, 1 - epsilon, 1 + epsilon_high) A_i)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpt.losses.metrics import MetricPairs, mean_metrics, sum_and_count
from jaxpt.losses.sampled_rewards import combine_rewards, nanstd


def rloo_advantages(
    rewards: jax.Array,
    *,
    num_generations: int,
    sequence_kl: jax.Array | None = None,
    beta: float = 0.0,
    reward_weights: jax.Array | None = None,
    reward_clip_range: tuple[float, float] | None = None,
    normalize_advantages: bool = False,
) -> jax.Array:
    """Leave-one-out advantages `[n]` from rewards `[n]` or `[n, num_functions]` (NaN = None).

    `sequence_kl` `[n]` is `sum_t (old_logp - ref_logp)` over each completion; the penalty is `beta * kl`."""
    if num_generations < 2:
        raise ValueError("RLOO needs num_generations >= 2 (the baseline leaves one completion out).")
    rewards = penalized_rewards(rewards, sequence_kl=sequence_kl, beta=beta, reward_weights=reward_weights,
                                reward_clip_range=reward_clip_range)
    grouped = rewards.reshape(-1, num_generations)
    scored = jnp.sum(~jnp.isnan(grouped), axis=1, keepdims=True)
    baselines = (jnp.nansum(grouped, axis=1, keepdims=True) - grouped) / (scored - 1)
    advantages = rewards - baselines.reshape(-1)
    if normalize_advantages:
        advantages = (advantages - jnp.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return jnp.nan_to_num(advantages, nan=0.0)


def penalized_rewards(
    rewards: jax.Array,
    *,
    sequence_kl: jax.Array | None = None,
    beta: float = 0.0,
    reward_weights: jax.Array | None = None,
    reward_clip_range: tuple[float, float] | None = None,
) -> jax.Array:
    """The `[n]` rewards the leave-one-out baseline compares: the weighted sum of the functions (NaN where none
    scored), clipped to `reward_clip_range`, minus `beta * sequence_kl`."""
    rewards = combine_rewards(rewards, reward_weights)
    if reward_clip_range is not None:
        rewards = jnp.clip(rewards, reward_clip_range[0], reward_clip_range[1])
    if beta != 0.0:
        if sequence_kl is None:
            raise ValueError("beta != 0 needs sequence_kl (sum of old - reference log-probs per completion).")
        rewards = rewards - beta * sequence_kl
    return rewards


def rloo_loss(
    logps: jax.Array,
    old_logps: jax.Array | None,
    advantages: jax.Array,
    completion_mask: jax.Array,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    num_sequences: jax.Array | float | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array] | MetricPairs]:
    """RLOO loss from per-token log-probs `[batch, completion_length]`; `old_logps` None means on-policy.
    Metrics: `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean` (fractions of sequences; with
    `return_counts`, `(sum, count)` pairs)."""
    mask = completion_mask.astype(jnp.float32)
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    sequence_logps = jnp.sum(logps * mask, axis=-1)
    old = jax.lax.stop_gradient(sequence_logps) if old_logps is None else jnp.sum(old_logps * mask, axis=-1)
    ratio = jnp.exp(sequence_logps - old)
    clipped = jnp.clip(ratio, 1 - epsilon, 1 + epsilon_high)
    per_sequence = -jnp.minimum(ratio * advantages, clipped * advantages)
    sequences = per_sequence.shape[0] if num_sequences is None else jnp.asarray(num_sequences, jnp.float32)
    loss = jnp.sum(per_sequence) / sequences
    low = ((ratio < 1 - epsilon) & (advantages < 0)).astype(jnp.float32)
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).astype(jnp.float32)
    metrics = {"clip_ratio/low_mean": sum_and_count(low), "clip_ratio/high_mean": sum_and_count(high),
               "clip_ratio/region_mean": sum_and_count(jnp.maximum(low, high))}
    return loss, metrics if return_counts else mean_metrics(metrics)
