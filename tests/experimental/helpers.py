"""What the experimental methods' tests share: the tokenizer, preference rows, and tiny models saved once."""

import random

import jaxpt.models
from tests.helpers import char_tokenizer, tiny_llama

TOKENIZER = char_tokenizer()
VOCAB = len(TOKENIZER)


def preference_rows(count, *, seed=0):
    """`a+b=`: chosen the sum, rejected a wrong one (of varying length)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + rng.choice([1, 2, 13]))})
    return rows


def save_tiny_model(directory, *, seed=0):
    """A tiny Llama and the tokenizer saved in Hugging Face format (what both jaxpt and TRL load)."""
    jaxpt.models.save_pretrained(tiny_llama(VOCAB, seed=seed), directory)
    TOKENIZER.save_pretrained(directory)
    return directory
