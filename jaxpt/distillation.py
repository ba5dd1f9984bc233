"""Knowledge distillation: `DistillationConfig`, data preparation, `make_train_step`, `train`.

TRL's `DistillationTrainer` (On-Policy Distillation of Language Models, Agarwal et al. 2024, arXiv:2306.13649):
the student samples completions of the dataset's prompts with the training parameters (`jaxpt.sampling.generate`,
in process, no weight copy), and learns to match the frozen teacher's next-token distribution on them under the
generalized Jensen-Shannon divergence `jaxpt.losses.distillation` (`beta` 0: forward KL, 0.5: JSD, 1: reverse KL,
TRL's convention; `temperature` for both sampling and the divergence). Each optimizer step samples its own batch
of `per_device_train_batch_size x devices x gradient_accumulation_steps` prompts (TRL generates once per
accumulation cycle), and the loss is normalised by the completion tokens of the whole step.

`lmbda` (GKD's name; jaxpt's addition to the stable trainer): the fraction of steps that sample on-policy. The
other steps train on the dataset's own completions (prompt-completion or `messages` data). TRL's
`DistillationTrainer` is always on-policy, which is the default `lmbda=1.0`.

The teacher is any causal LM with the student's vocabulary (larger or smaller); its parameters are laid out on the
same mesh by its own partition rules, get no gradient and no optimizer state, and its logits are compared with the
student's a chunk of tokens at a time (`distillation_loss_from_hidden`), so neither model's `[tokens, vocab]`
logits exist for the whole batch.

```python
config = DistillationConfig(output_dir="out", beta=0.5, max_completion_length=128, max_steps=100)
result = jaxpt.distillation.train(student, tokenizer, prompts_dataset, config, teacher_model=teacher)

step = jaxpt.distillation.make_train_step(config, teacher_graphdef=teacher_graphdef)   # or your own loop
state, metrics = step(state, batch, teacher_params)
```
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
from jaxpt.losses.distillation import distillation_loss_from_hidden
from jaxpt.losses.metrics import add_metrics, mean_metrics, total_metrics
from jaxpt.models import set_gradient_checkpointing
from jaxpt.rollout import append_jsonl, completion_metrics, eos_token_ids
from jaxpt.sampling import generate
from jaxpt.sharding import batch_divisor, host_array, mesh_from_config, shard_batch, tree_shardings
from jaxpt.train_state import TrainState, jit_step, make_optimizer

logger = logging.getLogger("jaxpt")


@dataclass
class DistillationConfig(TrainingConfig):
    """TRL's `DistillationConfig` fields that have a meaning here (same names and defaults), plus `lmbda`."""

    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate (TRL's distillation "
                                                                 "default)."})
    teacher_model_name_or_path: str | None = field(default=None, metadata={
        "help": "The teacher: Hugging Face checkpoint directory or Hub id (the command line loads it; `train` takes "
                "the loaded model). It needs the student's vocabulary."})
    max_completion_length: int = field(default=512, metadata={"help": "Tokens generated per completion at most "
                                                                      "(dataset completions are cut to it too)."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Keep the last this many prompt tokens "
                                                                          "(jaxpt; None: no truncation)."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle the prompts every epoch (seeded)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature, and the temperature of both "
                                                              "distributions in the divergence."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling (None: off)."})
    beta: float = field(default=1.0, metadata={"help": "Generalized JSD interpolation: 0.0 forward KL(teacher || "
                                                       "student), 0.5 JSD, 1.0 reverse KL(student || teacher)."})
    lmbda: float = field(default=1.0, metadata={"help": "Fraction of steps whose completions the student samples "
                                                        "(on-policy); the others use the dataset's completions "
                                                        "(GKD's lmbda; 1.0: always on-policy, as TRL's "
                                                        "DistillationTrainer)."})
    log_completions: bool = field(default=False, metadata={"help": "Append every step's prompts and completions "
                                                                   "to output_dir/completions.jsonl."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk when comparing the two "
                                                                   "models' logits (memory vs speed)."})

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta={self.beta} must be in [0, 1] (0: forward KL, 0.5: JSD, 1: reverse KL).")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda={self.lmbda} must be in [0, 1] (the fraction of on-policy steps).")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0.")
        if self.max_completion_length < 1:
            raise ValueError(f"max_completion_length={self.max_completion_length} must be >= 1.")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length={self.max_prompt_length} must be >= 1 (or None: no truncation).")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1.0: off).")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0: off).")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1] (or None: off).")
        if self.logits_chunk_size < 1:
            raise ValueError(f"logits_chunk_size={self.logits_chunk_size} must be >= 1.")


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def prepare_dataset(dataset, tokenizer, config: DistillationConfig) -> list[dict]:
    """Examples `{"prompt", "prompt_ids"[, "completion_prompt_ids", "completion_ids"]}` from a TRL dataset:
    prompt-only (`prompt`), prompt-completion (`prompt`, `completion`) or conversational language modeling
    (`messages`, whose last message, an assistant turn, is the completion); standard or conversational.

    `prompt_ids` are what the student samples after (chat template with the generation prompt; the last
    `max_prompt_length` tokens); `completion_prompt_ids` + `completion_ids` are the dataset's prompt and completion
    as tokenized together (the completion cut to `max_completion_length`), for the off-policy steps (`lmbda < 1`)."""
    fmt = data.require_format(dataset, ("prompt_only", "prompt_completion", "language_modeling"),
                              method="Distillation")
    if fmt.kind == "language_modeling" and not fmt.conversational:
        raise ValueError("Distillation needs prompts: a standard language-modeling dataset (one text column) has "
                         "none. Use prompt-only (prompt), prompt-completion (prompt, completion) or conversational "
                         "(messages) data.")
    data.check_chat_template(tokenizer, fmt, method="Distillation")
    columns = ("messages",) if fmt.kind == "language_modeling" else data.text_columns(fmt)
    data.check_rows(dataset, fmt, method="Distillation", tokenizer=tokenizer, columns=columns)
    has_completions = fmt.kind != "prompt_only"
    if config.lmbda < 1.0 and not has_completions:
        raise ValueError(f"lmbda={config.lmbda} trains a fraction of the steps on the dataset's completions, but this "
                         "is a prompt-only dataset: use prompt-completion or messages data, or set lmbda=1.0 "
                         "(always on-policy).")
    if config.lmbda == 1.0 and has_completions:
        logger.warning("lmbda=1.0: every step trains on completions the student samples; the dataset's completions "
                       "are not used (set lmbda < 1 to train on them part of the time).")
    examples = []
    for index, row in enumerate(dataset):
        if fmt.kind == "language_modeling":
            messages = list(row["messages"])
            if len(messages) < 2 or messages[-1].get("role") != "assistant":
                raise ValueError(f"Example {index}: distillation of `messages` data takes the last message as the "
                                 "completion, so it must be an assistant message after at least one other message.")
            prompt, completion = messages[:-1], messages[-1:]
        else:
            prompt, completion = row["prompt"], row.get("completion")
        prompt_ids = data.tokenize(tokenizer, prompt, add_generation_prompt=fmt.conversational)["input_ids"]
        data.check_nonempty(prompt_ids, what="prompt", index=index)
        if config.max_prompt_length is not None:
            prompt_ids = prompt_ids[-config.max_prompt_length:]
        example = {"prompt": prompt, "prompt_ids": prompt_ids}
        if has_completions and config.lmbda < 1.0:
            full_ids, prompt_length = data.tokenize_prompt_completion(tokenizer, prompt, completion,
                                                                      conversational=fmt.conversational)
            completion_ids = full_ids[prompt_length:][:config.max_completion_length]
            if not completion_ids or prompt_length == 0:
                raise ValueError(f"Example {index}: the prompt or the completion tokenized to no tokens; check the "
                                 "dataset's text and the tokenizer.")
            completion_prompt_ids = full_ids[:prompt_length]
            if config.max_prompt_length is not None:
                completion_prompt_ids = completion_prompt_ids[-config.max_prompt_length:]
            example.update(completion_prompt_ids=completion_prompt_ids, completion_ids=completion_ids)
        examples.append(example)
    return examples


