"""XPO, Exploratory Preference Optimization (Xie et al. 2024, arXiv:2405.21046): `XPOConfig`, `xpo_loss`, rollouts,
`make_train_step`, `train`. Experimental: no stability promise (see `jaxpt.experimental`).

Online DPO with exploration. Every step samples one completion y per prompt from the policy (the training
parameters) and one completion ỹ from the reference model, scores both with the reward functions (a reward model
is `jaxpt.rewards.model_reward(...)`), takes the better one as chosen (a tie goes to the policy's, as TRL's removed
`XPOTrainer`), and minimises DPO's loss on the pair plus `alpha` times the policy's log-likelihood of the reference
sample: the exploration bonus that pushes the policy away from what the reference already covers (Algorithm 1 of
the paper). The reference is a frozen copy of the initial model, or under LoRA the base with the adapters off.

```python
config = XPOConfig(output_dir="out", alpha=[1e-5], max_new_tokens=64, max_steps=100)
result = jaxpt.experimental.xpo.train(model, tokenizer, prompts_dataset, config, reward_funcs=[my_reward])
```

TRL 1.16 no longer ships XPO: the config names are those of TRL's removed `XPOConfig` (Online DPO's options plus
`alpha`, a list giving one value per epoch like `beta`), the metrics those of its `XPOTrainer` (`loss/dpo`,
`loss/xpo`, `objective/model_scores`, `objective/ref_scores`, `objective/scores_margin`, `objective/kl`,
`objective/entropy`, DPO's `rewards/*`, `logps/*` (the policy's log-probs of the chosen / rejected completions),
`val/model_contain_eos_token`, `val/ref_contain_eos_token`, `alpha`, `beta`); the loss is tested against the paper's
formula in float64. Loss types: `sigmoid` (DPO) and `ipo` (on summed log-probs), as TRL had.
"""

from __future__ import annotations

import functools
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

