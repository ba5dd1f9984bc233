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

from jaxpt import data, distributed, loop, lora
from jaxpt.config import TrainingConfig
from jaxpt.logging import MetricsLogger
from jaxpt.losses.logprobs import next_token_targets
from jaxpt.losses.metrics import add_metrics, mean_metrics, total_metrics
from jaxpt.losses.sft import SFT_LOSS_TYPES, sft_loss_from_hidden
from jaxpt.models import set_gradient_checkpointing
from jaxpt.sharding import agreed_max, batch_divisor, mesh_from_config, shard_batch
from jaxpt.train_state import TrainState, jit_step, make_optimizer

logger = logging.getLogger("jaxpt")

PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")


@dataclass
class SFTConfig(TrainingConfig):
    """TRL's `SFTConfig` fields that have a meaning here (same names and defaults)."""

    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate (TRL's SFT default)."})
    dataset_text_field: str = field(default="text", metadata={"help": "Text column of language-modeling data."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes that tokenize the dataset "
                                                                         "(datasets.map num_proc; None: one)."})
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
        if self.eval_packing and not self.max_length:
            raise ValueError("eval_packing=True needs max_length (the packed row length); set max_length.")
        if self.dataset_num_proc is not None and self.dataset_num_proc < 1:
            raise ValueError(f"dataset_num_proc={self.dataset_num_proc} must be >= 1 (or None: tokenize in this "
                             "process).")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be >= 2.")


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def prepare_dataset(dataset, tokenizer, config: SFTConfig, *, packing: bool | None = None, tokens_only: bool = False):
    """Tokenize a TRL-format SFT dataset into examples `{"input_ids", "loss_mask"[, "segment_ids"]}` (int32
    numpy arrays; `loss_mask` marks the tokens the model learns to predict), truncated and optionally packed
    (in dataset order, as TRL). `packing` None: the config's (`packing` or `padding_free`). Bad data fails here,
    before anything compiles. `tokens_only`: return `(input_ids, loss_mask)` before packing (a `data.Ragged` of
    the truncated examples, and the flat mask, None for every token).

    A `datasets.Dataset` is tokenized with `Dataset.map(batched=True, num_proc=config.dataset_num_proc)` (cached
    for file-backed datasets); truncation and packing then work on the flat token arrays of the Arrow columns."""
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
    max_length = config.max_length
    if packing is None:
        packing = config.packing or config.padding_free
    # bfd_split and wrapped packing keep every token of a long example (in several pieces); otherwise, as TRL,
    # sequences are cut to max_length.
    truncate = max_length is not None and not (packing and config.packing_strategy != "bfd")

    columns = data.text_columns(fmt, text_field=config.dataset_text_field)
    tokenized = data.map_columns(
        dataset, tokenize_batch, columns=columns, num_proc=config.dataset_num_proc, desc="Tokenizing the SFT dataset",
        fn_kwargs={"tokenizer": tokenizer, "columns": columns, "conversational": fmt.conversational,
                   "eos_token": config.eos_token or tokenizer.eos_token,
                   "assistant_only_loss": config.assistant_only_loss})
    input_ids = tokenized["input_ids"]
    lengths = input_ids.lengths
    long = truncate and bool((lengths > max_length).any())
    position = None  # of each token within its example, computed only when a mask or a cut needs it
    if completion_only or long:
        position = np.arange(len(input_ids.values)) - np.repeat(input_ids.starts, lengths)
    loss_mask = None  # None: every token (full loss), without a flat array of ones
    if completion_only:
        loss_mask = (position >= np.repeat(tokenized["prompt_length"], lengths)).astype(np.int32)
    if config.assistant_only_loss:
        assistant = tokenized["assistant_masks"].values.astype(np.int32)
        loss_mask = assistant if loss_mask is None else loss_mask & assistant
    _check_examples(input_ids, loss_mask, tokenized.get("prompt_length"), max_length=max_length, truncate=truncate,
                    completion_only=completion_only, assistant_only=config.assistant_only_loss)
    if long:
        kept = position < max_length
        input_ids = data.Ragged(input_ids.values[kept], np.minimum(lengths, max_length))
        loss_mask = None if loss_mask is None else loss_mask[kept]
    if loss_mask is None:
        trainable = bool((input_ids.lengths > 1).any())
    else:  # the first token of an example is never a target
        trainable = bool(loss_mask[np.repeat(input_ids.starts, input_ids.lengths) < np.arange(len(loss_mask))].any())
    if not trainable:
        raise ValueError(f"None of the {len(lengths)} SFT examples has a token to train on (each is one token, or "
                         "its loss mask is empty): check the dataset's text columns and completion_only_loss / "
                         "assistant_only_loss.")
    if tokens_only:
        return input_ids, loss_mask
    if packing:
        return pack_ragged(input_ids, loss_mask, max_length, strategy=config.packing_strategy)
    if loss_mask is None:
        loss_mask = np.ones(len(input_ids.values), np.int32)
    masks = data.Ragged(loss_mask, input_ids.lengths).rows()
    return [{"input_ids": ids, "loss_mask": mask} for ids, mask in zip(input_ids.rows(), masks, strict=True)]


def tokenize_batch(batch: dict[str, list], *, tokenizer, columns: Sequence[str], conversational: bool,
                   eos_token: str | None, assistant_only_loss: bool) -> dict[str, list]:
    """One batch of SFT rows -> `input_ids` (and `prompt_length` for prompt-completion data, `assistant_masks` with
    `assistant_only_loss`), as TRL tokenizes them: standard texts and completions get `eos_token` if missing and
    are tokenized as a batch; conversations go through the chat template one by one."""
    if len(columns) == 1 and not conversational:  # language modeling, standard: one batched tokenizer call
        texts = [text if not eos_token or text.endswith(eos_token) else text + eos_token for text in batch[columns[0]]]
        return {"input_ids": data.tokenize_texts(tokenizer, texts)}
    if len(columns) == 1:  # language modeling, conversational
        outs = [data.tokenize(tokenizer, messages, assistant_mask=assistant_only_loss)
                for messages in batch[columns[0]]]
        return {name: [out[name] for out in outs] for name in outs[0]}
    prompts, completions = batch["prompt"], batch["completion"]
    if conversational:
        out: dict[str, list] = {"input_ids": [], "prompt_length": []}
        for prompt, completion in zip(prompts, completions, strict=True):
            ids, prompt_length = data.tokenize_prompt_completion(tokenizer, prompt, completion, conversational=True)
            out["input_ids"].append(ids)
            out["prompt_length"].append(prompt_length)
            if assistant_only_loss:
                messages = list(prompt) + list(completion)
                out.setdefault("assistant_masks", []).append(
                    data.tokenize(tokenizer, messages, assistant_mask=True)["assistant_masks"])
        return out
    completions = [c if not eos_token or c.endswith(eos_token) else c + eos_token for c in completions]
    prompt_ids = data.tokenize_texts(tokenizer, prompts)
    full_ids = data.tokenize_texts(tokenizer, [p + c for p, c in zip(prompts, completions, strict=True)])
    return {"input_ids": full_ids,
            "prompt_length": [data.common_prefix_length(p, f) for p, f in zip(prompt_ids, full_ids, strict=True)]}


def _check_examples(input_ids: data.Ragged, loss_mask: np.ndarray | None, prompt_length, *, max_length: int | None,
                    truncate: bool, completion_only: bool, assistant_only: bool) -> None:
    """The per-example checks, on the flat arrays (`loss_mask` None: every token): the first bad example (in
    dataset order, and per example in the order the checks read) fails with its index named."""
    lengths = input_ids.lengths
    problems = []  # (example index, check order, message)

    def first(bad: np.ndarray, order: int, message) -> None:
        if bad.any():
            index = int(np.argmax(bad))
            problems.append((index, order, message(index)))

    if truncate and completion_only and prompt_length is not None:
        first(prompt_length >= max_length, 0, lambda i: (
            f"Example {i}: the prompt is {int(prompt_length[i])} tokens, not shorter than max_length={max_length}, "
            "so no completion token would be trained on: raise max_length or shorten/filter long prompts."))
    first(lengths == 0, 1, lambda i: data.empty_tokens_message(what="example", index=i))
    if loss_mask is not None and (assistant_only or truncate):
        ends = np.cumsum(lengths)
        starts = ends - lengths
        mask_sums = np.concatenate([[0], np.cumsum(loss_mask, dtype=np.int64)])
        if assistant_only:
            first(mask_sums[ends] == mask_sums[starts], 2, lambda i: (
                f"Example {i} has no assistant tokens: with assistant_only_loss=True the chat template must mark "
                "assistant turns with {% generation %} ... {% endgeneration %}."))
        if truncate:
            kept_sums = mask_sums[starts + np.minimum(lengths, max_length)] - mask_sums[starts]
            first((lengths > max_length) & (kept_sums == 0), 3, lambda i: (
                f"Example {i}: truncated to max_length={max_length}, it keeps no assistant token to train on: "
                "raise max_length or shorten/filter long conversations."))
    if problems:
        raise ValueError(min(problems)[2])


def pack_examples(examples: Sequence[dict], seq_length: int, *, strategy: str = "bfd") -> list[dict]:
    """Rows of exactly `seq_length` tokens holding several examples, each with its own segment id (1, 2, ...;
    0 = padding): attention and positions restart per segment, so packing changes no example's loss."""
    input_ids = data.ragged_from_lists([e["input_ids"] for e in examples])
    loss_mask = data.ragged_from_lists([e["loss_mask"] for e in examples]).values
    return pack_ragged(input_ids, loss_mask, seq_length, strategy=strategy)


def pack_ragged(input_ids: data.Ragged, loss_mask: np.ndarray | None, seq_length: int, *,
                strategy: str = "bfd") -> list[dict]:
    """`pack_examples` on flat arrays (`loss_mask` runs alongside `input_ids.values`; None: every token), with
    numpy gathers only: `bfd` truncates each example to `seq_length`, `bfd_split` cuts long ones into
    `seq_length` pieces packed like examples (TRL's strategies, bins as TRL's `pack_dataset`), `wrapped` fills
    rows in order and cuts only at row ends (a segment never spans two rows)."""
    lengths = input_ids.lengths
    starts = input_ids.starts
    total = int(lengths.sum())
    if strategy == "wrapped":
        num_rows = -(-total // seq_length)
        token = np.arange(total)
        new_segment = token % seq_length == 0
        new_segment[starts[lengths > 0]] = True
        segments = np.cumsum(new_segment)
        segments -= segments[token - token % seq_length] - 1
        tokens_in_row = np.minimum(seq_length, total - np.arange(num_rows) * seq_length)
        source = None  # the tokens stay in order
    else:
        if strategy == "bfd":
            piece_starts, piece_lengths = starts, np.minimum(lengths, seq_length)
        else:  # bfd_split: pieces of seq_length, the last piece of an example shorter
            pieces_per_example = -(-lengths // seq_length)
            example = np.repeat(np.arange(len(lengths)), pieces_per_example)
            rank = np.arange(len(example)) - np.repeat(np.cumsum(pieces_per_example) - pieces_per_example,
                                                       pieces_per_example)
            piece_starts = starts[example] + rank * seq_length
            piece_lengths = np.minimum(lengths[example] - rank * seq_length, seq_length)
        members, sizes = data.bfd_bins(piece_lengths, seq_length)
        num_rows = len(sizes)
        # The packed tokens, row after row, are the placed pieces' tokens one after the other: one arange plus a
        # repeated offset per piece finds where each comes from.
        member_lengths = piece_lengths[members]
        out_starts = np.cumsum(member_lengths) - member_lengths
        source = np.arange(int(member_lengths.sum())) + np.repeat(piece_starts[members] - out_starts,
                                                                   member_lengths)
        member_rank = np.arange(len(members)) - np.repeat(np.cumsum(sizes) - sizes, sizes)  # within its row
        segments = np.repeat((member_rank + 1).astype(np.int32), member_lengths)
        tokens_in_row = np.add.reduceat(member_lengths, np.cumsum(sizes) - sizes) if num_rows else sizes
    filled = np.arange(seq_length) < tokens_in_row[:, None]  # tokens first, padding last in every row
    rows = {name: np.zeros((num_rows, seq_length), np.int32) for name in ("input_ids", "loss_mask", "segment_ids")}
    rows["input_ids"][filled] = input_ids.values if source is None else input_ids.values[source]
    if loss_mask is None:
        rows["loss_mask"][filled] = 1
    else:
        rows["loss_mask"][filled] = loss_mask if source is None else loss_mask[source]
    rows["segment_ids"][filled] = segments
    return [{name: rows[name][i] for name in rows} for i in range(num_rows)]


def collate(examples: Sequence[dict], *, accumulation_steps: int, buckets: Sequence[int],
            pad_token_id: int = 0, longest: int | None = None) -> dict[str, np.ndarray]:
    """A step's examples -> arrays `[accumulation_steps, micro_batch, length]`, right-padded to the smallest
    length bucket that fits the longest example (packed examples already have their fixed length). `longest`:
    the longest example of the whole global batch, when `examples` hold only some of its rows (several processes
    agree on it, `DataShare.agree_steps`)."""
    packed = "segment_ids" in examples[0]
    longest = max(longest or 0, *(len(e["input_ids"]) for e in examples))
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
        # differentiate the trained parameters only (under LoRA the adapters, with their dropout; the frozen base
        # joins them here)
        grad_fn = lora.value_and_grad(loss_fn, state, seed=config.seed)

        def micro_step(grads, inputs):
            micro_batch, micro_index = inputs
            (loss, metric_pairs), micro_grads = grad_fn(state.params, state.graphdef, micro_batch, config,
                                                        num_tokens, micro_index=micro_index)
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            return grads, (loss, metric_pairs)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro_indices = jnp.arange(jax.tree.leaves(batch)[0].shape[0])
        grads, (losses, metric_pairs) = jax.lax.scan(micro_step, zeros, (batch, micro_indices))
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
    pad_id = data.pad_token_id(tokenizer)
    share = None
    if distributed.shares_data():
        # Each process tokenizes only the examples of the rows it feeds (`DataShare`; packed: `_packed_share`).
        data.require_format(dataset, ("language_modeling", "prompt_completion"), method="SFT",
                            text_field=config.dataset_text_field)
        distributed.check_same_data([{"rows": len(dataset), "columns": data.column_names(dataset)}],
                                    what="SFT datasets")
        share_args = dict(micro_batch=micro_batch, mesh=mesh, seed=config.seed, shuffle=config.shuffle_dataset,
                          start_step=loop.planned_start_step(config))  # a resumed run: the steps still to run
        if config.packing or config.padding_free:
            examples, share = _packed_share(dataset, tokenizer, config, examples_per_step, share_args)
            steps_in_epoch = data.steps_per_epoch(share.num_examples, examples_per_step, method="SFT")
            total_steps = data.total_steps(config, steps_in_epoch)
        else:  # unpacked examples are the dataset's rows, one to one
            steps_in_epoch = data.steps_per_epoch(len(dataset), examples_per_step, method="SFT")
            total_steps = data.total_steps(config, steps_in_epoch)
            share = distributed.DataShare(len(dataset), examples_per_step, total_steps=total_steps, **share_args)
            examples = distributed.on_every_process(lambda: prepare_dataset(share.select(dataset), tokenizer, config),
                                                    what="SFT dataset")
        distributed.on_every_process(data.check_model_fits, model, examples, ("input_ids",), method="SFT",
                                     length_fields="max_length", extra_ids=(pad_id,), what="SFT dataset")
    else:
        examples = prepare_dataset(dataset, tokenizer, config)
    eval_examples, eval_share = None, None
    if eval_dataset is not None and config.eval_strategy != "no":
        # Unless eval_packing says otherwise, the eval set is prepared as the training set (padding_free packs).
        eval_packing = config.eval_packing if config.eval_packing is not None else config.packing or config.padding_free
        eval_examples, eval_share = _prepare_eval(model, tokenizer, eval_dataset, config, mesh, pad_id,
                                                  packing=eval_packing)
    if share is None:
        distributed.check_same_data(examples, what="SFT examples")  # every process builds the same global batches
        steps_in_epoch = data.steps_per_epoch(len(examples), examples_per_step, method="SFT")
        total_steps = data.total_steps(config, steps_in_epoch)
        share = distributed.DataShare(len(examples), examples_per_step, micro_batch=micro_batch, mesh=mesh,
                                      seed=config.seed, shuffle=config.shuffle_dataset, start_step=0,
                                      total_steps=total_steps, whole=True)
    longest = max((len(e["input_ids"]) for e in examples), default=1)
    buckets = data.length_buckets(config.max_length or (longest if share.whole else agreed_max(longest)))
    data.check_model_fits(model, (examples if share.whole else []) + (eval_examples if eval_share and
                                                                    eval_share.whole else []), ("input_ids",),
                          method="SFT", length_fields="max_length", extra_ids=(pad_id,))

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding)
    eval_step = make_eval_step(config, mesh=mesh, state_sharding=state_sharding, return_counts=True)
    checkpoints = loop.checkpointer(config, method="sft", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints)
    loop.check_planned_start(share, start_step)  # the data share was prepared from the planned step
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="sft", start_step=start_step, config=config.to_dict())
    note_shape = loop.ShapeNotes()
    order = data.step_indices(share.num_examples, examples_per_step, seed=config.seed, shuffle=config.shuffle_dataset,
                              start_step=start_step)
    measure = lambda rows, counted: (max(len(e["input_ids"]) for e in rows), sum(map(_num_tokens, counted)))
    share.agree_steps(examples, measure, start_step=start_step, total_steps=total_steps)  # padded lengths, tokens
    try:
        for step in range(start_step, total_steps):
            _, indices = next(order)
            rows, counted = share.step_examples(indices, examples)  # several processes: only this one's rows
            longest, tokens = share.step_totals(step, rows, counted, measure)
            batch = collate(rows, accumulation_steps=config.gradient_accumulation_steps, buckets=buckets,
                            pad_token_id=pad_id, longest=longest)
            num_tokens += tokens
            note_shape(batch)
            state, metrics = train_step(state, shard_batch(batch, mesh, batch_axis=1, global_batch=True,
                                                           check_shapes=False))  # agreed on the length above
            done = step + 1
            log.log(done, {**metrics, "learning_rate": schedule(step), "num_tokens": num_tokens},
                    epoch=done / steps_in_epoch)
            if eval_share and eval_share.num_examples and loop.should_evaluate(config, done, steps_in_epoch):
                log.write({"step": done, **evaluate(eval_step, state, eval_examples, config, mesh, buckets, pad_id,
                                                    share=eval_share)})
            if config.save_steps and done % config.save_steps == 0:
                log.sync()  # a checkpoint is written only after its losses were checked finite
                checkpoints.save(done, state, {"num_tokens": num_tokens})
        log.flush(total_steps, epoch=total_steps / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))


