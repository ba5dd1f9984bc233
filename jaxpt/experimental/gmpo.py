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
`GRPOConfig`), the rollout (sampling, rewards, group advantages, old and reference log-probs) and the loop's pieces;
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
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxpt import data, distributed, grpo, loop, lora
from jaxpt.logging import MetricsLogger
from jaxpt.lora import check_reference_without_adapters
from jaxpt.losses.grpo import high_entropy_mask
from jaxpt.losses.metrics import MetricPairs, mean_metrics, sum_and_count, total_metrics
from jaxpt.losses.sampler_mismatch import combine_extremes, sampler_mismatch_metrics
from jaxpt.models import set_gradient_checkpointing
from jaxpt.reference_sync import check_reference_sync, checkpoint_extra, resumed_reference, sync_reference
from jaxpt.rewards import resolve_reward_function
from jaxpt.rollout import (
    append_jsonl,
    check_reference_dtypes,
    check_rollout_inputs,
    completion_logps,
    eval_config,
    evaluate_rollouts,
    make_logps_fn,
    make_ref_logps_fn,
    reference_params,
    rollout_shape,
    toolbox_from,
)
from jaxpt.sharding import batch_divisor, mesh_from_config, shard_batch
from jaxpt.train_state import TrainState, jit_step, make_optimizer

logger = logging.getLogger("jaxpt")

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


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: GMPOConfig, totals: dict):
    """Loss of one micro-batch, normalised by the whole step's sequences, and its metrics as `(sum, count)` pairs
    (which add up over micro-batches exactly)."""
    logps, entropy = completion_logps(params, graphdef, batch, temperature=config.temperature,
                                      chunk_size=config.logits_chunk_size)
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


