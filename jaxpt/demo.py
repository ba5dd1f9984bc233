"""Everything the embedded demo needs, shipped with the package: a character tokenizer with a chat template,
a small Llama-architecture model, and a synthetic arithmetic task with verifiable answers.

Also handy for examples and tests: nothing here touches the network.
"""

from __future__ import annotations

import random
import string

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]

# Assistant turns are wrapped in {% generation %} so `assistant_only_loss` can find them.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}<|end|>"
    "{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(*, chat_template: bool = True):
    """A `transformers` fast tokenizer with one token per printable ASCII character plus special tokens
    (`<pad>`=0, `<s>`=1, `</s>`=2 is EOS); no BOS is added. Saves and reloads with `AutoTokenizer`."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(vocab_size: int, **overrides):
    """A `transformers.LlamaConfig` for a small model (2 layers, hidden 32 by default)."""
    import transformers

    settings = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, initializer_range=0.05, tie_word_embeddings=False)
    settings.update(overrides)
    return transformers.LlamaConfig(**settings)


def tiny_llama(vocab_size: int, *, seed: int = 0, num_labels: int | None = None, **overrides):
    """A freshly initialised jaxpt Llama (causal LM, or a classifier with `num_labels`)."""
    import jaxpt.models

    return jaxpt.models.from_config(tiny_llama_config(vocab_size, **overrides), num_labels=num_labels, seed=seed)


def arithmetic_examples(count: int, *, seed: int = 0, max_operand: int = 9) -> list[dict]:
    """Prompt-completion pairs `{"prompt": "3+4=", "completion": "7"}` (sums of two small numbers)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return rows


# --------------------------------------------------------------------------------------------------------------
# `jaxpt demo`: SFT on noisy demonstrations, then GRPO with an exact-answer reward
# --------------------------------------------------------------------------------------------------------------

MAX_OPERAND = 19
HELD_OUT = 100
OFF_BY_ONE = 0.6  # the share of SFT demonstrations whose answer is a + b + 1


