"""Kahneman-Tversky Optimization: `KTOConfig`, data preparation, `make_train_step`, `train`.

The loss is `jaxpt.losses.kto` (`kto` or `apo_zero_unpaired`) on per-sequence completion log-probs of the policy
and a frozen reference, computed in chunks from the models' final hidden states (never full logits).

```python
config = KTOConfig(output_dir="out", max_steps=100)
result = jaxpt.kto.train(model, tokenizer, dataset, config)          # batteries included (reference = model)

step = jaxpt.kto.make_train_step(config)                             # or your own loop
state, metrics = step(state, batch, ref_params)   # batch: collate(...) arrays [accumulation, micro_batch, ...]
state, metrics = step(state, batch)               # ... or with reference log-probs precomputed in the batch
```

The reference enters the step either as parameters, `ref_params` (an `nnx.State` of `nnx.Param`s, of the
policy's architecture unless `make_train_step(ref_graphdef=...)` says otherwise; never updated, never donated),
or as precomputed log-probs carried by the batch (`ref_logps`, and `ref_kl_logps` for `kto`:
`precompute_ref_log_probs`); then `ref_params` may be None. Precomputed values win when both are given. Under LoRA
the default reference is the base model: the adapters switched off (`jaxpt.lora.without_adapters`), joined with the
state's frozen base inside the step, so no second copy of the weights exists.

The KL reference point. KTO estimates `z0 = max(0, E[log pi(y'|x) - log pi_ref(y'|x)])` from mismatched pairs:
`collate` pairs each prompt of an optimizer step with the completion of the previous example of the same step
(rotating the completions by one: `(x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})`), as TRL does within a batch, so
the mismatched completions are exactly the step's completions. The step computes `z0` once, over all pairs of the
step, before the gradient pass; the loss is normalised by the step's number of examples. Both make accumulation
exact: `batch 8 x accumulation 1` and `batch 2 x accumulation 4` take the same step, and so does any mesh. With
one micro-batch on one device this is TRL's computation; TRL with accumulation estimates `z0` per micro-batch (and
pairs within each device's `per_device_train_batch_size`), so it is exact for one device and one micro-batch only.

Metrics (TRL's names): `loss`, `grad_norm`, `kl` (`z0`), `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
`logps/chosen`, `logps/rejected` (means over the step's desirable / undesirable examples), `logits/chosen`,
`logits/rejected` (mean logit over the completion tokens, averaged over tokens) and `entropy` (mean over all
completion tokens), plus `learning_rate` and `num_tokens` in `metrics.jsonl`. A mean over no examples is NaN in the
step's output; `metrics.jsonl` averages each metric over the steps of the logging window where it is defined (TRL
averages its per-batch values the same way and logs nothing for a batch without desirable examples).
"""

from __future__ import annotations

import logging
import math
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
from jaxpt.lora import check_reference_without_adapters, has_adapters, without_adapters
from jaxpt.losses.kto import KTO_LOSS_TYPES, kto_kl_estimate, kto_loss
from jaxpt.losses.logprobs import chunked_token_logps, chunked_token_logps_and_stats, next_token_targets
from jaxpt.losses.metrics import mean_metrics, total_metrics
from jaxpt.models import set_gradient_checkpointing
from jaxpt.sharding import (
    agreed_max,
    batch_divisor,
    batch_sharding,
    mesh_from_config,
    put_global,
    replicated,
    shard_batch,
    tree_shardings,
)
from jaxpt.train_state import TrainState, jit_step, make_optimizer

logger = logging.getLogger("jaxpt")

SAMPLING_STRATEGIES = ("sequential", "random")
KTO_FORMATS = ("unpaired_preference", "preference", "implicit_preference")  # TRL's KTO dataset formats
UNPAIR_BLOCK = 1000  # TRL unpairs with a batched `datasets.map` (1000 rows a batch): chosen rows, then rejected ones


