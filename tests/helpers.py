"""Tiny models, tokenizers and datasets built in code for the method tests (nothing is downloaded)."""

from __future__ import annotations

import string

import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

import jaxpt.models

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}<|end|>"
    "{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(*, chat_template: bool = True) -> transformers.PreTrainedTokenizerFast:
    """One token per printable ASCII character, plus special tokens; a chat template with generation marks."""
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    assert tokenizer("ab")["input_ids"] == [vocab["a"], vocab["b"]]
    return tokenizer


def tiny_llama_config(vocab_size: int, **overrides) -> transformers.LlamaConfig:
    settings = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, initializer_range=0.05)
    settings.update(overrides)
    return transformers.LlamaConfig(**settings)


def tiny_llama(vocab_size: int, *, seed: int = 0, num_labels: int | None = None, **overrides):
    return jaxpt.models.from_config(tiny_llama_config(vocab_size, **overrides), num_labels=num_labels, seed=seed)


def arithmetic_texts(count: int, *, seed: int = 0) -> list[dict]:
    """Prompt-completion pairs like {"prompt": "3+4=", "completion": "7"}: a task a tiny model learns fast."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return rows
