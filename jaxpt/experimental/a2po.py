"""A*-PO: policy optimization by optimal advantage regression (Brantley et al. 2025, "Accelerating RL for LLM
Reasoning with Optimal Advantage Regression", arXiv:2505.20686): `A2POConfig`, the pure pieces (`optimal_values`,
`a2po_loss`), `make_train_step` and `train`. Experimental: no stability promise (see `jaxpt.experimental`).

Two stages, with a (binary) reward r and the reference policy pi_ref (the initial policy):

1. Offline value estimation, once before training: `num_value_samples` completions y_1..y_N of every prompt x are
   sampled from pi_ref and scored, and the optimal value is estimated as

       V*(x) = beta1 * log(mean_i exp(r(x, y_i) / beta1))

   Prompts whose N samples all score 0 are dropped from training (`filter_all_incorrect`): they carry no signal.
2. On-policy regression: one completion y per prompt from the current policy, and the squared error between the
   implicit reward and the optimal advantage,

       L = mean_x (beta2 * (log pi(y|x) - log pi_ref(y|x)) - (r(x, y) - V*(x)))^2

   with sequence log-probs (sums over the completion tokens, EOS included) of the raw logits: unlike GRPO, the
   sampling temperature does not scale them (as TRL).

TRL 1.16: `trl.experimental.a2po.A2POTrainer` (its `compute_loss` and `_estimate_optimal_values`), same config names
and defaults and the same metrics (`reward`, `v_star`, `implicit_reward`, `advantage`). Differences: V* is kept per
prompt row rather than per prompt text (duplicate prompts get one estimate each); a completion no reward function
scored fails (A*-PO needs every reward).

Evaluation (`eval_dataset`, `eval_strategy`/`eval_steps`), as TRL's `prediction_step`: Stage 1 also estimates V* of
the eval prompts (with the initial policy; they are never filtered), then at each evaluation one completion per eval
prompt from the current policy, scored, and the loss above without an update. Logged with TRL's names
`eval_loss`, `eval_reward`, `eval_v_star`, `eval_implicit_reward`, `eval_advantage`: means over all eval prompts
(TRL averages per-batch means; equal when the batches are equal), in batches of `per_device_eval_batch_size x
devices` prompts (the last filled up with its last prompt, whose copies do not count).

```python
config = A2POConfig(output_dir="out", num_value_samples=8, max_completion_length=64, max_steps=100)
result = jaxpt.experimental.a2po.train(model, tokenizer, prompts_dataset, config, reward_funcs=["accuracy_reward"])
```
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
from jaxpt.losses.metrics import MetricPairs, add_metrics, mean_metrics, sum_and_count, total_metrics
from jaxpt.losses.sampled_rewards import combine_rewards
from jaxpt.models import set_gradient_checkpointing
from jaxpt.rewards import resolve_reward_function
from jaxpt.rollout import (
    check_reference_dtypes,
    check_rollout_inputs,
    completion_logps,
    completion_metrics,
    make_logps_fn,
    make_ref_logps_fn,
    reference_params,
    sample_and_score,
)
from jaxpt.sharding import batch_divisor, mesh_from_config, shard_batch
from jaxpt.train_state import TrainState, jit_step, make_optimizer

logger = logging.getLogger("jaxpt")


@dataclass
class A2POConfig(TrainingConfig):
    """TRL 1.16's `A2POConfig` fields that have a meaning here (same names and defaults)."""

    max_prompt_length: int | None = field(default=512, metadata={"help": "Keep the last this many prompt tokens "
                                                                         "(None: no truncation)."})
    max_completion_length: int = field(default=256, metadata={"help": "Tokens generated per completion at most."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature, in both stages (it does not "
                                                              "scale the loss's log-probs)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0: off)."})
    top_k: int | None = field(default=None, metadata={"help": "Top-k sampling (None or 0: off)."})
    num_value_samples: int = field(default=8, metadata={"help": "Stage 1: completions sampled from the reference "
                                                                "policy per prompt to estimate V*."})
    beta1: float = field(default=0.5, metadata={"help": "Stage 1: KL temperature of the V* estimate."})
    filter_all_incorrect: bool = field(default=True, metadata={"help": "Drop the training prompts whose reference "
                                                                       "samples all scored 0."})
    beta2: float = field(default=1e-3, metadata={"help": "Stage 2: KL temperature of the regression target (the "
                                                         "implicit reward is beta2 * log(pi / pi_ref))."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weight of each reward function "
                                                                               "(default: all 1)."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle prompts every epoch (seeded)."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk when computing log-probs."})

    def validate(self) -> None:
        super().validate()
        if self.max_completion_length < 1:
            raise ValueError(f"max_completion_length={self.max_completion_length} must be >= 1.")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length={self.max_prompt_length} must be >= 1 (or None: no truncation).")
        if self.num_value_samples < 1:
            raise ValueError(f"num_value_samples={self.num_value_samples} must be >= 1.")
        if self.beta1 <= 0 or self.beta2 <= 0:
            raise ValueError(f"beta1={self.beta1} and beta2={self.beta2} must be > 0 (KL temperatures).")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0.")


@dataclasses.dataclass(frozen=True)
class _Sampling:
    """What `jaxpt.rollout.sample_and_score` reads from a config: A2PO's sampling with a group size of its own."""

    num_generations: int
    max_completion_length: int
    temperature: float
    top_k: int | None
    top_p: float
    min_p: float | None = None
    mask_truncated_completions: bool = False


# --------------------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------------------


def optimal_values(rewards: jax.Array, *, beta1: float = 0.5) -> jax.Array:
    """Stage 1's `V*(x) = beta1 * log(mean_i exp(r_i / beta1))` `[prompts]` from the rewards `[prompts, samples]`
    of the reference policy's samples (a log-mean-exp, computed stably)."""
    rewards = jnp.asarray(rewards)
    return beta1 * (jax.nn.logsumexp(rewards / beta1, axis=-1) - math.log(rewards.shape[-1]))


def a2po_loss(
    policy_logps: jax.Array,
    ref_logps: jax.Array,
    rewards: jax.Array,
    v_star: jax.Array,
    *,
    beta2: float = 1e-3,
    num_sequences: jax.Array | float | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array] | MetricPairs]:
    """A*-PO's regression loss (see the module docstring) from sequence log-probs `[batch]` of the policy and the
    reference, the rewards and V* `[batch]`: `sum (beta2 (policy - ref) - (reward - v_star))^2 / num_sequences`
    (default: the batch's, i.e. the mean). Metrics: `implicit_reward` and `advantage` (`reward - v_star`), means over
    the sequences; `(sum, count)` pairs with `return_counts`."""
    implicit_reward = beta2 * (policy_logps - ref_logps)
    target = rewards - v_star
    sequences = policy_logps.shape[0] if num_sequences is None else jnp.asarray(num_sequences, jnp.float32)
    loss = jnp.sum((implicit_reward - target) ** 2) / sequences
    metrics = {"implicit_reward": sum_and_count(jax.lax.stop_gradient(implicit_reward)),
               "advantage": sum_and_count(target)}
    return loss, metrics if return_counts else mean_metrics(metrics)


