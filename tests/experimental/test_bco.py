"""BCO: the loss and the running reward shift against the paper's formulas in float64 (TRL 1.16 no longer has BCO),
the step's accumulation, and training on unpaired feedback."""

import json

import datasets
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpt.experimental import bco
from jaxpt.sharding import make_mesh, put_global, shard_batch
from jaxpt.train_state import TrainState
from tests.experimental.helpers import TOKENIZER, VOCAB, preference_rows
from tests.helpers import tiny_llama


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), max_length=32, per_device_train_batch_size=4, logging_steps=1,
                    learning_rate=1e-3, max_steps=4, save_steps=0, mesh_fsdp=1, disable_tqdm=True,
                    save_final_model=False, seed=0)
    settings.update(overrides)
    return bco.BCOConfig(**settings)


def feedback_rows(count, *, seed=0):
    """Unpaired feedback: the right sum is desirable, a wrong one undesirable (alternating)."""
    rows = []
    for i, row in enumerate(preference_rows(count, seed=seed)):
        good = i % 2 == 0
        rows.append({"prompt": row["prompt"], "completion": row["chosen"] if good else row["rejected"], "label": good})
    return rows


def test_loss_formula_in_float64():
    rng = np.random.default_rng(0)
    policy, ref = -rng.uniform(1, 9, 7), -rng.uniform(1, 9, 7)
    desirable = np.array([1, 0, 1, 1, 0, 0, 1], bool)
    mask = np.array([1, 1, 1, 1, 1, 0, 1], bool)
    loss, metrics = bco.bco_loss(policy, ref, desirable, 0.05, beta=0.3, example_mask=mask)
    rewards = 0.3 * (policy - ref)
    log_sigmoid = lambda x: -np.log1p(np.exp(-x))
    per_example = np.where(desirable, -log_sigmoid(rewards - 0.05), -log_sigmoid(-(rewards - 0.05)))
    assert float(loss) == pytest.approx(per_example[mask].mean(), rel=1e-6)
    assert float(metrics["rewards/chosen"]) == pytest.approx(rewards[mask & desirable].mean(), rel=1e-6)
    assert float(metrics["rewards/rejected"]) == pytest.approx(rewards[mask & ~desirable].mean(), rel=1e-6)
    grad = jax.grad(lambda p: bco.bco_loss(p, ref, desirable, 0.05, beta=0.3, example_mask=mask)[0])(policy)
    sigmoid = lambda x: 1 / (1 + np.exp(-x))
    expected = np.where(desirable, -sigmoid(-(rewards - 0.05)), sigmoid(rewards - 0.05)) * 0.3 * mask / mask.sum()
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-9)


def test_running_shift_is_the_mean_of_the_step_means():
    running = bco.init_running()
    for means, value in enumerate([0.5, -1.0, 2.0], start=1):
        running = bco.update_running(running, value)
        assert float(running["mean"]) == pytest.approx(np.mean([0.5, -1.0, 2.0][:means]))


def test_data_errors(tmp_path):
    with pytest.raises(ValueError, match="BCO needs a unpaired_preference"):
        bco.prepare_dataset(datasets.Dataset.from_list(preference_rows(2)), TOKENIZER, config(tmp_path))
    one_sided = [{"prompt": "1+1=", "completion": "2", "label": True}] * 2
    with pytest.raises(ValueError, match="both desirable .* and undesirable"):
        bco.prepare_dataset(datasets.Dataset.from_list(one_sided), TOKENIZER, config(tmp_path))


def _one_step(cfg, examples, accumulation, mesh=None):
    state = TrainState.create(tiny_llama(VOCAB, seed=0), optax.sgd(1.0), mesh=mesh)
    ref_params = nnx.state(tiny_llama(VOCAB, seed=1), nnx.Param)
    if mesh is not None:
        ref_params = put_global(ref_params, state.shardings(mesh).params)
    running = bco.update_running(bco.init_running(), 0.3)  # one earlier step
    batch = bco.collate(examples, accumulation_steps=accumulation, buckets=[16, 32])
    step = bco.make_train_step(cfg, mesh=mesh, state_sharding=state.shardings(mesh))
    state, running, metrics = step(state, shard_batch(batch, mesh, batch_axis=1), ref_params, running)
    return jax.device_get((metrics, running)), {k: np.asarray(v) for k, v in nnx.to_flat_state(state.params)}


def test_step_shift_accumulation_and_mesh(tmp_path):
    """The step's δ is the running mean with this step's mean reward included; batch 8 x accumulation 1 == batch 2 x
    accumulation 4 == an 8-device mesh (metrics, δ and updated parameters)."""
    cfg = config(tmp_path, beta=0.5)
    examples = bco.prepare_dataset(datasets.Dataset.from_list(feedback_rows(8)), TOKENIZER, cfg)
    ((metrics, running), params) = _one_step(cfg, examples, accumulation=1)
    batch_mean = (metrics["rewards/chosen"] + metrics["rewards/rejected"]) / 2  # 4 desirable, 4 undesirable
    assert float(running["count"]) == 2.0
    assert float(metrics["delta"]) == pytest.approx((0.3 + batch_mean) / 2, rel=1e-5)
    for (other_metrics, other_running), other_params in (
            _one_step(cfg, examples, accumulation=4),
            _one_step(cfg, examples, accumulation=1, mesh=make_mesh(data=2, fsdp=2, tensor=2))):
        assert float(other_running["mean"]) == pytest.approx(float(running["mean"]), rel=1e-5)
        for key, value in metrics.items():
            assert other_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        for name, value in params.items():
            np.testing.assert_allclose(other_params[name], value, rtol=1e-5, atol=1e-5, err_msg=str(name))


def test_train_separates_desirable_from_undesirable(tmp_path):
    cfg = config(tmp_path, beta=0.5, max_steps=24, logging_steps=4, learning_rate=3e-3)
    result = bco.train(tiny_llama(VOCAB), TOKENIZER, datasets.Dataset.from_list(feedback_rows(32)), cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    assert {"loss", "grad_norm", "rewards/chosen", "rewards/rejected", "logps/chosen", "delta"} <= set(first)
    assert last["loss"] < 0.8 * first["loss"]
    margin = lambda record: record["rewards/chosen"] - record["rewards/rejected"]
    assert margin(last) > margin(first) + 0.5
    assert int(result.state.step) == 24


def test_resume_continues_the_running_reward_shift(tmp_path):
    """A run resumed from its step-2 checkpoint continues with the saved running shift δ: the same later metrics
    (δ included) and final parameters as the uninterrupted run."""
    rows = datasets.Dataset.from_list(feedback_rows(16))
    cfg = config(tmp_path, beta=0.5, max_steps=3, save_steps=2, learning_rate=1e-2)
    full = bco.train(tiny_llama(VOCAB), TOKENIZER, rows, cfg)
    full_params = {k: np.asarray(v) for k, v in nnx.to_flat_state(full.state.params)}
    resumed = bco.train(tiny_llama(VOCAB), TOKENIZER, rows, cfg.replace(resume_from_checkpoint="latest"))
    assert [r["step"] for r in resumed.metrics] == [3]
    # δ is the mean over steps 1-3 (a fresh shift after the resume would be step 3's mean alone)
    for key in ("loss", "delta", "rewards/chosen", "rewards/rejected"):
        assert resumed.metrics[0][key] == pytest.approx(full.metrics[2][key], rel=1e-5, abs=1e-7), key
    for name, value in nnx.to_flat_state(resumed.state.params):
        np.testing.assert_allclose(np.asarray(value), full_params[name], rtol=1e-5, atol=1e-7, err_msg=str(name))
