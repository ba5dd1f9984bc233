"""BEMA reference for DPO: DPO whose reference model follows a Bias-Corrected Exponential Moving Average of the policy
(Block & Zhang 2025, arXiv:2508.00180): `BEMAConfig`, the pure BEMA update (`bema_init`, `bema_update`) and
`train`. Experimental: no stability promise (see `jaxpt.experimental`).

BEMA tracks, from a snapshot θ₀ of the weights, an EMA and a bias correction:

    β_t = max((ρ + γ t)^(-κ), min_ema_multiplier)       α_t = (ρ + γ t)^(-η)
    EMA_t = (1 - β_t) EMA_{t-1} + β_t θ_t               θ'_t = EMA_t + α_t (θ_t - θ₀)

with ρ = `lag`, γ = `multiplier`, κ = `ema_power`, η = `bias_power`, updated every `update_freq` steps after
`update_after` (at step `update_after` itself θ₀ and the EMA restart from the current weights). With
`update_ref_model`, DPO's reference parameters become θ' every `ref_model_update_freq` steps after
`ref_model_update_after`: a lagged, smoothed policy instead of the frozen initial one. TRL 1.16 has it as
`trl.experimental.bema_for_ref_model` (a `BEMACallback` on a `DPOTrainer`); the names, defaults (but
`update_ref_model`, True here: the reference is this method's point) and the step arithmetic follow it.

BEMA extends `jaxpt.dpo` (config, data, step): the step takes the reference parameters as an argument, so the loop
passes θ' in their place. Precomputed reference log-probs cannot follow a moving reference, LoRA is not supported
yet (TRL moves the base weights under the adapters). The BEMA buffers and the current reference are saved with
the checkpoints, so a resumed run continues exactly.

```python
config = BEMAConfig(output_dir="out", max_steps=1000, ref_model_update_freq=100, update_freq=100)
result = jaxpt.experimental.bema.train(model, tokenizer, dataset, config)   # result.bema_params: θ' at the end
```
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpt import data, distributed, dpo, loop
from jaxpt.logging import MetricsLogger
from jaxpt.models import set_gradient_checkpointing
from jaxpt.sharding import batch_divisor, mesh_from_config, shard_batch
from jaxpt.train_state import TrainState, make_optimizer

logger = logging.getLogger("jaxpt")


@dataclass
class BEMAConfig(dpo.DPOConfig):
    """`jaxpt.dpo.DPOConfig` plus TRL 1.16's `BEMACallback` arguments (same names and defaults, but
    `update_ref_model`)."""

    update_freq: int = field(default=400, metadata={"help": "φ: update the BEMA weights every this many steps."})
    ema_power: float = field(default=0.5, metadata={"help": "κ: power of the EMA decay β_t (0: no EMA)."})
    bias_power: float = field(default=0.2, metadata={"help": "η: power of the bias-correction scale α_t (large: no "
                                                             "correction; 0: α_t = 1)."})
    lag: int = field(default=10, metadata={"help": "ρ: virtual starting age of the decay schedules."})
    update_after: int = field(default=0, metadata={"help": "τ: burn-in steps before BEMA starts (θ₀ is taken "
                                                           "then)."})
    multiplier: float = field(default=1.0, metadata={"help": "γ: steps count γ t in the decay schedules."})
    min_ema_multiplier: float = field(default=0.0, metadata={"help": "Lower bound of the EMA decay β_t."})
    update_ref_model: bool = field(default=True, metadata={"help": "Replace DPO's reference by the BEMA weights "
                                                                   "(TRL's callback defaults to False)."})
    ref_model_update_freq: int = field(default=400, metadata={"help": "Replace the reference every this many "
                                                                      "steps."})
    ref_model_update_after: int = field(default=0, metadata={"help": "Steps before the reference is first "
                                                                     "replaced."})

    def validate(self) -> None:
        super().validate()
        for name in ("update_freq", "ref_model_update_freq", "lag"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        for name in ("update_after", "ref_model_update_after", "ema_power", "bias_power", "min_ema_multiplier"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        if self.multiplier <= 0:
            raise ValueError(f"multiplier={self.multiplier} must be > 0.")
        if self.update_ref_model and self.precompute_ref_log_probs:
            raise ValueError("precompute_ref_log_probs=True computes the reference log-probs once, but "
                             "update_ref_model=True moves the reference during training: set one of them to false.")


# --------------------------------------------------------------------------------------------------------------
# BEMA
# --------------------------------------------------------------------------------------------------------------


class BEMAState(NamedTuple):
    """θ₀ (the snapshot), the EMA, and θ' (the BEMA weights), each a pytree like the parameters."""

    theta0: nnx.State
    ema: nnx.State
    bema: nnx.State


