"""`jaxpt <command>`: the command line.

    jaxpt smoke [--output_dir DIR]   build a tiny random Llama, save it in Hugging Face format, load it back
                                     with jaxpt.models.from_pretrained and print its logits
"""

from __future__ import annotations

import argparse
import sys
import tempfile


def smoke(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxpt smoke", description="Load a tiny model and print its logits.")
    parser.add_argument("--output_dir", default=None, help="where to write the tiny checkpoint (default: a temp dir)")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import transformers

    import jaxpt.models

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="jaxpt_smoke_")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    jaxpt.models.save_pretrained(jaxpt.models.from_config(config, seed=0), output_dir)
    model = jaxpt.models.from_pretrained(output_dir)
    input_ids = jnp.asarray(np.arange(1, 9, dtype=np.int32)[None])
    logits = jax.jit(lambda ids: model(ids))(input_ids)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; tiny Llama saved to {output_dir}")
    print(f"logits {tuple(logits.shape)} {logits.dtype}; first row, first 5: {np.asarray(logits[0, 0, :5]).round(4)}")
    print(f"greedy next tokens: {np.asarray(jnp.argmax(logits[0], -1)).tolist()}")
    return 0


COMMANDS = {"smoke": smoke}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
