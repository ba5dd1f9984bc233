"""`jaxpt <command>`: the command line.

    jaxpt sft    --model_name_or_path DIR --dataset_name PATH_OR_ID --output_dir OUT [SFTConfig fields ...]
    jaxpt dpo    ... [DPOConfig fields]        jaxpt reward ... [RewardConfig fields]
    jaxpt kto    ... [KTOConfig fields]        jaxpt grpo / rloo ... --reward_funcs accuracy,format
    jaxpt distillation ... --teacher_model_name_or_path DIR [DistillationConfig fields: beta, lmbda, ...]
    jaxpt plan   --model_name_or_path CONFIG --method sft --mesh fsdp=64 ...   per-device cost, no weights (plan -h)
    jaxpt smoke  [--output_dir DIR]            build a tiny random Llama, save it, load it, print logits
    jaxpt demo   [--output_dir DIR]            the embedded end-to-end run (SFT then GRPO on arithmetic)

Experimental methods (jaxpt.experimental: no stability promise), same arguments as the stable commands:
    jaxpt orpo   ... [ORPOConfig fields]       ORPO: SFT + odds-ratio preference loss, no reference model
    jaxpt cpo    ... [CPOConfig fields]        CPO / SimPO / AlphaPO (--loss_type sigmoid|hinge|ipo|simpo|alphapo)
    jaxpt tpo    ... [TPOConfig fields]        TPO: chosen, rejected and a gold reference completion per prompt
    jaxpt bema   ... [BEMAConfig fields]       DPO whose reference follows the policy's BEMA (bias-corrected EMA)
    jaxpt bco    ... [BCOConfig fields]        BCO: unpaired thumbs-up/down feedback as a binary classifier
    jaxpt prm    ... [PRMConfig fields]        PRM: a process reward model, one label per reasoning step
    jaxpt ppo    ... --reward_model_name_or_path DIR [--value_model_name_or_path DIR] [PPOConfig fields]
                                               PPO: policy + value model, per-token KL penalty, GAE, clipped losses
    jaxpt online_dpo ... --reward_funcs ...    Online DPO: two samples per prompt, ranked by rewards, DPO loss
    jaxpt xpo    ... --reward_funcs ...        XPO: Online DPO against a reference sample + exploration bonus alpha
    jaxpt nash_md ... --reward_funcs ...       Nash-MD: policy gradient on the preference over a geometric mixture
    jaxpt sdpo   ... --reward_funcs ... [SDPOConfig fields]   SDPO: self-distillation from successful rollouts
    jaxpt sdft   ... [SDFTConfig fields]       SDFT: on-policy self-distillation from a privileged_context teacher
    jaxpt gkd    ... --teacher_model_name_or_path DIR [GKDConfig fields: lmbda, beta, seq_kd, ...]   GKD
    jaxpt gold   ... --teacher_model_name_or_path DIR [GOLDConfig fields: use_uld_loss, ...]   GOLD (cross-tokenizer)
    jaxpt gmpo   ... [GMPOConfig fields]       GMPO: GRPO with the geometric mean of the token ratios (--reward_funcs)
    jaxpt a2po   ... [A2POConfig fields]       A*-PO: V* from reference samples, then optimal-advantage regression
    jaxpt iw_opd ... --teacher_model_name_or_path DIR [IWOPDConfig fields]   importance-weighted on-policy distillation
    jaxpt async_grpo ... --reward_funcs ... [AsyncGRPOConfig fields]  GRPO whose next rollout overlaps the update

Arguments are the fields of the method's config dataclass with TRL's names (`jaxpt sft --help` lists them),
parsed by `transformers.HfArgumentParser`; `--config file.yaml` supplies defaults that command-line flags
override. `--dataset_name` is a local .json/.jsonl/.parquet/.csv file, a directory, or a Hub dataset id.
`output_dir` receives `metrics.jsonl`, `checkpoints/` and `final/` (the model in Hugging Face format).
Negative numbers are values, not flags: `--learning_rate -1e-3` and `--learning_rate=-1e-3` both parse (and then
fail validation with a clear message, as a negative learning rate should).

Several hosts: start the same command on every one with `--coordinator_address HOST:PORT --num_processes N
--process_id I` (or the env vars JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or
`--coordinator_address auto` on TPU pods / SLURM / Open MPI); `output_dir` on a filesystem all of them share.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from jaxpt.lora import LoraConfig

# argparse takes "-1e-3" for an option (its own pattern knows only "-1" and "-1.5"): every number is a value here
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


@dataclass
class ScriptArguments:
    """Which data to train on (TRL's `ScriptArguments`)."""

    dataset_name: str = field(metadata={"help": "Local data file/directory or Hugging Face Hub dataset id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (Hub)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on (eval_strategy)."})


@dataclass(kw_only=True)
class ModelConfig(LoraConfig):
    """Which model to start from, and LoRA (TRL's `ModelConfig`: `--use_peft --lora_r ...`, `jaxpt.lora`)."""

    model_name_or_path: str = field(metadata={"help": "Hugging Face checkpoint directory or Hub id."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})
    dtype: str = field(default="float32", metadata={
        "help": "The dtype the weights are held (and trained) in; 'auto': the checkpoint's own. Compute dtype: "
                "--bf16.", "choices": ["auto", "bfloat16", "float16", "float32"]})


# TRL options (GRPOConfig / RLOOConfig ...) with no counterpart in jaxpt: why, instead of argparse's "unrecognized
# arguments". Keys ending in "_" are prefixes.
TRL_ONLY_OPTIONS = {
    "use_vllm": "jaxpt samples in-process with its own KV-cache decode loop (jaxpt.sampling), not vLLM",
    "vllm_": "jaxpt samples in-process with its own KV-cache decode loop (jaxpt.sampling), not vLLM (the "
             "sampler-mismatch correction is --sampler_importance_sampling_correction)",
    "use_transformers_": "jaxpt samples with its own decode loop (jaxpt.sampling), not transformers' generate",
    "transformers_continuous_batching_config": "jaxpt samples with its own decode loop, not transformers' generate",
    "cache_implementation": "jaxpt's sampler has its own KV cache (jaxpt.models.kv_cache), not transformers'",
    "ds3_gather_for_generation": "there is no DeepSpeed: the sampler uses the parameters where they are sharded",
    "model_init_kwargs": "models load with --dtype (and the mesh) through jaxpt.models.from_pretrained",
    "trust_remote_code": "jaxpt never executes downloaded code; its model families are built in",
    "pad_to_multiple_of": "batches are padded to a few length buckets (jaxpt.data.length_buckets)",
    "disable_dropout": "jaxpt's models have no dropout",
    "router_aux_loss_coef": "jaxpt has no mixture-of-experts model family",
    "cast_lm_head_to_fp32": "log-probs are always computed in float32 (jaxpt.losses.logprobs)",
    "log_multimodal": "jaxpt's methods are text-only",
    "log_unique_prompts": "completions are logged to output_dir/completions.jsonl (--log_completions)",
    "num_completions_to_print": "completions are logged to output_dir/completions.jsonl (--log_completions)",
    "log_completions_hub_repo": "completions are logged to output_dir/completions.jsonl (--log_completions)",
}


def check_trl_only_options(names, known: set[str]) -> None:
    """A TRL option jaxpt does not have fails with the reason (`TRL_ONLY_OPTIONS`)."""
    for name in names:
        if name in known:
            continue
        for option, reason in TRL_ONLY_OPTIONS.items():
            if name == option or (option.endswith("_") and name.startswith(option)):
                raise ValueError(f"--{name}: TRL's option has no counterpart in jaxpt: {reason}. Remove it.")


def parse(config_class, argv: list[str], *extra):
    """`(ScriptArguments, ModelConfig, config, *extra)` from argv, with `--config file.yaml` defaults."""
    import yaml
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ScriptArguments, ModelConfig, config_class, *extra))
    parser._negative_number_matcher = NEGATIVE_NUMBER
    argv = list(argv)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise ValueError("--config needs a YAML file: --config path/to/config.yaml.")
        path = Path(argv[index + 1]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--config {argv[index + 1]}: no such file ({path.absolute()}).")
        try:
            defaults = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ValueError(f"--config {path}: not valid YAML: {error}") from None
        defaults = {} if defaults is None else defaults
        if not isinstance(defaults, dict):
            raise ValueError(f"--config {path} holds a {type(defaults).__name__}, not a mapping of field names to "
                             "values: write one `field: value` per line (e.g. `learning_rate: 1.0e-5`).")
        del argv[index:index + 2]
        known = {a.dest for a in parser._actions}
        check_trl_only_options(defaults, known)
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise ValueError(f"Unknown keys in the --config file: {unknown}.")
        parser.set_defaults(**defaults)
        for action in parser._actions:  # YAML values satisfy required arguments
            if action.dest in defaults:
                action.required = False
    check_trl_only_options([a[2:].split("=")[0] for a in argv if a.startswith("--")],
                           {a.dest for a in parser._actions})
    return parser.parse_args_into_dataclasses(args=argv)


def check_inputs(script_args, model_args, config, *paths: tuple[str, str | None]) -> None:
    """Before loading anything: `output_dir` can be written (and holds no other run's checkpoints), every
    local-looking path exists (a missing one fails now, not after the Hub's retries), and the model directory has
    a tokenizer unless one is named. `paths`: more `(flag, path)` pairs to check (e.g. a reward model)."""
    from jaxpt import loop
    from jaxpt.data import looks_like_local_path

    config.validate()
    model_args.validate()
    if model_args.use_peft:
        model_args.check_trainable()  # LoRA options jaxpt cannot train with fail before anything loads
    elif getattr(config, "merge_adapter_on_save", False):
        raise ValueError("--merge_adapter_on_save merges LoRA adapters into the exported model, but --use_peft is "
                         "not set (final/ is already the full model): add --use_peft, or drop the flag.")
    loop.prepare_output_dir(config)  # writable, and no earlier run's checkpoints unless resuming/overwriting
    named = [("--model_name_or_path", model_args.model_name_or_path),
             ("--tokenizer_name_or_path", model_args.tokenizer_name_or_path),
             ("--dataset_name", script_args.dataset_name), *paths]
    for flag, value in named:
        if value is not None and looks_like_local_path(value) and not Path(value).expanduser().exists():
            raise FileNotFoundError(f"{flag} {value}: no such file or directory ({Path(value).expanduser().absolute()})"
                                    "; a Hub id has the form org/name.")
    model_dir = Path(model_args.model_name_or_path).expanduser()
    if model_args.tokenizer_name_or_path is None and model_dir.is_dir() and not any(
            (model_dir / name).exists() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"The model directory {model_dir} holds no tokenizer (none of {list(TOKENIZER_FILES)})"
                                ": pass --tokenizer_name_or_path DIR_OR_HUB_ID, or save the tokenizer there.")


def load_tokenizer(name_or_path: str, *, flag: str = "--tokenizer_name_or_path"):
    """`AutoTokenizer.from_pretrained`, with the path and the flag to fix named when it fails."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as error:
        raise ValueError(f"Cannot load a tokenizer from {name_or_path!r} ({type(error).__name__}: {error}): pass "
                         f"{flag} with a directory holding tokenizer files, or a Hub id.") from error


def load_model_and_data(script_args, model_args, config, *, num_labels=None):
    """`(model, tokenizer, train_set, eval_set)`; the cheap things (tokenizer, data) first, so their errors come
    before the model is read."""
    from jaxpt import data

    tokenizer = load_tokenizer(model_args.tokenizer_name_or_path or model_args.model_name_or_path)
    train_set = data.load_dataset(script_args.dataset_name, split=script_args.dataset_train_split,
                                  config_name=script_args.dataset_config)
    eval_set = None
    if config.eval_strategy != "no":
        eval_set = data.load_dataset(script_args.dataset_name, split=script_args.dataset_test_split,
                                     config_name=script_args.dataset_config)
    from jaxpt.quantize import quantization_from_config

    # QLoRA (--load_in_4bit / --load_in_8bit): the base is quantized while it is read, never whole in float
    quantization = quantization_from_config(model_args) if model_args.use_peft else None
    model = load_model(model_args.model_name_or_path, model_args, config, num_labels=num_labels,
                       quantization=quantization)
    if model_args.use_peft:
        from jaxpt.lora import apply_lora

        apply_lora(model, model_args, seed=config.seed)
        model.lora_settings = dataclasses.replace(model.lora_settings,
                                                  base_model_name_or_path=model_args.model_name_or_path)
    return model, tokenizer, train_set, eval_set


def load_model(name_or_path: str, model_args, config, *, num_labels=None, quantization: str | None = None):
    """`jaxpt.models.from_pretrained` with the run's dtypes, each parameter read straight into its shards on the
    mesh `train()` builds from the same config (never a whole copy on one device); `quantization` ("nf4"/"int8",
    QLoRA) quantizes the decoder layers' linear weights layer by layer as they are read."""
    import jax
    import jax.numpy as jnp

    import jaxpt.models
    from jaxpt.sharding import mesh_from_config

    bf16 = config.bf16 if config.bf16 is not None else jax.default_backend() != "cpu"
    param_dtype = model_args.dtype if model_args.dtype == "auto" else jnp.dtype(model_args.dtype)
    return jaxpt.models.from_pretrained(name_or_path, num_labels=num_labels, mesh=mesh_from_config(config),
                                        dtype=jnp.bfloat16 if bf16 else jnp.float32, param_dtype=param_dtype,
                                        seed=config.seed, quantization=quantization)


def join_run(config) -> None:
    """Several processes: join the run before any JAX computation; the others than process 0 log only warnings
    (process 0 reports progress for all)."""
    from jaxpt import distributed

    if distributed.initialize_from_config(config):
        import jax

        if jax.process_index() != 0:
            logging.getLogger("jaxpt").setLevel(logging.WARNING)


def _offline_command(method_module, config_class, argv: list[str], *, num_labels: int | None = None) -> int:
    """`jaxpt sft|dpo|reward|kto`: parse, check the inputs, load, train on a fixed dataset, report."""
    script_args, model_args, config = parse(config_class, argv)
    join_run(config)
    check_inputs(script_args, model_args, config)
    model, tokenizer, train_set, eval_set = load_model_and_data(script_args, model_args, config,
                                                                num_labels=num_labels)
    result = method_module.train(model, tokenizer, train_set, config, eval_dataset=eval_set)
    what = "reward model" if num_labels is not None else "model"
    print(f"Trained {result.state.step} steps; metrics in {config.output_dir}/metrics.jsonl; {what} in "
          f"{result.model_dir}")
    return 0


def sft_command(argv: list[str]) -> int:
    from jaxpt import sft

    return _offline_command(sft, sft.SFTConfig, argv)


def dpo_command(argv: list[str]) -> int:
    from jaxpt import dpo

    return _offline_command(dpo, dpo.DPOConfig, argv)  # reference: a frozen copy of the loaded model


def reward_command(argv: list[str]) -> int:
    from jaxpt import reward

    return _offline_command(reward, reward.RewardConfig, argv, num_labels=1)  # a one-label head on the checkpoint


def kto_command(argv: list[str]) -> int:
    from jaxpt import kto

    return _offline_command(kto, kto.KTOConfig, argv)  # reference: a frozen copy of the loaded model


@dataclass
class RewardArguments:
    """Where GRPO / RLOO rewards come from (TRL's GRPO script arguments)."""

    reward_funcs: list[str] | None = field(default=None, metadata={
        "help": "Reward functions: accuracy_reward, exact_match_reward, think_format_reward, "
                "get_soft_overlong_punishment, or an import path like my_lib.rewards.custom_reward."})
    reward_model_name_or_path: str | None = field(default=None, metadata={
        "help": "A sequence classifier (HF format, num_labels=1) scoring prompt + completion."})


def _online_command(method_module, config_class, argv: list[str]) -> int:
    """`jaxpt grpo|rloo`: like the offline commands, plus the reward functions (resolved before any loading)."""
    from jaxpt import rewards

    script_args, model_args, config, reward_args = parse(config_class, argv, RewardArguments)
    join_run(config)
    reward_model = reward_args.reward_model_name_or_path
    check_inputs(script_args, model_args, config, ("--reward_model_name_or_path", reward_model))
    reward_funcs = [rewards.resolve_reward_function(name) for name in reward_args.reward_funcs or []]
    if not reward_funcs and not reward_model:
        raise ValueError("Pass --reward_funcs (and/or --reward_model_name_or_path): nothing scores the completions.")
    model, tokenizer, train_set, eval_set = load_model_and_data(script_args, model_args, config)
    if reward_model:
        reward_funcs.append(rewards.model_reward(load_model(reward_model, model_args, config, num_labels=1),
                                                 load_tokenizer(reward_model, flag="--reward_model_name_or_path")))
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


def orpo_command(argv: list[str]) -> int:
    from jaxpt.experimental import orpo

    return _offline_command(orpo, orpo.ORPOConfig, argv)  # no reference model


def cpo_command(argv: list[str]) -> int:
    from jaxpt.experimental import cpo

    return _offline_command(cpo, cpo.CPOConfig, argv)  # no reference model


def tpo_command(argv: list[str]) -> int:
    from jaxpt.experimental import tpo

    return _offline_command(tpo, tpo.TPOConfig, argv)  # no reference model: `reference` is a gold completion


def bema_command(argv: list[str]) -> int:
    from jaxpt.experimental import bema

    return _offline_command(bema, bema.BEMAConfig, argv)  # reference: the loaded model, then its BEMA weights


def bco_command(argv: list[str]) -> int:
    from jaxpt.experimental import bco

    return _offline_command(bco, bco.BCOConfig, argv)  # reference: a frozen copy of the loaded model


def prm_command(argv: list[str]) -> int:
    from jaxpt.experimental import prm

    return _offline_command(prm, prm.PRMConfig, argv, num_labels=2)  # the two-label head, applied per token


@dataclass
class ValueModelArguments:
    """PPO's value model (TRL's PPO script initialises it from the reward model)."""

    value_model_name_or_path: str | None = field(default=None, metadata={
        "help": "A checkpoint loaded as a one-output classifier whose head gives per-token values (default: "
                "--reward_model_name_or_path, else --model_name_or_path with a new head)."})


def ppo_command(argv: list[str]) -> int:
    """`jaxpt ppo`: like `jaxpt grpo` (rewards from --reward_funcs and/or --reward_model_name_or_path), plus the
    value model."""
    from jaxpt import rewards
    from jaxpt.experimental import ppo

    script_args, model_args, config, reward_args, value_args = parse(ppo.PPOConfig, argv, RewardArguments,
                                                                     ValueModelArguments)
    join_run(config)
    reward_model = reward_args.reward_model_name_or_path
    check_inputs(script_args, model_args, config, ("--reward_model_name_or_path", reward_model),
                 ("--value_model_name_or_path", value_args.value_model_name_or_path))
    reward_funcs = [rewards.resolve_reward_function(name) for name in reward_args.reward_funcs or []]
    if not reward_funcs and not reward_model:
        raise ValueError("Pass --reward_model_name_or_path (and/or --reward_funcs): nothing scores the completions.")
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise ValueError("jaxpt ppo: --load_in_4bit / --load_in_8bit (QLoRA) are not supported by the experimental "
                         "PPO yet; --use_peft alone trains LoRA adapters on the policy (the value model in full, "
                         "as TRL's PPO).")
    model, tokenizer, train_set, eval_set = load_model_and_data(script_args, model_args, config)
    if reward_model:
        reward_funcs.append(rewards.model_reward(load_model(reward_model, model_args, config, num_labels=1),
                                                 load_tokenizer(reward_model, flag="--reward_model_name_or_path")))
    value_path = value_args.value_model_name_or_path or reward_model or model_args.model_name_or_path
    value_model = load_model(value_path, model_args, config, num_labels=1)
    result = ppo.train(model, tokenizer, train_set, config, value_model=value_model, reward_funcs=reward_funcs,
                       eval_dataset=eval_set)
    print(f"Trained {result.state.step} steps; metrics in {config.output_dir}/metrics.jsonl; model in "
          f"{result.model_dir}")
    return 0
def online_dpo_command(argv: list[str]) -> int:
    from jaxpt.experimental import online_dpo

    return _online_command(online_dpo, online_dpo.OnlineDPOConfig, argv)  # reference: a frozen copy


def xpo_command(argv: list[str]) -> int:
    from jaxpt.experimental import xpo

    return _online_command(xpo, xpo.XPOConfig, argv)  # reference: a frozen copy, which also samples


def nash_md_command(argv: list[str]) -> int:
    from jaxpt.experimental import nash_md

    return _online_command(nash_md, nash_md.NashMDConfig, argv)  # reference: a frozen copy, mixed in to sample
def sdpo_command(argv: list[str]) -> int:
    from jaxpt.experimental import sdpo

    return _online_command(sdpo, sdpo.SDPOConfig, argv)  # teacher: the loaded model itself (EMA / base / live)


def sdft_command(argv: list[str]) -> int:
    from jaxpt.experimental import sdft

    return _offline_command(sdft, sdft.SDFTConfig, argv)  # teacher: the loaded model reading privileged_context


def gmpo_command(argv: list[str]) -> int:
    from jaxpt.experimental import gmpo

    return _online_command(gmpo, gmpo.GMPOConfig, argv)


def a2po_command(argv: list[str]) -> int:
    from jaxpt.experimental import a2po

    return _online_command(a2po, a2po.A2POConfig, argv)  # reference: the loaded model's initial parameters


def distillation_command(argv: list[str], method_module=None, config_class=None) -> int:
    """`jaxpt distillation`: the student from --model_name_or_path learns from --teacher_model_name_or_path (loaded
    with the same dtype flags, on the same mesh; it needs the student's tokenizer). `method_module` /
    `config_class`: a distillation method with the same `train` signature (`jaxpt iw_opd`)."""
    from jaxpt import distillation

    if method_module is None:
        method_module, config_class = distillation, distillation.DistillationConfig
    script_args, model_args, config = parse(config_class, argv)
    join_run(config)
    if not config.teacher_model_name_or_path:
        raise ValueError("jaxpt distillation needs a teacher: --teacher_model_name_or_path DIR_OR_HUB_ID.")
    check_inputs(script_args, model_args, config, ("--teacher_model_name_or_path", config.teacher_model_name_or_path))
    model, tokenizer, train_set, eval_set = load_model_and_data(script_args, model_args, config)
    teacher = load_model(config.teacher_model_name_or_path, model_args, config)
    result = method_module.train(model, tokenizer, train_set, config, teacher_model=teacher, eval_dataset=eval_set)
    print(f"Trained {result.state.step} steps; metrics in {config.output_dir}/metrics.jsonl; model in "
          f"{result.model_dir}")
    return 0


def gkd_command(argv: list[str]) -> int:
    """`jaxpt gkd`: `jaxpt distillation`'s command with GKD's config (the teacher needs the student's tokenizer)."""
    from jaxpt.experimental import gkd

    script_args, model_args, config = parse(gkd.GKDConfig, argv)
    join_run(config)
    if not config.teacher_model_name_or_path:
        raise ValueError("jaxpt gkd needs a teacher: --teacher_model_name_or_path DIR_OR_HUB_ID.")
    check_inputs(script_args, model_args, config, ("--teacher_model_name_or_path", config.teacher_model_name_or_path))
    model, tokenizer, train_set, eval_set = load_model_and_data(script_args, model_args, config)
    teacher = load_model(config.teacher_model_name_or_path, model_args, config)
    result = gkd.train(model, tokenizer, train_set, config, teacher_model=teacher, eval_dataset=eval_set)
    print(f"Trained {result.state.step} steps; metrics in {config.output_dir}/metrics.jsonl; model in "
          f"{result.model_dir}")
    return 0


def gold_command(argv: list[str]) -> int:
    """`jaxpt gold`: like `jaxpt gkd`; with --use_uld_loss the teacher may have its own tokenizer
    (--teacher_tokenizer_name_or_path, default the teacher's directory)."""
    from jaxpt.experimental import gold

    script_args, model_args, config = parse(gold.GOLDConfig, argv)
    join_run(config)
    if not config.teacher_model_name_or_path:
        raise ValueError("jaxpt gold needs a teacher: --teacher_model_name_or_path DIR_OR_HUB_ID.")
    check_inputs(script_args, model_args, config, ("--teacher_model_name_or_path", config.teacher_model_name_or_path),
                 ("--teacher_tokenizer_name_or_path", config.teacher_tokenizer_name_or_path))
    model, tokenizer, train_set, eval_set = load_model_and_data(script_args, model_args, config)
    teacher = load_model(config.teacher_model_name_or_path, model_args, config)
    teacher_tokenizer = None
    if config.use_uld_loss:
        teacher_tokenizer = load_tokenizer(config.teacher_tokenizer_name_or_path or config.teacher_model_name_or_path,
                                           flag="--teacher_tokenizer_name_or_path")
    result = gold.train(model, tokenizer, train_set, config, teacher_model=teacher, teacher_tokenizer=teacher_tokenizer,
                        eval_dataset=eval_set)
    print(f"Trained {result.state.step} steps; metrics in {config.output_dir}/metrics.jsonl; model in "
          f"{result.model_dir}")
    return 0
def iw_opd_command(argv: list[str]) -> int:
    from jaxpt.experimental import iw_opd

    return distillation_command(argv, iw_opd, iw_opd.IWOPDConfig)  # `jaxpt distillation`'s arguments and loading


def async_grpo_command(argv: list[str]) -> int:
    from jaxpt.experimental import async_grpo

    return _online_command(async_grpo, async_grpo.AsyncGRPOConfig, argv)


def demo(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="jaxpt demo", description="SFT then GRPO on a bundled arithmetic task.")
    parser.add_argument("--output_dir", default="jaxpt_demo", help="where the summary, plot and model go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft_steps", type=int, default=700)
    parser.add_argument("--grpo_steps", type=int, default=400)
    parser.add_argument("--use_peft", action="store_true",
                        help="GRPO trains LoRA adapters on the frozen SFT model (written as a PEFT adapter)")
    args = parser.parse_args(argv)

    from jaxpt import demo as demo_module

    demo_module.run(args.output_dir, seed=args.seed, sft_steps=args.sft_steps, grpo_steps=args.grpo_steps,
                    use_peft=args.use_peft)
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


COMMANDS = {"sft": sft_command, "dpo": dpo_command, "reward": reward_command, "kto": kto_command,
            "grpo": grpo_command, "rloo": rloo_command, "distillation": distillation_command, "plan": plan_command,
            "smoke": smoke, "demo": demo,
            # experimental methods (jaxpt.experimental)
            "orpo": orpo_command, "cpo": cpo_command, "tpo": tpo_command, "bema": bema_command,
            "bco": bco_command, "prm": prm_command, "ppo": ppo_command,
            "online_dpo": online_dpo_command, "xpo": xpo_command, "nash_md": nash_md_command,
            "sdpo": sdpo_command, "sdft": sdft_command, "gkd": gkd_command, "gold": gold_command,
            "gmpo": gmpo_command, "a2po": a2po_command,
            "iw_opd": iw_opd_command, "async_grpo": async_grpo_command}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logger = logging.getLogger("jaxpt")
    # jaxpt's INFO lines ("Compiling ...", "Resumed from ...") get a handler of their own: a root handler installed
    # at WARNING by an imported library (orbax does) would drop them. Restored afterwards for callers in Python.
    saved = (logger.level, logger.propagate)
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        return COMMANDS[argv[0]](argv[1:])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each record (captured or redirected streams too)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always answers sys.stderr
        pass


if __name__ == "__main__":
    sys.exit(main())
