"""TPO, Triple Preference Optimization (Saeidi et al. 2024, arXiv:2405.16681): `TPOConfig`, `tpo_loss`, data
preparation, `make_train_step`, `train`. Experimental: no stability promise (see `jaxpt.experimental`).

TPO learns from triples: besides the chosen and the rejected completion, a gold `reference` completion (not a
reference *model*: TPO has none). One loss contrasts chosen against rejected with the policy's own log-probabilities
and adds `tpo_alpha` x the NLL of the gold completion. TRL 1.16 has it as `trl.experimental.tpo.TPOTrainer`; names,
defaults, tokenization and metrics follow it.

```python
config = TPOConfig(output_dir="out", max_steps=100)     # rows: prompt, chosen, rejected, reference
result = jaxpt.experimental.tpo.train(model, tokenizer, dataset, config)

step = jaxpt.experimental.tpo.make_train_step(config)
state, metrics = step(state, batch)        # batch: collate(...) arrays [accumulation, micro_batch, 3, seq]
```

Batch layout: each triple is one `[3, seq]` block (rows: prompt + chosen, prompt + rejected, prompt + reference;
only the first two when `tpo_alpha=0`, as TRL skips the gold completion then) with `input_ids`, `attention_mask` and
`completion_mask`, shaped `[accumulation, micro_batch, rows, seq]` and sharded over `micro_batch`. The step
normalises over the whole accumulated batch (the preference term by its triples, the NLL by the gold completion
tokens), so `batch 8 x accumulation 1 == batch 2 x accumulation 4`.
"""

from __future__ import annotations

import json
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
from jaxpt.losses.logprobs import chunked_token_logps_and_stats, masked_sum, next_token_targets
from jaxpt.losses.metrics import MetricPairs, add_metrics, mean_metrics, sum_and_count, total_metrics
from jaxpt.models import set_gradient_checkpointing
from jaxpt.sharding import batch_divisor, mesh_from_config, shard_batch
from jaxpt.train_state import TrainState, jit_step, make_optimizer

logger = logging.getLogger("jaxpt")

TPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "tpo-l")
LENGTH_NORMALISED_LOSS_TYPES = ("ipo", "tpo-l")  # TRL averages their log-probs over the completion tokens
TRUNCATION_MODES = ("keep_start", "keep_end")


@dataclass
class TPOConfig(TrainingConfig):
    """TRL 1.16's `TPOConfig` fields that have a meaning here (same names and defaults)."""

    learning_rate: float = field(default=5e-7, metadata={"help": "Peak learning rate (TRL's TPO default)."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes that tokenize the dataset "
                                                                         "(datasets.map num_proc; None: one)."})
    max_length: int | None = field(default=1024, metadata={"help": "Truncate prompt + completion to this many "
                                                                    "tokens (None: no truncation)."})
    truncation_mode: str = field(default="keep_start", metadata={"help": f"One of {TRUNCATION_MODES}."})
    loss_type: str = field(default="sigmoid", metadata={"help": f"One of {TPO_LOSS_TYPES}."})
    beta: float = field(default=0.01, metadata={"help": "β: the preference term's temperature (IPO: the "
                                                        "regularisation τ)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "ε in [0, 0.5): the probability that a preference "
                                                                  "label is flipped (sigmoid and tpo-l only)."})
    tpo_alpha: float = field(default=1.0, metadata={"help": "Weight of the NLL of the gold `reference` completion "
                                                            "(0: no NLL term, and the gold completion is not run)."})
    tpo_l_gamma: float = field(default=0.5, metadata={"help": "γ: TPO-L's target reward margin (loss_type='tpo-l' "
                                                              "only)."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk when computing log-probs "
                                                                   "from hidden states (memory vs speed)."})

    def validate(self) -> None:
        super().validate()
        if self.loss_type not in TPO_LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is not a TPO loss; use one of {TPO_LOSS_TYPES}.")
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be > 0.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5).")
        if self.label_smoothing > 0 and self.loss_type in ("hinge", "ipo"):
            raise ValueError(f"label_smoothing={self.label_smoothing} has no meaning for loss_type="
                             f"{self.loss_type!r}: set label_smoothing=0.0 or use 'sigmoid' / 'tpo-l'.")
        if self.tpo_alpha < 0:
            raise ValueError(f"tpo_alpha={self.tpo_alpha} must be >= 0.")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode={self.truncation_mode!r}; use one of {TRUNCATION_MODES}.")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be >= 2.")
        if self.logits_chunk_size < 1:
            raise ValueError(f"logits_chunk_size={self.logits_chunk_size} must be >= 1.")


