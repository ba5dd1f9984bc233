"""CPO (with SimPO and AlphaPO): every loss type against TRL 1.16's own `CPOTrainer.cpo_loss`, the whole step
against `CPOTrainer.compute_loss` on the same model, the step's accumulation and mesh, and training."""

import json
import tempfile
from types import SimpleNamespace

import datasets
import jax
import numpy as np
import optax
import pytest
import torch
import transformers
import trl.experimental.cpo  # a test dependency: parity must fail, never skip, without it
from flax import nnx

import jaxpt.models
from jaxpt.experimental import cpo
from jaxpt.sharding import shard_batch
from jaxpt.train_state import TrainState
from tests.experimental.helpers import TOKENIZER, VOCAB, preference_rows, save_tiny_model
from tests.helpers import tiny_llama


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), max_length=32, per_device_train_batch_size=4, logging_steps=1,
                    learning_rate=1e-3, max_steps=4, save_steps=0, mesh_fsdp=1, disable_tqdm=True,
                    save_final_model=False, seed=0)
    settings.update(overrides)
    return cpo.CPOConfig(**settings)


ROWS = [{"prompt": r["prompt"] + "ab", "chosen": r["chosen"] * 3, "rejected": r["rejected"]}
        for r in preference_rows(6)]

LOSS_CASES = [
    dict(loss_type="sigmoid"),
    dict(loss_type="sigmoid", label_smoothing=0.2, alpha=0.5),
    dict(loss_type="hinge", beta=0.5),
    dict(loss_type="hinge", alpha=-0.3),
    dict(loss_type="ipo", beta=0.3),
    dict(loss_type="ipo", alpha=0.7),
    dict(loss_type="simpo", beta=2.0, simpo_gamma=0.7),
    dict(loss_type="simpo", beta=2.0, label_smoothing=0.1, alpha=0.25, cpo_alpha=0.0),
    dict(loss_type="alphapo", beta=2.5, alpha=0.5),
]


