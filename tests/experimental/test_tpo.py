"""TPO: every loss type against TRL 1.16's own `TPOTrainer._compute_loss` (driven with fixed logits), the whole step
against it on the same model and triples (tokens, loss, gradient, metrics), accumulation, and training."""

import json
import tempfile
from types import SimpleNamespace

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
import trl.experimental.tpo  # a test dependency: parity must fail, never skip, without it
from flax import nnx

import jaxpt.models
from jaxpt.experimental import tpo
from jaxpt.losses.logprobs import next_token_targets, token_logps
from jaxpt.sharding import shard_batch
from jaxpt.train_state import TrainState
from tests.experimental.helpers import TOKENIZER, VOCAB, preference_rows, save_tiny_model
from tests.helpers import tiny_llama


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), max_length=32, per_device_train_batch_size=4, logging_steps=1,
                    learning_rate=1e-3, max_steps=4, save_steps=0, mesh_fsdp=1, disable_tqdm=True,
                    save_final_model=False, seed=0)
    settings.update(overrides)
    return tpo.TPOConfig(**settings)


def triples(count, *, seed=0):
    """`a+b=`: chosen the sum, rejected a wrong one, the gold reference the sum written out as `=s.`"""
    return [{**row, "reference": row["chosen"] + "."} for row in preference_rows(count, seed=seed)]


ROWS = [{**r, "prompt": r["prompt"] + "ab", "chosen": r["chosen"] * 3} for r in triples(6)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tpo_model"))


@pytest.fixture(scope="module")
def trl_trainer(model_dir):
    args = trl.experimental.tpo.TPOConfig(output_dir=tempfile.mkdtemp(), bf16=False, report_to="none", use_cpu=True,
                                          gradient_checkpointing=False, max_length=32, beta=0.5)
    trainer = trl.experimental.tpo.TPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(model_dir),
                                              args=args, train_dataset=datasets.Dataset.from_list(ROWS),
                                              processing_class=TOKENIZER)
    trainer.model.train()  # TRL files metrics under the model's mode
    return trainer


LOSS_CASES = [dict(loss_type="sigmoid", beta=0.5), dict(loss_type="sigmoid", beta=0.5, label_smoothing=0.2),
              dict(loss_type="hinge", beta=0.3), dict(loss_type="ipo", beta=0.4),
              dict(loss_type="tpo-l", beta=2.0, tpo_l_gamma=0.7, label_smoothing=0.1),
              dict(loss_type="sigmoid", beta=0.5, tpo_alpha=0.0), dict(loss_type="tpo-l", beta=2.0, tpo_alpha=0.3)]


@pytest.mark.parametrize("options", LOSS_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_loss_type_matches_trl(trl_trainer, tmp_path, options):
    """TRL's `_compute_loss` with a stand-in model that returns fixed logits, against `tpo_loss` on the log-probs
    of the same logits: the loss, its gradient with respect to the logits, and the reward metrics."""
    cfg = config(tmp_path, **options)
    rows = len(tpo.sides(cfg))
    rng = np.random.default_rng(0)
    batch, length = 3, 7
    input_ids = rng.integers(0, VOCAB, (rows * batch, length))
    completion = np.zeros((rows * batch, length), np.int64)
    for i in range(rows * batch):
        start, end = rng.integers(1, 4), rng.integers(5, length + 1)
        completion[i, start:end] = 1
    logits = rng.normal(size=(rows * batch, length, VOCAB))

    for name in ("loss_type", "beta", "label_smoothing", "tpo_alpha", "tpo_l_gamma"):
        setattr(trl_trainer, name, getattr(cfg, name))
    trl_trainer._metrics["train"].clear()
    trl_logits = torch.tensor(logits, requires_grad=True)
    stand_in = lambda **kwargs: SimpleNamespace(logits=trl_logits)
    trl_loss = trl_trainer._compute_loss(stand_in, {"input_ids": torch.tensor(input_ids), "completion_mask":
                                                    torch.tensor(completion), "attention_mask":
                                                    torch.ones_like(torch.tensor(input_ids))}, False)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trl_trainer._metrics["train"].items()}

    def loss(logits):
        targets, mask = next_token_targets(jnp.asarray(input_ids), jnp.asarray(completion))
        logps = token_logps(logits, targets).reshape(rows, batch, length)
        mask = mask.reshape(rows, batch, length)
        gold = (logps[2], mask[2]) if rows == 3 else (None, None)
        sums, counts = jnp.sum(logps * mask, -1), jnp.sum(mask, -1)
        return tpo.tpo_loss(sums[0], sums[1], counts[0], counts[1], *gold, beta=cfg.beta, loss_type=cfg.loss_type,
                            label_smoothing=cfg.label_smoothing, tpo_alpha=cfg.tpo_alpha,
                            tpo_l_gamma=cfg.tpo_l_gamma)

    (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logits, jnp.float32))
    assert float(value) == pytest.approx(float(trl_loss), rel=1e-5)
    np.testing.assert_allclose(np.asarray(grad), trl_logits.grad.numpy(), rtol=1e-4, atol=1e-7)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert float(metrics[key]) == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-7), key