def collate_completions(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], *,
                        prompt_length: int, completion_length: int, pad_token_id: int) -> dict[str, np.ndarray]:
    """Token lists -> the arrays the step trains on: `prompt_ids`/`prompt_mask` `[n, prompt_length]` (left-padded),
    `completion_ids`/`attention_mask`/`completion_mask` `[n, completion_length]` (right-padded)."""
    ones = [[1] * len(ids) for ids in completion_ids]
    attention_mask = data.pad_rows(ones, completion_length, 0)
    return {"prompt_ids": data.pad_rows(prompt_ids, prompt_length, pad_token_id, left=True),
            "prompt_mask": data.pad_rows([[1] * len(ids) for ids in prompt_ids], prompt_length, 0, left=True),
            "completion_ids": data.pad_rows(completion_ids, completion_length, pad_token_id),
            "attention_mask": attention_mask, "completion_mask": attention_mask.copy()}


def sample_completions(state: TrainState, examples: Sequence[dict], tokenizer, config: DistillationConfig, *,
                       key: jax.Array, mesh, prompt_buckets: Sequence[int]) -> tuple[dict[str, np.ndarray], dict]:
    """On-policy batch: the student (`state.full_params()`) samples one completion per example's prompt with the
    config's sampling options. Returns the step's arrays (`collate_completions` layout; `completion_ids` `[n,
    max_completion_length]`) and TRL's `completions/*` metrics."""
    pad_id = data.pad_token_id(tokenizer)
    length = data.bucket_length(max(len(e["prompt_ids"]) for e in examples), prompt_buckets)
    prompt_ids = data.pad_rows([e["prompt_ids"] for e in examples], length, pad_id, left=True)
    prompt_mask = data.pad_rows([[1] * len(e["prompt_ids"]) for e in examples], length, 0, left=True)
    out = generate(state.graphdef, state.full_params(), prompt_ids, prompt_mask, key=key,
                   max_new_tokens=config.max_completion_length, temperature=config.temperature,
                   top_k=config.top_k or None, top_p=config.top_p if config.top_p < 1.0 else None,
                   min_p=config.min_p, eos_token_ids=eos_token_ids(tokenizer), pad_token_id=pad_id, mesh=mesh)
    completion_ids, attention_mask, lengths, finished = (host_array(a) for a in (
        out.completion_ids, out.completion_mask, out.lengths, out.finished))
    attention_mask = np.asarray(attention_mask, np.int32)
    arrays = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": np.asarray(completion_ids),
              "attention_mask": attention_mask, "completion_mask": attention_mask.copy()}
    return arrays, completion_metrics(lengths, finished)


