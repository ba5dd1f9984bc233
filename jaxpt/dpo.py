"""Direct Preference Optimization: `DPOConfig`, data preparation, `make_train_step`, `train`.

The loss is `jaxpt.losses.dpo` (every TRL loss type, f-divergences, WPO, LD-DPO), averaged over the pairs of the
whole accumulated batch, so `batch 8 x accumulation 1` and `batch 2 x accumulation 4` take the same step.

```python
config = DPOConfig(output_dir="out", max_steps=100)
result = jaxpt.dpo.train(model, tokenizer, dataset, config)          # batteries included

step = jaxpt.dpo.make_train_step(config)                             # or your own loop
state, metrics = step(state, batch, ref_params)   # batch: collate(...) arrays [accumulation, micro_batch, 2, seq]
```

Batch layout: each pair is one `[2, seq]` block (row 0 the prompt + chosen completion, row 1 the prompt +
rejected completion), so `collate` returns `input_ids`, `attention_mask` and `completion_mask` shaped
`[accumulation, micro_batch, 2, seq]`. The batch is sharded over `micro_batch`, which keeps both halves of a pair
on the same device; the step runs the model once on the `[2 * micro_batch, seq]` rows.

The reference model, two ways (the step's third argument):
- `ref_params` (default, as TRL): the frozen reference parameters, with the policy's architecture (a pytree like
  `state.params`; `train` uses a copy of the initial parameters unless a `ref_model` is given). Their log-probs are
  computed inside the step, micro-batch by micro-batch, without gradient. Under LoRA, `state.params` are the
  adapters and the default reference is the base model: the adapters switched off, joined with `state.frozen`
  inside the step (no second copy of the base).
- `ref_params=None` with `precompute_ref_log_probs=True`: the batch carries `ref_chosen_logps` and
  `ref_rejected_logps` `[accumulation, micro_batch]`, computed once before training by `precompute_ref_logps`;
  no reference parameters are held during training (and the reference may have another architecture).
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
from jaxpt.lora import check_reference_without_adapters, has_adapters, without_adapters
from jaxpt.losses.dpo import (
    DPO_LOSS_TYPES,
    check_dpo_options,
    completion_token_metrics,
    dpo_loss,
    ld_sequence_logps,
    wpo_weights,
)
from jaxpt.losses.logprobs import chunked_token_logps, chunked_token_logps_and_stats, next_token_targets
from jaxpt.losses.metrics import add_metrics, mean_metrics, total_metrics
from jaxpt.models import set_gradient_checkpointing
from jaxpt.reference_sync import check_reference_sync, checkpoint_extra, resumed_reference, sync_reference
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

TRUNCATION_MODES = ("keep_start", "keep_end")


@dataclass
class DPOConfig(TrainingConfig):
    """TRL's `DPOConfig` fields that have a meaning here (same names and defaults)."""

    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate (TRL's DPO default)."})
    max_length: int | None = field(default=1024, metadata={"help": "Truncate prompt + completion to this many "
                                                                    "tokens (None: no truncation)."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes that tokenize the dataset "
                                                                         "(datasets.map num_proc; None: one)."})
    truncation_mode: str = field(default="keep_start", metadata={"help": f"One of {TRUNCATION_MODES} (TRL "
                                                                         "deprecates 'keep_end')."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle the pairs every epoch (seeded)."})
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "Compute the reference log-probs once "
                                                                            "before training (no reference "
                                                                            "parameters in memory while training)."})
    precompute_ref_batch_size: int | None = field(default=None, metadata={"help": "Pairs per device per batch when "
                                                                                  "precomputing (default: the "
                                                                                  "train/eval batch size)."})
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"],
                                 metadata={"help": f"One or more of {DPO_LOSS_TYPES}; several are summed with "
                                                   "loss_weights."})
    loss_weights: list[float] | None = field(default=None, metadata={"help": "One weight per loss_type (default: "
                                                                             "1.0 each), e.g. MPO: sigmoid bco_pair "
                                                                             "sft with 0.8 0.2 1.0."})
    ld_alpha: float | None = field(default=None, metadata={"help": "LD-DPO (arXiv:2409.06411): weight in [0, 1] of "
                                                                   "the completion tokens beyond the shorter "
                                                                   "completion's length (None: plain DPO)."})
    f_divergence_type: str = field(default="reverse_kl", metadata={"help": "f-DPO (arXiv:2309.16240): reverse_kl, "
                                                                           "forward_kl, js_divergence or "
                                                                           "alpha_divergence."})
    f_alpha_divergence_coef: float = field(default=0.5, metadata={"help": "α of alpha_divergence."})
    label_smoothing: float = field(default=0.0, metadata={"help": "ε of robust (label-flip probability, in [0, "
                                                                  "0.5)), exo_pair (> 0; the paper uses 1e-3) and "
                                                                  "aot."})
    beta: float = field(default=0.1, metadata={"help": "β: higher keeps the policy closer to the reference (IPO: "
                                                       "the regularisation τ)."})
    use_weighting: bool = field(default=False, metadata={"help": "WPO (arXiv:2406.11827): weight each pair by the "
                                                                 "policy's length-normalised probability of both "
                                                                 "completions."})
    discopop_tau: float = field(default=0.05, metadata={"help": "τ of the DiscoPOP loss (arXiv:2406.08414)."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk when computing log-probs "
                                                                   "from hidden states (memory vs speed)."})
    sync_ref_model: bool = field(default=False, metadata={
        "help": "TR-DPO (arXiv:2404.09656): every ref_model_sync_steps steps move the reference toward the policy, "
                "ref <- alpha * policy + (1 - alpha) * ref (not with LoRA or precompute_ref_log_probs)."})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "TR-DPO's alpha: the policy's share in the "
                                                                        "reference update."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "TR-DPO's tau: optimizer steps between "
                                                                     "reference updates."})

    def validate(self) -> None:
        if isinstance(self.loss_type, str):  # TRL accepts one name or a list
            self.loss_type = [self.loss_type]
        super().validate()
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be > 0 (it scales the log-ratios; higher keeps the policy "
                             "closer to the reference).")
        check_dpo_options(self.loss_type, loss_weights=self.loss_weights, label_smoothing=self.label_smoothing,
                          f_divergence_type=self.f_divergence_type, use_weighting=self.use_weighting)
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode={self.truncation_mode!r}; use one of {TRUNCATION_MODES}.")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be >= 2.")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha={self.ld_alpha} must be in [0, 1] (1: plain DPO, 0: ignore the tokens "
                             "beyond the shorter completion), or None.")
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            raise ValueError(f"precompute_ref_batch_size={self.precompute_ref_batch_size} must be >= 1.")
        if self.logits_chunk_size < 1:
            raise ValueError(f"logits_chunk_size={self.logits_chunk_size} must be >= 1.")
        check_reference_sync(self, lora=False, method="DPO")


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def prepare_dataset(dataset, tokenizer, config: DPOConfig) -> list[dict]:
    """Tokenize a TRL-format preference dataset (explicit or implicit prompt, standard or conversational) into
    examples `{"chosen_input_ids", "chosen_completion_mask", "rejected_input_ids", "rejected_completion_mask"}`
    (int32 numpy arrays: prompt + completion, truncated to `max_length`, with 1 on completion tokens).
    Bad data fails here, before anything compiles."""
    fmt = data.require_format(dataset, ("preference", "implicit_preference"), method="DPO")
    data.check_chat_template(tokenizer, fmt, method="DPO")
    data.check_rows(dataset, fmt, method="DPO", tokenizer=tokenizer)
    max_length = config.max_length
    columns = [c for c in (*data.text_columns(fmt), "tools") if c in data.column_names(dataset)]
    tokenized = data.map_columns(dataset, tokenize_preference_batch, columns=columns,
                                 num_proc=config.dataset_num_proc, desc="Tokenizing the DPO dataset",
                                 fn_kwargs={"tokenizer": tokenizer, "implicit": fmt.kind == "implicit_preference",
                                            "conversational": fmt.conversational})
    examples = []
    for index, (prompt_ids, chosen_ids, rejected_ids) in enumerate(zip(
            *(tokenized[name].rows() for name in ("prompt_ids", "chosen_ids", "rejected_ids")), strict=True)):
        for name, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
            data.check_nonempty(ids, what=f"{name} completion", index=index)
        if max_length is not None and config.truncation_mode == "keep_start" and len(prompt_ids) >= max_length:
            raise ValueError(f"Example {index}: the prompt is {len(prompt_ids)} tokens, not shorter than "
                             f"max_length={max_length}, so no completion token would be left: raise max_length or "
                             "shorten/filter long prompts.")
        example = {}
        for name, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
            sequence = np.concatenate([prompt_ids, ids]).astype(np.int32)
            mask = np.repeat(np.asarray([0, 1], np.int32), [len(prompt_ids), len(ids)])
            if max_length is not None and len(sequence) > max_length:
                keep = slice(None, max_length) if config.truncation_mode == "keep_start" else slice(-max_length, None)
                sequence, mask = sequence[keep], mask[keep]
            example[f"{name}_input_ids"] = sequence
            example[f"{name}_completion_mask"] = mask
        examples.append(example)
    return examples