@dataclass
class KTOConfig(TrainingConfig):
    """TRL's `KTOConfig` fields that have a meaning here (same names and defaults)."""

    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate (TRL's KTO default)."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes that tokenize the dataset "
                                                                         "(datasets.map num_proc; None: one)."})
    max_length: int | None = field(default=1024, metadata={"help": "Truncate prompt + completion (and the "
                                                                    "mismatched KL sequences) to this many tokens, "
                                                                    "keeping the start."})
    loss_type: str = field(default="kto", metadata={"help": f"One of {KTO_LOSS_TYPES}: KTO (Ethayarajh et al. "
                                                            "2024, arXiv:2402.01306) or unpaired APO-zero "
                                                            "(D'Oosterlinck et al. 2024, arXiv:2408.06266)."})
    beta: float = field(default=0.1, metadata={"help": "Deviation from the reference model: higher beta, less "
                                                       "deviation."})
    desirable_weight: float = field(default=1.0, metadata={"help": "Weight of the desirable examples' losses (to "
                                                                   "counter unequal numbers of desirable and "
                                                                   "undesirable examples, paper Eq. 8)."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "Weight of the undesirable examples' losses."})
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "Compute the reference log-probs of the "
                                                                            "whole dataset before training, so the "
                                                                            "reference model is not kept in memory."})
    train_sampling_strategy: str = field(default="sequential", metadata={"help": f"One of {SAMPLING_STRATEGIES}: "
                                                                                 "dataset order (TRL's KTO default) "
                                                                                 "or shuffled every epoch."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk when computing log-probs "
                                                                   "from hidden states (memory vs speed)."})

    def validate(self) -> None:
        super().validate()
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is not a KTO loss; use one of {KTO_LOSS_TYPES}.")
        if self.train_sampling_strategy not in SAMPLING_STRATEGIES:
            raise ValueError(f"train_sampling_strategy={self.train_sampling_strategy!r} is not supported; use one "
                             f"of {SAMPLING_STRATEGIES}.")
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be > 0.")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be >= 2.")
        if self.precompute_ref_log_probs and self.loss_type == "kto" and self.train_sampling_strategy != "sequential":
            raise ValueError("precompute_ref_log_probs=True with loss_type='kto' needs train_sampling_strategy="
                             "'sequential': the reference log-probs of the mismatched KL pairs are computed for the "
                             "fixed steps of a sequential order, and shuffling would pair other completions.")


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def prepare_dataset(dataset, tokenizer, config: KTOConfig) -> list[dict]:
    """Tokenize a TRL-format KTO dataset into examples `{"prompt_ids", "completion_ids"}` (int32 numpy arrays)
    with `"label"` (True: desirable). Unpaired preference data (`prompt`, `completion`, `label`) is used as is;
    paired preference data (`prompt`, `chosen`, `rejected`, or implicit-prompt `chosen`, `rejected`) is unpaired
    as TRL does (each pair gives a desirable and an undesirable example). Standard completions get the EOS token;
    conversational ones the chat template. Bad data fails here, before anything compiles."""
    unpaired, fmt = unpair_dataset(dataset, tokenizer)
    tokenized = data.map_columns(unpaired, tokenize_unpaired_batch, columns=("prompt", "completion", "label"),
                                 num_proc=config.dataset_num_proc, desc="Tokenizing the KTO dataset",
                                 fn_kwargs={"tokenizer": tokenizer, "conversational": fmt.conversational})
    examples = []
    for index, (ids, prompt_length, label) in enumerate(zip(tokenized["input_ids"].rows(),
                                                            tokenized["prompt_length"].tolist(),
                                                            tokenized["label"].tolist(), strict=True)):
        if not isinstance(label, (bool, np.bool_)) and label not in (0, 1):
            raise ValueError(f"Example {index}: label={label!r}; KTO labels are booleans (True: desirable "
                             "completion, False: undesirable).")
        data.check_nonempty(ids, what="prompt + completion", index=index)
        if prompt_length == len(ids):
            raise ValueError(f"Example {index}: the completion tokenized to no tokens, so there is nothing to score.")
        if config.max_length is not None and prompt_length >= config.max_length:
            raise ValueError(f"Example {index}: the prompt is {prompt_length} tokens, not shorter than "
                             f"max_length={config.max_length}, so no completion token would be scored: raise "
                             "max_length or shorten/filter long prompts.")
        examples.append({"prompt_ids": ids[:prompt_length].astype(np.int32),
                         "completion_ids": ids[prompt_length:].astype(np.int32), "label": bool(label)})
    return examples


def unpair_dataset(dataset, tokenizer) -> tuple[Any, data.DatasetFormat]:
    """`(unpaired, format)`: a TRL-format KTO dataset checked (format, chat template, every row) and, if paired
    (`prompt`, `chosen`, `rejected`, or implicit-prompt `chosen`, `rejected`), unpaired in TRL's order
    (`unpair_preference`: per block of 1000 pairs, the chosen completions, then the rejected ones), untokenized: a
    `datasets.Dataset` stays in Arrow (a batched `map`), a list gives a list. Unpaired data is returned as is.
    `format` is the given dataset's."""
    fmt = data.require_format(dataset, KTO_FORMATS, method="KTO")
    data.check_chat_template(tokenizer, fmt, method="KTO")
    data.check_rows(dataset, fmt, method="KTO", tokenizer=tokenizer)
    if fmt.kind == "unpaired_preference":
        return dataset, fmt
    if hasattr(dataset, "map") and hasattr(dataset, "select_columns"):  # a datasets.Dataset: stays in Arrow
        return dataset.map(_unpair_batch, batched=True, batch_size=UNPAIR_BLOCK,
                           remove_columns=list(dataset.column_names), desc="Unpairing the KTO dataset",
                           fn_kwargs={"implicit": fmt.kind == "implicit_preference"}), fmt
    rows = list(dataset)
    if fmt.kind == "implicit_preference":
        rows = [data.extract_prompt(row) for row in rows]
    return unpair_preference(rows), fmt


def tokenize_unpaired_batch(batch: dict[str, list], *, tokenizer, conversational: bool) -> dict[str, list]:
    """A batch of unpaired rows (`datasets.Dataset.map(batched=True)`) -> `input_ids` of prompt + completion,
    `prompt_length` and the `label` passed through; standard completions get the EOS token if missing and are
    tokenized in batched calls, conversations go through the chat template."""
    prompts, completions = batch["prompt"], batch["completion"]
    if conversational:
        pairs = [data.tokenize_prompt_completion(tokenizer, prompt, completion, conversational=True)
                 for prompt, completion in zip(prompts, completions, strict=True)]
        return {"input_ids": [ids for ids, _ in pairs], "prompt_length": [length for _, length in pairs],
                "label": list(batch["label"])}
    eos_token = tokenizer.eos_token
    completions = [c if not eos_token or c.endswith(eos_token) else c + eos_token for c in completions]
    prompt_ids = data.tokenize_texts(tokenizer, prompts)
    full_ids = data.tokenize_texts(tokenizer, [p + c for p, c in zip(prompts, completions, strict=True)])
    return {"input_ids": full_ids, "label": list(batch["label"]),
            "prompt_length": [data.common_prefix_length(p, f) for p, f in zip(prompt_ids, full_ids, strict=True)]}


