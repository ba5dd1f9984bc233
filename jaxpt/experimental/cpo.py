"""CPO, Contrastive Preference Optimization (Xu et al. 2024, arXiv:2401.08417), with its reference-free relatives
SimPO (arXiv:2405.14734) and AlphaPO (arXiv:2501.03884): `CPOConfig`, `cpo_loss`, data preparation,
`make_train_step`, `train`. Experimental: no stability promise (see `jaxpt.experimental`).

CPO drops DPO's reference model: the preference term compares the policy's own log-probabilities of the chosen
and the rejected completion, and a behaviour-cloning term (`cpo_alpha` x the NLL of the chosen completions) keeps
the policy on the preferred data. TRL 1.16 has it as `trl.experimental.cpo.CPOTrainer`; names, defaults,
tokenization and metrics follow it.

```python
config = CPOConfig(output_dir="out", max_steps=100, loss_type="simpo", cpo_alpha=0.0)   # SimPO
result = jaxpt.experimental.cpo.train(model, tokenizer, dataset, config)

step = jaxpt.experimental.cpo.make_train_step(config)
state, metrics = step(state, batch)        # batch: collate(...) arrays [accumulation, micro_batch, 2, seq]
```

Batch layout as `jaxpt.dpo`: each pair is one `[2, seq]` block (row 0 prompt + chosen, row 1 prompt + rejected)
with `input_ids`, `attention_mask` and `completion_mask`, shaped `[accumulation, micro_batch, 2, seq]`, sharded
over `micro_batch`. The step normalises over the whole accumulated batch (the preference term by its pairs, the NLL
by its chosen completion tokens), so `batch 8 x accumulation 1 == batch 2 x accumulation 4`.
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


CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
LENGTH_NORMALISED_LOSS_TYPES = ("ipo", "simpo")  # TRL averages their log-probs over the completion tokens


@dataclass
class CPOConfig(TrainingConfig):
    """TRL 1.16's `CPOConfig` fields that have a meaning here (same names and defaults)."""

    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate (TRL's CPO default)."})
    max_length: int | None = field(default=1024, metadata={"help": "Prompt + completion tokens; completions are cut "
                                                                    "to fit, prompts never (None: 512, as TRL)."})
    beta: float = field(default=0.1, metadata={"help": "β: the preference term's temperature (IPO: the "
                                                       "regularisation τ)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "ε in [0, 0.5): the probability that a preference "
                                                                  "label is flipped (sigmoid and simpo only)."})
    loss_type: str = field(default="sigmoid", metadata={"help": f"One of {CPO_LOSS_TYPES}, or 'alphapo' (sets "
                                                                "loss_type='simpo' and cpo_alpha=0.0)."})
    cpo_alpha: float = field(default=1.0, metadata={"help": "Weight of the behaviour-cloning NLL term (0: SimPO "
                                                            "without it)."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "γ: SimPO's target reward margin (loss_type='simpo' "
                                                              "only)."})
    alpha: float = field(default=0.0, metadata={"help": "AlphaPO's α: rewards r = (1 - p^(-α)) / α of the sequence "
                                                        "probability p for every loss type (0: log p)."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes that tokenize the dataset "
                                                                         "(datasets.map num_proc; None: one)."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk when computing log-probs "
                                                                   "from hidden states (memory vs speed)."})

    def __post_init__(self):
        if self.loss_type == "alphapo":  # TRL's shorthand: SimPO's loss without the NLL term (pair it with alpha)
            self.loss_type, self.cpo_alpha = "simpo", 0.0
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.loss_type not in CPO_LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is not a CPO loss; use one of {CPO_LOSS_TYPES} (or "
                             "'alphapo').")
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be > 0.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5).")
        if self.label_smoothing > 0 and self.loss_type in ("hinge", "ipo"):
            raise ValueError(f"label_smoothing={self.label_smoothing} has no meaning for loss_type="
                             f"{self.loss_type!r} (TRL ignores it there): set label_smoothing=0.0 or use 'sigmoid' / "
                             "'simpo'.")
        if self.cpo_alpha < 0:
            raise ValueError(f"cpo_alpha={self.cpo_alpha} must be >= 0.")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be >= 2.")
        if self.logits_chunk_size < 1:
            raise ValueError(f"logits_chunk_size={self.logits_chunk_size} must be >= 1.")


# --------------------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------------------


def cpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    chosen_token_logps: jax.Array,
    chosen_token_mask: jax.Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    pair_mask: jax.Array | None = None,
    num_pairs: jax.Array | float | None = None,
    num_tokens: jax.Array | float | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, dict]:
    """CPO's loss and its variants (TRL 1.16's definitions):

        L = mean_pairs ℓ(d) + cpo_alpha · NLL,   d = r(y_w) - r(y_l)

    with `s` the completion's summed token log-probs (`chosen_logps`, `rejected_logps` `[batch]`), averaged over its
    `*_lengths` tokens for `ipo` and `simpo`; the reward `r = s` (or AlphaPO's `r = (1 - e^(-α s)) / α` when
    `alpha` ≠ 0); β = `beta`, ε = `label_smoothing`, γ = `simpo_gamma`:

    | loss type | ℓ(d)                                                   | paper                        |
    |-----------|--------------------------------------------------------|------------------------------|
    | `sigmoid` | -(1-ε) log σ(βd) - ε log σ(-βd)                        | CPO, arXiv:2401.08417 eq. 3  |
    | `hinge`   | max(0, 1 - βd)                                         | SLiC, arXiv:2305.10425       |
    | `ipo`     | (d - 1/(2β))²                                          | IPO, arXiv:2310.12036 eq. 17 |
    | `simpo`   | -(1-ε) log σ(βd - γ) - ε log σ(-(βd - γ))              | SimPO, arXiv:2405.14734      |

    NLL is the mean negative log-prob of the `chosen_token_mask` tokens of `chosen_token_logps` `[batch, seq]` (the
    chosen completions). `pair_mask` drops padding pairs; `num_pairs` / `num_tokens` normalise (default: this
    batch's), so micro-batches of one step add up.

    Metrics (TRL's names): `rewards/chosen` (β r(y_w)), `rewards/rejected`, `rewards/accuracies`, `rewards/margins`,
    `logps/chosen`, `logps/rejected` (s, averaged for ipo/simpo), `nll_loss` (0 when `cpo_alpha` = 0, as TRL does
    not compute it then); means, or `(sum, count)` pairs with `return_counts`.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not a CPO loss; use one of {CPO_LOSS_TYPES}.")
    if pair_mask is None:
        pair_mask = jnp.ones(chosen_logps.shape, bool)
    pair_mask = pair_mask.astype(bool)
    chosen_logps, rejected_logps = chosen_logps.astype(jnp.float32), rejected_logps.astype(jnp.float32)
    if loss_type in LENGTH_NORMALISED_LOSS_TYPES:
        chosen_logps = chosen_logps / jnp.maximum(chosen_lengths, 1)
        rejected_logps = rejected_logps / jnp.maximum(rejected_lengths, 1)
    num_pairs = jnp.sum(pair_mask.astype(jnp.float32)) if num_pairs is None else num_pairs
    num_tokens = jnp.sum(chosen_token_mask.astype(jnp.float32)) if num_tokens is None else num_tokens

    if alpha != 0.0:  # AlphaPO: p^(-α) = exp(-α log p)
        chosen_rewards = (1.0 - jnp.exp(-alpha * chosen_logps)) / alpha
        rejected_rewards = (1.0 - jnp.exp(-alpha * rejected_logps)) / alpha
    else:
        chosen_rewards, rejected_rewards = chosen_logps, rejected_logps
    difference = chosen_rewards - rejected_rewards
    if loss_type in ("sigmoid", "simpo"):
        shifted = beta * difference - (simpo_gamma if loss_type == "simpo" else 0.0)
        losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(shifted)
                  - label_smoothing * jax.nn.log_sigmoid(-shifted))
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * difference)
    else:  # ipo
        losses = (difference - 1.0 / (2.0 * beta)) ** 2
    if cpo_alpha != 0.0:
        nll_sum = -masked_sum(chosen_token_logps.astype(jnp.float32), chosen_token_mask)
    else:
        nll_sum = jnp.zeros((), jnp.float32)
    loss = (masked_sum(losses, pair_mask) / jnp.maximum(num_pairs, 1.0)
            + cpo_alpha * nll_sum / jnp.maximum(num_tokens, 1.0))

    chosen_rewards = jax.lax.stop_gradient(beta * chosen_rewards)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_rewards)
    pairs = lambda values: sum_and_count(jax.lax.stop_gradient(values), pair_mask)
    metrics: MetricPairs = {
        "rewards/chosen": pairs(chosen_rewards),
        "rewards/rejected": pairs(rejected_rewards),
        "rewards/accuracies": pairs((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margins": pairs(chosen_rewards - rejected_rewards),
        "logps/chosen": pairs(chosen_logps),
        "logps/rejected": pairs(rejected_logps),
        "nll_loss": (jax.lax.stop_gradient(nll_sum), jnp.sum(chosen_token_mask.astype(jnp.float32))),
    }
    return loss, metrics if return_counts else mean_metrics(metrics)


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def prepare_dataset(dataset, tokenizer, config: CPOConfig) -> list[dict]:
    """Tokenize a TRL-format preference dataset (explicit or implicit prompt, standard or conversational) as TRL's
    CPOTrainer does: conversational rows are rendered to text by the chat template first; the prompt is tokenized
    without special tokens, BOS is prepended and EOS appended when missing, and the completion (never the prompt) is
    cut to `max_length`. Examples: `{"chosen_input_ids", "chosen_completion_mask", "rejected_input_ids",
    "rejected_completion_mask"}` (int32 numpy arrays, 1 on completion tokens). Bad data fails here."""
    fmt = data.require_format(dataset, ("preference", "implicit_preference"), method="CPO")
    data.check_chat_template(tokenizer, fmt, method="CPO")
    data.check_rows(dataset, fmt, method="CPO", tokenizer=tokenizer)
    max_length = config.max_length
    if max_length is None:
        logger.warning("CPO: max_length=None; using %d as TRL does.", DEFAULT_MAX_LENGTH)
        max_length = DEFAULT_MAX_LENGTH
    return data.tokenize_pairs_with_special_tokens(dataset, tokenizer, fmt, max_length=max_length, method="CPO",
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


def _masks(batch: dict) -> tuple[jax.Array, jax.Array]:
    """`(targets, completion_targets)` `[..., 2, seq]`: next-token ids and which of them are completion tokens (the
    log-probs and, for the chosen row, the NLL)."""
    shape = batch["input_ids"].shape
    flat = lambda x: x.reshape(-1, shape[-1])
    targets, completion = next_token_targets(flat(batch["input_ids"]),
                                             flat(batch["completion_mask"] * batch["attention_mask"]))
    return targets.reshape(shape), completion.reshape(shape)


def _counts(batch: dict) -> dict[str, jax.Array]:
    """What a whole step's loss is normalised by: its pairs (a pair without completion tokens is padding) and the
    tokens of its chosen completions (the NLL)."""
    _, completion = _masks(batch)
    return {"pairs": jnp.sum((jnp.sum(completion, axis=(-2, -1)) > 0).astype(jnp.float32)),
            "chosen_tokens": jnp.sum(completion[..., 0, :].astype(jnp.float32))}


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: CPOConfig, totals: dict):
    """Loss of one micro-batch normalised by the whole step's `totals`, and its metrics as `(sum, count)` pairs."""
    model = nnx.merge(graphdef, params)
    shape = batch["input_ids"].shape
    flat = lambda x: x.reshape(-1, shape[-1])
    targets, completion = _masks(batch)
    hidden = model.hidden_states(flat(batch["input_ids"]), attention_mask=flat(batch["attention_mask"]))
    token_logps, stats = chunked_token_logps_and_stats(
        hidden, model.lm_head_weight(), flat(targets), stats=("mean_logits",), chunk_size=config.logits_chunk_size,
        logit_softcap=model.final_logit_softcap)
    token_logps = token_logps.reshape(shape)
    mean_logits = stats["mean_logits"].reshape(shape)
    counts = jnp.sum(completion, -1)  # [micro, 2]
    sequence_logps = jnp.sum(token_logps * completion, -1)
    loss, metrics = cpo_loss(
        sequence_logps[:, 0], sequence_logps[:, 1], counts[:, 0], counts[:, 1], token_logps[:, 0], completion[:, 0],
        beta=config.beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing,
        cpo_alpha=config.cpo_alpha, simpo_gamma=config.simpo_gamma, alpha=config.alpha,
        pair_mask=jnp.sum(counts, -1) > 0, num_pairs=totals["pairs"], num_tokens=totals["chosen_tokens"],
        return_counts=True)
    metrics["logits/chosen"] = sum_and_count(mean_logits[:, 0], completion[:, 0])
    metrics["logits/rejected"] = sum_and_count(mean_logits[:, 1], completion[:, 1])
    return loss, metrics


def make_train_step(config: CPOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None):
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


def make_eval_step(config: CPOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None,
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


def train(model: nnx.Module, tokenizer, dataset, config: CPOConfig, *, eval_dataset=None) -> loop.TrainResult:
    """Train `model` with CPO (or SimPO / AlphaPO) on preference pairs (TRL preference format): progress bar,
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
    distributed.check_same_data(examples, what="CPO examples")
    steps_in_epoch = data.steps_per_epoch(len(examples), examples_per_step, method="CPO")
    total_steps = data.total_steps(config, steps_in_epoch)
    buckets = data.length_buckets(max(max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"]))
                                      for e in examples + (eval_examples or [])))
    pad_id = data.pad_token_id(tokenizer)
    data.check_model_fits(model, examples + (eval_examples or []), ("chosen_input_ids", "rejected_input_ids"),
                          method="CPO", length_fields="max_length", extra_ids=(pad_id,))

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding)
    eval_step = make_eval_step(config, mesh=mesh, state_sharding=state_sharding, return_counts=True)
    checkpoints = loop.checkpointer(config, method="cpo", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints)
    num_tokens = progress.get("num_tokens", 0)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="cpo", start_step=start_step, config=config.to_dict())
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
