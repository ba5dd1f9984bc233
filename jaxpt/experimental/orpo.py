"""ORPO, Odds Ratio Preference Optimization (Hong et al. 2024, arXiv:2403.07691): `ORPOConfig`, `orpo_loss`, data
preparation, `make_train_step`, `train`. Experimental: no stability promise (see `jaxpt.experimental`).

ORPO needs no reference model: one loss both fine-tunes on the chosen completions (the NLL term) and pushes the
odds of the chosen completion above those of the rejected one (the odds-ratio term, weighted by `beta`, the
paper's λ). TRL 1.16 has it as `trl.experimental.orpo.ORPOTrainer`; names, defaults, tokenization and metrics follow
it.

```python
config = ORPOConfig(output_dir="out", max_steps=100)
result = jaxpt.experimental.orpo.train(model, tokenizer, dataset, config)   # batteries included

step = jaxpt.experimental.orpo.make_train_step(config)                     # or your own loop
state, metrics = step(state, batch)        # batch: collate(...) arrays [accumulation, micro_batch, 2, seq]
```

Batch layout as `jaxpt.dpo`: each pair is one `[2, seq]` block (row 0 prompt + chosen, row 1 prompt + rejected)
with `input_ids`, `attention_mask` and `completion_mask`, shaped `[accumulation, micro_batch, 2, seq]`, sharded
over `micro_batch`. The step normalises over the whole accumulated batch (the NLL by its chosen tokens, the
odds-ratio term by its pairs), so `batch 8 x accumulation 1 == batch 2 x accumulation 4`.
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
from jaxpt.losses.logprobs import chunked_token_logps_and_stats, masked_sum, next_token_targets
from jaxpt.losses.metrics import MetricPairs, add_metrics, mean_metrics, sum_and_count, total_metrics
from jaxpt.models import set_gradient_checkpointing
from jaxpt.sharding import batch_divisor, mesh_from_config, shard_batch
from jaxpt.train_state import TrainState, jit_step, make_optimizer

logger = logging.getLogger("jaxpt")

DEFAULT_MAX_LENGTH = 512  # what TRL uses (with a warning) when max_length is None


@dataclass
class ORPOConfig(TrainingConfig):
    """TRL 1.16's `ORPOConfig` fields that have a meaning here (same names and defaults)."""

    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate (TRL's ORPO default)."})
    max_length: int | None = field(default=1024, metadata={"help": "Prompt + completion tokens; completions are cut "
                                                                    "to fit, prompts never (None: 512, as TRL)."})
    beta: float = field(default=0.1, metadata={"help": "λ of the paper: weight of the odds-ratio term against the "
                                                       "NLL of the chosen completions."})
    padding_value: int | None = field(default=None, metadata={"help": "Token id to pad with (None: the tokenizer's "
                                                                       "pad token)."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes that tokenize the dataset "
                                                                         "(datasets.map num_proc; None: one)."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk when computing log-probs "
                                                                   "from hidden states (memory vs speed)."})

    def validate(self) -> None:
        super().validate()
        if self.beta < 0:
            raise ValueError(f"beta={self.beta} must be >= 0 (the weight λ of the odds-ratio term; 0: plain SFT on "
                             "the chosen completions).")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be >= 2.")
        if self.padding_value is not None and self.padding_value < 0:
            raise ValueError(f"padding_value={self.padding_value} must be a token id (>= 0), or None.")
        if self.logits_chunk_size < 1:
            raise ValueError(f"logits_chunk_size={self.logits_chunk_size} must be >= 1.")


# --------------------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------------------


def log1mexp(x: jax.Array) -> jax.Array:
    """`log(1 - exp(x))` for `x <= 0`, without cancellation: the two forms switch at `x = -log 2`."""
    switch = -0.6931471805599453
    near_zero = jnp.minimum(x, switch)  # each branch sees only inputs it is accurate (and finite) on
    far = jnp.maximum(x, switch)
    return jnp.where(x < switch, jnp.log1p(-jnp.exp(near_zero)), jnp.log(-jnp.expm1(far)))


def orpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    chosen_token_logps: jax.Array,
    chosen_token_mask: jax.Array,
    *,
    beta: float = 0.1,
    pair_mask: jax.Array | None = None,
    num_pairs: jax.Array | float | None = None,
    num_tokens: jax.Array | float | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, dict]:
    """ORPO's loss (arXiv:2403.07691, eqs. 4-7):

        L = L_SFT + β L_OR
        L_SFT = -(1/N) Σ log p(t)                   over the N tokens of the chosen sequences
        L_OR  = -mean_pairs log σ(log odds(y_w) - log odds(y_l)),   log odds(y) = log p(y) - log(1 - p(y))

    where `log p(y)` is the completion's mean token log-probability (`chosen_logps`, `rejected_logps` `[batch]`).
    `chosen_token_logps` / `chosen_token_mask` `[batch, seq]` are the per-token log-probs of the chosen sequences
    and the tokens the NLL covers (TRL: the whole prompt + completion). `pair_mask` drops padding pairs;
    `num_pairs` / `num_tokens` normalise (default: this batch's), so micro-batches of one step add up.

    Metrics (TRL's names): `rewards/chosen` (β log p(y_w)), `rewards/rejected`, `rewards/accuracies`,
    `rewards/margins`, `logps/chosen`, `logps/rejected`, `nll_loss` (L_SFT), `log_odds_ratio` (mean log σ(...)),
    `log_odds_chosen` (mean log-odds difference); means, or `(sum, count)` pairs with `return_counts`.
    """
    if pair_mask is None:
        pair_mask = jnp.ones(chosen_logps.shape, bool)
    pair_mask = pair_mask.astype(bool)
    # a padding pair has no completion token (log p = 0, log(1 - p) = -inf): give it a harmless value
    chosen_logps = jnp.where(pair_mask, chosen_logps.astype(jnp.float32), -1.0)
    rejected_logps = jnp.where(pair_mask, rejected_logps.astype(jnp.float32), -1.0)
    num_pairs = jnp.sum(pair_mask.astype(jnp.float32)) if num_pairs is None else num_pairs
    num_tokens = jnp.sum(chosen_token_mask.astype(jnp.float32)) if num_tokens is None else num_tokens

    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
    log_odds_ratio = jax.nn.log_sigmoid(log_odds)
    nll_sum = -masked_sum(chosen_token_logps.astype(jnp.float32), chosen_token_mask)
    loss = nll_sum / jnp.maximum(num_tokens, 1.0) - beta * masked_sum(log_odds_ratio, pair_mask) / jnp.maximum(
        num_pairs, 1.0)

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
        "nll_loss": (jax.lax.stop_gradient(nll_sum), jnp.sum(chosen_token_mask.astype(jnp.float32))),
        "log_odds_ratio": pairs(log_odds_ratio),
        "log_odds_chosen": pairs(log_odds),
    }
    return loss, metrics if return_counts else mean_metrics(metrics)


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def prepare_dataset(dataset, tokenizer, config: ORPOConfig) -> list[dict]:
    """Tokenize a TRL-format preference dataset (explicit or implicit prompt, standard or conversational) as TRL's
    ORPOTrainer does: conversational rows are rendered to text by the chat template first; the prompt is tokenized
    without special tokens, BOS is prepended and EOS appended when missing, and the completion (never the prompt) is
    cut to `max_length`. Examples: `{"chosen_input_ids", "chosen_completion_mask", "rejected_input_ids",
    "rejected_completion_mask"}` (int32 numpy arrays, 1 on completion tokens). Bad data fails here."""
    fmt = data.require_format(dataset, ("preference", "implicit_preference"), method="ORPO")
    data.check_chat_template(tokenizer, fmt, method="ORPO")
    data.check_rows(dataset, fmt, method="ORPO", tokenizer=tokenizer)
    max_length = config.max_length
    if max_length is None:
        logger.warning("ORPO: max_length=None; using %d as TRL does.", DEFAULT_MAX_LENGTH)
        max_length = DEFAULT_MAX_LENGTH
    return data.tokenize_pairs_with_special_tokens(dataset, tokenizer, fmt, max_length=max_length, method="ORPO",
                                                  num_proc=config.dataset_num_proc)


