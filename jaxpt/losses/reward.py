"""Reward-model loss: the Bradley–Terry pairwise loss, with an optional margin and reward centering.

    L = -(1/B) sum_i log σ(r_c,i - r_r,i - m_i)  +  λ (1/B) sum_i (r_c,i + r_r,i)²

`r_c`, `r_r` are the scalar rewards of the chosen and rejected sequence of each of the `B` pairs; `m_i` an
optional per-pair margin (0 without one; Llama 2, Touvron et al. 2023, arXiv:2307.09288); the pairwise loss is
the one of InstructGPT (Ouyang et al. 2022, arXiv:2203.02155). The second term, with `λ` =
`center_rewards_coefficient`, pulls the rewards towards mean zero (Eisenstein et al. 2023, "Helping or Herding?",
arXiv:2312.09244, Eq. 2); it is absent when the coefficient is None.

Metrics (TRL's `RewardTrainer` names): `accuracy` (fraction of pairs with r_c > r_r strictly: a tie counts as
wrong), `margin` (mean of r_c - r_r, without the margin column), and `min_reward`, `mean_reward`, `max_reward`
over all 2B rewards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reward_loss(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    *,
    margin: jax.Array | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Bradley–Terry loss (mean over pairs) from rewards `[batch]` of the chosen and rejected sequences, and an
    optional `margin` `[batch]` the chosen reward must exceed the rejected one by."""
    chosen = chosen_rewards.astype(jnp.float32)
    rejected = rejected_rewards.astype(jnp.float32)
    difference = chosen - rejected  # [batch]
    shifted = difference if margin is None else difference - jnp.asarray(margin, jnp.float32)
    loss = -jnp.mean(jax.nn.log_sigmoid(shifted))
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * jnp.mean((chosen + rejected) ** 2)

    difference = jax.lax.stop_gradient(difference)
    rewards = jax.lax.stop_gradient(jnp.concatenate([chosen, rejected]))  # [2 * batch]
    metrics = {
        "accuracy": jnp.mean((difference > 0).astype(jnp.float32)),
        "margin": jnp.mean(difference),
        "min_reward": jnp.min(rewards),
        "mean_reward": jnp.mean(rewards),
        "max_reward": jnp.max(rewards),
    }
    return loss, metrics
