"""PRM: TRL's old PRMTrainer tokenization (its documented layout), the loss against a float64 cross-entropy, the
step's accumulation, a tiny run whose step accuracy rises, and `jaxpt prm` exporting a token classifier that
`transformers` loads with the same logits."""

import json
import random

import datasets
import jax
import numpy as np
import optax
import pytest
import torch
import transformers

import jaxpt.models
from jaxpt import cli
from jaxpt.experimental import prm
from jaxpt.sharding import make_mesh, shard_batch
from jaxpt.train_state import TrainState
from tests.experimental.helpers import TOKENIZER, VOCAB
from tests.helpers import tiny_llama

BOS = TOKENIZER.bos_token_id


def ids(text):
    return TOKENIZER.convert_tokens_to_ids(list(text))


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, logging_steps=1, learning_rate=3e-3,
                    max_steps=4, save_steps=0, mesh_fsdp=1, disable_tqdm=True, save_final_model=False, seed=0)
    settings.update(overrides)
    return prm.PRMConfig(**settings)


def marked_rows(count, *, seed=0):
    """Steps of random letters; a step is right when it holds a '#' (half of them): separable at a glance."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        steps, labels = [], []
        for _ in range(rng.randint(2, 3)):
            step = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 4)))
            right = rng.random() < 0.5
            if right:
                cut = rng.randint(0, len(step))
                step = step[:cut] + "#" + step[cut:]
            steps.append(step)
            labels.append(right)
        rows.append({"prompt": "q" + "".join(rng.choice("xyz") for _ in range(2)) + "?", "completions": steps,
                     "labels": labels})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Data: TRL's tokenize_row layout
# ---------------------------------------------------------------------------------------------------------------

ROW = {"prompt": "Q?", "completions": ["ab", "c"], "labels": [True, False]}


def test_tokenize_row_layout():
    """BOS + prompt, each step followed by the separator; the step's label on the separator's last token, -100
    elsewhere (TRL's documented tokenize_row output)."""
    options = dict(step_separator="\n", max_length=None, max_prompt_length=None, max_completion_length=None,
                   train_on_last_step_only=False, is_eval=False)
    out = prm.tokenize_row(ROW, TOKENIZER, **options)
    assert out["input_ids"] == [BOS, *ids("Q?"), *ids("ab\n"), *ids("c\n")]
    assert out["labels"] == [-100] * 3 + [-100, -100, 1] + [-100, 0]
    # a two-token separator: the label on its last token
    out = prm.tokenize_row(ROW, TOKENIZER, **{**options, "step_separator": " |"})
    assert out["input_ids"] == [BOS, *ids("Q?"), *ids("ab |"), *ids("c |")]
    assert out["labels"] == [-100] * 3 + [-100, -100, -100, 1] + [-100, -100, 0]
    # last step only: in training, not in evaluation
    out = prm.tokenize_row(ROW, TOKENIZER, **{**options, "train_on_last_step_only": True})
    assert out["labels"] == [-100] * 6 + [-100, 0]
    out = prm.tokenize_row(ROW, TOKENIZER, **{**options, "train_on_last_step_only": True, "is_eval": True})
    assert out["labels"] == [-100] * 5 + [1, -100, 0]
    # prompt keeps its last tokens (BOS is cut first), completion its first, then the whole its first
    out = prm.tokenize_row(ROW, TOKENIZER, **{**options, "max_prompt_length": 2, "max_completion_length": 4})
    assert out["input_ids"] == [*ids("Q?"), *ids("ab\nc")]
    assert out["labels"] == [-100, -100, -100, -100, 1, -100]
    out = prm.tokenize_row(ROW, TOKENIZER, **{**options, "max_length": 5})
    assert out["input_ids"] == [BOS, *ids("Q?ab")] and out["labels"] == [-100] * 5


def test_prepare_dataset_and_collate(tmp_path):
    dataset = datasets.Dataset.from_list([ROW, {"prompt": "R", "completions": ["x"], "labels": [False]}])
    examples = prm.prepare_dataset(dataset, TOKENIZER, config(tmp_path))
    assert examples[1]["input_ids"].tolist() == [BOS, *ids("R"), *ids("x\n")]
    assert examples[1]["labels"].tolist() == [-100, -100, -100, 0]
    batch = prm.collate(examples, accumulation_steps=1, buckets=[8, 16], pad_token_id=0)
    assert batch["input_ids"].shape == (1, 2, 8)
    assert batch["labels"][0, 1].tolist() == [-100, -100, -100, 0, -100, -100, -100, -100]
    assert batch["attention_mask"][0, 1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_bad_data_and_config_fail_early(tmp_path):
    bad = [({"prompt": "Q", "completions": ["a", "b"], "labels": [True]}, "must hold one bool per step"),
           ({"prompt": "Q", "completions": [], "labels": []}, "must be a non-empty list of strings"),
           ({"prompt": [{"role": "user", "content": "Q"}], "completions": ["a"], "labels": [True]},
            "standard \\(text\\) rows only")]
    for row, message in bad:
        with pytest.raises(ValueError, match=message):
            prm.prepare_dataset(datasets.Dataset.from_list([row]), TOKENIZER, config(tmp_path))
    with pytest.raises(ValueError, match="lacks \\['labels'\\]"):
        prm.prepare_dataset(datasets.Dataset.from_list([{"prompt": "Q", "completions": ["a"]}]), TOKENIZER,
                            config(tmp_path))
    with pytest.raises(ValueError, match="No example keeps a labelled step"):
        prm.prepare_dataset(datasets.Dataset.from_list([ROW]), TOKENIZER, config(tmp_path, max_length=3))
    with pytest.raises(ValueError, match="step_separator='' is empty"):
        config(tmp_path, step_separator="")
    with pytest.raises(ValueError, match="max_prompt_length=0 must be >= 1"):
        config(tmp_path, max_prompt_length=0)
    with pytest.raises(ValueError, match="num_labels=1, but a process reward model has two"):
        prm.check_token_classifier(tiny_llama(VOCAB, num_labels=1))
    defaults = prm.PRMConfig()
    assert (defaults.learning_rate, defaults.max_length, defaults.max_prompt_length, defaults.max_completion_length,
            defaults.step_separator, defaults.train_on_last_step_only) == (1e-5, 1024, 512, None, "\n", False)


# ---------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------


def test_loss_against_float64_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6, 2)) * 2
    labels = np.where(rng.random((3, 6)) < 0.5, -100, rng.integers(0, 2, (3, 6)))
    labels[0, 0] = 1
    loss, metrics = prm.prm_loss(np.float32(logits), labels)
    mask = labels != -100
    logps = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.mean([logps[b, t, labels[b, t]] for b, t in zip(*np.nonzero(mask), strict=True)])
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(logits.argmax(-1)[mask] == labels[mask]))
    # normalised by a whole step's labelled tokens: halves of the batch add up to the whole
    half = lambda x: prm.prm_loss(np.float32(logits[x]), labels[x], num_labelled=mask.sum())[0]
    assert float(half(slice(0, 1)) + half(slice(1, 3))) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Step and training
