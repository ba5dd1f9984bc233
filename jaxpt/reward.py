"""Reward modelling: `RewardConfig`, data preparation, `make_train_step`, `train`.

A sequence classifier with one output (`jaxpt.models.from_pretrained(path, num_labels=1)`) scores the chosen and
the rejected sequence of each preference pair; the loss is `jaxpt.losses.reward` (Bradley–Terry, optional margin
and reward centering), a mean over all pairs of the accumulated batch, so `batch 8 x accumulation 1` and
`batch 2 x accumulation 4` take the same step.

```python
config = RewardConfig(output_dir="out", max_steps=100)
model = jaxpt.models.from_pretrained("path/to/hf_dir", num_labels=1)
result = jaxpt.reward.train(model, tokenizer, dataset, config)       # batteries included

step = jaxpt.reward.make_train_step(config)                          # or your own loop
state, metrics = step(state, batch)    # batch: collate(...) arrays shaped [accumulation, micro_batch, 2, seq]
```

Data handling follows TRL 1.16's `RewardTrainer`: preference data with an explicit prompt (`prompt`, `chosen`,
`rejected`: the prompt is prepended to both) or an implicit one (`chosen`, `rejected`: each is the whole text),
standard or conversational (rendered whole by the chat template). Standard texts get the EOS token appended if
missing. An optional `margin` column enters the loss. Pairs whose chosen or rejected sequence is longer than
`max_length` tokens are dropped, not truncated (TRL filters them too), and the number dropped is logged.

The reward of a sequence is the classifier's score at its last real token (by the attention mask). TRL gets the
same position from `transformers`, which looks for the last token that is not the pad token: the two agree
unless the pad token is the EOS token, in which case `transformers` skips a trailing EOS. `train` warns then;
give the tokenizer a pad token of its own.
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
from jaxpt.losses.reward import reward_loss
from jaxpt.models import set_gradient_checkpointing
from jaxpt.sharding import agreed_max, batch_divisor, mesh_from_config, shard_batch
from jaxpt.train_state import TrainState, jit_step, make_optimizer

logger = logging.getLogger("jaxpt")


@dataclass
class RewardConfig(TrainingConfig):
    """TRL's `RewardConfig` fields that have a meaning here (same names and defaults). TRL's `pad_to_multiple_of`
    is replaced by length buckets (`jaxpt.data.length_buckets`), and `disable_dropout` has nothing to disable
    (jaxpt models have no dropout)."""

    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (TRL's reward default)."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes that tokenize the dataset "
                                                                         "(datasets.map num_proc; None: one)."})
    eos_token: str | None = field(default=None, metadata={"help": "Appended to standard (non-chat) chosen and "
                                                                  "rejected texts if missing (default: the "
                                                                  "tokenizer's)."})
    max_length: int | None = field(default=1024, metadata={"help": "Pairs whose chosen or rejected sequence is "
                                                                    "longer than this many tokens are dropped (None: "
                                                                    "keep all)."})
    center_rewards_coefficient: float | None = field(default=None, metadata={
        "help": "Weight of the mean squared summed reward that pulls rewards to mean zero (Eisenstein et al. 2023, "
                "arXiv:2312.09244, Eq. 2); 0.01 is a good value; None disables it."})

    def validate(self) -> None:
        super().validate()
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length={self.max_length} must be >= 1 (or None: no length filter).")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient={self.center_rewards_coefficient} must be >= 0 (or None).")


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def prepare_dataset(dataset, tokenizer, config: RewardConfig, *, drop_too_long: bool = True) -> list[dict]:
    """Tokenize a TRL-format preference dataset into pairs `{"chosen_ids", "rejected_ids"[, "margin"]}` (int32
    numpy arrays and a float32 margin), dropping pairs longer than `max_length` (unless `drop_too_long=False`:
    one pair per row). Bad data fails here, before anything compiles."""
    fmt = data.require_format(dataset, ("preference", "implicit_preference"), method="Reward")
    data.check_chat_template(tokenizer, fmt, method="Reward")
    data.check_rows(dataset, fmt, method="Reward", tokenizer=tokenizer, number_columns=("margin",))
    if config.eos_token is not None and config.eos_token not in tokenizer.get_vocab():
        raise ValueError(f"eos_token={config.eos_token!r} is not in the tokenizer's vocabulary: pass a token it has.")
    eos_token = config.eos_token or tokenizer.eos_token
    has_margin = "margin" in dataset.column_names
    max_length = config.max_length

    columns = [c for c in (*data.text_columns(fmt), "tools", "chat_template_kwargs", "margin")
               if c in data.column_names(dataset)]
    tokenized = data.map_columns(dataset, tokenize_pairs_batch, columns=columns, num_proc=config.dataset_num_proc,
                                 desc="Tokenizing the reward dataset",
                                 fn_kwargs={"tokenizer": tokenizer, "explicit_prompt": fmt.kind == "preference",
                                            "conversational": fmt.conversational, "eos_token": eos_token})
    margins = tokenized.get("margin")
    examples, too_long = [], 0
    for index, (chosen_ids, rejected_ids) in enumerate(zip(tokenized["chosen_ids"].rows(),
                                                           tokenized["rejected_ids"].rows(), strict=True)):
        data.check_nonempty(chosen_ids, what="chosen sequence", index=index)
        data.check_nonempty(rejected_ids, what="rejected sequence", index=index)
        if drop_too_long and max_length is not None and max(len(chosen_ids), len(rejected_ids)) > max_length:
            too_long += 1
            continue
        example = {"chosen_ids": np.asarray(chosen_ids, np.int32), "rejected_ids": np.asarray(rejected_ids, np.int32)}
        if has_margin:
            example["margin"] = np.float32(margins[index])
        examples.append(example)

    if too_long:
        logger.warning("Dropped %d of %d preference pairs longer than max_length=%d tokens (as TRL does).",
                       too_long, len(dataset), max_length)
    if not examples:
        raise ValueError(f"Every one of the {len(dataset)} preference pairs is longer than max_length={max_length} "
                         "tokens, so none is left: raise max_length (or set it to None).")
    return examples


def tokenize_pairs_batch(batch: dict[str, list], *, tokenizer, explicit_prompt: bool, conversational: bool,
                         eos_token: str | None) -> dict[str, list]:
    """A batch of rows (`datasets.Dataset.map(batched=True)`) -> `chosen_ids`, `rejected_ids` of the whole
    sequences (prompt + response, EOS appended to standard text if missing; standard text in batched tokenizer
    calls), and the `margin` column passed through when there is one."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    out: dict[str, list] = {}
    for name in ("chosen", "rejected"):
        texts = [row[name] for row in rows]
        if not conversational and eos_token:
            texts = [text if text.endswith(eos_token) else text + eos_token for text in texts]
        if explicit_prompt:  # score prompt + response (TRL tokenizes them together)
            texts = [row["prompt"] + text for row, text in zip(rows, texts, strict=True)]
        out[f"{name}_ids"] = (data.tokenize_texts(tokenizer, texts) if not conversational else
                              [_tokenize(tokenizer, text, row) for row, text in zip(rows, texts, strict=True)])
    if "margin" in batch:
        out["margin"] = list(batch["margin"])
    return out