def _packed_share(dataset, tokenizer, config: SFTConfig, examples_per_step: int, share_args: dict):
    """On several processes with packing: `(rows, share)`, the packed rows this process feeds, the very rows one
    process packs (best-fit over every example's length, as TRL). The bins need every length, so each process
    first tokenizes a contiguous block of the dataset (every example is checked by one process) and the lengths
    are gathered; every process then forms the bins alike, from the lengths alone (packing each example's index
    in place of its tokens tells which examples each row holds), and tokenizes only the examples of its rows.

    Each process holds one int32 per token of the whole dataset while it packs (the row layout), and tokenizes
    about 1/N (its block) plus its rows' examples from the other blocks."""

    def make_share(num_rows: int) -> distributed.DataShare:
        steps = data.steps_per_epoch(num_rows, examples_per_step, method="SFT")
        return distributed.DataShare(num_rows, examples_per_step, total_steps=data.total_steps(config, steps),
                                     **share_args)

    return _pack_share(dataset, tokenizer, config, make_share, what="SFT dataset")


def _pack_share(dataset, tokenizer, config: SFTConfig, make_share, *, what: str):
    """`(rows, share)`: the packed rows `share.needed` of `dataset` (`make_share(number of packed rows)`), exactly
    as one process packs them, tokenizing only a block of the dataset (to measure it) and the examples of those
    rows (`_packed_share`)."""
    count, index = jax.process_count(), jax.process_index()
    block = np.array_split(np.arange(len(dataset)), count)[index]
    measured = distributed.on_every_process(
        lambda: prepare_dataset(distributed.select_rows(dataset, block), tokenizer, config, packing=True,
                                tokens_only=True)[0].lengths if len(block) else np.zeros(0, np.int64),
        what=what)
    lengths = distributed.gather_rows(measured)  # every example's, after truncation, in dataset order
    owner = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)  # each token: its example's index
    layout = pack_ragged(data.Ragged(owner, lengths), None, config.max_length, strategy=config.packing_strategy)
    share = make_share(len(layout))
    needed_rows = [layout[i] for i in share.needed]
    needed = np.unique(np.concatenate([row["input_ids"][row["segment_ids"] > 0] for row in needed_rows]))
    input_ids, loss_mask = distributed.on_every_process(
        lambda: prepare_dataset(distributed.select_rows(dataset, needed), tokenizer, config, packing=True,
                                tokens_only=True),
        what=what)
    # The whole dataset's token layout with only the needed examples' tokens filled in, packed as one process
    # packs it: the rows this process feeds are exact, the others (never used) hold zeros.
    starts = np.cumsum(lengths) - lengths
    where = np.repeat(starts[needed] - input_ids.starts, input_ids.lengths) + np.arange(len(input_ids.values))
    values = np.zeros(len(owner), np.int32)
    values[where] = input_ids.values
    mask = np.zeros(len(owner), np.int32)
    mask[where] = 1 if loss_mask is None else loss_mask
    rows = pack_ragged(data.Ragged(values, lengths), mask, config.max_length, strategy=config.packing_strategy)
    return [rows[i] for i in share.needed], share


