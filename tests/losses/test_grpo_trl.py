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

from jaxpt.losses.grpo import CLIPPED_LOSS_TYPES, GRPO_LOSS_TYPES, grpo_loss, high_entropy_mask

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
    # The sampler's log-probs (off-policy masking measures the KL from them when given), with one unscorable token.
    sampler_logps = old_logps + rng.normal(0.0, 0.2, (BATCH, LENGTH))
    sampler_logps[3, 1] = np.nan
    return dict(logps=logps, old_logps=old_logps, ref_logps=ref_logps, advantages=advantages, mask=mask,
                entropies=entropies, sampler_weights={"token": token_weights, "sequence": sequence_weights},
                sampler_logps=sampler_logps)


ACCELERATOR = Accelerator(cpu=True)


# TRL 1.16's defaults of the newer loss types' parameters (GRPOConfig), passed to both sides.
MENU_DEFAULTS = dict(sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                     vespo_k_neg=3.0, vespo_lambda_neg=2.0)


def trl_grpo(inputs, *, loss_type, level, beta, bias_correction, epsilon, epsilon_high, delta, top_entropy_quantile,
             on_policy, sampler_correction, off_policy_mask_threshold=None, with_sampler_logps=False,
             entropy_coef=0.0, menu=MENU_DEFAULTS):
    """TRL's `_compute_loss` on `inputs`: (loss, d loss / d logps, logged metrics, d loss / d entropies)."""
    trainer = object.__new__(trl.GRPOTrainer)
    trainer.args = types.SimpleNamespace(use_bias_correction_kl=bias_correction, delta=delta, steps_per_generation=1,
                                         **menu)
    trainer.model = types.SimpleNamespace(training=True)
    trainer.accelerator = ACCELERATOR
    trainer.current_gradient_accumulation_steps = 1
    trainer.loss_type, trainer.importance_sampling_level, trainer.beta = loss_type, level, beta
    trainer.epsilon_low, trainer.epsilon_high = epsilon, epsilon_high
    trainer.max_completion_length = MAX_COMPLETION_LENGTH
    trainer.top_entropy_quantile = top_entropy_quantile
    trainer.off_policy_mask_threshold = off_policy_mask_threshold
    trainer.use_vllm = sampler_correction is not None  # TRL applies its importance-sampling correction with vLLM
    trainer.vllm_importance_sampling_correction = sampler_correction is not None
    trainer.aux_loss_enabled = False
    trainer.entropy_coef, trainer.use_adaptive_entropy = entropy_coef, False
    trainer._entropy_bonus_enabled = entropy_coef != 0.0
    trainer._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    logps = torch.tensor(inputs["logps"], dtype=torch.float64, requires_grad=True)
    entropies = torch.tensor(inputs["entropies"], dtype=torch.float64, requires_grad=True)
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
    if with_sampler_logps:
        batch["sampling_per_token_logps"] = torch.tensor(inputs["sampler_logps"], dtype=torch.float64)
    loss = trainer._compute_loss(None, batch)
    loss.backward()
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    entropy_grad = np.zeros_like(inputs["entropies"]) if entropies.grad is None else entropies.grad.numpy()
    return loss.item(), logps.grad.numpy(), metrics, entropy_grad