def bema_init(params: nnx.State) -> BEMAState:
    """BEMA before any update: θ₀ = EMA = θ' = copies of `params`."""
    copy = lambda: jax.tree.map(jnp.copy, params)
    return BEMAState(copy(), copy(), copy())


def ema_beta(step: int, config: BEMAConfig) -> float:
    """β_t = max((ρ + γ t)^(-κ), min_ema_multiplier)."""
    return max((config.lag + config.multiplier * step) ** (-config.ema_power), config.min_ema_multiplier)


def bema_alpha(step: int, config: BEMAConfig) -> float:
    """α_t = (ρ + γ t)^(-η)."""
    return (config.lag + config.multiplier * step) ** (-config.bias_power)


@jax.jit
def _restart(params, state: BEMAState) -> BEMAState:
    return BEMAState(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, params), state.bema)


@jax.jit
def _update(params, state: BEMAState, beta, alpha) -> BEMAState:
    ema = jax.tree.map(lambda e, p: (1.0 - beta) * e + beta * p, state.ema, params)
    bema = jax.tree.map(lambda e, p, p0: e + alpha * (p - p0), ema, params, state.theta0)
    return BEMAState(state.theta0, ema, bema)


def bema_update(state: BEMAState, params: nnx.State, step: int, config: BEMAConfig) -> BEMAState:
    """BEMA after optimizer step `step` (1, 2, ...; TRL's `global_step` at `on_step_end`): nothing before
    `update_after`; at `update_after` θ₀ and the EMA restart from `params`; then, every `update_freq` steps, the EMA
    and θ' update with β_`step` and α_`step`. Pure: returns the new state (its arrays may alias the old one's)."""
    if step < config.update_after:
        return state
    if step == config.update_after:
        return _restart(params, state)
    if (step - config.update_after) % config.update_freq == 0:
        return _update(params, state, jnp.float32(ema_beta(step, config)), jnp.float32(bema_alpha(step, config)))
    return state


def checkpoint_extra(bema: BEMAState, ref_params: nnx.State | None) -> dict:
    """What a checkpoint saves beside the train state: the BEMA buffers and the reference (when not precomputed),
    which has been θ' of the last replacing step."""
    extra = {"theta0": bema.theta0, "ema": bema.ema, "bema": bema.bema}
    return extra if ref_params is None else {**extra, "reference": ref_params}


def replaces_reference(step: int, config: BEMAConfig) -> bool:
    """Whether the reference becomes θ' after optimizer step `step`."""
    return (config.update_ref_model and step >= config.ref_model_update_after
            and (step - config.ref_model_update_after) % config.ref_model_update_freq == 0)


# --------------------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------------------


@dataclass
class BEMAResult(loop.TrainResult):
    bema_params: nnx.State | None = None  # θ' at the end of training


