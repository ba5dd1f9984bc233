"""Generalized Knowledge Distillation (GKD): `GKDConfig`, `generalized_jsd_loss` and `train`. Experimental: no
stability promise (see `jaxpt.experimental`).

GKD (On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes, Agarwal et al. 2024,
arXiv:2306.13649), TRL 1.16's `trl.experimental.gkd.GKDTrainer`, is the stable `jaxpt.distillation` method (data,
student sampling, chunked generalized JSD under the mesh, teacher on the same mesh) with these deltas, each explicit
below:

- TRL's GKD names and defaults: `temperature=0.9`, `lmbda=0.5`, `beta=0.5`, `max_new_tokens=128`, `seq_kd`,
  learning rate 2e-5 (SFTConfig's), sampling without top-k / top-p (TRL's GKD fixes them off).
- The temperature only shapes the student's samples: the divergence compares the two distributions at temperature
  1 (TRL's `GKDTrainer.compute_loss` does not pass its temperature to `generalized_jsd_loss`):

      p_s = softmax(z_s),  p_t = softmax(z_t),  m = (1 - beta) p_s + beta p_t
      D_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m)     (beta 0: KL(p_t || p_s), beta 1: KL(p_s || p_t))
      L = (1/N) sum_t mask_t D_beta(t)       N: the completion tokens of the whole optimizer step

- `seq_kd` (sequence-level KD): the steps that are not on-policy train on completions the teacher samples for the
  prompts (supervised learning on teacher outputs, Kim & Rush 2016) instead of the dataset's.

With probability `lmbda` a step trains on completions the student samples; otherwise on the teacher's (`seq_kd`) or
the dataset's. jaxpt draws the choice per optimizer step from the seed and the step (a resumed run makes the same
choices); TRL draws it per micro-batch with Python's `random`. Evaluation is `jaxpt.distillation`'s: the divergence
on completions the student samples for the eval prompts.

```python
config = GKDConfig(output_dir="out", lmbda=0.5, beta=0.5, max_new_tokens=64, max_steps=100)
result = jaxpt.experimental.gkd.train(student, tokenizer, dataset, config, teacher_model=teacher)
```
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import jax
import numpy as np
from flax import nnx

from jaxpt import data, distillation, distributed, loop
from jaxpt.config import TrainingConfig
from jaxpt.logging import MetricsLogger
from jaxpt.losses.distillation import distillation_loss
from jaxpt.models import set_gradient_checkpointing
from jaxpt.rollout import completion_metrics, eos_token_ids
from jaxpt.sampling import generate
from jaxpt.sharding import batch_divisor, host_array, mesh_from_config, shard_batch
from jaxpt.train_state import TrainState, make_optimizer

logger = logging.getLogger("jaxpt")


@dataclass
class GKDConfig(TrainingConfig):
    """TRL 1.16's `GKDConfig` fields that have a meaning here (same names and defaults), plus jaxpt's
    `max_prompt_length`, `shuffle_dataset`, `log_completions` and `logits_chunk_size` (as `DistillationConfig`)."""

    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate (TRL's SFTConfig default, "
                                                                 "which GKDConfig inherits)."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature of the on-policy (and seq_kd) "
                                                              "completions; the divergence uses temperature 1."})
    lmbda: float = field(default=0.5, metadata={"help": "Fraction of steps trained on completions the student "
                                                        "samples (on-policy)."})
    beta: float = field(default=0.5, metadata={"help": "Generalized JSD interpolation: 0.0 forward KL(teacher || "
                                                       "student), 0.5 JSD, 1.0 reverse KL(student || teacher)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens generated per completion at most (dataset "
                                                               "completions are cut to it too)."})
    teacher_model_name_or_path: str | None = field(default=None, metadata={
        "help": "The teacher: Hugging Face checkpoint directory or Hub id (the command line loads it; `train` takes "
                "the loaded model). It needs the student's vocabulary."})
    seq_kd: bool = field(default=False, metadata={"help": "Sequence-level KD: the steps that are not on-policy "
                                                          "train on completions the teacher samples instead of the "
                                                          "dataset's."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Keep the last this many prompt tokens "
                                                                          "(jaxpt; None: no truncation)."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle the prompts every epoch (seeded)."})
    log_completions: bool = field(default=False, metadata={"help": "Append every step's prompts and completions "
                                                                   "to output_dir/completions.jsonl."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk when comparing the two "
                                                                   "models' logits (memory vs speed)."})

    def validate(self) -> None:
        super().validate()
        distillation_config(self)  # the stable method's checks of the shared fields (beta, lmbda, temperature, ...)


def distillation_config(config: GKDConfig, *, loss: bool = False) -> distillation.DistillationConfig:
    """The `jaxpt.distillation` configuration GKD runs: for sampling and data (`loss=False`: the GKD temperature,
    top-k/top-p off), or for the step (`loss=True`: temperature 1, as TRL's GKD loss)."""
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainingConfig)}
    try:
        return distillation.DistillationConfig(
            **shared, teacher_model_name_or_path=config.teacher_model_name_or_path,
            max_completion_length=config.max_new_tokens, max_prompt_length=config.max_prompt_length,
            shuffle_dataset=config.shuffle_dataset, temperature=1.0 if loss else config.temperature, top_p=1.0,
            top_k=0, min_p=None, beta=config.beta, lmbda=config.lmbda, log_completions=config.log_completions,
            logits_chunk_size=config.logits_chunk_size)
    except ValueError as error:  # name GKD's field where the two differ
        raise ValueError(str(error).replace("max_completion_length", "max_new_tokens")) from None


