"""Reward modelling: data preparation, the jitted step (accumulation, mesh) and the training loop."""

import json

import datasets
import jax
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

import jaxpt.models
from jaxpt import reward
from jaxpt.sharding import make_mesh, shard_batch
from jaxpt.train_state import TrainState
from tests.helpers import char_tokenizer, marker_preferences, tiny_llama

TOKENIZER = char_tokenizer()
VOCAB = len(TOKENIZER)


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), max_length=32, per_device_train_batch_size=4, logging_steps=1,
                    learning_rate=3e-3, max_steps=4, save_steps=0, mesh_fsdp=1, disable_tqdm=True,
                    save_final_model=False, seed=0)
    settings.update(overrides)
    return reward.RewardConfig(**settings)


def decode(ids):
    return TOKENIZER.decode(ids)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def test_explicit_and_implicit_prompt_give_the_same_sequences(tmp_path):
    explicit = datasets.Dataset.from_list([{"prompt": "Q:", "chosen": "yes", "rejected": "no</s>"}])
    implicit = datasets.Dataset.from_list([{"chosen": "Q:yes", "rejected": "Q:no"}])
    (pair,) = reward.prepare_dataset(explicit, TOKENIZER, config(tmp_path))
    assert decode(pair["chosen_ids"]) == "Q:yes</s>"  # the prompt is scored with the answer; EOS added once
    assert decode(pair["rejected_ids"]) == "Q:no</s>"
    assert "margin" not in pair
    (same,) = reward.prepare_dataset(implicit, TOKENIZER, config(tmp_path))
    assert same["chosen_ids"].tolist() == pair["chosen_ids"].tolist()
    assert same["rejected_ids"].tolist() == pair["rejected_ids"].tolist()
    (custom_eos,) = reward.prepare_dataset(implicit, TOKENIZER, config(tmp_path, eos_token="<|end|>"))
    assert decode(custom_eos["chosen_ids"]) == "Q:yes<|end|>"


def test_conversational_pairs_use_the_chat_template_without_eos(tmp_path):
    user, yes, no = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                     {"role": "assistant", "content": "no"})
    explicit = datasets.Dataset.from_list([{"prompt": [user], "chosen": [yes], "rejected": [no], "margin": 1.5}])
    (pair,) = reward.prepare_dataset(explicit, TOKENIZER, config(tmp_path))
    assert decode(pair["chosen_ids"]) == "<|user|>hi<|end|><|assistant|>yo<|end|>"
    assert decode(pair["rejected_ids"]) == "<|user|>hi<|end|><|assistant|>no<|end|>"
    assert pair["margin"] == np.float32(1.5)
    implicit = datasets.Dataset.from_list([{"chosen": [user, yes], "rejected": [user, no]}])
    (same,) = reward.prepare_dataset(implicit, TOKENIZER, config(tmp_path))
    assert same["chosen_ids"].tolist() == pair["chosen_ids"].tolist()


def test_long_pairs_are_dropped_not_truncated(tmp_path, caplog):
    rows = [{"chosen": "a" * 5, "rejected": "b"}, {"chosen": "c", "rejected": "d" * 9},
            {"chosen": "e", "rejected": "f"}]
    pairs = reward.prepare_dataset(datasets.Dataset.from_list(rows), TOKENIZER, config(tmp_path, max_length=6))
    assert [decode(p["chosen_ids"]) for p in pairs] == ["aaaaa</s>", "e</s>"]  # 6 tokens is still allowed
    assert "Dropped 1 of 3 preference pairs longer than max_length=6" in caplog.text
    assert len(reward.prepare_dataset(datasets.Dataset.from_list(rows), TOKENIZER, config(tmp_path,
                                                                                          max_length=None))) == 3
    with pytest.raises(ValueError, match="Every one of the 3 preference pairs is longer than max_length=1"):
        reward.prepare_dataset(datasets.Dataset.from_list(rows), TOKENIZER, config(tmp_path, max_length=1))