def test_step_matches_trl_on_the_same_model(trl_trainer, model_dir, tmp_path):
    """TPOTrainer (TRL 1.16) on the same model and triples: tokens, loss, gradient norm and every metric."""
    cfg = config(tmp_path, beta=0.5)
    for name in ("loss_type", "beta", "label_smoothing", "tpo_alpha", "tpo_l_gamma"):
        setattr(trl_trainer, name, getattr(cfg, name))
    examples = tpo.prepare_dataset(datasets.Dataset.from_list(ROWS), TOKENIZER, cfg)
    for example, expected in zip(examples, trl_trainer.train_dataset, strict=True):
        for side in ("chosen", "rejected", "reference"):
            assert example[f"{side}_input_ids"].tolist() == expected["prompt_ids"] + expected[f"{side}_ids"]
            assert example[f"{side}_completion_mask"].sum() == len(expected[f"{side}_ids"])
    trl_trainer.model.zero_grad()
    trl_trainer._metrics["train"].clear()
    trl_loss = trl_trainer.compute_loss(trl_trainer.model, trl_trainer.data_collator(list(trl_trainer.train_dataset)))
    trl_loss.backward()
    trl_grad_norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in trl_trainer.model.parameters())))
    trl_metrics = {k: v[-1] for k, v in trl_trainer._metrics["train"].items() if k != "num_tokens"}

    state = TrainState.create(jaxpt.models.from_pretrained(model_dir), optax.sgd(0.0))
    batch = tpo.collate(examples, accumulation_steps=1, buckets=[32])
    _, metrics = jax.device_get(tpo.make_train_step(cfg)(state, shard_batch(batch, None, batch_axis=1)))
    assert float(metrics["loss"]) == pytest.approx(float(trl_loss), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(trl_grad_norm, rel=1e-4)
    assert len(trl_metrics) == 10
    for key, value in trl_metrics.items():
        assert float(metrics[key]) == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_data_and_config_errors(tmp_path):
    with pytest.raises(ValueError, match="TPO needs a triple-preference dataset .* reference"):
        tpo.prepare_dataset(datasets.Dataset.from_list(preference_rows(2)), TOKENIZER, config(tmp_path))
    implicit = datasets.Dataset.from_list([{"chosen": "1+1=2", "rejected": "1+1=3", "reference": "2+2=4"}])
    with pytest.raises(ValueError, match="does not start with the prompt '1\\+1='"):
        tpo.prepare_dataset(implicit, TOKENIZER, config(tmp_path))
    with pytest.raises(ValueError, match="loss_type='simpo' is not a TPO loss"):
        config(tmp_path, loss_type="simpo")
    assert tpo.TPOConfig().beta == 0.01 and tpo.TPOConfig().learning_rate == 5e-7


def _one_step(cfg, examples, accumulation):
    state = TrainState.create(tiny_llama(VOCAB, seed=0), optax.sgd(1.0))
    batch = tpo.collate(examples, accumulation_steps=accumulation, buckets=[16, 32])
    state, metrics = tpo.make_train_step(cfg)(state, shard_batch(batch, None, batch_axis=1))
    return jax.device_get(metrics), {k: np.asarray(v) for k, v in nnx.to_flat_state(state.params)}


def test_accumulation_equals_one_big_batch(tmp_path):
    cfg = config(tmp_path, loss_type="tpo-l", beta=2.0)
    examples = tpo.prepare_dataset(datasets.Dataset.from_list(triples(8)), TOKENIZER, cfg)
    expected_metrics, expected_params = _one_step(cfg, examples, accumulation=1)
    metrics, params = _one_step(cfg, examples, accumulation=4)
    assert expected_metrics["grad_norm"] > 0
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for name, value in expected_params.items():
        np.testing.assert_allclose(params[name], value, rtol=1e-5, atol=1e-5, err_msg=str(name))


def test_train_raises_the_margin(tmp_path):
    cfg = config(tmp_path, beta=0.5, max_steps=24, logging_steps=4, learning_rate=3e-3)
    result = tpo.train(tiny_llama(VOCAB), TOKENIZER, datasets.Dataset.from_list(triples(32)), cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    assert {"rewards/margins", "entropy", "mean_token_accuracy", "logits/chosen"} <= set(first)
    assert last["loss"] < 0.75 * first["loss"]
    assert last["rewards/margins"] > first["rewards/margins"] + 0.5
    assert int(result.state.step) == 24
