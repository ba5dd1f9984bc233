"""Supervised fine-tuning: `SFTConfig`, data preparation, `make_train_step`, `train`.

The loss is `jaxpt.losses.sft` (`nll` or `dft`), normalised by the number of loss tokens of the whole
accumulated batch, so `batch 8 x accumulation 1` and `batch 2 x accumulation 4` take the same step.

```python
config = SFTConfig(output_dir="out", max_steps=100)
result = jaxpt.sft.train(model, tokenizer, dataset, config)          # batteries included

step = jaxpt.sft.make_train_step(config)                             # or your own loop
state, metrics = step(state, batch)    # batch: collate(...) arrays shaped [accumulation, micro_batch, seq]
```
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpt import data, loop
from jaxpt.config import TrainingConfig
from jaxpt.logging import MetricsLogger
from jaxpt.losses.logprobs import next_token_targets
from jaxpt.losses.metrics import add_metrics, mean_metrics, total_metrics
from jaxpt.losses.sft import SFT_LOSS_TYPES, sft_loss_from_hidden
from jaxpt.models import set_gradient_checkpointing
from jaxpt.sharding import batch_divisor, mesh_from_config, shard_batch
from jaxpt.train_state import TrainState, jit_step, make_optimizer

logger = logging.getLogger("jaxpt")

PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")


@dataclass
class SFTConfig(TrainingConfig):
    """TRL's `SFTConfig` fields that have a meaning here (same names and defaults)."""

    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate (TRL's SFT default)."})
    dataset_text_field: str = field(default="text", metadata={"help": "Text column of language-modeling data."})
    eos_token: str | None = field(default=None, metadata={"help": "Appended to standard (non-chat) texts and "
                                                                  "completions if missing (default: the tokenizer's)."})
    max_length: int | None = field(default=1024, metadata={"help": "Truncate tokenized sequences to this length "
                                                                    "(keep_start); with packing, the row length."})
    truncation_mode: str = field(default="keep_start", metadata={"help": "Only 'keep_start' (TRL's default)."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle the examples every epoch (seeded)."})
    packing: bool = field(default=False, metadata={"help": "Pack sequences into rows of max_length with "
                                                           "segment ids (padding-free: no cross-attention)."})
    packing_strategy: str = field(default="bfd", metadata={"help": f"One of {PACKING_STRATEGIES}: best-fit "
                                                                   "decreasing (truncates or splits overflow) or "
                                                                   "wrapped."})
    padding_free: bool = field(default=False, metadata={"help": "Same as packing here: jaxpt always packs "
                                                                "padding-free (segment ids)."})
    eval_packing: bool | None = field(default=None, metadata={"help": "Pack the eval set (default: packing)."})
    completion_only_loss: bool | None = field(default=None, metadata={"help": "Loss on completion tokens only "
                                                                              "(default: yes for prompt-completion "
                                                                              "data)."})
    assistant_only_loss: bool = field(default=False, metadata={"help": "Loss on assistant tokens only "
                                                                       "(conversational data; needs a chat template "
                                                                       "with {%% generation %%})."})
    loss_type: str = field(default="nll", metadata={"help": f"One of {SFT_LOSS_TYPES}."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk when computing the loss "
                                                                   "from hidden states (memory vs speed)."})

    def validate(self) -> None:
        super().validate()
        if self.loss_type not in SFT_LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is not an SFT loss; use one of {SFT_LOSS_TYPES}.")
        if self.packing_strategy not in PACKING_STRATEGIES:
            raise ValueError(f"packing_strategy={self.packing_strategy!r}; use one of {PACKING_STRATEGIES}.")
        if self.truncation_mode != "keep_start":
            raise ValueError(f"truncation_mode={self.truncation_mode!r}: only 'keep_start' is supported (TRL "
                             "deprecated 'keep_end' for SFT).")
        if (self.packing or self.padding_free) and not self.max_length:
            raise ValueError("packing needs max_length (the packed row length); set max_length.")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be >= 2.")


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def prepare_dataset(dataset, tokenizer, config: SFTConfig, *, packing: bool | None = None) -> list[dict]:
    """Tokenize a TRL-format SFT dataset into examples `{"input_ids", "loss_mask"[, "segment_ids"]}` (int32
    numpy arrays; `loss_mask` marks the tokens the model learns to predict), truncated and optionally packed
    (in dataset order, as TRL). `packing` None: the config's (`packing` or `padding_free`). Bad data fails here,
    before anything compiles."""
    fmt = data.require_format(dataset, ("language_modeling", "prompt_completion"), method="SFT",
                              text_field=config.dataset_text_field)
    data.check_chat_template(tokenizer, fmt, method="SFT")
    data.check_rows(dataset, fmt, method="SFT", tokenizer=tokenizer, text_field=config.dataset_text_field)
    completion_only = config.completion_only_loss
    if completion_only and fmt.kind != "prompt_completion":
        raise ValueError("completion_only_loss=True needs a prompt-completion dataset (columns prompt, completion); "
                         f"this one is {fmt.kind}.")
    if completion_only is None:
        completion_only = fmt.kind == "prompt_completion"
    if config.assistant_only_loss and not fmt.conversational:
        raise ValueError("assistant_only_loss=True needs conversational data (lists of role/content messages).")
    eos_token = config.eos_token or tokenizer.eos_token
    max_length = config.max_length
    if packing is None:
        packing = config.packing or config.padding_free
    # bfd_split and wrapped packing keep every token of a long example (in several pieces); otherwise, as TRL,
    # sequences are cut to max_length.
    truncate = max_length is not None and not (packing and config.packing_strategy != "bfd")

    examples = []
    for index, row in enumerate(dataset):
        if fmt.kind == "prompt_completion":
            ids, prompt_length = data.tokenize_prompt_completion(tokenizer, row["prompt"], row["completion"],
                                                                 conversational=fmt.conversational,
                                                                 eos_token=eos_token)
            if truncate and completion_only and prompt_length >= max_length:
                raise ValueError(f"Example {index}: the prompt is {prompt_length} tokens, not shorter than "
                                 f"max_length={max_length}, so no completion token would be trained on: raise "
                                 "max_length or shorten/filter long prompts.")
            mask = [0] * prompt_length + [1] * (len(ids) - prompt_length) if completion_only else [1] * len(ids)
            if config.assistant_only_loss:
                messages = list(row["prompt"]) + list(row["completion"])
                assistant = data.tokenize(tokenizer, messages, assistant_mask=True)["assistant_masks"]
                mask = [m & a for m, a in zip(mask, assistant, strict=False)]
        elif fmt.conversational:
            out = data.tokenize(tokenizer, row["messages"], assistant_mask=config.assistant_only_loss)
            ids = out["input_ids"]
            mask = out["assistant_masks"] if config.assistant_only_loss else [1] * len(ids)
        else:
            text = row[config.dataset_text_field]
            if eos_token and not text.endswith(eos_token):
                text = text + eos_token
            ids = data.tokenize(tokenizer, text)["input_ids"]
            mask = [1] * len(ids)
        data.check_nonempty(ids, what="example", index=index)
        if config.assistant_only_loss and not any(mask):
            raise ValueError(f"Example {index} has no assistant tokens: with assistant_only_loss=True the chat "
                             "template must mark assistant turns with {% generation %} ... {% endgeneration %}.")
        if truncate and len(ids) > max_length:
            ids, mask = ids[:max_length], mask[:max_length]
            if not any(mask):  # TRL drops such examples silently; say so instead
                raise ValueError(f"Example {index}: truncated to max_length={max_length}, it keeps no assistant "
                                 "token to train on: raise max_length or shorten/filter long conversations.")
        examples.append({"input_ids": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.int32)})
    if not any(e["loss_mask"][1:].any() for e in examples):  # the first token is never a target
        raise ValueError(f"None of the {len(examples)} SFT examples has a token to train on (each is one token, or "
                         "its loss mask is empty): check the dataset's text columns and completion_only_loss / "
                         "assistant_only_loss.")

    if packing:
        examples = pack_examples(examples, max_length, strategy=config.packing_strategy)
    return examples


def pack_examples(examples: Sequence[dict], seq_length: int, *, strategy: str = "bfd") -> list[dict]:
    """Rows of exactly `seq_length` tokens holding several examples, each with its own segment id (1, 2, ...;
    0 = padding): attention and positions restart per segment, so packing changes no example's loss."""
    pieces = []
    for example in examples:
        if strategy == "bfd":
            pieces.append({k: v[:seq_length] for k, v in example.items()})
        elif strategy == "bfd_split":  # long examples become several pieces, packed like examples
            for start in range(0, len(example["input_ids"]), seq_length):
                pieces.append({k: v[start:start + seq_length] for k, v in example.items()})
        else:  # wrapped: cut only at row ends (below), so a segment never breaks inside a row
            pieces.append(example)
    if strategy == "wrapped":  # fill rows in order, cutting pieces at row ends
        rows, current, used = [], [], 0
        for piece in pieces:
            offset = 0
            while offset < len(piece["input_ids"]):
                take = min(seq_length - used, len(piece["input_ids"]) - offset)
                current.append({k: v[offset:offset + take] for k, v in piece.items()})
                used += take
                offset += take
                if used == seq_length:
                    rows.append(current)
                    current, used = [], 0
        if current:
            rows.append(current)
    else:
        bins = data.pack_bfd([len(p["input_ids"]) for p in pieces], seq_length)
        rows = [[pieces[i] for i in members] for members in bins]
    packed = []
    for row in rows:
        input_ids = np.zeros(seq_length, np.int32)
        loss_mask = np.zeros(seq_length, np.int32)
        segment_ids = np.zeros(seq_length, np.int32)
        start = 0
        for segment, piece in enumerate(row, start=1):
            end = start + len(piece["input_ids"])
            input_ids[start:end] = piece["input_ids"]
            loss_mask[start:end] = piece["loss_mask"]
            segment_ids[start:end] = segment
            start = end
        packed.append({"input_ids": input_ids, "loss_mask": loss_mask, "segment_ids": segment_ids})
    return packed


def collate(examples: Sequence[dict], *, accumulation_steps: int, buckets: Sequence[int],
            pad_token_id: int = 0) -> dict[str, np.ndarray]:
    """A step's examples -> arrays `[accumulation_steps, micro_batch, length]`, right-padded to the smallest
    length bucket that fits the longest example (packed examples already have their fixed length)."""
    packed = "segment_ids" in examples[0]
    longest = max(len(e["input_ids"]) for e in examples)
    length = longest if packed else data.bucket_length(longest, buckets)
    batch = {
        "input_ids": data.pad_rows([e["input_ids"] for e in examples], length, pad_token_id),
        "loss_mask": data.pad_rows([e["loss_mask"] for e in examples], length, 0),
    }
    if packed:
        batch["segment_ids"] = data.pad_rows([e["segment_ids"] for e in examples], length, 0)
        batch["attention_mask"] = (batch["segment_ids"] > 0).astype(np.int32)
    else:
        batch["attention_mask"] = data.pad_rows([np.ones(len(e["input_ids"]), np.int32) for e in examples],
                                                length, 0)
    micro = len(examples) // accumulation_steps
    return {k: v.reshape(accumulation_steps, micro, length) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def _targets(batch: dict) -> tuple[jax.Array, jax.Array]:
    """Next-token targets and their mask for one micro-batch; in packed rows no segment predicts the next one."""
    targets, target_mask = next_token_targets(batch["input_ids"], batch["loss_mask"] * batch["attention_mask"])
    if "segment_ids" in batch:
        segments = batch["segment_ids"]
        same_segment = jnp.pad(segments[:, 1:] == segments[:, :-1], ((0, 0), (0, 1)))
        target_mask = target_mask * same_segment
    return targets, target_mask


def _model_inputs(batch: dict) -> dict:
    if "segment_ids" in batch:
        return {"segment_ids": batch["segment_ids"]}
    return {"attention_mask": batch["attention_mask"]}


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: SFTConfig, num_tokens: jax.Array):
    """Loss of one micro-batch, normalised by the loss tokens of the whole step, and its metrics as `(sum,
    count)` pairs, which add up over micro-batches exactly."""
    model = nnx.merge(graphdef, params)
    targets, target_mask = _targets(batch)
    hidden = model.hidden_states(batch["input_ids"], **_model_inputs(batch))
    return sft_loss_from_hidden(hidden, model.lm_head_weight(), targets, target_mask, loss_type=config.loss_type,
                                num_tokens=num_tokens, logit_softcap=model.final_logit_softcap,
                                chunk_size=config.logits_chunk_size, return_counts=True)


def make_train_step(config: SFTConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None):
    """`state, metrics = step(state, batch)`: one optimizer step over `[accumulation, micro_batch, seq]` arrays
    (`collate`), micro-batches scanned inside the step. jitted with explicit shardings and the state donated."""

    def step(state: TrainState, batch: dict):
        num_tokens = jnp.maximum(jnp.sum(_targets_mask_all(batch)), 1.0)
        # differentiate the trained parameters only (under LoRA the adapters; the frozen base joins them here)
        grad_fn = jax.value_and_grad(lambda params, *args: loss_fn(state.full_params(params), *args), has_aux=True)

        def micro_step(grads, micro_batch):
            (loss, metric_pairs), micro_grads = grad_fn(state.params, state.graphdef, micro_batch, config,
                                                        num_tokens)
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            return grads, (loss, metric_pairs)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, (losses, metric_pairs) = jax.lax.scan(micro_step, zeros, batch)
        metrics = mean_metrics(total_metrics(metric_pairs))
        metrics["loss"] = jnp.sum(losses)
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.apply_gradients(grads), metrics

    return jit_step(step, mesh=mesh, state_sharding=state_sharding)


def _targets_mask_all(batch: dict) -> jax.Array:
    """Target mask of every micro-batch at once (for the step's token count)."""
    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}
    return _targets(flat)[1]


def make_eval_step(config: SFTConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None,
                   return_counts: bool = False):
    """`metrics = eval_step(state, batch)`: loss and metrics without updating (same batch layout); with
    `return_counts`, each as a `(sum, count)` pair over the loss tokens, so batches add up (`evaluate`)."""

    def eval_step(state: TrainState, batch: dict):
        loss_tokens = jnp.sum(_targets_mask_all(batch))
        num_tokens = jnp.maximum(loss_tokens, 1.0)

        def micro_step(_, micro_batch):
            return None, loss_fn(state.full_params(), state.graphdef, micro_batch, config, num_tokens)

        _, (losses, metric_pairs) = jax.lax.scan(micro_step, None, batch)
        metrics = total_metrics(metric_pairs)
        metrics["loss"] = (jnp.sum(losses) * loss_tokens, loss_tokens)  # the mean loss weighs by its tokens
        return metrics if return_counts else mean_metrics(metrics)

    return jit_step(eval_step, mesh=mesh, state_sharding=state_sharding, train=False)


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------


def train(model: nnx.Module, tokenizer, dataset, config: SFTConfig, *, eval_dataset=None) -> loop.TrainResult:
    """Fine-tune `model` on `dataset` (TRL SFT format): progress bar, `metrics.jsonl`, evaluation, orbax
    checkpoints every `save_steps`, exact resume, and the final model exported in Hugging Face format."""
    config.validate()  # again: fields may have been changed since the config was built
    loop.prepare_output_dir(config)
    mesh = mesh_from_config(config)
    micro_batch = config.per_device_train_batch_size * batch_divisor(mesh)
    examples_per_step = micro_batch * config.gradient_accumulation_steps
    examples = prepare_dataset(dataset, tokenizer, config)
    eval_examples = None
    if eval_dataset is not None and config.eval_strategy != "no":
        # Unless eval_packing says otherwise, the eval set is prepared as the training set (padding_free packs).
        eval_packing = config.eval_packing if config.eval_packing is not None else config.packing or config.padding_free
        eval_examples = prepare_dataset(eval_dataset, tokenizer, config, packing=eval_packing)
    steps_in_epoch = data.steps_per_epoch(len(examples), examples_per_step, method="SFT")
    total_steps = data.total_steps(config, steps_in_epoch)
    buckets = data.length_buckets(config.max_length or max(len(e["input_ids"]) for e in examples))
    pad_id = data.pad_token_id(tokenizer)
    data.check_model_fits(model, examples + (eval_examples or []), ("input_ids",), method="SFT",
                          length_fields="max_length", extra_ids=(pad_id,))

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding)
    eval_step = make_eval_step(config, mesh=mesh, state_sharding=state_sharding, return_counts=True)
    checkpoints = loop.checkpointer(config, method="sft", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints)
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="sft", start_step=start_step, config=config.to_dict())
    note_shape = loop.ShapeNotes()
    order = data.step_indices(len(examples), examples_per_step, seed=config.seed, shuffle=config.shuffle_dataset,
                              start_step=start_step)
    try:
        for step in range(start_step, total_steps):
            _, indices = next(order)
            batch = collate([examples[i] for i in indices], accumulation_steps=config.gradient_accumulation_steps,
                            buckets=buckets, pad_token_id=pad_id)
            num_tokens += int(batch["attention_mask"].sum())
            note_shape(batch)
            state, metrics = train_step(state, shard_batch(batch, mesh, batch_axis=1))
            done = step + 1
            log.log(done, {**metrics, "learning_rate": schedule(step), "num_tokens": num_tokens},
                    epoch=done / steps_in_epoch)
            if eval_examples and loop.should_evaluate(config, done, steps_in_epoch):
                log.write({"step": done, **evaluate(eval_step, state, eval_examples, config, mesh, buckets, pad_id)})
            if config.save_steps and done % config.save_steps == 0:
                log.sync()  # a checkpoint is written only after its losses were checked finite
                checkpoints.save(done, state, {"num_tokens": num_tokens})
        log.flush(total_steps, epoch=total_steps / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))


def evaluate(eval_step, state, examples, config, mesh, buckets, pad_token_id) -> dict:
    """Loss and metrics over the whole eval set (TRL's names with an `eval_` prefix), token-weighted: `eval_step`
    returns `(sum, count)` pairs (`make_eval_step(return_counts=True)`)."""
    batch_size = config.per_device_eval_batch_size * batch_divisor(mesh)
    totals = None
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        chunk += [{k: np.zeros_like(v[:1]) for k, v in chunk[0].items()}] * (batch_size - len(chunk))  # no loss
        batch = collate(chunk, accumulation_steps=1, buckets=buckets, pad_token_id=pad_token_id)
        totals = add_metrics(totals, jax.device_get(eval_step(state, shard_batch(batch, mesh, batch_axis=1))))
    return {f"eval_{key}": float(value) for key, value in mean_metrics(totals).items()}