def _unpair_batch(batch: dict[str, list], *, implicit: bool) -> dict[str, list]:
    """`unpair_preference` of one block of paired rows, as columns (a batched `datasets.map` of `UNPAIR_BLOCK`
    rows, TRL's order)."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    if implicit:
        rows = [data.extract_prompt(row) for row in rows]
    unpaired = unpair_preference(rows)
    return {name: [row[name] for row in unpaired] for name in unpaired[0]} if unpaired else {}


def unpair_preference(rows: Sequence[dict]) -> list[dict]:
    """Paired rows `{prompt, chosen, rejected, ...}` -> unpaired rows `{prompt, completion, label, ...}` in TRL's
    order: per block of 1000 pairs, the chosen completions (label True), then the rejected ones (label False)."""
    out = []
    for start in range(0, len(rows), UNPAIR_BLOCK):
        block = rows[start:start + UNPAIR_BLOCK]
        for key, label in (("chosen", True), ("rejected", False)):
            for row in block:
                extra = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
                out.append({**extra, "completion": row[key], "label": label})
    return out


def collate(examples: Sequence[dict | None], *, accumulation_steps: int, buckets: Sequence[int],
            pad_token_id: int = 0, max_length: int | None = None, with_kl: bool = True,
            longest: int | None = None) -> dict[str, np.ndarray]:
    """A step's examples -> arrays `[accumulation_steps, micro_batch, length]` (`label`, `ref_logps`,
    `ref_kl_logps`: `[accumulation_steps, micro_batch]`), right-padded to the smallest length bucket that fits.

    `input_ids`, `attention_mask`, `completion_mask` hold prompt + completion (truncated to `max_length`, keeping
    the start); with `with_kl`, `kl_input_ids`, `kl_attention_mask`, `kl_completion_mask` hold the mismatched
    pairs: each prompt with the completion of the previous example (the first with the last one's), over all the
    examples of the step. `None` entries are padding rows: no completion tokens, so they count for nothing (and
    take no part in the pairing). Precomputed `ref_logps` / `ref_kl_logps` of the examples are passed along; they
    must have been computed with the same pairing (`precompute_ref_logps` does this). `longest`: the longest
    sequence (of either kind) of the whole global batch, when `examples` hold only some of its rows (several
    processes agree on it, `DataShare.agree_steps`): the batch is padded to its bucket, and the sequences of rows
    another process feeds (never placed here) are cut to it."""
    real = [e for e in examples if e is not None]
    empty = np.zeros(0, np.int32)

    def sequences(partner: bool):
        ids, completion, k = [], [], 0
        for e in examples:
            if e is None:
                ids.append(empty)
                completion.append(empty)
                continue
            answer = real[k - 1]["completion_ids"] if partner else e["completion_ids"]  # k - 1 = -1: the last one
            k += 1
            full = np.concatenate([e["prompt_ids"], answer])[:max_length]
            mask = np.concatenate([np.zeros(len(e["prompt_ids"]), np.int32), np.ones(len(answer), np.int32)])
            ids.append(full)
            completion.append(mask[:max_length])
        return ids, completion

    groups = {"": sequences(partner=False)}
    if with_kl:
        groups["kl_"] = sequences(partner=True)
    if longest is None:
        longest = max(max((len(ids) for ids in group[0]), default=1) for group in groups.values())
    length = data.bucket_length(max(longest, 1), buckets)
    batch = {}
    for prefix, (ids, completion) in groups.items():
        ids, completion = [i[:length] for i in ids], [c[:length] for c in completion]
        batch[f"{prefix}input_ids"] = data.pad_rows(ids, length, pad_token_id)
        batch[f"{prefix}attention_mask"] = data.pad_rows([np.ones(len(i), np.int32) for i in ids], length, 0)
        batch[f"{prefix}completion_mask"] = data.pad_rows(completion, length, 0)
    batch["label"] = np.asarray([bool(e is not None and e["label"]) for e in examples], np.int32)
    for key in ("ref_logps", "ref_kl_logps"):
        if real and key in real[0]:
            batch[key] = np.asarray([0.0 if e is None else e[key] for e in examples], np.float32)
    micro = len(examples) // accumulation_steps
    return {k: v.reshape(accumulation_steps, micro, *v.shape[1:]) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def _sequence_logps(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: KTOConfig, *,
                    prefix: str = "", with_metrics: bool = False):
    """Sum of the completion tokens' log-probs per sequence `[micro_batch]` (and, with `with_metrics`, per-row
    token statistics) for the sequences `batch[prefix + "input_ids"]`."""
    model = nnx.merge(graphdef, params)
    input_ids, attention_mask = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"]
    targets, target_mask = next_token_targets(input_ids, batch[f"{prefix}completion_mask"] * attention_mask)
    hidden = model.hidden_states(input_ids, attention_mask=attention_mask)
    options = dict(chunk_size=config.logits_chunk_size, logit_softcap=model.final_logit_softcap)
    mask = target_mask.astype(jnp.float32)
    if not with_metrics:
        return jnp.sum(chunked_token_logps(hidden, model.lm_head_weight(), targets, **options) * mask, axis=-1)
    # the statistics come from the same data-parallel pass over each chunk's logits
    logps, per_token = chunked_token_logps_and_stats(hidden, model.lm_head_weight(), targets,
                                                     stats=("entropy", "mean_logits"), **options)
    stats = {"tokens": jnp.sum(mask, axis=-1), "entropy": jnp.sum(per_token["entropy"] * mask, axis=-1),
             "mean_logits": jnp.sum(per_token["mean_logits"] * mask, axis=-1)}  # per row [micro_batch]
    return jnp.sum(logps * mask, axis=-1), stats


def _is_example(batch: dict) -> jax.Array:
    """1.0 for rows holding an example, 0.0 for padding rows (no completion tokens) `[..., micro_batch]`."""
    return (jnp.sum(batch["completion_mask"] * batch["attention_mask"], axis=-1) > 0).astype(jnp.float32)


def _reference_pass(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: KTOConfig, ref_params,
                    ref_graphdef) -> dict[str, jax.Array]:
    """Everything the step needs without gradients, per micro-batch `[accumulation, micro_batch]`: the reference
    log-probs (`ref_logps`, and for `kto` `ref_kl_logps`: precomputed in the batch or computed with `ref_params`)
    and the policy's log-probs of the mismatched KL pairs (`kl_logps`)."""
    with_kl = config.loss_type == "kto"
    precomputed = "ref_logps" in batch and (not with_kl or "ref_kl_logps" in batch)
    if not precomputed and ref_params is None:
        raise ValueError("The KTO step needs the reference: pass ref_params (step(state, batch, ref_params)) or "
                         "a batch with precomputed ref_logps" + (" and ref_kl_logps" if with_kl else "") + ".")

    def micro_step(_, micro_batch):
        out = {}
        if not precomputed:
            out["ref_logps"] = _sequence_logps(ref_params, ref_graphdef, micro_batch, config)
        if with_kl:
            out["kl_logps"] = _sequence_logps(params, graphdef, micro_batch, config, prefix="kl_")
            if not precomputed:
                out["ref_kl_logps"] = _sequence_logps(ref_params, ref_graphdef, micro_batch, config, prefix="kl_")
        return None, out

    _, out = jax.lax.scan(micro_step, None, batch)
    if precomputed:
        out["ref_logps"] = batch["ref_logps"]
        if with_kl:
            out["ref_kl_logps"] = batch["ref_kl_logps"]
    return jax.tree.map(jax.lax.stop_gradient, out)


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, ref_logps: jax.Array, kl: jax.Array,
            num_examples: jax.Array, config: KTOConfig):
    """Loss of one micro-batch, normalised by the examples of the whole step, with the step's KL estimate `kl`,
    and its metrics as `(sum, count)` pairs (over desirable / undesirable examples, or completion tokens) that add
    up over micro-batches."""
    policy_logps, stats = _sequence_logps(params, graphdef, batch, config, with_metrics=True)
    is_example = _is_example(batch)
    loss, metrics = kto_loss(policy_logps, ref_logps, batch["label"], kl, beta=config.beta,
                             desirable_weight=config.desirable_weight, undesirable_weight=config.undesirable_weight,
                             loss_type=config.loss_type, num_examples=num_examples, example_mask=is_example,
                             return_counts=True)
    desirable = batch["label"].astype(jnp.float32) * is_example
    undesirable = (1.0 - batch["label"].astype(jnp.float32)) * is_example
    metrics.update({  # per-row sums over completion tokens: the count of each row is its number of tokens
        "logits/chosen": (jnp.sum(stats["mean_logits"] * desirable), jnp.sum(stats["tokens"] * desirable)),
        "logits/rejected": (jnp.sum(stats["mean_logits"] * undesirable), jnp.sum(stats["tokens"] * undesirable)),
        "entropy": (jnp.sum(stats["entropy"]), jnp.sum(stats["tokens"])),
    })
    return loss, metrics


