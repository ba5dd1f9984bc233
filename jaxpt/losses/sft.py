"""Supervised fine-tuning losses: negative log-likelihood and DFT.

    nll:  L = -(1/N) sum_t m_t log p(y_t)
    dft:  L = -(1/N) sum_t m_t sg(p(y_t)) log p(y_t)     (Dynamic Fine-Tuning, Wu et al. 2025, arXiv:2508.05629)

`m_t` is the loss mask over target tokens and `N` the number of loss tokens: by default the tokens of this
batch; pass `num_tokens` to normalise by the tokens of the whole accumulated batch (what TRL does with
`num_items_in_batch`), so that accumulated micro-batch losses sum to the big-batch loss.

Metrics (TRL's names): `entropy` (mean entropy of the predictive distribution over loss tokens) and
`mean_token_accuracy` (fraction of loss tokens whose target is the argmax); with `return_counts=True`, each as a
`(sum, count)` pair over the loss tokens (`jaxpt.losses.metrics`), which add up over micro-batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpt.losses.logprobs import entropy_from_logits, token_logps, weighted_nll_from_hidden
from jaxpt.losses.metrics import MetricPairs, mean_metrics, sum_and_count

SFT_LOSS_TYPES = ("nll", "dft")


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in SFT_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not an SFT loss; use one of {SFT_LOSS_TYPES}.")


def sft_loss(
    logits: jax.Array,
    target_ids: jax.Array,
    loss_mask: jax.Array,
    *,
    loss_type: str = "nll",
    num_tokens: jax.Array | float | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array] | MetricPairs]:
    """SFT loss from logits `[batch, seq, vocab]`, targets `[batch, seq]` (aligned with the logits: see
    `logprobs.next_token_targets`) and a loss mask `[batch, seq]`."""
    _check_loss_type(loss_type)
    mask = loss_mask.astype(jnp.float32)
    count = jnp.sum(mask)
    denominator = jnp.maximum(count if num_tokens is None else jnp.asarray(num_tokens, jnp.float32), 1.0)
    logps = token_logps(logits, target_ids)
    per_token = -logps
    if loss_type == "dft":
        per_token = per_token * jax.lax.stop_gradient(jnp.exp(logps))
    loss = jnp.sum(per_token * mask) / denominator
    is_argmax = (jnp.argmax(logits, axis=-1) == target_ids).astype(jnp.float32)
    metrics = {"entropy": sum_and_count(jax.lax.stop_gradient(entropy_from_logits(logits)), mask),
               "mean_token_accuracy": sum_and_count(is_argmax, mask)}
    return loss, metrics if return_counts else mean_metrics(metrics)


def sft_loss_from_hidden(
    hidden_states: jax.Array,
    lm_head_weight: jax.Array,
    target_ids: jax.Array,
    loss_mask: jax.Array,
    *,
    loss_type: str = "nll",
    num_tokens: jax.Array | float | None = None,
    logit_softcap: float | None = None,
    chunk_size: int = 1024,
    return_counts: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array] | MetricPairs]:
    """The same loss and metrics from final hidden states `[batch, seq, hidden]` and the output projection
    `[vocab, hidden]`, chunked: never materialises `[batch, seq, vocab]` logits, and computes the gradient in
    the forward pass (`logprobs.weighted_nll_from_hidden`). What `jaxpt.sft`'s train step uses."""
    _check_loss_type(loss_type)
    mask = loss_mask.astype(jnp.float32)
    count = jnp.sum(mask)
    denominator = jnp.maximum(count if num_tokens is None else jnp.asarray(num_tokens, jnp.float32), 1.0)
    loss, per_token = weighted_nll_from_hidden(
        hidden_states, lm_head_weight, target_ids, mask / denominator, chunk_size=chunk_size,
        logit_softcap=logit_softcap, prob_weighted=loss_type == "dft", with_metrics=True,
    )
    metrics = {"entropy": sum_and_count(per_token["entropy"], mask),
               "mean_token_accuracy": sum_and_count(per_token["is_argmax"], mask)}
    return loss, metrics if return_counts else mean_metrics(metrics)
