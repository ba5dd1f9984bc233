"""GMPO: Geometric-Mean Policy Optimization (Zhao et al. 2025, arXiv:2507.20673): `GMPOConfig`, the pure loss
`gmpo_loss`, `make_train_step` and `train`. Experimental: no stability promise (see `jaxpt.experimental`).

GMPO is GRPO with one change, the policy objective: it maximises the *geometric* mean of the per-token importance
ratios of a completion instead of their arithmetic mean, which an outlier ratio moves far less, so the clipping
range can be much wider. Per completion i with tokens t in o_i, log-ratio `l_it = logp_it - old_logp_it`:

    c_it = clip(l_it, -epsilon, epsilon_high)                          (clipping in log space)
    l'_it = min(l_it, c_it) if A_i > 0 else max(l_it, c_it)            (PPO's pessimistic side, sign-aware)
    L_i = -exp(mean_{t in o_i} l'_it) * A_i + beta * mean_{t in o_i} KL_it
    L = mean_i L_i

with `KL_it = exp(ref - logp) - (ref - logp) - 1` (k3; GMPO has no bias correction) and the ratio range
`(exp(-epsilon), exp(epsilon_high))`, `epsilon = epsilon_high = 0.4` by default (the paper's, and TRL's
`GMPOConfig`). `top_entropy_quantile < 1` keeps only the high-entropy tokens in the geometric mean (the KL stays
on every token), as TRL. Everything else is GRPO's and comes from `jaxpt.grpo`: the config (`GMPOConfig` extends
`GRPOConfig`), the rollout (sampling, rewards, group advantages, old and reference log-probs) and the loop
(`jaxpt.grpo.train`, given GMPO's `make_train_step`);
`grpo_loss`'s own options (`loss_type`, `importance_sampling_level`, `delta`, the SAPO/VESPO parameters,
`off_policy_mask_threshold`, the entropy bonus, the sampler correction, `use_bias_correction_kl`) have no meaning
for GMPO: TRL's `GMPOTrainer` ignores them, jaxpt refuses them when set.

TRL 1.16: `trl.experimental.gmpo.GMPOTrainer` (its `_compute_loss`); same config names, defaults and metric names
(`kl`, `entropy`, `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean`; TRL's per-sequence
`clip_ratio/low_min` / `high_max` are not logged, as in `jaxpt.grpo`). Gradient accumulation normalises like one
big batch (the mean over all the step's sequences), which is TRL's for equal micro-batches.

```python
config = GMPOConfig(output_dir="out", num_generations=8, max_completion_length=64, max_steps=100)
result = jaxpt.experimental.gmpo.train(model, tokenizer, prompts_dataset, config, reward_funcs=["accuracy_reward"])
```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxpt import grpo, loop, lora
from jaxpt.losses.grpo import high_entropy_mask
from jaxpt.losses.metrics import MetricPairs, mean_metrics, sum_and_count, total_metrics
from jaxpt.losses.sampler_mismatch import combine_extremes, sampler_mismatch_metrics
from jaxpt.rollout import completion_logps
from jaxpt.train_state import TrainState, jit_step

# GRPOConfig fields that only `grpo_loss` reads: GMPO's loss has no use for them (TRL's GMPOTrainer ignores them).
GRPO_LOSS_ONLY_FIELDS = ("loss_type", "importance_sampling_level", "delta", "use_bias_correction_kl",
                         "sapo_temperature_neg", "sapo_temperature_pos", "vespo_k_pos", "vespo_lambda_pos",
                         "vespo_k_neg", "vespo_lambda_neg", "off_policy_mask_threshold", "entropy_coef",
                         "use_adaptive_entropy", "sampler_importance_sampling_correction")


@dataclass
class GMPOConfig(grpo.GRPOConfig):
    """`jaxpt.grpo.GRPOConfig` with TRL's `GMPOConfig` change: `epsilon` and `epsilon_high` are in log space (the
    ratio range is `(exp(-epsilon), exp(epsilon_high))`) and `epsilon` defaults to 0.4 (the GMPO paper's)."""

    epsilon: float = field(default=0.4, metadata={"help": "Lower clipping bound in log space: the ratio's lower "
                                                          "bound is exp(-epsilon) (GMPO recommends 0.4)."})
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clipping bound in log space (default: "
                                                                       "epsilon): the ratio's upper bound is "
                                                                       "exp(epsilon_high)."})

    def validate(self) -> None:
        super().validate()
        defaults = {f.name: f.default for f in dataclasses.fields(grpo.GRPOConfig)}
        for name in GRPO_LOSS_ONLY_FIELDS:
            if getattr(self, name) != defaults[name]:
                raise ValueError(f"{name}={getattr(self, name)!r}: GMPO's loss (the geometric mean of the clipped "
                                 f"token ratios) does not use it; leave it at its default {defaults[name]!r} (TRL's "
                                 "GMPOTrainer ignores it), or use jaxpt.grpo.")


