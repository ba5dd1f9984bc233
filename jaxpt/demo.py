"""Everything the embedded demo needs, shipped with the package: a character tokenizer with a chat template,
a small Llama-architecture model, and a synthetic arithmetic task with verifiable answers.

Also handy for examples and tests: nothing here touches the network.
"""

from __future__ import annotations

import random
import string

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]

# Assistant turns are wrapped in {% generation %} so `assistant_only_loss` can find them.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}<|end|>"
    "{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(*, chat_template: bool = True):
    """A `transformers` fast tokenizer with one token per printable ASCII character plus special tokens
    (`<pad>`=0, `<s>`=1, `</s>`=2 is EOS); no BOS is added. Saves and reloads with `AutoTokenizer`."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(vocab_size: int, **overrides):
    """A `transformers.LlamaConfig` for a small model (2 layers, hidden 32 by default)."""
    import transformers

    settings = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, initializer_range=0.05, tie_word_embeddings=False)
    settings.update(overrides)
    return transformers.LlamaConfig(**settings)


def tiny_llama(vocab_size: int, *, seed: int = 0, num_labels: int | None = None, **overrides):
    """A freshly initialised jaxpt Llama (causal LM, or a classifier with `num_labels`)."""
    import jaxpt.models

    return jaxpt.models.from_config(tiny_llama_config(vocab_size, **overrides), num_labels=num_labels, seed=seed)


def arithmetic_examples(count: int, *, seed: int = 0, max_operand: int = 9) -> list[dict]:
    """Prompt-completion pairs `{"prompt": "3+4=", "completion": "7"}` (sums of two small numbers)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return rows
