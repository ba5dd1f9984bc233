"""Tiny models, tokenizers and datasets for the tests: the package's own demo builders (nothing downloaded)."""

from jaxpt.demo import CHAT_TEMPLATE, char_tokenizer, tiny_llama, tiny_llama_config
from jaxpt.demo import arithmetic_examples as arithmetic_texts

__all__ = ["CHAT_TEMPLATE", "arithmetic_texts", "char_tokenizer", "tiny_llama", "tiny_llama_config"]


def marker_preferences(count: int, *, seed: int = 0) -> list[dict]:
    """Preference pairs {"prompt", "chosen", "rejected"} of random letters where only the chosen answer holds a
    '#': a separable task a tiny reward model learns fast."""
    import random

    rng = random.Random(seed)

    def letters() -> str:
        return "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6)))

    rows = []
    for _ in range(count):
        prompt, answer = f"{letters()}?", letters()
        cut = rng.randint(0, len(answer))
        rows.append({"prompt": prompt, "chosen": answer[:cut] + "#" + answer[cut:], "rejected": letters()})
    return rows
