"""PRM, process reward models (step-wise supervision; Uesato et al. 2022, arXiv:2211.14275; Lightman et al. 2023,
arXiv:2305.20050): `PRMConfig`, `prm_loss`, data preparation, `make_train_step`, `train`. Experimental: no
stability promise (see `jaxpt.experimental`).

A process reward model judges every step of a solution, not only its outcome: the dataset gives a `prompt`, the
solution as a list of `completions` (its steps) and one boolean in `labels` per step (is this step correct?). The
model is a token classifier with two labels; it is trained at one token per step, the last token of the
`step_separator` that ends the step, and every other token is ignored (label -100). TRL had this as `PRMTrainer`
/ `PRMConfig` (removed before 1.16); config names, defaults and tokenization follow it.

```python
config = PRMConfig(output_dir="out", max_steps=100)
model = jaxpt.models.from_pretrained("path/to/hf_dir", num_labels=2)   # the classifier's head, used per token
result = jaxpt.experimental.prm.train(model, tokenizer, dataset, config)

step = jaxpt.experimental.prm.make_train_step(config)                  # or your own loop
state, metrics = step(state, batch)     # batch: collate(...) arrays [accumulation, micro_batch, seq]
```

The model: any jaxpt sequence classifier (`from_pretrained(path, num_labels=2)`); its `score` head is applied to
the hidden state of every token (`token_logits`) rather than of the last one, which is what `transformers`'
`*ForTokenClassification` does with the same `model.*` and `score` weights. The exported checkpoint says so
(`architectures: [...ForTokenClassification]`, `token_classification_bias: false`), so
`AutoModelForTokenClassification` loads it with the same logits.

The loss is the cross-entropy of the labelled tokens, a mean over all labelled tokens of the accumulated batch (so
`batch 8 x accumulation 1 == batch 2 x accumulation 4`); `accuracy` is the share of labelled steps whose argmax
is the label (TRL's `compute_accuracy` for token classification, logged as `eval_accuracy` in evaluation).
"""

from __future__ import annotations

import json
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
from jaxpt.losses.metrics import MetricPairs, add_metrics, mean_metrics, total_metrics
from jaxpt.models import set_gradient_checkpointing
from jaxpt.sharding import batch_divisor, mesh_from_config, shard_batch
from jaxpt.train_state import TrainState, jit_step, make_optimizer

logger = logging.getLogger("jaxpt")

IGNORE_INDEX = -100  # the label of every token that is not the end of a step (transformers' convention)
NUM_LABELS = 2  # 0: the step is wrong, 1: the step is right