def _num_tokens(example: dict) -> int:
    """The tokens an example puts in a batch (its attention mask's ones)."""
    if "segment_ids" in example:
        return int(np.count_nonzero(example["segment_ids"]))
    return len(example["input_ids"])


def _prepare_eval(model, tokenizer, eval_dataset, config: SFTConfig, mesh, pad_id: int, *, packing: bool):
    """`(examples, share)` of the eval set: on several processes each prepares only the examples of its rows of the
    eval batches (`distributed.EvalShare`) and all agree on each batch's padded length; packed, its packed rows
    (`_pack_share`: the rows one process packs), all `max_length` long. A single process prepares everything."""
    batch_size = config.per_device_eval_batch_size * batch_divisor(mesh)
    if not distributed.shares_data():
        examples = prepare_dataset(eval_dataset, tokenizer, config, packing=packing)
        return examples, distributed.EvalShare(len(examples), batch_size, mesh=mesh, whole=True)
    if packing:
        examples, share = _pack_share(eval_dataset, tokenizer, config,
                                      lambda num_rows: distributed.EvalShare(num_rows, batch_size, mesh=mesh),
                                      what="SFT eval dataset")
        distributed.on_every_process(data.check_model_fits, model, examples, ("input_ids",), method="SFT",
                                     length_fields="max_length", extra_ids=(pad_id,), what="SFT eval dataset")
        share.lengths = np.full(share.num_batches, config.max_length)  # every packed row's length: nothing to agree
        return examples, share
    data.require_format(eval_dataset, ("language_modeling", "prompt_completion"), method="SFT",
                        text_field=config.dataset_text_field)
    share = distributed.EvalShare(len(eval_dataset), batch_size, mesh=mesh)

    def prepare_share():
        own = prepare_dataset(share.select(eval_dataset), tokenizer, config, packing=False)
        data.check_model_fits(model, own, ("input_ids",), method="SFT", length_fields="max_length",
                              extra_ids=(pad_id,))
        return own

    examples = distributed.on_every_process(prepare_share, what="SFT eval dataset")
    share.agree(examples, lambda example: len(example["input_ids"]))  # every batch's padded length, up front
    return examples, share


