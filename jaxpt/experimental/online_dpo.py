"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv:2402.04792):
`OnlineDPOConfig`, `online_dpo_loss`, rollouts, `make_train_step`, `train`. Experimental: no stability promise
(see `jaxpt.experimental`). TRL's `trl.experimental.online_dpo` (same config names, defaults and metric names).

Every step samples two completions per prompt with the training parameters (jaxpt's in-process sampler, no weight
copy), scores both with the reward functions (a reward model is `jaxpt.rewards.model_reward(...)`), ranks each pair
(the better score is chosen; a tie goes to the first sample, as TRL), and applies DPO's loss to the pair against
the reference: a frozen copy of the initial model, or under LoRA the base with the adapters off.

```python
config = OnlineDPOConfig(output_dir="out", max_new_tokens=64, max_steps=100)
result = jaxpt.experimental.online_dpo.train(model, tokenizer, prompts_dataset, config, reward_funcs=[my_reward])

step = jaxpt.experimental.online_dpo.make_train_step(config)
state, metrics = step(state, batch)        # batch: `rollout(...)` arrays shaped [accumulation, micro_batch, ...]
```

Scores: the reward functions' weighted sum (`reward_weights`, None counting as 0, as TRL's `nansum`), minus
`missing_eos_penalty` for a completion that did not end with EOS. Loss types: `sigmoid` (DPO) and `ipo` (IPO on the
summed log-probs: TRL's Online DPO does not average IPO over tokens, unlike its offline DPO). `beta` may be a list:
epoch e uses `beta[e]` (the last one after the list ends), as TRL.

Differences from TRL, on purpose: `objective/kl` and `objective/entropy` sum the completion tokens only (TRL also
sums the log-probs of the padding after EOS); the training log-probs use the raw logits as TRL's do (no
temperature); `max_length` keeps the last `max_length - max_new_tokens` prompt tokens for sampling and scoring
(TRL cuts only the scored sequence). TRL's `judge` (pairwise LLM judges), vLLM and `repetition_penalty` are not
offered: their flags are refused, not ignored.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
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
from jaxpt.losses.dpo import dpo_loss
from jaxpt.losses.metrics import mean_metrics, sum_and_count, total_metrics
from jaxpt.models import set_gradient_checkpointing
from jaxpt.rewards import resolve_reward_function
from jaxpt.rollout import (
    append_jsonl,
    check_reference_dtypes,
    check_rollout_inputs,
    completion_logps,
    completion_metrics,
    evaluate_rollouts,
    make_ref_logps_fn,
    reference_params,
    sample_and_score,
)
from jaxpt.sharding import batch_divisor, mesh_from_config, shard_batch
from jaxpt.train_state import TrainState, jit_step, make_optimizer

logger = logging.getLogger("jaxpt")