@pytest.mark.parametrize("rows,message", [
    ([{"prompt": "x", "completion": "y"}],
     r"Reward needs a preference \(prompt, chosen, rejected\) or implicit_preference \(chosen, rejected\) dataset, "
     r"but the columns \['completion', 'prompt'\] look like prompt_completion"),
    ([{"text": "x"}], "look like language_modeling"),
    ([{"question": "x"}], "Cannot tell the dataset format"),
])
def test_wrong_format_names_the_detected_format_and_the_columns(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        reward.prepare_dataset(datasets.Dataset.from_list(rows), TOKENIZER, config(tmp_path))


def test_empty_dataset_missing_chat_template_and_bad_eos(tmp_path):
    with pytest.raises(ValueError, match="The Reward dataset is empty"):
        reward.prepare_dataset(datasets.Dataset.from_dict({"chosen": [], "rejected": []}), TOKENIZER, config(tmp_path))
    conversational = datasets.Dataset.from_list([{"chosen": [{"role": "user", "content": "a"}],
                                                  "rejected": [{"role": "user", "content": "b"}]}])
    with pytest.raises(ValueError, match="no chat template"):
        reward.prepare_dataset(conversational, char_tokenizer(chat_template=False), config(tmp_path))
    with pytest.raises(ValueError, match="eos_token='<eot>' is not in the tokenizer's vocabulary"):
        reward.prepare_dataset(datasets.Dataset.from_list([{"chosen": "a", "rejected": "b"}]), TOKENIZER,
                               config(tmp_path, eos_token="<eot>"))


def test_a_causal_lm_or_a_multi_label_classifier_is_refused(tmp_path):
    dataset = datasets.Dataset.from_list(marker_preferences(8))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM \(a causal language model\): load it with "
                                         r"jaxpt.models.from_pretrained\(path, num_labels=1\)"):
        reward.train(nnx.eval_shape(lambda: tiny_llama(VOCAB)), TOKENIZER, dataset, config(tmp_path))
    with pytest.raises(ValueError, match="num_labels=2, but a reward model outputs one scalar"):
        reward.train(nnx.eval_shape(lambda: tiny_llama(VOCAB, num_labels=2)), TOKENIZER, dataset, config(tmp_path))


def test_config_validation_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="center_rewards_coefficient=-1.0 must be >= 0"):
        config(tmp_path, center_rewards_coefficient=-1.0)
    assert reward.RewardConfig().learning_rate == 1e-4 and reward.RewardConfig().max_length == 1024
    assert reward.RewardConfig().center_rewards_coefficient is None


def test_collate_keeps_each_pair_in_one_row(tmp_path):
    rows = [{"chosen": "ab", "rejected": "c", "margin": 0.5}, {"chosen": "d", "rejected": "efg", "margin": 2.0}]
    pairs = reward.prepare_dataset(datasets.Dataset.from_list(rows), TOKENIZER, config(tmp_path))
    batch = reward.collate(pairs, accumulation_steps=2, buckets=[3, 8], pad_token_id=0)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 1, 2, 8)  # longest 4 -> bucket 8
    assert [decode(batch["input_ids"][0, 0, i]) for i in (0, 1)] == ["ab</s><pad><pad><pad><pad><pad>",
                                                                      "c</s><pad><pad><pad><pad><pad><pad>"]
    assert batch["attention_mask"][1, 0].sum(-1).tolist() == [2, 4]
    assert batch["margin"].tolist() == [[0.5], [2.0]]


# ---------------------------------------------------------------------------------------------------------------
# Step
# ---------------------------------------------------------------------------------------------------------------


def _pairs(tmp_path, count=8, margin=False):
    rows = marker_preferences(count)
    if margin:
        rows = [{**row, "margin": 0.25 * i} for i, row in enumerate(rows)]
    return reward.prepare_dataset(datasets.Dataset.from_list(rows), TOKENIZER, config(tmp_path))


def _one_step(cfg, pairs, accumulation, mesh=None, seed=0, **model_overrides):
    """One step with SGD, so updated parameters compare gradients directly (Adam's first step is about
    lr * sign(g) and amplifies float noise in near-zero gradients)."""
    model = tiny_llama(VOCAB, seed=seed, num_labels=1, **model_overrides)
    state = TrainState.create(model, optax.sgd(1.0), mesh=mesh)
    step = reward.make_train_step(cfg, mesh=mesh, state_sharding=state.shardings(mesh))
    batch = reward.collate(pairs, accumulation_steps=accumulation, buckets=[16, 32])
    state, metrics = step(state, shard_batch(batch, mesh, batch_axis=1))
    return jax.device_get(metrics), {k: np.asarray(v) for k, v in nnx.to_flat_state(state.params)}