# --------------------------------------------------------------------------------------------------------------
# Stage 1 and rollouts
# --------------------------------------------------------------------------------------------------------------


def scalar_rewards(rewards: np.ndarray, reward_weights: Sequence[float] | None) -> np.ndarray:
    """The weighted sum `[n]` of the reward functions' scores `[n, functions]`; a completion no function scored
    fails (A*-PO regresses on every reward)."""
    if np.isnan(rewards).all(axis=1).any():
        raise ValueError("A2PO: some completions got no reward from any reward function (all returned None); A*-PO "
                         "needs a reward for every completion.")
    return np.asarray(combine_rewards(rewards, reward_weights), np.float32)


def estimate_optimal_values(state: TrainState, prompts: Sequence[dict], reward_funcs: Sequence[Callable], tokenizer,
                            config: A2POConfig, *, key: jax.Array, mesh, prompt_buckets: Sequence[int],
                            prompts_per_batch: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Stage 1 with `state`'s parameters (the reference policy): `(v_star [prompts], all_incorrect [prompts] bool,
    metrics)`, sampling `num_value_samples` completions per prompt in batches of `prompts_per_batch` prompts (the
    last one filled up with its last prompt, so every batch has the one compiled shape)."""
    sampling = _Sampling(num_generations=config.num_value_samples, max_completion_length=config.max_completion_length,
                         temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
    v_star, all_incorrect, rewards_seen = [], [], []
    for index, start in enumerate(range(0, len(prompts), prompts_per_batch)):
        chunk = list(prompts[start:start + prompts_per_batch])
        real = len(chunk)
        chunk += [chunk[-1]] * (prompts_per_batch - real)
        sampled = sample_and_score(state, chunk, reward_funcs, tokenizer, sampling, key=jax.random.fold_in(key, index),
                                   mesh=mesh, prompt_buckets=prompt_buckets)
        rewards = scalar_rewards(sampled.rewards, config.reward_weights).reshape(len(chunk), -1)[:real]
        v_star.append(np.asarray(optimal_values(rewards, beta1=config.beta1)))
        all_incorrect.append(rewards.sum(axis=1) == 0)
        rewards_seen.append(rewards.reshape(-1))
    metrics = {"value_estimation/reward": float(np.concatenate(rewards_seen).mean())}
    return np.concatenate(v_star), np.concatenate(all_incorrect), metrics


def rollout(state: TrainState, prompts: Sequence[dict], v_star: np.ndarray, reward_funcs: Sequence[Callable],
            tokenizer, config: A2POConfig, *, key: jax.Array, mesh, prompt_buckets: Sequence[int], ref_logps_fn):
    """Stage 2's samples: one completion per prompt from `state`'s policy, scored; `(arrays, metrics)` with the
    arrays the step takes (`ref_logps`, `rewards` and `v_star` per sequence) and TRL's `reward` / `v_star`."""
    sampling = _Sampling(num_generations=1, max_completion_length=config.max_completion_length,
                         temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
    sampled = sample_and_score(state, prompts, reward_funcs, tokenizer, sampling, key=key, mesh=mesh,
                               prompt_buckets=prompt_buckets)
    rewards = scalar_rewards(sampled.rewards, config.reward_weights)
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "attention_mask", "completion_mask")
    arrays = {k: sampled.arrays[k] for k in keys}
    ref_logps = (ref_logps_fn(arrays) * arrays["completion_mask"]).sum(-1)
    arrays.update(ref_logps=ref_logps.astype(np.float32), rewards=rewards, v_star=np.asarray(v_star, np.float32))
    metrics = {"reward": float(rewards.mean()), "v_star": float(np.mean(v_star)),
               **completion_metrics(sampled.lengths, sampled.finished)}
    return arrays, metrics


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: A2POConfig, totals: dict):
    """Loss of one micro-batch, normalised by the whole step's sequences, and its metrics as `(sum, count)` pairs."""
    # raw logits (temperature 1), as TRL's A2PO: the implicit reward is of the policy itself, not the sampler
    logps, _ = completion_logps(params, graphdef, batch, temperature=1.0, chunk_size=config.logits_chunk_size)
    policy_logps = jnp.sum(logps * batch["completion_mask"], axis=-1)
    return a2po_loss(policy_logps, batch["ref_logps"], batch["rewards"], batch["v_star"], beta2=config.beta2,
                     num_sequences=totals["sequences"], return_counts=True)


def make_train_step(config: A2POConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None):
    """`state, metrics = step(state, batch)`: one optimizer step over arrays shaped `[accumulation, micro_batch,
    ...]` (`prompt_ids`, `prompt_mask`, `completion_ids`, `attention_mask`, `completion_mask`, and per sequence
    `ref_logps` (the reference's sequence log-probs), `rewards`, `v_star`), micro-batches scanned inside; jitted with
    explicit shardings and the state donated."""

    def step(state: TrainState, batch: dict):
        totals = {"sequences": float(batch["rewards"].shape[0] * batch["rewards"].shape[1])}
        grad_fn = lora.value_and_grad(loss_fn, state, seed=config.seed)

        def micro_step(grads, inputs):
            micro_batch, micro_index = inputs
            (loss, pairs), micro_grads = grad_fn(state.params, state.graphdef, micro_batch, config, totals,
                                                 micro_index=micro_index)
            return jax.tree.map(jnp.add, grads, micro_grads), (loss, pairs)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro_indices = jnp.arange(batch["rewards"].shape[0])
        grads, (losses, pairs) = jax.lax.scan(micro_step, zeros, (batch, micro_indices))
        metrics = mean_metrics(total_metrics(pairs))
        metrics["loss"] = jnp.sum(losses)
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.apply_gradients(grads), metrics

    return jit_step(step, mesh=mesh, state_sharding=state_sharding)


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------


def train(model: nnx.Module, tokenizer, dataset, config: A2POConfig, *, reward_funcs: Sequence[Callable | str],
          ref_model: nnx.Module | None = None, eval_dataset=None) -> loop.TrainResult:
    """A*-PO on the prompts of `dataset` (TRL prompt-only format; other columns go to the reward functions): Stage 1
    with the initial policy (TRL's reference), then Stage 2 steps of `per_device_train_batch_size x devices x
    gradient_accumulation_steps` prompts, one completion each; progress, `metrics.jsonl` (TRL's names), checkpoints,
    exact resume (Stage 1 is recomputed, deterministically), HF export. `ref_model`: the reference of the implicit
    reward (default: the initial policy; under LoRA the base with the adapters off). `eval_dataset` (prompts, like
    `dataset`): evaluated every `eval_steps` (module docstring)."""
    config.validate()
    loop.prepare_output_dir(config)
    reward_funcs = [resolve_reward_function(f) for f in reward_funcs]
    if not reward_funcs:
        raise ValueError("reward_funcs is empty: A2PO needs at least one reward function.")
    if config.reward_weights is not None and len(config.reward_weights) != len(reward_funcs):
        raise ValueError(f"reward_weights has {len(config.reward_weights)} entries for {len(reward_funcs)} reward "
                         "functions.")
    mesh = mesh_from_config(config)
    micro_batch = config.per_device_train_batch_size * batch_divisor(mesh)
    accumulation = config.gradient_accumulation_steps
    prompts = data.prepare_prompts(dataset, tokenizer, method="A2PO", max_prompt_length=config.max_prompt_length)
    eval_prompts = None
    if eval_dataset is not None and config.eval_strategy != "no":
        eval_prompts = data.prepare_prompts(eval_dataset, tokenizer, method="A2PO",
                                            max_prompt_length=config.max_prompt_length)
    distributed.check_same_data(prompts, what="A2PO prompts")  # every process builds the same global batches
    longest = max(len(p["prompt_ids"]) for p in prompts + (eval_prompts or []))
    prompt_buckets = data.length_buckets(max(longest, 16), min_length=16)
    check_rollout_inputs(reward_funcs, [model, ref_model], prompts, eval_prompts, tokenizer, config, method="A2PO")
    if ref_model is not None:
        check_reference_dtypes(nnx.state(model, nnx.Param), nnx.state(ref_model, nnx.Param))

    set_gradient_checkpointing(model, config.gradient_checkpointing)
    base_key = jax.random.key(config.seed)
    state = TrainState.create(model, optax.identity(), mesh=mesh)  # Stage 1 runs before the optimizer exists
    if ref_model is None:
        check_reference_without_adapters(model, method="A2PO")
    reference = (lora.with_adapters_off(nnx.state(ref_model, nnx.Param), state) if ref_model is not None
                 else reference_params(state))
    # Stage 1, with the initial parameters (also on resume: the same key gives the same V*)
    v_star, all_incorrect, value_metrics = estimate_optimal_values(
        state, prompts, reward_funcs, tokenizer, config, key=jax.random.fold_in(base_key, 1 << 20), mesh=mesh,
        prompt_buckets=prompt_buckets, prompts_per_batch=micro_batch)
    logger.info("A2PO stage 1: V* of %d prompts (mean %.4f); %d with all reference samples incorrect.", len(prompts),
                float(v_star.mean()), int(all_incorrect.sum()))
    eval_batch = config.per_device_eval_batch_size * batch_divisor(mesh)
    if eval_prompts:  # TRL estimates the eval prompts' V* too, and keeps them all
        eval_v_star, _, _ = estimate_optimal_values(
            state, eval_prompts, reward_funcs, tokenizer, config, key=jax.random.fold_in(base_key, (1 << 20) + 1),
            mesh=mesh, prompt_buckets=prompt_buckets, prompts_per_batch=eval_batch)
    if config.filter_all_incorrect:
        keep = np.flatnonzero(~all_incorrect)
        if keep.size == 0:
            raise ValueError("A2PO stage 1: every prompt's reference samples all scored 0, so filter_all_incorrect "
                             "leaves no prompt to train on: check the reward functions, raise num_value_samples, or "
                             "set filter_all_incorrect=False.")
        prompts, v_star = [prompts[i] for i in keep], v_star[keep]

    prompts_per_step = micro_batch * accumulation
    steps_in_epoch = data.steps_per_epoch(len(prompts), prompts_per_step, method="A2PO")
    total_steps = data.total_steps(config, steps_in_epoch)
    tx, schedule = make_optimizer(config, total_steps)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    logps_fn = make_logps_fn(state.graphdef, temperature=1.0, chunk_size=config.logits_chunk_size,
                             micro_batch=micro_batch, mesh=mesh)
    ref_logps_fn = make_ref_logps_fn(reference, state.graphdef, temperature=1.0, chunk_size=config.logits_chunk_size,
                                     micro_batch=micro_batch, mesh=mesh, logps_fn=logps_fn)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding)
    eval_logps_fn, eval_ref_logps_fn = logps_fn, ref_logps_fn
    if eval_prompts and eval_batch != micro_batch:  # the forward passes of eval batches (their own shape)
        eval_logps_fn = make_logps_fn(state.graphdef, temperature=1.0, chunk_size=config.logits_chunk_size,
                                      micro_batch=eval_batch, mesh=mesh)
        eval_ref_logps_fn = make_ref_logps_fn(reference, state.graphdef, temperature=1.0,
                                              chunk_size=config.logits_chunk_size, micro_batch=eval_batch, mesh=mesh,
                                              logps_fn=eval_logps_fn)
    checkpoints = loop.checkpointer(config, method="a2po", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints)
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="a2po", start_step=start_step, config=config.to_dict())
    order = data.step_indices(len(prompts), prompts_per_step, seed=config.seed, shuffle=config.shuffle_dataset,
                              start_step=start_step)
    step = start_step
    try:
        while step < total_steps:
            _, indices = next(order)
            arrays, rollout_metrics = rollout(state, [prompts[i] for i in indices], v_star[indices], reward_funcs,
                                              tokenizer, config, key=jax.random.fold_in(base_key, step), mesh=mesh,
                                              prompt_buckets=prompt_buckets, ref_logps_fn=ref_logps_fn)
            num_tokens += int(arrays["prompt_mask"].sum() + arrays["attention_mask"].sum())
            batch = {k: v.reshape(accumulation, micro_batch, *v.shape[1:]) for k, v in arrays.items()}
            placed = shard_batch(batch, mesh, batch_axis=1, global_batch=True,
                                 check_shapes=False)  # the whole batch is on every process: same shapes
            state, metrics = train_step(state, placed)
            step += 1
            log.log(step, {**metrics, **rollout_metrics, **value_metrics, "learning_rate": schedule(step - 1),
                           "num_tokens": num_tokens}, epoch=step / steps_in_epoch)
            if eval_prompts and loop.should_evaluate(config, step, steps_in_epoch):
                log.write({"step": step, **evaluate(state, eval_prompts, eval_v_star, reward_funcs, tokenizer, config,
                                                    mesh=mesh, prompt_buckets=prompt_buckets, batch_size=eval_batch,
                                                    logps_fn=eval_logps_fn, ref_logps_fn=eval_ref_logps_fn)})
            if config.save_steps and step % config.save_steps == 0:
                log.sync()
                checkpoints.save(step, state, {"num_tokens": num_tokens})
        log.flush(step, epoch=step / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))


def evaluate(state: TrainState, prompts: Sequence[dict], v_star: np.ndarray, reward_funcs: Sequence[Callable],
             tokenizer, config: A2POConfig, *, mesh, prompt_buckets: Sequence[int], batch_size: int,
             logps_fn: Callable, ref_logps_fn: Callable) -> dict[str, float]:
    """The A*-PO loss and TRL's metrics on one completion per eval prompt from `state`'s policy, without an update:
    `eval_loss`, `eval_reward`, `eval_v_star`, `eval_implicit_reward`, `eval_advantage`, means over the prompts.
    Batches of `batch_size` prompts (`logps_fn` / `ref_logps_fn` built for that many rows), the last filled up with
    its last prompt (the copies left out)."""
    key = jax.random.key(config.seed + 1)
    totals: MetricPairs | None = None
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = list(prompts[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)
        values = np.asarray(v_star[start:start + batch_size], np.float32)
        values = np.concatenate([values, np.full(batch_size - real, values[-1], np.float32)])
        arrays, _ = rollout(state, chunk, values, reward_funcs, tokenizer, config,
                            key=jax.random.fold_in(key, index), mesh=mesh, prompt_buckets=prompt_buckets,
                            ref_logps_fn=ref_logps_fn)
        policy_logps = (logps_fn(state.full_params(), arrays) * arrays["completion_mask"]).sum(-1)
        rows = slice(0, real)
        loss, pairs = a2po_loss(policy_logps[rows], arrays["ref_logps"][rows], arrays["rewards"][rows],
                                arrays["v_star"][rows], beta2=config.beta2, num_sequences=1.0, return_counts=True)
        pairs = {**pairs, "loss": (loss, real), "reward": sum_and_count(arrays["rewards"][rows]),
                 "v_star": sum_and_count(arrays["v_star"][rows])}
        totals = add_metrics(totals, jax.device_get(pairs))
    return {f"eval_{name}": float(value) for name, value in mean_metrics(totals).items()}
