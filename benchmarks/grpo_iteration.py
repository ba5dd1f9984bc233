"""One GRPO iteration (sample, reward, update): jaxpt vs TRL's `GRPOTrainer` (no vLLM), same model, one process.

An iteration samples `--num_generations` completions for each of `--prompts` prompts with the training weights,
scores them with the same Python reward function, computes group-relative advantages, and takes one AdamW step
(DAPO loss, `beta=0`: no reference model, `steps_per_generation = gradient_accumulation_steps = num_iterations
= 1`: on-policy, no old-log-prob pass on either side). Default: 8 prompts x 8 generations = 64 completions per
iteration, 32-character prompts, 64 completion tokens, temperature 1.0 (no top-k / top-p), float32.

Model: a random Llama (hidden 256, 4 layers, 4 heads / 2 kv heads, intermediate 768, untied head) over the
107-token character tokenizer of `jaxpt.demo.char_tokenizer()`, created with `transformers`, saved with
`save_pretrained` to a temporary directory and loaded from there by both sides. So that every completion has
the full `--max_completion_length` tokens on both sides (the work per iteration is then identical), the special
tokens (pad, BOS, EOS, unk, chat markers) are made unsampleable by the weights themselves, not by either
library's options: hidden dimension 0 of the residual stream is a constant 1 (embedding column 0 set to 1, row 0
of every `o_proj` and `down_proj` set to 0), and the special tokens' `lm_head` rows are `-1000` on that dimension
and 0 elsewhere, so their logits are about -1000 x (a positive RMS-normalised value) and their probability is 0
in float32. Both sides report the mean completion length, which must equal `--max_completion_length`.

Timing: jaxpt's iteration is `jaxpt.grpo.rollout(...)` (jitted generation, decoding, rewards, advantages) plus the
jitted train step (`prompt_group=num_generations`, as `grpo.train` runs it: each prompt once per group), waited
for; TRL's is the wall time between `on_step_begin` and `on_step_end` of a `TrainerCallback` around
`trainer.train()` steps (generation with `transformers` `generate`, rewards,
advantages, forward/backward and the optimizer step; logging happens after `on_step_end`). The first `--warmup`
iterations of each side are excluded (jaxpt compiles there). Prints each side's median seconds per iteration,
completions/s, the ratio of throughputs jaxpt / TRL (> 1: jaxpt faster), and one JSON line. Also reported: the
median rollout part of an iteration (jaxpt: `grpo.rollout`; TRL: `_generate_and_score_completions`, timed by
wrapping it; the rest is the update), jaxpt's median CPU seconds (`time.process_time`, all threads) of the
rollout and of the update (less sensitive to a loaded machine than wall time), the mean completion length over
all iterations, and the first iteration's mean reward and token entropy (a check that both sides run the same
model: the entropies should agree).

    python benchmarks/grpo_iteration.py
    python benchmarks/grpo_iteration.py --steps 5 --num_generations 4 --max_completion_length 128
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import tempfile
import time

EOS_LOGIT_WEIGHT = -1000.0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--intermediate_size", type=int, default=768)
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--num_key_value_heads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
    parser.add_argument("--num_generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--prompt_len", type=int, default=32, help="characters (= tokens) per prompt")
    parser.add_argument("--max_completion_length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed iterations per side (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first iterations per side")
    parser.add_argument("--skip_trl", action="store_true")
    return parser.parse_args()


def vowel_reward(completions, **kwargs):
    """The reward both sides use: the share of vowels in the completion text."""
    return [sum(char in "aeiouAEIOU" for char in text) / max(len(text), 1) for text in completions]


def prompt_rows(count: int, length: int, seed: int = 0) -> list[dict]:
    """Random printable text, one token per character: every prompt has exactly `length` tokens."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + " .,;:!?"
    return [{"prompt": "".join(rng.choice(alphabet) for _ in range(length))} for _ in range(count)]


def make_hf_model(args, tokenizer):
    """A random `LlamaForCausalLM` that never samples a special token (see the module docstring)."""
    import torch
    import transformers

    from jaxpt.demo import SPECIAL_TOKENS

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    banned = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0  # residual dimension 0 starts at 1 ...
        for layer in model.model.layers:  # ... and no layer writes to it
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.lm_head.weight[banned, :] = 0.0
        model.lm_head.weight[banned, 0] = EOS_LOGIT_WEIGHT
    return model


