"""KTO losses: Kahneman-Tversky Optimization and unpaired APO-zero, from per-sequence log-probs.

With `r_i = log pi(y_i|x_i) - log pi_ref(y_i|x_i)` the implied reward (over completion tokens) of example `i`,
`z0` the reference point and `w_D`, `w_U` the desirable / undesirable weights:

    kto (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv:2402.01306, Eq. 7)
        desirable:    l_i = 1 - σ(β (r_i - z0))
        undesirable:  l_i = 1 - σ(β (z0 - r_i))
    apo_zero_unpaired (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", arXiv:2408.06266, Eq. 7
    unpaired): no reference point
        desirable:    l_i = 1 - σ(β r_i)
        undesirable:  l_i = σ(β r_i)

    L = (1/N) sum_i w_i l_i          w_i = w_D if desirable else w_U,  N = number of examples

`z0 = max(0, mean_j [log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)])` is the KL estimate from mismatched pairs
`(x_j, y'_j)` (the completions of the same batch paired with other prompts, see `kto_kl_estimate`); it is a
constant: clamped at 0 and under `stop_gradient`, as in the paper and TRL. `apo_zero_unpaired` ignores it.

Pass `num_examples` to normalise by the examples of a whole accumulated batch (micro-batch losses then add up to
the big-batch loss) and `example_mask` to leave padding rows out.

Metrics, TRL's names. Means over this batch: `rewards/chosen`, `rewards/rejected` (mean of `β r_i` over the
desirable / undesirable examples), `rewards/margins` (their difference), `logps/chosen`, `logps/rejected` (mean
policy log-prob), `kl` (`z0`); a mean over no examples is NaN (TRL logs nothing then). Sums that add up over
micro-batches and devices: `count/chosen`, `count/rejected`, `rewards/chosen_sum`, `rewards/rejected_sum`,
`logps/chosen_sum`, `logps/rejected_sum`; `kto_metric_means` turns summed sums into the means. With
`return_counts=True`, the metrics are `(sum, count)` pairs instead (`jaxpt.losses.metrics`): `rewards/chosen`,
`rewards/rejected`, `logps/chosen`, `logps/rejected`, counted over the desirable / undesirable examples, which is
how `jaxpt.kto`'s step adds up a whole accumulated batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpt.losses.logprobs import masked_mean
from jaxpt.losses.metrics import MetricPairs, sum_and_count

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not a KTO loss; use one of {KTO_LOSS_TYPES}.")


def kto_kl_estimate(policy_kl_logps: jax.Array, ref_kl_logps: jax.Array, *,
                    example_mask: jax.Array | None = None) -> jax.Array:
    """`z0 = max(0, mean(policy_kl_logps - ref_kl_logps))` over the (masked) mismatched pairs `[batch]`, under
    `stop_gradient`: the reference point of the KTO loss."""
    difference = policy_kl_logps.astype(jnp.float32) - ref_kl_logps.astype(jnp.float32)
    mask = jnp.ones_like(difference) if example_mask is None else example_mask
    return jax.lax.stop_gradient(jnp.maximum(masked_mean(difference, mask), 0.0))


def kto_loss(
    policy_logps: jax.Array,
    ref_logps: jax.Array,
    is_desirable: jax.Array,
    kl: jax.Array | float | None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    num_examples: jax.Array | float | None = None,
    example_mask: jax.Array | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array] | MetricPairs]:
    """KTO loss from per-sequence completion log-prob sums `[batch]` of the policy and the reference, the labels
    `is_desirable` `[batch]` (bool or 0/1) and the KL estimate `kl` (a scalar; clamped at 0 and not
    differentiated here; None or anything for `apo_zero_unpaired`). Returns `(loss, metrics)`."""
    _check_loss_type(loss_type)
    policy = policy_logps.astype(jnp.float32)
    logratios = policy - ref_logps.astype(jnp.float32)  # [batch]
    desirable = jnp.asarray(is_desirable).astype(bool)
    mask = jnp.ones_like(logratios) if example_mask is None else example_mask.astype(jnp.float32)
    if loss_type == "kto":
        if kl is None:
            raise ValueError("loss_type='kto' needs the KL estimate `kl` (see `kto_kl_estimate`); only "
                             "'apo_zero_unpaired' goes without one.")
        z0 = jax.lax.stop_gradient(jnp.maximum(jnp.asarray(kl, jnp.float32), 0.0))
        chosen_losses = 1.0 - jax.nn.sigmoid(beta * (logratios - z0))
        rejected_losses = 1.0 - jax.nn.sigmoid(beta * (z0 - logratios))
    else:  # apo_zero_unpaired: push desirable rewards up and undesirable ones down, no reference point
        z0 = jnp.zeros((), jnp.float32)
        chosen_losses = 1.0 - jax.nn.sigmoid(beta * logratios)
        rejected_losses = jax.nn.sigmoid(beta * logratios)
    losses = jnp.where(desirable, desirable_weight * chosen_losses, undesirable_weight * rejected_losses)
    denominator = jnp.sum(mask) if num_examples is None else jnp.asarray(num_examples, jnp.float32)
    loss = jnp.sum(losses * mask) / jnp.maximum(denominator, 1.0)

    rewards = jax.lax.stop_gradient(beta * logratios)
    policy = jax.lax.stop_gradient(policy)
    chosen, rejected = mask * desirable, mask * (~desirable)
    pairs = {"rewards/chosen": sum_and_count(rewards, chosen), "rewards/rejected": sum_and_count(rewards, rejected),
             "logps/chosen": sum_and_count(policy, chosen), "logps/rejected": sum_and_count(policy, rejected)}
    if return_counts:
        return loss, pairs
    sums = {"count/chosen": pairs["rewards/chosen"][1], "count/rejected": pairs["rewards/rejected"][1],
            **{f"{name}_sum": total for name, (total, _) in pairs.items()}}
    return loss, {**kto_metric_means(sums), "kl": z0, **sums}


def kto_metric_means(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """TRL's per-batch means from the sums and counts of `kto_loss` (summed over any number of micro-batches):
    `rewards/chosen`, `rewards/rejected`, `rewards/margins`, `logps/chosen`, `logps/rejected`; NaN where the
    batch has no example of that kind."""

    def mean(name, kind):
        count = sums[f"count/{kind}"]
        return jnp.where(count > 0, sums[f"{name}/{kind}_sum"] / jnp.maximum(count, 1.0), jnp.nan)

    means = {f"{name}/{kind}": mean(name, kind) for name in ("rewards", "logps") for kind in ("chosen", "rejected")}
    means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    return means
