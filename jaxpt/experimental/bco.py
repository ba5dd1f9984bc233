"""BCO, Binary Classifier Optimization (Jung et al. 2024, arXiv:2404.04656): `BCOConfig`, `bco_loss`, data
preparation, `make_train_step`, `train`. Experimental: no stability promise (see `jaxpt.experimental`).

BCO learns from unpaired feedback (`prompt`, `completion`, `label`: thumbs up or down, KTO's format): the implicit
reward `r = β (log π(y|x) - log π_ref(y|x))` is trained as the logit of a binary classifier, desirable completions
towards `r > δ` and undesirable ones towards `r < δ`, where the reward shift δ is the running mean of the rewards.
TRL 1.16 no longer ships BCO (its `BCOTrainer` was removed), so the loss is tested against the paper's formula in
float64; the underlying-distribution-matching weights (an embedding classifier) are not implemented.

```python
config = BCOConfig(output_dir="out", max_steps=100)
result = jaxpt.experimental.bco.train(model, tokenizer, dataset, config)

step = jaxpt.experimental.bco.make_train_step(config)
state, running, metrics = step(state, batch, ref_params, running)   # running: init_running(), the δ statistics
```

Batch layout: `input_ids`, `attention_mask`, `completion_mask` `[accumulation, micro_batch, seq]` and `label`
`[accumulation, micro_batch]` (True: desirable). The reward shift of step t is the mean over steps 1..t of each
step's mean reward (the current step's included, computed in a gradient-free pass before the update; the original
implementation updates it per micro-batch instead), so `batch 8 x accumulation 1 == batch 2 x accumulation 4`.
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
from jaxpt.losses.logprobs import chunked_token_logps, masked_sum, next_token_targets
from jaxpt.losses.metrics import MetricPairs, mean_metrics, sum_and_count, total_metrics
from jaxpt.models import set_gradient_checkpointing
from jaxpt.sharding import batch_divisor, mesh_from_config, put_global, replicated, shard_batch
from jaxpt.train_state import TrainState, jit_step, make_optimizer

logger = logging.getLogger("jaxpt")


@dataclass
class BCOConfig(TrainingConfig):
    """BCO's options (the names TRL's removed `BCOConfig` used)."""

    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate."})
    max_length: int | None = field(default=1024, metadata={"help": "Truncate prompt + completion to this many "
                                                                    "tokens (None: no truncation)."})
    beta: float = field(default=0.1, metadata={"help": "β: scale of the implicit reward; higher keeps the policy "
                                                       "closer to the reference."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes that tokenize the dataset "
                                                                         "(datasets.map num_proc; None: one)."})
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk when computing log-probs "
                                                                   "from hidden states (memory vs speed)."})

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be > 0.")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be >= 2.")
        if self.logits_chunk_size < 1:
            raise ValueError(f"logits_chunk_size={self.logits_chunk_size} must be >= 1.")


# --------------------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------------------


def bco_loss(
    policy_logps: jax.Array,
    ref_logps: jax.Array,
    is_desirable: jax.Array,
    delta: jax.Array | float,
    *,
    beta: float = 0.1,
    example_mask: jax.Array | None = None,
    num_examples: jax.Array | float | None = None,
    return_counts: bool = False,
) -> tuple[jax.Array, dict]:
    """BCO's loss (arXiv:2404.04656, eq. 8 without the distribution-matching weights):

        r = β (policy_logps - ref_logps)
        L = mean_examples [ -log σ(r - δ)  if desirable,   -log σ(-(r - δ))  if undesirable ]

    `policy_logps`, `ref_logps` are per-sequence sums of completion-token log-probs `[batch]`; δ = `delta` the
    reward shift (the running mean of the rewards: `update_running`). `example_mask` drops padding rows;
    `num_examples` normalises (default: this batch's), so micro-batches of one step add up.

    Metrics (TRL's KTO/BCO names): `rewards/chosen`, `rewards/rejected` (mean r over desirable / undesirable
    examples), `logps/chosen`, `logps/rejected`, `delta`; means, or `(sum, count)` pairs with `return_counts`.
    """
    if example_mask is None:
        example_mask = jnp.ones(policy_logps.shape, bool)
    example_mask = example_mask.astype(bool)
    desirable = is_desirable.astype(bool)
    num_examples = jnp.sum(example_mask.astype(jnp.float32)) if num_examples is None else num_examples
    rewards = beta * (policy_logps.astype(jnp.float32) - ref_logps.astype(jnp.float32))
    shifted = rewards - delta
    losses = jnp.where(desirable, -jax.nn.log_sigmoid(shifted), -jax.nn.log_sigmoid(-shifted))
    loss = masked_sum(losses, example_mask) / jnp.maximum(num_examples, 1.0)

    chosen, rejected = example_mask & desirable, example_mask & ~desirable
    rewards = jax.lax.stop_gradient(rewards)
    logps = jax.lax.stop_gradient(policy_logps.astype(jnp.float32))
    metrics: MetricPairs = {
        "rewards/chosen": sum_and_count(rewards, chosen),
        "rewards/rejected": sum_and_count(rewards, rejected),
        "logps/chosen": sum_and_count(logps, chosen),
        "logps/rejected": sum_and_count(logps, rejected),
        "delta": (jnp.asarray(delta, jnp.float32), jnp.float32(1.0)),
    }
    return loss, metrics if return_counts else mean_metrics(metrics)


def init_running() -> dict[str, jax.Array]:
    """The reward-shift statistics before the first step: no step seen, δ = 0."""
    return {"mean": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.float32)}


def update_running(running: dict[str, jax.Array], batch_mean: jax.Array) -> dict[str, jax.Array]:
    """The running mean of the steps' mean rewards, with this step's `batch_mean` included."""
    count = running["count"] + 1.0
    return {"mean": running["mean"] + (batch_mean - running["mean"]) / count, "count": count}


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def prepare_dataset(dataset, tokenizer, config: BCOConfig) -> list[dict]:
    """Tokenize an unpaired preference dataset (`prompt`, `completion`, `label`; standard or conversational) into
    examples `{"input_ids", "completion_mask", "label"}`: standard completions get the EOS token, conversational
    ones the chat template; prompt + completion is cut to `max_length`. Bad data fails here."""
    fmt = data.require_format(dataset, ("unpaired_preference",), method="BCO")
    data.check_chat_template(tokenizer, fmt, method="BCO")
    data.check_rows(dataset, fmt, method="BCO", tokenizer=tokenizer)
    tokenized = data.map_columns(dataset, _tokenize_batch, columns=("prompt", "completion", "label"),
                                 num_proc=config.dataset_num_proc, desc="Tokenizing the BCO dataset",
                                 fn_kwargs={"tokenizer": tokenizer, "conversational": fmt.conversational})
    examples = []
    for index, (ids, prompt_length, label) in enumerate(zip(tokenized["input_ids"].rows(),
                                                            tokenized["prompt_length"].tolist(),
                                                            tokenized["label"].tolist(), strict=True)):
        if prompt_length == len(ids):
            raise ValueError(f"Example {index}: the completion tokenized to no tokens, so there is nothing to score.")
        if config.max_length is not None and prompt_length >= config.max_length:
            raise ValueError(f"Example {index}: the prompt is {prompt_length} tokens, not shorter than "
                             f"max_length={config.max_length}, so no completion token would be scored: raise "
                             "max_length or shorten/filter long prompts.")
        ids = np.asarray(ids[:config.max_length], np.int32)
        mask = (np.arange(len(ids)) >= prompt_length).astype(np.int32)
        examples.append({"input_ids": ids, "completion_mask": mask, "label": bool(label)})
    if not any(e["label"] for e in examples) or all(e["label"] for e in examples):
        raise ValueError("BCO needs both desirable (label True) and undesirable (label False) examples: the reward "
                         "shift is learned between them.")
    return examples


def _tokenize_batch(batch: dict[str, list], *, tokenizer, conversational: bool) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "prompt_length": [], "label": list(batch["label"])}
    for prompt, completion in zip(batch["prompt"], batch["completion"], strict=True):
        ids, prompt_length = data.tokenize_prompt_completion(tokenizer, prompt, completion,
                                                             conversational=conversational)
        out["input_ids"].append(list(ids))
        out["prompt_length"].append(prompt_length)
    return out


def collate(examples: Sequence[dict], *, accumulation_steps: int, buckets: Sequence[int],
            pad_token_id: int = 0) -> dict[str, np.ndarray]:
    """A step's examples -> `input_ids`, `attention_mask`, `completion_mask` `[accumulation_steps, micro_batch,
    length]` (right-padded to the smallest bucket that fits) and `label` `[accumulation_steps, micro_batch]`."""
    length = data.bucket_length(max(len(e["input_ids"]) for e in examples), buckets)
    micro = len(examples) // accumulation_steps
    batch = {
        "input_ids": data.pad_rows([e["input_ids"] for e in examples], length, pad_token_id),
        "attention_mask": data.pad_rows([np.ones(len(e["input_ids"]), np.int32) for e in examples], length, 0),
        "completion_mask": data.pad_rows([e["completion_mask"] for e in examples], length, 0),
    }
    batch = {k: v.reshape(accumulation_steps, micro, length) for k, v in batch.items()}
    batch["label"] = np.asarray([e["label"] for e in examples], bool).reshape(accumulation_steps, micro)
    return batch


# --------------------------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------------------------


def sequence_logps(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, config: BCOConfig) -> jax.Array:
    """Summed completion-token log-probs `[micro_batch]` of one micro-batch (chunked, never full logits)."""
    model = nnx.merge(graphdef, params)
    targets, mask = next_token_targets(batch["input_ids"], batch["completion_mask"] * batch["attention_mask"])
    hidden = model.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"])
    logps = chunked_token_logps(hidden, model.lm_head_weight(), targets, chunk_size=config.logits_chunk_size,
                                logit_softcap=model.final_logit_softcap)
    return jnp.sum(logps * mask, -1)


def _is_example(batch: dict) -> jax.Array:
    return jnp.sum(batch["completion_mask"] * batch["attention_mask"], axis=-1) > 0


def make_train_step(config: BCOConfig, *, mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None):
    """`state, running, metrics = step(state, batch, ref_params, running)`: a gradient-free pass over the
    micro-batches gives the reference log-probs and this step's mean reward (which updates the running reward shift
    δ), then the scanned update. `ref_params` are laid out like `state.params`; `running` is `init_running()` or
    the previous step's. jitted with explicit shardings and the state donated."""

    def step(state: TrainState, batch: dict, ref_params: nnx.State, running: dict):
        reference = jax.lax.stop_gradient(state.full_params(ref_params))
        examples = _is_example(batch)  # [accumulation, micro]
        num_examples = jnp.sum(examples.astype(jnp.float32))

        def reference_pass(_, micro_batch):
            ref = sequence_logps(reference, state.graphdef, micro_batch, config)
            policy = jax.lax.stop_gradient(sequence_logps(state.full_params(), state.graphdef, micro_batch, config))
            return None, (ref, policy)

        _, (ref_logps, policy_logps) = jax.lax.scan(reference_pass, None, batch)
        rewards = config.beta * (policy_logps - ref_logps)
        new_running = update_running(running, masked_sum(rewards, examples) / jnp.maximum(num_examples, 1.0))

        def loss_fn(params, micro_batch, micro_ref_logps):  # params: the full parameters (the base joined)
            logps = sequence_logps(params, state.graphdef, micro_batch, config)
            return bco_loss(logps, micro_ref_logps, micro_batch["label"], new_running["mean"], beta=config.beta,
                            example_mask=_is_example(micro_batch), num_examples=num_examples, return_counts=True)

        grad_fn = lora.value_and_grad(loss_fn, state, seed=config.seed)  # under LoRA: adapters, with dropout

        def micro_step(grads, inputs):
            micro_batch, micro_ref_logps, micro_index = inputs
            (loss, metric_pairs), micro_grads = grad_fn(state.params, micro_batch, micro_ref_logps,
                                                        micro_index=micro_index)
            return jax.tree.map(jnp.add, grads, micro_grads), (loss, metric_pairs)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro_indices = jnp.arange(jax.tree.leaves(batch)[0].shape[0])
        grads, (losses, metric_pairs) = jax.lax.scan(micro_step, zeros, (batch, ref_logps, micro_indices))
        metric_pairs = total_metrics(metric_pairs)
        metrics = mean_metrics(metric_pairs)
        metrics["delta"] = new_running["mean"]
        metrics["loss"] = jnp.sum(losses)
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.apply_gradients(grads), (new_running, metrics)

    # jit_step's steps return (state, metrics): the running statistics travel beside the metrics
    extra = () if mesh is None else (state_sharding.params, replicated(mesh))
    jitted = jit_step(step, mesh=mesh, state_sharding=state_sharding, extra_in_shardings=extra)

    def run(state: TrainState, batch: dict, ref_params: nnx.State, running: dict):
        state, (running, metrics) = jitted(state, batch, ref_params, running)
        return state, running, metrics

    return run


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------


def train(model: nnx.Module, tokenizer, dataset, config: BCOConfig, *, ref_model: nnx.Module | None = None,
          eval_dataset=None) -> loop.TrainResult:
    """Train `model` with BCO on unpaired feedback against `ref_model` (default: a frozen copy of `model`):
    progress bar, `metrics.jsonl`, orbax checkpoints every `save_steps`, and the final model exported in Hugging Face
    format. The running reward shift δ is saved with the checkpoints, so a resumed run continues exactly."""
    config.validate()
    if config.eval_strategy != "no" and eval_dataset is not None:
        raise ValueError(f"eval_strategy={config.eval_strategy!r}: BCO has no evaluation loop yet; use 'no'.")
    loop.prepare_output_dir(config)
    if ref_model is model:
        raise ValueError("ref_model is the policy itself: leave ref_model=None for a frozen copy of the initial model.")
    if getattr(model, "lora_settings", None) is not None and ref_model is None:
        raise ValueError("BCO with LoRA needs an explicit ref_model (the base with adapters off is not wired yet).")
    mesh = mesh_from_config(config)
    examples_per_step = config.per_device_train_batch_size * batch_divisor(mesh) * config.gradient_accumulation_steps
    examples = prepare_dataset(dataset, tokenizer, config)
    distributed.check_same_data(examples, what="BCO examples")
    steps_in_epoch = data.steps_per_epoch(len(examples), examples_per_step, method="BCO")
    total_steps = data.total_steps(config, steps_in_epoch)
    buckets = data.length_buckets(max(len(e["input_ids"]) for e in examples))
    pad_id = data.pad_token_id(tokenizer)
    data.check_model_fits(model, examples, ("input_ids",), method="BCO", length_fields="max_length",
                          extra_ids=(pad_id,))

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    state_sharding = state.shardings(mesh)
    if ref_model is None:
        ref_params = jax.tree.map(jnp.copy, state.params)  # a copy: the step donates state.params
    else:
        ref_params = nnx.state(ref_model, nnx.Param)
        if jax.tree.structure(ref_params) != jax.tree.structure(state.params):
            raise ValueError("ref_model has a different architecture than the policy; BCO computes the reference "
                             "inside the step, so it must match.")
        if mesh is not None:
            ref_params = put_global(ref_params, state_sharding.params)
    train_step = make_train_step(config, mesh=mesh, state_sharding=state_sharding)
    running = init_running()
    if mesh is not None:
        running = put_global(running, replicated(mesh))
    checkpoints = loop.checkpointer(config, method="bco", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints,
                                              extra={"running": running})
    if start_step:  # the running reward shift continues from the checkpoint's
        if progress.get("extra") is None:
            raise ValueError(f"resume_from_checkpoint={config.resume_from_checkpoint!r}: the checkpoint of step "
                             f"{start_step} has no running reward shift (written by an older jaxpt), so the BCO run "
                             "cannot resume exactly; start it over.")
        running = progress["extra"]["running"]
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="bco", start_step=start_step, config=config.to_dict())
    note_shape = loop.ShapeNotes()
    order = data.step_indices(len(examples), examples_per_step, seed=config.seed, shuffle=True,
                              start_step=start_step)
    num_tokens = progress.get("num_tokens", 0)
    try:
        for step in range(start_step, total_steps):
            _, indices = next(order)
            batch = collate([examples[i] for i in indices], accumulation_steps=config.gradient_accumulation_steps,
                            buckets=buckets, pad_token_id=pad_id)
            num_tokens += int(batch["attention_mask"].sum())
            note_shape(batch)
            state, running, metrics = train_step(state, shard_batch(batch, mesh, batch_axis=1, global_batch=True),
                                                 ref_params, running)
            done = step + 1
            log.log(done, {**metrics, "learning_rate": schedule(step), "num_tokens": num_tokens},
                    epoch=done / steps_in_epoch)
            if config.save_steps and done % config.save_steps == 0:
                log.sync()
                checkpoints.save(done, state, {"num_tokens": num_tokens}, extra={"running": running})
        log.flush(total_steps, epoch=total_steps / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return loop.TrainResult(state, log.history, loop.export(state, tokenizer, config))
