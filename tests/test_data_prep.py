"""Data preparation at scale: `data.bfd_bins` / `pack_bfd` (O(n log n)) give exactly the bins of the former
O(n x bins) loop and of TRL's `pack_dataset`; `sft.pack_ragged` gives the former per-example packing's rows;
tokenizing with `dataset_num_proc` processes, or from plain rows, gives the same examples."""

import datasets
import numpy as np
import pyarrow as pa
import pytest
import trl  # a test dependency: parity must fail, never skip, without it

from jaxpt import data, sft
from tests.helpers import char_tokenizer

TOKENIZER = char_tokenizer()


def former_pack_bfd(lengths, seq_length):
    """jaxpt's pack_bfd before it was vectorised: the reference the new one must equal bin for bin."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, space, since = [], [], []
    for time, index in enumerate(order):
        length = lengths[index]
        if length == 0:
            continue
        best = -1
        for b, free in enumerate(space):
            if length <= free and (best < 0 or (free, since[b]) < (space[best], since[best])):
                best = b
        if best < 0:
            bins.append([index])
            space.append(seq_length - length)
            since.append(time)
        else:
            bins[best].append(index)
            space[best] -= length
            since[best] = time
    return bins


def former_pack_examples(examples, seq_length, strategy):
    """jaxpt's pack_examples before it worked on flat arrays (row by row, piece by piece)."""
    pieces = []
    for example in examples:
        if strategy == "bfd":
            pieces.append({k: v[:seq_length] for k, v in example.items()})
        elif strategy == "bfd_split":
            for start in range(0, len(example["input_ids"]), seq_length):
                pieces.append({k: v[start:start + seq_length] for k, v in example.items()})
        else:
            pieces.append(example)
    if strategy == "wrapped":
        rows, current, used = [], [], 0
        for piece in pieces:
            offset = 0
            while offset < len(piece["input_ids"]):
                take = min(seq_length - used, len(piece["input_ids"]) - offset)
                current.append({k: v[offset:offset + take] for k, v in piece.items()})
                used, offset = used + take, offset + take
                if used == seq_length:
                    rows.append(current)
                    current, used = [], 0
        if current:
            rows.append(current)
    else:
        rows = [[pieces[i] for i in members] for members in former_pack_bfd([len(p["input_ids"]) for p in pieces],
                                                                             seq_length)]
    packed = []
    for row in rows:
        out = {name: np.zeros(seq_length, np.int32) for name in ("input_ids", "loss_mask", "segment_ids")}
        start = 0
        for segment, piece in enumerate(row, start=1):
            end = start + len(piece["input_ids"])
            out["input_ids"][start:end] = piece["input_ids"]
            out["loss_mask"][start:end] = piece["loss_mask"]
            out["segment_ids"][start:end] = segment
            start = end
        packed.append(out)
    return packed


