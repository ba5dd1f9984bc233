"""IW-OPD: Importance-Weighted On-Policy Distillation (Xie et al. 2026, "On the Position Bias of On-Policy
Distillation", arXiv:2606.22600): `IWOPDConfig`, the pure loss `iw_opd_loss`, `make_train_step`, `train`.
Experimental: no stability promise (see `jaxpt.experimental`). TRL 1.16 has it as `trl.experimental.iw_opd`
(`IWOPDTrainer`, a frozen snapshot of its older `DistillationTrainer`); config and metric names follow it.

On-policy distillation trains the student on its own samples. IW-OPD turns the teacher's verdict on each sampled
token into a policy-gradient advantage and weighs early tokens up, because the supervision of late tokens comes
from prefixes that have drifted away from anything the teacher would write. Per completion, over its tokens t:

    A_t = log p_T(y_t | y_<t) - log p_S(y_t | y_<t)          (both at `temperature`; a constant: no gradient)
    w_t = 1 + gamma (1 - sum_{s<t} |A_s| / max(sum_s |A_s|, epsilon))     (a constant too; w in [1, 1 + gamma])
    L   = -(1/N) sum_t w_t A_t log p_S(y_t | y_<t)

with gamma = `iw_opd_gamma`, epsilon = `iw_opd_epsilon`, N the completion tokens of the whole optimizer step. The
log-prob in `A_t` is the behaviour (sampling) policy's: TRL uses the sampler's cached log-probs when it has them
(vLLM) and otherwise the student's own training forward pass, detached; jaxpt samples in process with the very
parameters it updates, one optimizer step per batch, so it takes the training forward pass (exactly the
behaviour policy in float32, and no sampler/trainer mismatch in bfloat16). Metrics, TRL's names:
`iw_opd/mean_advantage` (of w_t A_t), `iw_opd/mean_abs_advantage` (of |A_t|), `iw_opd/mean_weight`,
`iw_opd/min_weight`, `iw_opd/max_weight` (over the step's tokens), and `on_policy_loss` / `off_policy_loss`.

What is the same as stable `jaxpt.distillation` and reused from it: the config (`DistillationConfig`: teacher,
`lmbda`, `beta`, `temperature`, sampling options), the data (`prepare_dataset`), the student's sampling and the
dataset completions of off-policy steps (`sample_completions`, `dataset_completions`, `is_on_policy_step`), the
teacher's layout on the same mesh (`teacher_shardings`) and evaluation. `distillation_objective="jsd"` is exactly
`jaxpt.distillation`'s generalized JSD (`beta`), full vocabulary. The delta: this loss, which needs only each
model's log-prob of the sampled token (`jaxpt.rollout.completion_logps`, chunked: no `[tokens, vocab]` logits of the
batch ever exist, the teacher's under `stop_gradient`), and its metrics.

Not ported from TRL's trainer: the vLLM student sampler and teacher server (jaxpt samples in process; the teacher
runs on the same mesh), and the top-k/tail approximations of the JSD path (`loss_top_k`, `loss_add_tail`,
`reverse_kl_top_1_mode`: jaxpt's JSD is exact over the full vocabulary, chunked). `num_generations` > 1 is not
offered: sample more prompts per step instead.

```python
config = IWOPDConfig(output_dir="out", iw_opd_gamma=0.5, max_completion_length=128, max_steps=100)
result = jaxpt.experimental.iw_opd.train(student, tokenizer, prompts_dataset, config, teacher_model=teacher)
```
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxpt import data, distillation, distributed, loop, lora
from jaxpt.logging import MetricsLogger
from jaxpt.losses.metrics import MetricPairs, mean_metrics, sum_and_count, total_metrics
from jaxpt.models import set_gradient_checkpointing
from jaxpt.rollout import completion_logps
from jaxpt.sharding import batch_divisor, mesh_from_config, shard_batch
from jaxpt.train_state import TrainState, jit_step, make_optimizer

logger = logging.getLogger("jaxpt")

DISTILLATION_OBJECTIVES = ("iw_opd", "jsd")


@dataclass
class IWOPDConfig(distillation.DistillationConfig):
    """`jaxpt.distillation.DistillationConfig` plus TRL 1.16's `IWOPDConfig` fields (same names and defaults)."""

    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass (TRL's IW-OPD default 0.95; 1.0: "
                                                         "off)."})
    distillation_objective: str = field(default="iw_opd", metadata={
        "help": "'iw_opd': the sampled-token importance-weighted objective; 'jsd': jaxpt.distillation's generalized "
                "JSD (beta) over the full vocabulary."})
    iw_opd_gamma: float = field(default=0.5, metadata={"help": "Importance-weight amplification gamma: token weights "
                                                               "run from 1 + gamma (first) down toward 1."})
    iw_opd_epsilon: float = field(default=1e-8, metadata={"help": "Stabiliser of the prefix-weight normalisation "
                                                                  "(lower bound of a completion's total |A|)."})

    def validate(self) -> None:
        super().validate()
        if self.distillation_objective not in DISTILLATION_OBJECTIVES:
            raise ValueError(f"distillation_objective={self.distillation_objective!r}; use one of "
                             f"{DISTILLATION_OBJECTIVES}.")
        if self.iw_opd_gamma < 0:
            raise ValueError(f"iw_opd_gamma={self.iw_opd_gamma} must be >= 0 (0: no position weighting).")
        if self.iw_opd_epsilon <= 0:
            raise ValueError(f"iw_opd_epsilon={self.iw_opd_epsilon} must be > 0.")


