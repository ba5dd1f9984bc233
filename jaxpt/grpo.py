"""GRPO: `GRPOConfig`, rollouts (sample, reward, advantages), `make_train_step`, `train`.

All of GRPO is here and in `jaxpt/losses/grpo.py` (sampling, scoring and the batch arithmetic it shares with
RLOO are in `jaxpt/rollout.py`). One rollout samples `num_generations` completions for each of
`generation_batch_size / num_generations` prompts with the training parameters (`jaxpt.sampling.generate`,
no weight copy), scores them with the reward functions, and computes group-relative advantages; then
`num_iterations` passes of optimizer steps consume it, each step a jitted update over
`gradient_accumulation_steps` micro-batches of `per_device_train_batch_size` completions per device (TRL's
batch arithmetic: `generation_batch_size = per_device_train_batch_size * devices * steps_per_generation`).

```python
config = GRPOConfig(output_dir="out", num_generations=8, max_completion_length=64, max_steps=100)
result = jaxpt.grpo.train(model, tokenizer, prompts_dataset, config, reward_funcs=[jaxpt.rewards.accuracy_reward])
```

Old log-probs, as TRL: when a rollout feeds more than one optimizer step (`num_iterations > 1` or
`steps_per_generation > gradient_accumulation_steps`), a forward pass with the training log-prob function and the
parameters before the first update; with one optimizer step per rollout the update is on-policy, old =
stop_gradient(current), and the ratio is exactly 1 in every dtype. The sampler's own log-probs (decode loop, KV
cache) differ from the training forward pass's in bfloat16; every step logs the gap with TRL's names
(`sampling/sampling_logp_difference/mean|max`, `sampling/importance_sampling_ratio/min|mean|max`), and
`sampler_importance_sampling_correction` corrects for it as TRL's `vllm_importance_sampling_correction` does for
its vLLM sampler (`jaxpt/losses/sampler_mismatch.py`). TRL name -> jaxpt name:
`vllm_importance_sampling_correction` -> `sampler_importance_sampling_correction` (off by default: TRL applies it
only with `use_vllm=True`), `vllm_importance_sampling_mode` -> `sampler_importance_sampling_mode`,
`vllm_importance_sampling_clip_max` (formerly `_cap`) -> `sampler_importance_sampling_clip_max`,
`vllm_importance_sampling_clip_min` -> `sampler_importance_sampling_clip_min`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpt import data, distributed, loop, lora
from jaxpt.config import TrainingConfig
from jaxpt.logging import MetricsLogger
from jaxpt.lora import check_reference_without_adapters
from jaxpt.losses.grpo import (
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    SCALE_REWARDS,
    grpo_advantages,
    grpo_loss,
    high_entropy_mask,
)
from jaxpt.losses.metrics import mean_metrics, sum_and_count, total_metrics
from jaxpt.losses.sampled_rewards import reward_metrics
from jaxpt.losses.sampler_mismatch import (
    SAMPLER_IMPORTANCE_SAMPLING_MODES,
    combine_extremes,
    sampler_importance_weights,
    sampler_mismatch_metrics,
)
from jaxpt.models import set_gradient_checkpointing
from jaxpt.rewards import resolve_reward_function
from jaxpt.rollout import (
    append_jsonl,
    check_reference_dtypes,
    check_rollout_inputs,
    completion_logps,
    completion_metrics,
    evaluate_rollouts,
    make_logps_fn,
    make_ref_logps_fn,
    reference_params,
    rollout_shape,
    sample_and_score,
)
from jaxpt.sharding import batch_divisor, mesh_from_config, shard_batch
from jaxpt.train_state import TrainState, jit_step, make_optimizer

logger = logging.getLogger("jaxpt")


@dataclass
class GRPOConfig(TrainingConfig):
    """TRL's `GRPOConfig` fields that have a meaning here (same names and defaults)."""

    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate (TRL's GRPO default)."})
    num_generations: int = field(default=8, metadata={"help": "Completions sampled per prompt (the group size)."})
    max_completion_length: int = field(default=512, metadata={"help": "Tokens generated per completion at most."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Keep the last this many prompt tokens "
                                                                          "(jaxpt; None: no truncation)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (also scales the training "
                                                              "log-probs, as TRL)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling (None: off)."})
    generation_batch_size: int | None = field(default=None, metadata={"help": "Completions per rollout (default: "
                                                                              "per_device * devices * "
                                                                              "steps_per_generation)."})
    steps_per_generation: int | None = field(default=None, metadata={"help": "Micro-batches per rollout (default: "
                                                                             "gradient_accumulation_steps)."})
    num_iterations: int = field(default=1, metadata={"help": "Passes over each rollout (mu in the GRPO paper)."})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient to the reference model (0: no reference)."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping bound of the ratio (1 - epsilon)."})
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clipping (default: epsilon; DAPO "
                                                                        "uses 0.28)."})
    delta: float | None = field(default=None, metadata={"help": "Two-sided clipping: cap on the unclipped ratio."})
    importance_sampling_level: str = field(default="token", metadata={"help": "'token' or 'sequence' (GSPO)."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weight of each reward function "
                                                                               "(default: all 1)."})
    scale_rewards: str = field(default="group", metadata={"help": f"One of {SCALE_REWARDS}."})
    loss_type: str = field(default="dapo", metadata={"help": f"One of {GRPO_LOSS_TYPES}."})
    mask_truncated_completions: bool = field(default=False, metadata={"help": "Leave completions cut at "
                                                                              "max_completion_length out of the "
                                                                              "loss."})
    top_entropy_quantile: float = field(default=1.0, metadata={"help": "Train only on the top fraction of tokens "
                                                                       "by entropy (1.0: all)."})
    use_bias_correction_kl: bool = field(default=True, metadata={"help": "Multiply the KL estimate by the "
                                                                         "importance ratio (TRL)."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle prompts every epoch (seeded)."})
    log_completions: bool = field(default=False, metadata={"help": "Append every rollout's prompts, completions "
                                                                   "and rewards to output_dir/completions.jsonl."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk when computing log-probs."})
    sampler_importance_sampling_correction: bool = field(default=False, metadata={
        "help": "Weight the policy loss by the importance ratio trainer / sampler log-probs (TRL's "
                "vllm_importance_sampling_correction, which TRL applies only with use_vllm; jaxpt's sampler is the "
                "in-process decode loop, whose log-probs differ from the training forward pass's in bfloat16)."})
    sampler_importance_sampling_mode: str = field(default="sequence_mask", metadata={
        "help": f"TRL's vllm_importance_sampling_mode: one of {SAMPLER_IMPORTANCE_SAMPLING_MODES} (per token or per "
                "sequence; ratios outside [clip_min, clip_max] clipped or set to 0)."})
    sampler_importance_sampling_clip_max: float | None = field(default=3.0, metadata={
        "help": "TRL's vllm_importance_sampling_clip_max (formerly _cap): upper bound of the correction ratio."})
    sampler_importance_sampling_clip_min: float | None = field(default=None, metadata={
        "help": "TRL's vllm_importance_sampling_clip_min: lower bound of the correction ratio (None: none)."})

    def validate(self) -> None:
        super().validate()
        if self.sampler_importance_sampling_mode not in SAMPLER_IMPORTANCE_SAMPLING_MODES:
            raise ValueError(f"sampler_importance_sampling_mode={self.sampler_importance_sampling_mode!r}; use one of "
                             f"{SAMPLER_IMPORTANCE_SAMPLING_MODES}.")
        clip_min, clip_max = self.sampler_importance_sampling_clip_min, self.sampler_importance_sampling_clip_max
        if clip_min is not None and clip_max is not None and clip_min >= clip_max:
            raise ValueError(f"sampler_importance_sampling_clip_min={clip_min} must be below "
                             f"sampler_importance_sampling_clip_max={clip_max}.")
        if (self.sampler_importance_sampling_correction and self.sampler_importance_sampling_mode.endswith("_truncate")
                and clip_min is None and clip_max is None):
            raise ValueError(f"sampler_importance_sampling_mode={self.sampler_importance_sampling_mode!r} clips the "
                             "ratio: set sampler_importance_sampling_clip_min or sampler_importance_sampling_clip_max.")
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is not a GRPO loss; use one of {GRPO_LOSS_TYPES}.")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards={self.scale_rewards!r}; use one of {SCALE_REWARDS}.")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level={self.importance_sampling_level!r}; use one of "
                             f"{IMPORTANCE_SAMPLING_LEVELS}.")
        if self.num_generations < 2:
            raise ValueError(f"num_generations={self.num_generations}: GRPO needs at least 2 completions per prompt "
                             "to compare them.")
        if self.max_completion_length < 1 or self.num_iterations < 1:
            raise ValueError("max_completion_length and num_iterations must be >= 1.")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length={self.max_prompt_length} must be >= 1 (or None: no truncation).")
        if self.beta < 0:
            raise ValueError(f"beta={self.beta} must be >= 0 (0: no reference model).")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError(f"epsilon={self.epsilon} and epsilon_high={self.epsilon_high} must be >= 0 (the ratio "
                             "is clipped to [1 - epsilon, 1 + epsilon_high]).")
        if not 0.0 < self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile={self.top_entropy_quantile} must be in (0, 1].")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0.")
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError("Set generation_batch_size or steps_per_generation, not both.")


# --------------------------------------------------------------------------------------------------------------
# Batch arithmetic and rollouts
# --------------------------------------------------------------------------------------------------------------


def rollout(state: TrainState, prompts: Sequence[dict], reward_funcs: Sequence[Callable], tokenizer,
            config: GRPOConfig, *, key: jax.Array, mesh, prompt_buckets: Sequence[int], ref_logps_fn=None,
            policy_logps_fn=None):
    """Sample `num_generations` completions per prompt, score them, and compute group-relative advantages.
    Returns `(arrays, metrics, records)`: the rollout's numpy arrays `[n, ...]` for the update, its
    reward/completion metrics (TRL's names) and per-completion records for `log_completions`.
    `policy_logps_fn(params, arrays)` (`rollout.make_logps_fn`): given, the arrays get `old_logps` from the
    training forward pass with `state.full_params()` (for a rollout that feeds several optimizer steps); without it the
    update is on-policy. `ref_logps_fn(arrays)`: the reference's log-probs (`ref_logps`, for beta != 0)."""
    sampled = sample_and_score(state, prompts, reward_funcs, tokenizer, config, key=key, mesh=mesh,
                               prompt_buckets=prompt_buckets)
    if np.isnan(sampled.rewards).all(axis=1).any():
        logger.warning("Some completions got no reward from any reward function; their advantage is 0.")
    advantages = np.asarray(grpo_advantages(sampled.rewards, num_generations=config.num_generations,
                                            scale_rewards=config.scale_rewards, reward_weights=config.reward_weights))
    arrays = dict(sampled.arrays, advantages=advantages.astype(np.float32))
    if policy_logps_fn is not None:
        arrays["old_logps"] = policy_logps_fn(state.full_params(), arrays)
    if ref_logps_fn is not None:
        arrays["ref_logps"] = ref_logps_fn(arrays)
    metrics = reward_metrics(sampled.rewards, num_generations=config.num_generations,
                             scale_rewards=config.scale_rewards, reward_weights=config.reward_weights,
                             reward_names=sampled.reward_names)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics.update(completion_metrics(sampled.lengths, sampled.finished))
    return arrays, metrics, sampled.records(advantages)


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: GRPOConfig, totals: dict):
    """Loss of one micro-batch, normalised by the whole step's tokens/sequences, and its metrics as `(sum,
    count)` pairs, which add up over micro-batches exactly."""
    logps, entropy = completion_logps(params, graphdef, batch, temperature=config.temperature,
                                      chunk_size=config.logits_chunk_size)
    mask = batch["completion_mask"].astype(jnp.float32)
    entropy_mask = None
    if config.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropy, mask, config.top_entropy_quantile)
    # The old (behaviour) log-probs: the pre-update forward pass, or on-policy the current ones, detached.
    trainer_logps = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logps)
    weights, extremes = None, {}
    if config.sampler_importance_sampling_correction:
        if "sampler_logps" not in batch:
            raise ValueError("sampler_importance_sampling_correction needs the sampler's log-probs in the batch "
                             "(`sampler_logps`, from the rollout).")
        weights = sampler_importance_weights(
            trainer_logps, batch["sampler_logps"], mask, mode=config.sampler_importance_sampling_mode,
            clip_min=config.sampler_importance_sampling_clip_min, clip_max=config.sampler_importance_sampling_clip_max)
    loss, metrics = grpo_loss(
        logps, batch.get("old_logps"), batch.get("ref_logps"), batch["advantages"], mask,
        loss_type=config.loss_type, epsilon=config.epsilon, epsilon_high=config.epsilon_high, delta=config.delta,
        beta=config.beta, importance_sampling_level=config.importance_sampling_level,
        max_completion_length=config.max_completion_length, use_bias_correction_kl=config.use_bias_correction_kl,
        entropy_mask=entropy_mask, importance_sampling_weights=weights, num_tokens=totals["tokens"],
        num_sequences=totals["sequences"], return_counts=True,
    )
    metrics["entropy"] = sum_and_count(entropy, mask)
    if "sampler_logps" in batch:
        sampling_pairs, extremes = sampler_mismatch_metrics(trainer_logps, batch["sampler_logps"], mask,
                                                            importance_weights=weights)
        metrics.update(sampling_pairs)
    return loss, (metrics, extremes)


