"""GMPO: the loss against TRL 1.16's own `GMPOTrainer._compute_loss` on fixed per-token log-probs (loss, gradient,
metrics), config checks, and a tiny model that raises its reward.

TRL's method is driven without a model, as tests/losses/test_grpo_trl.py drives GRPO's: a bare `GMPOTrainer` (no
`__init__`) gets the attributes `_compute_loss` reads, and `_get_per_token_logps_and_entropies` returns fixed
float64 log-probs as a leaf tensor, so torch autograd gives TRL's gradient with respect to them.
"""

import collections
import dataclasses
import json
import types

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from trl.experimental.gmpo import GMPOTrainer  # a test dependency: parity must fail, never skip, without it

from jaxpt.experimental import gmpo
from jaxpt.losses.grpo import high_entropy_mask
from tests.helpers import char_tokenizer, tiny_llama

BATCH, LENGTH = 6, 7
LENGTHS = np.array([7, 5, 1, 3, 6, 2])
METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
NOT_IN_JAXPT = {"clip_ratio/low_min", "clip_ratio/high_max", "entropy"}  # entropy: logged by gmpo's step
ACCELERATOR = Accelerator(cpu=True)


def fixed_inputs(seed=3):
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(0.05, 3.0, (BATCH, LENGTH))
    # log-ratios spread over +-0.4 and beyond on both sides, so every clipping branch is taken
    old_logps = logps + rng.normal(0.0, 0.45, (BATCH, LENGTH))
    ref_logps = logps + rng.normal(0.0, 0.5, (BATCH, LENGTH))
    advantages = np.array([1.3, -0.7, 0.4, -1.1, 0.9, -0.2])
    mask = (np.arange(LENGTH)[None, :] < LENGTHS[:, None]).astype(np.int64)
    entropies = rng.uniform(0.0, 2.0, (BATCH, LENGTH))
    return dict(logps=logps, old_logps=old_logps, ref_logps=ref_logps, advantages=advantages, mask=mask,
                entropies=entropies)


def trl_gmpo(inputs, *, beta, epsilon, epsilon_high, top_entropy_quantile, on_policy):
    """TRL's `GMPOTrainer._compute_loss` on `inputs`: (loss, d loss / d logps, logged metrics)."""
    trainer = object.__new__(GMPOTrainer)
    trainer.model = types.SimpleNamespace(training=True)
    trainer.accelerator = ACCELERATOR
    trainer.current_gradient_accumulation_steps = 1
    trainer.beta, trainer.epsilon_low, trainer.epsilon_high = beta, epsilon, epsilon_high
    trainer.top_entropy_quantile = top_entropy_quantile
    trainer._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    logps = torch.tensor(inputs["logps"], dtype=torch.float64, requires_grad=True)
    entropies = torch.tensor(inputs["entropies"], dtype=torch.float64)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, entropies, None)
    mask = torch.tensor(inputs["mask"])
    batch = {"prompt_ids": torch.zeros(BATCH, 2, dtype=torch.long), "prompt_mask": torch.ones(BATCH, 2),
             "completion_ids": torch.zeros(BATCH, LENGTH, dtype=torch.long), "completion_mask": mask,
             "advantages": torch.tensor(inputs["advantages"], dtype=torch.float64)}
    if not on_policy:
        batch["old_per_token_logps"] = torch.tensor(inputs["old_logps"], dtype=torch.float64)
    if beta != 0.0:
        batch["ref_per_token_logps"] = torch.tensor(inputs["ref_logps"], dtype=torch.float64)
    loss = trainer._compute_loss(None, batch)
    loss.backward()
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss.item(), logps.grad.numpy(), metrics


def jaxpt_gmpo(inputs, *, beta, epsilon, epsilon_high, top_entropy_quantile, on_policy):
    with jax.enable_x64(True):
        mask = jnp.asarray(inputs["mask"], jnp.float64)
        entropy_mask = None
        if top_entropy_quantile < 1.0:
            entropy_mask = high_entropy_mask(jnp.asarray(inputs["entropies"]), mask, top_entropy_quantile)

        def loss_of(logps):
            return gmpo.gmpo_loss(logps, None if on_policy else jnp.asarray(inputs["old_logps"]),
                                  jnp.asarray(inputs["ref_logps"]), jnp.asarray(inputs["advantages"]), mask,
                                  epsilon=epsilon, epsilon_high=epsilon_high, beta=beta, entropy_mask=entropy_mask,
                                  num_sequences=BATCH)

        (loss, metrics), grad = jax.value_and_grad(loss_of, has_aux=True)(jnp.asarray(inputs["logps"]))
        return float(loss), np.asarray(grad), {key: float(value) for key, value in metrics.items()}