def tokenize_preference_batch(batch: dict[str, list], *, tokenizer, implicit: bool,
                              conversational: bool) -> dict[str, list]:
    """`tokenize_preference` over a batch of rows (`datasets.Dataset.map(batched=True)`): `prompt_ids`,
    `chosen_ids`, `rejected_ids`; standard text in three batched tokenizer calls."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    if implicit:
        rows = [data.extract_prompt(row) for row in rows]
    if conversational:
        ids = [tokenize_preference(tokenizer, row, conversational=True) for row in rows]
        return {name: [i[k] for i in ids] for k, name in enumerate(("prompt_ids", "chosen_ids", "rejected_ids"))}
    eos_token = tokenizer.eos_token
    ending = lambda text: text if not eos_token or text.endswith(eos_token) else text + eos_token
    prompt_ids = data.tokenize_texts(tokenizer, [row["prompt"] for row in rows])
    chosen_full = data.tokenize_texts(tokenizer, [row["prompt"] + ending(row["chosen"]) for row in rows])
    rejected_full = data.tokenize_texts(tokenizer, [row["prompt"] + ending(row["rejected"]) for row in rows])
    out: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for prompt, chosen, rejected in zip(prompt_ids, chosen_full, rejected_full, strict=True):
        length = min(data.common_prefix_length(prompt, chosen), data.common_prefix_length(prompt, rejected))
        out["prompt_ids"].append(prompt[:length])
        out["chosen_ids"].append(chosen[length:])
        out["rejected_ids"].append(rejected[length:])
    return out


def tokenize_preference(tokenizer, row: dict, *, conversational: bool) -> tuple[list[int], list[int], list[int]]:
    """`(prompt_ids, chosen_ids, rejected_ids)` as TRL tokenizes a preference example: standard completions get
    the EOS token if missing; conversational ones go through the chat template (the prompt with the generation
    prompt); the prompt ends where its tokens and both prompt + completion token sequences diverge."""
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if conversational:
        tools = row.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        prompt_ids = data.tokenize(tokenizer, prompt, add_generation_prompt=True, tools=tools)["input_ids"]
        chosen_full = data.tokenize(tokenizer, list(prompt) + list(chosen), tools=tools)["input_ids"]
        rejected_full = data.tokenize(tokenizer, list(prompt) + list(rejected), tools=tools)["input_ids"]
    else:
        eos_token = tokenizer.eos_token
        if eos_token:
            chosen = chosen if chosen.endswith(eos_token) else chosen + eos_token
            rejected = rejected if rejected.endswith(eos_token) else rejected + eos_token
        prompt_ids = data.tokenize(tokenizer, prompt)["input_ids"]
        chosen_full = data.tokenize(tokenizer, prompt + chosen)["input_ids"]
        rejected_full = data.tokenize(tokenizer, prompt + rejected)["input_ids"]
    prompt_length = min(data.common_prefix_length(prompt_ids, chosen_full),
                        data.common_prefix_length(prompt_ids, rejected_full))
    return list(prompt_ids[:prompt_length]), list(chosen_full[prompt_length:]), list(rejected_full[prompt_length:])


def collate(examples: Sequence[dict], *, accumulation_steps: int, buckets: Sequence[int],
            pad_token_id: int = 0, longest: int | None = None) -> dict[str, np.ndarray]:
    """A step's pairs -> `input_ids`, `attention_mask`, `completion_mask` `[accumulation_steps, micro_batch, 2,
    length]` (row 0 chosen, row 1 rejected), right-padded to the smallest length bucket that fits the longest
    sequence; plus `ref_chosen_logps`, `ref_rejected_logps` `[accumulation_steps, micro_batch]` when the examples
    carry them (`precompute_ref_logps`). `longest`: the longest sequence of the whole global batch, when
    `examples` hold only some of its rows (several processes agree on it, `DataShare.agree_steps`)."""
    batch = data.collate_pairs(examples, accumulation_steps=accumulation_steps, buckets=buckets,
                               pad_token_id=pad_token_id, longest=longest)
    micro = len(examples) // accumulation_steps
    if "ref_chosen_logps" in examples[0]:
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            batch[key] = np.asarray([e[key] for e in examples], np.float32).reshape(accumulation_steps, micro)
    return batch


def _longest(example: dict) -> int:
    return max(len(example["chosen_input_ids"]), len(example["rejected_input_ids"]))


def _num_tokens(example: dict) -> int:
    """The tokens a pair puts in a batch (its attention mask's ones)."""
    return len(example["chosen_input_ids"]) + len(example["rejected_input_ids"])


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def _targets(batch: dict) -> tuple[jax.Array, jax.Array]:
    """Next-token targets and their completion mask, `[..., 2, seq]` like the batch."""
    shape = batch["input_ids"].shape
    flat = lambda x: x.reshape(-1, shape[-1])
    targets, target_mask = next_token_targets(flat(batch["input_ids"]),
                                              flat(batch["completion_mask"] * batch["attention_mask"]))
    return targets.reshape(shape), target_mask.reshape(shape)


def _counts(batch: dict) -> dict[str, jax.Array]:
    """What the loss of a whole step is normalised by: its pairs (a pair without any completion token is padding)
    and, for the `sft` term, the predicted tokens of its chosen completions."""
    _, target_mask = _targets(batch)
    return {"pairs": jnp.sum(_pair_mask(batch).astype(jnp.float32)),
            "chosen_tokens": jnp.sum(target_mask[..., 0, :].astype(jnp.float32))}


def _pair_mask(batch: dict) -> jax.Array:
    return jnp.sum(batch["completion_mask"] * batch["attention_mask"], axis=(-2, -1)) > 0


def _token_logps(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: DPOConfig, *,
                 stats: tuple[str, ...] = ()):
    """Per-token log-probs `[micro_batch, 2, seq]` of one micro-batch's next tokens (and their statistics): one
    model call on the `[2 * micro_batch, seq]` rows, chunked from the hidden states (never full logits)."""
    model = nnx.merge(graphdef, params)
    shape = batch["input_ids"].shape
    flat = lambda x: x.reshape(-1, shape[-1])
    targets, _ = _targets(batch)
    hidden = model.hidden_states(flat(batch["input_ids"]), attention_mask=flat(batch["attention_mask"]))
    options = dict(chunk_size=config.logits_chunk_size, logit_softcap=model.final_logit_softcap)
    if not stats:
        return chunked_token_logps(hidden, model.lm_head_weight(), flat(targets), **options).reshape(shape), {}
    logps, per_token = chunked_token_logps_and_stats(hidden, model.lm_head_weight(), flat(targets), stats=stats,
                                                     **options)
    return logps.reshape(shape), {k: v.reshape(shape) for k, v in per_token.items()}


def reference_logps(ref_params: nnx.State, graphdef: nnx.GraphDef, batch: dict,
                    config: DPOConfig) -> tuple[jax.Array, jax.Array]:
    """`(ref_chosen_logps, ref_rejected_logps)` `[micro_batch]` of one micro-batch under the reference parameters
    (LD-DPO-weighted when `ld_alpha` is set, as the policy's), without gradient."""
    token_logps, _ = _token_logps(jax.lax.stop_gradient(ref_params), graphdef, batch, config)
    _, target_mask = _targets(batch)
    chosen, rejected = ld_sequence_logps(token_logps[:, 0], token_logps[:, 1], target_mask[:, 0],
                                         target_mask[:, 1], ld_alpha=config.ld_alpha)
    return jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: DPOConfig, totals: dict):
    """Loss of one micro-batch (which carries `ref_chosen_logps` / `ref_rejected_logps`), normalised by the pairs
    (and, for the `sft` term, the chosen tokens) of the whole step, and its metrics as `(sum, count)` pairs over
    pairs or tokens, which add up over micro-batches exactly."""
    stats = ("entropy", "mean_logits", "is_top1") + (("log_sum_sq_probs",) if config.use_weighting else ())
    token_logps, token_stats = _token_logps(params, graphdef, batch, config, stats=stats)
    _, target_mask = _targets(batch)
    chosen_mask, rejected_mask = target_mask[:, 0], target_mask[:, 1]
    chosen_logps, rejected_logps = ld_sequence_logps(token_logps[:, 0], token_logps[:, 1], chosen_mask,
                                                     rejected_mask, ld_alpha=config.ld_alpha)
    weights = {}
    if config.use_weighting:
        weights = {f"{side}_weights": wpo_weights(token_logps[:, i], token_stats["log_sum_sq_probs"][:, i],
                                                  target_mask[:, i]) for i, side in enumerate(("chosen", "rejected"))}
    completion = batch["completion_mask"] * batch["attention_mask"]
    loss, metrics = dpo_loss(
        chosen_logps, rejected_logps, batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta=config.beta,
        loss_type=config.loss_type, label_smoothing=config.label_smoothing,
        chosen_lengths=jnp.sum(completion[:, 0], -1), rejected_lengths=jnp.sum(completion[:, 1], -1),
        f_divergence_type=config.f_divergence_type, f_alpha_divergence_coef=config.f_alpha_divergence_coef,
        discopop_tau=config.discopop_tau, loss_weights=config.loss_weights, **weights,
        sft_chosen_logps=jnp.sum(token_logps[:, 0] * chosen_mask, -1), sft_num_tokens=totals["chosen_tokens"],
        pair_mask=_pair_mask(batch), num_pairs=totals["pairs"], return_counts=True,
    )
    split = lambda side: {k: v[:, side] for k, v in token_stats.items()}
    metrics.update(completion_token_metrics(split(0), split(1), chosen_mask, rejected_mask, return_counts=True))
    return loss, metrics


def _with_reference(micro_batch: dict, ref_params, graphdef, config: DPOConfig) -> dict:
    if ref_params is None:
        missing = {"ref_chosen_logps", "ref_rejected_logps"} - set(micro_batch)
        if missing:
            raise ValueError(f"step(state, batch, ref_params=None) needs the reference log-probs in the batch, but "
                             f"{sorted(missing)} are missing: pass ref_params, or precompute them "
                             "(precompute_ref_logps, precompute_ref_log_probs=True).")
        return micro_batch
    ref_chosen, ref_rejected = reference_logps(ref_params, graphdef, micro_batch, config)
    return {**micro_batch, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}


def make_train_step(config: DPOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None):
    """`state, metrics = step(state, batch, ref_params)`: one optimizer step over `[accumulation, micro_batch, 2,
    seq]` arrays (`collate`), micro-batches scanned inside the step. `ref_params` are the frozen reference
    parameters (shaped like `state.params`), or None when the batch carries `ref_chosen_logps` /
    `ref_rejected_logps` (with a mesh, `config.precompute_ref_log_probs` says which of the two the step is
    compiled for). jitted with explicit shardings and the state donated."""

    def step(state: TrainState, batch: dict, ref_params: nnx.State | None):
        totals = _counts(batch)
        # differentiate the trained parameters only (under LoRA the adapters, with their dropout; the frozen base
        # joins them here)
        grad_fn = lora.value_and_grad(loss_fn, state, seed=config.seed)
        reference = None if ref_params is None else state.full_params(ref_params)

        def micro_step(grads, inputs):
            micro_batch, micro_index = inputs
            micro_batch = _with_reference(micro_batch, reference, state.graphdef, config)
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

    return jit_step(step, mesh=mesh, state_sharding=state_sharding,
                    extra_in_shardings=(_ref_sharding(config, state_sharding),))


def make_eval_step(config: DPOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None,
                   return_counts: bool = False):
    """`metrics = eval_step(state, batch, ref_params)`: loss and metrics without updating (same batch layout and
    reference argument); with `return_counts`, each as a `(sum, count)` pair over the pairs or tokens it is
    averaged over, so batches add up (`evaluate`)."""

    def eval_step(state: TrainState, batch: dict, ref_params: nnx.State | None):
        totals = _counts(batch)
        reference = None if ref_params is None else state.full_params(ref_params)

        def micro_step(_, micro_batch):
            micro_batch = _with_reference(micro_batch, reference, state.graphdef, config)
            return None, loss_fn(state.full_params(), state.graphdef, micro_batch, config, totals)

        _, (losses, metric_pairs) = jax.lax.scan(micro_step, None, batch)
        metrics = total_metrics(metric_pairs)
        metrics["loss"] = (jnp.sum(losses) * totals["pairs"], totals["pairs"])  # the mean loss weighs by its pairs
        return metrics if return_counts else mean_metrics(metrics)

    return jit_step(eval_step, mesh=mesh, state_sharding=state_sharding, train=False,
                    extra_in_shardings=(_ref_sharding(config, state_sharding),))


def _ref_sharding(config: DPOConfig, state_sharding):
    """Reference parameters are laid out like the policy's; with precomputed reference log-probs there are none."""
    if config.precompute_ref_log_probs or state_sharding is None:
        return None
    return state_sharding.params


# --------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------


def reference_params(state: TrainState, ref_model: nnx.Module | None = None,
                     mesh: jax.sharding.Mesh | None = None) -> nnx.State:
    """The frozen reference parameters for the step, laid out like `state.params`: a copy of them (the initial
    policy, TRL's default) or `ref_model`'s, which must have the policy's architecture. Under LoRA
    (`state.frozen`), the default is the base model: the adapters switched off (`jaxpt.lora.without_adapters`),
    which the step joins with the frozen base, so no second copy of the base exists."""
    if ref_model is None:
        params = without_adapters(state.params) if state.frozen is not None else state.params
        return jax.tree.map(jnp.copy, params)  # a copy: the step donates (and so deletes) state.params
    params = nnx.state(ref_model, nnx.Param)
    if jax.tree.structure(params) != jax.tree.structure(state.params) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params), strict=True)):
        raise ValueError("ref_model has a different architecture than the policy: a reference computed inside the "
                         "step must match the policy's parameters; use precompute_ref_log_probs=True for another "
                         "architecture.")
    return params if mesh is None else put_global(params, state.shardings(mesh).params)


def precompute_ref_logps(ref_model: nnx.Module, examples: Sequence[dict], config: DPOConfig, *,
                         mesh: jax.sharding.Mesh | None = None, batch_size: int | None = None,
                         buckets: Sequence[int] | None = None, pad_token_id: int = 0) -> list[dict]:
    """The examples with `ref_chosen_logps` / `ref_rejected_logps` (float32) added, computed under `ref_model`
    (any architecture) in consecutive batches of `batch_size` pairs per data-parallel shard (default
    `precompute_ref_batch_size` or `per_device_train_batch_size`): `shared_ref_logps` with every row this
    process's own (`EvalShare(whole=True)`)."""
    if not examples:
        return []
    if buckets is None:
        buckets = data.length_buckets(config.max_length or max(len(e["chosen_input_ids"]) for e in examples))
    share = distributed.EvalShare(len(examples), precompute_batch(config, mesh, batch_size), mesh=mesh, whole=True)
    computed = [{k: v for k, v in e.items() if not k.startswith("ref_")} for e in examples]  # (recomputed)
    chosen, rejected = shared_ref_logps(_reference_fn(ref_model, config, mesh), computed, share, mesh=mesh,
                                        buckets=buckets, pad_token_id=pad_token_id)
    return [{**e, "ref_chosen_logps": chosen[i], "ref_rejected_logps": rejected[i]} for i, e in enumerate(examples)]


def precompute_batch(config: DPOConfig, mesh, batch_size: int | None = None) -> int:
    """The pairs of one `precompute_ref_logps` batch: `batch_size` (default `precompute_ref_batch_size` or
    `per_device_train_batch_size`) per data-parallel shard."""
    per_device = batch_size or config.precompute_ref_batch_size or config.per_device_train_batch_size
    return per_device * batch_divisor(mesh)


def shared_ref_logps(reference: tuple, examples: Sequence[dict], share: distributed.EvalShare, *,
                     mesh: jax.sharding.Mesh | None, buckets: Sequence[int],
                     pad_token_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The reference log-probs `(chosen, rejected)` of every pair of the set `[share.num_examples]`, in consecutive
    batches of `share.batch_size` pairs (`precompute_batch`; the last one filled with empty pairs, whose results
    are dropped). On several processes each feeds its rows of every batch (`examples`: the ones it prepared,
    aligned with `share.needed`), padded to the batch's agreed length (`EvalShare.agree`), so the batches are those
    of one process; the results are replicated, so every process gets all of them. On one process
    (`precompute_ref_logps`) the share is whole. Each row's log-probs depend on that row only, so the filler rows
    change nothing. `reference`: `_reference_fn(ref_model, config, mesh)`."""
    compute, params = reference
    chosen, rejected = np.zeros(share.num_examples, np.float32), np.zeros(share.num_examples, np.float32)
    for index, batch in enumerate(eval_batches(examples, share, buckets, pad_token_id)):
        # the processes agreed on every batch's length (`EvalShare.agree`): no shape check per batch
        values = jax.device_get(compute(params, shard_batch(batch, mesh, batch_axis=1, global_batch=True,
                                                            check_shapes=share.whole)))
        first, count = index * share.batch_size, share.batch_examples(index)
        chosen[first:first + count] = np.asarray(values[0])[:count]
        rejected[first:first + count] = np.asarray(values[1])[:count]
    return chosen, rejected


def _reference_fn(ref_model: nnx.Module, config: DPOConfig, mesh):
    """`(compute, params)`: `compute(params, batch)` -> the reference's `(chosen, rejected)` log-probs of a
    `collate`d batch (one micro-batch), jitted (on a mesh: replicated results), and `ref_model`'s parameters, placed."""
    graphdef, params = nnx.split(ref_model, nnx.Param)
    rules = tuple(getattr(ref_model, "partition_rules", ()))

    def compute(params, batch):
        batch = {k: v[0] for k, v in batch.items()}
        if mesh is None:
            return reference_logps(params, graphdef, batch, config)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # sharding hints and data-parallel log-probs
            return reference_logps(params, graphdef, batch, config)

    if mesh is None:
        compute = jax.jit(compute)
    else:
        params_sharding = tree_shardings(params, mesh, rules)
        params = put_global(params, params_sharding)
        compute = jax.jit(compute, in_shardings=(params_sharding, batch_sharding(mesh, batch_axis=1)),
                          out_shardings=replicated(mesh))
    return compute, params


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------


def train(model: nnx.Module, tokenizer, dataset, config: DPOConfig, *, ref_model: nnx.Module | None = None,
          eval_dataset=None) -> loop.TrainResult:
    """Align `model` on preference pairs (TRL preference format) against `ref_model` (default: a frozen copy of
    `model` as given): progress bar, `metrics.jsonl` with TRL's metric names, evaluation, orbax checkpoints every
    `save_steps`, exact resume, and the final model exported in Hugging Face format. With
    `precompute_ref_log_probs`, the reference log-probs are computed before the first step and the reference is
    not kept. A resumed run takes the same initial `model` (its copy is the default reference); the trained
    parameters come from the checkpoint."""
    config.validate()  # again: fields may have been changed since the config was built
    loop.prepare_output_dir(config)
    if ref_model is model:
        raise ValueError("ref_model is the policy itself: leave ref_model=None for a frozen copy of the initial model.")
    if ref_model is None and not config.precompute_ref_log_probs:
        check_reference_without_adapters(model, method="DPO")
    if ref_model is not None and has_adapters(model) and not config.precompute_ref_log_probs:
        raise ValueError("ref_model with a LoRA policy: the step's reference under LoRA is the base model with the "
                         "adapters switched off (leave ref_model=None: no second copy of the weights); for another "
                         "reference model set precompute_ref_log_probs=True (its log-probs are computed once, "
                         "before training).")
    mesh = mesh_from_config(config)
    micro_batch = config.per_device_train_batch_size * batch_divisor(mesh)
    examples_per_step = micro_batch * config.gradient_accumulation_steps
    pad_id = data.pad_token_id(tokenizer)

    def check_fits(checked_examples):
        for checked in (model, ref_model):
            if checked is not None:
                data.check_model_fits(checked, checked_examples, ("chosen_input_ids", "rejected_input_ids"),
                                      method="DPO", length_fields="max_length", extra_ids=(pad_id,))

    share, ref_share = None, None
    if distributed.shares_data():
        # Each process tokenizes only the pairs it feeds (the examples are the dataset's rows, one to one), and for
        # precomputed reference log-probs its rows of the batches one process computes them in (`ref_share`).
        data.require_format(dataset, ("preference", "implicit_preference"), method="DPO")
        distributed.check_same_data([{"rows": len(dataset), "columns": data.column_names(dataset)}],
                                    what="DPO datasets")
        steps_in_epoch = data.steps_per_epoch(len(dataset), examples_per_step, method="DPO")
        total_steps = data.total_steps(config, steps_in_epoch)
        share = distributed.DataShare(len(dataset), examples_per_step, micro_batch=micro_batch, mesh=mesh,
                                      seed=config.seed, shuffle=config.shuffle_dataset,
                                      start_step=loop.planned_start_step(config), total_steps=total_steps)
        if config.precompute_ref_log_probs:
            ref_share = distributed.EvalShare(len(dataset), precompute_batch(config, mesh), mesh=mesh)

    def prepare_rows(source, shares, what):  # this process's examples for each share, each tokenized once
        needed = np.unique(np.concatenate([share.needed for share in shares]))

        def prepare():
            own = prepare_dataset(distributed.select_rows(source, needed), tokenizer, config)
            check_fits(own)
            return own

        prepared = distributed.on_every_process(prepare, what=what)
        return [[prepared[i] for i in np.searchsorted(needed, share.needed)] for share in shares]

    ref_examples = []  # several processes, precomputed reference: this process's rows of the reference's batches
    if share:
        examples, *ref_examples = prepare_rows(dataset, [share] + ([ref_share] if ref_share else []), "DPO dataset")
        ref_examples = ref_examples[0] if ref_examples else []
    else:
        examples = prepare_dataset(dataset, tokenizer, config)
    eval_examples, eval_share, eval_ref_share, eval_ref_examples = None, None, None, None
    if eval_dataset is not None and config.eval_strategy != "no":
        eval_batch = config.per_device_eval_batch_size * batch_divisor(mesh)
        if distributed.shares_data():
            # Each process tokenizes only its rows of the eval batches (and of the reference's batches), and all
            # agree on their padded lengths.
            data.require_format(eval_dataset, ("preference", "implicit_preference"), method="DPO")
            eval_share = distributed.EvalShare(len(eval_dataset), eval_batch, mesh=mesh)
            shares = [eval_share]
            if config.precompute_ref_log_probs:
                eval_ref_share = distributed.EvalShare(len(eval_dataset), precompute_batch(
                    config, mesh, config.precompute_ref_batch_size or config.per_device_eval_batch_size), mesh=mesh)
                shares.append(eval_ref_share)
            eval_examples, *eval_ref_examples = prepare_rows(eval_dataset, shares, "DPO eval dataset")
            eval_ref_examples = eval_ref_examples[0] if eval_ref_examples else None
            eval_share.agree(eval_examples, _longest)  # every eval batch's padded length, up front
        else:
            eval_examples = prepare_dataset(eval_dataset, tokenizer, config)
            eval_share = distributed.EvalShare(len(eval_examples), eval_batch, mesh=mesh, whole=True)
    if share is None:
        distributed.check_same_data(examples, what="DPO examples")  # every process builds the same global batches
        steps_in_epoch = data.steps_per_epoch(len(examples), examples_per_step, method="DPO")
        total_steps = data.total_steps(config, steps_in_epoch)
        share = distributed.DataShare(len(examples), examples_per_step, micro_batch=micro_batch, mesh=mesh,
                                      seed=config.seed, shuffle=config.shuffle_dataset, start_step=0,
                                      total_steps=total_steps, whole=True)
    longest = max(map(_longest, examples + ref_examples))  # (the reference's batches: every pair, over processes)
    buckets = data.length_buckets(config.max_length or (longest if share.whole else agreed_max(longest)))
    check_fits((examples if share.whole else []) + (eval_examples if eval_share and eval_share.whole else []))

    if config.precompute_ref_log_probs:  # before the first step donates the model's parameters
        reference = ref_model if ref_model is not None else model
        if ref_model is None and has_adapters(model):  # the base model: the adapters switched off (no copy)
            reference = nnx.merge(nnx.graphdef(model), without_adapters(nnx.state(model, nnx.Param)))
        if ref_share is None:
            examples = precompute_ref_logps(reference, examples, config, mesh=mesh, buckets=buckets,
                                            pad_token_id=pad_id)
        else:  # every process gets every pair's log-probs, computed as one process does; it keeps its own
            compiled = _reference_fn(reference, config, mesh)
            for kept, computed, shared, indices in ((examples, ref_examples, ref_share, share.needed),
                                                    (eval_examples, eval_ref_examples, eval_ref_share,
                                                     eval_share.needed if eval_share else None)):
                if shared is None:
                    continue
                shared.agree(computed, _longest)  # every batch's padded length, up front
                chosen, rejected = shared_ref_logps(compiled, computed, shared, mesh=mesh, buckets=buckets,
                                                    pad_token_id=pad_id)
                kept[:] = [{**e, "ref_chosen_logps": chosen[i], "ref_rejected_logps": rejected[i]}
                           for e, i in zip(kept, indices, strict=True)]
        if eval_examples and eval_ref_share is None:
            eval_examples = precompute_ref_logps(reference, eval_examples, config, mesh=mesh, buckets=buckets,
                                                 pad_token_id=pad_id, batch_size=config.precompute_ref_batch_size
                                                 or config.per_device_eval_batch_size)
    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    check_reference_sync(config, lora=state.frozen is not None, method="DPO")
    ref_params = None if config.precompute_ref_log_probs else reference_params(state, ref_model, mesh)
    if config.sync_ref_model and ref_model is not None:  # the synced reference is our own copy: ref_model stays
        ref_params = jax.tree.map(jnp.copy, ref_params)
    state_sharding = state.shardings(mesh)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding)
    eval_step = make_eval_step(config, mesh=mesh, state_sharding=state_sharding, return_counts=True)
    checkpoints = loop.checkpointer(config, method="dpo", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints,
                                              extra=checkpoint_extra(config, ref_params))
    loop.check_planned_start(share, start_step)  # the data share was prepared from the planned step
    ref_params = resumed_reference(config, ref_params, progress, start_step, method="DPO")  # TR-DPO: saved one
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="dpo", start_step=start_step, config=config.to_dict())
    note_shape = loop.ShapeNotes()
    order = data.step_indices(share.num_examples, examples_per_step, seed=config.seed,
                              shuffle=config.shuffle_dataset, start_step=start_step)
    measure = lambda rows, counted: (max(map(_longest, rows)), sum(map(_num_tokens, counted)))
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
            state, metrics = train_step(state, placed, ref_params)
            done = step + 1
            ref_params = sync_reference(ref_params, state.params, config, step=done)  # TR-DPO, after the step
            log.log(done, {**metrics, "learning_rate": schedule(step), "num_tokens": num_tokens},
                    epoch=done / steps_in_epoch)
            if eval_share and eval_share.num_examples and loop.should_evaluate(config, done, steps_in_epoch):
                log.write({"step": done, **evaluate(eval_step, state, ref_params, eval_examples, config, mesh,
                                                    buckets, pad_id, share=eval_share)})
            if config.save_steps and done % config.save_steps == 0:
                log.sync()  # a checkpoint is written only after its losses were checked finite
                checkpoints.save(done, state, {"num_tokens": num_tokens}, extra=checkpoint_extra(config, ref_params))
        log.flush(total_steps, epoch=total_steps / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))


def eval_batches(examples, share: distributed.EvalShare, buckets, pad_token_id):
    """The eval batches (`collate`d, micro-batch `[1, batch]`) this process feeds, in order: its rows of each global
    batch (`share`), padded to the batch's agreed length; pairs past the end of the set count in no metric."""
    # padding pairs have no completion tokens: they count in no metric
    filler = {k: np.zeros_like(v[:1]) if np.ndim(v) else np.float32(0.0) for k, v in examples[0].items()}
    for index in range(share.num_batches):
        rows, longest = share.batch_rows(index, examples, filler)
        yield collate(rows, accumulation_steps=1, buckets=buckets, pad_token_id=pad_token_id, longest=longest)


def evaluate(eval_step, state, ref_params, examples, config, mesh, buckets, pad_token_id, *,
             share: distributed.EvalShare | None = None) -> dict:
    """Loss and metrics over the whole eval set (TRL's names with an `eval_` prefix): pair metrics averaged over
    pairs, token metrics over their tokens (`eval_step` returns `(sum, count)` pairs: `return_counts=True`).
    `share`: this process's rows of the eval batches (default: every example prepared, all rows its own)."""
    if share is None:
        share = distributed.EvalShare(len(examples), config.per_device_eval_batch_size * batch_divisor(mesh),
                                      mesh=mesh, whole=True)
    totals = None
    for batch in eval_batches(examples, share, buckets, pad_token_id):
        # several processes agreed on every batch's length (`EvalShare.agree`): no shape check per batch
        placed = shard_batch(batch, mesh, batch_axis=1, global_batch=True, check_shapes=share.whole)
        totals = add_metrics(totals, jax.device_get(eval_step(state, placed, ref_params)))
    return {f"eval_{key}": float(value) for key, value in mean_metrics(totals).items()}
