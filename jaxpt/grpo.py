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

TRL 1.16's whole menu, same names and defaults: the loss types of `jaxpt/losses/grpo.py` (`cispo`, `sapo`, `luspo`,
`vespo` with `sapo_temperature_*` / `vespo_*`), `off_policy_mask_threshold` (measured from the sampler's log-probs),
`multi_objective_aggregation="normalize_then_sum"` (GDPO), `entropy_coef` with `use_adaptive_entropy` (the controller
runs in `train`; its coefficient and last entropy are checkpointed), and TR-DPO's `sync_ref_model` (the reference
moves toward the policy every `ref_model_sync_steps` steps, `jaxpt/reference_sync.py`). Sampling: `temperature`,
`top_k`, `top_p`, `min_p`, `repetition_penalty`, `generation_kwargs` (its sampler keys), `chat_template_kwargs` and
`num_generations_eval` as TRL's (`jaxpt/rollout.py`); TRL's vLLM / transformers-generate options fail with the reason
on the command line (`jaxpt.cli.TRL_ONLY_OPTIONS`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
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
    MULTI_OBJECTIVE_AGGREGATIONS,
    SCALE_REWARDS,
    grpo_advantages,
    grpo_loss,
    high_entropy_mask,
    normalized_reward_sum,
)
from jaxpt.losses.metrics import mean_metrics, sum_and_count, total_metrics
from jaxpt.losses.sampled_rewards import nanstd, reward_metrics
from jaxpt.losses.sampler_mismatch import (
    SAMPLER_IMPORTANCE_SAMPLING_MODES,
    combine_extremes,
    sampler_importance_weights,
    sampler_mismatch_metrics,
)
from jaxpt.models import set_gradient_checkpointing
from jaxpt.reference_sync import check_reference_sync, checkpoint_extra, resumed_reference, sync_reference
from jaxpt.rewards import resolve_reward_function
from jaxpt.rollout import (
    GENERATION_KWARGS,
    agree_prompt_lengths,
    append_jsonl,
    check_generation_options,
    check_prompt_groups,
    check_reference_dtypes,
    check_rollout_inputs,
    completion_logps,
    completion_metrics,
    eval_config,
    evaluate_rollouts,
    make_logps_fn,
    make_ref_logps_fn,
    prepare_eval_prompts,
    prepare_rollout_prompts,
    reference_params,
    rollout_prompts,
    rollout_shape,
    sample_and_score,
    shared_prompt_group,
    tool_reward_weights,
    toolbox_from,
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
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "Penalise the tokens already in the prompt or the completion (transformers' repetition_penalty, "
                "applied by jaxpt's sampler; > 1 discourages repeats; 1.0: off)."})
    generation_kwargs: dict | str | None = field(default=None, metadata={
        "help": f"Sampling overrides, a dict (JSON on the command line) with keys among {GENERATION_KWARGS}, e.g. "
                '\'{"top_k": 20}\'; TRL passes it to transformers / vLLM, whose other options jaxpt\'s sampler does '
                "not have: those fail."})
    chat_template_kwargs: dict | str | None = field(default=None, metadata={
        "help": "Extra arguments of the chat template for conversational prompts (JSON on the command line), e.g. "
                '\'{"enable_thinking": false}\'.'})
    num_generations_eval: int | None = field(default=None, metadata={"help": "Completions per prompt in evaluation "
                                                                             "(None: num_generations)."})
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
    sapo_temperature_neg: float = field(default=1.05, metadata={"help": "loss_type='sapo': gate temperature of the "
                                                                         "tokens with advantage <= 0 (SAPO)."})
    sapo_temperature_pos: float = field(default=1.0, metadata={"help": "loss_type='sapo': gate temperature of the "
                                                                        "tokens with advantage > 0 (SAPO)."})
    vespo_k_pos: float = field(default=2.0, metadata={"help": "loss_type='vespo': power k of the Gamma weight for "
                                                               "advantages >= 0 (down-weights ratios < 1)."})
    vespo_lambda_pos: float = field(default=3.0, metadata={"help": "loss_type='vespo': decay lambda of the Gamma "
                                                                    "weight for advantages >= 0 (ratios > 1)."})
    vespo_k_neg: float = field(default=3.0, metadata={"help": "loss_type='vespo': power k for advantages < 0."})
    vespo_lambda_neg: float = field(default=2.0, metadata={"help": "loss_type='vespo': decay lambda for "
                                                                    "advantages < 0."})
    importance_sampling_level: str = field(default="token", metadata={"help": "'token' or 'sequence' (GSPO)."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weight of each reward function "
                                                                               "(default: all 1)."})
    multi_objective_aggregation: str = field(default="sum_then_normalize", metadata={
        "help": f"One of {MULTI_OBJECTIVE_AGGREGATIONS}: sum the weighted rewards, then normalise (scale_rewards); or "
                "normalise each reward function within its group, sum, and standardise over the batch (GDPO)."})
    scale_rewards: str = field(default="group", metadata={"help": f"One of {SCALE_REWARDS}."})
    loss_type: str = field(default="dapo", metadata={"help": f"One of {GRPO_LOSS_TYPES} (jaxpt/losses/grpo.py gives "
                                                             "each formula and paper)."})
    mask_truncated_completions: bool = field(default=False, metadata={"help": "Leave completions cut at "
                                                                              "max_completion_length out of the "
                                                                              "loss."})
    top_entropy_quantile: float = field(default=1.0, metadata={"help": "Train only on the top fraction of tokens "
                                                                       "by entropy (1.0: all)."})
    entropy_coef: float = field(default=0.0, metadata={"help": "Entropy bonus: subtract entropy_coef times the mean "
                                                               "per-token entropy from the loss (0: off); the "
                                                               "initial coefficient with use_adaptive_entropy."})
    use_adaptive_entropy: bool = field(default=False, metadata={
        "help": "Adaptive entropy control (Skywork-OR1): after each step entropy_coef rises by entropy_coef_delta "
                "when the step's entropy is <= entropy_target, else falls; the bonus applies only while it is."})
    entropy_coef_min: float = field(default=0.0, metadata={"help": "Adaptive entropy: lower bound of the "
                                                                   "coefficient."})
    entropy_coef_max: float = field(default=1.0, metadata={"help": "Adaptive entropy: upper bound of the "
                                                                   "coefficient."})
    entropy_coef_delta: float = field(default=0.005, metadata={"help": "Adaptive entropy: step of the coefficient "
                                                                       "per optimizer step."})
    entropy_target: float = field(default=0.2, metadata={"help": "Adaptive entropy: target mean per-token entropy "
                                                                 "(nats), over the tokens the bonus acts on."})
    off_policy_mask_threshold: float | None = field(default=None, metadata={
        "help": "Off-policy sequence masking (DeepSeek-V3.2): drop the sequences with a negative advantage whose mean "
                "per-token KL sampler -> policy exceeds this (e.g. 0.5; None: off)."})
    use_bias_correction_kl: bool = field(default=True, metadata={"help": "Multiply the KL estimate by the "
                                                                         "importance ratio (TRL)."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle prompts every epoch (seeded)."})
    log_completions: bool = field(default=False, metadata={"help": "Append every rollout's prompts, completions "
                                                                   "and rewards to output_dir/completions.jsonl."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk when computing log-probs."})
    sync_ref_model: bool = field(default=False, metadata={
        "help": "TR-DPO (arXiv:2404.09656): every ref_model_sync_steps steps move the reference toward the policy, "
                "ref <- alpha * policy + (1 - alpha) * ref (needs beta > 0; not with LoRA)."})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "TR-DPO's alpha: the policy's share in the "
                                                                        "reference update."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "TR-DPO's tau: optimizer steps between "
                                                                     "reference updates."})
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
    max_tool_calling_iterations: int | None = field(default=None, metadata={
        "help": "With tools (train(tools=..., environment_factory=...)): rounds of tool calls per completion at most "
                "(None: until a turn makes no call or max_completion_length is reached). See jaxpt/tools.py."})

    def validate(self) -> None:
        super().validate()
        check_generation_options(self)
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
        if self.multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
            raise ValueError(f"multi_objective_aggregation={self.multi_objective_aggregation!r}; use one of "
                             f"{MULTI_OBJECTIVE_AGGREGATIONS}.")
        if self.sapo_temperature_pos <= 0 or self.sapo_temperature_neg <= 0:
            raise ValueError(f"sapo_temperature_pos={self.sapo_temperature_pos} and sapo_temperature_neg="
                             f"{self.sapo_temperature_neg} must be > 0.")
        if min(self.vespo_k_pos, self.vespo_lambda_pos, self.vespo_k_neg, self.vespo_lambda_neg) < 0:
            raise ValueError("vespo_k_pos, vespo_lambda_pos, vespo_k_neg and vespo_lambda_neg must be >= 0 (got "
                             f"{self.vespo_k_pos}, {self.vespo_lambda_pos}, {self.vespo_k_neg}, "
                             f"{self.vespo_lambda_neg}).")
        if (self.loss_type == "vespo" and self.sampler_importance_sampling_correction
                and not self.sampler_importance_sampling_mode.startswith("token")):
            raise ValueError(f"loss_type='vespo' folds the sampler correction into its sequence weight per token: "
                             f"sampler_importance_sampling_mode={self.sampler_importance_sampling_mode!r} must be "
                             "'token_truncate' or 'token_mask'.")
        if self.off_policy_mask_threshold is not None and self.off_policy_mask_threshold < 0:
            raise ValueError(f"off_policy_mask_threshold={self.off_policy_mask_threshold} must be >= 0 (a KL "
                             "threshold, e.g. 0.5), or None to turn the mask off.")
        if self.use_adaptive_entropy:
            if not self.entropy_coef_min <= self.entropy_coef <= self.entropy_coef_max:
                raise ValueError(f"entropy_coef={self.entropy_coef} must lie in [entropy_coef_min="
                                 f"{self.entropy_coef_min}, entropy_coef_max={self.entropy_coef_max}] with "
                                 "use_adaptive_entropy.")
            if self.entropy_coef_delta < 0:
                raise ValueError(f"entropy_coef_delta={self.entropy_coef_delta} must be >= 0.")
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            logger.warning("loss_type='luspo' is meant with importance_sampling_level='sequence' (the LUSPO paper).")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            logger.warning("loss_type='vespo' computes its sequence weight itself; importance_sampling_level='token' "
                           "(the default) is the paper's setup (the level still sets the KL term's ratio).")
        if self.importance_sampling_level == "sequence" and self.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
            logger.warning(f"loss_type={self.loss_type!r} sums per-token terms, so with importance_sampling_level="
                           "'sequence' each sequence weighs by its length; GSPO's setup is loss_type='grpo'.")
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
        if self.sync_ref_model and self.beta == 0.0:
            raise ValueError("sync_ref_model=True with beta=0.0: there is no reference model to synchronise; set "
                             "beta > 0 or sync_ref_model=False.")
        check_reference_sync(self, lora=False, method="GRPO")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError(f"epsilon={self.epsilon} and epsilon_high={self.epsilon_high} must be >= 0 (the ratio "
                             "is clipped to [1 - epsilon, 1 + epsilon_high]).")
        if not 0.0 < self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile={self.top_entropy_quantile} must be in (0, 1].")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0.")
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError("Set generation_batch_size or steps_per_generation, not both.")
        if self.max_tool_calling_iterations is not None and self.max_tool_calling_iterations < 0:
            raise ValueError(f"max_tool_calling_iterations={self.max_tool_calling_iterations} must be >= 0 (or None: "
                             "no limit).")


# --------------------------------------------------------------------------------------------------------------
# Batch arithmetic and rollouts
# --------------------------------------------------------------------------------------------------------------


def rollout(state: TrainState, prompts: Sequence[dict], reward_funcs: Sequence[Callable], tokenizer,
            config: GRPOConfig, *, key: jax.Array, mesh, prompt_buckets: Sequence[int], ref_logps_fn=None,
            policy_logps_fn=None, tools=None, longest_prompt: int | None = None):
    """Sample `num_generations` completions per prompt, score them, and compute group-relative advantages.
    Returns `(arrays, metrics, records)`: the rollout's numpy arrays `[n, ...]` for the update, its
    reward/completion metrics (TRL's names) and per-completion records for `log_completions`.
    `policy_logps_fn(params, arrays)` (`rollout.make_logps_fn`): given, the arrays get `old_logps` from the
    training forward pass with `state.full_params()` (for a rollout that feeds several optimizer steps); without it the
    update is on-policy. `ref_logps_fn(arrays)`: the reference's log-probs (`ref_logps`, for beta != 0).
    `tools` (`jaxpt.tools.Toolbox`): multi-turn rollouts with tool calls (arrays add `tool_mask`).
    `longest_prompt`: several processes, each holding only its own prompts' ids (`rollout.rollout_prompts`)."""
    sampled = sample_and_score(state, prompts, reward_funcs, tokenizer, config, key=key, mesh=mesh,
                               prompt_buckets=prompt_buckets, tools=tools, longest_prompt=longest_prompt)
    if np.isnan(sampled.rewards).all(axis=1).any():
        logger.warning("Some completions got no reward from any reward function; their advantage is 0.")
    reward_weights = tool_reward_weights(config.reward_weights, sampled.rewards.shape[1])
    advantages = np.asarray(grpo_advantages(sampled.rewards, num_generations=config.num_generations,
                                            scale_rewards=config.scale_rewards, reward_weights=reward_weights,
                                            multi_objective_aggregation=config.multi_objective_aggregation))
    arrays = dict(sampled.arrays, advantages=advantages.astype(np.float32))
    if policy_logps_fn is not None:
        arrays["old_logps"] = policy_logps_fn(state.full_params(), arrays)
    if ref_logps_fn is not None:
        arrays["ref_logps"] = ref_logps_fn(arrays)
    metrics = reward_metrics(sampled.rewards, num_generations=config.num_generations,
                             scale_rewards=config.scale_rewards, reward_weights=reward_weights,
                             reward_names=sampled.reward_names)
    if config.multi_objective_aggregation == "normalize_then_sum":  # GDPO standardises over the batch: TRL counts
        summed = normalized_reward_sum(sampled.rewards, num_generations=config.num_generations,  # its std
                                       reward_weights=reward_weights)
        metrics["frac_reward_zero_std"] = jnp.isclose(nanstd(summed), 0.0).astype(jnp.float32)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics.update(completion_metrics(sampled.lengths, sampled.finished))
    metrics.update(sampled.tool_metrics)
    return arrays, metrics, sampled.records(advantages)


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: GRPOConfig, totals: dict, *,
            prompt_group: int = 1):
    """Loss of one micro-batch, normalised by the whole step's tokens/sequences, and its metrics as `(sum,
    count)` pairs, which add up over micro-batches exactly."""
    bonus = entropy_bonus_enabled(config)
    logps, entropy = completion_logps(params, graphdef, batch, temperature=config.temperature,
                                      chunk_size=config.logits_chunk_size, entropy_gradient=bonus,
                                      prompt_group=prompt_group)
    mask = batch["completion_mask"].astype(jnp.float32)
    entropy_mask = None
    if config.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(jax.lax.stop_gradient(entropy), mask, config.top_entropy_quantile)
    bonus_options = {}
    if bonus:
        bonus_mask = mask if entropy_mask is None else mask * entropy_mask
        # The whole step's token count when known up front; the high-entropy subset is chosen per micro-batch, so
        # then each micro-batch's mean counts 1 / accumulation (as TRL).
        bonus_tokens = totals["tokens"] if entropy_mask is None else jnp.sum(bonus_mask) * totals["accumulation"]
        # the coefficient: the batch's (the adaptive controller's, set per step by train()) or the config's
        coef = batch["entropy_coef"][0] if "entropy_coef" in batch else config.entropy_coef
        bonus_options = dict(entropies=entropy, entropy_coef=coef, num_entropy_tokens=bonus_tokens)
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
        num_sequences=totals["sequences"], return_counts=True, sapo_temperature_pos=config.sapo_temperature_pos,
        sapo_temperature_neg=config.sapo_temperature_neg, vespo_k_pos=config.vespo_k_pos,
        vespo_lambda_pos=config.vespo_lambda_pos, vespo_k_neg=config.vespo_k_neg,
        vespo_lambda_neg=config.vespo_lambda_neg, off_policy_mask_threshold=config.off_policy_mask_threshold,
        sampler_logps=batch.get("sampler_logps"), **bonus_options,
    )
    metrics["entropy"] = sum_and_count(jax.lax.stop_gradient(entropy), mask)
    if bonus:  # what the adaptive controller measures: the entropy over the tokens the bonus acts on
        metrics["entropy_bonus_mean"] = sum_and_count(jax.lax.stop_gradient(entropy), bonus_mask)
    if "sampler_logps" in batch:
        sampling_pairs, extremes = sampler_mismatch_metrics(trainer_logps, batch["sampler_logps"], mask,
                                                            importance_weights=weights)
        metrics.update(sampling_pairs)
    return loss, (metrics, extremes)


