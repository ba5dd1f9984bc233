"""Asynchronous GRPO: the rollout of the next batch overlaps the update of the current one, with bounded staleness
and importance correction: `AsyncGRPOConfig`, `behaviour_version`, `rollout`, `train`. Experimental: no stability
promise (see `jaxpt.experimental`). TRL 1.16 has it as `trl.experimental.async_grpo` (`AsyncGRPOTrainer`: a vLLM
server generates in another process while the trainer consumes a queue of scored samples, dropping those more than
`max_staleness` weight versions old); names follow it.

In jaxpt everything runs in one process, so the design is simpler and deterministic:

- One rollout (`num_generations` completions for each of the step's prompts: `per_device_train_batch_size x devices x
  gradient_accumulation_steps` completions) feeds exactly one optimizer step. The policy version is the number of
  optimizer steps taken.
- The rollout of step k samples with the parameters of version `behaviour_version(k) = max(k - max_staleness,
  start)`: at the start of step j the loop hands the rollout of step j + max_staleness, with a copy of the current
  parameters, to one background thread, then waits for the rollout of step j and dispatches its update. The thread
  samples (the jitted decode loop), decodes and scores (the reward functions, on the host) while the main thread's
  update runs; JAX dispatch is asynchronous and thread-safe, so the device computations of both are queued as they
  come and the host-side work of one hides behind the device work of the other. The staleness of step k's samples
  is exactly `min(k - start, max_staleness)`: the bound is the pipeline's depth, never exceeded, so nothing is
  dropped (TRL's queue reaches the same depth in its steady state; its staleness varies with the machines' speeds,
  jaxpt's is fixed, so a run is reproducible from its seed).
- Importance correction: a stale rollout carries `old_logps`, the behaviour policy's per-token log-probs of its
  completions (the training forward pass with the parameters it was sampled with, computed in the same thread), and
  the update is GRPO's clipped surrogate with the ratio `exp(log pi_current - log pi_behaviour)`, the clipped PPO
  ratio TRL's asynchronous trainer applies to its stale samples (TRL takes the vLLM sampler's log-probs; jaxpt's
  training forward pass is exactly the behaviour policy in float32, and GRPO's
  `sampler_importance_sampling_correction` corrects the bfloat16 sampler mismatch on top). A fresh rollout (staleness
  0, always so with `max_staleness=0`) has no `old_logps`: its update is synchronous GRPO's on-policy step, exactly.
- Memory: each queued rollout holds a copy of the trained parameters of its version (under LoRA the adapters only),
  so up to `max_staleness` extra copies.

Everything else is `jaxpt.grpo`'s: the config's loss types, clipping, KL to a reference, reward weighting, sampling
options, the rollout (`grpo.rollout`: sampling, scoring, group advantages) and the jitted step
(`grpo.make_train_step`). Metrics: GRPO's, plus TRL's `sample/staleness_mean`, `sample/staleness_max` and
`perf/rollout_wait_s` (seconds the update waited for its rollout: near 0 when the overlap hides the rollout).
Not offered: TRL's vLLM server and queue settings (`vllm_server_*`, `max_inflight_tasks`, `queue_maxsize`,
`weight_sync_steps`, `token_budget`), several optimizer steps per rollout (`num_iterations`, `steps_per_generation`),
adaptive entropy control, TR-DPO reference sync and tools (use `jaxpt.grpo`). On several processes the rollouts run
on the main thread (their collectives must come in the same order everywhere): the same numbers, without the overlap.
A resumed run refills the pipeline from the restored parameters, so its first `max_staleness` rollouts are fresher
than the uninterrupted run's (a warning says so).

```python
config = AsyncGRPOConfig(output_dir="out", max_staleness=1, num_generations=8, max_steps=100)
result = jaxpt.experimental.async_grpo.train(model, tokenizer, prompts, config, reward_funcs=[my_reward])
```
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpt import data, distributed, grpo, loop, lora
from jaxpt.logging import MetricsLogger
from jaxpt.lora import check_reference_without_adapters
from jaxpt.models import set_gradient_checkpointing
from jaxpt.rewards import resolve_reward_function
from jaxpt.rollout import (
    append_jsonl,
    check_prompt_groups,
    check_reference_dtypes,
    check_rollout_inputs,
    evaluate_rollouts,
    make_logps_fn,
    make_ref_logps_fn,
    reference_params,
    rollout_shape,
    shared_prompt_group,
    toolbox_from,
)
from jaxpt.sharding import batch_divisor, mesh_from_config, shard_batch
from jaxpt.train_state import TrainState, make_optimizer

logger = logging.getLogger("jaxpt")


@dataclass
class AsyncGRPOConfig(grpo.GRPOConfig):
    """`jaxpt.grpo.GRPOConfig` plus TRL 1.16's `AsyncGRPOConfig.max_staleness`, with TRL's asynchronous defaults
    (`max_completion_length`, `lr_scheduler_type`, `logging_steps`)."""

    max_staleness: int = field(default=4, metadata={
        "help": "Policy versions (optimizer steps) a rollout's samples lag behind the parameters they update: the "
                "rollout of step k samples with the parameters after step k - max_staleness (0: synchronous GRPO)."})
    max_completion_length: int = field(default=2048, metadata={"help": "Tokens generated per completion at most "
                                                                       "(TRL's asynchronous default)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule (TRL's asynchronous "
                                                                         "default: constant)."})
    logging_steps: int = field(default=1, metadata={"help": "Optimizer steps per metrics.jsonl line (TRL's "
                                                            "asynchronous default: 1)."})

    def validate(self) -> None:
        super().validate()
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness={self.max_staleness} must be >= 0 (0: synchronous GRPO).")
        if self.num_iterations != 1:
            raise ValueError(f"num_iterations={self.num_iterations}: asynchronous GRPO takes one optimizer step per "
                             "rollout; set num_iterations=1 (or use jaxpt.grpo).")
        if self.generation_batch_size is not None or self.steps_per_generation not in (
                None, self.gradient_accumulation_steps):
            raise ValueError(f"generation_batch_size={self.generation_batch_size} / steps_per_generation="
                             f"{self.steps_per_generation}: asynchronous GRPO samples one optimizer step's "
                             "completions per rollout; leave both unset (or use jaxpt.grpo).")
        if self.use_adaptive_entropy or self.sync_ref_model:
            raise ValueError("use_adaptive_entropy / sync_ref_model are not supported by asynchronous GRPO (their "
                             "state would have to follow the rollout pipeline); use jaxpt.grpo.")


# --------------------------------------------------------------------------------------------------------------
# Rollouts with a past policy
# --------------------------------------------------------------------------------------------------------------


def behaviour_version(step: int, *, max_staleness: int, start_step: int = 0) -> int:
    """The policy version (optimizer steps taken) whose parameters sample the rollout of `step`: `max_staleness`
    versions back, never before the run's (or resume's) first step."""
    return max(step - max_staleness, start_step)


@dataclass
class PolicySnapshot:
    """The parameters of one policy version, shaped like a `TrainState` for `grpo.rollout` (`graphdef`,
    `full_params()`): what a queued rollout samples with after the state has moved on."""

    graphdef: nnx.GraphDef
    params: nnx.State
    version: int

    def full_params(self) -> nnx.State:
        return self.params


def snapshot(state: TrainState, version: int, *, copy: bool) -> PolicySnapshot:
    """`state`'s parameters as version `version`; `copy`: its own copy of the trained parameters (the train step
    donates the state's), joined with the frozen base under LoRA (never donated, so never copied)."""
    params = state.full_params(jax.tree.map(jnp.copy, state.params)) if copy else state.full_params()
    return PolicySnapshot(state.graphdef, params, version)


