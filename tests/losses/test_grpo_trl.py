"""GRPO loss parity with TRL 1.16's own `GRPOTrainer._compute_loss`, run on fixed per-token log-probs.

TRL's method is driven without a model: a bare `GRPOTrainer` (no `__init__`) gets the attributes `_compute_loss`
reads, and `_get_per_token_logps_and_entropies` returns our fixed float64 log-probs as a leaf tensor, so torch
autograd gives TRL's gradient with respect to them. jaxpt's `grpo_loss` runs on the same arrays under float64.
One micro-batch (steps_per_generation = gradient accumulation = 1): jaxpt normalises accumulation like one big
batch on purpose (README "How jaxpt differs"), which equals TRL only for a single micro-batch.
"""

import collections
import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import trl  # a test dependency: parity must fail, never skip, without it
from accelerate import Accelerator

from jaxpt.losses.grpo import grpo_loss, high_entropy_mask

BATCH, LENGTH, MAX_COMPLETION_LENGTH = 6, 7, 9  # dr_grpo divides by max_completion_length, not the padded length
LENGTHS = np.array([7, 5, 1, 3, 6, 2])
METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
# TRL also logs the min / max over sequences of the per-sequence clip fractions; jaxpt's steps accumulate
# metrics as sums over micro-batches and do not log these two.
NOT_IN_JAXPT = {"clip_ratio/low_min", "clip_ratio/high_max", "entropy"}  # entropy: logged by jaxpt.grpo's step


def fixed_inputs(seed=15):
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(0.05, 3.0, (BATCH, LENGTH))
    # Per-token noise plus a per-sequence shift, so that both token- and sequence-level ratios leave the
    # clipping range on both sides.
    old_logps = logps + rng.normal(0.0, 0.3, (BATCH, LENGTH)) + rng.normal(0.0, 0.3, (BATCH, 1))
    ref_logps = logps + rng.normal(0.0, 0.5, (BATCH, LENGTH))
    advantages = np.array([1.3, -0.7, 0.4, -1.1, 0.9, -0.2])
    mask = (np.arange(LENGTH)[None, :] < LENGTHS[:, None]).astype(np.int64)
    entropies = rng.uniform(0.0, 2.0, (BATCH, LENGTH))
    # Sampler-correction weights (TRL's vLLM importance-sampling ratios), with masked-out (0) and truncated ones.
    token_weights = np.minimum(rng.uniform(0.3, 3.5, (BATCH, LENGTH)), 3.0) * (rng.uniform(size=(BATCH, LENGTH)) > 0.2)
    sequence_weights = np.array([[1.2], [0.0], [0.7], [2.9], [0.0], [1.05]])
    return dict(logps=logps, old_logps=old_logps, ref_logps=ref_logps, advantages=advantages, mask=mask,
                entropies=entropies, sampler_weights={"token": token_weights, "sequence": sequence_weights})


ACCELERATOR = Accelerator(cpu=True)


def trl_grpo(inputs, *, loss_type, level, beta, bias_correction, epsilon, epsilon_high, delta, top_entropy_quantile,
             on_policy, sampler_correction):
    """TRL's `_compute_loss` on `inputs`: (loss, d loss / d logps, logged metrics)."""
    trainer = object.__new__(trl.GRPOTrainer)
    trainer.args = types.SimpleNamespace(use_bias_correction_kl=bias_correction, delta=delta, steps_per_generation=1)
    trainer.model = types.SimpleNamespace(training=True)
    trainer.accelerator = ACCELERATOR
    trainer.current_gradient_accumulation_steps = 1
    trainer.loss_type, trainer.importance_sampling_level, trainer.beta = loss_type, level, beta
    trainer.epsilon_low, trainer.epsilon_high = epsilon, epsilon_high
    trainer.max_completion_length = MAX_COMPLETION_LENGTH
    trainer.top_entropy_quantile = top_entropy_quantile
    trainer.off_policy_mask_threshold = None
    trainer.use_vllm = sampler_correction is not None  # TRL applies its importance-sampling correction with vLLM
    trainer.vllm_importance_sampling_correction = sampler_correction is not None
    trainer.aux_loss_enabled = False
    trainer._entropy_bonus_enabled = False
    trainer._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    logps = torch.tensor(inputs["logps"], dtype=torch.float64, requires_grad=True)
    entropies = torch.tensor(inputs["entropies"], dtype=torch.float64)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, entropies, None)
    mask = torch.tensor(inputs["mask"])
    batch = {"prompt_ids": torch.zeros(BATCH, 2, dtype=torch.long), "prompt_mask": torch.ones(BATCH, 2),
             "completion_ids": torch.zeros(BATCH, LENGTH, dtype=torch.long), "completion_mask": mask,
             "advantages": torch.tensor(inputs["advantages"], dtype=torch.float64),
             "num_items_in_batch": mask.sum()}
    if not on_policy:
        batch["old_per_token_logps"] = torch.tensor(inputs["old_logps"], dtype=torch.float64)
    if beta != 0.0:
        batch["ref_per_token_logps"] = torch.tensor(inputs["ref_logps"], dtype=torch.float64)
    if sampler_correction is not None:
        batch["importance_sampling_ratio"] = torch.tensor(inputs["sampler_weights"][sampler_correction])
    loss = trainer._compute_loss(None, batch)
    loss.backward()
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss.item(), logps.grad.numpy(), metrics