def main():
    args = parse_args()
    import datasets

    from jaxpt.demo import char_tokenizer

    tokenizer = char_tokenizer()
    total = args.warmup + args.steps
    dataset = datasets.Dataset.from_list(prompt_rows(args.prompts * total, args.prompt_len))
    completions = args.prompts * args.num_generations
    hf_model = make_hf_model(args, tokenizer)
    with tempfile.TemporaryDirectory(prefix="jaxpt_grpo_bench_") as checkpoint:
        hf_model.save_pretrained(checkpoint)
        tokenizer.save_pretrained(checkpoint)
        del hf_model
        jax_seconds, jax_stats = time_jaxpt(args, checkpoint, tokenizer, dataset)
        trl_seconds, trl_stats = (None, None) if args.skip_trl else time_trl(args, checkpoint, tokenizer, dataset)

    result = {"benchmark": "grpo_iteration", "device": device_name(), "dtype": "float32",
              "vocab_size": len(tokenizer), "hidden_size": args.hidden_size,
              "num_hidden_layers": args.num_hidden_layers,
              "prompts": args.prompts, "num_generations": args.num_generations, "prompt_len": args.prompt_len,
              "max_completion_length": args.max_completion_length, "steps": args.steps, "warmup": args.warmup}
    sides = {"jaxpt": (jax_seconds, jax_stats)}
    if trl_seconds:
        sides["trl"] = (trl_seconds, trl_stats)
    for side, (seconds, stats) in sides.items():
        median = statistics.median(seconds)
        print(f"{side:5s}: {median:7.3f} s/iteration  {completions / median:7.1f} completions/s  "
              f"(median rollout {stats['rollout_s']:.3f} s; mean completion length {stats['mean_length']:.1f}; "
              f"first-iteration reward {stats['reward']:.4f}, entropy {stats['entropy']:.4f})")
        result.update({f"{side}_s_per_iteration": round(median, 4),
                       f"{side}_completions_per_s": round(completions / median, 2),
                       f"{side}_rollout_s": round(stats["rollout_s"], 4),
                       f"{side}_mean_completion_length": round(stats["mean_length"], 2),
                       f"{side}_first_reward": round(stats["reward"], 4),
                       f"{side}_first_entropy": round(stats["entropy"], 4),
                       f"{side}_iteration_s": [round(s, 3) for s in seconds]})
        if "rollout_cpu_s" in stats:
            print(f"{side:5s}: median CPU seconds (all threads) per iteration: rollout {stats['rollout_cpu_s']:.3f}, "
                  f"update {stats['update_cpu_s']:.3f}")
            result.update({f"{side}_rollout_cpu_s": round(stats["rollout_cpu_s"], 4),
                           f"{side}_update_cpu_s": round(stats["update_cpu_s"], 4)})
    if trl_seconds:
        ratio = statistics.median(trl_seconds) / statistics.median(jax_seconds)
        print(f"ratio jaxpt / TRL (completions/s): {ratio:.2f}x")
        result["ratio"] = round(ratio, 3)
    print(json.dumps(result))


def device_name() -> str:
    import jax

    return jax.devices()[0].device_kind