# --------------------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------------------


def iw_opd_loss(
    student_logps: jax.Array,
    teacher_logps: jax.Array,
    completion_mask: jax.Array,
    *,
    behaviour_logps: jax.Array | None = None,
    gamma: float = 0.5,
    epsilon: float = 1e-8,
    num_tokens: jax.Array | float | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, Any]:
    """IW-OPD loss (module docstring) from per-token log-probs `[batch, seq]` of the sampled tokens: the student's
    (differentiated), the teacher's, and the behaviour policy's (default: the student's, detached), with the mask of
    the completion tokens. Normalised by `num_tokens` (default: the mask's count). Returns `(loss, metrics)`; with
    `return_counts`, `(loss, (pairs, extremes))`: the means as `(sum, count)` pairs and `iw_opd/min_weight` /
    `iw_opd/max_weight` as this batch's extremes (+inf / -inf when it has no token)."""
    mask = completion_mask.astype(bool)
    behaviour = jax.lax.stop_gradient(student_logps if behaviour_logps is None else behaviour_logps)
    teacher = jax.lax.stop_gradient(teacher_logps).astype(jnp.float32)
    advantage = jnp.where(mask, teacher - behaviour.astype(jnp.float32), 0.0)  # A_t, 0 off the completion
    absolute = jnp.abs(advantage)
    before = jnp.cumsum(absolute, axis=-1) - absolute  # sum_{s<t} |A_s|
    total = jnp.maximum(jnp.sum(absolute, axis=-1, keepdims=True), epsilon)
    weights = 1.0 + gamma * (1.0 - before / total)
    weighted = weights * advantage
    per_token = jnp.where(mask, -student_logps.astype(jnp.float32) * weighted, 0.0)
    denominator = jnp.maximum(jnp.sum(mask.astype(jnp.float32)) if num_tokens is None
                              else jnp.asarray(num_tokens, jnp.float32), 1.0)
    loss = jnp.sum(per_token) / denominator
    pairs = {"iw_opd/mean_advantage": sum_and_count(weighted, mask),
             "iw_opd/mean_abs_advantage": sum_and_count(absolute, mask),
             "iw_opd/mean_weight": sum_and_count(weights, mask)}
    extremes = {"iw_opd/min_weight": jnp.min(jnp.where(mask, weights, jnp.inf)),
                "iw_opd/max_weight": jnp.max(jnp.where(mask, weights, -jnp.inf))}
    if return_counts:
        return loss, (pairs, extremes)
    return loss, {**mean_metrics(pairs), **_finite(extremes)}