def random_lengths(rng, seq_length, count):
    """Lengths with many ties, some equal to seq_length, some empty, some tiny."""
    kind = rng.integers(3)
    if kind == 0:
        return rng.integers(0, seq_length + 1, count).tolist()
    if kind == 1:
        choices = [seq_length, seq_length - 1, max(1, seq_length // 2), max(1, seq_length // 3), 1, 0]
        return rng.choice(choices, count).tolist()
    return rng.integers(max(1, seq_length - 3), seq_length + 1, count).tolist()


def test_bfd_bins_equal_the_former_loop_on_random_lengths():
    rng = np.random.default_rng(0)
    cases = 0
    for _ in range(400):
        seq_length = int(rng.integers(1, 48))
        lengths = random_lengths(rng, seq_length, int(rng.integers(0, 80)))
        expected = former_pack_bfd(lengths, seq_length)
        assert data.pack_bfd(lengths, seq_length) == expected, (seq_length, lengths)
        members, sizes = data.bfd_bins(np.asarray(lengths, np.int32), seq_length)
        assert sizes.tolist() == [len(b) for b in expected]
        assert members.tolist() == [i for b in expected for i in b]
        cases += any(length == seq_length for length in lengths)
    assert cases > 100  # lengths equal to seq_length were exercised
    lengths = rng.integers(1, 300, 3000).tolist()  # many distinct lengths, bins of several sizes
    assert data.pack_bfd(lengths, 512) == former_pack_bfd(lengths, 512)


def test_bfd_edge_cases():
    assert data.pack_bfd([], 8) == []
    assert data.pack_bfd([0, 0], 8) == []
    assert data.pack_bfd([8, 8, 8], 8) == [[0], [1], [2]]
    assert data.pack_bfd([1] * 5, 2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="truncate examples to seq_length"):
        data.pack_bfd([9], 8)


def test_bfd_bins_equal_trl_pack_dataset_on_random_lengths():
    """Each example's ids are its own index, so TRL's packed rows name the examples in each bin in order (one map
    batch of at most 1000 rows: TRL packs each batch on its own, jaxpt the whole dataset)."""
    rng = np.random.default_rng(1)
    for seq_length, count in ((16, 300), (64, 1000), (7, 200)):
        lengths = np.asarray(random_lengths(rng, seq_length, count))
        lengths[rng.integers(count)] = seq_length
        rows = [[index] * int(length) for index, length in enumerate(lengths)]
        packed = trl.pack_dataset(datasets.Dataset.from_dict({"input_ids": rows}), seq_length, "bfd")
        trl_bins = [[ids[start] for start in np.cumsum([0, *seq_lengths[:-1]]).tolist()]
                    for ids, seq_lengths in zip(packed["input_ids"], packed["seq_lengths"], strict=True)]
        assert data.pack_bfd(lengths.tolist(), seq_length) == trl_bins


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "wrapped"])
def test_pack_ragged_equals_the_former_pack_examples(strategy):
    rng = np.random.default_rng(2)
    for seq_length in (1, 5, 16):
        examples = [{"input_ids": rng.integers(3, 90, n).astype(np.int32),
                     "loss_mask": rng.integers(0, 2, n).astype(np.int32)}
                    for n in rng.integers(1, 3 * seq_length + 2, 60)]
        expected = former_pack_examples(examples, seq_length, strategy)
        packed = sft.pack_examples(examples, seq_length, strategy=strategy)
        assert len(packed) == len(expected)
        for ours, theirs in zip(packed, expected, strict=True):
            assert {k: v.tolist() for k, v in ours.items()} == {k: v.tolist() for k, v in theirs.items()}


def _as_lists(examples):
    return [{key: value.tolist() for key, value in example.items()} for example in examples]


ROWS = [{"text": f"row {i} " + "x" * (i % 13)} for i in range(40)]
PROMPT_ROWS = [{"prompt": f"q{i}?", "completion": " a" * (1 + i % 5)} for i in range(40)]


@pytest.mark.parametrize("rows", [ROWS, PROMPT_ROWS], ids=["language_modeling", "prompt_completion"])
@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_two_tokenizing_processes_and_plain_rows_give_the_same_examples(tmp_path, rows, packing):
    config = sft.SFTConfig(output_dir=str(tmp_path), max_length=16, packing=packing)
    one = sft.prepare_dataset(datasets.Dataset.from_list(rows), TOKENIZER, config)
    assert len(one) == (len(rows) if not packing else len(one)) and len(one) > 1
    config.dataset_num_proc = 2
    two = sft.prepare_dataset(datasets.Dataset.from_list(rows), TOKENIZER, config)
    assert _as_lists(two) == _as_lists(one)
    config.dataset_num_proc = None
    assert _as_lists(sft.prepare_dataset(rows, TOKENIZER, config)) == _as_lists(one)  # a list of dicts


def test_file_backed_dataset_is_tokenized_through_the_datasets_cache(tmp_path):
    path = tmp_path / "rows.jsonl"
    datasets.Dataset.from_list(ROWS).to_json(path)
    dataset = data.load_dataset(path)
    config = sft.SFTConfig(output_dir=str(tmp_path), max_length=16)
    first = sft.prepare_dataset(dataset, TOKENIZER, config)
    cached = {file["filename"] for file in dataset.cache_files}
    cache_dir = next(iter(cached)).rsplit("/", 1)[0]
    import os

    written = [name for name in os.listdir(cache_dir) if name.startswith("cache-")]
    assert written  # map wrote its result next to the dataset's own Arrow file
    assert _as_lists(sft.prepare_dataset(dataset, TOKENIZER, config)) == _as_lists(first)
    assert sorted(name for name in os.listdir(cache_dir) if name.startswith("cache-")) == sorted(written)