def dataset_completions(examples: Sequence[dict], tokenizer, *, prompt_buckets: Sequence[int],
                        completion_buckets: Sequence[int]) -> tuple[dict[str, np.ndarray], dict]:
    """Off-policy batch: the examples' own prompts and completions (`prepare_dataset` with `lmbda < 1`), padded to
    length buckets, and the `completions/*` metrics of those completions (finished: ends with EOS)."""
    prompts = [e["completion_prompt_ids"] for e in examples]
    completions = [e["completion_ids"] for e in examples]
    arrays = collate_completions(
        prompts, completions, pad_token_id=data.pad_token_id(tokenizer),
        prompt_length=data.bucket_length(max(map(len, prompts)), prompt_buckets),
        completion_length=data.bucket_length(max(map(len, completions)), completion_buckets))
    lengths = np.asarray([len(c) for c in completions])
    finished = np.asarray([c[-1] in eos_token_ids(tokenizer) for c in completions])
    return arrays, completion_metrics(lengths, finished)


def is_on_policy_step(step: int, config: DistillationConfig) -> bool:
    """Whether `step` samples its completions (probability `lmbda`), drawn from the seed and the step alone, so a
    resumed run makes the same choices."""
    if config.lmbda >= 1.0:
        return True
    if config.lmbda <= 0.0:
        return False
    return bool(np.random.default_rng([config.seed, step]).random() < config.lmbda)


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def _completion_hidden(model: nnx.Module, batch: dict) -> jax.Array:
    """Final hidden states at the positions that predict the completion tokens `[batch, completion_len, hidden]`."""
    prompt_length = batch["prompt_ids"].shape[-1]
    completion_length = batch["completion_ids"].shape[-1]
    input_ids = jnp.concatenate([batch["prompt_ids"], batch["completion_ids"]], axis=-1)
    attention_mask = jnp.concatenate([batch["prompt_mask"], batch["attention_mask"]], axis=-1)
    hidden = model.hidden_states(input_ids, attention_mask=attention_mask)
    return hidden[:, prompt_length - 1: prompt_length + completion_length - 1]


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, teacher_params: nnx.State, teacher_graphdef: nnx.GraphDef,
            batch: dict, config: DistillationConfig, num_tokens: jax.Array):
    """Loss of one micro-batch, normalised by the completion tokens of the whole step, and its metrics as `(sum,
    count)` pairs."""
    student = nnx.merge(graphdef, params)
    teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
    student_hidden = _completion_hidden(student, batch)
    teacher_hidden = jax.lax.stop_gradient(_completion_hidden(teacher, batch))
    return distillation_loss_from_hidden(
        student_hidden, student.lm_head_weight(), teacher_hidden, teacher.lm_head_weight(), batch["completion_mask"],
        beta=config.beta, temperature=config.temperature, num_tokens=num_tokens,
        student_logit_softcap=student.final_logit_softcap, teacher_logit_softcap=teacher.final_logit_softcap,
        chunk_size=config.logits_chunk_size, return_counts=True)