def rollout(policy: PolicySnapshot, prompts: Sequence[dict], reward_funcs: Sequence[Callable], tokenizer,
            config: AsyncGRPOConfig, *, staleness: int, key: jax.Array, mesh, prompt_buckets: Sequence[int],
            logps_fn: Callable, ref_logps_fn: Callable | None = None):
    """`grpo.rollout` sampled with `policy`, for an update `staleness` versions later: a stale one (staleness > 0)
    gets `old_logps`, the behaviour policy's training-forward log-probs (`logps_fn`, `rollout.make_logps_fn`), which
    the update's importance ratio divides by; a fresh one none (on-policy, as synchronous GRPO)."""
    return grpo.rollout(policy, prompts, reward_funcs, tokenizer, config, key=key, mesh=mesh,
                        prompt_buckets=prompt_buckets, ref_logps_fn=ref_logps_fn,
                        policy_logps_fn=logps_fn if staleness > 0 else None)


make_train_step = grpo.make_train_step  # the update is GRPO's, with `old_logps` from the behaviour policy


class _Ready:
    """A finished rollout in a future's clothes (the rollouts of a multi-process run, made on the main thread)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------


@dataclass
class AsyncGRPOResult(loop.TrainResult):
    behaviour_versions: list[int] = field(default_factory=list)  # per step trained here: its samples' policy version


def train(model: nnx.Module, tokenizer, dataset, config: AsyncGRPOConfig, *, reward_funcs: Sequence[Callable | str],
          ref_model: nnx.Module | None = None, eval_dataset=None) -> AsyncGRPOResult:
    """Asynchronous GRPO on the prompts of `dataset` (TRL prompt-only format; other columns go to the reward
    functions): `jaxpt.grpo.train`'s loop (progress, `metrics.jsonl` with TRL's names, evaluation, orbax checkpoints,
    HF export) with the rollout pipeline of the module docstring. The result's `behaviour_versions` records, for
    every step trained, the policy version its samples came from."""
    config.validate()
    loop.prepare_output_dir(config)
    reward_funcs = [resolve_reward_function(f) for f in reward_funcs]
    toolbox_from(config, tools=None, environment_factory=None, tool_format=None, method="Async GRPO")  # no tools
    if not reward_funcs:
        raise ValueError("reward_funcs is empty: asynchronous GRPO needs at least one reward function.")
    if config.reward_weights is not None and len(config.reward_weights) != len(reward_funcs):
        raise ValueError(f"reward_weights has {len(config.reward_weights)} entries for {len(reward_funcs)} reward "
                         "functions.")
    mesh = mesh_from_config(config)
    micro_batch, _, prompts_per_rollout = rollout_shape(config, batch_divisor(mesh))
    accumulation = config.gradient_accumulation_steps
    prompts = data.prepare_prompts(dataset, tokenizer, method="Async GRPO", max_prompt_length=config.max_prompt_length)
    eval_prompts = None
    if eval_dataset is not None and config.eval_strategy != "no":
        eval_prompts = data.prepare_prompts(eval_dataset, tokenizer, method="Async GRPO",
                                            max_prompt_length=config.max_prompt_length)
    distributed.check_same_data(prompts, what="Async GRPO prompts")
    steps_in_epoch = data.steps_per_epoch(len(prompts), prompts_per_rollout, method="Async GRPO")
    total_steps = data.total_steps(config, steps_in_epoch)
    prompt_buckets = data.length_buckets(max(max(len(p["prompt_ids"]) for p in prompts), 16), min_length=16)
    check_rollout_inputs(reward_funcs, [model, ref_model], prompts, eval_prompts, tokenizer, config,
                         method="Async GRPO")
    if ref_model is not None and config.beta != 0.0:
        check_reference_dtypes(nnx.state(model, nnx.Param), nnx.state(ref_model, nnx.Param))

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    # each micro-batch holds whole groups of a prompt's completions: the update runs each prompt once per group
    prompt_group = shared_prompt_group(config.num_generations, micro_batch, devices=batch_divisor(mesh),
                                       adapter_dropout=lora.has_adapter_dropout(model))
    logps_fn = make_logps_fn(state.graphdef, temperature=config.temperature, chunk_size=config.logits_chunk_size,
                             micro_batch=micro_batch, mesh=mesh, prompt_group=prompt_group)
    ref_logps_fn = None
    if config.beta != 0.0:
        if ref_model is None:
            check_reference_without_adapters(model, method="Async GRPO with beta > 0")
        reference = (lora.with_adapters_off(nnx.state(ref_model, nnx.Param), state) if ref_model is not None
                     else reference_params(state))
        ref_logps_fn = make_ref_logps_fn(reference, state.graphdef, temperature=config.temperature,
                                         chunk_size=config.logits_chunk_size, micro_batch=micro_batch, mesh=mesh,
                                         logps_fn=logps_fn)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding, prompt_group=prompt_group)
    checkpoints = loop.checkpointer(config, method="async_grpo", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints)
    if start_step and config.max_staleness:
        logger.warning(f"Resumed at step {start_step}: the rollout pipeline refills from the restored parameters, so "
                       f"the next {config.max_staleness} rollouts are fresher than in an uninterrupted run.")
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="async_grpo", start_step=start_step, config=config.to_dict())
    order = data.step_indices(len(prompts), prompts_per_rollout, seed=config.seed, shuffle=config.shuffle_dataset,
                              start_step=start_step)
    base_key = jax.random.key(config.seed)
    # one background thread samples the queued rollouts in order; several processes keep them on the main thread
    worker = concurrent.futures.ThreadPoolExecutor(1, "jaxpt-rollout") if jax.process_count() == 1 else None
    pending: dict[int, tuple[int, Any]] = {}  # step -> (behaviour version, future of grpo.rollout's result)
    behaviour_versions = []
    next_rollout = start_step
    try:
        for step in range(start_step, total_steps):
            # queue the rollouts up to step + max_staleness with the current parameters (version `step`)
            fresh = stale = None  # one snapshot of version `step` shared by the rollouts queued now
            while next_rollout < min(step + config.max_staleness + 1, total_steps):
                staleness = next_rollout - step
                if staleness == 0:  # awaited below, before the update donates the state: no copy needed
                    policy = fresh = fresh or snapshot(state, step, copy=False)
                else:
                    policy = stale = stale or snapshot(state, step, copy=True)
                _, indices = next(order)
                work = (rollout, policy, [prompts[i] for i in indices], reward_funcs, tokenizer, config)
                options = dict(staleness=staleness, key=jax.random.fold_in(base_key, next_rollout), mesh=mesh,
                               prompt_buckets=prompt_buckets, logps_fn=logps_fn, ref_logps_fn=ref_logps_fn)
                pending[next_rollout] = (step, worker.submit(*work, **options) if worker
                                         else _Ready(work[0](*work[1:], **options)))
                next_rollout += 1
            version, future = pending.pop(step)
            waited = time.perf_counter()
            arrays, rollout_metrics, records = future.result()
            waited = time.perf_counter() - waited
            behaviour_versions.append(version)
            if config.log_completions:
                append_jsonl(Path(config.output_dir) / "completions.jsonl",
                             [{"step": step, "policy_version": version, **r} for r in records])
            check_prompt_groups(arrays, prompt_group)
            batch = {k: v.reshape(accumulation, micro_batch, *v.shape[1:]) for k, v in arrays.items()}
            placed = shard_batch(batch, mesh, batch_axis=1, global_batch=True, check_shapes=False)
            state, metrics = train_step(state, placed)
            num_tokens += int(arrays["prompt_mask"].sum() + arrays["attention_mask"].sum())
            done = step + 1
            staleness_metrics = {"sample/staleness_mean": float(step - version),
                                 "sample/staleness_max": float(step - version), "perf/rollout_wait_s": waited}
            log.log(done, {**metrics, **rollout_metrics, **staleness_metrics, "learning_rate": schedule(step),
                           "num_tokens": num_tokens}, epoch=done / steps_in_epoch)
            if eval_prompts and loop.should_evaluate(config, done, steps_in_epoch):
                log.write({"step": done, **evaluate_rollouts(grpo.rollout, state, eval_prompts, reward_funcs,
                                                             tokenizer, config, mesh=mesh,
                                                             prompt_buckets=prompt_buckets,
                                                             prompts_per_rollout=prompts_per_rollout)})
            if config.save_steps and done % config.save_steps == 0:
                log.sync()
                checkpoints.save(done, state, {"num_tokens": num_tokens})
        log.flush(total_steps, epoch=total_steps / steps_in_epoch)
    finally:
        if worker is not None:
            worker.shutdown(wait=True, cancel_futures=True)
        log.close()
        checkpoints.close()
    return AsyncGRPOResult(state, log.history, loop.export(state, tokenizer, config),
                           behaviour_versions=behaviour_versions)