def _step_metrics(metric_pairs: dict, kl: jax.Array) -> dict[str, jax.Array]:
    """TRL's metrics of a whole step from the micro-batches' `(sum, count)` pairs: a mean over no example of a
    kind is NaN (undefined: TRL logs nothing for such a batch)."""
    metrics = mean_metrics(total_metrics(metric_pairs), empty=jnp.nan)
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    metrics["kl"] = kl
    return metrics


def _prepare_step(state: TrainState, batch: dict, ref_params, ref_graphdef, config: KTOConfig):
    """The no-gradient half of a step: reference log-probs, the step's KL estimate and its number of examples."""
    if ref_graphdef is None:  # the policy's architecture: laid out like state.params (under LoRA, + the frozen base)
        ref_graphdef = state.graphdef
        ref_params = None if ref_params is None else state.full_params(ref_params)
    reference = _reference_pass(state.full_params(), state.graphdef, batch, config, ref_params, ref_graphdef)
    is_example = _is_example(batch)  # [accumulation, micro_batch]
    if config.loss_type == "kto":
        kl = kto_kl_estimate(reference["kl_logps"], reference["ref_kl_logps"], example_mask=is_example)
    else:
        kl = jnp.zeros((), jnp.float32)
    return reference["ref_logps"], kl, jnp.maximum(jnp.sum(is_example), 1.0)


def make_train_step(config: KTOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None,
                    ref_graphdef: nnx.GraphDef | None = None, ref_sharding: Any = None):
    """`state, metrics = step(state, batch, ref_params=None)`: one optimizer step over `collate` arrays
    `[accumulation, micro_batch, ...]`, micro-batches scanned inside the step. `ref_params` are the frozen
    reference parameters of graph `ref_graphdef`, or (`ref_graphdef=None`) laid out like `state.params`, joined with
    `state.frozen` in the step (under LoRA: `lora.without_adapters(state.params)` is the base model, no copy of it),
    or None when the batch carries precomputed `ref_logps` / `ref_kl_logps`. jitted with explicit shardings
    (`ref_sharding`: the reference parameters' shardings, default: as placed) and the state donated."""

    def step(state: TrainState, batch: dict, ref_params: nnx.State | None = None):
        ref_logps, kl, num_examples = _prepare_step(state, batch, ref_params, ref_graphdef, config)
        # differentiate the trained parameters only (under LoRA the adapters, with their dropout; the frozen base
        # joins them here)
        grad_fn = lora.value_and_grad(loss_fn, state, seed=config.seed)

        def micro_step(grads, inputs):
            micro_batch, micro_ref_logps, micro_index = inputs
            (loss, metric_pairs), micro_grads = grad_fn(state.params, state.graphdef, micro_batch, micro_ref_logps,
                                                        kl, num_examples, config, micro_index=micro_index)
            return jax.tree.map(jnp.add, grads, micro_grads), (loss, metric_pairs)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro_indices = jnp.arange(ref_logps.shape[0])
        grads, (losses, metric_pairs) = jax.lax.scan(micro_step, zeros, (batch, ref_logps, micro_indices))
        metrics = _step_metrics(metric_pairs, kl)
        metrics["loss"] = jnp.sum(losses)
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.apply_gradients(grads), metrics

    return jit_step(step, mesh=mesh, state_sharding=state_sharding, extra_in_shardings=(ref_sharding,))


