"""`jaxpt <command>`: the command line.

    jaxpt sft    --model_name_or_path DIR --dataset_name PATH_OR_ID --output_dir OUT [SFTConfig fields ...]
    jaxpt dpo    ... [DPOConfig fields]        jaxpt reward ... [RewardConfig fields]
    jaxpt kto    ... [KTOConfig fields]        jaxpt grpo / rloo ... --reward_funcs accuracy,format
    jaxpt plan   --model_name_or_path CONFIG --method sft --mesh fsdp=64 ...   per-device cost, no weights (plan -h)
    jaxpt smoke  [--output_dir DIR]            build a tiny random Llama, save it, load it, print logits
    jaxpt demo   [--output_dir DIR]            the embedded end-to-end run (SFT then GRPO on arithmetic)

Arguments are the fields of the method's config dataclass with TRL's names (`jaxpt sft --help` lists them),
parsed by `transformers.HfArgumentParser`; `--config file.yaml` supplies defaults that command-line flags
override. `--dataset_name` is a local .json/.jsonl/.parquet/.csv file, a directory, or a Hub dataset id.
`output_dir` receives `metrics.jsonl`, `checkpoints/` and `final/` (the model in Hugging Face format).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import dataclass, field


@dataclass
class ScriptArguments:
    """Which data to train on (TRL's `ScriptArguments`)."""

    dataset_name: str = field(metadata={"help": "Local data file/directory or Hugging Face Hub dataset id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (Hub)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on (eval_strategy)."})


@dataclass
class ModelConfig:
    """Which model to start from (TRL's `ModelConfig`)."""

    model_name_or_path: str = field(metadata={"help": "Hugging Face checkpoint directory or Hub id."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})


def parse(config_class, argv: list[str], *extra):
    """`(ScriptArguments, ModelConfig, config, *extra)` from argv, with `--config file.yaml` defaults."""
    import yaml
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ScriptArguments, ModelConfig, config_class, *extra))
    argv = list(argv)
    if "--config" in argv:
        index = argv.index("--config")
        with open(argv[index + 1]) as f:
            defaults = yaml.safe_load(f) or {}
        del argv[index:index + 2]
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise ValueError(f"Unknown keys in the --config file: {unknown}.")
        parser.set_defaults(**defaults)
        for action in parser._actions:  # YAML values satisfy required arguments
            if action.dest in defaults:
                action.required = False
    return parser.parse_args_into_dataclasses(args=argv)


def load_model_and_data(script_args, model_args, config, *, num_labels=None):
    import jax
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    import jaxpt.models
    from jaxpt import data

    bf16 = config.bf16 if config.bf16 is not None else jax.default_backend() != "cpu"
    model = jaxpt.models.from_pretrained(model_args.model_name_or_path, num_labels=num_labels,
                                         dtype=jnp.bfloat16 if bf16 else jnp.float32, seed=config.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path or model_args.model_name_or_path)
    train_set = data.load_dataset(script_args.dataset_name, split=script_args.dataset_train_split,
                                  config_name=script_args.dataset_config)
    eval_set = None
    if config.eval_strategy != "no":
        eval_set = data.load_dataset(script_args.dataset_name, split=script_args.dataset_test_split,
                                     config_name=script_args.dataset_config)
    return model, tokenizer, train_set, eval_set


def sft_command(argv: list[str]) -> int:
    from jaxpt import sft

    script_args, model_args, config = parse(sft.SFTConfig, argv)
    model, tokenizer, train_set, eval_set = load_model_and_data(script_args, model_args, config)
    result = sft.train(model, tokenizer, train_set, config, eval_dataset=eval_set)
    print(f"Trained {result.state.step} steps; metrics in {config.output_dir}/metrics.jsonl; model in "
          f"{result.model_dir}")
    return 0


def reward_command(argv: list[str]) -> int:
    from jaxpt import reward

    script_args, model_args, config = parse(reward.RewardConfig, argv)
    model, tokenizer, train_set, eval_set = load_model_and_data(script_args, model_args, config, num_labels=1)
    result = reward.train(model, tokenizer, train_set, config, eval_dataset=eval_set)
    print(f"Trained {result.state.step} steps; metrics in {config.output_dir}/metrics.jsonl; reward model in "
          f"{result.model_dir}")
    return 0


def dpo_command(argv: list[str]) -> int:
    from jaxpt import dpo

    script_args, model_args, config = parse(dpo.DPOConfig, argv)
    model, tokenizer, train_set, eval_set = load_model_and_data(script_args, model_args, config)
    result = dpo.train(model, tokenizer, train_set, config, eval_dataset=eval_set)
    print(f"Trained {result.state.step} steps; metrics in {config.output_dir}/metrics.jsonl; model in "
          f"{result.model_dir}")
    return 0