def train(model: nnx.Module, tokenizer, dataset, config: BEMAConfig, *, eval_dataset=None) -> BEMAResult:
    """DPO (`jaxpt.dpo`: data, step, metrics) with the BEMA reference: the reference starts as a frozen copy of
    `model` and becomes the BEMA weights on `ref_model_update_freq` steps. Logs `metrics.jsonl` like `jaxpt.dpo`,
    evaluates, checkpoints and exports the trained policy; the BEMA weights come back as `bema_params`."""
    config.validate()
    loop.prepare_output_dir(config)
    if getattr(model, "lora_settings", None) is not None:
        raise ValueError("BEMA with LoRA is not supported: the BEMA reference would have to move the base weights "
                         "under the adapters. Train without --use_peft.")
    mesh = mesh_from_config(config)
    examples_per_step = config.per_device_train_batch_size * batch_divisor(mesh) * config.gradient_accumulation_steps
    examples = dpo.prepare_dataset(dataset, tokenizer, config)
    eval_examples = None
    if eval_dataset is not None and config.eval_strategy != "no":
        eval_examples = dpo.prepare_dataset(eval_dataset, tokenizer, config)
    distributed.check_same_data(examples, what="BEMA DPO examples")
    steps_in_epoch = data.steps_per_epoch(len(examples), examples_per_step, method="BEMA DPO")
    total_steps = data.total_steps(config, steps_in_epoch)
    buckets = data.length_buckets(config.max_length or max(
        max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in examples))
    pad_id = data.pad_token_id(tokenizer)
    data.check_model_fits(model, examples + (eval_examples or []), ("chosen_input_ids", "rejected_input_ids"),
                          method="BEMA DPO", length_fields="max_length", extra_ids=(pad_id,))
    if config.precompute_ref_log_probs:  # a fixed reference (update_ref_model=False): BEMA weights only
        examples = dpo.precompute_ref_logps(model, examples, config, mesh=mesh, buckets=buckets, pad_token_id=pad_id)
        if eval_examples:
            eval_examples = dpo.precompute_ref_logps(model, eval_examples, config, mesh=mesh, buckets=buckets,
                                                     pad_token_id=pad_id)

    tx, schedule = make_optimizer(config, total_steps)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    state = TrainState.create(model, tx, mesh=mesh)
    ref_params = None if config.precompute_ref_log_probs else dpo.reference_params(state, None, mesh)
    bema = bema_init(state.params)
    state_sharding = state.shardings(mesh)
    train_step = dpo.make_train_step(config, mesh=mesh, state_sharding=state_sharding)
    eval_step = dpo.make_eval_step(config, mesh=mesh, state_sharding=state_sharding, return_counts=True)
    checkpoints = loop.checkpointer(config, method="bema", model=model)
    state, start_step, progress = loop.resume(config, state, state_sharding, checkpoints,
                                              extra=checkpoint_extra(bema, ref_params))
    if start_step:  # the BEMA buffers and the reference continue from the checkpoint's
        saved = progress.get("extra")
        if saved is None:
            raise ValueError(f"resume_from_checkpoint={config.resume_from_checkpoint!r}: the checkpoint of step "
                             f"{start_step} has no BEMA buffers (written by an older jaxpt), so the BEMA run cannot "
                             "resume exactly; start it over.")
        bema = BEMAState(saved["theta0"], saved["ema"], saved["bema"])
        ref_params = saved.get("reference", ref_params)
    log = MetricsLogger(config.output_dir, logging_steps=config.logging_steps, total_steps=total_steps,
                        report_to=config.report_to, run_name=config.run_name, disable_tqdm=config.disable_tqdm,
                        description="bema", start_step=start_step, config=config.to_dict())
    note_shape = loop.ShapeNotes()
    order = data.step_indices(len(examples), examples_per_step, seed=config.seed, shuffle=config.shuffle_dataset,
                              start_step=start_step)
    num_tokens = progress.get("num_tokens", 0)
    try:
        for step in range(start_step, total_steps):
            _, indices = next(order)
            batch = dpo.collate([examples[i] for i in indices], accumulation_steps=config.gradient_accumulation_steps,
                                buckets=buckets, pad_token_id=pad_id)
            num_tokens += int(batch["attention_mask"].sum())
            note_shape(batch)
            state, metrics = train_step(state, shard_batch(batch, mesh, batch_axis=1, global_batch=True), ref_params)
            done = step + 1
            bema = bema_update(bema, state.params, done, config)
            if replaces_reference(done, config):
                ref_params = jax.tree.map(jnp.copy, bema.bema)  # the step donates nothing of it, but BEMA moves on
            log.log(done, {**metrics, "learning_rate": schedule(step), "num_tokens": num_tokens},
                    epoch=done / steps_in_epoch)
            if eval_examples and loop.should_evaluate(config, done, steps_in_epoch):
                log.write({"step": done, **dpo.evaluate(eval_step, state, ref_params, eval_examples, config, mesh,
                                                        buckets, pad_id)})
            if config.save_steps and done % config.save_steps == 0:
                log.sync()
                checkpoints.save(done, state, {"num_tokens": num_tokens}, extra=checkpoint_extra(bema, ref_params))
        log.flush(total_steps, epoch=total_steps / steps_in_epoch)
    finally:
        log.close()
        checkpoints.close()
    return BEMAResult(state, log.history, loop.export(state, tokenizer, config), bema_params=bema.bema)
