"""The command line end to end: `jaxpt <method> --model_name_or_path DIR --dataset_name FILE --output_dir OUT`."""

import json
import subprocess
import sys

import numpy as np
import pytest
import transformers

import jaxpt.models
from jaxpt import cli
from tests.helpers import arithmetic_texts, char_tokenizer, marker_preferences, tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(directory)
    jaxpt.models.save_pretrained(tiny_llama(len(tokenizer)), directory)
    return directory


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def check_export(output_dir, auto_class=transformers.AutoModelForCausalLM):
    final = output_dir / "final"
    model = auto_class.from_pretrained(final)
    assert (final / "tokenizer.json").exists()
    return model


def test_sft_command_trains_and_exports(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_texts(48))
    out = tmp_path / "out"
    config = tmp_path / "sft.yaml"
    config.write_text("max_steps: 24\nlogging_steps: 6\nlearning_rate: 0.003\nper_device_train_batch_size: 4\n")
    code = cli.main(["sft", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir",
                     str(out), "--config", str(config), "--max_length", "16", "--mesh_fsdp", "1",
                     "--disable_tqdm", "true", "--completion_only_loss", "false"])
    assert code == 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == [6, 12, 18, 24]
    assert {"loss", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy", "num_tokens"} <= set(records[0])
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    check_export(out)


def test_reward_command_trains_a_classifier_and_exports(model_dir, tmp_path):
    """`jaxpt reward` puts a fresh one-label head on the causal LM checkpoint, trains it, and exports a classifier
    that transformers scores exactly as jaxpt does."""
    data = write_jsonl(tmp_path / "pairs.jsonl", marker_preferences(48))
    out = tmp_path / "out"
    code = cli.main(["reward", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir",
                     str(out), "--max_steps", "24", "--logging_steps", "6", "--learning_rate", "0.003",
                     "--per_device_train_batch_size", "4", "--max_length", "32", "--mesh_fsdp", "1",
                     "--disable_tqdm", "true", "--center_rewards_coefficient", "0.01"])
    assert code == 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == [6, 12, 18, 24]
    assert {"loss", "grad_norm", "learning_rate", "num_tokens", "accuracy", "margin", "min_reward", "mean_reward",
            "max_reward"} <= set(records[0])
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    assert records[-1]["accuracy"] > records[0]["accuracy"]
    hf = check_export(out, transformers.AutoModelForSequenceClassification).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "final")
    encoded = tokenizer(["ab?c#d</s>", "ab?cd</s>", "x</s>"], padding=True, return_tensors="np")
    import torch

    with torch.no_grad():
        expected = hf(torch.tensor(encoded["input_ids"]), attention_mask=torch.tensor(encoded["attention_mask"]))
    ours = jaxpt.models.from_pretrained(out / "final", num_labels=1)(encoded["input_ids"],
                                                                     attention_mask=encoded["attention_mask"])
    assert expected.logits.shape == (3, 1)
    np.testing.assert_allclose(np.asarray(ours), expected.logits.numpy(), atol=1e-4)


def test_kto_command_trains_and_exports(model_dir, tmp_path):
    """`jaxpt kto` on unpaired data (right sums desirable, wrong ones undesirable), reference = the loaded model."""
    rows = [{"prompt": r["prompt"], "completion": r["completion"] if i % 2 == 0 else str(int(r["completion"]) + 3),
             "label": i % 2 == 0} for i, r in enumerate(arithmetic_texts(64))]
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    out = tmp_path / "out"
    code = cli.main(["kto", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir",
                     str(out), "--max_steps", "16", "--logging_steps", "8", "--learning_rate", "0.005", "--beta", "0.5",
                     "--per_device_train_batch_size", "8", "--max_length", "16", "--mesh_fsdp", "1",
                     "--disable_tqdm", "true"])
    assert code == 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == [8, 16]
    assert {"loss", "grad_norm", "learning_rate", "num_tokens", "kl", "entropy", "rewards/chosen", "rewards/rejected",
            "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"} <= set(records[0])
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"]
    check_export(out)