ONLINE_DPO_LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class OnlineDPOConfig(TrainingConfig):
    """TRL's `OnlineDPOConfig` fields that have a meaning here (same names and defaults)."""

    learning_rate: float = field(default=5e-7, metadata={"help": "Peak learning rate (TRL's Online DPO default)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per completion at most."})
    max_length: int = field(default=512, metadata={"help": "Prompt + completion tokens at most: prompts keep their "
                                                           "last max_length - max_new_tokens tokens."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling (None: off)."})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "Subtracted from the score of a completion that did not end with EOS (None: no penalty)."})
    beta: list[float] = field(default_factory=lambda: [0.1], metadata={
        "help": "β: deviation from the reference (IPO's τ for loss_type='ipo'); a list gives one per epoch, the last "
                "for the epochs after it (a single float is accepted)."})
    loss_type: str = field(default="sigmoid", metadata={"help": f"One of {ONLINE_DPO_LOSS_TYPES}: DPO "
                                                                "(arXiv:2305.18290) or IPO (arXiv:2310.12036)."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weight of each reward function "
                                                                               "(default: all 1)."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle prompts every epoch (seeded)."})
    log_completions: bool = field(default=False, metadata={"help": "Append every step's prompts, completions and "
                                                                   "scores to output_dir/completions.jsonl."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk when computing log-probs."})

    def validate(self) -> None:
        if isinstance(self.beta, numbers.Real) and not isinstance(self.beta, bool):
            self.beta = [float(self.beta)]  # TRL accepts one float as well as a list
        super().validate()
        if not self.beta or any(b <= 0 for b in self.beta):
            raise ValueError(f"beta={self.beta} must be one or more values > 0 (one per epoch).")
        if self.loss_type not in ONLINE_DPO_LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}; use one of {ONLINE_DPO_LOSS_TYPES}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1.")
        if self.max_length <= self.max_new_tokens:
            raise ValueError(f"max_length={self.max_length} must exceed max_new_tokens={self.max_new_tokens}: the "
                             "prompts keep max_length - max_new_tokens tokens.")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0.")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(f"missing_eos_penalty={self.missing_eos_penalty} must be >= 0 (it is subtracted).")
        if self.logits_chunk_size < 1:
            raise ValueError(f"logits_chunk_size={self.logits_chunk_size} must be >= 1.")


def value_for_epoch(values: Sequence[float], epoch: int) -> float:
    """TRL's per-epoch schedule of a list option: `values[epoch]`, the last value once the list ends."""
    return float(values[min(epoch, len(values) - 1)])


# --------------------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------------------


def online_dpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
    loss_type: str = "sigmoid",
    chosen_scores: jax.Array | None = None,
    rejected_scores: jax.Array | None = None,
    pair_mask: jax.Array | None = None,
    num_pairs: jax.Array | float | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, dict]:
    """Online DPO's loss of ranked pairs (inputs `[pairs]`: per-sequence sums of completion-token log-probs):

        z = (log π(y+) - log π_ref(y+)) - (log π(y-) - log π_ref(y-))
        sigmoid: L = mean -log σ(β z)          ipo: L = mean (z - 1/(2β))²

    which is `jaxpt.losses.dpo_loss` with unit lengths (Online DPO's IPO is not length-averaged). `num_pairs`:
    the whole step's pair count (micro-batches add up). Metrics, TRL's names: DPO's `rewards/*` and `logps/*`,
    `objective/kl` (mean over both completions of log π - log π_ref), `objective/entropy` (mean -log π),
    `objective/non_score_reward` (-β kl), `beta`, and with the reward scores `objective/scores` (mean over both),
    `objective/scores_margin` (chosen - rejected) and `objective/rlhf_reward` (score - β kl)."""
    if loss_type not in ONLINE_DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}; use one of {ONLINE_DPO_LOSS_TYPES}.")
    ones = jnp.ones(jnp.shape(chosen_logps), jnp.float32)
    mask = ones.astype(bool) if pair_mask is None else jnp.asarray(pair_mask).astype(bool)
    loss, metrics = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta,
                             loss_type=loss_type, chosen_lengths=ones, rejected_lengths=ones, pair_mask=mask,
                             num_pairs=num_pairs, return_counts=True)
    both = jnp.concatenate([mask, mask])
    policy = jax.lax.stop_gradient(jnp.concatenate([chosen_logps, rejected_logps]).astype(jnp.float32))
    kl = policy - jnp.concatenate([ref_chosen_logps, ref_rejected_logps]).astype(jnp.float32)
    beta = jnp.asarray(beta, jnp.float32)
    metrics.update({
        "objective/kl": sum_and_count(kl, both),
        "objective/entropy": sum_and_count(-policy, both),
        "objective/non_score_reward": sum_and_count(-beta * kl, both),
        "beta": sum_and_count(beta * ones, mask),
    })
    if chosen_scores is not None:
        scores = jnp.concatenate([chosen_scores, rejected_scores]).astype(jnp.float32)
        metrics["objective/scores"] = sum_and_count(scores, both)
        metrics["objective/scores_margin"] = sum_and_count(chosen_scores - rejected_scores, mask)
        metrics["objective/rlhf_reward"] = sum_and_count(scores - beta * kl, both)
    return loss, metrics if return_counts else mean_metrics(metrics)


# --------------------------------------------------------------------------------------------------------------
# Rollouts: two samples per prompt, scored and ranked
# --------------------------------------------------------------------------------------------------------------


def sampling_options(config: OnlineDPOConfig) -> SimpleNamespace:
    """What `jaxpt.rollout.sample_and_score` reads of a config: two completions per prompt, TRL's options."""
    return SimpleNamespace(num_generations=2, max_completion_length=config.max_new_tokens,
                           temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                           min_p=config.min_p, mask_truncated_completions=False,
                           log_completions=config.log_completions)


def combined_scores(rewards: np.ndarray, finished: np.ndarray, *, reward_weights: Sequence[float] | None,
                    missing_eos_penalty: float | None) -> np.ndarray:
    """`[n]` scores from the rewards `[n, functions]` (NaN: not scored): the weighted sum with NaN counting as 0
    (TRL's `nansum`), minus `missing_eos_penalty` where the completion did not end with EOS."""
    weights = np.ones(rewards.shape[1]) if reward_weights is None else np.asarray(reward_weights, np.float64)
    scores = np.nansum(rewards.astype(np.float64) * weights[None, :], axis=1)
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * ~np.asarray(finished, bool)
    return scores.astype(np.float32)


def rank_pairs(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(chosen_rows, rejected_rows)` `[pairs]` of completions grouped in pairs (rows 2i, 2i+1): the better
    score is chosen, a tie goes to the first (TRL's `first >= second`)."""
    first_wins = scores[0::2] >= scores[1::2]
    firsts = np.arange(0, len(scores), 2)
    return firsts + (~first_wins), firsts + first_wins


def rollout(state: TrainState, prompts: Sequence[dict], reward_funcs: Sequence[Callable], tokenizer,
            config: OnlineDPOConfig, *, key: jax.Array, mesh, prompt_buckets: Sequence[int], ref_logps_fn=None,
            policy_logps_fn=None):
    """Sample two completions per prompt, score and rank them. Returns `(arrays, metrics, records)`: the pairs'
    numpy arrays `[pairs, ...]` (`prompt_ids`, `prompt_mask`, `chosen_ids`, `chosen_mask`, `rejected_ids`,
    `rejected_mask`, `chosen_scores`, `rejected_scores`, and with `ref_logps_fn(arrays)` the reference's summed
    log-probs `ref_chosen_logps`, `ref_rejected_logps`), the sampling metrics (TRL's `objective/scores`,
    `objective/scores_margin`, `val/contain_eos_token`, and `completions/*`) and one record per completion.
    `policy_logps_fn` is unused (the update is on-policy); it is accepted for `jaxpt.rollout.evaluate_rollouts`."""
    del policy_logps_fn
    sampled = sample_and_score(state, prompts, reward_funcs, tokenizer, sampling_options(config), key=key,
                               mesh=mesh, prompt_buckets=prompt_buckets)
    scores = combined_scores(sampled.rewards, sampled.finished, reward_weights=config.reward_weights,
                             missing_eos_penalty=config.missing_eos_penalty)
    chosen, rejected = rank_pairs(scores)
    arrays = sampled.arrays
    pairs = {"prompt_ids": arrays["prompt_ids"][chosen], "prompt_mask": arrays["prompt_mask"][chosen],
             "chosen_ids": arrays["completion_ids"][chosen], "chosen_mask": arrays["attention_mask"][chosen],
             "rejected_ids": arrays["completion_ids"][rejected], "rejected_mask": arrays["attention_mask"][rejected],
             "chosen_scores": scores[chosen], "rejected_scores": scores[rejected]}
    if ref_logps_fn is not None:
        summed = (ref_logps_fn(arrays) * arrays["attention_mask"]).sum(-1).astype(np.float32)  # [2 * pairs]
        pairs["ref_chosen_logps"], pairs["ref_rejected_logps"] = summed[chosen], summed[rejected]
    metrics = {"objective/scores": float(scores.mean()),
               "objective/scores_margin": float((scores[chosen] - scores[rejected]).mean()),
               "val/contain_eos_token": float(np.mean(sampled.finished)),
               **completion_metrics(sampled.lengths, sampled.finished)}
    is_chosen = np.zeros(len(scores), bool)
    is_chosen[chosen] = True
    records = [{"prompt": p, "completion": c, "score": float(s), "chosen": bool(k)}
               for p, c, s, k in zip(sampled.prompts, sampled.completions, scores, is_chosen, strict=True)]
    return pairs, metrics, records


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def pair_logps(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: OnlineDPOConfig):
    """`(chosen_logps, rejected_logps)` `[pairs]`: summed completion-token log-probs under the raw logits (TRL's
    `_forward`), both completions of a pair in one forward pass (chunked, never full logits)."""
    both = {"prompt_ids": jnp.concatenate([batch["prompt_ids"]] * 2),
            "prompt_mask": jnp.concatenate([batch["prompt_mask"]] * 2),
            "completion_ids": jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]]),
            "attention_mask": jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])}
    token_logps, _ = completion_logps(params, graphdef, both, temperature=1.0, chunk_size=config.logits_chunk_size)
    summed = jnp.sum(token_logps * both["attention_mask"], axis=-1)
    return jnp.split(summed, 2)


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: OnlineDPOConfig, totals: dict):
    chosen_logps, rejected_logps = pair_logps(params, graphdef, batch, config)
    return online_dpo_loss(chosen_logps, rejected_logps, batch["ref_chosen_logps"], batch["ref_rejected_logps"],
                           beta=batch["beta"][0], loss_type=config.loss_type, chosen_scores=batch["chosen_scores"],
                           rejected_scores=batch["rejected_scores"], num_pairs=totals["pairs"], return_counts=True)


def make_train_step(config: OnlineDPOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None):
    """`state, metrics = step(state, batch)`: one optimizer step over ranked pairs shaped `[accumulation,
    micro_batch, ...]` (`rollout`'s arrays, with `ref_chosen_logps` / `ref_rejected_logps`, and `beta`
    `[accumulation, micro_batch]`: this epoch's β everywhere), micro-batches scanned inside and normalised like
    one big batch. jitted with explicit shardings and the state donated."""

    def step(state: TrainState, batch: dict):
        totals = {"pairs": float(batch["chosen_ids"].shape[0] * batch["chosen_ids"].shape[1])}
        grad_fn = lora.value_and_grad(loss_fn, state, seed=config.seed)  # under LoRA: the adapters

        def micro_step(grads, inputs):
            micro_batch, micro_index = inputs
            (loss, metric_pairs), micro_grads = grad_fn(state.params, state.graphdef, micro_batch, config, totals,
                                                        micro_index=micro_index)
            return jax.tree.map(jnp.add, grads, micro_grads), (loss, metric_pairs)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro_indices = jnp.arange(jax.tree.leaves(batch)[0].shape[0])
        grads, (losses, metric_pairs) = jax.lax.scan(micro_step, zeros, (batch, micro_indices))
        metrics = mean_metrics(total_metrics(metric_pairs))
        metrics["loss"] = jnp.sum(losses)
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.apply_gradients(grads), metrics

    return jit_step(step, mesh=mesh, state_sharding=state_sharding)


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------


def train(model: nnx.Module, tokenizer, dataset, config: OnlineDPOConfig, *, reward_funcs: Sequence[Callable | str],
          ref_model: nnx.Module | None = None, eval_dataset=None) -> loop.TrainResult:
    """Online DPO on the prompts of `dataset` (TRL prompt-only format; other columns go to the reward functions):
    each step samples two completions for each of `per_device_train_batch_size x devices x
    gradient_accumulation_steps` prompts, ranks them by `reward_funcs` (callables with TRL's signature, names from
    `jaxpt.rewards.REWARD_FUNCTIONS`, or `jaxpt.rewards.model_reward(...)`) and takes one optimizer step.
    Progress bar, `metrics.jsonl` with TRL's names, evaluation (sampled scores on `eval_dataset`), orbax
    checkpoints, exact resume, HF export. `ref_model`: default a frozen copy of `model` (LoRA: adapters off)."""
    config.validate()  # again: fields may have been changed since the config was built
    loop.prepare_output_dir(config)
    reward_funcs = [resolve_reward_function(f) for f in reward_funcs]
    if not reward_funcs:
        raise ValueError("reward_funcs is empty: Online DPO ranks its two samples with at least one reward function.")
    if config.reward_weights is not None and len(config.reward_weights) != len(reward_funcs):
        raise ValueError(f"reward_weights has {len(config.reward_weights)} entries for {len(reward_funcs)} reward "
                         "functions.")
    if ref_model is model:
        raise ValueError("ref_model is the policy itself: leave ref_model=None for a frozen copy of the initial model.")
    mesh = mesh_from_config(config)
    micro_pairs = config.per_device_train_batch_size * batch_divisor(mesh)
    accumulation = config.gradient_accumulation_steps
    prompts_per_step = micro_pairs * accumulation
    max_prompt_length = config.max_length - config.max_new_tokens
    prompts = data.prepare_prompts(dataset, tokenizer, method="Online DPO", max_prompt_length=max_prompt_length)
    eval_prompts = None
    if eval_dataset is not None and config.eval_strategy != "no":
        eval_prompts = data.prepare_prompts(eval_dataset, tokenizer, method="Online DPO",
                                            max_prompt_length=max_prompt_length)
    distributed.check_same_data(prompts, what="Online DPO prompts")  # every process builds the same batches
    steps_in_epoch = data.steps_per_epoch(len(prompts), prompts_per_step, method="Online DPO")
    total_steps = data.total_steps(config, steps_in_epoch)
    prompt_buckets = data.length_buckets(max(max(len(p["prompt_ids"]) for p in prompts), 16), min_length=16)
    sampling = sampling_options(config)
    check_rollout_inputs(reward_funcs, [model, ref_model], prompts, eval_prompts, tokenizer, sampling,
                         method="Online DPO")
    if ref_model is not None:
        check_reference_dtypes(nnx.state(model, nnx.Param), nnx.state(ref_model, nnx.Param))
    else:
        check_reference_without_adapters(model, method="Online DPO")

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    # under LoRA the default reference is the base with the adapters off; a ref_model runs with zero adapters
    reference = (lora.with_adapters_off(nnx.state(ref_model, nnx.Param), state) if ref_model is not None
                 else reference_params(state))
    ref_logps_fn = make_ref_logps_fn(reference, state.graphdef, temperature=1.0, chunk_size=config.logits_chunk_size,
                                     micro_batch=2 * micro_pairs, mesh=mesh)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding)
    checkpoints = loop.checkpointer(config, method="online_dpo", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints)
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="online_dpo", start_step=start_step, config=config.to_dict())
    order = data.step_indices(len(prompts), prompts_per_step, seed=config.seed, shuffle=config.shuffle_dataset,
                              start_step=start_step)
    base_key = jax.random.key(config.seed)
    try:
        for step in range(start_step, total_steps):
            epoch, indices = next(order)
            pairs, rollout_metrics, records = rollout(
                state, [prompts[i] for i in indices], reward_funcs, tokenizer, config,
                key=jax.random.fold_in(base_key, step), mesh=mesh, prompt_buckets=prompt_buckets,
                ref_logps_fn=ref_logps_fn)
            if config.log_completions:
                append_jsonl(Path(config.output_dir) / "completions.jsonl", [{"step": step, **r} for r in records])
            beta = value_for_epoch(config.beta, epoch)
            pairs["beta"] = np.full(len(pairs["chosen_ids"]), beta, np.float32)
            num_tokens += int(pairs["prompt_mask"].sum() * 2 + pairs["chosen_mask"].sum()
                              + pairs["rejected_mask"].sum())
            batch = {k: v.reshape(accumulation, micro_pairs, *v.shape[1:]) for k, v in pairs.items()}
            placed = shard_batch(batch, mesh, batch_axis=1, global_batch=True,
                                 check_shapes=False)  # the whole rollout is on every process: same shapes
            state, metrics = train_step(state, placed)
            done = step + 1
            log.log(done, {**metrics, **rollout_metrics, "learning_rate": schedule(step), "num_tokens": num_tokens},
                    epoch=done / steps_in_epoch)
            if eval_prompts and loop.should_evaluate(config, done, steps_in_epoch):
                log.write({"step": done, **evaluate_rollouts(rollout, state, eval_prompts, reward_funcs, tokenizer,
                                                             config, mesh=mesh, prompt_buckets=prompt_buckets,
                                                             prompts_per_rollout=prompts_per_step)})
            if config.save_steps and done % config.save_steps == 0:
                log.sync()
                checkpoints.save(done, state, {"num_tokens": num_tokens})
        log.flush(total_steps, epoch=total_steps / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))