def test_string_checks_follow_an_indices_mapping_and_name_the_row(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}, {"text": None}, {"text": "c"}]
    config = sft.SFTConfig(output_dir=str(tmp_path))
    dataset = datasets.Dataset.from_list(rows)
    with pytest.raises(ValueError, match=r"row 2, column 'text' is null"):
        sft.prepare_dataset(dataset, TOKENIZER, config)
    reordered = dataset.select([3, 2, 0])  # the null is now row 1
    with pytest.raises(ValueError, match=r"row 1, column 'text' is null"):
        sft.prepare_dataset(reordered, TOKENIZER, config)
    kept = sft.prepare_dataset(dataset.select([3, 0]), TOKENIZER, config)
    assert [TOKENIZER.decode(e["input_ids"]) for e in kept] == ["c</s>", "a</s>"]
    empty = datasets.Dataset.from_dict({"text": pa.array(["", ""], pa.large_string())})
    with pytest.raises(ValueError, match="'text' column is an empty string in every row"):
        sft.prepare_dataset(empty, TOKENIZER, config)


def test_dataset_num_proc_is_checked(tmp_path):
    with pytest.raises(ValueError, match="dataset_num_proc=0 must be >= 1"):
        sft.SFTConfig(output_dir=str(tmp_path), dataset_num_proc=0)


def test_dpo_reward_and_kto_tokenize_the_same_with_two_processes_and_from_plain_rows(tmp_path):
    from jaxpt import dpo, kto, reward

    pairs = [{"prompt": f"q{i}?", "chosen": " yes" * (1 + i % 3), "rejected": " no" * (1 + i % 4)}
             for i in range(24)]
    for module, config in ((dpo, dpo.DPOConfig(output_dir=str(tmp_path))),
                           (reward, reward.RewardConfig(output_dir=str(tmp_path))),
                           (kto, kto.KTOConfig(output_dir=str(tmp_path)))):
        one = module.prepare_dataset(datasets.Dataset.from_list(pairs), TOKENIZER, config)
        config.dataset_num_proc = 2
        two = module.prepare_dataset(datasets.Dataset.from_list(pairs), TOKENIZER, config)
        config.dataset_num_proc = None
        plain = module.prepare_dataset(pairs, TOKENIZER, config) if module is not reward else one
        for examples in (two, plain):
            assert [{k: np.asarray(v).tolist() for k, v in e.items()} for e in examples] == \
                [{k: np.asarray(v).tolist() for k, v in e.items()} for e in one], module.__name__
    assert len(one) == 48 and [e["label"] for e in one] == [True] * 24 + [False] * 24  # KTO: chosen, then rejected


def test_kto_unpairs_in_trl_blocks_of_1000_pairs(tmp_path):
    from jaxpt import kto

    pairs = [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 1200
    config = kto.KTOConfig(output_dir=str(tmp_path))
    examples = kto.prepare_dataset(datasets.Dataset.from_list(pairs), TOKENIZER, config)
    labels = [e["label"] for e in examples]
    assert labels == [True] * 1000 + [False] * 1000 + [True] * 200 + [False] * 200


@pytest.mark.parametrize("conversational", [False, True])
def test_prepare_prompts_tokenizes_in_batches_as_row_by_row(conversational):
    """GRPO/RLOO's prompts tokenized in batches (`map_columns`) equal the row-by-row `data.tokenize` of each prompt
    (chat template with the generation prompt when conversational), cut to the last `max_prompt_length` tokens,
    from a `datasets.Dataset` with an indices mapping and from plain rows; the other columns go along."""
    rows = [{"prompt": f"{i}+{i * 7}=", "solution": str(8 * i)} for i in range(23)]
    if conversational:
        rows = [{**row, "prompt": [{"role": "user", "content": row["prompt"]}]} for row in rows]
    dataset = datasets.Dataset.from_list(rows).select(range(22, -1, -2))  # an indices mapping
    selected = [rows[i] for i in range(22, -1, -2)]
    for max_prompt_length in (None, 5):
        expected = [data.tokenize(TOKENIZER, row["prompt"], add_generation_prompt=conversational)["input_ids"]
                    for row in selected]
        if max_prompt_length:
            assert max(map(len, expected)) > max_prompt_length  # some prompts are cut
            expected = [ids[-max_prompt_length:] for ids in expected]
        for source in (dataset, selected):
            prompts = data.prepare_prompts(source, TOKENIZER, method="GRPO", max_prompt_length=max_prompt_length)
            assert [p["prompt_ids"] for p in prompts] == expected
            assert all(type(i) is int for i in prompts[0]["prompt_ids"])
            assert [(p["prompt"], p["columns"]) for p in prompts] == [(r["prompt"], {"solution": r["solution"]})
                                                                       for r in selected]
