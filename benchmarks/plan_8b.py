"""`jaxpt plan` at Llama-3-8B shapes: per-device memory, flops and collective traffic of the SFT and DPO steps
(and GRPO's with `--methods grpo`: 8 completions per device of a 512-token prompt + 1536 tokens, each prompt run
once per group of 8).

Writes a Llama-3-8B `config.json` (vocab 128256, hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 kv heads,
llama3 rope scaling as in Llama-3.1-8B) to a temporary directory (no weights) and plans each method's real train
step on a mesh of `--mesh` simulated CPU devices (default fsdp=64; a child process with
`--xla_force_host_platform_device_count`), or for a TPU topology with `--topology v5p:4x4x4` (needs libtpu:
`pip install 'jaxpt[tpu-plan]'`). Per device: 1 x 2048 tokens, bf16 compute, gradient checkpointing. Prints, per
method, argument + temp bytes (target <= 24 GiB), flops against the analytic band (6 x params x tokens for forward
+ backward, +2 for the checkpointed forward, +2 for DPO's in-step reference forward: SFT 6-9, DPO 8-11),
collective bytes by kind (each collective counted at its whole, unsplit buffer: on CPU devices XLA widens bfloat16
collectives to float32, so the all-gathers count 4 bytes per parameter where the step gathers bfloat16), and one JSON
line with everything.

    python benchmarks/plan_8b.py                          # SFT and DPO, 64 CPU devices (minutes per method)
    python benchmarks/plan_8b.py --methods sft --topology v5p:4x4x4
"""

from __future__ import annotations

import argparse
import json
import tempfile

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                 rope_theta=500000.0, tie_word_embeddings=False,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
# Analytic flops per parameter and token: forward 2, backward 4, the checkpointed forward 2, a reference forward 2.
BANDS = {"sft": (6.0, 9.0), "dpo": (8.0, 11.0)}
TARGET_GIB = 24.0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="sft,dpo")
    parser.add_argument("--mesh", default="data=1,fsdp=64,tensor=1")
    parser.add_argument("--per_device_train_batch_size", type=int, default=1)
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--topology", default=None, help="a TPU topology, e.g. v5p:4x4x4 (needs libtpu)")
    parser.add_argument("--hbm_gib", type=float, default=95.0, help="v5p: 95 GiB per chip")
    parser.add_argument("--num_hidden_layers", type=int, default=32, help="fewer for a quick look")
    parser.add_argument("--grpo_per_device_train_batch_size", type=int, default=8,
                        help="grpo: completions per device (a multiple of --num_generations runs each prompt once "
                             "per group)")
    parser.add_argument("--num_generations", type=int, default=8, help="grpo: completions per prompt")
    parser.add_argument("--max_prompt_length", type=int, default=512, help="grpo: prompt tokens of --max_length")
    return parser.parse_args()


def main():
    args = parse_args()
    import transformers

    from jaxpt import plan

    config = transformers.LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": args.num_hidden_layers})
    results = {}
    with tempfile.TemporaryDirectory(prefix="jaxpt_plan_8b_") as directory:
        config.save_pretrained(directory)
        for method in args.methods.split(","):
            rollout = {}  # grpo: num_generations completions of each prompt, a prompt of max_prompt_length tokens
            if method == "grpo":
                rollout = dict(max_prompt_length=args.max_prompt_length,
                               config_overrides={"num_generations": args.num_generations})
            result = plan.plan(directory, method=method, mesh_shape=args.mesh,
                               per_device_train_batch_size=(args.grpo_per_device_train_batch_size if method == "grpo"
                                                            else args.per_device_train_batch_size),
                               max_length=args.max_length, gradient_checkpointing=True, bf16=True,
                               topology=args.topology, hbm_gib=args.hbm_gib, **rollout)
            low, high = BANDS.get(method, (6.0, 9.0))
            ratio = result["flops_per_param_token"] * result["matmul_params"] / result["params"]
            result["flops_per_total_param_token"] = ratio
            result["flops_in_band"] = low <= result["flops_per_param_token"] <= high
            result["argument_plus_temp_within_target"] = result["argument_plus_temp_bytes"] <= TARGET_GIB * 2**30
            results[method] = result
            print(plan.format_table(result))
            print(f"{method}: argument + temp {result['argument_plus_temp_bytes'] / 2**30:.2f} GiB per device "
                  f"(target <= {TARGET_GIB:.0f} GiB: {'ok' if result['argument_plus_temp_within_target'] else 'OVER'});"
                  f" flops {result['flops_per_param_token']:.2f} x matmul params x tokens "
                  f"({ratio:.2f} x all params; band {low:g}-{high:g}: "
                  f"{'ok' if result['flops_in_band'] else 'OUT'}); collectives "
                  f"{result['collective_bytes'] / 2**30:.2f} GiB ("
                  + ", ".join(f"{kind} {size / 2**30:.2f}" for kind, size in result["collective_bytes_by_kind"].items()
                              if size) + f"); compile {result['compile_seconds']:.0f} s\n",
                  flush=True)
    print(json.dumps({"benchmark": "plan_8b", "mesh": args.mesh, "topology": args.topology,
                      "num_hidden_layers": args.num_hidden_layers, "results": results}))


if __name__ == "__main__":
    main()
