"""SFT train step, full fine-tuning vs LoRA: step time and parameter + optimizer memory, jaxpt beside TRL + peft.

The same tiny Llama and the same texts on every side. A step is the forward and backward of `--batch` sequences of
`--seq_len` tokens and AdamW (global-norm clipping). LoRA: rank `--lora_r`, alpha `--lora_alpha`, TRL's default
dropout 0.05, on `--lora_target_modules` (default every linear layer of the decoder); only the adapters get
gradients and optimizer state. Memory is counted from the arrays each side holds: parameters (trained and frozen)
and optimizer state (jaxpt: `state.params` + `state.frozen`, `state.opt_state`; TRL: the model's parameters and
`trainer.optimizer.state` after the run). TRL steps are timed by a callback (`on_step_begin` .. `on_step_end`).
Prints a table (median step ms, parameter MB, optimizer MB per variant and side), the ratios LoRA / full and
jaxpt / TRL, and one JSON line.

    python benchmarks/lora_step.py                    # CPU, float32
    python benchmarks/lora_step.py --skip_trl         # jaxpt only

Variants are columns: `full`, `lora`, and `qlora` (the base's decoder linear layers in NF4, or int8 with
`--qlora_kind int8`, `jaxpt.quantize`; TRL's side needs bitsandbytes on a CUDA device, so on CPU it reads n/a).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import tempfile
import time

VARIANTS = ("full", "lora", "qlora")
MB = 1e6


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--intermediate_size", type=int, default=768)
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--num_key_value_heads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per sequence, EOS included")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_alpha", type=float, default=32)
    parser.add_argument("--lora_target_modules", nargs="+", default=["all-linear"])
    parser.add_argument("--qlora_kind", default="nf4", choices=("nf4", "int8"), help="the QLoRA column's base")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip_trl", action="store_true")
    return parser.parse_args()


def text_rows(count: int, length: int, seed: int = 0) -> list[dict]:
    """Random printable text of `length` characters: one token per character with the character tokenizer."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + " .,;:!?"
    return [{"text": "".join(rng.choice(alphabet) for _ in range(length))} for _ in range(count)]


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
    checkpoint = tempfile.mkdtemp(prefix="jaxpt_lora_bench_")
    transformers.LlamaForCausalLM(hf_config).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    total_steps = args.warmup + args.steps
    dataset = datasets.Dataset.from_list(text_rows(args.batch * total_steps, args.seq_len - 1))  # + EOS

    results = {}
    for variant in args.variants:
        results[variant] = {"jaxpt": time_jaxpt(args, checkpoint, tokenizer, dataset, variant)}
        if not args.skip_trl:
            results[variant]["trl"] = time_trl(args, checkpoint, tokenizer, dataset, variant)
    report(args, results)


def report(args, results: dict) -> None:
    def cell(run):
        if run is None:
            return f"{'n/a':>10} {'':>10} {'':>10}"
        return f"{run['step_ms']:10.1f} {run['param_bytes'] / MB:10.2f} {run['optimizer_bytes'] / MB:10.2f}"

    sides = ["jaxpt"] + ([] if args.skip_trl else ["trl"])
    print(f"{'':8}" + "".join(f" {side + ' step ms':>10} {'params MB':>10} {'optim. MB':>10}" for side in sides))
    for variant, runs in results.items():
        print(f"{variant:8}" + "".join(f" {cell(runs.get(side))}" for side in sides))
    out = {"benchmark": "lora_step", "device": device_name(), "batch": args.batch, "seq_len": args.seq_len,
           "lora_r": args.lora_r, "target_modules": args.lora_target_modules, "steps": args.steps}
    for variant, runs in results.items():
        for side, run in runs.items():
            out[f"{side}_{variant}"] = run
    full, lora = results.get("full", {}), results.get("lora", {})
    for side in sides:
        if full.get(side) and lora.get(side):
            step = lora[side]["step_ms"] / full[side]["step_ms"]
            optimizer = lora[side]["optimizer_bytes"] / full[side]["optimizer_bytes"]
            print(f"{side}: LoRA / full step time {step:.2f}x, optimizer memory {optimizer:.3f}x")
            out[f"{side}_lora_over_full_step"] = round(step, 3)
            out[f"{side}_lora_over_full_optimizer_bytes"] = round(optimizer, 4)
    for variant, runs in results.items():
        if runs.get("jaxpt") and runs.get("trl"):
            ratio = runs["trl"]["step_ms"] / runs["jaxpt"]["step_ms"]
            print(f"{variant}: jaxpt speed / TRL speed {ratio:.2f}x")
            out[f"{variant}_ratio"] = round(ratio, 3)
    print(json.dumps(out))