def make_train_step(config: GMPOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None):
    """`state, metrics = step(state, batch)`: one optimizer step over rollout arrays shaped
    `[accumulation, micro_batch, ...]` (`jaxpt.grpo.rollout`'s: `prompt_ids`, `prompt_mask`, `completion_ids`,
    `attention_mask`, `completion_mask`, `advantages`, and optionally `old_logps` / `ref_logps` /
    `sampler_logps`), micro-batches scanned inside. Without `old_logps` the update is on-policy (ratios exactly 1).
    jitted with explicit shardings and the state donated."""

    def step(state: TrainState, batch: dict):
        totals = {"sequences": float(batch["completion_mask"].shape[0] * batch["completion_mask"].shape[1])}
        # differentiate the trained parameters only (under LoRA the adapters; the frozen base joins them here)
        grad_fn = lora.value_and_grad(loss_fn, state, seed=config.seed)

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
    config.validate()  # again: fields may have been changed since the config was built
    loop.prepare_output_dir(config)
    reward_funcs = [resolve_reward_function(f) for f in reward_funcs]
    toolbox = toolbox_from(config, tools=tools, environment_factory=environment_factory, tool_format=tool_format,
                           method="GMPO")
    if not reward_funcs and (toolbox is None or not toolbox.environment_rewards):
        raise ValueError("reward_funcs is empty: GMPO needs at least one reward function.")
    if config.reward_weights is not None and len(config.reward_weights) != len(reward_funcs):
        raise ValueError(f"reward_weights has {len(config.reward_weights)} entries for {len(reward_funcs)} reward "
                         "functions.")
    mesh = mesh_from_config(config)
    micro_batch, steps_per_generation, prompts_per_rollout = rollout_shape(config, batch_divisor(mesh))
    accumulation = config.gradient_accumulation_steps
    steps_per_rollout = config.num_iterations * steps_per_generation // accumulation
    prompts = data.prepare_prompts(dataset, tokenizer, method="GMPO", max_prompt_length=config.max_prompt_length,
                                   chat_template_kwargs=config.chat_template_kwargs)
    eval_prompts = None
    if eval_dataset is not None and config.eval_strategy != "no":
        eval_prompts = data.prepare_prompts(eval_dataset, tokenizer, method="GMPO",
                                            max_prompt_length=config.max_prompt_length,
                                            chat_template_kwargs=config.chat_template_kwargs)
    evaluation_config = eval_config(config, prompts_per_rollout=prompts_per_rollout, micro_batch=micro_batch)
    distributed.check_same_data(prompts, what="GMPO prompts")  # every process builds the same global batches
    rollouts_per_epoch = data.steps_per_epoch(len(prompts), prompts_per_rollout, method="GMPO")
    steps_in_epoch = rollouts_per_epoch * steps_per_rollout
    total_steps = data.total_steps(config, steps_in_epoch)
    prompt_buckets = data.length_buckets(max(max(len(p["prompt_ids"]) for p in prompts), 16), min_length=16)
    check_rollout_inputs(reward_funcs, [model, ref_model], prompts, eval_prompts, tokenizer, config, method="GMPO",
                         tools=toolbox)
    if ref_model is not None and config.beta != 0.0:
        check_reference_dtypes(nnx.state(model, nnx.Param), nnx.state(ref_model, nnx.Param))

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    # Old and reference log-probs: the train step's log-prob function, jitted once (exact ratios in every dtype).
    logps_fn = make_logps_fn(state.graphdef, temperature=config.temperature, chunk_size=config.logits_chunk_size,
                             micro_batch=micro_batch, mesh=mesh)
    ref_logps_fn, reference = None, None  # a reference only with a KL term (beta != 0)
    if config.beta != 0.0:
        if ref_model is None:
            check_reference_without_adapters(model, method="GMPO with beta > 0")
        reference = (lora.with_adapters_off(nnx.state(ref_model, nnx.Param), state) if ref_model is not None
                     else reference_params(state))
        check_reference_sync(config, lora=state.frozen is not None, method="GMPO")
        if config.sync_ref_model and ref_model is not None:  # the synced reference is our own copy
            reference = jax.tree.map(jnp.copy, reference)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding)
    checkpoints = loop.checkpointer(config, method="gmpo", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints,
                                              extra=checkpoint_extra(config, reference))
    if start_step % steps_per_rollout:
        raise ValueError(f"Checkpoint step {start_step} is not at a rollout boundary ({steps_per_rollout} steps per "
                         "rollout).")
    if reference is not None:  # TR-DPO: continue from the checkpoint's synced reference
        reference = resumed_reference(config, reference, progress, start_step, method="GMPO")
        ref_logps_fn = make_ref_logps_fn(reference, state.graphdef, temperature=config.temperature,
                                         chunk_size=config.logits_chunk_size, micro_batch=micro_batch, mesh=mesh,
                                         logps_fn=logps_fn)
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="gmpo", start_step=start_step, config=config.to_dict())
    order = data.step_indices(len(prompts), prompts_per_rollout, seed=config.seed, shuffle=config.shuffle_dataset,
                              start_step=start_step // steps_per_rollout)
    base_key = jax.random.key(config.seed)
    step = start_step
    try:
        while step < total_steps:
            rollout_index = step // steps_per_rollout
            _, indices = next(order)
            arrays, rollout_metrics, records = grpo.rollout(
                state, [prompts[i] for i in indices], reward_funcs, tokenizer, config,
                key=jax.random.fold_in(base_key, rollout_index), mesh=mesh, prompt_buckets=prompt_buckets,
                ref_logps_fn=ref_logps_fn, policy_logps_fn=logps_fn if steps_per_rollout > 1 else None,
                tools=toolbox)
            if config.log_completions:
                append_jsonl(Path(config.output_dir) / "completions.jsonl", [{"step": step, **r} for r in records])
            micro_batches = {k: v.reshape(steps_per_generation, micro_batch, *v.shape[1:]) for k, v in arrays.items()}
            rollout_tokens = int(arrays["prompt_mask"].sum() + arrays["attention_mask"].sum())
            for iteration in range(config.num_iterations):
                for first in range(0, steps_per_generation, accumulation):
                    if step >= total_steps:
                        break
                    batch = {k: v[first:first + accumulation] for k, v in micro_batches.items()}
                    placed = shard_batch(batch, mesh, batch_axis=1, global_batch=True,
                                         check_shapes=False)  # the whole rollout is on every process: same shapes
                    state, metrics = train_step(state, placed)
                    if ref_logps_fn is not None and config.sync_ref_model:  # TR-DPO: for the next rollouts
                        synced = sync_reference(reference, state.full_params(), config, step=step + 1)
                        if synced is not reference:
                            reference = synced
                            ref_logps_fn = make_ref_logps_fn(reference, state.graphdef, temperature=config.temperature,
                                                             chunk_size=config.logits_chunk_size,
                                                             micro_batch=micro_batch, mesh=mesh, logps_fn=logps_fn)
                    if iteration == 0:
                        num_tokens += rollout_tokens * accumulation // steps_per_generation
                    step += 1
                    log.log(step, {**metrics, **rollout_metrics, "learning_rate": schedule(step - 1),
                                   "num_tokens": num_tokens}, epoch=step / steps_in_epoch)
            if eval_prompts and loop.should_evaluate(config, step, steps_in_epoch):
                log.write({"step": step, **evaluate_rollouts(grpo.rollout, state, eval_prompts, reward_funcs,
                                                             tokenizer, evaluation_config, mesh=mesh,
                                                             prompt_buckets=prompt_buckets,
                                                             prompts_per_rollout=prompts_per_rollout,
                                                             tools=toolbox)})
            if config.save_steps and step // config.save_steps > (step - steps_per_rollout) // config.save_steps:
                log.sync()
                checkpoints.save(step, state, {"num_tokens": num_tokens}, extra=checkpoint_extra(config, reference))
        log.flush(step, epoch=step / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))
