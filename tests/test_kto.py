"""KTO: data preparation (TRL formats, KL pairs), the jitted step (TRL parity, accumulation, mesh, precomputed
reference) and the training loop."""

import functools
import json
import warnings

import datasets
import jax
import numpy as np
import optax
import pytest
import transformers
from flax import nnx

import jaxpt.models
from jaxpt import kto
from jaxpt.sharding import make_mesh, shard_batch
from jaxpt.train_state import TrainState
from tests.helpers import char_tokenizer, tiny_llama

TOKENIZER = char_tokenizer()
VOCAB = len(TOKENIZER)


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), max_length=32, per_device_train_batch_size=4, logging_steps=1,
                    learning_rate=3e-3, max_steps=4, save_steps=0, mesh_fsdp=1, disable_tqdm=True,
                    save_final_model=False, seed=0)
    settings.update(overrides)
    return kto.KTOConfig(**settings)


def arithmetic_kto(count: int, *, seed: int = 0) -> list[dict]:
    """Unpaired examples "a+b=" -> the right sum (desirable) or a wrong one (undesirable), alternating."""
    rng = np.random.RandomState(seed)
    rows = []
    for i in range(count):
        a, b = rng.randint(0, 10, 2)
        desirable = i % 2 == 0
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b if desirable else (a + b + 3) % 19),
                     "label": desirable})
    return rows


def policy_model(seed=0):
    return tiny_llama(VOCAB, seed=seed, num_hidden_layers=1)


def reference_model():
    """A reference whose random logits are more spread than the policy's: it gives the mismatched completions
    lower log-probs, so the KL estimate is positive (not clamped to 0) and the tests exercise it."""
    return tiny_llama(VOCAB, seed=1, num_hidden_layers=1, initializer_range=0.5)


def decode(ids):
    return TOKENIZER.decode(ids)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def test_unpaired_standard_data_gets_eos(tmp_path):
    dataset = datasets.Dataset.from_list([{"prompt": "2+2=", "completion": "4", "label": True},
                                          {"prompt": "1+1=", "completion": "3</s>", "label": False}])
    first, second = kto.prepare_dataset(dataset, TOKENIZER, config(tmp_path))
    assert (decode(first["prompt_ids"]), decode(first["completion_ids"]), first["label"]) == ("2+2=", "4</s>", True)
    assert (decode(second["completion_ids"]), second["label"]) == ("3</s>", False)  # no second EOS


def test_unpaired_conversational_data_uses_the_chat_template(tmp_path):
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}],
                                           "completion": [{"role": "assistant", "content": "yo"}], "label": False}])
    (example,) = kto.prepare_dataset(dataset, TOKENIZER, config(tmp_path))
    assert decode(example["prompt_ids"]) == "<|user|>hi<|end|><|assistant|>"  # with the generation prompt
    assert decode(example["completion_ids"]) == "yo<|end|>"
    assert example["label"] is False


def test_paired_data_is_unpaired_as_trl_does(tmp_path):
    from trl.data_utils import unpair_preference_dataset

    paired = datasets.Dataset.from_list([{"prompt": f"{i}=", "chosen": "a", "rejected": "b"} for i in range(3)])
    examples = kto.prepare_dataset(paired, TOKENIZER, config(tmp_path))
    trl_rows = list(unpair_preference_dataset(paired))
    assert [(decode(e["prompt_ids"]), decode(e["completion_ids"]), e["label"]) for e in examples] == [
        (r["prompt"], r["completion"] + "</s>", r["label"]) for r in trl_rows]
    assert [e["label"] for e in examples] == [True, True, True, False, False, False]
    # Implicit prompts are extracted first (the longest common prefix).
    implicit = datasets.Dataset.from_list([{"chosen": "1+1=2", "rejected": "1+1=3"}])
    chosen, rejected = kto.prepare_dataset(implicit, TOKENIZER, config(tmp_path))
    assert (decode(chosen["prompt_ids"]), decode(chosen["completion_ids"])) == ("1+1=", "2</s>")
    assert (decode(rejected["prompt_ids"]), decode(rejected["completion_ids"])) == ("1+1=", "3</s>")