def _tokenize(tokenizer, text_or_messages, row: dict) -> list[int]:
    """Ids of a whole text, or of whole messages rendered by the chat template with the row's `tools` and
    `chat_template_kwargs` columns if it has them (as TRL does)."""
    if isinstance(text_or_messages, str):
        return data.tokenize(tokenizer, text_or_messages)["input_ids"]
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    out = tokenizer.apply_chat_template(list(text_or_messages), tokenize=True, return_dict=True, tools=tools,
                                        **(row.get("chat_template_kwargs") or {}))
    return list(out["input_ids"])


def collate(examples: Sequence[dict], *, accumulation_steps: int, buckets: Sequence[int],
            pad_token_id: int = 0, longest: int | None = None) -> dict[str, np.ndarray]:
    """A step's pairs -> `input_ids`, `attention_mask` `[accumulation_steps, micro_batch, 2, length]` (index 0
    of the pair axis: chosen, 1: rejected), right-padded to the smallest length bucket that fits the longest
    sequence, and `margin` `[accumulation_steps, micro_batch]` if the pairs have one. Keeping each pair in one
    row of the batch axis keeps it on one device when the batch is sharded. `longest`: the longest sequence of
    the whole global batch, when `examples` hold only some of its rows (several processes agree on it)."""
    longest = max(longest or 0, *map(_longest, examples))
    length = data.bucket_length(longest, buckets)
    sequences = [ids for e in examples for ids in (e["chosen_ids"], e["rejected_ids"])]  # chosen, rejected, ...
    micro = len(examples) // accumulation_steps
    batch = {
        "input_ids": data.pad_rows(sequences, length, pad_token_id),
        "attention_mask": data.pad_rows([np.ones(len(ids), np.int32) for ids in sequences], length, 0),
    }
    batch = {k: v.reshape(accumulation_steps, micro, 2, length) for k, v in batch.items()}
    if "margin" in examples[0]:
        batch["margin"] = np.asarray([e["margin"] for e in examples], np.float32).reshape(accumulation_steps, micro)
    return batch


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def check_reward_model(model: nnx.Module) -> None:
    """A `ValueError` unless `model` is a sequence classifier with one output (one scalar reward per sequence)."""
    num_labels = getattr(model, "num_labels", None)
    if num_labels is None:
        raise ValueError(f"Reward modelling needs a sequence classifier with one output, but the model is a "
                         f"{type(model).__name__} (a causal language model): load it with "
                         "jaxpt.models.from_pretrained(path, num_labels=1).")
    if num_labels != 1:
        raise ValueError(f"The model has num_labels={num_labels}, but a reward model outputs one scalar per "
                         "sequence: load it with jaxpt.models.from_pretrained(path, num_labels=1).")