def arithmetic_split(seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """All `a + b` with a, b in [0, MAX_OPERAND], shuffled: (training problems, HELD_OUT unseen problems)."""
    problems = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    random.Random(seed).shuffle(problems)
    return problems[HELD_OUT:], problems[:HELD_OUT]


def noisy_demonstrations(problems, seed: int) -> list[dict]:
    """SFT data where most answers are off by one: a systematic error an exact-answer reward can correct."""
    rng = random.Random(seed + 1)
    return [{"prompt": f"{a}+{b}=", "completion": str(a + b + (1 if rng.random() < OFF_BY_ONE else 0))}
            for a, b in problems]


def heldout_accuracy(state, tokenizer, problems) -> float:
    """Greedy exact-match accuracy of `state`'s model on `a+b=` prompts (one batched, jitted generation)."""
    import jax
    import numpy as np

    from jaxpt import data, sampling

    prompts = [tokenizer(f"{a}+{b}=")["input_ids"] for a, b in problems]
    length = max(len(p) for p in prompts)
    ids = data.pad_rows(prompts, length, tokenizer.pad_token_id, left=True)
    mask = data.pad_rows([[1] * len(p) for p in prompts], length, 0, left=True)
    out = sampling.generate(state.graphdef, state.full_params(), ids, mask, key=jax.random.key(0), max_new_tokens=4,
                            greedy=True, eos_token_ids=[tokenizer.eos_token_id],
                            pad_token_id=tokenizer.pad_token_id)
    rows = [row[:n].tolist() for row, n in zip(np.asarray(out.completion_ids), np.asarray(out.lengths), strict=True)]
    answers = tokenizer.batch_decode(rows, skip_special_tokens=True)
    return float(np.mean([answer.strip() == str(a + b) for answer, (a, b) in zip(answers, problems, strict=True)]))


PLOT_INSTALL_HINT = 'pip install -e ".[demo]"'


def matplotlib_missing() -> bool:
    """True when the reward plot cannot be drawn (matplotlib is the `demo` extra, not a core dependency)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


def plot_rewards(records: list[dict], path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(f"The demo's plot needs matplotlib: {PLOT_INSTALL_HINT}.") from error
    steps = [r["step"] for r in records if "reward" in r]
    rewards = [r["reward"] for r in records if "reward" in r]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(steps, rewards)
    axis.set_xlabel("GRPO step")
    axis.set_ylabel("mean reward (exact answer)")
    axis.set_title("GRPO on a+b: reward of sampled completions")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_summary_and_plot(output, summary: dict, grpo_metrics: list[dict], *, plot_path=None) -> None:
    """`output/demo_summary.json`, then (when `plot_path` is given) the reward plot: the summary first, so nothing
    the run measured is lost to a failing plot."""
    import json
    from pathlib import Path

    (Path(output) / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    if plot_path is not None:
        plot_rewards(grpo_metrics, plot_path)


# GRPO with LoRA adapters (`use_peft=True`): peft's rank/alpha on every linear layer, and a learning rate 10x the
# full fine-tune's, as is usual for adapters (the adapters start at zero: B = 0).
DEMO_LORA = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_modules": ["all-linear"]}
DEMO_LORA_LEARNING_RATE = 2e-3


def run(output_dir: str = "jaxpt_demo", *, seed: int = 0, sft_steps: int = 700, grpo_steps: int = 400,
        disable_tqdm: bool = False, use_peft: bool = False) -> dict:
    """The end-to-end demo; returns (and writes to `output_dir/demo_summary.json`) the summary. Without matplotlib
    (the `demo` extra) it warns up front, runs, writes the summary and skips the reward plot. `use_peft=True` runs
    the GRPO stage on LoRA adapters (`DEMO_LORA`) over the frozen SFT model, sampling with the adapters applied; the
    summary then names the PEFT adapter (`adapter_dir`) and the merged checkpoint (`model_dir`)."""
    import json
    import time
    import warnings
    from pathlib import Path

    import datasets

    from jaxpt import grpo, lora, sft
    from jaxpt.rewards import accuracy_reward

    started = time.perf_counter()
    # Said before the minute of training, not after: without matplotlib the run completes, minus the plot.
    draw_plot = not matplotlib_missing()
    if not draw_plot:
        warnings.warn(f"matplotlib is not installed: the demo will run and write its summary but skip the reward "
                      f"plot. Install it with {PLOT_INSTALL_HINT}.", UserWarning, stacklevel=2)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer), seed=seed, hidden_size=64, intermediate_size=256, num_hidden_layers=2)
    train_problems, heldout = arithmetic_split(seed)
    quiet = {"mesh_fsdp": 1, "disable_tqdm": disable_tqdm, "save_steps": 0, "seed": seed}

    print(f"[1/3] SFT on {len(train_problems)} noisy a+b demonstrations ({OFF_BY_ONE:.0%} of answers off by one)")
    sft_config = sft.SFTConfig(output_dir=str(output / "sft"), max_length=16, per_device_train_batch_size=32,
                               learning_rate=3e-3, lr_scheduler_type="cosine", warmup_ratio=0.05,
                               max_steps=sft_steps, logging_steps=100, save_final_model=False, **quiet)
    sft_result = sft.train(model, tokenizer, datasets.Dataset.from_list(noisy_demonstrations(train_problems, seed)),
                           sft_config)
    before = heldout_accuracy(sft_result.state, tokenizer, heldout)
    print(f"      held-out accuracy after SFT (greedy, {len(heldout)} unseen problems): {before:.0%}")

    policy = sft_result.state.model()
    if use_peft:
        lora.apply_lora(policy, lora.LoraConfig(use_peft=True, **DEMO_LORA), seed=seed)
    print("[2/3] GRPO with an exact-answer reward (8 completions per prompt, 16 prompts per step)"
          + (f", training LoRA adapters only (r={DEMO_LORA['lora_r']}, all linear layers)" if use_peft else ""))
    grpo_config = grpo.GRPOConfig(output_dir=str(output / "grpo"), num_generations=8, per_device_train_batch_size=128,
                                  max_completion_length=4, learning_rate=DEMO_LORA_LEARNING_RATE if use_peft else 2e-4,
                                  lr_scheduler_type="constant", max_steps=grpo_steps, logging_steps=10, beta=0.0,
                                  merge_adapter_on_save=use_peft, **quiet)
    prompts = [{"prompt": f"{a}+{b}=", "solution": str(a + b)} for a, b in train_problems]
    grpo_result = grpo.train(policy, tokenizer, datasets.Dataset.from_list(prompts), grpo_config,
                             reward_funcs=[accuracy_reward])
    after = heldout_accuracy(grpo_result.state, tokenizer, heldout)
    print(f"      held-out accuracy after GRPO: {after:.0%}  ({before:.0%} -> {after:.0%})")

    print("[3/3] Writing the summary" + (" and the reward plot" if draw_plot else
                                         f" (no reward plot: matplotlib is missing, {PLOT_INSTALL_HINT})"))
    plot_path = output / "grpo_reward.png" if draw_plot else None
    summary = {
        "accuracy_before_grpo": before,
        "accuracy_after_grpo": after,
        # with LoRA, `final/` is the PEFT adapter and `final_merged/` the full checkpoint with it merged in
        "model_dir": str((Path(grpo_result.model_dir).parent / "final_merged" if use_peft
                          else Path(grpo_result.model_dir)).absolute()),
        "adapter_dir": str(Path(grpo_result.model_dir).absolute()) if use_peft else None,
        "reward_plot": str(plot_path.absolute()) if plot_path is not None else None,
        "sft_metrics": str((output / "sft" / "metrics.jsonl").absolute()),
        "grpo_metrics": str((output / "grpo" / "metrics.jsonl").absolute()),
        "heldout_problems": len(heldout),
        "use_peft": use_peft,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_summary_and_plot(output, summary, grpo_result.metrics, plot_path=plot_path)
    print(json.dumps(summary, indent=2))
    return summary