def make_train_step(config: DistillationConfig, *, teacher_graphdef: nnx.GraphDef,
                    mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None, teacher_sharding: Any = None):
    """`state, metrics = step(state, batch, teacher_params)`: one optimizer step over arrays shaped
    `[accumulation, micro_batch, ...]` (`prompt_ids`, `prompt_mask`, `completion_ids`, `attention_mask`,
    `completion_mask`), micro-batches scanned inside. `teacher_params`: `nnx.split(teacher, nnx.Param)[1]`, laid
    out by `teacher_sharding` on a mesh (`teacher_shardings`). jitted with explicit shardings, the state donated."""
    if mesh is not None and teacher_sharding is None:
        raise ValueError("make_train_step(mesh=...) needs teacher_sharding=teacher_shardings(teacher, mesh).")

    def step(state: TrainState, batch: dict, teacher_params: nnx.State):
        num_tokens = jnp.maximum(jnp.sum(batch["completion_mask"].astype(jnp.float32)), 1.0)
        # differentiate the trained parameters only (under LoRA the adapters; the frozen base joins them here)
        grad_fn = lora.value_and_grad(loss_fn, state, seed=config.seed)  # under LoRA: adapters, with dropout

        def micro_step(grads, inputs):
            micro_batch, micro_index = inputs
            (loss, metric_pairs), micro_grads = grad_fn(state.params, state.graphdef, teacher_params,
                                                        teacher_graphdef, micro_batch, config, num_tokens,
                                                        micro_index=micro_index)
            return jax.tree.map(jnp.add, grads, micro_grads), (loss, metric_pairs)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro_indices = jnp.arange(jax.tree.leaves(batch)[0].shape[0])
        grads, (losses, metric_pairs) = jax.lax.scan(micro_step, zeros, (batch, micro_indices))
        metrics = mean_metrics(total_metrics(metric_pairs))
        metrics["loss"] = jnp.sum(losses)
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.apply_gradients(grads), metrics

    return jit_step(step, mesh=mesh, state_sharding=state_sharding, extra_in_shardings=(teacher_sharding,))


def make_eval_step(config: DistillationConfig, *, teacher_graphdef: nnx.GraphDef,
                   mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None, teacher_sharding: Any = None):
    """`metrics = eval_step(state, batch, teacher_params)`: the loss and entropy as `(sum, count)` pairs over the
    completion tokens, without updating (the loss pair weighs the batch by its tokens, so batches add up)."""

    def eval_step(state: TrainState, batch: dict, teacher_params: nnx.State):
        tokens = jnp.sum(batch["completion_mask"].astype(jnp.float32))
        num_tokens = jnp.maximum(tokens, 1.0)

        def micro_step(_, micro_batch):
            return None, loss_fn(state.full_params(), state.graphdef, teacher_params, teacher_graphdef, micro_batch,
                                 config, num_tokens)

        _, (losses, metric_pairs) = jax.lax.scan(micro_step, None, batch)
        metrics = total_metrics(metric_pairs)
        metrics["loss"] = (jnp.sum(losses) * tokens, tokens)
        return metrics

    return jit_step(eval_step, mesh=mesh, state_sharding=state_sharding, train=False,
                    extra_in_shardings=(teacher_sharding,))


