"""SFT data preparation parity with TRL 1.16: `SFTTrainer._prepare_dataset` (its own tokenisation, EOS handling,
completion-only and assistant-only labels, truncation and `pack_dataset`) against `jaxpt.sft.prepare_dataset` on
the same rows with the same tokenizer.

TRL's method runs on a bare `SFTTrainer` (no `__init__`, so no model) holding the three attributes it reads. Its
rows are compared token for token: `input_ids`, the loss mask as TRL's `labels != -100`, and for packed rows the
sequences of each row in order (TRL's `seq_lengths` = the lengths of jaxpt's segments).
"""

import datasets
import numpy as np
import pytest
import trl  # a test dependency: parity must fail, never skip, without it

from jaxpt import sft
from tests.helpers import char_tokenizer

TOKENIZER = char_tokenizer()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# Rows in the shapes of TRL's own SFT tests (standard / conversational x language modeling / prompt-completion),
# with lengths around max_length so that truncation and splitting happen.
LANGUAGE_MODELING = [{"text": "The sky is blue."}, {"text": "ab"}, {"text": "Python is a programming language " * 2},
                     {"text": "x" * 11}, {"text": "hello world"}, {"text": "q"}]
PROMPT_COMPLETION = [{"prompt": "The sky is", "completion": " blue."}, {"prompt": "2+2=", "completion": "4"},
                     {"prompt": "Long prompt ", "completion": " and a long completion " * 2},
                     {"prompt": "Q:", "completion": " ok</s>"}]  # EOS already there: not added twice
CONVERSATIONAL = [{"messages": [user("What color is the sky?"), assistant("It is blue.")]},
                  {"messages": [{"role": "system", "content": "Be terse."}, user("hi"), assistant("yo"),
                                user("and?"), assistant("done")]},
                  {"messages": [user("Where is Paris?"), assistant("In France, on the Seine " * 2)]}]
CONVERSATIONAL_PROMPT_COMPLETION = [
    {"prompt": [user("What color is the sky?")], "completion": [assistant("It is blue.")]},
    {"prompt": [{"role": "system", "content": "Be terse."}, user("hi")], "completion": [assistant("yo")]},
    {"prompt": [user("Why?")], "completion": [assistant("Because " * 6)]}]


def trl_rows(rows, **options):
    """TRL's prepared rows `{"input_ids", "labels"[, "seq_lengths"]}` in dataset order."""
    args = trl.SFTConfig(output_dir="unused", report_to="none", use_cpu=True, **options)
    trainer = object.__new__(trl.SFTTrainer)
    trainer._tokenizer = TOKENIZER
    trainer.chat_template = None  # the tokenizer's template already has {% generation %} markers
    # SFTTrainer.__init__'s default: completion-only loss for prompt-completion data
    trainer.completion_only_loss = ("prompt" in rows[0]) if args.completion_only_loss is None else \
        args.completion_only_loss
    dataset = datasets.Dataset.from_list(rows)
    datasets.disable_progress_bars()
    prepared = trainer._prepare_dataset(dataset, TOKENIZER, args, args.packing, None, "train")
    kept = ("input_ids", "labels", "seq_lengths")  # unpacked rows keep the original columns too
    return [{key: list(value) for key, value in row.items() if key in kept} for row in prepared]


def jaxpt_rows(rows, tmp_path, **options):
    """jaxpt's examples in TRL's layout: packed rows lose their padding and give their segment lengths."""
    config = sft.SFTConfig(output_dir=str(tmp_path), **options)
    converted = []
    for example in sft.prepare_dataset(datasets.Dataset.from_list(rows), TOKENIZER, config):
        ids, mask = example["input_ids"], example["loss_mask"]
        row = {}
        if "segment_ids" in example:
            segments = example["segment_ids"]
            used = int((segments > 0).sum())
            assert (segments[:used] > 0).all() and (segments[used:] == 0).all()  # tokens first, padding last
            assert (np.diff(segments[:used]) >= 0).all()  # segments numbered 1, 2, ... in row order
            ids, mask = ids[:used], mask[:used]
            row["seq_lengths"] = np.bincount(segments[:used])[1:].tolist()
        row["input_ids"] = ids.tolist()
        row["labels"] = np.where(mask == 1, ids, -100).tolist()
        converted.append(row)
    return converted


UNPACKED = [
    ("language_modeling", LANGUAGE_MODELING, {}),
    ("prompt_completion", PROMPT_COMPLETION, {}),
    ("prompt_completion_full_loss", PROMPT_COMPLETION, {"completion_only_loss": False}),
    ("conversational", CONVERSATIONAL, {"max_length": 40}),
    ("conversational_assistant_only", CONVERSATIONAL, {"max_length": 40, "assistant_only_loss": True}),
    ("conversational_prompt_completion", CONVERSATIONAL_PROMPT_COMPLETION, {"max_length": 40}),
    ("conversational_prompt_completion_assistant_only", CONVERSATIONAL_PROMPT_COMPLETION,
     {"max_length": 40, "assistant_only_loss": True, "completion_only_loss": False}),
]