def entropy_bonus_enabled(config: GRPOConfig) -> bool:
    """Whether the loss has an entropy bonus (then the entropies are differentiated): a coefficient, or adaptive
    control (whose coefficient may fall to 0 and rise again)."""
    return config.entropy_coef != 0.0 or config.use_adaptive_entropy


def next_entropy_coef(config: GRPOConfig, entropy_coef: float, entropy: float) -> float:
    """Adaptive entropy control (Skywork-OR1, arXiv:2505.22312; TRL's `use_adaptive_entropy`): the coefficient after
    a step whose mean entropy over the bonus's tokens was `entropy`: up by `entropy_coef_delta` when it is at or
    below `entropy_target`, down otherwise, within [entropy_coef_min, entropy_coef_max]."""
    if entropy <= config.entropy_target:
        return min(entropy_coef + config.entropy_coef_delta, config.entropy_coef_max)
    return max(entropy_coef - config.entropy_coef_delta, config.entropy_coef_min)


def make_train_step(config: GRPOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None,
                    prompt_group: int = 1):
    """`state, metrics = step(state, batch)`: one optimizer step over rollout arrays shaped
    `[accumulation, micro_batch, ...]` (`prompt_ids`, `prompt_mask`, `completion_ids`, `attention_mask`,
    `completion_mask`, `advantages`, and optionally `old_logps` / `ref_logps` / `sampler_logps`, and
    `entropy_coef` `[accumulation, micro_batch]` (the entropy bonus's coefficient this step, the same value
    everywhere; default `config.entropy_coef`)), micro-batches scanned inside. With an entropy bonus the metrics
    add `policy_loss` (the loss without the bonus), `entropy_coef` and `entropy_bonus_mean` (the entropy over the
    bonus's tokens, which adaptive control reads). Without `old_logps` the update is on-policy (ratio exactly 1).
    With `sampler_logps` (the sampler's log-probs) it logs the sampler/trainer mismatch and can correct for it
    (`sampler_importance_sampling_correction`); `off_policy_mask_threshold` measures the KL from them.
    jitted with explicit shardings and the state donated.
    `prompt_group` (`rollout.shared_prompt_group`, what `train()` passes): the micro-batches' rows come in runs of
    `prompt_group` completions of one prompt, in the rollout's order, and each prompt goes through the forward and
    backward passes once for its run (`rollout.completion_logps`); 1: every row computes its own prompt."""

    def step(state: TrainState, batch: dict):
        mask = batch["completion_mask"].astype(jnp.float32)
        totals = {"tokens": jnp.maximum(jnp.sum(mask), 1.0),
                  "sequences": float(batch["completion_mask"].shape[0] * batch["completion_mask"].shape[1]),
                  "accumulation": float(batch["completion_mask"].shape[0])}
        # differentiate the trained parameters only (under LoRA the adapters, with their dropout; the frozen base
        # joins them here)
        grad_fn = lora.value_and_grad(partial(loss_fn, prompt_group=prompt_group), state, seed=config.seed)

        def micro_step(grads, inputs):
            micro_batch, micro_index = inputs
            (loss, aux), micro_grads = grad_fn(state.params, state.graphdef, micro_batch, config, totals,
                                               micro_index=micro_index)
            return jax.tree.map(jnp.add, grads, micro_grads), (loss, aux)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro_indices = jnp.arange(jax.tree.leaves(batch)[0].shape[0])
        grads, (losses, (metric_pairs, extremes)) = jax.lax.scan(micro_step, zeros, (batch, micro_indices))
        # the micro-batches' parts of the policy loss add up (each is normalised by the whole step)
        policy_loss = metric_pairs.pop("policy_loss", None)
        metrics = mean_metrics(total_metrics(metric_pairs))
        if policy_loss is not None:
            metrics["policy_loss"] = jnp.sum(policy_loss[0])
        metrics.update(combine_extremes(extremes))
        metrics["loss"] = jnp.sum(losses)
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.apply_gradients(grads), metrics

    return jit_step(step, mesh=mesh, state_sharding=state_sharding)


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------