def test_collate_pairs_each_prompt_with_the_previous_completion(tmp_path):
    rows = [{"prompt": p, "completion": c, "label": label} for p, c, label in
            [("ab", "x", True), ("cde", "yy", False), ("f", "zzzzzzz", True)]]
    examples = kto.prepare_dataset(datasets.Dataset.from_list(rows), TOKENIZER, config(tmp_path))
    batch = kto.collate(examples + [None], accumulation_steps=2, buckets=[8, 16], max_length=8)
    assert batch["input_ids"].shape == (2, 2, 8) and batch["label"].tolist() == [[1, 0], [1, 0]]
    rows_of = lambda key: batch[key].reshape(4, -1)  # noqa: E731
    texts = [decode(ids[mask > 0]) for ids, mask in zip(rows_of("input_ids"), rows_of("attention_mask"), strict=True)]
    assert texts == ["abx</s>", "cdeyy</s>", "fzzzzzzz", ""]  # truncated to max_length, keeping the start
    kl_rows = zip(rows_of("kl_input_ids"), rows_of("kl_attention_mask"), strict=True)
    kl_texts = [decode(ids[mask > 0]) for ids, mask in kl_rows]
    assert kl_texts == ["abzzzzzz", "cdex</s>", "fyy</s>", ""]  # (x1, y3), (x2, y1), (x3, y2); padding row empty
    assert rows_of("kl_completion_mask")[1].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert rows_of("completion_mask")[3].sum() == 0
    apo = kto.collate(examples + [None], accumulation_steps=1, buckets=[16], with_kl=False)
    assert "kl_input_ids" not in apo and apo["input_ids"].shape == (1, 4, 16)


@pytest.mark.parametrize("rows,message", [
    ([{"question": "x"}], "Cannot tell the dataset format"),
    ([{"prompt": "x", "completion": "y"}], "KTO needs .* look like prompt_completion"),
    ([{"prompt": "a" * 40, "completion": "b", "label": True}], "the prompt is 40 tokens, not shorter than max_len"),
    ([{"prompt": "a", "completion": "b", "label": "good"}], "label='good'; KTO labels are booleans"),
])
def test_bad_data_fails_before_compiling(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        kto.prepare_dataset(datasets.Dataset.from_list(rows), TOKENIZER, config(tmp_path))


def test_empty_dataset_and_missing_chat_template(tmp_path):
    with pytest.raises(ValueError, match="KTO dataset is empty"):
        kto.prepare_dataset(datasets.Dataset.from_dict({"prompt": [], "completion": [], "label": []}), TOKENIZER,
                            config(tmp_path))
    conversational = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}],
                                                  "completion": [{"role": "assistant", "content": "yo"}],
                                                  "label": True}])
    with pytest.raises(ValueError, match="no chat template"):
        kto.prepare_dataset(conversational, char_tokenizer(chat_template=False), config(tmp_path))


@pytest.mark.parametrize("overrides,message", [
    ({"loss_type": "sigmoid"}, "loss_type='sigmoid' is not a KTO loss"),
    ({"train_sampling_strategy": "group_by_length"}, "train_sampling_strategy='group_by_length'"),
    ({"precompute_ref_log_probs": True, "train_sampling_strategy": "random"}, "needs train_sampling_strategy="),
    ({"desirable_weight": -1.0}, "desirable_weight=-1.0 must be >= 0"),
])
def test_config_validation_names_the_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)


def test_kto_needs_two_examples_per_step(tmp_path):
    dataset = datasets.Dataset.from_list(arithmetic_kto(4))
    with pytest.raises(ValueError, match="a step needs at least 2"):
        kto.train(None, TOKENIZER, dataset, config(tmp_path, per_device_train_batch_size=1))  # fails before the model