def jaxpt_grpo(inputs, *, loss_type, level, beta, bias_correction, epsilon, epsilon_high, delta, top_entropy_quantile,
               on_policy, sampler_correction):
    """jaxpt's `grpo_loss` as `jaxpt.grpo`'s step calls it for one micro-batch: (loss, gradient, metrics)."""
    with jax.enable_x64(True):
        mask = jnp.asarray(inputs["mask"], jnp.float64)
        entropy_mask = None
        if top_entropy_quantile < 1.0:
            entropy_mask = high_entropy_mask(jnp.asarray(inputs["entropies"]), mask, top_entropy_quantile)

        def loss_of(logps):
            return grpo_loss(
                logps, None if on_policy else jnp.asarray(inputs["old_logps"]), jnp.asarray(inputs["ref_logps"]),
                jnp.asarray(inputs["advantages"]), mask, loss_type=loss_type, epsilon=epsilon,
                epsilon_high=epsilon_high, delta=delta, beta=beta, importance_sampling_level=level,
                max_completion_length=MAX_COMPLETION_LENGTH, use_bias_correction_kl=bias_correction,
                entropy_mask=entropy_mask, num_tokens=jnp.sum(mask), num_sequences=BATCH,
                importance_sampling_weights=None if sampler_correction is None else jnp.asarray(
                    inputs["sampler_weights"][sampler_correction]))

        (loss, metrics), grad = jax.value_and_grad(loss_of, has_aux=True)(jnp.asarray(inputs["logps"]))
        return float(loss), np.asarray(grad), {key: float(value) for key, value in metrics.items()}


DEFAULTS = dict(epsilon=0.2, epsilon_high=0.2, delta=None, top_entropy_quantile=1.0, on_policy=False,
                sampler_correction=None)
# Every loss type x importance-sampling level x {no KL, KL with and without the bias correction} ...
CASES = [dict(loss_type=loss_type, level=level, beta=beta, bias_correction=bias_correction)
         for loss_type, level, (beta, bias_correction) in itertools.product(
             ("grpo", "bnpo", "dr_grpo", "dapo"), ("token", "sequence"), ((0.0, True), (0.04, True), (0.04, False)))]
# ... and the options that change the clipping, the token selection or the old policy.
CASES += [dict(loss_type=loss_type, level=level, beta=0.04, bias_correction=True, **extra)
          for loss_type, level in (("dapo", "token"), ("grpo", "sequence"))
          for extra in (dict(epsilon=0.1, epsilon_high=0.28),  # DAPO's clip-higher
                        dict(delta=1.3),  # two-sided clipping
                        dict(delta=1.1),  # below 1 + epsilon_high: TRL counts no high clipping
                        dict(top_entropy_quantile=0.4),
                        dict(on_policy=True))]  # no old log-probs: ratio 1 with the gradient of exp(logp - sg(logp))
# ... and the sampler importance-sampling correction (TRL's vllm_importance_sampling_correction): per-token and
# per-sequence weights on the policy term, with and without KL, clipping on both sides.
CASES += [dict(loss_type=loss_type, level=level, beta=beta, bias_correction=True, sampler_correction=weights)
          for loss_type, level in (("dapo", "token"), ("grpo", "token"), ("grpo", "sequence"))
          for beta in (0.0, 0.04) for weights in ("token", "sequence")]


def case_id(case):
    return "-".join(f"{key}={value}" for key, value in case.items())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_loss_gradient_and_metrics_match_trl(case):
    inputs = fixed_inputs()
    options = {**DEFAULTS, **case}
    trl_loss, trl_grad, trl_metrics = trl_grpo(inputs, **options)
    loss, grad, metrics = jaxpt_grpo(inputs, **options)

    assert loss == pytest.approx(trl_loss, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(grad, trl_grad, rtol=1e-9, atol=1e-12)
    assert np.abs(trl_grad).max() > 1e-3  # the gradient reaches the log-probs (not a comparison of zeros)
    expected_names = set(METRICS) | ({"kl"} if options["beta"] else set())
    assert set(trl_metrics) - NOT_IN_JAXPT == expected_names
    assert set(metrics) == expected_names
    for key in expected_names:  # TRL counts clipped tokens in float32
        assert metrics[key] == pytest.approx(trl_metrics[key], rel=1e-6, abs=1e-12), key


def test_the_fixed_inputs_clip_on_both_sides():
    """The parity above is only meaningful if the ratios leave the clipping range in every direction."""
    inputs = fixed_inputs()
    for level in ("token", "sequence"):
        _, _, metrics = trl_grpo(inputs, loss_type="dapo", level=level, beta=0.0, bias_correction=True, **DEFAULTS)
        assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0, level
        assert metrics["clip_ratio/region_mean"] < 1, level


def test_sequence_level_clip_ratios_leave_out_empty_completions():
    """Deliberate difference: a completion without loss tokens (masked as truncated, `mask_truncated_completions`)
    counts as an unclipped sequence in TRL's sequence-level clip ratios; jaxpt averages over the sequences that are
    in the loss. Loss and gradient agree."""
    inputs = fixed_inputs()
    inputs["mask"][2] = 0
    options = dict(loss_type="grpo", level="sequence", beta=0.04, bias_correction=True, **DEFAULTS)
    trl_loss, trl_grad, trl_metrics = trl_grpo(inputs, **options)
    loss, grad, metrics = jaxpt_grpo(inputs, **options)
    assert loss == pytest.approx(trl_loss, rel=1e-9)
    np.testing.assert_allclose(grad, trl_grad, rtol=1e-9, atol=1e-12)
    assert metrics["kl"] == pytest.approx(trl_metrics["kl"], rel=1e-6)  # metrics are float32 sums and counts
    for key in METRICS:
        assert trl_metrics[key] > 0, key
        assert metrics[key] == pytest.approx(trl_metrics[key] * BATCH / (BATCH - 1), rel=1e-6), key
