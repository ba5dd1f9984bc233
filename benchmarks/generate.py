"""Generation throughput: `jaxpt.sampling.generate` vs `transformers` `generate`, same tiny Llama, one process.

Default model: vocab 8192, hidden 256, 4 layers, 4 heads (2 kv heads), intermediate 768; batch 8, 64-token
left-padded prompts (lengths 33..64), 128 new tokens. Both sides produce all 128 tokens (no EOS), greedy and
then sampled (temperature 0.7, top-k 50, top-p 0.9). Prints each side's median tokens/s over `--runs` timed
runs after `--warmup` untimed ones (compilation excluded), the ratio jaxpt / transformers, and one JSON line.

    python benchmarks/generate.py
    python benchmarks/generate.py --dtype bfloat16   # accelerator runs: bf16 compute for both
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per side and mode (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument("--skip_torch", action="store_true")
    return parser.parse_args()


SAMPLING = dict(temperature=0.7, top_k=50, top_p=0.9)


def main():
    args = parse_args()
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads, max_position_embeddings=2048, pad_token_id=0,
    )
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    rng = np.random.RandomState(0)
    batch, prompt_len = args.batch_size, args.prompt_len
    lengths = rng.randint(prompt_len // 2 + 1, prompt_len + 1, size=batch)
    prompt_mask = (np.arange(prompt_len)[None, :] >= (prompt_len - lengths)[:, None]).astype(np.int32)
    prompt_ids = rng.randint(1, args.vocab_size, (batch, prompt_len)) * prompt_mask
    tokens_per_run = batch * args.max_new_tokens

    result = {"benchmark": "generate", "device": device_name(), "dtype": args.dtype, "batch_size": batch,
              "prompt_len": prompt_len, "max_new_tokens": args.max_new_tokens}
    with tempfile.TemporaryDirectory(prefix="jaxpt_bench_") as checkpoint:
        hf_model.save_pretrained(checkpoint)
        runners = {("jaxpt", mode): run
                   for mode, run in jaxpt_runners(args, checkpoint, prompt_ids, prompt_mask).items()}
    if not args.skip_torch:
        runners.update({("transformers", mode): run
                        for mode, run in transformers_runners(args, hf_model, prompt_ids, prompt_mask).items()})
    seconds = time_blocks(dict(sorted(runners.items(), key=lambda item: item[0][1])), args)  # by mode
    for mode in ("greedy", "sampled"):
        tps = {}
        for side in ("jaxpt", "transformers"):
            if (side, mode) not in seconds:
                continue
            median = statistics.median(seconds[side, mode])
            tps[side] = tokens_per_run / median
            print(f"{mode:8s} {side:13s}: {tps[side]:10.0f} tokens/s  (median {median:.3f} s)")
            result[f"{mode}_{side}_tokens_per_s"] = round(tps[side], 1)
            result[f"{mode}_{side}_s"] = [round(s, 4) for s in seconds[side, mode]]
        if len(tps) == 2:
            print(f"{mode:8s} ratio jaxpt / transformers: {tps['jaxpt'] / tps['transformers']:.2f}x")
            result[f"{mode}_ratio"] = round(tps["jaxpt"] / tps["transformers"], 3)
    print(json.dumps(result))


def device_name() -> str:
    import jax

    return jax.devices()[0].device_kind


def jaxpt_runners(args, checkpoint, prompt_ids, prompt_mask):
    """mode -> run(seed): one `jaxpt.sampling.generate` call, waited for."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxpt.models
    import jaxpt.sampling

    model = jaxpt.models.from_pretrained(checkpoint, dtype=jnp.dtype(args.dtype))
    graphdef, params = nnx.split(model, nnx.Param)
    prompt_ids, prompt_mask = jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32)

    def runner(options):
        def run(seed):
            out = jaxpt.sampling.generate(graphdef, params, prompt_ids, prompt_mask, key=jax.random.key(seed),
                                          max_new_tokens=args.max_new_tokens, **options)
            assert int(out.lengths.min()) == args.max_new_tokens  # waits for the result
            return out

        return run

    return {"greedy": runner(dict(greedy=True)), "sampled": runner(SAMPLING)}


def transformers_runners(args, hf_model, prompt_ids, prompt_mask):
    """mode -> run(seed): one `transformers` `generate` call, waited for."""
    import torch

    model = hf_model
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    if torch.cuda.is_available():
        model = model.cuda()
    device = next(model.parameters()).device
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    mask = torch.tensor(prompt_mask, dtype=torch.long, device=device)
    # No EOS: every row generates all max_new_tokens, as on the jaxpt side.
    common = dict(attention_mask=mask, max_new_tokens=args.max_new_tokens, eos_token_id=None, pad_token_id=0)

    def runner(options):
        def run(seed):
            torch.manual_seed(seed)
            with torch.no_grad():
                out = model.generate(ids, **common, **options)
            if device.type == "cuda":
                torch.cuda.synchronize()
            assert out.shape[1] == ids.shape[1] + args.max_new_tokens
            return out

        return run

    return {"greedy": runner(dict(do_sample=False)), "sampled": runner(dict(do_sample=True, **SAMPLING))}


def time_blocks(runners, args):
    """Per runner, `--warmup` untimed calls (compilation) then `--runs` timed ones. One runner at a time, with a
    pause in between: alternating jaxpt and torch call by call made each slow the other (both runtimes' thread
    pools spin on the same cores for a while after their work). Returns (side, mode) -> seconds per run."""
    seconds = {}
    for name, run in runners.items():
        time.sleep(1.0)
        for seed in range(args.warmup):
            run(seed)
        seconds[name] = []
        for seed in range(args.runs):
            start = time.perf_counter()
            run(100 + seed)
            seconds[name].append(time.perf_counter() - start)
    return seconds


if __name__ == "__main__":
    main()