# ---------------------------------------------------------------------------------------------------------------
# Step
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_step_matches_trl(tmp_path, loss_type):
    """The same weights and data through TRL 1.16's KTOTrainer.compute_loss and jaxpt's eval step."""
    import torch
    from trl import KTOConfig as TRLKTOConfig
    from trl import KTOTrainer

    jaxpt.models.save_pretrained(policy_model(), tmp_path / "policy")
    jaxpt.models.save_pretrained(reference_model(), tmp_path / "ref")
    dataset = datasets.Dataset.from_list(arithmetic_kto(6))
    settings = dict(beta=0.3, desirable_weight=1.2, undesirable_weight=0.9, max_length=32, loss_type=loss_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = KTOTrainer(
            model=transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "policy"),
            ref_model=transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ref"),
            args=TRLKTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=6, report_to="none",
                              bf16=False, use_cpu=True, disable_tqdm=True, **settings),
            train_dataset=dataset, processing_class=TOKENIZER)
        trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
        trainer.model.eval()
        with torch.no_grad():
            trl_loss = float(trainer.compute_loss(trainer.model, trl_batch))
    trl_metrics = {key: values[-1] for key, values in trainer._metrics["eval"].items() if key != "num_tokens"}

    cfg = config(tmp_path, per_device_train_batch_size=6, **settings)
    batch = kto.collate(kto.prepare_dataset(dataset, TOKENIZER, cfg), accumulation_steps=1, buckets=[32],
                        max_length=32, with_kl=loss_type == "kto")
    for key in (["input_ids", "completion_mask"] + (["KL_input_ids"] if loss_type == "kto" else [])):
        trl_rows, ours = trl_batch[key].numpy(), batch[key.lower()][0]
        np.testing.assert_array_equal(ours[:, :trl_rows.shape[1]], trl_rows, err_msg=key)
    state = TrainState.create(jaxpt.models.from_pretrained(tmp_path / "policy"), optax.sgd(1.0))
    _, ref_params, _ = kto.reference_params(jaxpt.models.from_pretrained(tmp_path / "ref"))
    metrics = jax.device_get(kto.make_eval_step(cfg)(state, shard_batch(batch, None), ref_params))
    assert float(metrics["loss"]) == pytest.approx(trl_loss, rel=1e-5)
    assert set(trl_metrics) == set(metrics) - {"loss", "num_examples"}
    for key, value in trl_metrics.items():
        assert float(metrics[key]) == pytest.approx(value, rel=1e-4, abs=1e-6), key
    if loss_type == "kto":
        assert metrics["kl"] > 0.1  # the mismatched pairs really entered


def step_examples():
    examples = kto.prepare_dataset(datasets.Dataset.from_list(arithmetic_kto(8)), TOKENIZER, config("unused"))
    examples[1]["label"] = examples[3]["label"] = True  # micro-batches with different label mixes
    return examples


@functools.lru_cache
def one_step(accumulation, mesh_shape=None, precomputed=False):
    """One step on `step_examples()` with SGD, so updated parameters compare gradients directly (Adam's first step
    is about lr * sign(g) and amplifies float noise in near-zero gradients). Cached: several tests compare the
    same runs."""
    cfg = config("unused")
    examples = step_examples()
    mesh = make_mesh(**dict(mesh_shape)) if mesh_shape else None
    state = TrainState.create(policy_model(), optax.sgd(1.0), mesh=mesh)
    ref_graphdef, ref_params, ref_sharding = kto.reference_params(reference_model(), mesh)
    if precomputed:
        examples = kto.precompute_ref_logps(examples, ref_graphdef, ref_params, cfg, group_size=len(examples),
                                            buckets=[16, 32], mesh=mesh, ref_sharding=ref_sharding)
        ref_params, ref_sharding = None, None
    step = kto.make_train_step(cfg, mesh=mesh, state_sharding=state.shardings(mesh), ref_sharding=ref_sharding)
    batch = kto.collate(examples, accumulation_steps=accumulation, buckets=[16, 32])
    state, metrics = step(state, shard_batch(batch, mesh, batch_axis=1), ref_params)
    return jax.device_get(metrics), {k: np.asarray(v) for k, v in nnx.to_flat_state(state.params)}


def assert_same_step(a, b):
    (metrics_a, params_a), (metrics_b, params_b) = a, b
    assert set(metrics_a) == set(metrics_b)
    for key in metrics_a:
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=1e-5, abs=1e-5), key
    for name in params_a:
        np.testing.assert_allclose(params_b[name], params_a[name], atol=1e-6, err_msg=str(name))


def test_accumulation_equals_one_big_batch():
    """batch 8 x accumulation 1 == batch 2 x accumulation 4: the KL pairs are formed over the whole step, the KL
    estimate is the mean over all of them (computed before the gradient pass), and the loss is divided by the
    step's 8 examples, not by each micro-batch's 2 (the reference differs from the policy, so the rewards and the
    KL estimate are far from 0)."""
    big = one_step(accumulation=1)
    assert big[0]["kl"] > 0.1 and abs(big[0]["rewards/margins"]) > 0.01
    assert_same_step(big, one_step(accumulation=4))