def eval_batches(examples, share: distributed.EvalShare, buckets, pad_token_id):
    """The eval batches (`collate`d, `[1, batch, length]`) this process feeds, in order: its rows of each global
    batch (`share`), padded to the batch's agreed length; rows past the end of the set have no loss."""
    filler = {k: np.zeros_like(v[:1]) for k, v in examples[0].items()}  # no loss token: counts in no metric
    for index in range(share.num_batches):
        rows, longest = share.batch_rows(index, examples, filler)
        yield collate(rows, accumulation_steps=1, buckets=buckets, pad_token_id=pad_token_id, longest=longest)


def evaluate(eval_step, state, examples, config, mesh, buckets, pad_token_id, *,
             share: distributed.EvalShare | None = None) -> dict:
    """Loss and metrics over the whole eval set (TRL's names with an `eval_` prefix), token-weighted: `eval_step`
    returns `(sum, count)` pairs (`make_eval_step(return_counts=True)`). `share`: this process's rows of the eval
    batches (`_prepare_eval`; default: every example prepared, all rows its own)."""
    if share is None:
        share = distributed.EvalShare(len(examples), config.per_device_eval_batch_size * batch_divisor(mesh),
                                      mesh=mesh, whole=True)
    totals = None
    for batch in eval_batches(examples, share, buckets, pad_token_id):
        # several processes agreed on every batch's length (`EvalShare.agree`): no shape check per batch
        placed = shard_batch(batch, mesh, batch_axis=1, global_batch=True, check_shapes=share.whole)
        totals = add_metrics(totals, jax.device_get(eval_step(state, placed)))
    return {f"eval_{key}": float(value) for key, value in mean_metrics(totals).items()}
