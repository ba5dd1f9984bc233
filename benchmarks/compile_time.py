"""Compile time of the SFT train step: how it grows with depth (layers) and with sequence length (tokens).

Each point lowers and compiles `jaxpt.sft.make_train_step` (forward, fused NLL, backward, AdamW) for a tiny
Llama built abstractly (no weights allocated): hidden 256, vocab 8192, 4 heads (2 kv heads), intermediate 768,
batch 1. Nothing is run; only `lower` + `compile` are timed, as wall-clock seconds and as CPU seconds of this
process (what a loaded, shared machine disturbs least), the fastest of `--repeats` tries. Each sweep prints the
seconds per point and the ratios to its first point; the last stdout line is one JSON object with every sweep's
numbers.

    python benchmarks/compile_time.py                        # every sweep
    python benchmarks/compile_time.py --sweep layers         # 2, 4, 8, 16 layers at 512 tokens
    python benchmarks/compile_time.py --sweep tokens         # 512 ... 8192 tokens at 2 layers
    python benchmarks/compile_time.py --gradient_checkpointing true

(From a source checkout, `python -m benchmarks.compile_time` measures that checkout's jaxpt; running the file
directly imports the installed one.)

Targets (issue 8, this CPU): 16 layers within 1.5x of 2 layers; 4096 tokens within 1.5x of 512 tokens.
"""

from __future__ import annotations

import argparse
import json
import time

SWEEPS = ("layers", "tokens")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", default="all", choices=[*SWEEPS, "all"])
    parser.add_argument("--layers", default="2,4,8,16", help="layer counts of the layers sweep")
    parser.add_argument("--layers_seq_len", type=int, default=512, help="tokens per row in the layers sweep")
    parser.add_argument("--tokens", default="512,1024,2048,4096,8192", help="row lengths of the tokens sweep")
    parser.add_argument("--tokens_num_layers", type=int, default=2, help="layers in the tokens sweep")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--intermediate_size", type=int, default=768)
    parser.add_argument("--gradient_checkpointing", default="false", choices=["true", "false"])
    parser.add_argument("--repeats", type=int, default=1,
                        help="compile each point this many times and keep the fastest (the machine may be shared)")
    return parser.parse_args()


def compile_seconds(args, *, num_layers: int, seq_len: int) -> tuple[float, float]:
    """Wall-clock and CPU seconds (all threads of this process) to lower + compile one SFT train step for
    `num_layers` layers and rows of `seq_len` tokens."""
    import jax
    import jax.numpy as jnp
    import optax
    import transformers

    import jaxpt.models
    from jaxpt import sft
    from jaxpt.train_state import TrainState

    hf_config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max(2048, seq_len),
    )

    def build():
        model = jaxpt.models.from_config(hf_config)
        jaxpt.models.set_gradient_checkpointing(model, args.gradient_checkpointing == "true")
        return model

    state = jax.eval_shape(lambda: TrainState.create(build(), optax.adamw(1e-5)))  # shapes only
    config = sft.SFTConfig(output_dir="/tmp/unused", max_length=seq_len, report_to=[])
    step = sft.make_train_step(config)
    batch = {name: jax.ShapeDtypeStruct((1, 1, seq_len), jnp.int32)
             for name in ("input_ids", "attention_mask", "loss_mask")}
    start, start_cpu = time.perf_counter(), time.process_time()
    step.lower(state, batch).compile()
    return time.perf_counter() - start, time.process_time() - start_cpu


def sweep(args, name: str, points: list[int], **fixed) -> dict:
    """Compile at each point of one sweep; print wall and CPU seconds and their ratios to the first point."""
    key = {"layers": "num_layers", "tokens": "seq_len"}[name]
    timings = [min(compile_seconds(args, **{key: point}, **fixed) for _ in range(args.repeats)) for point in points]
    wall, cpu = [t[0] for t in timings], [t[1] for t in timings]
    print(f"compile time vs {name} ({', '.join(f'{k}={v}' for k, v in fixed.items())}):")
    for point, w, c in zip(points, wall, cpu, strict=True):
        print(f"  {name}={point:6d}  wall {w:7.2f} s (ratio {w / wall[0]:.2f}x)"
              f"  cpu {c:7.2f} s (ratio {c / cpu[0]:.2f}x)")
    return {"points": points, "seconds": [round(s, 2) for s in wall], "ratios": [round(s / wall[0], 3) for s in wall],
            "cpu_seconds": [round(s, 2) for s in cpu], "cpu_ratios": [round(s / cpu[0], 3) for s in cpu], **fixed}


def sweep_layers(args) -> dict:
    return sweep(args, "layers", [int(n) for n in args.layers.split(",")], seq_len=args.layers_seq_len)


def sweep_tokens(args) -> dict:
    return sweep(args, "tokens", [int(n) for n in args.tokens.split(",")], num_layers=args.tokens_num_layers)


def main():
    args = parse_args()
    import jax

    result = {"benchmark": "compile_time", "device": jax.devices()[0].device_kind,
              "gradient_checkpointing": args.gradient_checkpointing == "true"}
    if args.sweep in ("layers", "all"):
        result["layers"] = sweep_layers(args)
    if args.sweep in ("tokens", "all"):
        result["tokens"] = sweep_tokens(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