# --------------------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------------------


def gmpo_loss(
    logps: jax.Array,
    old_logps: jax.Array | None,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    completion_mask: jax.Array,
    *,
    epsilon: float = 0.4,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    entropy_mask: jax.Array | None = None,
    num_sequences: jax.Array | float | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array] | MetricPairs]:
    """GMPO loss (see the module docstring) from per-token log-probs `[batch, completion_length]`.

    `old_logps` None: on-policy (`stop_gradient(logps)`, every ratio 1). `ref_logps`: needed when `beta != 0`.
    `advantages` `[batch]`. `entropy_mask` (`jaxpt.losses.grpo.high_entropy_mask`) keeps only those tokens in the
    geometric mean. `num_sequences`: the sequences of the whole accumulated batch (default: this batch's), so
    micro-batch losses add up. Metrics (TRL's names, means over the completion tokens): `kl` (beta != 0),
    `clip_ratio/low_mean` (log-ratio below -epsilon with A < 0), `clip_ratio/high_mean` (above epsilon_high with
    A > 0), `clip_ratio/region_mean`; `(sum, count)` pairs with `return_counts`."""
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps (the reference model's per-token log-probs).")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.astype(jnp.float32)
    if old_logps is None:
        old_logps = jax.lax.stop_gradient(logps)
    advantages_col = advantages[:, None]
    log_ratio = logps - old_logps
    clamped = jnp.clip(log_ratio, -epsilon, epsilon_high)
    clipped = jnp.where(advantages_col > 0, jnp.minimum(log_ratio, clamped), jnp.maximum(log_ratio, clamped))
    mean_mask = mask if entropy_mask is None else mask * entropy_mask
    # The geometric mean of the clipped ratios, exp(mean log-ratio); the 1/|o_i| exponent is what makes it a mean.
    log_weight = jnp.sum(clipped * mean_mask, axis=-1) / jnp.maximum(jnp.sum(mean_mask, axis=-1), 1.0)
    per_sequence = -jnp.exp(log_weight) * advantages
    metrics = {}
    if beta != 0.0:
        ref_minus_logp = ref_logps - logps
        kl = jnp.exp(ref_minus_logp) - ref_minus_logp - 1
        per_sequence = per_sequence + beta * jnp.sum(kl * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
        metrics["kl"] = sum_and_count(jax.lax.stop_gradient(kl), mask)
    low = ((log_ratio < -epsilon) & (advantages_col < 0)).astype(jnp.float32)
    high = ((log_ratio > epsilon_high) & (advantages_col > 0)).astype(jnp.float32)
    metrics["clip_ratio/low_mean"] = sum_and_count(jax.lax.stop_gradient(low), mask)
    metrics["clip_ratio/high_mean"] = sum_and_count(jax.lax.stop_gradient(high), mask)
    metrics["clip_ratio/region_mean"] = sum_and_count(jax.lax.stop_gradient(jnp.maximum(low, high)), mask)
    sequences = mask.shape[0] if num_sequences is None else jnp.asarray(num_sequences, jnp.float32)
    loss = jnp.sum(per_sequence) / sequences
    return loss, metrics if return_counts else mean_metrics(metrics)


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: GMPOConfig, totals: dict, *,
            prompt_group: int = 1):
    """Loss of one micro-batch, normalised by the whole step's sequences, and its metrics as `(sum, count)` pairs
    (which add up over micro-batches exactly)."""
    logps, entropy = completion_logps(params, graphdef, batch, temperature=config.temperature,
                                      chunk_size=config.logits_chunk_size, prompt_group=prompt_group)
    mask = batch["completion_mask"].astype(jnp.float32)
    entropy_mask = None
    if config.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(jax.lax.stop_gradient(entropy), mask, config.top_entropy_quantile)
    loss, metrics = gmpo_loss(logps, batch.get("old_logps"), batch.get("ref_logps"), batch["advantages"], mask,
                              epsilon=config.epsilon, epsilon_high=config.epsilon_high, beta=config.beta,
                              entropy_mask=entropy_mask, num_sequences=totals["sequences"], return_counts=True)
    metrics["entropy"] = sum_and_count(jax.lax.stop_gradient(entropy), mask)
    extremes = {}
    if "sampler_logps" in batch:  # the sampler/trainer gap (TRL's sampling/* names), as jaxpt.grpo logs it
        trainer_logps = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logps)
        sampling_pairs, extremes = sampler_mismatch_metrics(trainer_logps, batch["sampler_logps"], mask)
        metrics.update(sampling_pairs)
    return loss, (metrics, extremes)