def make_eval_step(config: KTOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None,
                   ref_graphdef: nnx.GraphDef | None = None, ref_sharding: Any = None):
    """`metrics = eval_step(state, batch, ref_params=None)`: loss and metrics without updating (same batch
    layout), plus `num_examples` (rows that are not padding)."""

    def eval_step(state: TrainState, batch: dict, ref_params: nnx.State | None = None):
        ref_logps, kl, num_examples = _prepare_step(state, batch, ref_params, ref_graphdef, config)

        def micro_step(_, inputs):
            micro_batch, micro_ref_logps = inputs
            return None, loss_fn(state.full_params(), state.graphdef, micro_batch, micro_ref_logps, kl, num_examples,
                                 config)

        _, (losses, metric_pairs) = jax.lax.scan(micro_step, None, (batch, ref_logps))
        metrics = _step_metrics(metric_pairs, kl)
        metrics["loss"] = jnp.sum(losses)
        metrics["num_examples"] = jnp.sum(_is_example(batch))
        return metrics

    return jit_step(eval_step, mesh=mesh, state_sharding=state_sharding, train=False,
                    extra_in_shardings=(ref_sharding,))


def reference_params(model: nnx.Module, mesh: jax.sharding.Mesh | None = None, *,
                     copy: bool = True) -> tuple[nnx.GraphDef, nnx.State, Any]:
    """`(graphdef, params, shardings)` of a frozen reference: `model`'s parameters laid out on `mesh` by the
    model's partition rules (shardings None without a mesh). With `copy` (needed when `model` is also the policy,
    whose buffers the train step donates) they are a copy."""
    graphdef, params = nnx.split(model, nnx.Param, ...)[:2]
    shardings = None
    if mesh is not None:
        shardings = tree_shardings(params, mesh, tuple(getattr(model, "partition_rules", ())))
    if copy:
        params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(params)
    elif mesh is not None:
        params = put_global(params, shardings)
    return graphdef, params, shardings


def precompute_ref_logps(examples: Sequence[dict], ref_graphdef: nnx.GraphDef, ref_params: nnx.State,
                         config: KTOConfig, *, group_size: int, accumulation_steps: int = 1,
                         buckets: Sequence[int], pad_token_id: int = 0,
                         mesh: jax.sharding.Mesh | None = None, ref_sharding: Any = None) -> list[dict]:
    """The examples with their reference log-probs added (`ref_logps`, and for `kto` `ref_kl_logps`), computed in
    consecutive groups of `group_size` examples: the groups a sequential order makes into steps (or eval batches),
    so the KL pairs are the ones `collate` will build. `shared_ref_logps` with every row this process's own
    (`EvalShare(whole=True)`)."""
    share = distributed.EvalShare(len(examples), group_size, mesh=mesh, whole=True)
    values = shared_ref_logps(examples, share, ref_graphdef, ref_params, config, accumulation_steps=accumulation_steps,
                              buckets=buckets, pad_token_id=pad_token_id, mesh=mesh, ref_sharding=ref_sharding)
    return [{**e, **{k: float(v[i]) for k, v in values.items()}} for i, e in enumerate(examples)]


def shared_ref_logps(examples: Sequence[dict], share: distributed.EvalShare, ref_graphdef: nnx.GraphDef,
                     ref_params: nnx.State, config: KTOConfig, *, accumulation_steps: int = 1,
                     buckets: Sequence[int], pad_token_id: int = 0, mesh: jax.sharding.Mesh | None = None,
                     ref_sharding: Any = None) -> dict[str, np.ndarray]:
    """`ref_logps` (and for `kto` `ref_kl_logps`) of every example of the set `[share.num_examples]`, computed in
    consecutive groups of `share.batch_size` examples (the last one filled with empty rows), the KL pairs formed
    within each group as `collate` forms them. On several processes each feeds its rows of every group and their
    KL partners (`examples`: the ones it prepared, aligned with `share.needed`; `share`: `with_previous`, padded
    to the groups' agreed lengths), so the groups are those of one process; the results are replicated, so every
    process gets all of them. On one process (`precompute_ref_logps`) the share is whole."""
    reference = _reference_fn(ref_graphdef, config, mesh=mesh, ref_sharding=ref_sharding)
    out = {}
    for index in range(share.num_batches):
        rows, longest = share.batch_rows(index, examples, None)
        batch = collate(rows, accumulation_steps=accumulation_steps, buckets=buckets, pad_token_id=pad_token_id,
                        max_length=config.max_length, with_kl=config.loss_type == "kto", longest=longest)
        # the processes agreed on every group's length (`EvalShare.agree_lengths`): no shape check per group
        values = jax.device_get(reference(ref_params, shard_batch(batch, mesh, batch_axis=1, global_batch=True,
                                                                  check_shapes=share.whole)))
        first, count = index * share.batch_size, share.batch_examples(index)
        for key, value in values.items():
            out.setdefault(key, np.zeros(share.num_examples, np.float32))[first:first + count] = \
                np.asarray(value).reshape(-1)[:count]
    return out