XPO_LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class XPOConfig(TrainingConfig):
    """TRL's removed `XPOConfig` (Online DPO's fields plus `alpha`), same names and defaults."""

    learning_rate: float = field(default=5e-7, metadata={"help": "Peak learning rate (TRL's Online DPO default)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per completion at most."})
    max_length: int = field(default=512, metadata={"help": "Prompt + completion tokens at most: prompts keep their "
                                                           "last max_length - max_new_tokens tokens."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature (policy and reference)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling (None: off)."})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "Subtracted from the score of a completion that did not end with EOS (None: no penalty)."})
    beta: list[float] = field(default_factory=lambda: [0.1], metadata={
        "help": "β: deviation from the reference (IPO's τ for loss_type='ipo'); a list gives one per epoch, the last "
                "for the epochs after it (a single float is accepted)."})
    alpha: list[float] = field(default_factory=lambda: [1e-5], metadata={
        "help": "α: weight of the exploration bonus (the policy's log-likelihood of the reference's samples, "
                "minimised); a list gives one per epoch (a single float is accepted)."})
    loss_type: str = field(default="sigmoid", metadata={"help": f"One of {XPO_LOSS_TYPES}: DPO or IPO."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weight of each reward function "
                                                                               "(default: all 1)."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle prompts every epoch (seeded)."})
    log_completions: bool = field(default=False, metadata={"help": "Append every step's prompts, completions and "
                                                                   "scores to output_dir/completions.jsonl."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk when computing log-probs."})

    def validate(self) -> None:
        for name in ("beta", "alpha"):  # TRL accepts one float as well as a list
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                setattr(self, name, [float(value)])
        super().validate()
        if not self.beta or any(b <= 0 for b in self.beta):
            raise ValueError(f"beta={self.beta} must be one or more values > 0 (one per epoch).")
        if not self.alpha or any(a < 0 for a in self.alpha):
            raise ValueError(f"alpha={self.alpha} must be one or more values >= 0 (one per epoch; 0: Online DPO "
                             "against reference samples).")
        if self.loss_type not in XPO_LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}; use one of {XPO_LOSS_TYPES}.")
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


# Copied from jaxpt.experimental.online_dpo.value_for_epoch
def value_for_epoch(values: Sequence[float], epoch: int) -> float:
    """TRL's per-epoch schedule of a list option: `values[epoch]`, the last value once the list ends."""
    return float(values[min(epoch, len(values) - 1)])


# --------------------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------------------


def xpo_loss(
    policy_logps: jax.Array,
    policy_logps_of_reference: jax.Array,
    ref_logps: jax.Array,
    ref_logps_of_reference: jax.Array,
    chosen_is_policy: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
    alpha: float | jax.Array = 1e-5,
    loss_type: str = "sigmoid",
    policy_scores: jax.Array | None = None,
    reference_scores: jax.Array | None = None,
    num_pairs: jax.Array | float | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, dict]:
    """XPO's loss (arXiv:2405.21046, Algorithm 1). Inputs `[pairs]`, per-sequence sums of completion-token
    log-probs: `policy_logps` = log π(y) and `ref_logps` = log π_ref(y) of the policy's sample y;
    `policy_logps_of_reference` = log π(ỹ) and `ref_logps_of_reference` = log π_ref(ỹ) of the reference's sample ỹ;
    `chosen_is_policy`: y preferred to ỹ. With (y+, y-) the preferred and the other one of (y, ỹ):

        z = (log π(y+) - log π_ref(y+)) - (log π(y-) - log π_ref(y-))
        L = mean [ -log σ(β z)  (ipo: (z - 1/(2β))²)  +  α log π(ỹ) ]

    `num_pairs`: the whole step's pair count (micro-batches add up). Metrics, TRL's XPOTrainer names: `loss/dpo`,
    `loss/xpo` (α log π(ỹ)), DPO's `rewards/*` and `logps/*`, `objective/kl` (the mean over both samples of
    log π - log π_ref), `objective/entropy` (mean -log π over both), `alpha`, `beta`, and with the scores
    `objective/model_scores`, `objective/ref_scores`, `objective/scores_margin` (policy - reference)."""
    if loss_type not in XPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}; use one of {XPO_LOSS_TYPES}.")
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    policy_logps, policy_logps_of_reference = f32(policy_logps), f32(policy_logps_of_reference)
    ref_logps, ref_logps_of_reference = f32(ref_logps), f32(ref_logps_of_reference)
    chosen_is_policy = jnp.asarray(chosen_is_policy).astype(bool)
    ones = jnp.ones(policy_logps.shape, jnp.float32)
    num_pairs = jnp.sum(ones) if num_pairs is None else f32(num_pairs)
    pick = lambda on_policy, on_reference: jnp.where(chosen_is_policy, on_policy, on_reference)  # noqa: E731
    dpo, metrics = dpo_loss(pick(policy_logps, policy_logps_of_reference),
                            pick(policy_logps_of_reference, policy_logps),
                            pick(ref_logps, ref_logps_of_reference), pick(ref_logps_of_reference, ref_logps),
                            beta=beta, loss_type=loss_type, chosen_lengths=ones, rejected_lengths=ones,
                            num_pairs=num_pairs, return_counts=True)
    alpha, beta = f32(alpha), f32(beta)
    bonus = alpha * policy_logps_of_reference  # [pairs]: minimised, it lowers π(ỹ): exploration
    loss = dpo + jnp.sum(bonus) / jnp.maximum(num_pairs, 1.0)
    # the DPO term's sum over these pairs (it came normalised by the whole step's pair count)
    metrics["loss/dpo"] = (jax.lax.stop_gradient(dpo) * jnp.maximum(num_pairs, 1.0), jnp.sum(ones))
    metrics["loss/xpo"] = sum_and_count(jax.lax.stop_gradient(bonus))
    policy = jax.lax.stop_gradient(jnp.stack([policy_logps, policy_logps_of_reference]))  # [2, pairs]
    kl = policy - jnp.stack([ref_logps, ref_logps_of_reference])
    metrics["objective/kl"] = sum_and_count(jnp.mean(kl, axis=0))
    metrics["objective/entropy"] = sum_and_count(-jnp.mean(policy, axis=0))
    metrics["alpha"] = sum_and_count(alpha * ones)
    metrics["beta"] = sum_and_count(beta * ones)
    if policy_scores is not None:
        metrics["objective/model_scores"] = sum_and_count(f32(policy_scores))
        metrics["objective/ref_scores"] = sum_and_count(f32(reference_scores))
        metrics["objective/scores_margin"] = sum_and_count(f32(policy_scores) - f32(reference_scores))
    return loss, metrics if return_counts else mean_metrics(metrics)


# --------------------------------------------------------------------------------------------------------------
# Rollouts: one policy sample and one reference sample per prompt, scored and compared
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceSampler:
    """What `jaxpt.rollout.sample_and_score` reads of a train state (`graphdef`, `full_params()`), holding the
    reference's parameters instead: the reference samples ỹ with the policy's sampling options."""

    graphdef: Any
    params: Any

    def full_params(self):
        return self.params


def sampling_options(config: XPOConfig) -> SimpleNamespace:
    """What `jaxpt.rollout.sample_and_score` reads of a config: one completion per prompt, TRL's options."""
    return SimpleNamespace(num_generations=1, max_completion_length=config.max_new_tokens,
                           temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                           min_p=config.min_p, mask_truncated_completions=False,
                           log_completions=config.log_completions)


# Copied from jaxpt.experimental.online_dpo.combined_scores
def combined_scores(rewards: np.ndarray, finished: np.ndarray, *, reward_weights: Sequence[float] | None,
                    missing_eos_penalty: float | None) -> np.ndarray:
    """`[n]` scores from the rewards `[n, functions]` (NaN: not scored): the weighted sum with NaN counting as 0
    (TRL's `nansum`), minus `missing_eos_penalty` where the completion did not end with EOS."""
    weights = np.ones(rewards.shape[1]) if reward_weights is None else np.asarray(reward_weights, np.float64)
    scores = np.nansum(rewards.astype(np.float64) * weights[None, :], axis=1)
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * ~np.asarray(finished, bool)
    return scores.astype(np.float32)


def rollout(state: TrainState, prompts: Sequence[dict], reward_funcs: Sequence[Callable], tokenizer,
            config: XPOConfig, *, key: jax.Array, mesh, prompt_buckets: Sequence[int], reference,
            ref_logps_fn=None, policy_logps_fn=None):
    """Sample y from the policy (`state`) and ỹ from `reference` (its parameters, laid out like
    `state.full_params()`) for each prompt, and score both. Returns
    `(arrays, metrics, records)`: numpy arrays `[pairs, ...]` (`prompt_ids`, `prompt_mask`, `policy_ids`,
    `policy_mask`, `reference_ids`, `reference_mask`, `chosen_is_policy`, `policy_scores`, `reference_scores`, and
    with `ref_logps_fn(arrays)` the reference's summed log-probs `ref_logps` of y and `ref_logps_of_reference` of
    ỹ), the sampling metrics (`objective/model_scores`, `objective/ref_scores`, `objective/scores_margin`,
    `val/model_contain_eos_token`, `val/ref_contain_eos_token`, `completions/*` of the policy's samples) and one
    record per sample. `policy_logps_fn` is unused (on-policy); accepted for `jaxpt.rollout.evaluate_rollouts`."""
    del policy_logps_fn
    sampling = sampling_options(config)
    reference_state = ReferenceSampler(state.graphdef, reference)
    sampled = [sample_and_score(sampler, prompts, reward_funcs, tokenizer, sampling, key=jax.random.fold_in(key, i),
                                mesh=mesh, prompt_buckets=prompt_buckets)
               for i, sampler in enumerate((state, reference_state))]
    policy_scores, reference_scores = (
        combined_scores(s.rewards, s.finished, reward_weights=config.reward_weights,
                        missing_eos_penalty=config.missing_eos_penalty) for s in sampled)
    on_policy, on_reference = sampled[0].arrays, sampled[1].arrays
    arrays = {"prompt_ids": on_policy["prompt_ids"], "prompt_mask": on_policy["prompt_mask"],
              "policy_ids": on_policy["completion_ids"], "policy_mask": on_policy["attention_mask"],
              "reference_ids": on_reference["completion_ids"], "reference_mask": on_reference["attention_mask"],
              "chosen_is_policy": policy_scores >= reference_scores,  # a tie goes to the policy's sample (TRL)
              "policy_scores": policy_scores, "reference_scores": reference_scores}
    if ref_logps_fn is not None:
        for name, completions in (("ref_logps", on_policy), ("ref_logps_of_reference", on_reference)):
            arrays[name] = (ref_logps_fn(completions) * completions["attention_mask"]).sum(-1).astype(np.float32)
    metrics = {"objective/model_scores": float(policy_scores.mean()),
               "objective/ref_scores": float(reference_scores.mean()),
               "objective/scores_margin": float((policy_scores - reference_scores).mean()),
               "val/model_contain_eos_token": float(np.mean(sampled[0].finished)),
               "val/ref_contain_eos_token": float(np.mean(sampled[1].finished)),
               **completion_metrics(sampled[0].lengths, sampled[0].finished)}
    records = [{"prompt": p, "completion": c, "score": float(s), "sampler": sampler}
               for sampler, samples, scores in (("policy", sampled[0], policy_scores),
                                                ("reference", sampled[1], reference_scores))
               for p, c, s in zip(samples.prompts, samples.completions, scores, strict=True)]
    return arrays, metrics, records


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def pair_logps(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: XPOConfig):
    """`(log π(y), log π(ỹ))` `[pairs]`: summed completion-token log-probs under the raw logits (TRL's), both
    samples of a prompt in one forward pass (chunked, never full logits)."""
    both = {"prompt_ids": jnp.concatenate([batch["prompt_ids"]] * 2),
            "prompt_mask": jnp.concatenate([batch["prompt_mask"]] * 2),
            "completion_ids": jnp.concatenate([batch["policy_ids"], batch["reference_ids"]]),
            "attention_mask": jnp.concatenate([batch["policy_mask"], batch["reference_mask"]])}
    token_logps, _ = completion_logps(params, graphdef, both, temperature=1.0, chunk_size=config.logits_chunk_size)
    summed = jnp.sum(token_logps * both["attention_mask"], axis=-1)
    return jnp.split(summed, 2)


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: XPOConfig, totals: dict):
    policy_logps, policy_logps_of_reference = pair_logps(params, graphdef, batch, config)
    return xpo_loss(policy_logps, policy_logps_of_reference, batch["ref_logps"], batch["ref_logps_of_reference"],
                    batch["chosen_is_policy"], beta=batch["beta"][0], alpha=batch["alpha"][0],
                    loss_type=config.loss_type, policy_scores=batch["policy_scores"],
                    reference_scores=batch["reference_scores"], num_pairs=totals["pairs"], return_counts=True)


def make_train_step(config: XPOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None):
    """`state, metrics = step(state, batch)`: one optimizer step over `rollout`'s arrays shaped `[accumulation,
    micro_batch, ...]` (with `ref_logps` / `ref_logps_of_reference`, and `beta`, `alpha` `[accumulation,
    micro_batch]`: this epoch's values everywhere), micro-batches scanned inside and normalised like one big batch.
    jitted with explicit shardings and the state donated."""

    def step(state: TrainState, batch: dict):
        totals = {"pairs": float(batch["policy_ids"].shape[0] * batch["policy_ids"].shape[1])}
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


def train(model: nnx.Module, tokenizer, dataset, config: XPOConfig, *, reward_funcs: Sequence[Callable | str],
          ref_model: nnx.Module | None = None, eval_dataset=None) -> loop.TrainResult:
    """XPO on the prompts of `dataset` (TRL prompt-only format; other columns go to the reward functions): each
    step samples one policy and one reference completion for each of `per_device_train_batch_size x devices x
    gradient_accumulation_steps` prompts, compares them with `reward_funcs` (callables with TRL's signature, names
    from `jaxpt.rewards.REWARD_FUNCTIONS`, or `jaxpt.rewards.model_reward(...)`) and takes one optimizer step.
    Progress bar, `metrics.jsonl` with TRL's names, evaluation (the policy's sampled scores on `eval_dataset`),
    orbax checkpoints, exact resume, HF export. `ref_model`: default a frozen copy of `model` (LoRA: adapters off)."""
    config.validate()  # again: fields may have been changed since the config was built
    loop.prepare_output_dir(config)
    reward_funcs = [resolve_reward_function(f) for f in reward_funcs]
    if not reward_funcs:
        raise ValueError("reward_funcs is empty: XPO compares its samples with at least one reward function.")
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
    prompts = data.prepare_prompts(dataset, tokenizer, method="XPO", max_prompt_length=max_prompt_length)
    eval_prompts = None
    if eval_dataset is not None and config.eval_strategy != "no":
        eval_prompts = data.prepare_prompts(eval_dataset, tokenizer, method="XPO", max_prompt_length=max_prompt_length)
    distributed.check_same_data(prompts, what="XPO prompts")  # every process builds the same batches
    steps_in_epoch = data.steps_per_epoch(len(prompts), prompts_per_step, method="XPO")
    total_steps = data.total_steps(config, steps_in_epoch)
    prompt_buckets = data.length_buckets(max(max(len(p["prompt_ids"]) for p in prompts), 16), min_length=16)
    check_rollout_inputs(reward_funcs, [model, ref_model], prompts, eval_prompts, tokenizer, sampling_options(config),
                         method="XPO")
    if ref_model is not None:
        check_reference_dtypes(nnx.state(model, nnx.Param), nnx.state(ref_model, nnx.Param))
    else:
        check_reference_without_adapters(model, method="XPO")

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    # under LoRA the default reference is the base with the adapters off; a ref_model runs with zero adapters
    reference = (lora.with_adapters_off(nnx.state(ref_model, nnx.Param), state) if ref_model is not None
                 else reference_params(state))
    ref_logps_fn = make_ref_logps_fn(reference, state.graphdef, temperature=1.0, chunk_size=config.logits_chunk_size,
                                     micro_batch=micro_pairs, mesh=mesh)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding)
    checkpoints = loop.checkpointer(config, method="xpo", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints)
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="xpo", start_step=start_step, config=config.to_dict())
    order = data.step_indices(len(prompts), prompts_per_step, seed=config.seed, shuffle=config.shuffle_dataset,
                              start_step=start_step)
    base_key = jax.random.key(config.seed)
    try:
        for step in range(start_step, total_steps):
            epoch, indices = next(order)
            arrays, rollout_metrics, records = rollout(
                state, [prompts[i] for i in indices], reward_funcs, tokenizer, config,
                key=jax.random.fold_in(base_key, step), mesh=mesh, prompt_buckets=prompt_buckets,
                ref_logps_fn=ref_logps_fn, reference=reference)
            if config.log_completions:
                append_jsonl(Path(config.output_dir) / "completions.jsonl", [{"step": step, **r} for r in records])
            arrays["beta"] = np.full(prompts_per_step, value_for_epoch(config.beta, epoch), np.float32)
            arrays["alpha"] = np.full(prompts_per_step, value_for_epoch(config.alpha, epoch), np.float32)
            num_tokens += int(arrays["prompt_mask"].sum() * 2 + arrays["policy_mask"].sum()
                              + arrays["reference_mask"].sum())
            batch = {k: v.reshape(accumulation, micro_pairs, *v.shape[1:]) for k, v in arrays.items()}
            placed = shard_batch(batch, mesh, batch_axis=1, global_batch=True,
                                 check_shapes=False)  # the whole rollout is on every process: same shapes
            state, metrics = train_step(state, placed)
            done = step + 1
            log.log(done, {**metrics, **rollout_metrics, "learning_rate": schedule(step), "num_tokens": num_tokens},
                    epoch=done / steps_in_epoch)
            if eval_prompts and loop.should_evaluate(config, done, steps_in_epoch):
                log.write({"step": done, **evaluate_rollouts(
                    functools.partial(rollout, reference=reference), state, eval_prompts, reward_funcs, tokenizer,
                    config, mesh=mesh, prompt_buckets=prompt_buckets, prompts_per_rollout=prompts_per_step)})
            if config.save_steps and done % config.save_steps == 0:
                log.sync()
                checkpoints.save(done, state, {"num_tokens": num_tokens})
        log.flush(total_steps, epoch=total_steps / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))