def device_name() -> str:
    import jax

    return jax.devices()[0].device_kind


def nbytes(tree) -> int:
    import jax

    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree) if hasattr(leaf, "dtype"))


def quantize_base(model, args):
    """The QLoRA column's base model: every decoder linear layer quantized by `jaxpt.quantize` (`--qlora_kind`
    nf4, as `--load_in_4bit`, or int8, as `--load_in_8bit`) before the adapters go on."""
    from jaxpt import quantize

    return quantize.quantize_model(model, kind=args.qlora_kind)


def time_jaxpt(args, checkpoint, tokenizer, dataset, variant: str) -> dict | None:
    import jax

    import jaxpt.models
    from jaxpt import lora, sft
    from jaxpt.sharding import shard_batch
    from jaxpt.train_state import TrainState, make_optimizer

    total_steps = args.warmup + args.steps
    config = sft.SFTConfig(output_dir=tempfile.mkdtemp(), max_length=args.seq_len, completion_only_loss=False,
                           per_device_train_batch_size=args.batch, max_steps=total_steps, mesh_fsdp=1,
                           learning_rate=1e-4)
    model = jaxpt.models.from_pretrained(checkpoint)
    if variant == "qlora":
        model = quantize_base(model, args)
        if model is None:
            return None
    if variant in ("lora", "qlora"):
        lora.apply_lora(model, lora.LoraConfig(use_peft=True, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                                               lora_dropout=0.05, lora_target_modules=args.lora_target_modules))
    tx, _ = make_optimizer(config, total_steps)  # AdamW + global-norm clipping, as TRL's default
    state = TrainState.create(model, tx)
    step = sft.make_train_step(config)
    examples = sft.prepare_dataset(dataset, tokenizer, config)
    batches = [sft.collate(examples[i * args.batch:(i + 1) * args.batch], accumulation_steps=1,
                           buckets=[args.seq_len], pad_token_id=tokenizer.pad_token_id) for i in range(total_steps)]
    assert batches[0]["input_ids"].shape == (1, args.batch, args.seq_len), batches[0]["input_ids"].shape
    seconds, losses = [], []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        state, metrics = step(state, shard_batch(batch, None, batch_axis=1))
        losses.append(float(jax.block_until_ready(metrics["loss"])))
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
    return {"step_ms": round(statistics.median(seconds) * 1e3, 1), "first_loss": round(losses[0], 4),
            "trained_params": sum(leaf.size for leaf in jax.tree.leaves(state.params)),
            "param_bytes": nbytes(state.params) + nbytes(state.frozen), "optimizer_bytes": nbytes(state.opt_state)}


def time_trl(args, checkpoint, tokenizer, dataset, variant: str) -> dict | None:
    import peft
    import torch
    import transformers
    import trl

    if variant == "qlora":  # bitsandbytes quantization needs a CUDA device; not on CPU
        if not torch.cuda.is_available():
            return None
    peft_config = None
    if variant in ("lora", "qlora"):
        targets = args.lora_target_modules
        targets = targets[0] if targets == ["all-linear"] else targets  # peft reads "all-linear" as a string
        peft_config = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.05,
                                      target_modules=targets, task_type="CAUSAL_LM")

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
    config = trl.SFTConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=total_steps,
        max_length=args.seq_len, learning_rate=1e-4, bf16=False, gradient_checkpointing=False, report_to="none",
        logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, use_cpu=not torch.cuda.is_available(),
        dataloader_drop_last=True, packing=False,
    )
    trainer = trl.SFTTrainer(model=checkpoint, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[timer])
    trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    model = trainer.model
    optimizer_bytes = sum(value.numel() * value.element_size() for state in trainer.optimizer.state.values()
                          for value in state.values() if torch.is_tensor(value))
    return {"step_ms": round(statistics.median(timer.seconds[args.warmup:]) * 1e3, 1),
            "first_loss": round(losses[0], 4),
            "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "optimizer_bytes": optimizer_bytes}


if __name__ == "__main__":
    main()