@dataclass
class PRMConfig(TrainingConfig):
    """TRL's `PRMConfig` fields that have a meaning here (same names and defaults). `disable_dropout` has nothing
    to disable (jaxpt models have no dropout)."""

    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate (TRL's PRM default)."})
    max_length: int | None = field(default=1024, metadata={"help": "Prompt + completion tokens kept (the rest is "
                                                                    "cut; None: no limit)."})
    max_prompt_length: int | None = field(default=512, metadata={"help": "Keep the last this many prompt tokens "
                                                                         "(None: no limit)."})
    max_completion_length: int | None = field(default=None, metadata={
        "help": "Keep the first this many tokens of the completion, the steps joined with their separators (None: "
                "no limit)."})
    step_separator: str = field(default="\n", metadata={"help": "Appended to every step; the label sits on its last "
                                                                "token."})
    train_on_last_step_only: bool = field(default=False, metadata={
        "help": "Train on the label of the last step only (the others get -100); evaluation keeps every label."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes that tokenize the dataset "
                                                                         "(datasets.map num_proc; None: one)."})

    def validate(self) -> None:
        super().validate()
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1 (or None: no truncation).")
        if not self.step_separator:
            raise ValueError("step_separator='' is empty: the label of a step sits on the separator's last token, so "
                             "it needs at least one token (TRL's default is '\\n').")


# --------------------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------------------


def prm_loss(logits: jax.Array, labels: jax.Array, *, num_labelled: jax.Array | float | None = None,
             return_counts: bool = False) -> tuple[jax.Array, dict]:
    """Token-classification cross-entropy over the labelled tokens (PRM, arXiv:2211.14275):

        L = -(1/N) Σ_{t: label_t != -100} log softmax(logits_t)[label_t]

    `logits` `[batch, seq, num_labels]`, `labels` `[batch, seq]` (-100: not a step end, ignored). `num_labelled`:
    the N to normalise by (default: this batch's labelled tokens), so micro-batches of one step add up.
    Metrics: `accuracy` (argmax == label over the labelled tokens), as means or `(sum, count)` pairs with
    `return_counts`."""
    labelled = labels != IGNORE_INDEX
    safe_labels = jnp.where(labelled, labels, 0)
    logps = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    label_logps = jnp.take_along_axis(logps, safe_labels[..., None], axis=-1)[..., 0]
    mask = labelled.astype(jnp.float32)
    count = jnp.sum(mask)
    num_labelled = count if num_labelled is None else num_labelled
    nll_sum = -jnp.sum(label_logps * mask)
    loss = nll_sum / jnp.maximum(num_labelled, 1.0)
    correct = (jnp.argmax(logits, axis=-1) == safe_labels).astype(jnp.float32)
    metrics: MetricPairs = {"accuracy": (jax.lax.stop_gradient(jnp.sum(correct * mask)), count)}
    return loss, metrics if return_counts else mean_metrics(metrics)


def token_logits(model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """`[batch, seq, num_labels]` float32: the classifier's `score` head on every token's final hidden state (what
    `transformers`' `*ForTokenClassification` computes)."""
    hidden = model.model(input_ids, attention_mask=attention_mask)  # [batch, seq, hidden]
    return model.score(hidden).astype(jnp.float32)


def check_token_classifier(model: nnx.Module) -> None:
    """A `ValueError` unless `model` is a two-label classifier (a decoder `model.model` and a `score` head)."""
    num_labels = getattr(model, "num_labels", None)
    if num_labels is None or not hasattr(model, "score"):
        raise ValueError(f"PRM training needs a classifier with two labels, but the model is a "
                         f"{type(model).__name__}: load it with jaxpt.models.from_pretrained(path, num_labels=2).")
    if num_labels != NUM_LABELS:
        raise ValueError(f"The model has num_labels={num_labels}, but a process reward model has two (step wrong / "
                         "right): load it with jaxpt.models.from_pretrained(path, num_labels=2).")


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def tokenize_row(row: dict, tokenizer, *, step_separator: str, max_length: int | None,
                 max_prompt_length: int | None, max_completion_length: int | None, train_on_last_step_only: bool,
                 is_eval: bool) -> dict[str, list[int]]:
    """One `{"prompt", "completions", "labels"}` row -> `{"input_ids", "labels"}`, TRL's `PRMTrainer.tokenize_row`
    layout: BOS (if the tokenizer has one) + prompt, then each step's tokens followed by the separator's; the step's
    label (0/1) on the separator's last token and -100 everywhere else (the prompt included). With
    `train_on_last_step_only` (training only) every step but the last is -100. The prompt keeps its last
    `max_prompt_length` tokens, the completion its first `max_completion_length`, then the whole its first
    `max_length`."""
    prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    separator_ids = tokenizer(step_separator, add_special_tokens=False)["input_ids"]
    step_labels = [int(label) for label in row["labels"]]
    if train_on_last_step_only and not is_eval:
        step_labels = [IGNORE_INDEX] * (len(step_labels) - 1) + step_labels[-1:]
    completion_ids, labels = [], []
    for step, label in zip(row["completions"], step_labels, strict=True):
        step_ids = tokenizer(step, add_special_tokens=False)["input_ids"] + separator_ids
        completion_ids += step_ids
        labels += [IGNORE_INDEX] * (len(step_ids) - 1) + [label]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[-max_prompt_length:]
    if max_completion_length is not None:
        completion_ids, labels = completion_ids[:max_completion_length], labels[:max_completion_length]
    input_ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + labels
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def _tokenize_batch(batch: dict[str, list], *, tokenizer, options: dict) -> dict[str, list]:
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    tokenized = [tokenize_row(row, tokenizer, **options) for row in rows]
    return {"input_ids": [t["input_ids"] for t in tokenized], "labels": [t["labels"] for t in tokenized]}


def check_rows(dataset) -> None:
    """Every row has a string `prompt`, a non-empty list of string `completions` and as many boolean `labels`
    (TRL's stepwise-supervision format); a conversational prompt fails (TRL's PRMTrainer has no chat support)."""
    columns = data.column_names(dataset)
    missing = [c for c in ("prompt", "completions", "labels") if c not in columns]
    if missing:
        raise ValueError(f"PRM needs a stepwise-supervision dataset with columns 'prompt', 'completions' (the steps, "
                         f"a list of strings) and 'labels' (a bool per step); it lacks {missing} (has {columns}).")
    for index, row in enumerate(dataset):
        prompt, steps, labels = row["prompt"], row["completions"], row["labels"]
        if not isinstance(prompt, str):
            raise ValueError(f"Example {index}: prompt is a {type(prompt).__name__}, not a string; PRM supports "
                             "standard (text) rows only: render conversations to text first.")
        if not isinstance(steps, (list, tuple)) or not steps or not all(isinstance(s, str) for s in steps):
            raise ValueError(f"Example {index}: completions={steps!r} must be a non-empty list of strings (the steps).")
        if not isinstance(labels, (list, tuple)) or len(labels) != len(steps) or not all(
                isinstance(x, (bool, np.bool_)) or x in (0, 1) for x in labels):
            raise ValueError(f"Example {index}: labels={labels!r} must hold one bool per step ({len(steps)} steps).")


def prepare_dataset(dataset, tokenizer, config: PRMConfig, *, is_eval: bool = False) -> list[dict]:
    """Tokenize a stepwise-supervision dataset (`tokenize_row`): examples `{"input_ids", "labels"}` (int32 numpy
    arrays). Bad data fails here, before anything compiles; rows left with no labelled token (their steps cut
    away by the length limits) are kept (they weigh nothing) and counted in a warning."""
    check_rows(dataset)
    options = {"step_separator": config.step_separator, "max_length": config.max_length,
               "max_prompt_length": config.max_prompt_length, "max_completion_length": config.max_completion_length,
               "train_on_last_step_only": config.train_on_last_step_only, "is_eval": is_eval}
    tokenized = data.map_columns(dataset, _tokenize_batch, columns=("prompt", "completions", "labels"),
                                 fn_kwargs={"tokenizer": tokenizer, "options": options},
                                 num_proc=config.dataset_num_proc, desc="Tokenizing the PRM dataset")
    examples = [{"input_ids": np.asarray(ids, np.int32), "labels": np.asarray(labels, np.int32)}
                for ids, labels in zip(tokenized["input_ids"].rows(), tokenized["labels"].rows(), strict=True)]
    unlabelled = sum(not np.any(e["labels"] != IGNORE_INDEX) for e in examples)
    if unlabelled == len(examples):
        raise ValueError(f"No example keeps a labelled step after truncation (max_length={config.max_length}, "
                         f"max_prompt_length={config.max_prompt_length}, max_completion_length="
                         f"{config.max_completion_length}): raise the limits.")
    if unlabelled:
        logger.warning("%d of %d PRM examples keep no labelled step after truncation; they do not train.",
                       unlabelled, len(examples))
    return examples


def collate(examples: Sequence[dict], *, accumulation_steps: int, buckets: Sequence[int],
            pad_token_id: int = 0) -> dict[str, np.ndarray]:
    """A step's examples -> `input_ids`, `attention_mask`, `labels` `[accumulation_steps, micro_batch, length]`,
    right-padded (labels with -100) to the smallest length bucket that fits."""
    length = data.bucket_length(max(len(e["input_ids"]) for e in examples), buckets)
    micro = len(examples) // accumulation_steps
    batch = {"input_ids": data.pad_rows([e["input_ids"] for e in examples], length, pad_token_id),
             "attention_mask": data.pad_rows([np.ones(len(e["input_ids"]), np.int32) for e in examples], length, 0),
             "labels": data.pad_rows([e["labels"] for e in examples], length, IGNORE_INDEX)}
    return {k: v.reshape(accumulation_steps, micro, length) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, num_labelled: jax.Array):
    """Loss of one micro-batch normalised by the whole step's labelled tokens, and its `(sum, count)` metrics."""
    model = nnx.merge(graphdef, params)
    logits = token_logits(model, batch["input_ids"], batch["attention_mask"])
    return prm_loss(logits, batch["labels"], num_labelled=num_labelled, return_counts=True)


def make_train_step(config: PRMConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None):
    """`state, metrics = step(state, batch)`: one optimizer step over `[accumulation, micro_batch, seq]` arrays
    (`collate`), micro-batches scanned inside; jitted with explicit shardings and the state donated."""

    def step(state: TrainState, batch: dict):
        num_labelled = jnp.sum((batch["labels"] != IGNORE_INDEX).astype(jnp.float32))
        grad_fn = lora.value_and_grad(loss_fn, state, seed=config.seed)  # under LoRA: adapters, with dropout

        def micro_step(grads, inputs):
            micro_batch, micro_index = inputs
            (loss, pairs), micro_grads = grad_fn(state.params, state.graphdef, micro_batch, num_labelled,
                                                 micro_index=micro_index)
            return jax.tree.map(jnp.add, grads, micro_grads), (loss, pairs)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro_indices = jnp.arange(batch["input_ids"].shape[0])
        grads, (losses, pairs) = jax.lax.scan(micro_step, zeros, (batch, micro_indices))
        metrics = mean_metrics(total_metrics(pairs))
        metrics["loss"] = jnp.sum(losses)
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.apply_gradients(grads), metrics

    return jit_step(step, mesh=mesh, state_sharding=state_sharding)


def make_eval_step(config: PRMConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None):
    """`pairs = eval_step(state, batch)`: `loss` and `accuracy` as `(sum, count)` pairs over labelled tokens, so
    batches add up to the whole eval set's means."""

    def eval_step(state: TrainState, batch: dict):
        def micro_step(_, micro_batch):
            logits = token_logits(state.model(), micro_batch["input_ids"], micro_batch["attention_mask"])
            loss, pairs = prm_loss(logits, micro_batch["labels"], num_labelled=1.0, return_counts=True)
            pairs["loss"] = (loss, pairs["accuracy"][1])  # with N = 1 the loss is the sum of the token NLLs
            return None, pairs

        _, pairs = jax.lax.scan(micro_step, None, batch)
        return total_metrics(pairs)

    return jit_step(eval_step, mesh=mesh, state_sharding=state_sharding, train=False)


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------


def train(model: nnx.Module, tokenizer, dataset, config: PRMConfig, *, eval_dataset=None) -> loop.TrainResult:
    """Train the process reward model `model` (a two-label classifier, scored per token) on `dataset`
    (`prompt`, `completions`, `labels`): progress bar, `metrics.jsonl` (`loss`, `accuracy`), evaluation
    (`eval_loss`, `eval_accuracy` over every labelled step), orbax checkpoints every `save_steps`, exact resume, and
    the model exported as a token classifier in Hugging Face format."""
    config.validate()
    loop.prepare_output_dir(config)
    check_token_classifier(model)
    mesh = mesh_from_config(config)
    examples_per_step = config.per_device_train_batch_size * batch_divisor(mesh) * config.gradient_accumulation_steps
    examples = prepare_dataset(dataset, tokenizer, config)
    eval_examples = None
    if eval_dataset is not None and config.eval_strategy != "no":
        eval_examples = prepare_dataset(eval_dataset, tokenizer, config, is_eval=True)
    distributed.check_same_data(examples, what="PRM examples")
    steps_in_epoch = data.steps_per_epoch(len(examples), examples_per_step, method="PRM")
    total_steps = data.total_steps(config, steps_in_epoch)
    buckets = data.length_buckets(max(len(e["input_ids"]) for e in examples + (eval_examples or [])))
    pad_id = data.pad_token_id(tokenizer)
    data.check_model_fits(model, examples + (eval_examples or []), ("input_ids",), method="PRM",
                          length_fields="max_length", extra_ids=(pad_id,))

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding)
    eval_step = make_eval_step(config, mesh=mesh, state_sharding=state_sharding)
    checkpoints = loop.checkpointer(config, method="prm", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints)
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="prm", start_step=start_step, config=config.to_dict())
    note_shape = loop.ShapeNotes()
    order = data.step_indices(len(examples), examples_per_step, seed=config.seed, shuffle=True, start_step=start_step)
    try:
        for step in range(start_step, total_steps):
            _, indices = next(order)
            batch = collate([examples[i] for i in indices], accumulation_steps=config.gradient_accumulation_steps,
                            buckets=buckets, pad_token_id=pad_id)
            num_tokens += int(batch["attention_mask"].sum())
            note_shape(batch)
            state, metrics = train_step(state, shard_batch(batch, mesh, batch_axis=1, global_batch=True))
            done = step + 1
            log.log(done, {**metrics, "learning_rate": schedule(step), "num_tokens": num_tokens},
                    epoch=done / steps_in_epoch)
            if eval_examples and loop.should_evaluate(config, done, steps_in_epoch):
                log.write({"step": done, **evaluate(eval_step, state, eval_examples, config, mesh, buckets, pad_id)})
            if config.save_steps and done % config.save_steps == 0:
                log.sync()
                checkpoints.save(done, state, {"num_tokens": num_tokens})
        log.flush(total_steps, epoch=total_steps / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    model_dir = loop.export(state, tokenizer, config)
    if model_dir is not None:
        mark_token_classifier(model_dir, pad_token_id=pad_id)
    return loop.TrainResult(state, log.history, model_dir)


def mark_token_classifier(model_dir: str | Path, *, pad_token_id: int | None = None) -> None:
    """Make an exported classifier's config.json say what the weights are: `*ForTokenClassification` (same
    `model.*` and `score` weights as the sequence classifier) whose head has no bias, so
    `transformers.AutoModelForTokenClassification` loads it with jaxpt's per-token logits. Process 0 only."""
    if jax.process_index() != 0:
        return
    path = Path(model_dir) / "config.json"
    hf_config = json.loads(path.read_text())
    hf_config["architectures"] = [name.replace("ForSequenceClassification", "ForTokenClassification")
                                  for name in hf_config.get("architectures", [])]
    hf_config["token_classification_bias"] = False
    if pad_token_id is not None:
        hf_config["pad_token_id"] = pad_token_id
    path.write_text(json.dumps(hf_config, indent=2) + "\n")


def evaluate(eval_step, state, examples, config, mesh, buckets, pad_token_id) -> dict:
    """`eval_loss` and `eval_accuracy` over every labelled step of the eval set (padding rows label nothing)."""
    batch_size = config.per_device_eval_batch_size * batch_divisor(mesh)
    totals = None
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        padding = {"input_ids": np.zeros(1, np.int32), "labels": np.full(1, IGNORE_INDEX, np.int32)}
        chunk += [padding] * (batch_size - len(chunk))
        batch = collate(chunk, accumulation_steps=1, buckets=buckets, pad_token_id=pad_token_id)
        totals = add_metrics(totals, jax.device_get(eval_step(state, shard_batch(batch, mesh, batch_axis=1,
                                                                                   global_batch=True))))
    return {f"eval_{key}": float(value) for key, value in mean_metrics(totals).items()}
