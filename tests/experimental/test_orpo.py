"""ORPO: TRL 1.16's ORPOTrainer tokenization, loss and metrics, the step (accumulation, mesh), training, and the
first step of `jaxpt orpo` against `ORPOTrainer.train()`."""

import json
import tempfile

import datasets
import jax
import numpy as np
import optax
import pytest
import torch
import transformers
import trl.experimental.orpo  # a test dependency: parity must fail, never skip, without it
from flax import nnx

import jaxpt.models
from jaxpt import cli
from jaxpt.experimental import orpo
from jaxpt.sharding import make_mesh, shard_batch
from jaxpt.train_state import TrainState
from tests.experimental.helpers import TOKENIZER, VOCAB, preference_rows, save_tiny_model
from tests.helpers import tiny_llama


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), max_length=32, per_device_train_batch_size=4, logging_steps=1,
                    learning_rate=1e-3, max_steps=4, save_steps=0, mesh_fsdp=1, disable_tqdm=True,
                    save_final_model=False, seed=0)
    settings.update(overrides)
    return orpo.ORPOConfig(**settings)


ROWS = [{"prompt": r["prompt"] + "ab", "chosen": r["chosen"] * 3, "rejected": r["rejected"]}
        for r in preference_rows(6)]
CHAT_ROWS = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yo"}],
              "rejected": [{"role": "assistant", "content": "no!"}]},
             {"prompt": [{"role": "user", "content": "1+1"}], "chosen": [{"role": "assistant", "content": "2"}],
              "rejected": [{"role": "assistant", "content": "11"}]}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("orpo_model"))


def trl_trainer(model_dir, rows, **options):
    args = trl.experimental.orpo.ORPOConfig(output_dir=tempfile.mkdtemp(), bf16=False, report_to="none",
                                            use_cpu=True, gradient_checkpointing=False, **options)
    return trl.experimental.orpo.ORPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(model_dir),
                                             args=args, train_dataset=datasets.Dataset.from_list(rows),
                                             processing_class=TOKENIZER)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,max_length", [
    (ROWS, 32),
    (ROWS, 9),  # completions cut to fit, prompts kept
    (CHAT_ROWS, 64),
    ([{"chosen": "2+2=4", "rejected": "2+2=5"}], 32),  # implicit prompt
], ids=["standard", "truncated", "conversational", "implicit"])
def test_tokens_match_trl(model_dir, tmp_path, rows, max_length):
    trainer = trl_trainer(model_dir, rows, max_length=max_length)
    examples = orpo.prepare_dataset(datasets.Dataset.from_list(rows), TOKENIZER, config(tmp_path,
                                                                                        max_length=max_length))
    for example, expected in zip(examples, trainer.train_dataset, strict=True):
        for side in ("chosen", "rejected"):
            assert example[f"{side}_input_ids"].tolist() == expected[f"{side}_input_ids"]
            assert example[f"{side}_completion_mask"].tolist() == [int(x != -100) for x in expected[f"{side}_labels"]]


def test_bad_data_and_config_fail_early(tmp_path):
    with pytest.raises(ValueError, match="ORPO needs a preference"):
        orpo.prepare_dataset(datasets.Dataset.from_list([{"prompt": "x", "completion": "y"}]), TOKENIZER,
                             config(tmp_path))
    with pytest.raises(ValueError, match="Example 0: the prompt is 9 tokens, so max_length=8 leaves no chosen"):
        orpo.prepare_dataset(datasets.Dataset.from_list([{"prompt": "a" * 8, "chosen": "b", "rejected": "c"}]),
                             TOKENIZER, config(tmp_path, max_length=8))
    with pytest.raises(ValueError, match="beta=-1.0 must be >= 0"):
        config(tmp_path, beta=-1.0)
    assert orpo.ORPOConfig().learning_rate == 1e-6 and orpo.ORPOConfig().beta == 0.1


# ---------------------------------------------------------------------------------------------------------------
# Loss against TRL
# ---------------------------------------------------------------------------------------------------------------


def test_loss_formula_in_float64():
    """orpo_loss against the paper's formula computed independently in float64 (masked pairs and tokens)."""
    rng = np.random.default_rng(0)
    chosen, rejected = -rng.uniform(0.05, 3.0, 5), -rng.uniform(0.05, 3.0, 5)
    token_logps, token_mask = -rng.uniform(0, 4, (5, 7)), rng.integers(0, 2, (5, 7))
    pair_mask = np.array([1, 1, 0, 1, 1], bool)
    loss, metrics = orpo.orpo_loss(chosen, rejected, token_logps, token_mask, beta=0.3, pair_mask=pair_mask)
    odds = lambda logp: logp - np.log(1 - np.exp(logp))
    log_odds = odds(chosen) - odds(rejected)
    ratio = -np.log1p(np.exp(-log_odds))
    nll = -(token_logps * token_mask).sum() / token_mask.sum()
    assert float(loss) == pytest.approx(nll - 0.3 * ratio[pair_mask].mean(), rel=1e-6)
    assert float(metrics["log_odds_chosen"]) == pytest.approx(log_odds[pair_mask].mean(), rel=1e-5)
    assert float(metrics["rewards/margins"]) == pytest.approx(0.3 * (chosen - rejected)[pair_mask].mean(), rel=1e-5)


