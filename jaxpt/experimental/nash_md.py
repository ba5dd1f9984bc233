"""Nash-MD, Nash Mirror Descent (Munos et al. 2023, "Nash Learning from Human Feedback", arXiv:2312.00886):
`NashMDConfig`, `nash_md_loss`, `GeometricMixture`, rollouts, `make_train_step`, `train`. Experimental: no stability
promise (see `jaxpt.experimental`).

Every step samples one completion y per prompt from the policy π (the training parameters) and one completion y'
from the geometric mixture of the policy and the reference, π_mix ∝ π^(1-m) π_ref^m token by token (`mixture_coef`
m; `GeometricMixture` samples it with jaxpt's in-process sampler), scores both with the reward functions (a reward
model is `jaxpt.rewards.model_reward(...)`) and turns the scores into the preference P(y ≻ y') = σ(r(y) - r(y')).
The update is the paper's Nash-MD policy gradient (Nash-MD-PG, section 7): raise the log-likelihood of y in
proportion to P(y ≻ y') - 1/2 (1/2, the preference of a policy against itself, is the baseline), minus β times the
KL divergence to the reference, estimated by the score function with the sampled log-ratio:

    ∇L = -mean [ (P(y ≻ y') - 1/2 - β log(π(y) / π_ref(y))) ∇ log π(y) ]

```python
config = NashMDConfig(output_dir="out", mixture_coef=[0.5], max_new_tokens=64, max_steps=100)
result = jaxpt.experimental.nash_md.train(model, tokenizer, prompts_dataset, config, reward_funcs=[my_reward])
```

TRL 1.16 no longer ships Nash-MD: the config names are those of TRL's removed `NashMDConfig` (Online DPO's
sampling and reward options plus `mixture_coef`, a list giving one value per epoch like `beta`), the metrics those
of its `NashMDTrainer` (`loss/kl`, `loss/score`, `objective/entropy`, `rewards/probabilities`, `rewards/margins`,
`rewards/accuracies`, `rewards/chosen` / `rewards/rejected` (mean scores of y / y'), `logps/chosen` / `logps/rejected`
(log π(y) / log π_ref(y)), `val/model_contain_eos_token`, `val/ref_contain_eos_token`, `beta`, `mixture_coef`). The
loss is tested against the paper's estimator in float64. One difference from TRL's removed trainer: its KL term
weighted each token's gradient by that token's own log-ratio; here every token of y is weighted by the whole
sequence's log-ratio, the score-function estimator of the sequence KL's gradient (unbiased).
"""

from __future__ import annotations

import functools
import logging
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpt import data, distributed, loop, lora
from jaxpt.config import TrainingConfig
from jaxpt.logging import MetricsLogger
from jaxpt.lora import check_reference_without_adapters
from jaxpt.losses.logprobs import masked_sum
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