def pair_rewards(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Rewards `[micro_batch]` of the chosen and of the rejected sequences of one micro-batch (`[micro_batch, 2,
    seq]` arrays), from one forward pass over both."""
    micro, _, length = batch["input_ids"].shape
    scores = model(batch["input_ids"].reshape(2 * micro, length),
                   attention_mask=batch["attention_mask"].reshape(2 * micro, length))  # [2 * micro, 1]
    scores = scores[:, 0].reshape(micro, 2)
    return scores[:, 0], scores[:, 1]


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: RewardConfig, num_pairs: int):
    """Loss of one micro-batch, weighted by its share of the step's `num_pairs` so that micro-batch losses sum to
    the mean over all pairs; the metrics are the micro-batch's own."""
    model = nnx.merge(graphdef, params)
    check_reward_model(model)
    chosen, rejected = pair_rewards(model, batch)
    loss, metrics = reward_loss(chosen, rejected, margin=batch.get("margin"),
                                center_rewards_coefficient=config.center_rewards_coefficient)
    return loss * (chosen.shape[0] / num_pairs), metrics


def _combine(metrics: dict) -> dict:
    """Per-micro-batch metrics `[accumulation]` -> the step's (all micro-batches hold the same number of pairs,
    so means of means are means over the step)."""
    reduce = {"min_reward": jnp.min, "max_reward": jnp.max}
    return {key: reduce.get(key, jnp.mean)(value) for key, value in metrics.items()}


def make_train_step(config: RewardConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None):
    """`state, metrics = step(state, batch)`: one optimizer step over `[accumulation, micro_batch, 2, seq]` arrays
    (`collate`), micro-batches scanned inside the step. jitted with explicit shardings and the state donated."""

    def step(state: TrainState, batch: dict):
        accumulation, micro = batch["input_ids"].shape[:2]
        # differentiate the trained parameters only (under LoRA the adapters, with their dropout; the frozen base
        # joins them here)
        grad_fn = lora.value_and_grad(loss_fn, state, seed=config.seed)

        def micro_step(grads, inputs):
            micro_batch, micro_index = inputs
            (loss, metrics), micro_grads = grad_fn(state.params, state.graphdef, micro_batch, config,
                                                   accumulation * micro, micro_index=micro_index)
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            return grads, (loss, metrics)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, (losses, metrics) = jax.lax.scan(micro_step, zeros, (batch, jnp.arange(accumulation)))
        metrics = _combine(metrics)
        metrics["loss"] = jnp.sum(losses)
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.apply_gradients(grads), metrics

    return jit_step(step, mesh=mesh, state_sharding=state_sharding)


def make_eval_step(config: RewardConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None):
    """`metrics = eval_step(state, batch)`: loss and metrics of the batch as one big batch (same layout), plus the
    per-pair `chosen_rewards` and `rejected_rewards` `[accumulation * micro_batch]`."""

    def eval_step(state: TrainState, batch: dict):
        def micro_step(_, micro_batch):
            return None, pair_rewards(state.model(), micro_batch)

        _, (chosen, rejected) = jax.lax.scan(micro_step, None, batch)  # [accumulation, micro_batch] each
        chosen, rejected = chosen.reshape(-1), rejected.reshape(-1)
        margin = batch["margin"].reshape(-1) if "margin" in batch else None
        loss, metrics = reward_loss(chosen, rejected, margin=margin,
                                    center_rewards_coefficient=config.center_rewards_coefficient)
        return {"loss": loss, **metrics, "chosen_rewards": chosen, "rejected_rewards": rejected}

    return jit_step(eval_step, mesh=mesh, state_sharding=state_sharding, train=False)


def _longest(example: dict) -> int:
    return max(len(example["chosen_ids"]), len(example["rejected_ids"]))


def _prepare_share(model, dataset, tokenizer, config: RewardConfig, *, examples_per_step: int, micro_batch: int,
                   mesh, pad_id: int) -> tuple[list[dict], distributed.DataShare]:
    """On several processes: `(examples, share)`, this process's pairs only. Which pairs exist (those within
    `max_length`) is known only after tokenizing, so each process first tokenizes a contiguous block of the
    dataset (every row is checked by one process) and the blocks' lengths are gathered; then each tokenizes the
    kept pairs its rows take (`DataShare`). The run's batches are those of one process."""
    data.require_format(dataset, ("preference", "implicit_preference"), method="Reward")
    distributed.check_same_data([{"rows": len(dataset), "columns": data.column_names(dataset)}],
                                what="reward-model datasets")
    kept = _kept_pairs(dataset, tokenizer, config, what="reward dataset")
    steps_in_epoch = data.steps_per_epoch(len(kept), examples_per_step, method="Reward")
    share = distributed.DataShare(len(kept), examples_per_step, micro_batch=micro_batch, mesh=mesh, seed=config.seed,
                                  shuffle=True, start_step=loop.planned_start_step(config),
                                  total_steps=data.total_steps(config, steps_in_epoch))

    def prepare():
        own = prepare_dataset(distributed.select_rows(dataset, kept[share.needed]), tokenizer, config)
        data.check_model_fits(model, own, ("chosen_ids", "rejected_ids"), method="Reward", length_fields="max_length",
                              extra_ids=(pad_id,))
        return own

    return distributed.on_every_process(prepare, what="reward dataset"), share


def _kept_pairs(dataset, tokenizer, config: RewardConfig, *, what: str) -> np.ndarray:
    """On several processes: the dataset rows within `max_length` (the pairs one process keeps), in order. Each
    process tokenizes a contiguous block of the dataset (every row is checked by one process) and the blocks'
    lengths are gathered."""
    block = np.array_split(np.arange(len(dataset)), jax.process_count())[jax.process_index()]
    measured = distributed.on_every_process(
        lambda: [_longest(e) for e in prepare_dataset(distributed.select_rows(dataset, block), tokenizer, config,
                                                      drop_too_long=False)] if len(block) else [],
        what=what)
    lengths = distributed.gather_rows(np.asarray(measured, np.int64))  # every row's, in dataset order
    kept = np.arange(len(lengths)) if config.max_length is None else np.flatnonzero(lengths <= config.max_length)
    if len(kept) < len(lengths):
        logger.warning("Dropped %d of %d preference pairs longer than max_length=%d tokens (as TRL does).",
                       len(lengths) - len(kept), len(lengths), config.max_length)
    if not len(kept):
        raise ValueError(f"Every one of the {len(lengths)} preference pairs is longer than max_length="
                         f"{config.max_length} tokens, so none is left: raise max_length (or set it to None).")
    return kept


def _prepare_eval(model, eval_dataset, tokenizer, config: RewardConfig, *, mesh, pad_id: int):
    """`(examples, share, margins)` of the eval set. On several processes each tokenizes only the kept pairs at its
    rows of the eval batches (`distributed.EvalShare`; which pairs are kept is measured as for training), all agree
    on each batch's padded length, and every pair's margin is gathered (the loss takes them all at once; None
    without a margin column). On one process: everything, and margins None (read from the examples)."""
    batch_size = config.per_device_eval_batch_size * batch_divisor(mesh)
    if not distributed.shares_data():
        examples = prepare_dataset(eval_dataset, tokenizer, config)
        return examples, distributed.EvalShare(len(examples), batch_size, mesh=mesh, whole=True), None
    data.require_format(eval_dataset, ("preference", "implicit_preference"), method="Reward")
    kept = _kept_pairs(eval_dataset, tokenizer, config, what="reward eval dataset")
    share = distributed.EvalShare(len(kept), batch_size, mesh=mesh)

    def prepare():
        own = prepare_dataset(distributed.select_rows(eval_dataset, kept[share.needed]), tokenizer, config)
        data.check_model_fits(model, own, ("chosen_ids", "rejected_ids"), method="Reward", length_fields="max_length",
                              extra_ids=(pad_id,))
        return own

    examples = distributed.on_every_process(prepare, what="reward eval dataset")
    share.agree(examples, _longest)  # every eval batch's padded length, up front
    margins = None
    if "margin" in examples[0]:
        # each process knows the margins of the pairs it prepared; together they cover the set
        margins = np.zeros(len(kept), np.float32)
        margins[distributed.gather_rows(share.needed)] = distributed.gather_rows(
            np.asarray([e["margin"] for e in examples], np.float32))
    return examples, share, margins


def eval_batches(examples, share: distributed.EvalShare, buckets, pad_token_id):
    """`(batch, real)` for each eval batch this process feeds, in order: its rows of the global batch (`share`),
    padded to the batch's agreed length, and how many of the batch's rows are pairs of the set (the others are
    one-token fillers, whose rewards are dropped)."""
    filler = {k: v[:1] if np.ndim(v) else np.float32(0.0) for k, v in examples[0].items()}
    for index in range(share.num_batches):
        rows, longest = share.batch_rows(index, examples, filler)
        real = min(share.batch_size, share.num_examples - index * share.batch_size)
        yield collate(rows, accumulation_steps=1, buckets=buckets, pad_token_id=pad_token_id, longest=longest), real


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------


def train(model: nnx.Module, tokenizer, dataset, config: RewardConfig, *, eval_dataset=None) -> loop.TrainResult:
    """Train the reward model `model` (a one-label classifier) on `dataset` (TRL preference format): progress
    bar, `metrics.jsonl`, evaluation, orbax checkpoints every `save_steps`, exact resume, and the final classifier
    exported in Hugging Face format (`transformers.AutoModelForSequenceClassification` loads it). Pairs are
    shuffled every epoch (seeded), as TRL's Trainer does."""
    config.validate()  # again: fields may have been changed since the config was built
    loop.prepare_output_dir(config)
    check_reward_model(model)
    mesh = mesh_from_config(config)
    micro_batch = config.per_device_train_batch_size * batch_divisor(mesh)
    examples_per_step = micro_batch * config.gradient_accumulation_steps
    pad_id = data.pad_token_id(tokenizer)
    if distributed.shares_data():
        examples, share = _prepare_share(model, dataset, tokenizer, config, examples_per_step=examples_per_step,
                                         micro_batch=micro_batch, mesh=mesh, pad_id=pad_id)
        steps_in_epoch = data.steps_per_epoch(share.num_examples, examples_per_step, method="Reward")
    else:
        examples = prepare_dataset(dataset, tokenizer, config)
        steps_in_epoch = data.steps_per_epoch(len(examples), examples_per_step, method="Reward")
    eval_examples, eval_share, eval_margins = None, None, None
    if eval_dataset is not None and config.eval_strategy != "no":
        eval_examples, eval_share, eval_margins = _prepare_eval(model, eval_dataset, tokenizer, config, mesh=mesh,
                                                                pad_id=pad_id)
    total_steps = data.total_steps(config, steps_in_epoch)
    if not distributed.shares_data():
        share = distributed.DataShare(len(examples), examples_per_step, micro_batch=micro_batch, mesh=mesh,
                                      seed=config.seed, shuffle=True, start_step=0, total_steps=total_steps,
                                      whole=True)
    longest = max(map(_longest, examples + (eval_examples or [])))
    buckets = data.length_buckets(config.max_length or (longest if share.whole else agreed_max(longest)))
    data.check_model_fits(model, (examples if share.whole else []) + (eval_examples if eval_share and
                                                                    eval_share.whole else []),
                          ("chosen_ids", "rejected_ids"), method="Reward", length_fields="max_length",
                          extra_ids=(pad_id,))
    if pad_id == tokenizer.eos_token_id:
        logger.warning("The pad token is the EOS token: jaxpt scores sequences at their trailing EOS, transformers "
                       "(and TRL) at the token before it, so the exported model scores differently there. Give the "
                       "tokenizer a distinct pad token.")

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding)
    eval_step = make_eval_step(config, mesh=mesh, state_sharding=state_sharding)
    checkpoints = loop.checkpointer(config, method="reward", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints)
    loop.check_planned_start(share, start_step)  # the data share was prepared from the planned step
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="reward", start_step=start_step, config=config.to_dict())
    note_shape = loop.ShapeNotes()
    order = data.step_indices(share.num_examples, examples_per_step, seed=config.seed, shuffle=True,
                              start_step=start_step)
    measure = lambda rows, counted: (max(map(_longest, rows)),
                                     sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in counted))
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
            placed = shard_batch(batch, mesh, batch_axis=1, global_batch=True, check_shapes=False)  # length agreed
            state, metrics = train_step(state, placed)
            done = step + 1
            log.log(done, {**metrics, "learning_rate": schedule(step), "num_tokens": num_tokens},
                    epoch=done / steps_in_epoch)
            if eval_share and eval_share.num_examples and loop.should_evaluate(config, done, steps_in_epoch):
                log.write({"step": done, **evaluate(eval_step, state, eval_examples, config, mesh, buckets, pad_id,
                                                    share=eval_share, margins=eval_margins)})
            if config.save_steps and done % config.save_steps == 0:
                log.sync()  # a checkpoint is written only after its losses were checked finite
                checkpoints.save(done, state, {"num_tokens": num_tokens})
        log.flush(total_steps, epoch=total_steps / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    model_dir = loop.export(state, tokenizer, config)
    if model_dir is not None:
        _set_pad_token_id(model_dir, pad_id)
    return loop.TrainResult(state, log.history, model_dir)


def _set_pad_token_id(model_dir: str, pad_token_id: int) -> None:
    """Record the pad token in the exported config.json, as TRL does: `transformers` classifiers pool at the last
    token that is not `pad_token_id` (and refuse batches of several sequences without one)."""
    if jax.process_index() != 0:
        return
    path = Path(model_dir) / "config.json"
    hf_config = json.loads(path.read_text())
    if hf_config.get("pad_token_id") != pad_token_id:
        hf_config["pad_token_id"] = pad_token_id
        path.write_text(json.dumps(hf_config, indent=2) + "\n")


def evaluate(eval_step, state, examples, config, mesh, buckets, pad_token_id, *,
             share: distributed.EvalShare | None = None, margins: np.ndarray | None = None) -> dict:
    """Loss and metrics over the whole eval set as one big batch (TRL's names with an `eval_` prefix): the
    rewards of every pair are gathered and `reward_loss` is applied to all of them at once. `share`, `margins`:
    this process's rows of the eval batches and every pair's margin (`_prepare_eval`; default: every example
    prepared, all rows its own, margins from the examples)."""
    if share is None:
        share = distributed.EvalShare(len(examples), config.per_device_eval_batch_size * batch_divisor(mesh),
                                      mesh=mesh, whole=True)
    chosen, rejected = [], []
    for batch, real in eval_batches(examples, share, buckets, pad_token_id):
        # several processes agreed on every batch's length (`EvalShare.agree`): no shape check per batch
        placed = shard_batch(batch, mesh, batch_axis=1, global_batch=True, check_shapes=share.whole)
        out = jax.device_get(eval_step(state, placed))
        chosen.append(out["chosen_rewards"][:real])  # the fillers' rewards are dropped
        rejected.append(out["rejected_rewards"][:real])
    if margins is None and "margin" in examples[0]:
        margins = np.asarray([e["margin"] for e in examples], np.float32)
    loss, metrics = reward_loss(jnp.asarray(np.concatenate(chosen)), jnp.asarray(np.concatenate(rejected)),
                                margin=margins, center_rewards_coefficient=config.center_rewards_coefficient)
    return {f"eval_{key}": float(value) for key, value in {"loss": loss, **metrics}.items()}