def train(model: nnx.Module, tokenizer, dataset, config: GRPOConfig, *, reward_funcs: Sequence[Callable | str],
          ref_model: nnx.Module | None = None, eval_dataset=None, tools: Sequence[Callable] | None = None,
          environment_factory: Callable | None = None, tool_format=None, method: str = "GRPO",
          make_train_step: Callable = make_train_step) -> loop.TrainResult:
    """GRPO on the prompts of `dataset` (TRL prompt-only format; other columns go to the reward functions):
    progress bar, `metrics.jsonl` with TRL's names, evaluation (sampled rewards on `eval_dataset`), orbax
    checkpoints at rollout boundaries, exact resume, HF export. `reward_funcs`: callables with TRL's signature,
    names from `jaxpt.rewards.REWARD_FUNCTIONS`, or `jaxpt.rewards.model_reward(...)`. `tools` (Python callables),
    `environment_factory` and `tool_format` (`jaxpt.tools.ToolFormat`): tool-using multi-turn rollouts, TRL's
    `tools` / `environment_factory` (see `jaxpt/tools.py`). `method` and `make_train_step`: for a method that is
    GRPO with another step (`jaxpt.experimental.gmpo`), its name (messages, checkpoints, progress) and its step."""
    config.validate()  # again: fields may have been changed since the config was built
    loop.prepare_output_dir(config)
    reward_funcs = [resolve_reward_function(f) for f in reward_funcs]
    toolbox = toolbox_from(config, tools=tools, environment_factory=environment_factory, tool_format=tool_format,
                           method=method)
    if not reward_funcs and (toolbox is None or not toolbox.environment_rewards):
        raise ValueError(f"reward_funcs is empty: {method} needs at least one reward function.")
    if config.reward_weights is not None and len(config.reward_weights) != len(reward_funcs):
        raise ValueError(f"reward_weights has {len(config.reward_weights)} entries for {len(reward_funcs)} reward "
                         "functions.")
    mesh = mesh_from_config(config)
    micro_batch, steps_per_generation, prompts_per_rollout = rollout_shape(config, batch_divisor(mesh))
    accumulation = config.gradient_accumulation_steps
    steps_per_rollout = config.num_iterations * steps_per_generation // accumulation
    # On several processes each tokenizes only the prompts its devices feed to the rollouts' generate input.
    whole = not distributed.shares_data() or toolbox is not None  # tool rollouts: every prompt everywhere
    start_rollout = loop.planned_start_step(config) // steps_per_rollout
    prompts, share = prepare_rollout_prompts(dataset, tokenizer, config, method=method, mesh=mesh,
                                             prompts_per_rollout=prompts_per_rollout,
                                             steps_per_rollout=steps_per_rollout, start_rollout=start_rollout,
                                             whole=whole)
    eval_prompts, eval_share = None, None
    if eval_dataset is not None and config.eval_strategy != "no":  # several processes: likewise, the eval prompts
        eval_prompts, eval_share = prepare_eval_prompts(eval_dataset, tokenizer, config, method=method, mesh=mesh,
                                                        prompts_per_rollout=prompts_per_rollout,
                                                        whole=whole)
    evaluation_config = eval_config(config, prompts_per_rollout=prompts_per_rollout, micro_batch=micro_batch)
    rollouts_per_epoch = data.steps_per_epoch(share.num_examples, prompts_per_rollout, method=method)
    steps_in_epoch = rollouts_per_epoch * steps_per_rollout
    total_steps = data.total_steps(config, steps_in_epoch)
    total_rollouts = -(-total_steps // steps_per_rollout)
    distributed.on_every_process(check_rollout_inputs, reward_funcs, [model, ref_model], prompts, eval_prompts,
                                 tokenizer, config, method=method, tools=toolbox, what=f"{method} prompts")
    if ref_model is not None and config.beta != 0.0:
        check_reference_dtypes(nnx.state(model, nnx.Param), nnx.state(ref_model, nnx.Param))

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    # Each micro-batch holds whole groups of a prompt's completions: the update runs each prompt once per group.
    prompt_group = shared_prompt_group(config.num_generations, micro_batch, devices=batch_divisor(mesh),
                                       tools=toolbox, adapter_dropout=lora.has_adapter_dropout(model))
    # Old and reference log-probs: the train step's log-prob function, jitted once (exact ratios in every dtype).
    logps_fn = make_logps_fn(state.graphdef, temperature=config.temperature, chunk_size=config.logits_chunk_size,
                             micro_batch=micro_batch, mesh=mesh, prompt_group=prompt_group)
    ref_logps_fn, reference = None, None  # a reference only with a KL term (beta != 0)
    if config.beta != 0.0:
        if ref_model is None:
            check_reference_without_adapters(model, method=f"{method} with beta > 0")
        # under LoRA the default is the base with the adapters off; a ref_model runs with zero adapters
        reference = (lora.with_adapters_off(nnx.state(ref_model, nnx.Param), state) if ref_model is not None
                     else reference_params(state))
        check_reference_sync(config, lora=state.frozen is not None, method=method)
        if config.sync_ref_model and ref_model is not None:  # the synced reference is our own copy
            reference = jax.tree.map(jnp.copy, reference)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding, prompt_group=prompt_group)
    checkpoints = loop.checkpointer(config, method=method.lower(), model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints,
                                              extra=checkpoint_extra(config, reference))
    if start_step % steps_per_rollout:
        raise ValueError(f"Checkpoint step {start_step} is not at a rollout boundary ({steps_per_rollout} steps per "
                         "rollout).")
    loop.check_planned_start(share, start_step // steps_per_rollout)  # the share was prepared from the planned step
    prompt_buckets = agree_prompt_lengths(share, prompts, start_rollout=start_step // steps_per_rollout,
                                          total_rollouts=total_rollouts)  # and every rollout's longest prompt
    if reference is not None:  # TR-DPO: continue from the checkpoint's synced reference
        reference = resumed_reference(config, reference, progress, start_step, method=method)
        ref_logps_fn = make_ref_logps_fn(reference, state.graphdef, temperature=config.temperature,
                                         chunk_size=config.logits_chunk_size, micro_batch=micro_batch, mesh=mesh,
                                         logps_fn=logps_fn)
    num_tokens = progress.get("num_tokens", 0)
    # Adaptive entropy control's state: the coefficient and the last step's entropy (inf: no bonus before the first
    # measurement, as TRL), saved with the checkpoints.
    entropy_coef = progress.get("entropy_coef", config.entropy_coef)
    last_entropy = progress.get("last_entropy") if progress.get("last_entropy") is not None else math.inf
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description=method.lower(), start_step=start_step, config=config.to_dict())
    order = data.step_indices(share.num_examples, prompts_per_rollout, seed=config.seed, shuffle=config.shuffle_dataset,
                              start_step=start_step // steps_per_rollout)
    base_key = jax.random.key(config.seed)
    step = start_step
    try:
        while step < total_steps:
            rollout_index = step // steps_per_rollout
            _, indices = next(order)
            # several processes: this one's prompts' ids, the agreed longest prompt, every prompt's text and columns
            chunk, longest_prompt = rollout_prompts(share, prompts, dataset, indices, rollout_index)
            arrays, rollout_metrics, records = rollout(
                state, chunk, reward_funcs, tokenizer, config, key=jax.random.fold_in(base_key, rollout_index),
                mesh=mesh, prompt_buckets=prompt_buckets, longest_prompt=longest_prompt,
                ref_logps_fn=ref_logps_fn, policy_logps_fn=logps_fn if steps_per_rollout > 1 else None,
                tools=toolbox)
            check_prompt_groups(arrays, prompt_group)
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
                    if config.use_adaptive_entropy:  # applied only at or below the target, as last measured
                        applied = entropy_coef if last_entropy <= config.entropy_target else 0.0
                        batch["entropy_coef"] = np.full((accumulation, micro_batch), applied, np.float32)
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
                    if config.use_adaptive_entropy:
                        last_entropy = float(metrics["entropy_bonus_mean"])
                        entropy_coef = next_entropy_coef(config, entropy_coef, last_entropy)
                        metrics = {**metrics, "entropy_coef": entropy_coef}  # TRL logs the updated coefficient
                    if iteration == 0:
                        num_tokens += rollout_tokens * accumulation // steps_per_generation
                    step += 1
                    log.log(step, {**metrics, **rollout_metrics, "learning_rate": schedule(step - 1),
                                   "num_tokens": num_tokens}, epoch=step / steps_in_epoch)
            if eval_prompts and loop.should_evaluate(config, step, steps_in_epoch):
                log.write({"step": step, **evaluate_rollouts(rollout, state, eval_prompts, reward_funcs, tokenizer,
                                                             evaluation_config, mesh=mesh,
                                                             prompt_buckets=prompt_buckets,
                                                             prompts_per_rollout=prompts_per_rollout,
                                                             share=eval_share, dataset=eval_dataset,
                                                             tools=toolbox)})
            if config.save_steps and step // config.save_steps > (step - steps_per_rollout) // config.save_steps:
                log.sync()
                checkpoints.save(step, state, {"num_tokens": num_tokens, "entropy_coef": entropy_coef,
                                               "last_entropy": None if math.isinf(last_entropy) else last_entropy},
                                 extra=checkpoint_extra(config, reference))
        log.flush(step, epoch=step / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))

