"""RLOO: `RLOOConfig`, rollouts (sample, reward, leave-one-out advantages), `make_train_step`, `train`.

All of RLOO is here and in `jaxpt/losses/rloo.py`: GRPO's sibling with REINFORCE leave-one-out advantages,
the KL to the reference as a reward penalty (`beta`, first-order estimator summed over the sequence) and a
clipped *sequence*-level ratio. Sampling, scoring and the batch arithmetic (TRL's) are shared with GRPO in
`jaxpt/rollout.py`: one rollout samples `num_generations` completions for each of
`generation_batch_size / num_generations` prompts with the training parameters, then `num_iterations` passes of
optimizer steps consume it.

```python
config = RLOOConfig(output_dir="out", num_generations=4, max_completion_length=64, max_steps=100)
result = jaxpt.rloo.train(model, tokenizer, prompts_dataset, config, reward_funcs=["accuracy_reward"])
```

Old log-probs, as TRL: a forward pass with the training log-prob function and the parameters before the first
update, which the KL penalty uses (with the reference's log-probs from the very same jitted function, so the
penalty is exactly 0 while the reference equals the policy, in every dtype) and the ratio divides by when a
rollout feeds several optimizer steps; with one optimizer step per rollout the update is on-policy, old =
stop_gradient(current), and the ratio is exactly 1. The sampler's own log-probs (decode loop) differ from the
training forward pass's in bfloat16; every step logs the gap with TRL's GRPO names
(`sampling/sampling_logp_difference/mean|max`, `sampling/importance_sampling_ratio/min|mean|max`, raw per-token
ratios: TRL's RLOO has no importance-sampling correction, nor does jaxpt's).

TRL 1.16's `RLOOConfig`, field by field: the RLOO, sampling and logging fields are here with TRL's names and
defaults, `repetition_penalty`, `generation_kwargs` (its sampler keys), `chat_template_kwargs` and
`num_generations_eval` included (`jaxpt/rollout.py`). What cannot apply to an in-process JAX sampler fails with the
reason on the command line (`jaxpt.cli.TRL_ONLY_OPTIONS`; a `TypeError` in Python): `use_vllm` and `vllm_*`,
`use_transformers_paged` / `_continuous_batching`, `cache_implementation`, `ds3_gather_for_generation`,
`model_init_kwargs`, `trust_remote_code`, `pad_to_multiple_of` (length buckets instead), `disable_dropout` (no
dropout), `router_aux_loss_coef` (no MoE family), `log_multimodal`, `log_unique_prompts`,
`num_completions_to_print` (`log_completions` writes `completions.jsonl`).
"""

from __future__ import annotations