def jaxpt_grpo(inputs, *, loss_type, level, beta, bias_correction, epsilon, epsilon_high, delta, top_entropy_quantile,
               on_policy, sampler_correction, off_policy_mask_threshold=None, with_sampler_logps=False,
               entropy_coef=0.0, menu=MENU_DEFAULTS):
    """jaxpt's `grpo_loss` as `jaxpt.grpo`'s step calls it for one micro-batch: (loss, gradient, metrics,
    gradient with respect to the entropies)."""
    # TRL picks SAPO's temperatures and VESPO's k and lambda per sequence with torch.where from Python floats:
    # float32 values.
    menu = {key: float(np.float32(value)) for key, value in menu.items()}
    with jax.enable_x64(True):
        mask = jnp.asarray(inputs["mask"], jnp.float64)
        entropy_mask = None
        if top_entropy_quantile < 1.0:
            entropy_mask = high_entropy_mask(jnp.asarray(inputs["entropies"]), mask, top_entropy_quantile)

        def loss_of(logps, entropies):
            return grpo_loss(
                logps, None if on_policy else jnp.asarray(inputs["old_logps"]), jnp.asarray(inputs["ref_logps"]),
                jnp.asarray(inputs["advantages"]), mask, loss_type=loss_type, epsilon=epsilon,
                epsilon_high=epsilon_high, delta=delta, beta=beta, importance_sampling_level=level,
                max_completion_length=MAX_COMPLETION_LENGTH, use_bias_correction_kl=bias_correction,
                entropy_mask=entropy_mask, num_tokens=jnp.sum(mask), num_sequences=BATCH,
                importance_sampling_weights=None if sampler_correction is None else jnp.asarray(
                    inputs["sampler_weights"][sampler_correction]),
                off_policy_mask_threshold=off_policy_mask_threshold,
                sampler_logps=jnp.asarray(inputs["sampler_logps"]) if with_sampler_logps else None,
                entropies=entropies, entropy_coef=entropy_coef, **menu)

        (loss, metrics), (grad, entropy_grad) = jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True)(
            jnp.asarray(inputs["logps"]), jnp.asarray(inputs["entropies"]))
        return (float(loss), np.asarray(grad), {key: float(value) for key, value in metrics.items()},
                np.asarray(entropy_grad))


DEFAULTS = dict(epsilon=0.2, epsilon_high=0.2, delta=None, top_entropy_quantile=1.0, on_policy=False,
                sampler_correction=None)
# Every loss type x importance-sampling level x {no KL, KL with and without the bias correction} ...
CASES = [dict(loss_type=loss_type, level=level, beta=beta, bias_correction=bias_correction)
         for loss_type, level, (beta, bias_correction) in itertools.product(
             GRPO_LOSS_TYPES, ("token", "sequence"), ((0.0, True), (0.04, True), (0.04, False)))]
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
# ... the newer types' own parameters (CISPO's absolute cap is epsilon_high; the rest with non-default values), VESPO
# with the sampler correction (which it folds into its sequence weight; token modes only) ...
CASES += [dict(loss_type="cispo", level="token", beta=0.04, bias_correction=True, epsilon_high=1.1),
          dict(loss_type="cispo", level="sequence", beta=0.0, bias_correction=True, epsilon_high=0.9),
          dict(loss_type="sapo", level="token", beta=0.0, bias_correction=True,
               menu={**MENU_DEFAULTS, "sapo_temperature_pos": 0.6, "sapo_temperature_neg": 2.5}),
          dict(loss_type="vespo", level="token", beta=0.0, bias_correction=True,
               menu={**MENU_DEFAULTS, "vespo_k_pos": 1.5, "vespo_lambda_pos": 0.5, "vespo_k_neg": 0.7,
                     "vespo_lambda_neg": 4.0}),
          dict(loss_type="vespo", level="token", beta=0.04, bias_correction=True, sampler_correction="token")]
# ... off-policy sequence masking (KL from the old log-probs, or from the sampler's when given) and the entropy
# bonus (gradient through the entropies too; on the high-entropy tokens only with top_entropy_quantile) ...
CASES += [dict(loss_type=loss_type, level=level, beta=0.04, bias_correction=True, off_policy_mask_threshold=0.05,
               with_sampler_logps=with_sampler_logps)
          for loss_type, level in (("dapo", "token"), ("grpo", "sequence"), ("cispo", "token"), ("vespo", "token"))
          for with_sampler_logps in (False, True)]
CASES += [dict(loss_type=loss_type, level=level, beta=beta, bias_correction=True, entropy_coef=0.03, **extra)
          for loss_type, level, beta in (("dapo", "token", 0.0), ("grpo", "sequence", 0.04), ("luspo", "sequence", 0.0),
                                         ("sapo", "token", 0.04), ("dr_grpo", "token", 0.0))
          for extra in ({}, dict(top_entropy_quantile=0.4))]

def case_id(case):
    return "-".join(f"{key}={value}" for key, value in case.items() if key != "menu") + (
        "-menu" if "menu" in case else "")