@pytest.mark.parametrize("options", LOSS_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_loss_type_matches_trl_cpo_loss(tmp_path, options):
    """TRL's own cpo_loss on fixed per-sequence log-probs (sums; TRL's caller averages them for ipo/simpo):
    per-pair losses, rewards, and the gradient with respect to the log-probs."""
    cfg = config(tmp_path, **options)  # alphapo -> simpo with cpo_alpha 0, as TRL's config
    rng = np.random.default_rng(1)
    chosen_sums, rejected_sums = -rng.uniform(0.5, 12.0, 6), -rng.uniform(0.5, 12.0, 6)
    lengths = np.array([[3, 5], [4, 2], [6, 6], [1, 7], [2, 2], [5, 3]])
    normalise = cfg.loss_type in ("ipo", "simpo")
    trl_inputs = [torch.tensor(s / (n if normalise else 1), dtype=torch.float64, requires_grad=True)
                  for s, n in ((chosen_sums, lengths[:, 0]), (rejected_sums, lengths[:, 1]))]
    trl_self = SimpleNamespace(alpha=cfg.alpha, loss_type=cfg.loss_type, beta=cfg.beta,
                               simpo_gamma=cfg.simpo_gamma, label_smoothing=cfg.label_smoothing,
                               accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards = trl.experimental.cpo.CPOTrainer.cpo_loss(trl_self, *trl_inputs)
    losses.mean().backward()

    def loss(chosen, rejected):
        no_tokens = np.zeros((6, 1))
        return cpo.cpo_loss(chosen, rejected, lengths[:, 0], lengths[:, 1], no_tokens, no_tokens, beta=cfg.beta,
                            loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing, cpo_alpha=cfg.cpo_alpha,
                            simpo_gamma=cfg.simpo_gamma, alpha=cfg.alpha)

    (value, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(chosen_sums, rejected_sums)
    assert float(value) == pytest.approx(float(losses.mean()), rel=1e-5)
    assert float(metrics["rewards/chosen"]) == pytest.approx(float(chosen_rewards.mean()), rel=1e-5)
    assert float(metrics["rewards/margins"]) == pytest.approx(float((chosen_rewards - rejected_rewards).mean()),
                                                              rel=1e-5, abs=1e-7)
    for grad, trl_input, length in zip(grads, trl_inputs, lengths.T, strict=True):
        # d/d(sum) = d/d(mean) / length for the length-normalised types
        expected = trl_input.grad.numpy() / (length if normalise else 1)
        np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-4, atol=1e-8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("cpo_model"))


@pytest.mark.parametrize("options", [dict(loss_type="sigmoid", label_smoothing=0.1, cpo_alpha=0.5),
                                     dict(loss_type="simpo", beta=2.0, alpha=0.3, cpo_alpha=1.0)],
                         ids=["sigmoid", "simpo-alphapo"])
def test_step_matches_trl_compute_loss(model_dir, tmp_path, options):
    """CPOTrainer.compute_loss on the same model and pairs (TRL's tokenization, NLL over the chosen completions):
    loss, gradient norm and every metric but logits/* (TRL averages those over every position of the padded batch;
    jaxpt over the completion tokens, as its DPO does)."""
    args = trl.experimental.cpo.CPOConfig(output_dir=tempfile.mkdtemp(), bf16=False, report_to="none", use_cpu=True,
                                          gradient_checkpointing=False, max_length=32, **options)
    trainer = trl.experimental.cpo.CPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(model_dir),
                                              args=args, train_dataset=datasets.Dataset.from_list(ROWS),
                                              processing_class=TOKENIZER)
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(list(trainer.train_dataset)))
    trl_loss.backward()
    trl_grad_norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in trainer.model.parameters())))
    trl_metrics = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}

    cfg = config(tmp_path, **options)
    examples = cpo.prepare_dataset(datasets.Dataset.from_list(ROWS), TOKENIZER, cfg)
    for example, expected in zip(examples, trainer.train_dataset, strict=True):  # TRL's tokens
        assert example["rejected_input_ids"].tolist() == expected["rejected_input_ids"]
        assert example["chosen_completion_mask"].tolist() == [int(x != -100) for x in expected["chosen_labels"]]
    state = TrainState.create(jaxpt.models.from_pretrained(model_dir), optax.sgd(0.0))
    batch = cpo.collate(examples, accumulation_steps=1, buckets=[32])
    _, metrics = jax.device_get(cpo.make_train_step(cfg)(state, shard_batch(batch, None, batch_axis=1)))
    assert float(metrics["loss"]) == pytest.approx(float(trl_loss), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(trl_grad_norm, rel=1e-4)
    compared = set(trl_metrics) - {"logits/chosen", "logits/rejected"}
    assert len(compared) == 7
    for key in compared:
        assert float(metrics[key]) == pytest.approx(trl_metrics[key], rel=1e-4, abs=1e-6), key


def test_config_names_and_errors(tmp_path):
    alphapo = cpo.CPOConfig(loss_type="alphapo", alpha=0.5)
    assert (alphapo.loss_type, alphapo.cpo_alpha) == ("simpo", 0.0)  # TRL's shorthand
    assert cpo.CPOConfig().learning_rate == 1e-6 and cpo.CPOConfig().simpo_gamma == 0.5
    with pytest.raises(ValueError, match="loss_type='kto_pair' is not a CPO loss"):
        config(tmp_path, loss_type="kto_pair")
    with pytest.raises(ValueError, match="label_smoothing=0.1 has no meaning for loss_type='hinge'"):
        config(tmp_path, loss_type="hinge", label_smoothing=0.1)


def _one_step(cfg, examples, accumulation):
    state = TrainState.create(tiny_llama(VOCAB, seed=0), optax.sgd(1.0))
    step = cpo.make_train_step(cfg)
    batch = cpo.collate(examples, accumulation_steps=accumulation, buckets=[16, 32])
    state, metrics = step(state, shard_batch(batch, None, batch_axis=1))
    return jax.device_get(metrics), {k: np.asarray(v) for k, v in nnx.to_flat_state(state.params)}


def test_accumulation_equals_one_big_batch(tmp_path):
    """batch 8 x accumulation 1 == batch 2 x accumulation 4 (pairs and completion tokens differ per micro-batch);
    the mesh path is the same `jit_step` as ORPO's, whose test runs it on 8 devices."""
    cfg = config(tmp_path, loss_type="simpo", beta=2.0, alpha=0.3, cpo_alpha=0.5)
    examples = cpo.prepare_dataset(datasets.Dataset.from_list(preference_rows(8)), TOKENIZER, cfg)
    expected_metrics, expected_params = _one_step(cfg, examples, accumulation=1)
    metrics, params = _one_step(cfg, examples, accumulation=4)
    assert expected_metrics["grad_norm"] > 0 and expected_metrics["nll_loss"] > 0
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for name, value in expected_params.items():  # SGD with learning rate 1: the gradients themselves
        np.testing.assert_allclose(params[name], value, rtol=1e-5, atol=1e-5, err_msg=str(name))


def test_train_raises_the_margin(tmp_path):
    """SimPO (reference-free, length-normalised) learns to prefer the right sums on the pairs it sees."""
    rows = preference_rows(32)
    cfg = config(tmp_path, loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.5, max_steps=24,
                 logging_steps=4, learning_rate=3e-3)
    result = cpo.train(tiny_llama(VOCAB), TOKENIZER, datasets.Dataset.from_list(rows), cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    assert {"rewards/margins", "logps/chosen", "nll_loss", "logits/chosen"} <= set(first)
    assert first["nll_loss"] == 0.0  # cpo_alpha=0: no NLL term
    assert last["loss"] < 0.75 * first["loss"]
    assert last["rewards/margins"] > first["rewards/margins"] + 0.5
    assert last["rewards/accuracies"] > 0.8
    assert int(result.state.step) == 24