def collate(examples: Sequence[dict], *, accumulation_steps: int, buckets: Sequence[int],
            pad_token_id: int = 0) -> dict[str, np.ndarray]:
    """A step's pairs -> `input_ids`, `attention_mask`, `completion_mask` `[accumulation_steps, micro_batch, 2,
    length]` (row 0 chosen, row 1 rejected), right-padded to the smallest length bucket that fits
    (`data.collate_pairs`)."""
    return data.collate_pairs(examples, accumulation_steps=accumulation_steps, buckets=buckets,
                              pad_token_id=pad_token_id)


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def _masks(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(targets, completion_targets, sequence_targets)` `[..., 2, seq]`: next-token ids, which of them are
    completion tokens (the log-probs), and which are real tokens at all (the NLL: prompt and completion)."""
    shape = batch["input_ids"].shape
    flat = lambda x: x.reshape(-1, shape[-1])
    targets, completion = next_token_targets(flat(batch["input_ids"]),
                                             flat(batch["completion_mask"] * batch["attention_mask"]))
    _, sequence = next_token_targets(flat(batch["input_ids"]), flat(batch["attention_mask"]))
    return targets.reshape(shape), completion.reshape(shape), sequence.reshape(shape)


def _counts(batch: dict) -> dict[str, jax.Array]:
    """What a whole step's loss is normalised by: its pairs (a pair without completion tokens is padding) and the
    tokens of its chosen sequences (the NLL)."""
    _, completion, sequence = _masks(batch)
    return {"pairs": jnp.sum((jnp.sum(completion, axis=(-2, -1)) > 0).astype(jnp.float32)),
            "chosen_tokens": jnp.sum(sequence[..., 0, :].astype(jnp.float32))}


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: ORPOConfig, totals: dict):
    """Loss of one micro-batch normalised by the whole step's `totals`, and its metrics as `(sum, count)` pairs."""
    model = nnx.merge(graphdef, params)
    shape = batch["input_ids"].shape
    flat = lambda x: x.reshape(-1, shape[-1])
    targets, completion, sequence = _masks(batch)
    hidden = model.hidden_states(flat(batch["input_ids"]), attention_mask=flat(batch["attention_mask"]))
    token_logps, stats = chunked_token_logps_and_stats(
        hidden, model.lm_head_weight(), flat(targets), stats=("mean_logits",), chunk_size=config.logits_chunk_size,
        logit_softcap=model.final_logit_softcap)
    token_logps = token_logps.reshape(shape)
    mean_logits = stats["mean_logits"].reshape(shape)
    counts = jnp.sum(completion, -1)  # [micro, 2]
    sequence_logps = jnp.sum(token_logps * completion, -1) / jnp.maximum(counts, 1)  # TRL: the mean token log-prob
    loss, metrics = orpo_loss(sequence_logps[:, 0], sequence_logps[:, 1], token_logps[:, 0], sequence[:, 0],
                              beta=config.beta, pair_mask=jnp.sum(counts, -1) > 0, num_pairs=totals["pairs"],
                              num_tokens=totals["chosen_tokens"], return_counts=True)
    metrics["logits/chosen"] = sum_and_count(mean_logits[:, 0], completion[:, 0])
    metrics["logits/rejected"] = sum_and_count(mean_logits[:, 1], completion[:, 1])
    return loss, metrics


def make_train_step(config: ORPOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None):
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


def make_eval_step(config: ORPOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None,
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


def train(model: nnx.Module, tokenizer, dataset, config: ORPOConfig, *, eval_dataset=None) -> loop.TrainResult:
    """Train `model` with ORPO on preference pairs (TRL preference format): progress bar, `metrics.jsonl` with
    TRL's metric names, evaluation, orbax checkpoints every `save_steps`, exact resume, and the final model exported
    in Hugging Face format."""
    config.validate()
    loop.prepare_output_dir(config)
    mesh = mesh_from_config(config)
    examples_per_step = config.per_device_train_batch_size * batch_divisor(mesh) * config.gradient_accumulation_steps
    examples = prepare_dataset(dataset, tokenizer, config)
    eval_examples = None
    if eval_dataset is not None and config.eval_strategy != "no":
        eval_examples = prepare_dataset(eval_dataset, tokenizer, config)
    distributed.check_same_data(examples, what="ORPO examples")
    steps_in_epoch = data.steps_per_epoch(len(examples), examples_per_step, method="ORPO")
    total_steps = data.total_steps(config, steps_in_epoch)
    buckets = data.length_buckets(max(max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"]))
                                      for e in examples + (eval_examples or [])))
    pad_id = config.padding_value if config.padding_value is not None else data.pad_token_id(tokenizer)
    data.check_model_fits(model, examples + (eval_examples or []), ("chosen_input_ids", "rejected_input_ids"),
                          method="ORPO", length_fields="max_length", extra_ids=(pad_id,))

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding)
    eval_step = make_eval_step(config, mesh=mesh, state_sharding=state_sharding, return_counts=True)
    checkpoints = loop.checkpointer(config, method="orpo", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints)
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="orpo", start_step=start_step, config=config.to_dict())
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
