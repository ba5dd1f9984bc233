"""BEMA reference for DPO: the BEMA arithmetic against TRL 1.16's own `BEMACallback` (bema_for_ref_model) driven
with fixed weights step by step, and a DPO run whose reference follows BEMA."""

import json

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
import trl.experimental.bema_for_ref_model  # a test dependency: parity must fail, never skip, without it

from jaxpt.experimental import bema
from tests.experimental.helpers import TOKENIZER, VOCAB, preference_rows
from tests.helpers import tiny_llama

SCHEDULES = [dict(update_freq=1, ref_model_update_freq=2),
             dict(update_freq=2, update_after=3, lag=4, multiplier=0.5, ema_power=0.7, bias_power=0.3,
                  min_ema_multiplier=0.2, ref_model_update_freq=3, ref_model_update_after=2)]


@pytest.mark.parametrize("options", SCHEDULES, ids=["every-step", "burn-in"])
def test_bema_weights_and_reference_match_trl_callback(tmp_path, options):
    """The same sequence of weights θ_1..θ_10 through TRL's callback (on_train_begin, then on_step_end with
    global_step = 1, 2, ...) and through bema_update / replaces_reference: θ' and the reference after every step."""
    config = bema.BEMAConfig(output_dir=str(tmp_path), **options)
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(2, 3)).astype(np.float32) for _ in range(11)]  # θ_0 .. θ_10

    policy, reference = torch.nn.Linear(3, 2, bias=False), torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        policy.weight.copy_(torch.tensor(weights[0]))
        reference.weight.copy_(torch.tensor(weights[0]))
    callback = trl.experimental.bema_for_ref_model.BEMACallback(
        **{k: getattr(config, k) for k in ("update_freq", "ema_power", "bias_power", "lag", "update_after",
                                           "multiplier", "min_ema_multiplier", "update_ref_model",
                                           "ref_model_update_freq", "ref_model_update_after")})
    trainer_state, control = transformers.TrainerState(), transformers.TrainerControl()
    callback.running_model = None
    callback.on_train_begin(None, trainer_state, control, model=_Wrapped(policy))

    params = {"w": jnp.asarray(weights[0])}
    state, ref = bema.bema_init(params), params
    replaced = []
    for step in range(1, 11):
        with torch.no_grad():
            policy.weight.copy_(torch.tensor(weights[step]))
        trainer_state.global_step = step
        callback.on_step_end(None, trainer_state, control, model=_Wrapped(policy), ref_model=reference)
        params = {"w": jnp.asarray(weights[step])}
        state = bema.bema_update(state, params, step, config)
        if bema.replaces_reference(step, config):
            ref, replaced = state.bema, replaced + [step]
        np.testing.assert_allclose(np.asarray(state.bema["w"]), callback.running_model.weight.detach().numpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=f"BEMA weights after step {step}")
        np.testing.assert_allclose(np.asarray(ref["w"]), reference.weight.detach().numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=f"reference after step {step}")
    assert replaced and not np.allclose(np.asarray(ref["w"]), weights[0])  # the reference did move


class _Wrapped(torch.nn.Module):
    """What TRL's callback unwraps and copies: a module with a config (`type(model)(model.config)`)."""

    def __init__(self, inner):
        super().__init__()
        self.module = _LinearWithConfig(inner)


class _LinearWithConfig(torch.nn.Module):
    def __init__(self, inner=None):
        super().__init__()
        self.weight = inner.weight if isinstance(inner, torch.nn.Module) else torch.nn.Parameter(torch.zeros(2, 3))
        self.config = "config"

    def forward(self, x):
        return x @ self.weight.T


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="update_ref_model=True moves the reference"):
        bema.BEMAConfig(output_dir=str(tmp_path), precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="update_freq=0 must be >= 1"):
        bema.BEMAConfig(output_dir=str(tmp_path), update_freq=0)


def test_dpo_with_a_bema_reference_trains(tmp_path):
    """The reference moves (every 4 steps) and the policy still learns to prefer the chosen sums (its own log-prob
    gap rises; margins against a reference that follows it stay small); the BEMA weights come back."""
    config = bema.BEMAConfig(output_dir=str(tmp_path), max_length=32, per_device_train_batch_size=4, logging_steps=4,
                             learning_rate=3e-3, beta=0.5, max_steps=16, save_steps=0, mesh_fsdp=1,
                             disable_tqdm=True, save_final_model=False, seed=0, update_freq=1,
                             ref_model_update_freq=4)
    model = tiny_llama(VOCAB)
    initial = jax.tree.map(np.asarray, jax.tree.leaves(bema.bema_init(_params(model)).bema))
    result = bema.train(model, TOKENIZER, datasets.Dataset.from_list(preference_rows(32)), config)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12, 16]
    gap = lambda record: record["logps/chosen"] - record["logps/rejected"]  # the policy's own preference
    assert gap(records[-1]) > gap(records[0]) + 1.0
    assert records[-1]["loss"] < records[0]["loss"]
    moved = [np.abs(np.asarray(b) - a).max() for a, b in zip(initial, jax.tree.leaves(result.bema_params),
                                                             strict=True)]
    trained = [np.abs(np.asarray(p) - a).max() for a, p in zip(initial, jax.tree.leaves(result.state.params),
                                                               strict=True)]
    assert 0 < max(moved) < max(trained) * 1.5  # smoothed, not a copy of the start


def _params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


def test_resume_continues_the_bema_buffers_and_reference(tmp_path):
    """Resumed from its step-3 checkpoint (θ₀ taken at step 1, the reference replaced at step 2), a run ends with
    the uninterrupted run's metrics, parameters and BEMA weights."""
    config = bema.BEMAConfig(output_dir=str(tmp_path), max_length=32, per_device_train_batch_size=4, logging_steps=1,
                             learning_rate=1e-2, beta=0.5, max_steps=5, save_steps=3, mesh_fsdp=1,
                             disable_tqdm=True, save_final_model=False, seed=0, update_freq=1, update_after=1,
                             ref_model_update_freq=2)
    rows = datasets.Dataset.from_list(preference_rows(20))
    full = bema.train(tiny_llama(VOCAB), TOKENIZER, rows, config)
    full_params = [np.asarray(leaf) for leaf in jax.tree.leaves((full.state.params, full.bema_params))]
    resumed = bema.train(tiny_llama(VOCAB), TOKENIZER, rows, config.replace(resume_from_checkpoint="latest"))
    assert [r["step"] for r in resumed.metrics] == [4, 5]
    for before, after in zip(full.metrics[3:], resumed.metrics, strict=True):
        for key in ("loss", "rewards/margins", "rewards/chosen"):
            assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-7), (after["step"], key)
    for expected, leaf in zip(full_params, jax.tree.leaves((resumed.state.params, resumed.bema_params)),
                              strict=True):
        np.testing.assert_allclose(np.asarray(leaf), expected, rtol=1e-5, atol=1e-7)