DEFAULTS = dict(beta=0.0, epsilon=0.4, epsilon_high=0.4, top_entropy_quantile=1.0, on_policy=False)
CASES = [{}, dict(beta=0.04), dict(epsilon=0.2, epsilon_high=0.6), dict(top_entropy_quantile=0.4, beta=0.04),
         dict(on_policy=True, beta=0.04)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_loss_gradient_and_metrics_match_trl(case):
    inputs = fixed_inputs()
    options = {**DEFAULTS, **case}
    trl_loss, trl_grad, trl_metrics = trl_gmpo(inputs, **options)
    loss, grad, metrics = jaxpt_gmpo(inputs, **options)
    assert loss == pytest.approx(trl_loss, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(grad, trl_grad, rtol=1e-9, atol=1e-12)
    assert np.abs(trl_grad).max() > 1e-3  # the gradient reaches the log-probs (not a comparison of zeros)
    expected = set(METRICS) | ({"kl"} if options["beta"] else set())
    assert set(trl_metrics) - NOT_IN_JAXPT == expected
    assert set(metrics) == expected
    for key in expected:  # TRL counts clipped tokens in float32
        assert metrics[key] == pytest.approx(trl_metrics[key], rel=1e-6, abs=1e-12), key
    if not case:  # the fixed inputs clip on both sides, and not everything
        assert trl_metrics["clip_ratio/low_mean"] > 0 and trl_metrics["clip_ratio/high_mean"] > 0
        assert trl_metrics["clip_ratio/region_mean"] < 0.5


def test_geometric_mean_differs_from_grpo_arithmetic_mean():
    """The point of GMPO: one outlier ratio moves the geometric mean far less than GRPO's arithmetic mean."""
    logps = jnp.zeros((1, 4))
    old_logps = jnp.asarray([[0.0, 0.0, 0.0, -3.0]])  # one token's ratio is e^3 (clipped to e^0.4)
    loss, _ = gmpo.gmpo_loss(logps, old_logps, None, jnp.asarray([1.0]), jnp.ones((1, 4)))
    assert float(loss) == pytest.approx(-np.exp(0.4 / 4), rel=1e-6)  # GRPO's token mean: -(3 + 1.2) / 4


@pytest.mark.parametrize("overrides,message", [
    ({"loss_type": "grpo"}, "loss_type='grpo': GMPO's loss"),
    ({"importance_sampling_level": "sequence"}, "importance_sampling_level='sequence'"),
    ({"delta": 2.0}, "delta=2.0"),
    ({"entropy_coef": 0.01}, "entropy_coef=0.01"),
    ({"sampler_importance_sampling_correction": True}, "sampler_importance_sampling_correction=True"),
    ({"num_generations": 1}, "num_generations=1"),
])
def test_config_refuses_what_gmpo_does_not_use(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        gmpo.GMPOConfig(output_dir=str(tmp_path), **overrides)


def test_config_defaults_are_trls():
    from trl.experimental.gmpo import GMPOConfig as TRLGMPOConfig

    trl_defaults = {f.name: f.default for f in dataclasses.fields(TRLGMPOConfig)}
    defaults = {f.name: f.default for f in dataclasses.fields(gmpo.GMPOConfig)}
    assert defaults["epsilon"] == trl_defaults["epsilon"] == 0.4
    assert defaults["epsilon_high"] is trl_defaults["epsilon_high"] is None  # epsilon's value, on both sides
    for name in ("beta", "num_generations", "temperature", "scale_rewards", "top_entropy_quantile", "num_iterations"):
        assert defaults[name] == trl_defaults[name], name


TOKENIZER = char_tokenizer()
PROMPTS = datasets.Dataset.from_list([{"prompt": p} for p in ["ab", "cde", "f", "ghij"] * 4])


def digits_reward(completions, **kwargs):
    """Dense toy reward: the fraction of characters that are digits (about 10% for a random policy)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def test_gmpo_raises_the_mean_reward(tmp_path):
    config = gmpo.GMPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8,
                             max_completion_length=8, learning_rate=3e-2, max_steps=16, logging_steps=1, mesh_fsdp=1,
                             disable_tqdm=True, save_steps=0, save_final_model=False, seed=0, beta=0.01)
    result = gmpo.train(tiny_llama(len(TOKENIZER)), TOKENIZER, PROMPTS, config, reward_funcs=[digits_reward])
    rewards = [r["reward"] for r in result.metrics]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.2, rewards
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss", "grad_norm", "reward", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
            "clip_ratio/region_mean", "completions/mean_length"} <= set(record)


def test_train_is_grpos_loop_under_gmpos_name(tmp_path):
    """gmpo.train is grpo.train with GMPO's step: its messages (and checkpoints) name GMPO, not GRPO."""
    config = gmpo.GMPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8)
    with pytest.raises(ValueError, match="reward_funcs is empty: GMPO needs"):
        gmpo.train(tiny_llama(len(TOKENIZER)), TOKENIZER, PROMPTS, config, reward_funcs=[])