def _finite(extremes: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Extremes reduced over any leading axes (micro-batches); 0 for a step without tokens (nothing to log)."""
    reduced = {}
    for name, values in extremes.items():
        value = jnp.min(values) if name.endswith("min_weight") else jnp.max(values)
        reduced[name] = jnp.where(jnp.isfinite(value), value, 0.0)
    return reduced


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, teacher_params: nnx.State, teacher_graphdef: nnx.GraphDef,
            batch: dict, config: IWOPDConfig, num_tokens: jax.Array) -> tuple[jax.Array, tuple[MetricPairs, dict]]:
    """Loss of one micro-batch, normalised by the completion tokens of the whole step, its metrics as `(sum, count)`
    pairs and its weight extremes. The JSD objective is `jaxpt.distillation.loss_fn` itself."""
    if config.distillation_objective == "jsd":
        loss, pairs = distillation.loss_fn(params, graphdef, teacher_params, teacher_graphdef, batch, config,
                                           num_tokens)
        return loss, (pairs, {})
    # only the sampled token's log-prob of each model, from hidden states in chunks (never the batch's logits)
    student_logps, _ = completion_logps(params, graphdef, batch, temperature=config.temperature,
                                        chunk_size=config.logits_chunk_size)
    teacher_logps, _ = completion_logps(jax.lax.stop_gradient(teacher_params), teacher_graphdef, batch,
                                        temperature=config.temperature, chunk_size=config.logits_chunk_size)
    return iw_opd_loss(student_logps, teacher_logps, batch["completion_mask"], gamma=config.iw_opd_gamma,
                       epsilon=config.iw_opd_epsilon, num_tokens=num_tokens, return_counts=True)


def make_train_step(config: IWOPDConfig, *, teacher_graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh | None = None,
                    state_sharding: Any = None, teacher_sharding: Any = None):
    """`state, metrics = step(state, batch, teacher_params)`: `jaxpt.distillation.make_train_step`'s contract
    (arrays `[accumulation, micro_batch, ...]`, micro-batches scanned inside, jitted with explicit shardings, the
    state donated) with the IW-OPD loss and metrics."""
    if mesh is not None and teacher_sharding is None:
        raise ValueError("make_train_step(mesh=...) needs teacher_sharding=distillation.teacher_shardings(teacher, "
                         "mesh).")

    def step(state: TrainState, batch: dict, teacher_params: nnx.State):
        num_tokens = jnp.maximum(jnp.sum(batch["completion_mask"].astype(jnp.float32)), 1.0)
        grad_fn = lora.value_and_grad(loss_fn, state, seed=config.seed)  # under LoRA: adapters, with dropout

        def micro_step(grads, inputs):
            micro_batch, micro_index = inputs
            (loss, aux), micro_grads = grad_fn(state.params, state.graphdef, teacher_params, teacher_graphdef,
                                               micro_batch, config, num_tokens, micro_index=micro_index)
            return jax.tree.map(jnp.add, grads, micro_grads), (loss, aux)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro_indices = jnp.arange(jax.tree.leaves(batch)[0].shape[0])
        grads, (losses, (pairs, extremes)) = jax.lax.scan(micro_step, zeros, (batch, micro_indices))
        metrics = {**mean_metrics(total_metrics(pairs)), **_finite(extremes)}
        metrics["loss"] = jnp.sum(losses)
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.apply_gradients(grads), metrics

    return jit_step(step, mesh=mesh, state_sharding=state_sharding, extra_in_shardings=(teacher_sharding,))


def make_eval_step(config: IWOPDConfig, *, teacher_graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh | None = None,
                   state_sharding: Any = None, teacher_sharding: Any = None):
    """`metrics = eval_step(state, batch, teacher_params)`: the loss and the mean metrics as `(sum, count)` pairs
    over the completion tokens (batches add up; `jaxpt.distillation.evaluate` drives it)."""

    def eval_step(state: TrainState, batch: dict, teacher_params: nnx.State):
        tokens = jnp.sum(batch["completion_mask"].astype(jnp.float32))
        num_tokens = jnp.maximum(tokens, 1.0)

        def micro_step(_, micro_batch):
            loss, (pairs, _) = loss_fn(state.full_params(), state.graphdef, teacher_params, teacher_graphdef,
                                       micro_batch, config, num_tokens)
            return None, (loss, pairs)

        _, (losses, pairs) = jax.lax.scan(micro_step, None, batch)
        metrics = total_metrics(pairs)
        metrics["loss"] = (jnp.sum(losses) * tokens, tokens)
        return metrics

    return jit_step(eval_step, mesh=mesh, state_sharding=state_sharding, train=False,
                    extra_in_shardings=(teacher_sharding,))


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------


def train(model: nnx.Module, tokenizer, dataset, config: IWOPDConfig, *, teacher_model: nnx.Module,
          eval_dataset=None) -> loop.TrainResult:
    """Distil `teacher_model` into `model` with IW-OPD on the prompts of `dataset` (TRL prompt-only,
    prompt-completion or `messages` format; `lmbda < 1` trains the other steps on the dataset's completions):
    `jaxpt.distillation.train`'s loop (progress, `metrics.jsonl` with TRL's names, evaluation, orbax checkpoints,
    exact resume, HF export) with this method's step."""
    config.validate()
    loop.prepare_output_dir(config)
    distillation._check_teacher(model, teacher_model)
    mesh = mesh_from_config(config)
    micro_batch = config.per_device_train_batch_size * batch_divisor(mesh)
    examples_per_step = micro_batch * config.gradient_accumulation_steps
    examples = distillation.prepare_dataset(dataset, tokenizer, config)
    eval_examples = None
    if eval_dataset is not None and config.eval_strategy != "no":
        eval_examples = distillation.prepare_dataset(eval_dataset, tokenizer, config)
    distributed.check_same_data(examples, what="IW-OPD examples")
    steps_in_epoch = data.steps_per_epoch(len(examples), examples_per_step, method="IW-OPD")
    total_steps = data.total_steps(config, steps_in_epoch)
    all_examples = examples + (eval_examples or [])
    longest_prompt = max(max(len(e["prompt_ids"]), len(e.get("completion_prompt_ids", ()))) for e in all_examples)
    prompt_buckets = data.length_buckets(max(longest_prompt, 16), min_length=16)
    completion_buckets = data.length_buckets(config.max_completion_length, min_length=16)
    keys = ("prompt_ids", "completion_prompt_ids", "completion_ids") if config.lmbda < 1.0 else ("prompt_ids",)
    for checked in (model, teacher_model):
        data.check_model_fits(checked, all_examples, keys, method="IW-OPD", longest=longest_prompt,
                              length_fields="max_prompt_length + max_completion_length",
                              extra_length=config.max_completion_length,
                              extra_ids=(tokenizer.eos_token_id, data.pad_token_id(tokenizer)))

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    teacher_graphdef, teacher_params = nnx.split(teacher_model, nnx.Param)
    teacher_sharding = distillation.teacher_shardings(teacher_params, teacher_model, mesh)
    if mesh is not None:
        teacher_params = jax.device_put(teacher_params, teacher_sharding)
    train_step = make_train_step(config, teacher_graphdef=teacher_graphdef, mesh=mesh, state_sharding=state_sharding,
                                 teacher_sharding=teacher_sharding)
    eval_step = make_eval_step(config, teacher_graphdef=teacher_graphdef, mesh=mesh, state_sharding=state_sharding,
                               teacher_sharding=teacher_sharding)
    checkpoints = loop.checkpointer(config, method="iw_opd", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints)
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="iw_opd", start_step=start_step, config=config.to_dict())
    note_shape = loop.ShapeNotes()
    order = data.step_indices(len(examples), examples_per_step, seed=config.seed, shuffle=config.shuffle_dataset,
                              start_step=start_step)
    base_key = jax.random.key(config.seed)
    try:
        for step in range(start_step, total_steps):
            _, indices = next(order)
            chosen = [examples[i] for i in indices]
            on_policy = distillation.is_on_policy_step(step, config)
            if on_policy:
                arrays, completion_stats = distillation.sample_completions(
                    state, chosen, tokenizer, config, key=jax.random.fold_in(base_key, step), mesh=mesh,
                    prompt_buckets=prompt_buckets)
            else:
                arrays, completion_stats = distillation.dataset_completions(
                    chosen, tokenizer, prompt_buckets=prompt_buckets, completion_buckets=completion_buckets)
            if config.log_completions:
                distillation._log_completions(config, step, chosen, arrays, tokenizer)
            num_tokens += int(arrays["prompt_mask"].sum() + arrays["attention_mask"].sum())
            batch = {k: v.reshape(config.gradient_accumulation_steps, micro_batch, *v.shape[1:])
                     for k, v in arrays.items()}
            note_shape(batch)
            state, metrics = train_step(state, shard_batch(batch, mesh, batch_axis=1, global_batch=True),
                                        teacher_params)
            # TRL's split of the loss by where the completions came from (each averaged over its own steps)
            split_loss = {"on_policy_loss" if on_policy else "off_policy_loss": metrics["loss"]}
            done = step + 1
            log.log(done, {**metrics, **split_loss, **completion_stats, "learning_rate": schedule(step),
                           "num_tokens": num_tokens}, epoch=done / steps_in_epoch)
            if eval_examples and loop.should_evaluate(config, done, steps_in_epoch):
                log.write({"step": done, **distillation.evaluate(eval_step, state, teacher_params, eval_examples,
                                                                 tokenizer, config, mesh=mesh,
                                                                 prompt_buckets=prompt_buckets)})
            if config.save_steps and done % config.save_steps == 0:
                log.sync()
                checkpoints.save(done, state, {"num_tokens": num_tokens})
        log.flush(total_steps, epoch=total_steps / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))