def expected_metric_names(options):
    names = {"cispo": {"cispo_clip_ratio"}, "vespo": {"vespo/phi_seq_mean"}, "sapo": set()}.get(
        options["loss_type"], set(METRICS))
    assert options["loss_type"] in CLIPPED_LOSS_TYPES or options["loss_type"] in ("cispo", "vespo", "sapo")
    names = names | ({"kl"} if options["beta"] else set())
    return names | ({"policy_loss", "entropy_coef"} if options.get("entropy_coef") else set())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_loss_gradient_and_metrics_match_trl(case):
    inputs = fixed_inputs()
    options = {**DEFAULTS, **case}
    trl_loss, trl_grad, trl_metrics, trl_entropy_grad = trl_grpo(inputs, **options)
    loss, grad, metrics, entropy_grad = jaxpt_grpo(inputs, **options)

    assert loss == pytest.approx(trl_loss, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(grad, trl_grad, rtol=1e-9, atol=1e-12)
    assert np.abs(trl_grad).max() > 1e-3  # the gradient reaches the log-probs (not a comparison of zeros)
    np.testing.assert_allclose(entropy_grad, trl_entropy_grad, rtol=1e-9, atol=1e-12)
    assert (np.abs(trl_entropy_grad).max() > 1e-4) == bool(options.get("entropy_coef"))
    expected_names = expected_metric_names(options)
    assert set(trl_metrics) - NOT_IN_JAXPT == expected_names
    assert set(metrics) == expected_names
    for key in expected_names:  # TRL counts clipped tokens in float32
        assert metrics[key] == pytest.approx(trl_metrics[key], rel=1e-6, abs=1e-12), key


def test_the_fixed_inputs_clip_on_both_sides():
    """The parity above is only meaningful if the ratios leave the clipping range in every direction."""
    inputs = fixed_inputs()
    for level in ("token", "sequence"):
        _, _, metrics, _ = trl_grpo(inputs, loss_type="dapo", level=level, beta=0.0, bias_correction=True, **DEFAULTS)
        assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0, level
        assert metrics["clip_ratio/region_mean"] < 1, level


def test_sequence_level_clip_ratios_leave_out_empty_completions():
    """Deliberate difference: a completion without loss tokens (masked as truncated, `mask_truncated_completions`)
    counts as an unclipped sequence in TRL's sequence-level clip ratios; jaxpt averages over the sequences that are
    in the loss. Loss and gradient agree."""
    inputs = fixed_inputs()
    inputs["mask"][2] = 0
    options = dict(loss_type="grpo", level="sequence", beta=0.04, bias_correction=True, **DEFAULTS)
    trl_loss, trl_grad, trl_metrics, _ = trl_grpo(inputs, **options)
    loss, grad, metrics, _ = jaxpt_grpo(inputs, **options)
    assert loss == pytest.approx(trl_loss, rel=1e-9)
    np.testing.assert_allclose(grad, trl_grad, rtol=1e-9, atol=1e-12)
    assert metrics["kl"] == pytest.approx(trl_metrics["kl"], rel=1e-6)  # metrics are float32 sums and counts
    for key in METRICS:
        assert trl_metrics[key] > 0, key
        assert metrics[key] == pytest.approx(trl_metrics[key] * BATCH / (BATCH - 1), rel=1e-6), key


def test_the_fixed_inputs_exercise_the_newer_options():
    """The off-policy mask drops some, not all, negative-advantage sequences from either KL source (else the parity
    above could not tell it from no mask); CISPO's cap and VESPO's weights are active."""
    from jaxpt.losses.grpo import off_policy_sequence_mask, vespo_weights

    inputs = fixed_inputs()
    with jax.enable_x64(True):
        for behaviour in (inputs["old_logps"], inputs["sampler_logps"]):
            keep = np.asarray(off_policy_sequence_mask(jnp.asarray(inputs["advantages"]), jnp.asarray(inputs["logps"]),
                                                       jnp.asarray(behaviour), jnp.asarray(inputs["mask"]), 0.05))[:, 0]
            negative = inputs["advantages"] < 0
            assert keep[~negative].all() and 0 < keep[negative].sum() < negative.sum(), keep
        phi = np.asarray(vespo_weights(jnp.asarray(inputs["advantages"]),
                                       jnp.asarray(inputs["logps"] - inputs["old_logps"]), jnp.asarray(inputs["mask"])))
        assert phi.min() < 0.5 and np.ptp(phi) > 0.1, phi
    _, _, metrics, _ = trl_grpo(inputs, loss_type="cispo", level="token", beta=0.0, bias_correction=True,
                                **{**DEFAULTS, "epsilon_high": 1.1})
    assert 0 < metrics["cispo_clip_ratio"] < 1