def generalized_jsd_loss(student_logits: jax.Array, teacher_logits: jax.Array, completion_mask: jax.Array, *,
                         beta: float = 0.5, temperature: float = 1.0, num_tokens: jax.Array | float | None = None):
    """TRL's `GKDTrainer.generalized_jsd_loss` (reduction "batchmean" over the unmasked positions, or the sum over
    `num_tokens`): `jaxpt.losses.distillation.distillation_loss`, GKD's defaults. Logits `[batch, seq, vocab]`, mask
    `[batch, seq]`; returns `(loss, {"entropy": ...})`. The step calls it with temperature 1."""
    return distillation_loss(student_logits, teacher_logits, completion_mask, beta=beta, temperature=temperature,
                             num_tokens=num_tokens)


def teacher_completions(teacher_graphdef: nnx.GraphDef, teacher_params: nnx.State, examples: Sequence[dict],
                        tokenizer, config: distillation.DistillationConfig, *, key: jax.Array, mesh,
                        prompt_buckets: Sequence[int]) -> tuple[dict[str, np.ndarray], dict]:
    """`seq_kd` batch: the teacher samples one completion per prompt with the config's sampling options; the arrays
    and metrics of `jaxpt.distillation.sample_completions`."""
    pad_id = data.pad_token_id(tokenizer)
    length = data.bucket_length(max(len(e["prompt_ids"]) for e in examples), prompt_buckets)
    prompt_ids = data.pad_rows([e["prompt_ids"] for e in examples], length, pad_id, left=True)
    prompt_mask = data.pad_rows([[1] * len(e["prompt_ids"]) for e in examples], length, 0, left=True)
    out = generate(teacher_graphdef, teacher_params, prompt_ids, prompt_mask, key=key,
                   max_new_tokens=config.max_completion_length, temperature=config.temperature,
                   eos_token_ids=eos_token_ids(tokenizer), pad_token_id=pad_id, mesh=mesh)
    completion_ids, attention_mask, lengths, finished = (host_array(a) for a in (
        out.completion_ids, out.completion_mask, out.lengths, out.finished))
    attention_mask = np.asarray(attention_mask, np.int32)
    arrays = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": np.asarray(completion_ids),
              "attention_mask": attention_mask, "completion_mask": attention_mask.copy()}
    return arrays, completion_metrics(lengths, finished)


