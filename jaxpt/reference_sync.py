"""Reference-model synchronisation (TR-DPO, Gorbatovski et al. 2024, arXiv:2404.09656), shared by DPO, GRPO, RLOO.

With `sync_ref_model=True` the reference is a separate, frozen copy of parameters that moves toward the policy
every `ref_model_sync_steps` optimizer steps (after the step, as TRL's `SyncRefModelCallback`):

    ref <- alpha * policy + (1 - alpha) * ref          (alpha = ref_model_mixup_alpha; 1: hard update)

computed per parameter in the reference's dtype. The reference is never trained: only this update moves it.
Each method declares the three fields in its own config (TRL's names and defaults: False, 0.6, 512) and calls
`check_reference_sync` up front and `sync_reference` after each step. The moving reference is saved with every
checkpoint (`checkpoint_extra`, the `extra` item of `jaxpt.checkpoint`) and restored on resume
(`resumed_reference`), so a resumed run continues exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_reference_sync(config, *, lora: bool, method: str) -> None:
    """Fail early on a reference synchronisation that cannot run: bad alpha or period, LoRA (the reference is
    the base with the adapters off, no separate copy to move; as TRL with PEFT), or precomputed reference
    log-probs (a fixed reference)."""
    if not config.sync_ref_model:
        return
    if not 0.0 <= config.ref_model_mixup_alpha <= 1.0:
        raise ValueError(f"ref_model_mixup_alpha={config.ref_model_mixup_alpha} must be in [0, 1] (the policy's "
                         "share in ref <- alpha * policy + (1 - alpha) * ref).")
    if config.ref_model_sync_steps < 1:
        raise ValueError(f"ref_model_sync_steps={config.ref_model_sync_steps} must be >= 1.")
    if lora:
        raise ValueError(f"{method}: sync_ref_model=True is not supported with LoRA (use_peft): the reference is the "
                         "base model with the adapters switched off, not a separate copy that could be updated. "
                         "Train without LoRA, or set sync_ref_model=False.")
    if getattr(config, "precompute_ref_log_probs", False):
        raise ValueError(f"{method}: sync_ref_model=True cannot be combined with precompute_ref_log_probs=True: the "
                         "precomputed log-probs assume a fixed reference. Set one of them to False.")


def _mix(reference, params, alpha):
    alpha = jnp.asarray(alpha, jnp.float32)

    def mix(ref, policy):
        ref32, policy32 = ref.astype(jnp.float32), policy.astype(jnp.float32)
        return ((1.0 - alpha) * ref32 + alpha * policy32).astype(ref.dtype)

    return jax.tree.map(mix, reference, params)


def mix_reference(reference, params, alpha: float):
    """`alpha * params + (1 - alpha) * reference`, leaf by leaf in the reference's dtype and sharding (the
    reference's buffers are donated: the result replaces them)."""
    shardings = jax.tree.map(lambda leaf: leaf.sharding, reference)
    return jax.jit(_mix, donate_argnums=0, out_shardings=shardings)(reference, params, alpha)


def sync_reference(reference, params, config, *, step: int):
    """The reference after optimizer step `step` (1-based): mixed with `params` when `sync_ref_model` and `step` is
    a multiple of `ref_model_sync_steps`, else unchanged."""
    if not config.sync_ref_model or step % config.ref_model_sync_steps:
        return reference
    return mix_reference(reference, params, config.ref_model_mixup_alpha)


def checkpoint_extra(config, reference) -> dict | None:
    """What a checkpoint saves beside the train state: the synced reference (`{"reference": ...}`), or None
    without `sync_ref_model` (the reference is then the initial one, rebuilt on resume) or without a reference
    (None: e.g. GRPO with beta=0)."""
    return {"reference": reference} if config.sync_ref_model and reference is not None else None


def resumed_reference(config, reference, progress: dict, start_step: int, *, method: str):
    """The reference to continue from after `loop.resume(..., extra=checkpoint_extra(config, reference))`: the
    checkpoint's synced reference; the initial `reference` for a fresh run, or a checkpoint from before the first
    synchronisation written without one. A checkpoint without a reference after a synchronisation fails."""
    saved = (progress.get("extra") or {}).get("reference")
    if not config.sync_ref_model or start_step == 0:
        return reference
    if saved is not None:
        return saved
    check_resume(config, start_step, method=method)  # no reference saved: only before the first sync is exact
    return reference


def check_resume(config, start_step: int, *, method: str) -> None:
    """For a checkpoint without the synced reference (a method that does not save it, or a checkpoint written
    without sync_ref_model): resuming after the first synchronisation would silently train against the initial
    reference, so it fails instead."""
    if config.sync_ref_model and start_step >= config.ref_model_sync_steps:
        raise ValueError(f"{method}: resuming at step {start_step} with sync_ref_model=True needs the reference "
                         f"synchronised every {config.ref_model_sync_steps} steps, but the checkpoint does not hold "
                         "it (written without sync_ref_model, or by a method that does not save it). Restart the "
                         "run, or resume with sync_ref_model=False.")