def kto_command(argv: list[str]) -> int:
    from jaxpt import kto

    script_args, model_args, config = parse(kto.KTOConfig, argv)
    model, tokenizer, train_set, eval_set = load_model_and_data(script_args, model_args, config)
    result = kto.train(model, tokenizer, train_set, config, eval_dataset=eval_set)  # reference: the loaded model
    print(f"Trained {result.state.step} steps; metrics in {config.output_dir}/metrics.jsonl; model in "
          f"{result.model_dir}")
    return 0


@dataclass
class RewardArguments:
    """Where GRPO / RLOO rewards come from (TRL's GRPO script arguments)."""

    reward_funcs: list[str] | None = field(default=None, metadata={
        "help": "Reward functions: accuracy_reward, exact_match_reward, think_format_reward, "
                "get_soft_overlong_punishment, or an import path like my_lib.rewards.custom_reward."})
    reward_model_name_or_path: str | None = field(default=None, metadata={
        "help": "A sequence classifier (HF format, num_labels=1) scoring prompt + completion."})


def _online_command(method_module, config_class, argv: list[str]) -> int:
    from transformers import AutoTokenizer

    import jaxpt.models
    from jaxpt import rewards

    script_args, model_args, config, reward_args = parse(config_class, argv, RewardArguments)
    model, tokenizer, train_set, eval_set = load_model_and_data(script_args, model_args, config)
    reward_funcs = [rewards.resolve_reward_function(name) for name in reward_args.reward_funcs or []]
    if reward_args.reward_model_name_or_path:
        path = reward_args.reward_model_name_or_path
        reward_funcs.append(rewards.model_reward(jaxpt.models.from_pretrained(path, num_labels=1),
                                                 AutoTokenizer.from_pretrained(path)))
    if not reward_funcs:
        raise ValueError("Pass --reward_funcs (and/or --reward_model_name_or_path): nothing scores the completions.")
    result = method_module.train(model, tokenizer, train_set, config, reward_funcs=reward_funcs,
                                 eval_dataset=eval_set)
    print(f"Trained {result.state.step} steps; metrics in {config.output_dir}/metrics.jsonl; model in "
          f"{result.model_dir}")
    return 0


def grpo_command(argv: list[str]) -> int:
    from jaxpt import grpo

    return _online_command(grpo, grpo.GRPOConfig, argv)


def rloo_command(argv: list[str]) -> int:
    from jaxpt import rloo

    return _online_command(rloo, rloo.RLOOConfig, argv)


def demo(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="jaxpt demo", description="SFT then GRPO on a bundled arithmetic task.")
    parser.add_argument("--output_dir", default="jaxpt_demo", help="where the summary, plot and model go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft_steps", type=int, default=700)
    parser.add_argument("--grpo_steps", type=int, default=400)
    args = parser.parse_args(argv)

    from jaxpt import demo as demo_module

    demo_module.run(args.output_dir, seed=args.seed, sft_steps=args.sft_steps, grpo_steps=args.grpo_steps)
    return 0


def smoke(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="jaxpt smoke", description="Load a tiny model and print its logits.")
    parser.add_argument("--output_dir", default=None, help="where to write the tiny checkpoint (default: a temp dir)")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import transformers

    import jaxpt.models

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="jaxpt_smoke_")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    jaxpt.models.save_pretrained(jaxpt.models.from_config(config, seed=0), output_dir)
    model = jaxpt.models.from_pretrained(output_dir)
    input_ids = jnp.asarray(np.arange(1, 9, dtype=np.int32)[None])
    logits = jax.jit(lambda ids: model(ids))(input_ids)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; tiny Llama saved to {output_dir}")
    print(f"logits {tuple(logits.shape)} {logits.dtype}; first row, first 5: {np.asarray(logits[0, 0, :5]).round(4)}")
    print(f"greedy next tokens: {np.asarray(jnp.argmax(logits[0], -1)).tolist()}")
    return 0


def plan_command(argv: list[str]) -> int:
    from jaxpt import plan

    return plan.main(argv)


COMMANDS = {"sft": sft_command, "smoke": smoke, "demo": demo}
COMMANDS["kto"] = kto_command
COMMANDS["dpo"] = dpo_command
COMMANDS["reward"] = reward_command
COMMANDS["grpo"] = grpo_command
COMMANDS["rloo"] = rloo_command
COMMANDS["plan"] = plan_command


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