def time_jaxpt(args, checkpoint, tokenizer, dataset):
    import jax

    import jaxpt.models
    from jaxpt import data, grpo
    from jaxpt.rollout import shared_prompt_group
    from jaxpt.sharding import shard_batch
    from jaxpt.train_state import TrainState, make_optimizer

    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="jaxpt_grpo_out_") as output_dir:
        config = grpo.GRPOConfig(
            output_dir=output_dir, per_device_train_batch_size=args.prompts * args.num_generations,
            num_generations=args.num_generations, max_completion_length=args.max_completion_length, temperature=1.0,
            beta=0.0, loss_type="dapo", steps_per_generation=1, gradient_accumulation_steps=1, num_iterations=1,
            max_steps=total, mesh_fsdp=1, seed=0,
        )
    micro_batch, steps_per_generation, prompts_per_rollout = grpo.rollout_shape(config, 1)
    assert (micro_batch, steps_per_generation, prompts_per_rollout) == (
        args.prompts * args.num_generations, 1, args.prompts)
    model = jaxpt.models.from_pretrained(checkpoint)  # float32
    tx, _ = make_optimizer(config, total)  # AdamW + global-norm clipping + linear decay, as TRL's defaults
    state = TrainState.create(model, tx)
    # as grpo.train: each micro-batch holds whole groups, so each prompt goes through the update's forward pass once
    prompt_group = shared_prompt_group(config.num_generations, micro_batch)
    assert prompt_group == args.num_generations, prompt_group
    train_step = grpo.make_train_step(config, prompt_group=prompt_group)
    prompts = data.prepare_prompts(dataset, tokenizer, method="GRPO")
    key = jax.random.key(config.seed)
    seconds, rollout_seconds, lengths, stats = [], [], [], None
    cpu_seconds = {"rollout": [], "update": []}  # this process's CPU seconds (all threads): less load-sensitive
    for i in range(total):
        start, cpu_start = time.perf_counter(), time.process_time()
        arrays, metrics, _ = grpo.rollout(state, prompts[i * args.prompts:(i + 1) * args.prompts], [vowel_reward],
                                          tokenizer, config, key=jax.random.fold_in(key, i), mesh=None,
                                          prompt_buckets=[args.prompt_len])
        rollout_done, cpu_rollout_done = time.perf_counter(), time.process_time()  # numpy arrays: sampling done
        batch = {k: v.reshape(1, micro_batch, *v.shape[1:]) for k, v in arrays.items()}
        state, step_metrics = train_step(state, shard_batch(batch, None, batch_axis=1))
        entropy = float(jax.block_until_ready(step_metrics["entropy"]))
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
            rollout_seconds.append(rollout_done - start)
            cpu_seconds["rollout"].append(cpu_rollout_done - cpu_start)
            cpu_seconds["update"].append(time.process_time() - cpu_rollout_done)
        if stats is None:
            stats = {"reward": metrics["reward"], "entropy": entropy}
        lengths.append(metrics["completions/mean_length"])
    stats.update(mean_length=statistics.mean(lengths), rollout_s=statistics.median(rollout_seconds),
                 rollout_cpu_s=statistics.median(cpu_seconds["rollout"]),
                 update_cpu_s=statistics.median(cpu_seconds["update"]))
    return seconds, stats


def time_trl(args, checkpoint, tokenizer, dataset):
    import torch
    import transformers
    import trl

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.seconds, self.started = [], None

        def on_step_begin(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.started)

    time.sleep(1.0)  # let the JAX thread pool go quiet before torch runs on the same cores
    # No activation checkpointing (TRL's GRPO default is on); transformers 5 renamed the field.
    no_checkpointing = ({"activation_checkpointing": False}
                        if "activation_checkpointing" in transformers.TrainingArguments.__dataclass_fields__
                        else {"gradient_checkpointing": False})
    timer = StepTimer()
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="jaxpt_grpo_trl_") as output_dir:
        config = trl.GRPOConfig(
            output_dir=output_dir, per_device_train_batch_size=args.prompts * args.num_generations,
            num_generations=args.num_generations, max_completion_length=args.max_completion_length, temperature=1.0,
            beta=0.0, loss_type="dapo", steps_per_generation=1, gradient_accumulation_steps=1, num_iterations=1,
            max_steps=total, bf16=False, use_vllm=False, report_to="none", **no_checkpointing,
            use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
            shuffle_dataset=False,
        )
        trainer = trl.GRPOTrainer(model=checkpoint, reward_funcs=[vowel_reward], args=config, train_dataset=dataset,
                                  processing_class=tokenizer, callbacks=[timer])
        assert trainer.model.dtype == torch.float32 and not trainer.args.gradient_checkpointing
        trainer.remove_callback(transformers.PrinterCallback)  # no per-step log dicts on stdout
        rollout_seconds = []
        generate_and_score = trainer._generate_and_score_completions

        def timed_generate_and_score(*a, **kw):  # sampling, rewards, advantages: what jaxpt's rollout does
            start = time.perf_counter()
            out = generate_and_score(*a, **kw)
            rollout_seconds.append(time.perf_counter() - start)
            return out

        trainer._generate_and_score_completions = timed_generate_and_score
        trainer.train()
    logs = [record for record in trainer.state.log_history if "completions/mean_length" in record]
    assert len(logs) == total and len(timer.seconds) == total, (len(logs), len(timer.seconds))
    stats = {"mean_length": statistics.mean(record["completions/mean_length"] for record in logs),
             "reward": logs[0]["reward"],
             "entropy": logs[0]["entropy"], "rollout_s": statistics.median(rollout_seconds[args.warmup:])}
    assert len(rollout_seconds) == total, len(rollout_seconds)
    return timer.seconds[args.warmup:], stats


if __name__ == "__main__":
    main()