import logging
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
from jaxpt.losses.metrics import mean_metrics, sum_and_count, total_metrics
from jaxpt.losses.rloo import penalized_rewards, rloo_advantages, rloo_loss
from jaxpt.losses.sampled_rewards import nanstd, reward_metrics
from jaxpt.losses.sampler_mismatch import combine_extremes, sampler_mismatch_metrics
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
class RLOOConfig(TrainingConfig):
    """TRL's `RLOOConfig` fields that have a meaning here (same names and defaults)."""

    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate (TRL's RLOO default)."})
    num_generations: int = field(default=2, metadata={"help": "Completions sampled per prompt (>= 2)."})
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
    num_iterations: int = field(default=1, metadata={"help": "Passes over each rollout."})
    beta: float = field(default=0.05, metadata={"help": "KL penalty coefficient in the reward (0: no reference)."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping bound of the sequence ratio."})
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clipping (default: epsilon)."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weight of each reward function "
                                                                               "(default: all 1)."})
    reward_clip_range: list[float] | None = field(default=None, metadata={"help": "Clip rewards to [low, high] "
                                                                                  "before the KL penalty."})
    normalize_advantages: bool = field(default=False, metadata={"help": "Standardise advantages over the "
                                                                        "rollout."})
    mask_truncated_completions: bool = field(default=False, metadata={"help": "Leave completions cut at "
                                                                              "max_completion_length out of the "
                                                                              "loss."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle prompts every epoch (seeded)."})
    log_completions: bool = field(default=False, metadata={"help": "Append every rollout's prompts, completions "
                                                                   "and rewards to output_dir/completions.jsonl."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk when computing log-probs."})
    max_tool_calling_iterations: int | None = field(default=None, metadata={
        "help": "With tools (train(tools=..., environment_factory=...)): rounds of tool calls per completion at most "
                "(None: until a turn makes no call or max_completion_length is reached; GRPO's name in TRL). See "
                "jaxpt/tools.py."})
    sync_ref_model: bool = field(default=False, metadata={
        "help": "TR-DPO (arXiv:2404.09656): every ref_model_sync_steps steps move the reference toward the policy, "
                "ref <- alpha * policy + (1 - alpha) * ref (needs beta > 0; not with LoRA)."})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "TR-DPO's alpha: the policy's share in the "
                                                                        "reference update."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "TR-DPO's tau: optimizer steps between "
                                                                     "reference updates."})

    def validate(self) -> None:
        super().validate()
        check_generation_options(self)
        if self.num_generations < 2:
            raise ValueError(f"num_generations={self.num_generations}: RLOO needs at least 2 completions per prompt "
                             "(the baseline leaves one out).")
        if self.max_completion_length < 1 or self.num_iterations < 1:
            raise ValueError("max_completion_length and num_iterations must be >= 1.")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length={self.max_prompt_length} must be >= 1 (or None: no truncation).")
        if self.beta < 0:
            raise ValueError(f"beta={self.beta} must be >= 0 (0: no reference model).")
        if self.sync_ref_model and self.beta == 0.0:
            raise ValueError("sync_ref_model=True with beta=0.0: there is no reference model to synchronise; set "
                             "beta > 0 or sync_ref_model=False.")
        check_reference_sync(self, lora=False, method="RLOO")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError(f"epsilon={self.epsilon} and epsilon_high={self.epsilon_high} must be >= 0 (the ratio "
                             "is clipped to [1 - epsilon, 1 + epsilon_high]).")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0.")
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError("Set generation_batch_size or steps_per_generation, not both.")
        if self.reward_clip_range is not None and len(self.reward_clip_range) != 2:
            raise ValueError(f"reward_clip_range={self.reward_clip_range} must be [low, high].")
        if self.max_tool_calling_iterations is not None and self.max_tool_calling_iterations < 0:
            raise ValueError(f"max_tool_calling_iterations={self.max_tool_calling_iterations} must be >= 0 (or None: "
                             "no limit).")


# --------------------------------------------------------------------------------------------------------------
# Batch arithmetic and rollouts
# --------------------------------------------------------------------------------------------------------------


def rollout(state: TrainState, prompts: Sequence[dict], reward_funcs: Sequence[Callable], tokenizer,
            config: RLOOConfig, *, key: jax.Array, mesh, prompt_buckets: Sequence[int], ref_logps_fn=None,
            policy_logps_fn=None, tools=None, longest_prompt: int | None = None):
    """Sample `num_generations` completions per prompt, score them, and compute leave-one-out advantages with
    the KL penalty in the reward. Returns `(arrays, metrics, records)` like GRPO's rollout.
    `policy_logps_fn(params, arrays)` (`rollout.make_logps_fn`): the arrays get `old_logps` from the training
    forward pass with `state.full_params()`; needed with `ref_logps_fn` (the KL penalty) and for a rollout that feeds
    several optimizer steps. `tools` (`jaxpt.tools.Toolbox`): multi-turn rollouts with tool calls.
    `longest_prompt`: several processes, each holding only its own prompts' ids (`rollout.rollout_prompts`)."""
    if ref_logps_fn is not None and policy_logps_fn is None:
        raise ValueError("RLOO's KL penalty (ref_logps_fn) needs policy_logps_fn: the policy's log-probs must come "
                         "from the training forward pass (rollout.make_logps_fn), not from the sampler.")
    sampled = sample_and_score(state, prompts, reward_funcs, tokenizer, config, key=key, mesh=mesh,
                               prompt_buckets=prompt_buckets, tools=tools, longest_prompt=longest_prompt)
    reward_weights = tool_reward_weights(config.reward_weights, sampled.rewards.shape[1])
    if np.isnan(sampled.rewards).all(axis=1).any():  # None (or NaN) from every function
        logger.warning("Some completions got no reward from any reward function; their advantage is 0.")
    arrays = dict(sampled.arrays)
    if policy_logps_fn is not None:
        arrays["old_logps"] = policy_logps_fn(state.full_params(), arrays)
    metrics = {}
    sequence_kl = None
    if ref_logps_fn is not None:
        ref_logps = ref_logps_fn(arrays)
        per_token_kl = (arrays["old_logps"] - ref_logps) * arrays["completion_mask"]
        sequence_kl = per_token_kl.sum(-1)
        metrics["kl"] = float(per_token_kl.sum() / max(arrays["completion_mask"].sum(), 1))
    advantages = np.asarray(rloo_advantages(
        sampled.rewards, num_generations=config.num_generations, sequence_kl=sequence_kl, beta=config.beta,
        reward_weights=reward_weights, reward_clip_range=config.reward_clip_range,
        normalize_advantages=config.normalize_advantages))
    arrays["advantages"] = advantages.astype(np.float32)
    group_metrics = reward_metrics(sampled.rewards, num_generations=config.num_generations,
                                   reward_weights=reward_weights, reward_names=sampled.reward_names)
    # As TRL: a group counts as tied when the rewards its baseline compares (clipped, KL-penalised) are.
    penalized = penalized_rewards(sampled.rewards, sequence_kl=sequence_kl, beta=config.beta,
                                  reward_weights=reward_weights, reward_clip_range=config.reward_clip_range)
    group_std = nanstd(penalized.reshape(-1, config.num_generations), axis=1)
    group_metrics["frac_reward_zero_std"] = jnp.mean(jnp.isclose(group_std, 0.0).astype(jnp.float32))
    metrics.update({k: float(v) for k, v in group_metrics.items()})
    metrics.update(completion_metrics(sampled.lengths, sampled.finished))
    metrics.update(sampled.tool_metrics)
    return arrays, metrics, sampled.records(advantages)


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: RLOOConfig, totals: dict, *,
            prompt_group: int = 1):
    """Loss of one micro-batch, normalised by the whole step's sequences, and its metrics as `(sum, count)` pairs
    (clip ratios over sequences, entropy over completion tokens), which add up over micro-batches exactly."""
    logps, entropy = completion_logps(params, graphdef, batch, temperature=config.temperature,
                                      chunk_size=config.logits_chunk_size, prompt_group=prompt_group)
    mask = batch["completion_mask"].astype(jnp.float32)
    loss, metrics = rloo_loss(logps, batch.get("old_logps"), batch["advantages"], mask, epsilon=config.epsilon,
                              epsilon_high=config.epsilon_high, num_sequences=totals["sequences"],
                              return_counts=True)
    metrics["entropy"] = sum_and_count(entropy, mask)
    extremes = {}
    if "sampler_logps" in batch:  # the sampler/trainer gap, against the old log-probs the ratio divides by
        trainer_logps = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logps)
        sampling_pairs, extremes = sampler_mismatch_metrics(trainer_logps, batch["sampler_logps"], mask)
        metrics.update(sampling_pairs)
    return loss, (metrics, extremes)


def make_train_step(config: RLOOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None,
                    prompt_group: int = 1):
    """`state, metrics = step(state, batch)`: one optimizer step over rollout arrays shaped
    `[accumulation, micro_batch, ...]` (`prompt_ids`, `prompt_mask`, `completion_ids`, `attention_mask`,
    `completion_mask`, `advantages`, and optionally `old_logps` / `sampler_logps`), micro-batches scanned inside.
    Without `old_logps` the update is on-policy (ratio exactly 1); with `sampler_logps` it logs the sampler/trainer
    mismatch. jitted with explicit shardings and the state donated.
    `prompt_group` (`rollout.shared_prompt_group`, what `train()` passes): the micro-batches' rows come in runs of
    `prompt_group` completions of one prompt, in the rollout's order, and each prompt goes through the forward and
    backward passes once for its run (`rollout.completion_logps`); 1: every row computes its own prompt."""

    def step(state: TrainState, batch: dict):
        mask = batch["completion_mask"].astype(jnp.float32)
        totals = {"tokens": jnp.maximum(jnp.sum(mask), 1.0),
                  "sequences": float(batch["completion_mask"].shape[0] * batch["completion_mask"].shape[1])}
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
        metrics = mean_metrics(total_metrics(metric_pairs))
        metrics.update(combine_extremes(extremes))
        metrics["loss"] = jnp.sum(losses)
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.apply_gradients(grads), metrics

    return jit_step(step, mesh=mesh, state_sharding=state_sharding)


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------


def train(model: nnx.Module, tokenizer, dataset, config: RLOOConfig, *, reward_funcs: Sequence[Callable | str],
          ref_model: nnx.Module | None = None, eval_dataset=None, tools: Sequence[Callable] | None = None,
          environment_factory: Callable | None = None, tool_format=None) -> loop.TrainResult:
    """RLOO on the prompts of `dataset` (TRL prompt-only format; other columns go to the reward functions):
    progress bar, `metrics.jsonl` with TRL's names, evaluation (sampled rewards on `eval_dataset`), orbax
    checkpoints at rollout boundaries, exact resume, HF export. `reward_funcs`: callables with TRL's signature,
    names from `jaxpt.rewards.REWARD_FUNCTIONS`, or `jaxpt.rewards.model_reward(...)`. `tools`,
    `environment_factory` and `tool_format`: tool-using multi-turn rollouts, as GRPO's (see `jaxpt/tools.py`)."""
    config.validate()  # again: fields may have been changed since the config was built
    loop.prepare_output_dir(config)
    reward_funcs = [resolve_reward_function(f) for f in reward_funcs]
    toolbox = toolbox_from(config, tools=tools, environment_factory=environment_factory, tool_format=tool_format,
                           method="RLOO")
    if not reward_funcs and (toolbox is None or not toolbox.environment_rewards):
        raise ValueError("reward_funcs is empty: RLOO needs at least one reward function.")
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
    prompts, share = prepare_rollout_prompts(dataset, tokenizer, config, method="RLOO", mesh=mesh,
                                             prompts_per_rollout=prompts_per_rollout,
                                             steps_per_rollout=steps_per_rollout, start_rollout=start_rollout,
                                             whole=whole)
    eval_prompts, eval_share = None, None
    if eval_dataset is not None and config.eval_strategy != "no":  # several processes: likewise, the eval prompts
        eval_prompts, eval_share = prepare_eval_prompts(eval_dataset, tokenizer, config, method="RLOO", mesh=mesh,
                                                        prompts_per_rollout=prompts_per_rollout,
                                                        whole=whole)
    evaluation_config = eval_config(config, prompts_per_rollout=prompts_per_rollout, micro_batch=micro_batch)
    rollouts_per_epoch = data.steps_per_epoch(share.num_examples, prompts_per_rollout, method="RLOO")
    steps_in_epoch = rollouts_per_epoch * steps_per_rollout
    total_steps = data.total_steps(config, steps_in_epoch)
    total_rollouts = -(-total_steps // steps_per_rollout)
    distributed.on_every_process(check_rollout_inputs, reward_funcs, [model, ref_model], prompts, eval_prompts,
                                 tokenizer, config, method="RLOO", tools=toolbox, what="RLOO prompts")
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
            check_reference_without_adapters(model, method="RLOO with beta > 0")
        # under LoRA the default is the base with the adapters off; a ref_model runs with zero adapters
        reference = (lora.with_adapters_off(nnx.state(ref_model, nnx.Param), state) if ref_model is not None
                     else reference_params(state))
        check_reference_sync(config, lora=state.frozen is not None, method="RLOO")
        if config.sync_ref_model and ref_model is not None:  # the synced reference is our own copy
            reference = jax.tree.map(jnp.copy, reference)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding, prompt_group=prompt_group)
    checkpoints = loop.checkpointer(config, method="rloo", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints,
                                              extra=checkpoint_extra(config, reference))
    if start_step % steps_per_rollout:
        raise ValueError(f"Checkpoint step {start_step} is not at a rollout boundary ({steps_per_rollout} steps per "
                         "rollout).")
    loop.check_planned_start(share, start_step // steps_per_rollout)  # the share was prepared from the planned step
    prompt_buckets = agree_prompt_lengths(share, prompts, start_rollout=start_step // steps_per_rollout,
                                          total_rollouts=total_rollouts)  # and every rollout's longest prompt
    if reference is not None:  # TR-DPO: continue from the checkpoint's synced reference
        reference = resumed_reference(config, reference, progress, start_step, method="RLOO")
        ref_logps_fn = make_ref_logps_fn(reference, state.graphdef, temperature=config.temperature,
                                         chunk_size=config.logits_chunk_size, micro_batch=micro_batch, mesh=mesh,
                                         logps_fn=logps_fn)
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="rloo", start_step=start_step, config=config.to_dict())
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
                ref_logps_fn=ref_logps_fn,
                policy_logps_fn=logps_fn if steps_per_rollout > 1 or ref_logps_fn is not None else None,
                tools=toolbox)
            if steps_per_rollout == 1:
                arrays.pop("old_logps", None)  # on-policy: old = stop_gradient(current), ratio exactly 1 (TRL)
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
                log.write({"step": step, **evaluate_rollouts(rollout, state, eval_prompts, reward_funcs, tokenizer,
                                                             evaluation_config, mesh=mesh,
                                                             prompt_buckets=prompt_buckets,
                                                             prompts_per_rollout=prompts_per_rollout,
                                                             share=eval_share, dataset=eval_dataset,
                                                             ref_logps_fn=ref_logps_fn,
                                                             policy_logps_fn=logps_fn, tools=toolbox)})
            if config.save_steps and step // config.save_steps > (step - steps_per_rollout) // config.save_steps:
                log.sync()
                checkpoints.save(step, state, {"num_tokens": num_tokens}, extra=checkpoint_extra(config, reference))
        log.flush(step, epoch=step / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))