def test_eight_device_mesh_equals_unsharded():
    assert_same_step(one_step(accumulation=1), one_step(accumulation=1, mesh_shape=(("data", 2), ("fsdp", 2),
                                                                                   ("tensor", 2))))


def test_precomputed_reference_equals_reference_params():
    assert_same_step(one_step(accumulation=4), one_step(accumulation=4, precomputed=True))
    step = kto.make_train_step(config("unused"))
    batch = shard_batch(kto.collate(step_examples(), accumulation_steps=1, buckets=[32]), None)
    with pytest.raises(ValueError, match="needs the reference: pass ref_params"):
        step(TrainState.create(policy_model(), optax.sgd(1.0)), batch)


# ---------------------------------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------------------------------


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_separates_desirable_from_undesirable_and_writes_trl_metrics(tmp_path):
    dataset = datasets.Dataset.from_list(arithmetic_kto(64))
    eval_dataset = datasets.Dataset.from_list(arithmetic_kto(8, seed=1))
    cfg = config(tmp_path, max_steps=24, logging_steps=4, per_device_train_batch_size=8, eval_strategy="steps",
                 eval_steps=12, save_final_model=True, learning_rate=5e-3, beta=0.5)
    result = kto.train(policy_model(), TOKENIZER, dataset, cfg, eval_dataset=eval_dataset)
    records = read_metrics(tmp_path)
    train_records = [r for r in records if "loss" in r]
    assert {"step", "epoch", "loss", "grad_norm", "learning_rate", "num_tokens", "kl", "entropy", "rewards/chosen",
            "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen",
            "logits/rejected"} == set(train_records[0])
    assert train_records[0]["rewards/margins"] == pytest.approx(0.0, abs=0.05)
    margins = [r["rewards/margins"] for r in train_records]
    assert margins[-1] > 0.5 and (margins[-1] + margins[-2]) / 2 > (margins[0] + margins[1]) / 2 + 0.5
    assert train_records[-1]["rewards/chosen"] > train_records[-1]["rewards/rejected"]
    assert train_records[-1]["loss"] < 0.9 * train_records[0]["loss"]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [12, 24]
    assert min(r["eval_rewards/margins"] for r in evals) > 0.1  # held-out prompts: it generalises a little
    assert {"eval_kl", "eval_rewards/chosen", "eval_logps/rejected", "eval_entropy"} <= set(evals[0])
    # The export is the trained model: transformers gives jaxpt's logits.
    import torch

    ids = np.asarray([TOKENIZER("3+4=")["input_ids"]])
    with torch.no_grad():
        exported = transformers.AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
        expected = exported(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(result.state.model()(ids)), expected, atol=1e-4)


def test_precomputed_run_and_metrics_of_steps_without_one_kind(tmp_path):
    """A step without desirable examples has no rewards/chosen: the window averages the steps where it is defined.
    With the reference precomputed from the policy itself and no update, every reward is exactly 0, in training
    and in evaluation (6 examples in batches of 4: the padding rows count for nothing)."""
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1), "label": i >= 4} for i in range(8)]  # step 1: none
    cfg = config(tmp_path, max_steps=2, logging_steps=2, learning_rate=0.0, precompute_ref_log_probs=True,
                 eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
    kto.train(policy_model(), TOKENIZER, datasets.Dataset.from_list(rows), cfg,
              eval_dataset=datasets.Dataset.from_list(rows[2:]))
    record, evaluation = read_metrics(tmp_path)
    assert record["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)  # step 2's value only, not NaN
    assert record["rewards/rejected"] == pytest.approx(0.0, abs=1e-6) and record["kl"] == pytest.approx(0.0, abs=1e-6)
    assert record["loss"] == pytest.approx(0.5, abs=1e-6)  # 1 - σ(0)
    assert "rewards/margins" not in record  # no step had both kinds
    assert evaluation["eval_loss"] == pytest.approx(0.5, abs=1e-6)
    for key in ("eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins", "eval_kl"):
        assert evaluation[key] == pytest.approx(0.0, abs=1e-6), key