def test_step_loss_is_the_bradley_terry_loss_of_the_model_scores(tmp_path):
    """The step's loss and metrics are the numpy formula applied to the classifier's scores of each sequence.
    (The config and batch of the accumulation test's accumulated step: one compiled step for both.)"""
    cfg = config(tmp_path, center_rewards_coefficient=0.1)
    pairs = _pairs(tmp_path, margin=True)
    sequences = [ids for p in pairs for ids in (p["chosen_ids"], p["rejected_ids"])]
    encoded = TOKENIZER.pad({"input_ids": [s.tolist() for s in sequences]}, return_tensors="np")
    model = tiny_llama(VOCAB, num_labels=1, initializer_range=0.5)  # rewards of order 1, not 0.01
    scores = jax.jit(lambda ids, mask: model(ids, attention_mask=mask))(
        encoded["input_ids"], encoded["attention_mask"])[:, 0]
    chosen, rejected = np.asarray(scores[0::2], np.float64), np.asarray(scores[1::2], np.float64)
    margin = np.asarray([p["margin"] for p in pairs], np.float64)
    expected = np.mean(np.log1p(np.exp(-(chosen - rejected - margin)))) + 0.1 * np.mean((chosen + rejected) ** 2)
    metrics, _ = _one_step(cfg, pairs, accumulation=4, initializer_range=0.5)
    assert np.abs(chosen).max() > 0.3 and 0 < np.mean(chosen > rejected) < 1
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(np.mean(chosen > rejected))
    assert metrics["margin"] == pytest.approx(np.mean(chosen - rejected), rel=1e-4, abs=1e-6)
    assert metrics["min_reward"] == pytest.approx(min(chosen.min(), rejected.min()), rel=1e-4, abs=1e-6)
    assert metrics["max_reward"] == pytest.approx(max(chosen.max(), rejected.max()), rel=1e-4, abs=1e-6)
    assert metrics["mean_reward"] == pytest.approx(np.mean([chosen, rejected]), rel=1e-4, abs=1e-6)


def test_accumulation_equals_one_big_batch(tmp_path):
    """batch 8 x accumulation 1 == batch 2 x accumulation 4: same loss, metrics and updated parameters."""
    cfg = config(tmp_path, center_rewards_coefficient=0.1)
    pairs = _pairs(tmp_path, margin=True)
    metrics_1, params_1 = _one_step(cfg, pairs, accumulation=1)
    metrics_4, params_4 = _one_step(cfg, pairs, accumulation=4)
    for key in ("loss", "accuracy", "margin", "min_reward", "mean_reward", "max_reward", "grad_norm"):
        assert metrics_4[key] == pytest.approx(metrics_1[key], rel=1e-5, abs=1e-7), key
    for name in params_1:
        np.testing.assert_allclose(params_4[name], params_1[name], atol=1e-6, err_msg=str(name))


def test_eight_device_mesh_equals_unsharded(tmp_path):
    """(The unsharded step is the accumulation test's unaccumulated one: compiled once.)"""
    cfg = config(tmp_path, center_rewards_coefficient=0.1)
    pairs = _pairs(tmp_path, margin=True)
    metrics, params = _one_step(cfg, pairs, accumulation=1)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    mesh_metrics, mesh_params = _one_step(cfg, pairs, accumulation=1, mesh=mesh)
    for key in ("loss", "accuracy", "margin", "grad_norm"):
        assert mesh_metrics[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-7), key
    for name in params:
        np.testing.assert_allclose(mesh_params[name], params[name], atol=1e-6, err_msg=str(name))


# ---------------------------------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------------------------------


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


TRL_NAMES = {"step", "epoch", "loss", "grad_norm", "learning_rate", "num_tokens", "accuracy", "margin", "min_reward",
             "mean_reward", "max_reward"}


