"""Compile time of the real SFT train step (`jaxpt.sft.make_train_step`) as the model grows, on this machine.

A sweep lowers and compiles the step for a tiny Llama at several sizes, one compile per size (no cache),
and prints each compile's seconds and its ratio to the first size, then one JSON line.

    python benchmarks/compile_time.py --sweep tokens     # 512, 1024, 2048, 4096, 8192 tokens (1 row, 2 layers)

Compile time should not grow with the sequence length: attention loops over its blocks instead of unrolling
them (target: 4096 tokens <= 1.5x 512 tokens).
"""

from __future__ import annotations

import argparse
import json
import time


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", default="tokens", choices=["tokens"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192],
                        help="sequence lengths of the tokens sweep")
    parser.add_argument("--num_hidden_layers", type=int, default=2, help="layers of the tokens sweep")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    return parser.parse_args()


def sft_step_compile_seconds(*, num_hidden_layers: int, seq_len: int, hidden_size: int = 64,
                             gradient_checkpointing: bool = False) -> float:
    """Seconds to lower and compile one SFT train step (1 row of `seq_len` tokens) for a tiny Llama."""
    import jax
    import jax.numpy as jnp
    import optax

    import jaxpt.models
    from jaxpt.demo import tiny_llama
    from jaxpt.sft import SFTConfig, make_train_step
    from jaxpt.train_state import TrainState

    model = tiny_llama(256, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_hidden_layers, max_position_embeddings=max(seq_len, 256))
    jaxpt.models.set_gradient_checkpointing(model, gradient_checkpointing)
    state = jax.eval_shape(lambda: TrainState.create(model, optax.adamw(1e-4)))
    tokens = jax.ShapeDtypeStruct((1, 1, seq_len), jnp.int32)
    batch = {"input_ids": tokens, "loss_mask": tokens, "attention_mask": tokens}
    step = make_train_step(SFTConfig(output_dir="/tmp/jaxpt_compile_time"))
    start = time.perf_counter()
    step.lower(state, batch).compile()
    return time.perf_counter() - start


def sweep_tokens(args) -> dict:
    """SFT step compile time vs sequence length, and each one's ratio to the shortest."""
    seconds = {}
    for seq_len in args.tokens:
        seconds[seq_len] = sft_step_compile_seconds(num_hidden_layers=args.num_hidden_layers, seq_len=seq_len,
                                                    hidden_size=args.hidden_size,
                                                    gradient_checkpointing=args.gradient_checkpointing)
        ratio = seconds[seq_len] / seconds[args.tokens[0]]
        print(f"{seq_len:6d} tokens: {seconds[seq_len]:7.2f} s  ({ratio:.2f}x {args.tokens[0]} tokens)", flush=True)
    first = seconds[args.tokens[0]]
    return {"benchmark": "compile_time", "sweep": "tokens", "num_hidden_layers": args.num_hidden_layers,
            "seconds": {str(k): round(v, 2) for k, v in seconds.items()},
            "ratio": {str(k): round(v / first, 2) for k, v in seconds.items()}}


def main():
    args = parse_args()
    result = {"tokens": sweep_tokens}[args.sweep](args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