def sides(config: TPOConfig) -> tuple[str, ...]:
    """The rows of each triple in the batch: the gold completion only when its NLL counts."""
    return ("chosen", "rejected", "reference") if config.tpo_alpha != 0.0 else ("chosen", "rejected")


# --------------------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------------------


def tpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    reference_token_logps: jax.Array | None = None,
    reference_token_mask: jax.Array | None = None,
    *,
    beta: float = 0.01,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    tpo_alpha: float = 1.0,
    tpo_l_gamma: float = 0.5,
    pair_mask: jax.Array | None = None,
    num_pairs: jax.Array | float | None = None,
    num_tokens: jax.Array | float | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, dict]:
    """TPO's loss (arXiv:2405.16681; TRL 1.16's definitions):

        L = mean_triples ℓ(d) + tpo_alpha · NLL(gold),   d = s(y_w) - s(y_l)

    with `s` the completion's summed token log-probs under the policy (`chosen_logps`, `rejected_logps` `[batch]`),
    averaged over its `*_lengths` tokens for `ipo` and `tpo-l`; β = `beta`, ε = `label_smoothing`, γ = `tpo_l_gamma`:

    | loss type | ℓ(d)                                                   | paper                        |
    |-----------|--------------------------------------------------------|------------------------------|
    | `sigmoid` | -(1-ε) log σ(βd) - ε log σ(-βd)                        | TPO, arXiv:2405.16681        |
    | `hinge`   | max(0, 1 - βd)                                         | SLiC, arXiv:2305.10425       |
    | `ipo`     | (d - 1/(2β))²                                          | IPO, arXiv:2310.12036 eq. 17 |
    | `tpo-l`   | -(1-ε) log σ(βd - γ) - ε log σ(-(βd - γ))              | TPO-L, arXiv:2405.16681      |

    NLL(gold) is the mean negative log-prob of the `reference_token_mask` tokens of `reference_token_logps`
    `[batch, seq]` (the gold completions; None when `tpo_alpha` = 0). `pair_mask` drops padding triples;
    `num_pairs` / `num_tokens` normalise (default: this batch's), so micro-batches of one step add up.

    Metrics (TRL's names): `rewards/chosen` (β s(y_w)), `rewards/rejected`, `rewards/accuracies`, `rewards/margins`,
    `logps/chosen`, `logps/rejected`; means, or `(sum, count)` pairs with `return_counts`.
    """
    if loss_type not in TPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not a TPO loss; use one of {TPO_LOSS_TYPES}.")
    if tpo_alpha != 0.0 and (reference_token_logps is None or reference_token_mask is None):
        raise ValueError(f"tpo_alpha={tpo_alpha} needs reference_token_logps and reference_token_mask (the gold "
                         "completion's NLL term); pass them, or tpo_alpha=0.0.")
    if pair_mask is None:
        pair_mask = jnp.ones(chosen_logps.shape, bool)
    pair_mask = pair_mask.astype(bool)
    chosen_logps, rejected_logps = chosen_logps.astype(jnp.float32), rejected_logps.astype(jnp.float32)
    if loss_type in LENGTH_NORMALISED_LOSS_TYPES:
        chosen_logps = chosen_logps / jnp.maximum(chosen_lengths, 1)
        rejected_logps = rejected_logps / jnp.maximum(rejected_lengths, 1)
    num_pairs = jnp.sum(pair_mask.astype(jnp.float32)) if num_pairs is None else num_pairs

    difference = chosen_logps - rejected_logps
    if loss_type in ("sigmoid", "tpo-l"):
        shifted = beta * difference - (tpo_l_gamma if loss_type == "tpo-l" else 0.0)
        losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(shifted)
                  - label_smoothing * jax.nn.log_sigmoid(-shifted))
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * difference)
    else:  # ipo
        losses = (difference - 1.0 / (2.0 * beta)) ** 2
    loss = masked_sum(losses, pair_mask) / jnp.maximum(num_pairs, 1.0)
    if tpo_alpha != 0.0:
        if num_tokens is None:
            num_tokens = jnp.sum(reference_token_mask.astype(jnp.float32))
        nll_sum = -masked_sum(reference_token_logps.astype(jnp.float32), reference_token_mask)
        loss = loss + tpo_alpha * nll_sum / jnp.maximum(num_tokens, 1.0)

    chosen_rewards = jax.lax.stop_gradient(beta * chosen_logps)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_logps)
    pairs = lambda values: sum_and_count(jax.lax.stop_gradient(values), pair_mask)
    metrics: MetricPairs = {
        "rewards/chosen": pairs(chosen_rewards),
        "rewards/rejected": pairs(rejected_rewards),
        "rewards/accuracies": pairs((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margins": pairs(chosen_rewards - rejected_rewards),
        "logps/chosen": pairs(chosen_logps),
        "logps/rejected": pairs(rejected_logps),
    }
    return loss, metrics if return_counts else mean_metrics(metrics)


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def prepare_dataset(dataset, tokenizer, config: TPOConfig) -> list[dict]:
    """Tokenize a triple-preference dataset (`prompt` or an implicit prompt, `chosen`, `rejected`, `reference`;
    standard or conversational) as TRL's TPOTrainer does: standard completions get the EOS token if missing,
    conversational ones go through the chat template, the prompt ends where its tokens and every prompt + completion
    diverge; prompt + completion is truncated to `max_length` (`truncation_mode`). Examples: `{side}_input_ids` and
    `{side}_completion_mask` (int32, 1 on completion tokens) for each of `sides(config)`. Bad data fails here."""
    fmt = data.require_format(dataset, ("preference", "implicit_preference"), method="TPO")
    if "reference" not in data.column_names(dataset):
        raise ValueError(f"TPO needs a triple-preference dataset with chosen, rejected and reference (the gold "
                         f"completion) columns; the columns are {sorted(data.column_names(dataset))}.")
    data.check_chat_template(tokenizer, fmt, method="TPO")
    data.check_rows(dataset, fmt, method="TPO", tokenizer=tokenizer, columns=(*data.text_columns(fmt), "reference"))
    columns = [c for c in (*data.text_columns(fmt), "reference", "tools") if c in data.column_names(dataset)]
    tokenized = data.map_columns(dataset, tokenize_batch, columns=columns, num_proc=config.dataset_num_proc,
                                 desc="Tokenizing the TPO dataset",
                                 fn_kwargs={"tokenizer": tokenizer, "implicit": fmt.kind == "implicit_preference",
                                            "conversational": fmt.conversational})
    names = sides(config)
    max_length = config.max_length
    examples = []
    for index, (prompt_ids, *completions) in enumerate(zip(
            *(tokenized[name].rows() for name in ("prompt_ids", *(f"{side}_ids" for side in names))), strict=True)):
        if max_length is not None and config.truncation_mode == "keep_start" and len(prompt_ids) >= max_length:
            raise ValueError(f"Example {index}: the prompt is {len(prompt_ids)} tokens, not shorter than "
                             f"max_length={max_length}, so no completion token would be left: raise max_length or "
                             "shorten/filter long prompts.")
        example = {}
        for side, ids in zip(names, completions, strict=True):
            data.check_nonempty(ids, what=f"{side} completion", index=index)
            sequence = np.concatenate([prompt_ids, ids]).astype(np.int32)
            mask = np.repeat(np.asarray([0, 1], np.int32), [len(prompt_ids), len(ids)])
            if max_length is not None and len(sequence) > max_length:
                keep = slice(None, max_length) if config.truncation_mode == "keep_start" else slice(-max_length, None)
                sequence, mask = sequence[keep], mask[keep]
            example[f"{side}_input_ids"], example[f"{side}_completion_mask"] = sequence, mask
        examples.append(example)
    return examples


def extract_triple_prompt(row: dict) -> dict:
    """An implicit-prompt triple -> explicit prompt: the common prefix of chosen and rejected
    (`jaxpt.data.extract_prompt`), cut from the gold `reference` too, which must start with it."""
    extracted = data.extract_prompt(row)
    prompt, reference = extracted["prompt"], row["reference"]
    if reference[:len(prompt)] != prompt:
        raise ValueError(f"The reference completion {reference!r} does not start with the prompt {prompt!r} that "
                         "chosen and rejected share: add an explicit prompt column.")
    return {**extracted, "reference": reference[len(prompt):]}


def tokenize_batch(batch: dict[str, list], *, tokenizer, implicit: bool, conversational: bool) -> dict[str, list]:
    """`prompt_ids`, `chosen_ids`, `rejected_ids`, `reference_ids` of a batch of rows (`datasets.map`)."""
    out: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "reference_ids": []}
    eos = tokenizer.eos_token or ""
    ending = lambda text: text if text.endswith(eos) else text + eos
    for values in zip(*batch.values(), strict=True):
        row = dict(zip(batch, values, strict=True))
        if implicit:
            row = extract_triple_prompt(row)
        tools = row.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        completions = ("chosen", "rejected", "reference")
        if conversational:
            prompt_ids = data.tokenize(tokenizer, row["prompt"], add_generation_prompt=True, tools=tools)["input_ids"]
            full = [data.tokenize(tokenizer, list(row["prompt"]) + list(row[side]), tools=tools)["input_ids"]
                    for side in completions]
        else:
            prompt_ids = data.tokenize(tokenizer, row["prompt"])["input_ids"]
            full = [data.tokenize(tokenizer, row["prompt"] + ending(row[side]))["input_ids"] for side in completions]
        length = min(data.common_prefix_length(prompt_ids, ids) for ids in full)
        out["prompt_ids"].append(list(prompt_ids[:length]))
        for side, ids in zip(completions, full, strict=True):
            out[f"{side}_ids"].append(list(ids[length:]))
    return out


def collate(examples: Sequence[dict], *, accumulation_steps: int, buckets: Sequence[int],
            pad_token_id: int = 0) -> dict[str, np.ndarray]:
    """A step's triples -> `input_ids`, `attention_mask`, `completion_mask` `[accumulation_steps, micro_batch,
    rows, length]` (rows: chosen, rejected and, when the examples hold it, reference), right-padded to the smallest
    length bucket that fits."""
    rows = tuple(side for side in ("chosen", "rejected", "reference") if f"{side}_input_ids" in examples[0])
    return data.collate_pairs(examples, accumulation_steps=accumulation_steps, buckets=buckets,
                              pad_token_id=pad_token_id, sides=rows)


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def _masks(batch: dict) -> tuple[jax.Array, jax.Array]:
    """`(targets, completion_targets)` `[..., rows, seq]`: next-token ids and which of them are completion tokens."""
    shape = batch["input_ids"].shape
    flat = lambda x: x.reshape(-1, shape[-1])
    targets, completion = next_token_targets(flat(batch["input_ids"]),
                                             flat(batch["completion_mask"] * batch["attention_mask"]))
    return targets.reshape(shape), completion.reshape(shape)


def _counts(batch: dict) -> dict[str, jax.Array]:
    """What a whole step's loss is normalised by: its triples (one without completion tokens is padding) and the
    gold completions' tokens (the NLL)."""
    _, completion = _masks(batch)
    gold = completion[..., 2, :] if completion.shape[-2] == 3 else jnp.zeros(())
    return {"pairs": jnp.sum((jnp.sum(completion, axis=(-2, -1)) > 0).astype(jnp.float32)),
            "reference_tokens": jnp.sum(gold.astype(jnp.float32))}


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: TPOConfig, totals: dict):
    """Loss of one micro-batch normalised by the whole step's `totals`, and its metrics as `(sum, count)` pairs."""
    model = nnx.merge(graphdef, params)
    shape = batch["input_ids"].shape
    flat = lambda x: x.reshape(-1, shape[-1])
    targets, completion = _masks(batch)
    hidden = model.hidden_states(flat(batch["input_ids"]), attention_mask=flat(batch["attention_mask"]))
    token_logps, stats = chunked_token_logps_and_stats(
        hidden, model.lm_head_weight(), flat(targets), stats=("entropy", "mean_logits", "is_top1"),
        chunk_size=config.logits_chunk_size, logit_softcap=model.final_logit_softcap)
    token_logps = token_logps.reshape(shape)
    stats = {k: v.reshape(shape) for k, v in stats.items()}
    counts = jnp.sum(completion, -1)  # [micro, rows]
    sequence_logps = jnp.sum(token_logps * completion, -1)
    gold = (token_logps[:, 2], completion[:, 2]) if shape[-2] == 3 else (None, None)
    loss, metrics = tpo_loss(
        sequence_logps[:, 0], sequence_logps[:, 1], counts[:, 0], counts[:, 1], *gold, beta=config.beta,
        loss_type=config.loss_type, label_smoothing=config.label_smoothing, tpo_alpha=config.tpo_alpha,
        tpo_l_gamma=config.tpo_l_gamma, pair_mask=jnp.sum(counts, -1) > 0, num_pairs=totals["pairs"],
        num_tokens=totals["reference_tokens"], return_counts=True)
    metrics["entropy"] = sum_and_count(stats["entropy"], completion)  # TRL: over every row's completion tokens
    metrics["logits/chosen"] = sum_and_count(stats["mean_logits"][:, 0], completion[:, 0])
    metrics["logits/rejected"] = sum_and_count(stats["mean_logits"][:, 1], completion[:, 1])
    metrics["mean_token_accuracy"] = sum_and_count(stats["is_top1"][:, 0], completion[:, 0])
    return loss, metrics