@dataclass
class NashMDConfig(TrainingConfig):
    """TRL's removed `NashMDConfig` (Online DPO's sampling and reward fields plus `mixture_coef`), same names and
    defaults."""

    learning_rate: float = field(default=5e-7, metadata={"help": "Peak learning rate (TRL's Online DPO default)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per completion at most."})
    max_length: int = field(default=512, metadata={"help": "Prompt + completion tokens at most: prompts keep their "
                                                           "last max_length - max_new_tokens tokens."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature (policy and mixture)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling (None: off)."})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "Subtracted from the score of a completion that did not end with EOS (None: no penalty)."})
    beta: list[float] = field(default_factory=lambda: [0.1], metadata={
        "help": "β: weight of the KL divergence to the reference; a list gives one per epoch, the last for the "
                "epochs after it (a single float is accepted)."})
    mixture_coef: list[float] = field(default_factory=lambda: [0.5], metadata={
        "help": "m in [0, 1]: the opponent samples from π^(1-m) π_ref^m (0: the policy itself, 1: the reference); a "
                "list gives one per epoch (a single float is accepted)."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weight of each reward function "
                                                                               "(default: all 1)."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle prompts every epoch (seeded)."})
    log_completions: bool = field(default=False, metadata={"help": "Append every step's prompts, completions and "
                                                                   "scores to output_dir/completions.jsonl."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk when computing log-probs."})

    def validate(self) -> None:
        for name in ("beta", "mixture_coef"):  # TRL accepts one float as well as a list
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                setattr(self, name, [float(value)])
        super().validate()
        if not self.beta or any(b < 0 for b in self.beta):
            raise ValueError(f"beta={self.beta} must be one or more values >= 0 (one per epoch).")
        if not self.mixture_coef or any(not 0.0 <= m <= 1.0 for m in self.mixture_coef):
            raise ValueError(f"mixture_coef={self.mixture_coef} must be one or more values in [0, 1] (one per "
                             "epoch).")
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


def nash_md_loss(
    policy_logps: jax.Array,
    ref_logps: jax.Array,
    probabilities: jax.Array,
    completion_mask: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
    policy_scores: jax.Array | None = None,
    mixture_scores: jax.Array | None = None,
    num_sequences: jax.Array | float | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, dict]:
    """Nash-MD-PG's surrogate loss (arXiv:2312.00886, section 7). Inputs: per-token log-probs `[batch, seq]` of the
    policy's samples y under the policy (`policy_logps`, differentiable) and the reference (`ref_logps`), their
    `completion_mask`, and `probabilities` `[batch]` = P(y ≻ y') against the mixture's samples y'. With
    log π(y) = Σ_t policy_logps and KL(y) = Σ_t (policy_logps - ref_logps) (a constant):

        L = mean [ (β KL(y) - (P(y ≻ y') - 1/2)) log π(y) ]

    whose gradient is the paper's policy gradient of P(π ≻ π_mix) - β KL(π || π_ref). `num_sequences`: the whole
    step's count (micro-batches add up). Metrics, TRL's NashMDTrainer names: `loss/kl` (mean KL(y)), `loss/score`
    (mean (P - 1/2) log π(y)), `objective/entropy` (mean -log π(y)), `rewards/probabilities`, `rewards/margins`
    (mean log π(y) - log π_ref(y)), `rewards/accuracies` (share of positive margins), `logps/chosen` (log π(y)),
    `logps/rejected` (log π_ref(y)), `beta`, and with the scores `rewards/chosen` / `rewards/rejected` (mean score
    of y / y')."""
    mask = completion_mask.astype(jnp.float32)
    policy_sum = masked_sum(policy_logps.astype(jnp.float32), mask, axis=-1)  # [batch]
    ref_sum = masked_sum(jax.lax.stop_gradient(ref_logps).astype(jnp.float32), mask, axis=-1)
    kl = jax.lax.stop_gradient(policy_sum) - ref_sum
    advantage = jax.lax.stop_gradient(jnp.asarray(probabilities, jnp.float32) - 0.5)
    beta = jnp.asarray(beta, jnp.float32)
    num_sequences = jnp.float32(policy_sum.shape[0]) if num_sequences is None else num_sequences
    loss = jnp.sum((beta * kl - advantage) * policy_sum) / jnp.maximum(num_sequences, 1.0)
    policy = jax.lax.stop_gradient(policy_sum)
    margin = policy - ref_sum
    metrics = {
        "loss/kl": sum_and_count(kl),
        "loss/score": sum_and_count(advantage * policy),
        "objective/entropy": sum_and_count(-policy),
        "rewards/probabilities": sum_and_count(jnp.asarray(probabilities, jnp.float32)),
        "rewards/margins": sum_and_count(margin),
        "rewards/accuracies": sum_and_count((margin > 0).astype(jnp.float32)),
        "logps/chosen": sum_and_count(policy),
        "logps/rejected": sum_and_count(ref_sum),
        "beta": sum_and_count(beta * jnp.ones_like(policy)),
    }
    if policy_scores is not None:
        metrics["rewards/chosen"] = sum_and_count(jnp.asarray(policy_scores, jnp.float32))
        metrics["rewards/rejected"] = sum_and_count(jnp.asarray(mixture_scores, jnp.float32))
    return loss, metrics if return_counts else mean_metrics(metrics)


# --------------------------------------------------------------------------------------------------------------
# Sampling from the geometric mixture
# --------------------------------------------------------------------------------------------------------------


class MixtureCache(NamedTuple):
    """The two models' KV caches; passes on what `jaxpt.sampling.generate` asks of a cache."""

    policy: Any
    reference: Any

    def split_layers(self) -> MixtureCache:
        return MixtureCache(*(cache.split_layers() if hasattr(cache, "split_layers") else cache
                              for cache in (self.policy, self.reference)))

    def repeat_rows(self, repeats: int) -> MixtureCache:
        return MixtureCache(self.policy.repeat_rows(repeats), self.reference.repeat_rows(repeats))


class GeometricMixture(nnx.Module):
    """A causal LM for `jaxpt.sampling.generate` whose next-token distribution is the geometric mixture of two
    models', π_mix ∝ π^(1-m) π_ref^m: its logits are (1-m) log_softmax(policy logits) + m log_softmax(reference
    logits) (TRL's `GeometricMixtureWrapper`). Both models run with their own KV cache (a pair); `mixture_coef` is
    static (a new value compiles the sampler once more)."""

    def __init__(self, policy: nnx.Module, reference: nnx.Module, mixture_coef: float):
        self.policy, self.reference, self.mixture_coef = policy, reference, float(mixture_coef)

    def _mix(self, policy_logits: jax.Array, reference_logits: jax.Array) -> jax.Array:
        m = self.mixture_coef
        return ((1.0 - m) * jax.nn.log_softmax(policy_logits.astype(jnp.float32))
                + m * jax.nn.log_softmax(reference_logits.astype(jnp.float32)))

    def init_cache(self, batch_size: int, max_length: int, *, dtype: Any = None):
        return MixtureCache(self.policy.init_cache(batch_size, max_length, dtype=dtype),
                            self.reference.init_cache(batch_size, max_length, dtype=dtype))

    def prefill(self, input_ids: jax.Array, cache, *, attention_mask: jax.Array | None = None):
        policy_logits, policy_cache = self.policy.prefill(input_ids, cache[0], attention_mask=attention_mask)
        reference_logits, reference_cache = self.reference.prefill(input_ids, cache[1], attention_mask=attention_mask)
        return self._mix(policy_logits, reference_logits), MixtureCache(policy_cache, reference_cache)

    def decode_step(self, token_ids: jax.Array, cache):
        policy_logits, policy_cache = self.policy.decode_step(token_ids, cache[0])
        reference_logits, reference_cache = self.reference.decode_step(token_ids, cache[1])
        return self._mix(policy_logits, reference_logits), MixtureCache(policy_cache, reference_cache)


@dataclass(frozen=True)
class MixtureSampler:
    """What `jaxpt.rollout.sample_and_score` reads of a train state (`graphdef`, `full_params()`), for a
    `GeometricMixture` of the policy's parameters and the reference's (laid out like the policy's)."""

    graphdef: Any
    params: Any

    @classmethod
    def of(cls, graphdef, policy_params, reference_params, mixture_coef: float) -> MixtureSampler:
        # a GraphDef equal to the last one reuses the compiled sampler: only the parameters change between steps
        mixture = GeometricMixture(nnx.merge(graphdef, policy_params), nnx.merge(graphdef, reference_params),
                                   mixture_coef)
        return cls(*nnx.split(mixture, nnx.Param))

    def full_params(self):
        return self.params


# --------------------------------------------------------------------------------------------------------------
# Rollouts: one policy sample and one mixture sample per prompt, scored and compared
# --------------------------------------------------------------------------------------------------------------


# Copied from jaxpt.experimental.xpo.sampling_options with XPOConfig->NashMDConfig
def sampling_options(config: NashMDConfig) -> SimpleNamespace:
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
            config: NashMDConfig, *, key: jax.Array, mesh, prompt_buckets: Sequence[int], reference,
            mixture_coef: float, ref_logps_fn=None, policy_logps_fn=None):
    """Sample y from the policy (`state`) and y' from the `GeometricMixture` of the policy and `reference` (its
    parameters, laid out like `state.full_params()`) with `mixture_coef`, and score both. Returns `(arrays,
    metrics, records)`: numpy arrays `[n, ...]` (`prompt_ids`, `prompt_mask`, `completion_ids`, `completion_mask`
    of y, `probabilities` = σ(score(y) - score(y')), `policy_scores`, `mixture_scores`, and with
    `ref_logps_fn(arrays)` the reference's per-token log-probs `ref_logps` of y), the sampling metrics
    (`val/model_contain_eos_token`, `val/ref_contain_eos_token` (of y'), `rewards/probabilities`, `completions/*` of
    y) and one record per sample. `policy_logps_fn` is unused (on-policy); accepted for
    `jaxpt.rollout.evaluate_rollouts`."""
    del policy_logps_fn
    sampling = sampling_options(config)
    mixture = MixtureSampler.of(state.graphdef, state.full_params(), reference, mixture_coef)
    sampled = [sample_and_score(sampler, prompts, reward_funcs, tokenizer, sampling, key=jax.random.fold_in(key, i),
                                mesh=mesh, prompt_buckets=prompt_buckets)
               for i, sampler in enumerate((state, mixture))]
    policy_scores, mixture_scores = (
        combined_scores(s.rewards, s.finished, reward_weights=config.reward_weights,
                        missing_eos_penalty=config.missing_eos_penalty) for s in sampled)
    probabilities = (1.0 / (1.0 + np.exp(-(policy_scores.astype(np.float64) - mixture_scores)))).astype(np.float32)
    on_policy = sampled[0].arrays
    arrays = {"prompt_ids": on_policy["prompt_ids"], "prompt_mask": on_policy["prompt_mask"],
              "completion_ids": on_policy["completion_ids"], "completion_mask": on_policy["attention_mask"],
              "probabilities": probabilities, "policy_scores": policy_scores, "mixture_scores": mixture_scores}
    if ref_logps_fn is not None:
        arrays["ref_logps"] = ref_logps_fn(on_policy).astype(np.float32)
    metrics = {"rewards/probabilities": float(probabilities.mean()),
               "val/model_contain_eos_token": float(np.mean(sampled[0].finished)),
               "val/ref_contain_eos_token": float(np.mean(sampled[1].finished)),
               **completion_metrics(sampled[0].lengths, sampled[0].finished)}
    records = [{"prompt": p, "completion": c, "score": float(s), "sampler": sampler}
               for sampler, samples, scores in (("policy", sampled[0], policy_scores),
                                                ("mixture", sampled[1], mixture_scores))
               for p, c, s in zip(samples.prompts, samples.completions, scores, strict=True)]
    return arrays, metrics, records


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: NashMDConfig, totals: dict):
    # the training log-probs use the raw logits, as TRL's
    inputs = {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"],
              "completion_ids": batch["completion_ids"], "attention_mask": batch["completion_mask"]}
    token_logps, _ = completion_logps(params, graphdef, inputs, temperature=1.0, chunk_size=config.logits_chunk_size)
    return nash_md_loss(token_logps, batch["ref_logps"], batch["probabilities"], batch["completion_mask"],
                        beta=batch["beta"][0], policy_scores=batch["policy_scores"],
                        mixture_scores=batch["mixture_scores"], num_sequences=totals["sequences"],
                        return_counts=True)


def make_train_step(config: NashMDConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None):
    """`state, metrics = step(state, batch)`: one optimizer step over `rollout`'s arrays shaped `[accumulation,
    micro_batch, ...]` (with `ref_logps`, and `beta` `[accumulation, micro_batch]`: this epoch's β everywhere),
    micro-batches scanned inside and normalised like one big batch. jitted with explicit shardings and the state
    donated."""

    def step(state: TrainState, batch: dict):
        totals = {"sequences": float(batch["completion_ids"].shape[0] * batch["completion_ids"].shape[1])}
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


def train(model: nnx.Module, tokenizer, dataset, config: NashMDConfig, *, reward_funcs: Sequence[Callable | str],
          ref_model: nnx.Module | None = None, eval_dataset=None) -> loop.TrainResult:
    """Nash-MD on the prompts of `dataset` (TRL prompt-only format; other columns go to the reward functions): each
    step samples one policy and one mixture completion for each of `per_device_train_batch_size x devices x
    gradient_accumulation_steps` prompts, compares them with `reward_funcs` (callables with TRL's signature, names
    from `jaxpt.rewards.REWARD_FUNCTIONS`, or `jaxpt.rewards.model_reward(...)`) and takes one optimizer step.
    Progress bar, `metrics.jsonl` with TRL's names, evaluation (the sampled preference on `eval_dataset`), orbax
    checkpoints, exact resume, HF export. `ref_model`: default a frozen copy of `model` (LoRA: adapters off)."""
    config.validate()  # again: fields may have been changed since the config was built
    loop.prepare_output_dir(config)
    reward_funcs = [resolve_reward_function(f) for f in reward_funcs]
    if not reward_funcs:
        raise ValueError("reward_funcs is empty: Nash-MD compares its samples with at least one reward function.")
    if config.reward_weights is not None and len(config.reward_weights) != len(reward_funcs):
        raise ValueError(f"reward_weights has {len(config.reward_weights)} entries for {len(reward_funcs)} reward "
                         "functions.")
    if ref_model is model:
        raise ValueError("ref_model is the policy itself: leave ref_model=None for a frozen copy of the initial model.")
    mesh = mesh_from_config(config)
    micro_batch = config.per_device_train_batch_size * batch_divisor(mesh)
    accumulation = config.gradient_accumulation_steps
    prompts_per_step = micro_batch * accumulation
    max_prompt_length = config.max_length - config.max_new_tokens
    prompts = data.prepare_prompts(dataset, tokenizer, method="Nash-MD", max_prompt_length=max_prompt_length)
    eval_prompts = None
    if eval_dataset is not None and config.eval_strategy != "no":
        eval_prompts = data.prepare_prompts(eval_dataset, tokenizer, method="Nash-MD",
                                            max_prompt_length=max_prompt_length)
    distributed.check_same_data(prompts, what="Nash-MD prompts")  # every process builds the same batches
    steps_in_epoch = data.steps_per_epoch(len(prompts), prompts_per_step, method="Nash-MD")
    total_steps = data.total_steps(config, steps_in_epoch)
    prompt_buckets = data.length_buckets(max(max(len(p["prompt_ids"]) for p in prompts), 16), min_length=16)
    check_rollout_inputs(reward_funcs, [model, ref_model], prompts, eval_prompts, tokenizer, sampling_options(config),
                         method="Nash-MD")
    if ref_model is not None:
        check_reference_dtypes(nnx.state(model, nnx.Param), nnx.state(ref_model, nnx.Param))
    else:
        check_reference_without_adapters(model, method="Nash-MD")

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    # under LoRA the default reference is the base with the adapters off; a ref_model runs with zero adapters
    reference = (lora.with_adapters_off(nnx.state(ref_model, nnx.Param), state) if ref_model is not None
                 else reference_params(state))
    ref_logps_fn = make_ref_logps_fn(reference, state.graphdef, temperature=1.0, chunk_size=config.logits_chunk_size,
                                     micro_batch=micro_batch, mesh=mesh)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding)
    checkpoints = loop.checkpointer(config, method="nash_md", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints)
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="nash_md", start_step=start_step, config=config.to_dict())
    order = data.step_indices(len(prompts), prompts_per_step, seed=config.seed, shuffle=config.shuffle_dataset,
                              start_step=start_step)
    base_key = jax.random.key(config.seed)
    try:
        for step in range(start_step, total_steps):
            epoch, indices = next(order)
            mixture_coef = value_for_epoch(config.mixture_coef, epoch)
            arrays, rollout_metrics, records = rollout(
                state, [prompts[i] for i in indices], reward_funcs, tokenizer, config,
                key=jax.random.fold_in(base_key, step), mesh=mesh, prompt_buckets=prompt_buckets,
                reference=reference, mixture_coef=mixture_coef, ref_logps_fn=ref_logps_fn)
            if config.log_completions:
                append_jsonl(Path(config.output_dir) / "completions.jsonl", [{"step": step, **r} for r in records])
            arrays["beta"] = np.full(prompts_per_step, value_for_epoch(config.beta, epoch), np.float32)
            num_tokens += int(arrays["prompt_mask"].sum() + arrays["completion_mask"].sum())
            batch = {k: v.reshape(accumulation, micro_batch, *v.shape[1:]) for k, v in arrays.items()}
            placed = shard_batch(batch, mesh, batch_axis=1, global_batch=True,
                                 check_shapes=False)  # the whole rollout is on every process: same shapes
            state, metrics = train_step(state, placed)
            done = step + 1
            log.log(done, {**metrics, **rollout_metrics, "mixture_coef": mixture_coef,
                           "learning_rate": schedule(step), "num_tokens": num_tokens}, epoch=done / steps_in_epoch)
            if eval_prompts and loop.should_evaluate(config, done, steps_in_epoch):
                log.write({"step": done, **evaluate_rollouts(
                    functools.partial(rollout, reference=reference, mixture_coef=mixture_coef), state, eval_prompts,
                    reward_funcs, tokenizer, config, mesh=mesh, prompt_buckets=prompt_buckets,
                    prompts_per_rollout=prompts_per_step)})
            if config.save_steps and done % config.save_steps == 0:
                log.sync()
                checkpoints.save(done, state, {"num_tokens": num_tokens})
        log.flush(total_steps, epoch=total_steps / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))
