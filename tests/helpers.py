"""Tiny models, tokenizers and datasets for the tests: the package's own demo builders (nothing downloaded)."""

from jaxpt.demo import CHAT_TEMPLATE, char_tokenizer, tiny_llama, tiny_llama_config
from jaxpt.demo import arithmetic_examples as arithmetic_texts

__all__ = ["CHAT_TEMPLATE", "arithmetic_texts", "char_tokenizer", "tiny_llama", "tiny_llama_config"]