@pytest.mark.parametrize(("name", "rows", "options"), UNPACKED, ids=[case[0] for case in UNPACKED])
def test_tokens_and_loss_masks_match_trl(tmp_path, name, rows, options):
    options = {"max_length": 24, **options}
    expected = trl_rows(rows, **options)
    assert any(len(row["input_ids"]) == options["max_length"] for row in expected)  # something was truncated
    assert any(-100 in row["labels"] for row in expected) == (name not in ("language_modeling", "conversational",
                                                                            "prompt_completion_full_loss"))
    assert jaxpt_rows(rows, tmp_path, **options) == expected


PACKED = [(rows_name, rows, strategy) for rows_name, rows in (("language_modeling", LANGUAGE_MODELING),
                                                               ("prompt_completion", PROMPT_COMPLETION))
          for strategy in ("bfd", "bfd_split")]


@pytest.mark.parametrize(("name", "rows", "strategy"), PACKED, ids=[f"{c[0]}-{c[2]}" for c in PACKED])
def test_bfd_packed_rows_match_trl(tmp_path, name, rows, strategy):
    """Same rows, same sequences in each row in the same order (bfd truncates long sequences, bfd_split cuts them
    into max_length pieces that are packed like sequences)."""
    options = {"max_length": 16, "packing": True, "packing_strategy": strategy}
    expected = trl_rows(rows, **options)
    assert any(len(row["seq_lengths"]) > 1 for row in expected)  # rows do hold several sequences
    assert jaxpt_rows(rows, tmp_path, **options) == expected


def test_bfd_ties_go_to_the_bin_that_had_the_space_first(tmp_path):
    """Lengths where two bins end up with the same free space at different times: TRL fills the one that has had
    it longer (jaxpt's pack_bfd took the first bin created until it was compared with TRL)."""
    lengths = [1, 9, 5, 2, 5, 7, 3]  # the 1-token sequence goes to the row of the 5+5, not the one of the 7+3
    rows = [{"text": chr(ord("a") + i) * (n - 1)} for i, n in enumerate(lengths)]  # + EOS: n tokens
    options = {"max_length": 11, "packing": True}
    expected = trl_rows(rows, **options)
    assert [row["seq_lengths"] for row in expected] == [[9, 2], [7, 3], [5, 5, 1]]
    assert jaxpt_rows(rows, tmp_path, **options) == expected


def test_wrapped_rows_hold_trl_tokens_and_keep_the_boundaries(tmp_path):
    """Wrapped packing cuts the concatenated sequences into max_length rows, as TRL. Deliberate difference: TRL's
    wrapped rows carry no sequence boundaries (attention crosses them); jaxpt's rows keep a segment per piece."""
    options = {"max_length": 16, "packing": True, "packing_strategy": "wrapped"}
    expected = trl_rows(LANGUAGE_MODELING, **options)
    ours = jaxpt_rows(LANGUAGE_MODELING, tmp_path, **options)
    assert [{k: row[k] for k in ("input_ids", "labels")} for row in ours] == expected
    lengths = [len(row["input_ids"]) for row in trl_rows(LANGUAGE_MODELING, max_length=None)]
    boundaries = set(np.cumsum(lengths).tolist())
    position = 0
    for row in ours:
        for length in row["seq_lengths"]:
            position += length
            # every segment ends at a sequence's end or at a row's end, nowhere else
            assert position in boundaries or position % 16 == 0, position
    assert position == sum(lengths)


def test_a_prompt_that_fills_max_length_is_an_error_not_a_silent_drop(tmp_path):
    """Deliberate difference: TRL drops an example whose prompt fills max_length (no completion token left) when
    not packing, and packs it without a loss token with bfd. jaxpt names the example and the fix instead; with
    bfd_split nothing is cut, so the example is kept whole."""
    rows = [{"prompt": "A long prompt " * 2, "completion": " yes"}, {"prompt": "Q:", "completion": " no"}]
    assert len(trl_rows(rows, max_length=16)) == 1
    assert all(label == -100 for label in trl_rows(rows, max_length=16, packing=True)[0]["labels"][:16])
    for options in ({}, {"packing": True}):
        with pytest.raises(ValueError, match="Example 0: the prompt is 28 tokens, not shorter than max_length=16"):
            jaxpt_rows(rows, tmp_path, max_length=16, **options)
    options = {"max_length": 16, "packing": True, "packing_strategy": "bfd_split"}
    assert jaxpt_rows(rows, tmp_path, **options) == trl_rows(rows, **options)
