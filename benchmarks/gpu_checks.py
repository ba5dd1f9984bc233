"""The accelerator checks of issue 8, as one short run: cuDNN attention against jaxpt's kernel in bfloat16, and the
SFT step's model-flops utilisation (MFU) on a 0.5B model.

1. Attention: `attn_implementation="cudnn"` (`jax.nn.dot_product_attention`, cuDNN's fused kernel on GPU) against
   the "xla" kernel, both in bfloat16, on right-padded rows (what cuDNN takes as sequence lengths), grouped-query
   heads, causal, with and without a sliding window: the largest difference of the outputs and of the gradients of
   queries, keys and values, relative to the largest reference value. Passes within `--attention_tolerance`.
2. MFU: `jaxpt.sft.make_train_step` (forward, fused loss, backward, AdamW) on a random Qwen2-0.5B-shaped model
   (hidden 896, 24 layers, 14 heads / 2 kv heads, intermediate 4864, vocab 151936, tied embeddings), bfloat16
   compute with float32 master weights, `--batch_size` x `--seq_len` tokens per step, for each attention
   implementation asked. Model flops per step = 6 x (matmul parameters) x tokens + 6 x layers x seq_len x hidden x
   tokens (causal attention's score and value products, forward and backward); MFU = model flops / step seconds /
   the device's peak (`--peak_tflops`, default from the device kind: H100/H200 SXM 989 bf16 dense TFLOP/s).

Prints a line per check and, last, one JSON line. `--tiny` shrinks everything so the script runs on a CPU in a
minute (a check of the script itself; its MFU is meaningless there).

    python benchmarks/gpu_checks.py                      # on a GPU machine
    python benchmarks/gpu_checks.py --tiny --implementations xla cudnn   # anywhere
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

# bf16 dense peak TFLOP/s by device kind (substring, lower case), the vendors' data sheets
PEAK_TFLOPS = {"h200": 989.4, "h100 80gb hbm3": 989.4, "h100 sxm": 989.4, "h100 nvl": 835.0, "h100 pcie": 756.0,
               "h100": 756.0, "a100": 312.0, "l4": 121.0}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes: a check of the script on CPU")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--implementations", nargs="+", default=["xla", "cudnn"])
    parser.add_argument("--peak_tflops", type=float, default=None)
    parser.add_argument("--attention_tolerance", type=float, default=2e-2,
                        help="largest difference / largest reference value, bfloat16")
    return parser.parse_args()


def model_config(tiny: bool):
    import transformers

    if tiny:
        return transformers.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                        max_position_embeddings=4096)
    return transformers.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                    num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                                    max_position_embeddings=32768)


def check_attention(args) -> dict:
    """cuDNN against the xla kernel, bfloat16: relative differences of the outputs and gradients."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpt.models.attention import attention

    batch, seq, q_heads, kv_heads, head_dim = (2, 128, 4, 2, 32) if args.tiny else (4, 2048, 16, 8, 128)
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rng.randn(batch, seq, heads, head_dim), jnp.bfloat16)
               for heads in (q_heads, kv_heads, kv_heads))
    lengths = np.asarray([seq, seq * 3 // 4, seq // 2, seq // 5][:batch])
    segments = jnp.asarray((np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32))
    cotangent = jnp.asarray(rng.randn(batch, seq, q_heads, head_dim) * np.asarray(segments)[..., None, None],
                            jnp.bfloat16)
    results = {}
    for window in (None, seq // 4):
        def run(implementation, q, k, v, window=window):
            out = attention(q, k, v, segment_ids=segments, scale=head_dim**-0.5, sliding_window=window,
                            implementation=implementation)
            return jnp.sum((out * cotangent).astype(jnp.float32)), out

        grads = {}
        for implementation in ("xla", "cudnn"):
            (_, out), grad = jax.jit(jax.value_and_grad(lambda q, k, v, i=implementation: run(i, q, k, v),
                                                        argnums=(0, 1, 2), has_aux=True))(q, k, v)
            grads[implementation] = (out, *grad)
        real = np.asarray(segments, bool)
        differences = {}
        for name, ours, theirs in zip(("out", "d_query", "d_key", "d_value"), grads["cudnn"], grads["xla"],
                                      strict=True):
            ours, theirs = np.asarray(ours, np.float32)[real], np.asarray(theirs, np.float32)[real]
            differences[name] = float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))
        label = "full" if window is None else f"window_{window}"
        results[label] = differences
        worst = max(differences.values())
        print(f"attention cudnn vs xla, bf16, {label}: " + ", ".join(f"{k} {v:.2e}" for k, v in differences.items())
              + f" -> {'ok' if worst <= args.attention_tolerance else 'OVER TOLERANCE'}")
    return results


def time_sft_step(args, implementation: str) -> dict:
    """Median seconds of the real SFT train step, and its model flops."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxpt.models
    from jaxpt import sft
    from jaxpt.plan import matmul_params
    from jaxpt.train_state import TrainState, make_optimizer

    hf_config = model_config(args.tiny)
    batch_size, seq_len = (2, 256) if args.tiny else (args.batch_size, args.seq_len)
    model = jaxpt.models.from_config(hf_config, dtype=jnp.bfloat16, attn_implementation=implementation)
    jaxpt.models.set_gradient_checkpointing(model, args.gradient_checkpointing)
    with tempfile.TemporaryDirectory(prefix="jaxpt_gpu_checks_") as output_dir:
        config = sft.SFTConfig(output_dir=output_dir, bf16=True, gradient_checkpointing=args.gradient_checkpointing,
                               per_device_train_batch_size=batch_size, max_length=seq_len, save_final_model=False)
    tx, _ = make_optimizer(config, args.warmup + args.steps)
    state = TrainState.create(model, tx)
    step = sft.make_train_step(config)
    ids = np.random.RandomState(0).randint(0, hf_config.vocab_size, (1, batch_size, seq_len)).astype(np.int32)
    ones = np.ones_like(ids)
    batch = jax.device_put({"input_ids": ids, "attention_mask": ones, "loss_mask": ones})
    tokens = batch_size * seq_len
    flops = (6 * matmul_params(state.full_params(), classifier=False) * tokens
             + 6 * hf_config.num_hidden_layers * seq_len * hf_config.hidden_size * tokens)
    seconds = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
    return {"seconds": statistics.median(seconds), "range": [min(seconds), max(seconds)], "model_flops": flops,
            "tokens": tokens, "loss": float(metrics["loss"])}


def main():
    args = parse_args()
    import jax

    device = jax.devices()[0].device_kind
    peak = args.peak_tflops
    if peak is None:
        peak = next((value for kind, value in PEAK_TFLOPS.items() if kind in device.lower()), None)
    result = {"benchmark": "gpu_checks", "device": device, "backend": jax.default_backend(), "tiny": args.tiny,
              "peak_tflops": peak, "attention": check_attention(args)}
    for implementation in args.implementations:
        timing = time_sft_step(args, implementation)
        achieved = timing["model_flops"] / timing["seconds"] / 1e12
        mfu = None if peak is None else achieved / peak
        print(f"sft step, attn_implementation={implementation}: {timing['seconds'] * 1e3:.1f} ms "
              f"({timing['range'][0] * 1e3:.1f}-{timing['range'][1] * 1e3:.1f}), {timing['tokens']} tokens, "
              f"{achieved:.1f} model TFLOP/s" + ("" if mfu is None else f", MFU {mfu:.1%}"))
        result[f"sft_{implementation}"] = dict(timing, model_tflops_per_s=round(achieved, 2),
                                               mfu=None if mfu is None else round(mfu, 4))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