def make_train_step(config: GMPOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None,
                    prompt_group: int = 1):
    """`state, metrics = step(state, batch)`: one optimizer step over rollout arrays shaped
    `[accumulation, micro_batch, ...]` (`jaxpt.grpo.rollout`'s: `prompt_ids`, `prompt_mask`, `completion_ids`,
    `attention_mask`, `completion_mask`, `advantages`, and optionally `old_logps` / `ref_logps` /
    `sampler_logps`), micro-batches scanned inside. Without `old_logps` the update is on-policy (ratios exactly 1).
    jitted with explicit shardings and the state donated.
    `prompt_group` (`rollout.shared_prompt_group`, what `train()` passes): the micro-batches' rows come in runs of
    `prompt_group` completions of one prompt, in the rollout's order, and each prompt goes through the forward and
    backward passes once for its run (`rollout.completion_logps`); 1: every row computes its own prompt."""

    def step(state: TrainState, batch: dict):
        totals = {"sequences": float(batch["completion_mask"].shape[0] * batch["completion_mask"].shape[1])}
        # differentiate the trained parameters only (under LoRA the adapters; the frozen base joins them here)
        grad_fn = lora.value_and_grad(partial(loss_fn, prompt_group=prompt_group), state, seed=config.seed)

        def micro_step(grads, inputs):
            micro_batch, micro_index = inputs
            (loss, aux), micro_grads = grad_fn(state.params, state.graphdef, micro_batch, config, totals,
                                               micro_index=micro_index)
            return jax.tree.map(jnp.add, grads, micro_grads), (loss, aux)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro_indices = jnp.arange(jax.tree.leaves(batch)[0].shape[0])
        grads, (losses, (metric_pairs, extremes)) = jax.lax.scan(micro_step, zeros, (batch, micro_indices))
        metrics = mean_metrics(total_metrics(metric_pairs))
        metrics.update(combine_extremes(extremes))
        metrics["loss"] = jnp.sum(losses)
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.apply_gradients(grads), metrics

    return jit_step(step, mesh=mesh, state_sharding=state_sharding)


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------


def train(model: nnx.Module, tokenizer, dataset, config: GMPOConfig, *, reward_funcs: Sequence[Callable | str],
          ref_model: nnx.Module | None = None, eval_dataset=None, tools: Sequence[Callable] | None = None,
          environment_factory: Callable | None = None, tool_format=None) -> loop.TrainResult:
    """GMPO on the prompts of `dataset` (TRL prompt-only format; other columns go to the reward functions): GRPO's
    loop (`jaxpt.grpo.train`: rollouts by `jaxpt.grpo.rollout`, `metrics.jsonl` with TRL's names, evaluation,
    checkpoints at rollout boundaries, exact resume, TR-DPO reference sync, tools, HF export) with GMPO's step."""
    return grpo.train(model, tokenizer, dataset, config, reward_funcs=reward_funcs, ref_model=ref_model,
                      eval_dataset=eval_dataset, tools=tools, environment_factory=environment_factory,
                      tool_format=tool_format, method="GMPO", make_train_step=make_train_step)
