"""DPO train-step throughput: jaxpt vs TRL's `DPOTrainer`, same tiny Llama, same preference pairs, one process.

A step is the policy's forward and backward on the chosen and rejected sequences, the reference model's forward
on the same sequences (computed every step on both sides: no precomputed log-probs), the sigmoid DPO loss and
AdamW. Default model: vocab 8192, hidden 256, 4 layers, 4 heads (2 kv heads), intermediate 768; 4 pairs per step,
each sequence 128 prompt + 128 completion tokens (so jaxpt's length bucket equals TRL's padded length). TRL runs
with `bf16=False`, `gradient_checkpointing=False`, `report_to="none"` and its fused log-prob head; its steps are
timed by a callback (`on_step_begin` .. `on_step_end`). Prints each side's median pairs/s over `--steps` timed
steps after `--warmup` ones, the ratio jaxpt / TRL, and one JSON line.

    python benchmarks/dpo_step.py                     # CPU, float32
    python benchmarks/dpo_step.py --dtype bfloat16    # accelerator runs: bf16 compute for both
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import tempfile
import time


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--intermediate_size", type=int, default=768)
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--num_key_value_heads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs per step (per device)")
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--completion_len", type=int, default=128, help="tokens per completion, EOS included")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument("--skip_trl", action="store_true")
    return parser.parse_args()


def preference_rows(count: int, prompt_len: int, completion_len: int, seed: int = 0) -> list[dict]:
    """Random printable text: one token per character with the benchmark's character tokenizer."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + " .,;:!?"
    text = lambda n: "".join(rng.choice(alphabet) for _ in range(n))
    return [{"prompt": text(prompt_len), "chosen": text(completion_len - 1), "rejected": text(completion_len - 1)}
            for _ in range(count)]


def main():
    args = parse_args()
    import datasets
    import torch
    import transformers

    from jaxpt.demo import char_tokenizer

    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    hf_config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads, max_position_embeddings=2048, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    checkpoint = tempfile.mkdtemp(prefix="jaxpt_dpo_bench_")
    transformers.LlamaForCausalLM(hf_config).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    total_steps = args.warmup + args.steps
    dataset = datasets.Dataset.from_list(preference_rows(args.pairs * total_steps, args.prompt_len,
                                                         args.completion_len))
    max_length = args.prompt_len + args.completion_len

    jax_seconds, jax_loss = time_jaxpt(args, checkpoint, tokenizer, dataset, max_length)
    trl_seconds, trl_loss = (None, None) if args.skip_trl else time_trl(args, checkpoint, tokenizer, dataset,
                                                                       max_length)

    jax_pps = args.pairs / statistics.median(jax_seconds)
    print(f"jaxpt : {jax_pps:8.2f} pairs/s  (median step {statistics.median(jax_seconds) * 1e3:.1f} ms, "
          f"first loss {jax_loss:.4f})")
    result = {"benchmark": "dpo_step", "device": device_name(), "dtype": args.dtype, "pairs": args.pairs,
              "seq_len": max_length, "vocab_size": args.vocab_size, "jaxpt_pairs_per_s": round(jax_pps, 2),
              "jaxpt_step_ms": [round(s * 1e3, 1) for s in jax_seconds]}
    if trl_seconds:
        trl_pps = args.pairs / statistics.median(trl_seconds)
        print(f"TRL   : {trl_pps:8.2f} pairs/s  (median step {statistics.median(trl_seconds) * 1e3:.1f} ms, "
              f"first loss {trl_loss:.4f})")
        print(f"ratio jaxpt / TRL: {jax_pps / trl_pps:.2f}x")
        result.update(trl_pairs_per_s=round(trl_pps, 2), ratio=round(jax_pps / trl_pps, 3),
                      trl_step_ms=[round(s * 1e3, 1) for s in trl_seconds])
    print(json.dumps(result))


def device_name() -> str:
    import jax

    return jax.devices()[0].device_kind


def time_jaxpt(args, checkpoint, tokenizer, dataset, max_length):
    import jax
    import jax.numpy as jnp

    import jaxpt.models
    from jaxpt import dpo
    from jaxpt.sharding import shard_batch
    from jaxpt.train_state import TrainState, make_optimizer

    total_steps = args.warmup + args.steps
    config = dpo.DPOConfig(output_dir=tempfile.mkdtemp(), max_length=max_length, loss_type="sigmoid",
                           per_device_train_batch_size=args.pairs, max_steps=total_steps, mesh_fsdp=1)
    model = jaxpt.models.from_pretrained(checkpoint, dtype=jnp.dtype(args.dtype))
    tx, _ = make_optimizer(config, total_steps)  # AdamW + global-norm clipping, as TRL's default
    state = TrainState.create(model, tx)
    ref_params = dpo.reference_params(state)
    step = dpo.make_train_step(config)
    examples = dpo.prepare_dataset(dataset, tokenizer, config)
    buckets = [max_length]
    batches = [dpo.collate(examples[i * args.pairs:(i + 1) * args.pairs], accumulation_steps=1, buckets=buckets,
                           pad_token_id=tokenizer.pad_token_id) for i in range(total_steps)]
    assert batches[0]["input_ids"].shape == (1, args.pairs, 2, max_length)
    seconds, first_loss = [], None
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        state, metrics = step(state, shard_batch(batch, None, batch_axis=1), ref_params)
        loss = float(jax.block_until_ready(metrics["loss"]))
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
        first_loss = loss if first_loss is None else first_loss
    return seconds, first_loss


def time_trl(args, checkpoint, tokenizer, dataset, max_length):
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

    timer = StepTimer()
    total_steps = args.warmup + args.steps
    config = trl.DPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.pairs, max_steps=total_steps,
        max_length=max_length, loss_type=["sigmoid"], bf16=args.dtype == "bfloat16", gradient_checkpointing=False,
        report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
        use_cpu=not torch.cuda.is_available(), dataloader_drop_last=True,
    )
    trainer = trl.DPOTrainer(model=checkpoint, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[timer])
    trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    return timer.seconds[args.warmup:], losses[0]


if __name__ == "__main__":
    main()