def make_train_step(config: TPOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None):
    """`state, metrics = step(state, batch)`: one optimizer step over `[accumulation, micro_batch, 2, seq]` arrays
    (`collate`), micro-batches scanned inside the step; jitted with explicit shardings and the state donated."""

    def step(state: TrainState, batch: dict):
        totals = _counts(batch)
        grad_fn = lora.value_and_grad(loss_fn, state, seed=config.seed)  # under LoRA: adapters, with dropout

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


def make_eval_step(config: TPOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None,
                   return_counts: bool = False):
    """`metrics = eval_step(state, batch)`: loss and metrics without updating; with `return_counts`, each as a
    `(sum, count)` pair so batches add up (the loss counts once per pair)."""

    def eval_step(state: TrainState, batch: dict):
        totals = _counts(batch)

        def micro_step(_, micro_batch):
            return None, loss_fn(state.full_params(), state.graphdef, micro_batch, config, totals)

        _, (losses, metric_pairs) = jax.lax.scan(micro_step, None, batch)
        metrics = total_metrics(metric_pairs)
        metrics["loss"] = (jnp.sum(losses) * totals["pairs"], totals["pairs"])
        return metrics if return_counts else mean_metrics(metrics)

    return jit_step(eval_step, mesh=mesh, state_sharding=state_sharding, train=False)


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------