def test_train_learns_the_preference_writes_trl_metrics_and_exports(tmp_path):
    dataset = datasets.Dataset.from_list(marker_preferences(64))
    eval_dataset = datasets.Dataset.from_list(marker_preferences(10, seed=1))  # not a multiple of the eval batch
    cfg = config(tmp_path, max_steps=30, logging_steps=10, save_final_model=True, eval_strategy="steps",
                 eval_steps=30, per_device_eval_batch_size=4)
    result = reward.train(tiny_llama(VOCAB, num_labels=1), TOKENIZER, dataset, cfg, eval_dataset=eval_dataset)
    records = read_metrics(tmp_path)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [10, 20, 30]
    assert set(train_records[0]) == TRL_NAMES
    assert train_records[-1]["loss"] < 0.5 * train_records[0]["loss"]
    assert train_records[-1]["accuracy"] > train_records[0]["accuracy"] and train_records[-1]["accuracy"] >= 0.9
    assert train_records[-1]["num_tokens"] > train_records[0]["num_tokens"]
    (evaluation,) = [r for r in records if "eval_loss" in r]
    assert set(evaluation) == {"step"} | {f"eval_{k}" for k in ("loss", "accuracy", "margin", "min_reward",
                                                                  "mean_reward", "max_reward")}
    assert evaluation["eval_accuracy"] >= 0.9
    assert evaluation["eval_loss"] < 0.5 * np.log(2)  # the untrained head scores ~0: loss log 2
    # The export loads in transformers as a classifier and gives jaxpt's scores, padded batches included.
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(result.model_dir).eval()
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == TOKENIZER.pad_token_id
    encoded = TOKENIZER(["ab?c#d</s>", "ab?cd</s>", "x</s>"], padding=True, return_tensors="np")
    with torch.no_grad():
        expected = hf(torch.tensor(encoded["input_ids"]), attention_mask=torch.tensor(encoded["attention_mask"]))
    ours = result.state.model()(encoded["input_ids"], attention_mask=encoded["attention_mask"])
    np.testing.assert_allclose(ours, expected.logits.numpy(), atol=1e-4)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    dataset = datasets.Dataset.from_list(marker_preferences(16))
    full = config(tmp_path / "full", max_steps=5)
    reward.train(tiny_llama(VOCAB, num_labels=1), TOKENIZER, dataset, full)

    # The same run, killed while preparing step 4 (after the checkpoint at step 2) ...
    interrupted = config(tmp_path / "resumed", max_steps=5, save_steps=2)
    real_collate, calls = reward.collate, []

    def crashing_collate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated crash")
        return real_collate(*args, **kwargs)

    monkeypatch.setattr(reward, "collate", crashing_collate)
    with pytest.raises(KeyboardInterrupt):
        reward.train(tiny_llama(VOCAB, num_labels=1), TOKENIZER, dataset, interrupted)
    monkeypatch.setattr(reward, "collate", real_collate)
    # ... then resumed (from a differently initialised model: everything must come from the checkpoint).
    reward.train(tiny_llama(VOCAB, seed=123, num_labels=1), TOKENIZER, dataset,
                 interrupted.replace(resume_from_checkpoint="latest"))
    expected = read_metrics(tmp_path / "full")
    resumed = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]  # step 3 ran, was lost, ran again and is logged once
    for key in ("loss", "accuracy", "margin", "num_tokens"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in expected], rel=1e-6), key


def test_same_sequences_loss_and_metrics_as_trl(tmp_path):
    """TRL's RewardTrainer on the same data and weights: identical token ids (prompt joining, EOS, conversational
    rendering, max_length filter, margins) and the same loss and metrics on one batch of all pairs."""
    import trl  # a test dependency: parity must fail, never skip, without it

    model = tiny_llama(VOCAB, num_labels=1, initializer_range=0.5)
    jaxpt_dir = tmp_path / "model"
    jaxpt.models.save_pretrained(model, jaxpt_dir)
    user = {"role": "user", "content": "hi"}
    standard = [{**row, "margin": 0.1 * i} for i, row in enumerate(marker_preferences(8))]
    standard.append({"prompt": "x", "chosen": "y" * 30, "rejected": "z", "margin": 0.0})  # dropped: too long
    conversational = [{"chosen": [user, {"role": "assistant", "content": row["chosen"]}],
                       "rejected": [user, {"role": "assistant", "content": row["rejected"]}]}
                      for row in marker_preferences(8, seed=1)]
    for rows in (standard, conversational):
        dataset = datasets.Dataset.from_list(rows)
        args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), report_to="none", max_length=20, bf16=False,
                                use_cpu=True, center_rewards_coefficient=0.01)
        trainer = trl.RewardTrainer(model=transformers.AutoModelForSequenceClassification.from_pretrained(jaxpt_dir),
                                    args=args, processing_class=TOKENIZER, train_dataset=dataset)
        cfg = config(tmp_path, max_length=20, center_rewards_coefficient=0.01)
        pairs = reward.prepare_dataset(dataset, TOKENIZER, cfg)
        expected = list(trainer.train_dataset)
        assert [(p["chosen_ids"].tolist(), p["rejected_ids"].tolist()) for p in pairs] == [
            (list(e["chosen_ids"]), list(e["rejected_ids"])) for e in expected]
        features = [{k: e[k] for k in ("chosen_ids", "rejected_ids", "margin") if k in e} for e in expected]
        trainer.model.train()
        trl_loss = trainer.compute_loss(trainer.model, dict(trainer.data_collator(features))).item()
        trl_metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
        batch = reward.collate(pairs, accumulation_steps=1, buckets=[32], pad_token_id=TOKENIZER.pad_token_id)
        ours = jax.device_get(reward.make_eval_step(cfg)(TrainState.create(model, optax.sgd(0.0)), batch))
        assert float(ours["loss"]) == pytest.approx(trl_loss, rel=1e-5)
        for key in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward"):
            assert float(ours[key]) == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key
        assert trl_metrics["num_tokens"] == batch["attention_mask"].sum()