def test_dpo_command_trains_and_exports(model_dir, tmp_path):
    """`jaxpt dpo` on explicit-prompt pairs (right sum chosen, wrong one rejected), reference log-probs
    precomputed from the loaded model."""
    rows = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": str(int(r["completion"]) + 2)}
            for r in arithmetic_texts(32)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    code = cli.main(["dpo", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir",
                     str(out), "--max_steps", "24", "--logging_steps", "6", "--learning_rate", "0.003", "--beta", "0.5",
                     "--per_device_train_batch_size", "4", "--max_length", "16", "--mesh_fsdp", "1",
                     "--loss_type", "sigmoid", "--precompute_ref_log_probs", "true", "--disable_tqdm", "true"])
    assert code == 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == [6, 12, 18, 24]
    assert {"loss", "grad_norm", "learning_rate", "num_tokens", "rewards/chosen", "rewards/rejected",
            "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen",
            "logits/rejected", "entropy", "mean_token_accuracy"} <= set(records[0])
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"]
    check_export(out)


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_online_commands_train_with_named_and_imported_rewards(model_dir, tmp_path, method):
    """`jaxpt grpo|rloo --reward_funcs ...`: a named reward and one imported by path; the reward rises."""
    rows = [{"prompt": f"{a}+{b}=", "solution": str(a + b)} for a in range(4) for b in range(4)]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out"
    code = cli.main([method, "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir",
                     str(out), "--reward_funcs", "accuracy_reward", "tests.test_grpo.digits_reward",
                     "--num_generations", "4", "--per_device_train_batch_size", "8", "--max_completion_length", "6",
                     "--learning_rate", "0.03", "--max_steps", "16", "--logging_steps", "4", "--mesh_fsdp", "1",
                     "--disable_tqdm", "true", "--beta", "0.0"])
    assert code == 0
    records = read_metrics(out)
    assert {"reward", "rewards/accuracy_reward/mean", "rewards/digits_reward/mean", "loss"} <= set(records[0])
    assert records[-1]["rewards/digits_reward/mean"] > records[0]["rewards/digits_reward/mean"]
    check_export(out)


def test_online_command_without_rewards_fails(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+1="}] * 8)
    with pytest.raises(ValueError, match="Pass --reward_funcs"):
        cli.main(["grpo", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir",
                  str(tmp_path / "out")])


def test_yaml_with_unknown_key_is_rejected(model_dir, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("max_stepz: 3\n")
    with pytest.raises(ValueError, match="Unknown keys in the --config file: \\['max_stepz'\\]"):
        cli.main(["sft", "--model_name_or_path", str(model_dir), "--dataset_name", "x", "--config", str(config)])


@pytest.mark.parametrize("argv,message", [
    (["--use_vllm"], "--use_vllm: TRL's option has no counterpart in jaxpt: jaxpt samples in-process"),
    (["--vllm_mode", "server"], "--vllm_mode: .*not vLLM"),
    (["--cache_implementation=static"], "--cache_implementation: .*its own KV cache"),
    (["--generation_kwargs", '{"num_beams": 2}'], "generation_kwargs has 'num_beams'"),
])
def test_trl_generation_options_without_counterpart_fail_with_the_reason(tmp_path, argv, message):
    """TRL's GRPO/RLOO options that cannot apply to jaxpt's in-process sampler fail before anything loads, saying
    why (not argparse's bare "unrecognized arguments"), on the command line and in a --config file."""
    base = ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=message):
        cli.main(["rloo", *base, *argv])
    config = tmp_path / "vllm.yaml"
    config.write_text("use_vllm: true\n")
    with pytest.raises(ValueError, match="--use_vllm: TRL's option has no counterpart"):
        cli.main(["grpo", *base, "--config", str(config)])


def test_smoke_command_runs_as_an_installed_script(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxpt.cli", "smoke", "--output_dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert "logits (1, 8, 256) float32" in out
    ids = np.arange(1, 9)[None]
    reloaded = jaxpt.models.from_pretrained(tmp_path)
    assert np.isfinite(np.asarray(reloaded(ids))).all()


@pytest.mark.parametrize("command", ["sft", "dpo", "reward", "kto", "grpo", "rloo", "demo", "smoke"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--output_dir" in capsys.readouterr().out