def teacher_shardings(teacher_params: nnx.State, teacher_model: nnx.Module, mesh: jax.sharding.Mesh | None):
    """The teacher's parameter layout on `mesh`, by its own family's partition rules (None without a mesh)."""
    if mesh is None:
        return None
    return tree_shardings(teacher_params, mesh, tuple(getattr(teacher_model, "partition_rules", ())))


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------


def _check_teacher(model: nnx.Module, teacher_model: nnx.Module) -> None:
    if teacher_model is None:
        raise ValueError("Distillation needs a teacher: train(..., teacher_model=...) (on the command line "
                         "--teacher_model_name_or_path).")
    student_vocab, teacher_vocab = model.lm_head_weight().shape[0], teacher_model.lm_head_weight().shape[0]
    if student_vocab != teacher_vocab:
        raise ValueError(f"The teacher's vocabulary ({teacher_vocab} tokens) differs from the student's "
                         f"({student_vocab}): distillation compares next-token distributions token by token, so "
                         "both need the same tokenizer and vocab_size.")


def train(model: nnx.Module, tokenizer, dataset, config: DistillationConfig, *, teacher_model: nnx.Module,
          eval_dataset=None) -> loop.TrainResult:
    """Distil `teacher_model` into `model` on the prompts of `dataset` (TRL prompt-only, prompt-completion or
    `messages` format): progress bar, `metrics.jsonl` with TRL's names (`loss`, `entropy`, `completions/*`), evaluation
    (the loss on completions the student samples for `eval_dataset`'s prompts), orbax checkpoints, exact resume, HF
    export of the student."""
    config.validate()  # again: fields may have been changed since the config was built
    loop.prepare_output_dir(config)
    _check_teacher(model, teacher_model)
    mesh = mesh_from_config(config)
    micro_batch = config.per_device_train_batch_size * batch_divisor(mesh)
    examples_per_step = micro_batch * config.gradient_accumulation_steps
    examples = prepare_dataset(dataset, tokenizer, config)
    eval_examples = None
    if eval_dataset is not None and config.eval_strategy != "no":
        eval_examples = prepare_dataset(eval_dataset, tokenizer, config)
    distributed.check_same_data(examples, what="distillation examples")  # every process builds the same batches
    steps_in_epoch = data.steps_per_epoch(len(examples), examples_per_step, method="Distillation")
    total_steps = data.total_steps(config, steps_in_epoch)
    all_examples = examples + (eval_examples or [])
    # the sampled prompts and the dataset's (tokenized with their completions) share the prompt buckets
    longest_prompt = max(max(len(e["prompt_ids"]), len(e.get("completion_prompt_ids", ()))) for e in all_examples)
    prompt_buckets = data.length_buckets(max(longest_prompt, 16), min_length=16)
    completion_buckets = data.length_buckets(config.max_completion_length, min_length=16)
    keys = ("prompt_ids", "completion_prompt_ids", "completion_ids") if config.lmbda < 1.0 else ("prompt_ids",)
    for checked in (model, teacher_model):
        data.check_model_fits(checked, all_examples, keys, method="Distillation", longest=longest_prompt,
                              length_fields="max_prompt_length + max_completion_length",
                              extra_length=config.max_completion_length,
                              extra_ids=(tokenizer.eos_token_id, data.pad_token_id(tokenizer)))

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    teacher_graphdef, teacher_params = nnx.split(teacher_model, nnx.Param)
    teacher_sharding = teacher_shardings(teacher_params, teacher_model, mesh)
    if mesh is not None:  # in place already when from_pretrained(mesh=...) read it straight into its shards
        teacher_params = jax.device_put(teacher_params, teacher_sharding)
    train_step = make_train_step(config, teacher_graphdef=teacher_graphdef, mesh=mesh, state_sharding=state_sharding,
                                 teacher_sharding=teacher_sharding)
    eval_step = make_eval_step(config, teacher_graphdef=teacher_graphdef, mesh=mesh, state_sharding=state_sharding,
                               teacher_sharding=teacher_sharding)
    checkpoints = loop.checkpointer(config, method="distillation", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints)
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="distillation", start_step=start_step, config=config.to_dict())
    note_shape = loop.ShapeNotes()
    order = data.step_indices(len(examples), examples_per_step, seed=config.seed, shuffle=config.shuffle_dataset,
                              start_step=start_step)
    base_key = jax.random.key(config.seed)
    try:
        for step in range(start_step, total_steps):
            _, indices = next(order)
            chosen = [examples[i] for i in indices]
            if is_on_policy_step(step, config):
                arrays, completion_stats = sample_completions(state, chosen, tokenizer, config,
                                                              key=jax.random.fold_in(base_key, step), mesh=mesh,
                                                              prompt_buckets=prompt_buckets)
            else:
                arrays, completion_stats = dataset_completions(chosen, tokenizer, prompt_buckets=prompt_buckets,
                                                               completion_buckets=completion_buckets)
            if config.log_completions:
                _log_completions(config, step, chosen, arrays, tokenizer)
            num_tokens += int(arrays["prompt_mask"].sum() + arrays["attention_mask"].sum())
            batch = {k: v.reshape(config.gradient_accumulation_steps, micro_batch, *v.shape[1:])
                     for k, v in arrays.items()}
            note_shape(batch)
            state, metrics = train_step(state, shard_batch(batch, mesh, batch_axis=1, global_batch=True),
                                        teacher_params)
            done = step + 1
            log.log(done, {**metrics, **completion_stats, "learning_rate": schedule(step), "num_tokens": num_tokens},
                    epoch=done / steps_in_epoch)
            if eval_examples and loop.should_evaluate(config, done, steps_in_epoch):
                log.write({"step": done, **evaluate(eval_step, state, teacher_params, eval_examples, tokenizer, config,
                                                    mesh=mesh, prompt_buckets=prompt_buckets)})
            if config.save_steps and done % config.save_steps == 0:
                log.sync()  # a checkpoint is written only after its losses were checked finite
                checkpoints.save(done, state, {"num_tokens": num_tokens})
        log.flush(total_steps, epoch=total_steps / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))