# ---------------------------------------------------------------------------------------------------------------


def test_accumulation_on_a_mesh_matches_one_big_batch(tmp_path):
    """Two micro-batches on a 2-device data-parallel mesh take the step of one big batch on one device."""
    examples = prm.prepare_dataset(datasets.Dataset.from_list(marked_rows(4)), TOKENIZER, config(tmp_path))
    outputs = []
    for accumulation, mesh in ((1, None), (2, make_mesh(data=2, fsdp=1, devices=jax.devices()[:2]))):
        batch = prm.collate(examples, accumulation_steps=accumulation, buckets=[32], pad_token_id=0)
        state = TrainState.create(tiny_llama(VOCAB, num_labels=2, seed=1), optax.sgd(0.1), mesh=mesh)  # donated
        step = prm.make_train_step(config(tmp_path), mesh=mesh, state_sharding=state.shardings(mesh))
        state, metrics = step(state, shard_batch(batch, mesh, batch_axis=1))
        outputs.append((float(metrics["loss"]), float(metrics["accuracy"]), state.params))
    assert outputs[0][0] == pytest.approx(outputs[1][0], rel=1e-5)
    assert outputs[0][1] == pytest.approx(outputs[1][1])
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(abs(a - b).max()), outputs[0][2],
                                            outputs[1][2]))) < 1e-5


def test_step_accuracy_rises(tmp_path):
    """A few steps on the '#' task: held-out step accuracy goes from chance to mostly right."""
    cfg = config(tmp_path, max_steps=12, eval_strategy="steps", eval_steps=12, per_device_eval_batch_size=16)
    train_set, eval_set = datasets.Dataset.from_list(marked_rows(96)), datasets.Dataset.from_list(
        marked_rows(16, seed=1))
    model = tiny_llama(VOCAB, num_labels=2, seed=0)
    eval_examples = prm.prepare_dataset(eval_set, TOKENIZER, cfg, is_eval=True)
    state = TrainState.create(model, optax.sgd(0.0))
    before = prm.evaluate(prm.make_eval_step(cfg), state, eval_examples, cfg, None, [32], 0)
    result = prm.train(model, TOKENIZER, train_set, cfg, eval_dataset=eval_set)
    after = [row for row in result.metrics if "eval_accuracy" in row][-1]
    trained = [row for row in result.metrics if "accuracy" in row]
    assert before["eval_accuracy"] < 0.65
    assert after["eval_accuracy"] > 0.75 and after["eval_loss"] < before["eval_loss"] - 0.1
    assert trained[-1]["accuracy"] > trained[0]["accuracy"]


def test_command_exports_a_token_classifier(tmp_path):
    """`jaxpt prm` end to end; transformers' AutoModelForTokenClassification loads the export with jaxpt's
    per-token logits."""
    model_dir = tmp_path / "model"
    jaxpt.models.save_pretrained(tiny_llama(VOCAB, num_labels=2), model_dir)
    TOKENIZER.save_pretrained(model_dir)
    data_file = tmp_path / "steps.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in marked_rows(8)))
    out = tmp_path / "out"
    argv = ["prm", "--model_name_or_path", str(model_dir), "--dataset_name", str(data_file), "--output_dir",
            str(out), "--max_steps", "2", "--per_device_train_batch_size", "4", "--mesh_fsdp", "1",
            "--logging_steps", "1", "--save_steps", "0", "--disable_tqdm", "true", "--learning_rate", "1e-3"]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and all("accuracy" in r for r in rows if "loss" in r)
    exported = jaxpt.models.from_pretrained(out / "final", num_labels=2)
    hf = transformers.AutoModelForTokenClassification.from_pretrained(out / "final").eval()
    assert type(hf).__name__ == "LlamaForTokenClassification"
    input_ids = np.asarray([[BOS, *ids("qxy?ab#\nc\n")]])
    mask = np.ones_like(input_ids)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(np.asarray(prm.token_logits(exported, input_ids, mask)), expected, atol=1e-4)