def make_train_step(config: GRPOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None):
    """`state, metrics = step(state, batch)`: one optimizer step over rollout arrays shaped
    `[accumulation, micro_batch, ...]` (`prompt_ids`, `prompt_mask`, `completion_ids`, `attention_mask`,
    `completion_mask`, `advantages`, and optionally `old_logps` / `ref_logps` / `sampler_logps`), micro-batches
    scanned inside. Without `old_logps` the update is on-policy (ratio exactly 1). With `sampler_logps` (the
    sampler's log-probs) it logs the sampler/trainer mismatch and can correct for it
    (`sampler_importance_sampling_correction`). jitted with explicit shardings and the state donated."""

    def step(state: TrainState, batch: dict):
        mask = batch["completion_mask"].astype(jnp.float32)
        totals = {"tokens": jnp.maximum(jnp.sum(mask), 1.0),
                  "sequences": float(batch["completion_mask"].shape[0] * batch["completion_mask"].shape[1])}
        # differentiate the trained parameters only (under LoRA the adapters, with their dropout; the frozen base
        # joins them here)
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


def train(model: nnx.Module, tokenizer, dataset, config: GRPOConfig, *, reward_funcs: Sequence[Callable | str],
          ref_model: nnx.Module | None = None, eval_dataset=None) -> loop.TrainResult:
    """GRPO on the prompts of `dataset` (TRL prompt-only format; other columns go to the reward functions):
    progress bar, `metrics.jsonl` with TRL's names, evaluation (sampled rewards on `eval_dataset`), orbax
    checkpoints at rollout boundaries, exact resume, HF export. `reward_funcs`: callables with TRL's signature,
    names from `jaxpt.rewards.REWARD_FUNCTIONS`, or `jaxpt.rewards.model_reward(...)`."""
    config.validate()  # again: fields may have been changed since the config was built
    loop.prepare_output_dir(config)
    reward_funcs = [resolve_reward_function(f) for f in reward_funcs]
    if not reward_funcs:
        raise ValueError("reward_funcs is empty: GRPO needs at least one reward function.")
    if config.reward_weights is not None and len(config.reward_weights) != len(reward_funcs):
        raise ValueError(f"reward_weights has {len(config.reward_weights)} entries for {len(reward_funcs)} reward "
                         "functions.")
    mesh = mesh_from_config(config)
    micro_batch, steps_per_generation, prompts_per_rollout = rollout_shape(config, batch_divisor(mesh))
    accumulation = config.gradient_accumulation_steps
    steps_per_rollout = config.num_iterations * steps_per_generation // accumulation
    prompts = data.prepare_prompts(dataset, tokenizer, method="GRPO", max_prompt_length=config.max_prompt_length)
    eval_prompts = None
    if eval_dataset is not None and config.eval_strategy != "no":
        eval_prompts = data.prepare_prompts(eval_dataset, tokenizer, method="GRPO",
                                            max_prompt_length=config.max_prompt_length)
    distributed.check_same_data(prompts, what="GRPO prompts")  # every process builds the same global batches
    rollouts_per_epoch = data.steps_per_epoch(len(prompts), prompts_per_rollout, method="GRPO")
    steps_in_epoch = rollouts_per_epoch * steps_per_rollout
    total_steps = data.total_steps(config, steps_in_epoch)
    prompt_buckets = data.length_buckets(max(max(len(p["prompt_ids"]) for p in prompts), 16), min_length=16)
    check_rollout_inputs(reward_funcs, [model, ref_model], prompts, eval_prompts, tokenizer, config, method="GRPO")
    if ref_model is not None and config.beta != 0.0:
        check_reference_dtypes(nnx.state(model, nnx.Param), nnx.state(ref_model, nnx.Param))

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    # Old and reference log-probs: the train step's log-prob function, jitted once (exact ratios in every dtype).
    logps_fn = make_logps_fn(state.graphdef, temperature=config.temperature, chunk_size=config.logits_chunk_size,
                             micro_batch=micro_batch, mesh=mesh)
    ref_logps_fn = None
    if config.beta != 0.0:
        if ref_model is None:
            check_reference_without_adapters(model, method="GRPO with beta > 0")
        # under LoRA the default is the base with the adapters off; a ref_model runs with zero adapters
        reference = (lora.with_adapters_off(nnx.state(ref_model, nnx.Param), state) if ref_model is not None
                     else reference_params(state))
        ref_logps_fn = make_ref_logps_fn(reference, state.graphdef, temperature=config.temperature,
                                         chunk_size=config.logits_chunk_size, micro_batch=micro_batch, mesh=mesh,
                                         logps_fn=logps_fn)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding)
    checkpoints = loop.checkpointer(config, method="grpo", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints)
    if start_step % steps_per_rollout:
        raise ValueError(f"Checkpoint step {start_step} is not at a rollout boundary ({steps_per_rollout} steps per "
                         "rollout).")
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="grpo", start_step=start_step, config=config.to_dict())
    order = data.step_indices(len(prompts), prompts_per_rollout, seed=config.seed, shuffle=config.shuffle_dataset,
                              start_step=start_step // steps_per_rollout)
    base_key = jax.random.key(config.seed)
    step = start_step
    try:
        while step < total_steps:
            rollout_index = step // steps_per_rollout
            _, indices = next(order)
            arrays, rollout_metrics, records = rollout(
                state, [prompts[i] for i in indices], reward_funcs, tokenizer, config,
                key=jax.random.fold_in(base_key, rollout_index), mesh=mesh, prompt_buckets=prompt_buckets,
                ref_logps_fn=ref_logps_fn, policy_logps_fn=logps_fn if steps_per_rollout > 1 else None)
            if config.log_completions:
                append_jsonl(Path(config.output_dir) / "completions.jsonl",
                              [{"step": step, **r} for r in records])
            micro_batches = {k: v.reshape(steps_per_generation, micro_batch, *v.shape[1:]) for k, v in arrays.items()}
            rollout_tokens = int(arrays["prompt_mask"].sum() + arrays["attention_mask"].sum())
            for iteration in range(config.num_iterations):
                for first in range(0, steps_per_generation, accumulation):
                    if step >= total_steps:
                        break
                    batch = {k: v[first:first + accumulation] for k, v in micro_batches.items()}
                    state, metrics = train_step(state, shard_batch(batch, mesh, batch_axis=1, global_batch=True))
                    if iteration == 0:
                        num_tokens += rollout_tokens * accumulation // steps_per_generation
                    step += 1
                    log.log(step, {**metrics, **rollout_metrics, "learning_rate": schedule(step - 1),
                                   "num_tokens": num_tokens}, epoch=step / steps_in_epoch)
            if eval_prompts and loop.should_evaluate(config, step, steps_in_epoch):
                log.write({"step": step, **evaluate_rollouts(rollout, state, eval_prompts, reward_funcs, tokenizer,
                                                             config, mesh=mesh, prompt_buckets=prompt_buckets,
                                                             prompts_per_rollout=prompts_per_rollout)})
            if config.save_steps and step // config.save_steps > (step - steps_per_rollout) // config.save_steps:
                log.sync()
                checkpoints.save(step, state, {"num_tokens": num_tokens})
        log.flush(step, epoch=step / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))

