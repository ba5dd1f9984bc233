"""One pad-token rule for every method: `data.pad_token_id` (pad, else EOS as TRL, else 0)."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from jaxpt import data
from tests.helpers import char_tokenizer

PACKAGE = Path(__file__).resolve().parents[1] / "jaxpt"


def test_pad_else_eos_else_zero():
    assert data.pad_token_id(char_tokenizer()) == 0  # <pad>
    assert data.pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert data.pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    assert data.pad_token_id(SimpleNamespace(pad_token_id=7, eos_token_id=2)) == 7


@pytest.mark.parametrize("module", ["sft", "dpo", "reward", "kto", "rollout"])
def test_methods_pad_through_the_one_rule(module):
    source = (PACKAGE / f"{module}.py").read_text()
    assert "data.pad_token_id(tokenizer)" in source
    assert "tokenizer.pad_token_id" not in source  # no second fallback of its own