def test_loss_and_metrics_match_trl(model_dir, tmp_path):
    """ORPOTrainer.compute_loss (TRL 1.16) on the same model and pairs: loss, gradient norm and every metric but
    logits/*, which TRL averages over every position of the padded batch (padding and prompt included); jaxpt
    averages over the completion tokens, checked here against the model's logits directly."""
    trainer = trl_trainer(model_dir, ROWS, max_length=32, beta=0.25)
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grad_norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in trainer.model.parameters())))
    trl_metrics = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}

    cfg = config(tmp_path, beta=0.25)
    examples = orpo.prepare_dataset(datasets.Dataset.from_list(ROWS), TOKENIZER, cfg)
    state = TrainState.create(jaxpt.models.from_pretrained(model_dir), optax.sgd(0.0))
    collated = orpo.collate(examples, accumulation_steps=1, buckets=[32])
    _, metrics = jax.device_get(orpo.make_train_step(cfg)(state, shard_batch(collated, None, batch_axis=1)))
    assert float(metrics["loss"]) == pytest.approx(float(trl_loss), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(trl_grad_norm, rel=1e-4)
    compared = set(trl_metrics) - {"logits/chosen", "logits/rejected"}
    assert len(compared) == 9
    for key in compared:
        assert float(metrics[key]) == pytest.approx(trl_metrics[key], rel=1e-4, abs=1e-6), key
    with torch.no_grad():
        for row, side in ((0, "chosen"), (1, "rejected")):
            ids = torch.tensor(collated["input_ids"][0, :, row])
            logits = trainer.model(ids, attention_mask=torch.tensor(collated["attention_mask"][0, :, row])).logits
            predicts = torch.tensor(collated["completion_mask"][0, :, row])[:, 1:].bool()  # position t predicts t+1
            expected = logits[:, :-1].mean(-1)[predicts].mean()
            assert float(metrics[f"logits/{side}"]) == pytest.approx(float(expected), rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Step
# ---------------------------------------------------------------------------------------------------------------


def _one_step(cfg, examples, accumulation, mesh=None):
    """One step with SGD, so updated parameters compare gradients directly."""
    state = TrainState.create(tiny_llama(VOCAB, seed=0), optax.sgd(1.0), mesh=mesh)
    step = orpo.make_train_step(cfg, mesh=mesh, state_sharding=state.shardings(mesh))
    batch = orpo.collate(examples, accumulation_steps=accumulation, buckets=[16, 32])
    state, metrics = step(state, shard_batch(batch, mesh, batch_axis=1))
    return jax.device_get(metrics), {k: np.asarray(v) for k, v in nnx.to_flat_state(state.params)}


def test_accumulation_and_mesh_equal_one_big_batch(tmp_path):
    """batch 8 x accumulation 1 == batch 2 x accumulation 4 == an 8-device mesh: same loss, metrics, parameters."""
    cfg = config(tmp_path)
    examples = orpo.prepare_dataset(datasets.Dataset.from_list(preference_rows(8)), TOKENIZER, cfg)
    expected_metrics, expected_params = _one_step(cfg, examples, accumulation=1)
    assert expected_metrics["grad_norm"] > 0
    for metrics, params in (_one_step(cfg, examples, accumulation=4),
                            _one_step(cfg, examples, accumulation=1, mesh=make_mesh(data=2, fsdp=2, tensor=2))):
        for key, value in expected_metrics.items():
            assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        for name, value in expected_params.items():
            np.testing.assert_allclose(params[name], value, atol=1e-6, err_msg=str(name))


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_lowers_the_loss_and_raises_the_odds_ratio(tmp_path):
    rows = preference_rows(32)
    cfg = config(tmp_path, max_steps=24, logging_steps=4, eval_strategy="steps", eval_steps=12, beta=1.0,
                 learning_rate=3e-3)
    result = orpo.train(tiny_llama(VOCAB), TOKENIZER, datasets.Dataset.from_list(rows), cfg,
                        eval_dataset=datasets.Dataset.from_list(rows[:6]))
    records = read_metrics(tmp_path)
    train_records = [r for r in records if "loss" in r]
    first, last = train_records[0], train_records[-1]
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/margins", "logits/chosen"} <= set(first)
    assert last["loss"] < 0.75 * first["loss"]
    assert last["nll_loss"] < first["nll_loss"]
    assert last["log_odds_chosen"] > first["log_odds_chosen"] + 0.3
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [12, 24] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert int(result.state.step) == 24


def test_first_step_of_the_command_matches_trl_train(model_dir, tmp_path):
    """`jaxpt orpo` and `ORPOTrainer.train()` from the same tiny model on the same pairs, one AdamW step: the same
    loss, gradient norm and metrics, and the same updated weights."""
    rows = ROWS[:4]
    data_file = tmp_path / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = dict(learning_rate=1e-3, max_length=32, beta=0.2, max_steps=1, per_device_train_batch_size=4,
                   logging_steps=1)
    trainer = trl_trainer(model_dir, rows, **options, save_strategy="no")
    trainer.train()
    trl_log = trainer.state.log_history[0]

    out = tmp_path / "out"
    argv = ["orpo", "--model_name_or_path", str(model_dir), "--dataset_name", str(data_file), "--output_dir",
            str(out), "--mesh_fsdp", "1", "--disable_tqdm", "true", "--save_steps", "0"]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    assert cli.main(argv) == 0
    (record,) = read_metrics(out)
    for key in ("loss", "grad_norm", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen",
                "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert record[key] == pytest.approx(trl_log[key], rel=1e-4, abs=1e-6), key
    trained = transformers.AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    for name, value in trainer.model.state_dict().items():
        # Adam's first step moves each weight by about lr * sign(gradient): equal up to float noise
        np.testing.assert_allclose(trained[name].numpy(), value.numpy(), atol=1e-5, err_msg=name)