def _reference_fn(ref_graphdef: nnx.GraphDef, config: KTOConfig, *, mesh, ref_sharding):
    """`reference(ref_params, batch)` -> `{"ref_logps"[, "ref_kl_logps"]}` `[accumulation, micro_batch]` of a
    `collate`d batch, jitted (on a mesh: replicated results)."""
    with_kl = config.loss_type == "kto"

    def reference(params, batch):
        def micro_step(_, micro_batch):
            out = {"ref_logps": _sequence_logps(params, ref_graphdef, micro_batch, config)}
            if with_kl:
                out["ref_kl_logps"] = _sequence_logps(params, ref_graphdef, micro_batch, config, prefix="kl_")
            return None, out

        return jax.lax.scan(micro_step, None, batch)[1]

    if mesh is None:
        reference = jax.jit(reference)
    else:
        def reference_in_mesh(params, batch, reference=reference):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return reference(params, batch)

        reference = jax.jit(reference_in_mesh, in_shardings=(ref_sharding, batch_sharding(mesh, batch_axis=1)),
                            out_shardings=replicated(mesh))
    return reference


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------

def train(model: nnx.Module, tokenizer, dataset, config: KTOConfig, *, ref_model: nnx.Module | None = None,
          eval_dataset=None) -> loop.TrainResult:
    """Align `model` on `dataset` (TRL KTO format, or paired preference data, unpaired) against `ref_model`
    (default: a frozen copy of `model` as passed in, also when resuming): progress bar, `metrics.jsonl`,
    evaluation, orbax checkpoints every `save_steps`, exact resume, and the final model exported in Hugging Face
    format."""
    config.validate()  # again: fields may have been changed since the config was built
    loop.prepare_output_dir(config)
    mesh = mesh_from_config(config)
    micro_batch = config.per_device_train_batch_size * batch_divisor(mesh)
    examples_per_step = micro_batch * config.gradient_accumulation_steps
    eval_batch = config.per_device_eval_batch_size * batch_divisor(mesh)
    with_kl = config.loss_type == "kto"
    if with_kl and examples_per_step < 2:
        raise ValueError("loss_type='kto' estimates the KL term from mismatched pairs of a step's examples, so a "
                         "step needs at least 2 (per_device_train_batch_size x data-parallel devices x "
                         "gradient_accumulation_steps is 1): raise per_device_train_batch_size.")
    pad_id = data.pad_token_id(tokenizer)
    shuffle = config.train_sampling_strategy == "random"
    share, ref_share, ref_examples = None, None, []
    if distributed.shares_data():
        # Paired data is unpaired first (TRL's order, untokenized: cheap), on every process alike; the examples
        # are then the unpaired rows, one to one. Each process tokenizes only the examples its rows take, and the
        # one before each (its KL partner); for precomputed reference log-probs also its rows of the groups one
        # process computes them in (`ref_share`).
        if data.require_format(dataset, KTO_FORMATS, method="KTO").kind != "unpaired_preference":
            dataset = unpair_dataset(dataset, tokenizer)[0]
        distributed.check_same_data([{"rows": len(dataset), "columns": data.column_names(dataset)}],
                                    what="KTO datasets")
        steps_in_epoch = data.steps_per_epoch(len(dataset), examples_per_step, method="KTO")
        total_steps = data.total_steps(config, steps_in_epoch)
        share = distributed.DataShare(len(dataset), examples_per_step, micro_batch=micro_batch, mesh=mesh,
                                      seed=config.seed, shuffle=shuffle, start_step=loop.planned_start_step(config),
                                      total_steps=total_steps, with_previous=with_kl)
        needed = share.needed
        if config.precompute_ref_log_probs:
            ref_share = distributed.EvalShare(len(dataset), examples_per_step, mesh=mesh, with_previous=with_kl,
                                              micro_batch=micro_batch)
            needed = np.union1d(needed, ref_share.needed)
        prepared = distributed.on_every_process(
            lambda: prepare_dataset(distributed.select_rows(dataset, needed), tokenizer, config), what="KTO dataset")
        examples = [prepared[i] for i in np.searchsorted(needed, share.needed)]
        if ref_share is not None:
            ref_examples = [prepared[i] for i in np.searchsorted(needed, ref_share.needed)]
        labels = dataset["label"] if hasattr(dataset, "column_names") else [row["label"] for row in dataset]
        _check_weights([{"label": bool(label)} for label in labels], config)  # of the whole dataset, untokenized
    else:
        examples = prepare_dataset(dataset, tokenizer, config)
        _check_weights(examples, config)
    eval_examples, eval_share = None, None
    if eval_dataset is not None and config.eval_strategy != "no":
        if distributed.shares_data():
            # Paired data is unpaired first (untokenized). Each process tokenizes only its rows of the eval
            # batches and the one before each (its KL partner); precomputed reference log-probs are computed in
            # these batches too.
            if data.require_format(eval_dataset, KTO_FORMATS, method="KTO").kind != "unpaired_preference":
                eval_dataset = unpair_dataset(eval_dataset, tokenizer)[0]
            eval_share = distributed.EvalShare(len(eval_dataset), eval_batch, mesh=mesh, with_previous=with_kl)
            eval_examples = distributed.on_every_process(
                lambda: prepare_dataset(eval_share.select(eval_dataset), tokenizer, config), what="KTO eval dataset")
        else:
            eval_examples = prepare_dataset(eval_dataset, tokenizer, config)
            eval_share = distributed.EvalShare(len(eval_examples), eval_batch, mesh=mesh, whole=True)
    if share is None:
        distributed.check_same_data(examples, what="KTO examples")  # every process builds the same global batches
        steps_in_epoch = data.steps_per_epoch(len(examples), examples_per_step, method="KTO")
        total_steps = data.total_steps(config, steps_in_epoch)
        share = distributed.DataShare(len(examples), examples_per_step, micro_batch=micro_batch, mesh=mesh,
                                      seed=config.seed, shuffle=shuffle, start_step=0, total_steps=total_steps,
                                      whole=True)
    # a KL sequence joins one example's prompt to another's completion (the reference's groups: every example)
    everything = examples + ref_examples + (eval_examples or [])
    longest_prompt = max(len(e["prompt_ids"]) for e in everything)
    longest_completion = max(len(e["completion_ids"]) for e in everything)
    if not share.whole or (eval_share and not eval_share.whole):
        longest_prompt, longest_completion = agreed_max(longest_prompt), agreed_max(longest_completion)
    longest = longest_prompt + longest_completion
    buckets = data.length_buckets(min(config.max_length or longest, longest))
    for checked in (model, ref_model):  # a KL sequence may join the longest prompt to the longest completion
        if checked is not None:  # (several processes: each checks its share, and a failure stops them all)
            distributed.on_every_process(data.check_model_fits, checked, everything, ("prompt_ids", "completion_ids"),
                                         method="KTO", length_fields="max_length", extra_ids=(pad_id,),
                                         longest=min(config.max_length or longest, longest), what="KTO dataset")
    batch_args = dict(buckets=buckets, pad_token_id=pad_id, max_length=config.max_length, with_kl=with_kl)
    if eval_share and not eval_share.whole:  # every eval batch's padded length, up front (one collective)
        eval_share.agree_lengths(_eval_longest(eval_examples, eval_share, max_length=config.max_length,
                                               with_kl=with_kl))

    # Under LoRA the default reference is the base model: the adapters switched off, no copy of the base.
    adapters_off_reference = ref_model is None and has_adapters(model)
    if adapters_off_reference:
        check_reference_without_adapters(model, method="KTO")
    # The policy's buffers are donated by the train step, so a reference that is `model` itself is a copy, unless
    # it is only used before training (precomputed log-probs).
    if adapters_off_reference and not config.precompute_ref_log_probs:
        ref_graphdef, ref_params, ref_sharding = None, None, None  # made from the train state below
    else:
        ref_graphdef, ref_params, ref_sharding = reference_params(
            model if ref_model is None else ref_model, mesh,
            copy=ref_model is None and not config.precompute_ref_log_probs)
        if adapters_off_reference:
            ref_params = without_adapters(ref_params)  # only new zeros for lora_b; the rest is the model's arrays
    if config.precompute_ref_log_probs:
        common = dict(buckets=buckets, pad_token_id=pad_id, mesh=mesh, ref_sharding=ref_sharding)
        if ref_share is None:
            examples = precompute_ref_logps(examples, ref_graphdef, ref_params, config, group_size=examples_per_step,
                                            accumulation_steps=config.gradient_accumulation_steps, **common)
        else:  # every process gets every example's log-probs, computed as one process does; it keeps its own
            ref_share.agree_lengths(_eval_longest(ref_examples, ref_share, max_length=config.max_length,
                                                  with_kl=with_kl))
            values = shared_ref_logps(ref_examples, ref_share, ref_graphdef, ref_params, config,
                                      accumulation_steps=config.gradient_accumulation_steps, **common)
            examples = [{**e, **{k: float(v[i]) for k, v in values.items()}}
                        for e, i in zip(examples, share.needed, strict=True)]
        if eval_examples and eval_share.whole:
            eval_examples = precompute_ref_logps(eval_examples, ref_graphdef, ref_params, config,
                                                 group_size=eval_batch, **common)
        elif eval_examples:  # in the eval batches (their lengths agreed above)
            values = shared_ref_logps(eval_examples, eval_share, ref_graphdef, ref_params, config, **common)
            eval_examples = [{**e, **{k: float(v[i]) for k, v in values.items()}}
                             for e, i in zip(eval_examples, eval_share.needed, strict=True)]
        ref_params = None  # the reference is no longer needed: free it

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    if adapters_off_reference and not config.precompute_ref_log_probs:
        # laid out like state.params, joined with state.frozen inside the step (a copy: the step donates params)
        ref_params = jax.tree.map(jnp.copy, without_adapters(state.params))
        ref_sharding = None if state_sharding is None else state_sharding.params
    step_args = dict(mesh=mesh, state_sharding=state_sharding, ref_graphdef=ref_graphdef,
                     ref_sharding=ref_sharding if ref_params is not None else None)
    train_step = make_train_step(config, **step_args)
    eval_step = make_eval_step(config, **step_args)
    checkpoints = loop.checkpointer(config, method="kto", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints)
    loop.check_planned_start(share, start_step)  # the data share was prepared from the planned step
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                            report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                            description="kto", start_step=start_step, config=config.to_dict())
    note_shape = loop.ShapeNotes()
    order = data.step_indices(share.num_examples, examples_per_step, seed=config.seed, shuffle=shuffle,
                              start_step=start_step)

    def measure(rows, counted):  # of this process's own rows (the others are None or cut)
        longest = max(_sequence_lengths(rows, share.own_positions, max_length=config.max_length, with_kl=with_kl))
        return longest, sum(_sequence_lengths(counted, range(len(counted)), max_length=config.max_length))

    share.agree_steps(examples, measure, start_step=start_step, total_steps=total_steps)  # padded lengths, tokens
    try:
        for step in range(start_step, total_steps):
            _, indices = next(order)
            # several processes: only this one's rows and their KL partners (the other rows: None, padding)
            rows, counted = share.step_examples(indices, examples, stand_in=None)
            longest = None
            if not share.whole:
                longest, tokens = share.step_totals(step, rows, counted, measure)
            batch = collate(rows, accumulation_steps=config.gradient_accumulation_steps, longest=longest,
                            **batch_args)
            num_tokens += int(batch["attention_mask"].sum()) if share.whole else tokens
            note_shape(batch)
            placed = shard_batch(batch, mesh, batch_axis=1, global_batch=True, check_shapes=False)  # length agreed
            state, metrics = train_step(state, placed, ref_params)
            done = step + 1
            log.log(done, {**metrics, "learning_rate": schedule(step), "num_tokens": num_tokens},
                    epoch=done / steps_in_epoch)
            if eval_share and eval_share.num_examples and loop.should_evaluate(config, done, steps_in_epoch):
                log.write({"step": done, **evaluate(eval_step, state, ref_params, eval_examples, config, mesh,
                                                    batch_args, share=eval_share)})
            if config.save_steps and done % config.save_steps == 0:
                log.sync()  # a checkpoint is written only after its losses were checked finite
                checkpoints.save(done, state, {"num_tokens": num_tokens})
        log.flush(total_steps, epoch=total_steps / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))