def evaluate(eval_step, state, teacher_params, examples: Sequence[dict], tokenizer, config: DistillationConfig, *,
             mesh, prompt_buckets: Sequence[int]) -> dict[str, float]:
    """The divergence and entropy on completions the student samples for every eval prompt (as TRL evaluates),
    token-weighted over the whole eval set, with an `eval_` prefix. Batches of `per_device_eval_batch_size x
    devices` prompts, the last one filled up with its last prompt (left out of the totals)."""
    batch_size = config.per_device_eval_batch_size * batch_divisor(mesh)
    key = jax.random.key(config.seed + 1)
    totals = None
    for index, start in enumerate(range(0, len(examples), batch_size)):
        chunk = list(examples[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)
        arrays, _ = sample_completions(state, chunk, tokenizer, config, key=jax.random.fold_in(key, index),
                                       mesh=mesh, prompt_buckets=prompt_buckets)
        arrays["completion_mask"][real:] = 0  # the fill-up rows count for nothing
        batch = {k: v[None] for k, v in arrays.items()}
        placed = shard_batch(batch, mesh, batch_axis=1, global_batch=True)
        totals = add_metrics(totals, jax.device_get(eval_step(state, placed, teacher_params)))
    return {f"eval_{key}": float(value) for key, value in mean_metrics(totals).items()}


def _log_completions(config: DistillationConfig, step: int, examples: Sequence[dict], arrays: dict, tokenizer) -> None:
    lengths = arrays["attention_mask"].sum(axis=1)
    texts = tokenizer.batch_decode([row[:n].tolist() for row, n in zip(arrays["completion_ids"], lengths,
                                                                        strict=True)], skip_special_tokens=True)
    append_jsonl(Path(config.output_dir) / "completions.jsonl",
                 [{"step": step, "prompt": e["prompt"], "completion": t} for e, t in zip(examples, texts, strict=True)])
