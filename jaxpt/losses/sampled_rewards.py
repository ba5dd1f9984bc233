"""Reward arithmetic the online methods (GRPO, RLOO) share, on the rewards of sampled completions.

Completions are grouped contiguously, `num_generations` per prompt. Rewards come as `[n]` or `[n, num_functions]`
(one column per reward function, NaN where a function returned None): `combine_rewards` takes their weighted sum,
`nanstd` is TRL's NaN-ignoring unbiased standard deviation, and `reward_metrics` computes TRL's logged reward
metrics. Advantages are each method's own (`grpo_advantages`, `rloo_advantages`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nanstd(values: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
    """Unbiased standard deviation ignoring NaNs (TRL's `nanstd`)."""
    mean = jnp.nanmean(values, axis=axis, keepdims=True)
    variance = jnp.nanmean((values - mean) ** 2, axis=axis, keepdims=True)
    count = jnp.sum(~jnp.isnan(values), axis=axis, keepdims=True)
    std = jnp.sqrt(variance * count / (count - 1))
    return std if keepdims else jnp.squeeze(std, axis=axis)


def combine_rewards(rewards: jax.Array, reward_weights: jax.Array | None = None) -> jax.Array:
    """`[n]` rewards from `[n]` or `[n, num_functions]` (NaN = the function returned None): the weighted sum of
    the scored functions, NaN where no function scored the completion."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim == 1:
        return rewards
    weights = jnp.ones(rewards.shape[1]) if reward_weights is None else jnp.asarray(reward_weights, jnp.float32)
    total = jnp.nansum(rewards * weights[None, :], axis=1)
    return jnp.where(jnp.all(jnp.isnan(rewards), axis=1), jnp.nan, total)


def reward_metrics(
    rewards: jax.Array,
    *,
    num_generations: int,
    scale_rewards: str = "group",
    reward_weights: jax.Array | None = None,
    reward_names: tuple[str, ...] | None = None,
) -> dict[str, jax.Array]:
    """TRL's reward metrics: `reward`, `reward_std`, `frac_reward_zero_std` and `rewards/<name>/mean|std`.
    `frac_reward_zero_std` counts the groups whose total rewards do not vary (all of them when the batch's do
    not vary, with `scale_rewards="batch"`, as GRPO)."""
    per_function = jnp.asarray(rewards, jnp.float32)
    if per_function.ndim == 1:
        per_function = per_function[:, None]
    names = reward_names or tuple(f"reward_{i}" for i in range(per_function.shape[1]))
    total = combine_rewards(per_function, reward_weights)
    if scale_rewards == "batch":
        zero_std = jnp.isclose(nanstd(total), 0.0) * jnp.ones_like(total)
    else:
        group_std = nanstd(total.reshape(-1, num_generations), axis=1)
        zero_std = jnp.repeat(jnp.isclose(group_std, 0.0), num_generations)
    metrics = {"reward": jnp.nanmean(total), "reward_std": nanstd(total),
               "frac_reward_zero_std": jnp.mean(zero_std.astype(jnp.float32))}
    for i, name in enumerate(names):
        metrics[f"rewards/{name}/mean"] = jnp.nanmean(per_function[:, i])
        metrics[f"rewards/{name}/std"] = nanstd(per_function[:, i])
    return metrics