def eval_batches(examples, share: distributed.EvalShare, batch_args: dict):
    """The eval batches (`collate`d, micro-batch `[1, batch]`) this process feeds, in order: consecutive batches of
    the set (KL pairs within each batch), its rows of each (`share`; the other rows None, and on several processes
    the rows before its own, their KL partners, never placed), padded to the batch's agreed length."""
    for index in range(share.num_batches):
        rows, longest = share.batch_rows(index, examples, None)
        yield collate(rows, accumulation_steps=1, longest=longest, **batch_args)


def _eval_longest(examples, share: distributed.EvalShare, *, max_length: int | None, with_kl: bool):
    """This process's longest sequence (of either kind) of every eval batch, 0 where it feeds none."""
    longest = np.zeros(share.num_batches, np.int64)
    for index in range(share.num_batches):
        rows, _ = share.batch_rows(index, examples, None)
        # the batch's examples come first, so row j's KL partner is row j - 1 of them (the first's: the last)
        longest[index] = max(_sequence_lengths(rows[:share.batch_examples(index)], share.own_positions(index),
                                               max_length=max_length, with_kl=with_kl), default=0)
    return longest


def evaluate(eval_step, state, ref_params, examples, config, mesh, batch_args, *,
             share: distributed.EvalShare | None = None) -> dict:
    """Loss and metrics over the whole eval set (TRL's names with an `eval_` prefix), in consecutive batches of
    `per_device_eval_batch_size` (KL pairs within each batch): the loss weighted by examples, the other metrics
    averaged over the batches where they are defined (as TRL averages its per-batch values). `share`: this
    process's rows of the eval batches (default: every example prepared, all rows its own)."""
    if share is None:
        share = distributed.EvalShare(len(examples), config.per_device_eval_batch_size * batch_divisor(mesh),
                                      mesh=mesh, whole=True)
    loss_sum, count, values = 0.0, 0.0, {}
    for batch in eval_batches(examples, share, batch_args):
        # several processes agreed on every batch's length (`EvalShare.agree_lengths`): no shape check per batch
        placed = shard_batch(batch, mesh, batch_axis=1, global_batch=True, check_shapes=share.whole)
        metrics = jax.device_get(eval_step(state, placed, ref_params))
        examples_in_batch = float(metrics.pop("num_examples"))
        loss_sum += float(metrics.pop("loss")) * examples_in_batch
        count += examples_in_batch
        for key, value in metrics.items():
            if not math.isnan(float(value)):
                values.setdefault(key, []).append(float(value))
    result = {"eval_loss": loss_sum / max(count, 1.0)}
    result.update({f"eval_{key}": sum(v) / len(v) for key, v in values.items()})
    return result