def train(model: nnx.Module, tokenizer, dataset, config: GKDConfig, *, teacher_model: nnx.Module,
          eval_dataset=None) -> loop.TrainResult:
    """Distil `teacher_model` into `model` with GKD on `dataset` (TRL prompt-only — with `lmbda=1` or `seq_kd` —,
    prompt-completion or `messages` data): `jaxpt.distillation`'s data, sampling and step (at temperature 1),
    `metrics.jsonl` with TRL's names (`loss`, `entropy`, `completions/*`), evaluation, checkpoints, exact resume and
    HF export of the student."""
    config.validate()
    loop.prepare_output_dir(config)
    sampling_config = distillation_config(config)
    loss_config = distillation_config(config, loss=True)
    # with seq_kd no step reads the dataset's completions: prompts are all the data needs
    data_config = sampling_config.replace(lmbda=1.0) if config.seq_kd else sampling_config
    distillation._check_teacher(model, teacher_model)
    mesh = mesh_from_config(config)
    micro_batch = config.per_device_train_batch_size * batch_divisor(mesh)
    examples_per_step = micro_batch * config.gradient_accumulation_steps
    examples = distillation.prepare_dataset(dataset, tokenizer, data_config)
    eval_examples = None
    if eval_dataset is not None and config.eval_strategy != "no":
        eval_examples = distillation.prepare_dataset(eval_dataset, tokenizer, data_config)
    distributed.check_same_data(examples, what="GKD examples")
    steps_in_epoch = data.steps_per_epoch(len(examples), examples_per_step, method="GKD")
    total_steps = data.total_steps(config, steps_in_epoch)
    all_examples = examples + (eval_examples or [])
    longest_prompt = max(max(len(e["prompt_ids"]), len(e.get("completion_prompt_ids", ()))) for e in all_examples)
    prompt_buckets = data.length_buckets(max(longest_prompt, 16), min_length=16)
    completion_buckets = data.length_buckets(config.max_new_tokens, min_length=16)
    keys = ("prompt_ids", "completion_prompt_ids", "completion_ids") if data_config.lmbda < 1.0 else ("prompt_ids",)
    for checked in (model, teacher_model):
        data.check_model_fits(checked, all_examples, keys, method="GKD", longest=longest_prompt,
                              length_fields="max_prompt_length + max_new_tokens", extra_length=config.max_new_tokens,
                              extra_ids=(tokenizer.eos_token_id, data.pad_token_id(tokenizer)))

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    teacher_graphdef, teacher_params = nnx.split(teacher_model, nnx.Param)
    teacher_sharding = distillation.teacher_shardings(teacher_params, teacher_model, mesh)
    if mesh is not None:
        teacher_params = jax.device_put(teacher_params, teacher_sharding)
    train_step = distillation.make_train_step(loss_config, teacher_graphdef=teacher_graphdef, mesh=mesh,
                                              state_sharding=state_sharding, teacher_sharding=teacher_sharding)
    eval_step = distillation.make_eval_step(loss_config, teacher_graphdef=teacher_graphdef, mesh=mesh,
                                            state_sharding=state_sharding, teacher_sharding=teacher_sharding)
    checkpoints = loop.checkpointer(config, method="gkd", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints)
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="gkd", start_step=start_step, config=config.to_dict())
    note_shape = loop.ShapeNotes()
    order = data.step_indices(len(examples), examples_per_step, seed=config.seed, shuffle=config.shuffle_dataset,
                              start_step=start_step)
    base_key = jax.random.key(config.seed)
    try:
        for step in range(start_step, total_steps):
            _, indices = next(order)
            chosen = [examples[i] for i in indices]
            key = jax.random.fold_in(base_key, step)
            if distillation.is_on_policy_step(step, sampling_config):
                arrays, completion_stats = distillation.sample_completions(
                    state, chosen, tokenizer, sampling_config, key=key, mesh=mesh, prompt_buckets=prompt_buckets)
            elif config.seq_kd:
                arrays, completion_stats = teacher_completions(teacher_graphdef, teacher_params, chosen, tokenizer,
                                                               sampling_config, key=key, mesh=mesh,
                                                               prompt_buckets=prompt_buckets)
            else:
                arrays, completion_stats = distillation.dataset_completions(
                    chosen, tokenizer, prompt_buckets=prompt_buckets, completion_buckets=completion_buckets)
            if config.log_completions:
                distillation._log_completions(sampling_config, step, chosen, arrays, tokenizer)
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
                log.write({"step": done, **distillation.evaluate(eval_step, state, teacher_params, eval_examples,
                                                                 tokenizer, sampling_config, mesh=mesh,
                                                                 prompt_buckets=prompt_buckets)})
            if config.save_steps and done % config.save_steps == 0:
                log.sync()
                checkpoints.save(done, state, {"num_tokens": num_tokens})
        log.flush(total_steps, epoch=total_steps / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))