def train(model: nnx.Module, tokenizer, dataset, config: TPOConfig, *, eval_dataset=None) -> loop.TrainResult:
    """Train `model` with TPO on preference triples (prompt, chosen, rejected, reference): progress bar,
    `metrics.jsonl` with TRL's metric names, evaluation, orbax checkpoints every `save_steps`, exact resume, and the
    final model exported in Hugging Face format."""
    config.validate()
    loop.prepare_output_dir(config)
    mesh = mesh_from_config(config)
    examples_per_step = config.per_device_train_batch_size * batch_divisor(mesh) * config.gradient_accumulation_steps
    examples = prepare_dataset(dataset, tokenizer, config)
    eval_examples = None
    if eval_dataset is not None and config.eval_strategy != "no":
        eval_examples = prepare_dataset(eval_dataset, tokenizer, config)
    distributed.check_same_data(examples, what="TPO examples")
    steps_in_epoch = data.steps_per_epoch(len(examples), examples_per_step, method="TPO")
    total_steps = data.total_steps(config, steps_in_epoch)
    keys = tuple(f"{side}_input_ids" for side in sides(config))
    buckets = data.length_buckets(max(len(e[key]) for e in examples + (eval_examples or []) for key in keys))
    pad_id = data.pad_token_id(tokenizer)
    data.check_model_fits(model, examples + (eval_examples or []), keys, method="TPO", length_fields="max_length",
                          extra_ids=(pad_id,))

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding)
    eval_step = make_eval_step(config, mesh=mesh, state_sharding=state_sharding, return_counts=True)
    checkpoints = loop.checkpointer(config, method="tpo", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints)
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="tpo", start_step=start_step, config=config.to_dict())
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
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))


def evaluate(eval_step, state, examples, config, mesh, buckets, pad_token_id) -> dict:
    """Loss and metrics over the whole eval set (TRL's names with an `eval_` prefix); padding pairs (no completion
    tokens) count in no metric."""
    batch_size = config.per_device_eval_batch_size * batch_divisor(mesh)
    totals = None
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        padding = {k: np.zeros_like(v[:1]) for k, v in chunk[0].items()}
        chunk += [padding] * (batch_size - len(chunk))
        batch = collate(chunk, accumulation_steps=1, buckets=buckets, pad_token_id=pad_token_id)
        placed = shard_batch(batch, mesh, batch_axis=1, global_batch=True)
        totals = add_metrics(totals, jax.device_get(eval_step(state, placed)))
    return {f"eval_{key}": float(value) for key, value in mean_metrics(totals).items()}