def _sequence_lengths(rows: Sequence[dict], positions, *, max_length: int | None, with_kl: bool = False):
    """The lengths `collate` gives the sequences of `rows[positions]`: prompt + completion, cut to `max_length`,
    and with `with_kl` also those of their mismatched KL sequences (each prompt with the completion of the row
    before it, cyclically)."""
    cut = (lambda n: n) if max_length is None else (lambda n: min(n, max_length))
    lengths = [cut(len(rows[j]["prompt_ids"]) + len(rows[j]["completion_ids"])) for j in positions]
    if with_kl:
        lengths += [cut(len(rows[j]["prompt_ids"]) + len(rows[j - 1]["completion_ids"])) for j in positions]
    return lengths


def _check_weights(examples: Sequence[dict], config: KTOConfig) -> None:
    """Warn, as TRL does, when the desirable/undesirable weights are outside the range the paper recommends for
    the dataset's imbalance (Eq. 8: w_D n_D / (w_U n_U) in [1, 4/3])."""
    num_desirable = max(sum(e["label"] for e in examples), 1)
    num_undesirable = max(len(examples) - num_desirable, 1)
    if num_desirable == num_undesirable:
        return
    desirable_low = round(num_undesirable * config.undesirable_weight / num_desirable, 2)
    desirable_high = round(num_undesirable * config.undesirable_weight / num_desirable * 1.33, 2)
    undesirable_low = round(num_desirable * config.desirable_weight / num_undesirable / 1.33, 2)
    undesirable_high = round(num_desirable * config.desirable_weight / num_undesirable, 2)
    if not (desirable_low <= config.desirable_weight <= desirable_high
            or undesirable_low <= config.undesirable_weight <= undesirable_high):
        logger.warning("The dataset has %d desirable and %d undesirable examples, and the loss weights are outside "
                       "the range the KTO paper recommends (Eq. 8): set EITHER desirable_weight in [%s, %s] OR "
                       "undesirable_weight in [%s, %s].", num_desirable, num_undesirable, desirable_low,
                       desirable_high, undesirable_low, undesirable_high)
