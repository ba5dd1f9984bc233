"""Train-step throughput: jaxpt vs transformers (PyTorch eager), same tiny Llama, same data, one process.

A step is forward, next-token cross-entropy, backward and AdamW. Default model: vocab 8192, hidden 256,
4 layers, 4 heads (2 kv heads), intermediate 768; batch 8 x 512 tokens. Prints each side's median
tokens/s over `--steps` timed steps (after warm-up), the ratio jaxpt / transformers, and one JSON line.

    python benchmarks/forward_backward.py            # CPU, float32
    python benchmarks/forward_backward.py --dtype bfloat16   # accelerator runs: bf16 compute for both
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
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument("--loss", default="fused", choices=["fused", "chunked", "full"],
                        help="jaxpt's loss path: fused NLL from hidden states (gradient in the forward pass, "
                             "what SFT uses), chunked log-probs, or full logits")
    parser.add_argument("--skip_torch", action="store_true")
    return parser.parse_args()


def main():
    args = parse_args()
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads, max_position_embeddings=max(2048, args.seq_len),
    )
    hf_model = transformers.LlamaForCausalLM(hf_config)
    input_ids = np.random.RandomState(0).randint(0, args.vocab_size, (args.batch_size, args.seq_len))
    tokens_per_step = args.batch_size * args.seq_len

    with tempfile.TemporaryDirectory(prefix="jaxpt_bench_") as checkpoint:
        hf_model.save_pretrained(checkpoint)
        jax_seconds = time_jaxpt(args, checkpoint, input_ids)
    torch_seconds = None if args.skip_torch else time_transformers(args, hf_model, input_ids)

    jax_tps = tokens_per_step / statistics.median(jax_seconds)
    print(f"jaxpt        : {jax_tps:10.0f} tokens/s  (median step {statistics.median(jax_seconds) * 1e3:.1f} ms)")
    result = {"benchmark": "forward_backward", "device": device_name(), "dtype": args.dtype,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "jaxpt_tokens_per_s": round(jax_tps, 1),
              "jaxpt_step_ms": [round(s * 1e3, 1) for s in jax_seconds]}
    if torch_seconds:
        torch_tps = tokens_per_step / statistics.median(torch_seconds)
        torch_ms = statistics.median(torch_seconds) * 1e3
        print(f"transformers : {torch_tps:10.0f} tokens/s  (median step {torch_ms:.1f} ms)")
        print(f"ratio jaxpt / transformers: {jax_tps / torch_tps:.2f}x")
        result.update(transformers_tokens_per_s=round(torch_tps, 1), ratio=round(jax_tps / torch_tps, 3),
                      transformers_step_ms=[round(s * 1e3, 1) for s in torch_seconds])
    print(json.dumps(result))


def device_name() -> str:
    import jax

    return jax.devices()[0].device_kind


def time_jaxpt(args, checkpoint, input_ids):
    import jax
    import jax.numpy as jnp
    import optax

    import jaxpt.models
    from jaxpt.losses.logprobs import (
        chunked_token_logps,
        masked_mean,
        next_token_targets,
        token_logps,
        weighted_nll_from_hidden,
    )
    from jaxpt.train_state import TrainState

    model = jaxpt.models.from_pretrained(checkpoint, dtype=jnp.dtype(args.dtype))
    state = TrainState.create(model, optax.adamw(1e-4, weight_decay=0.0))

    def step(state, input_ids):
        targets, target_mask = next_token_targets(input_ids)

        def loss_fn(params):
            model = state.replace(params=params).model()
            if args.loss == "fused":  # mean NLL over target tokens, as the transformers loss
                token_weights = target_mask / jnp.sum(target_mask)
                loss, _ = weighted_nll_from_hidden(model.hidden_states(input_ids), model.lm_head_weight(),
                                                   targets, token_weights)
                return loss
            if args.loss == "chunked":
                hidden = model.hidden_states(input_ids)
                logps = chunked_token_logps(hidden, model.lm_head_weight(), targets)
            else:
                logps = token_logps(model(input_ids), targets)
            return -masked_mean(logps, target_mask)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), loss

    step = jax.jit(step, donate_argnums=0)
    batch = jnp.asarray(input_ids, jnp.int32)
    for _ in range(args.warmup):
        state, loss = step(state, batch)
    jax.block_until_ready(loss)
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, loss = step(state, batch)
        jax.block_until_ready(loss)
        seconds.append(time.perf_counter() - start)
    print(f"jaxpt final loss {float(loss):.4f}")
    return seconds


def time_transformers(args, hf_model, input_ids):
    import torch

    model = hf_model
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    if torch.cuda.is_available():
        model = model.cuda()
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    batch = torch.tensor(input_ids, dtype=torch.long, device=device)

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    print(f"transformers final loss {float(loss):.4f}")
    return seconds


if __name__ == "__main__":
    main()
