"""Each process prepares only its share of the data: two processes simulated in this one (`sharding.process_rows`
patched: rows 0-3, then 4-7 of each batch of 8). Each simulated process prepares only the examples of its rows (and
what they need: KTO's KL partners, the filler row), and its batches equal the one-process batches at its rows, so
the global batch the processes place together, and every metric computed on it, is the one-process one. The
`train()` loops' share branches run on this one process too (`distributed.shares_data` patched; every row its own):
their metrics equal a one-process run's to the bit."""

import datasets
import numpy as np
import pytest

from jaxpt import data, distributed, sharding
from tests.helpers import arithmetic_texts, char_tokenizer, tiny_llama


def simulate_two_processes(monkeypatch, make_share):
    """`make_share()` as process 0, then as process 1 (its rows: 0-3, then 4-7 of a batch of 8)."""
    shares = []
    for process in range(2):
        own = np.arange(8) // 4 == process
        monkeypatch.setattr(sharding, "process_rows", lambda mesh, rows, own=own: (own, own))
        shares.append(make_share())
    return shares


def assert_rows_match(batches, expected, process):
    """Process `process`'s batches hold the one-process batches' arrays at its rows (same shapes: same length)."""
    rows_of = np.arange(8) // 4 == process
    assert len(batches) == len(expected)
    for batch, reference in zip(batches, expected, strict=True):
        assert sorted(batch) == sorted(reference)
        for key, value in batch.items():
            assert value.shape == reference[key].shape, (process, key)
            np.testing.assert_array_equal(value[:, rows_of], reference[key][:, rows_of], err_msg=f"{process} {key}")


def test_kto_eval_share_prepares_its_rows_and_their_kl_partners(monkeypatch):
    """KTO's eval set in batches of 8 (13 examples: the last batch holds 5): each process prepares the examples of
    its rows and the one before each (its KL partner; the first row's is the batch's last example), and its eval
    batches equal the one-process batches at its rows, KL sequences included, padded to the one-process length
    though its own rows are shorter: the longest sequence is the KL pair of process 1's row 5 (example 5's long
    prompt with example 4's long completion)."""
    from jaxpt import kto

    tokenizer = char_tokenizer()
    rows = [{"prompt": f"{i}+{i}=", "completion": str(2 * i), "label": i % 2 == 0} for i in range(13)]
    rows[4]["completion"] = "8, as everyone knows"
    rows[5]["prompt"] = "1+2+3+4+5+6+7+8+9+10="
    dataset = datasets.Dataset.from_list(rows)
    config = kto.KTOConfig(output_dir="unused")
    batch_args = dict(buckets=data.length_buckets(64), pad_token_id=0, max_length=None, with_kl=True)
    everything = kto.prepare_dataset(dataset, tokenizer, config)
    whole = distributed.EvalShare(13, 8, mesh=None, whole=True)
    expected = list(kto.eval_batches(everything, whole, batch_args))
    assert len(expected) == 2
    longest = kto._eval_longest(everything, whole, max_length=None, with_kl=True)
    assert longest[0] == len(everything[5]["prompt_ids"]) + len(everything[4]["completion_ids"])
    assert expected[0]["kl_input_ids"].shape[-1] == data.bucket_length(int(longest[0]), batch_args["buckets"])

    shares = simulate_two_processes(
        monkeypatch, lambda: distributed.EvalShare(13, 8, mesh=sharding.make_mesh(), whole=False, with_previous=True))
    # process 0: rows 0-3 of each batch and their partners (7 in batch 0; 12, the last, in batch 1); process 1:
    # rows 4-7 and their partners (3; 11), and example 0 (the filler's fields)
    assert shares[0].needed.tolist() == [0, 1, 2, 3, 7, 8, 9, 10, 11, 12]
    assert shares[1].needed.tolist() == [0, 3, 4, 5, 6, 7, 11, 12]
    prepared = [kto.prepare_dataset(distributed.select_rows(dataset, share.needed), tokenizer, config)
                for share in shares]
    local = [kto._eval_longest(examples, share, max_length=None, with_kl=True)
             for share, examples in zip(shares, prepared, strict=True)]
    np.testing.assert_array_equal(np.maximum(*local), longest)  # what `agree_lengths`' collective gives
    assert local[0][0] < longest[0]  # process 0 alone would pad batch 0 shorter
    placed = {key: np.zeros_like(value) for key, value in expected[0].items()}
    for process, (share, examples) in enumerate(zip(shares, prepared, strict=True)):
        share.agree_lengths(np.maximum(*local))  # one process: gather_rows is the identity
        batches = list(kto.eval_batches(examples, share, batch_args))
        assert_rows_match(batches, expected, process)
        rows_of = np.arange(8) // 4 == process
        for key, value in batches[0].items():  # what the two processes place together
            placed[key][:, rows_of] = value[:, rows_of]
    for key, value in expected[0].items():
        np.testing.assert_array_equal(placed[key], value)



@pytest.mark.parametrize("strategy", ["bfd", "bfd_split"])
def test_packed_sft_eval_share_gives_the_rows_one_process_packs(strategy, monkeypatch):
    """A packed SFT eval set (eval_packing=True, training unpacked): each process tokenizes a block of the eval set
    (to measure it) and the examples of its packed rows of the eval batches, and its eval batches equal the
    one-process batches at its rows; every packed row is max_length long, so the padded length needs no
    agreement (`_prepare_eval` sets it). bfd_split keeps the long example's tokens (packed, not truncated)."""
    from jaxpt import sft

    tokenizer = char_tokenizer()
    rows = arithmetic_texts(30) + [{"prompt": "1+2+3+4+5=", "completion": "15 and more digits"}]
    dataset = datasets.Dataset.from_list(rows)
    config = sft.SFTConfig(output_dir="unused", max_length=12, eval_packing=True, packing_strategy=strategy)
    buckets = data.length_buckets(12)
    everything = sft.prepare_dataset(dataset, tokenizer, config, packing=True)
    expected = list(sft.eval_batches(everything, distributed.EvalShare(len(everything), 8, mesh=None, whole=True),
                                     buckets, 0))
    assert len(everything) % 8 and len(expected) == -(-len(everything) // 8)  # the last batch has filler rows

    def make_share(num_rows):
        share = distributed.EvalShare(num_rows, 8, mesh=sharding.make_mesh(), whole=False)
        share.lengths = np.full(share.num_batches, config.max_length)  # as `_prepare_eval`
        return share

    for process, (examples, share) in enumerate(simulate_two_processes(
            monkeypatch, lambda: sft._pack_share(dataset, tokenizer, config, make_share, what="SFT eval dataset"))):
        assert share.num_examples == len(everything) and len(examples) == len(share.needed)
        rows_of = np.arange(8) // 4 == process
        mine = np.flatnonzero(rows_of[np.arange(len(everything)) % 8])
        assert share.needed.tolist() == sorted({0, *mine.tolist()})  # its rows, and row 0 (the filler's fields)
        assert_rows_match(list(sft.eval_batches(examples, share, buckets, 0)), expected, process)


def test_dpo_precomputed_reference_share_gives_the_one_process_log_probs(monkeypatch):
    """precompute_ref_log_probs on several processes: the reference log-probs are computed in the batches one
    process computes them in (8 pairs, in order), each process feeding its rows (`EvalShare`), padded to the
    agreed length (the long pair is process 1's); every row's log-probs equal the one-process ones to the bit,
    though the padding rows differ (one process: copies of the batch's first pair; here: empty rows)."""
    from jaxpt import dpo

    tokenizer = char_tokenizer()
    rows = [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(13)]
    rows[5] = {"prompt": "1+2+3+4+5+6+7+8=", "chosen": "36 is the sum", "rejected": "37 or so, I think"}
    dataset = datasets.Dataset.from_list(rows)
    config = dpo.DPOConfig(output_dir="unused", per_device_train_batch_size=8)
    mesh = None  # (the processes' rows are patched; a mesh would only add compilation time)
    assert dpo.precompute_batch(config, mesh) == 8
    reference = tiny_llama(len(tokenizer), seed=1, num_hidden_layers=1)
    buckets = [48]  # one length for both batches: one compilation per call
    everything = dpo.prepare_dataset(dataset, tokenizer, config)
    expected = dpo.precompute_ref_logps(reference, everything, config, mesh=mesh, buckets=buckets)
    expected = {key: np.asarray([e[key] for e in expected]) for key in ("ref_chosen_logps", "ref_rejected_logps")}

    shares = simulate_two_processes(
        monkeypatch, lambda: distributed.EvalShare(13, 8, mesh=sharding.make_mesh(), whole=False))
    prepared = [dpo.prepare_dataset(distributed.select_rows(dataset, share.needed), tokenizer, config)
                for share in shares]
    local = [share.measure(examples, dpo._longest) for share, examples in zip(shares, prepared, strict=True)]
    np.testing.assert_array_equal(np.maximum(*local), [max(map(dpo._longest, everything[i:i + 8])) for i in (0, 8)])
    assert local[0][0] < np.maximum(*local)[0]  # process 0 alone would pad batch 0 shorter
    compiled = dpo._reference_fn(reference, config, mesh)  # one jitted function for both simulated processes
    for process, (share, examples) in enumerate(zip(shares, prepared, strict=True)):
        share.agree_lengths(np.maximum(*local))  # what `agree`'s collective gives every process
        chosen, rejected = dpo.shared_ref_logps(compiled, examples, share, mesh=mesh, buckets=buckets,
                                                pad_token_id=0)
        own = np.concatenate([batch * 8 + share.own_positions(batch) for batch in range(share.num_batches)])
        assert own.tolist() == [i for i in range(13) if i % 8 // 4 == process]
        # on several processes the results are replicated: every process gets every row; here each its own
        np.testing.assert_array_equal(chosen[own], expected["ref_chosen_logps"][own])
        np.testing.assert_array_equal(rejected[own], expected["ref_rejected_logps"][own])


def test_kto_precomputed_reference_share_gives_the_one_process_log_probs(monkeypatch):
    """KTO's precompute_ref_log_probs on several processes: the reference log-probs of every example and of its KL
    pair are computed in the groups one process computes them in (consecutive steps of 16 examples, laid out
    [2 accumulation, 8 rows]: a process's rows are 0-3, then 4-7, of each micro-batch), each process feeding its
    rows and their KL partners, padded to the agreed length; its rows' values equal the one-process ones to the
    bit, the last, partial group (5 examples) too."""
    from jaxpt import kto

    tokenizer = char_tokenizer()
    rows = [{"prompt": f"{i}+{i}=", "completion": str(2 * i), "label": i % 2 == 0} for i in range(21)]
    rows[12]["completion"] = "24, as everyone knows"
    rows[13]["prompt"] = "1+2+3+4+5+6+7+8+9+10="
    dataset = datasets.Dataset.from_list(rows)
    config = kto.KTOConfig(output_dir="unused", gradient_accumulation_steps=2)
    graphdef, params, _ = kto.reference_params(tiny_llama(len(tokenizer), seed=1, num_hidden_layers=1))
    args = dict(buckets=[48], pad_token_id=0, mesh=None, ref_sharding=None)  # one length: one compilation
    everything = kto.prepare_dataset(dataset, tokenizer, config)
    expected = kto.precompute_ref_logps(everything, graphdef, params, config, group_size=16, accumulation_steps=2,
                                        **args)

    shares = simulate_two_processes(monkeypatch, lambda: distributed.EvalShare(
        21, 16, mesh=sharding.make_mesh(), whole=False, with_previous=True, micro_batch=8))
    # process 1: rows 4-7 and 12-15 of group 0 and their partners (3, 11), row 4 of group 1 (20) and its partner
    assert shares[1].needed.tolist() == [0, 3, 4, 5, 6, 7, 11, 12, 13, 14, 15, 19, 20]
    prepared = [kto.prepare_dataset(distributed.select_rows(dataset, share.needed), tokenizer, config)
                for share in shares]
    local = [kto._eval_longest(examples, share, max_length=None, with_kl=True)
             for share, examples in zip(shares, prepared, strict=True)]
    assert local[0][0] < np.maximum(*local)[0]  # process 0 alone would pad group 0 shorter (13's prompt, 12's answer)
    for process, (share, examples) in enumerate(zip(shares, prepared, strict=True)):
        share.agree_lengths(np.maximum(*local))  # what the collective gives every process
        values = kto.shared_ref_logps(examples, share, graphdef, params, config, accumulation_steps=2, **args)
        own = np.concatenate([batch * 16 + share.own_positions(batch) for batch in range(share.num_batches)])
        assert own.tolist() == [i for i in range(21) if i % 8 // 4 == process]
        for key in ("ref_logps", "ref_kl_logps"):
            np.testing.assert_array_equal(values[key][own], np.float32([expected[i][key] for i in own]), err_msg=key)


# The train() loops' several-process branches, run on this one process: `distributed.shares_data` patched, so the
# shares are not whole, and this process owns every row (`sharding.process_rows` of one process). The run must
# equal a one-process run to the bit.


def run_shared(monkeypatch, train):
    """`train()` through the share branches; returns the shares it made (recorded)."""
    made = []
    for name in ("DataShare", "EvalShare"):
        original = getattr(distributed, name)

        class Recorded(original):
            def __init__(self, *args, original=original, **kwargs):
                original.__init__(self, *args, **kwargs)
                made.append(self)

        monkeypatch.setattr(distributed, name, Recorded)
    monkeypatch.setattr(distributed, "shares_data", lambda: True)
    train()
    monkeypatch.undo()
    return made


def read_records(output_dir):
    import json

    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_kto_train_on_shares_equals_one_process(tmp_path, monkeypatch):
    """kto.train with paired data (unpaired first, then shared), precomputed reference log-probs (in the groups one
    process uses, with KL partners) and evaluation (a partial last eval batch): the metrics of the share branches
    equal the one-process run's exactly. The training share prepares only the examples the 2 steps take."""
    from jaxpt import kto

    tokenizer = char_tokenizer()
    pairs = [{"prompt": f"{i}+{i % 3}=", "chosen": str(i + i % 3), "rejected": str(i + i % 3 + 1 + i % 2) * (1 + i % 3)}
             for i in range(10)]  # unpaired: 20 examples, the 10 chosen first
    dataset, eval_dataset = datasets.Dataset.from_list(pairs), datasets.Dataset.from_list(pairs[:3])

    def train(output_dir):
        config = kto.KTOConfig(output_dir=str(output_dir), max_length=32, per_device_train_batch_size=4,
                               learning_rate=1e-2, max_steps=2, logging_steps=1, save_steps=0, mesh_fsdp=1,
                               disable_tqdm=True, save_final_model=False, seed=0, precompute_ref_log_probs=True,
                               eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4)
        model = tiny_llama(len(tokenizer), seed=0, num_hidden_layers=1)
        kto.train(model, tokenizer, dataset, config, eval_dataset=eval_dataset)

    train(tmp_path / "one")
    shares = run_shared(monkeypatch, lambda: train(tmp_path / "shared"))
    assert [(type(s).__mro__[1].__name__, s.whole) for s in shares] == [
        ("DataShare", False), ("EvalShare", False), ("EvalShare", False)]  # train, reference groups, eval
    assert shares[0].needed.tolist() == list(range(8))  # 2 sequential steps of 4 of the 20 examples
    assert len(shares[1].needed) == 20 and len(shares[2].needed) == 6  # every group of the reference, the eval set
    expected, records = read_records(tmp_path / "one"), read_records(tmp_path / "shared")
    assert len(records) == 4 and {"eval_loss", "eval_kl", "kl", "num_tokens"} <= set().union(*records)
    assert records == expected


def test_dpo_train_on_shares_equals_one_process(tmp_path, monkeypatch):
    """dpo.train with precomputed reference log-probs (training and eval sets, in the batches one process uses)
    and evaluation (a partial last batch): the metrics of the share branches equal the one-process run's
    exactly."""
    from jaxpt import dpo

    tokenizer = char_tokenizer()
    pairs = [{"prompt": f"{i}+{i % 3}=", "chosen": str(i + i % 3), "rejected": str(i + i % 3 + 1 + i % 2) * (1 + i % 3)}
             for i in range(10)]
    dataset, eval_dataset = datasets.Dataset.from_list(pairs), datasets.Dataset.from_list(pairs[:5])

    def train(output_dir):
        config = dpo.DPOConfig(output_dir=str(output_dir), max_length=32, per_device_train_batch_size=4,
                               learning_rate=1e-2, max_steps=2, logging_steps=1, save_steps=0, mesh_fsdp=1,
                               disable_tqdm=True, save_final_model=False, seed=0, precompute_ref_log_probs=True,
                               eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4)
        model = tiny_llama(len(tokenizer), seed=0, num_hidden_layers=1)
        dpo.train(model, tokenizer, dataset, config, eval_dataset=eval_dataset)

    train(tmp_path / "one")
    shares = run_shared(monkeypatch, lambda: train(tmp_path / "shared"))
    assert [(type(s).__mro__[1].__name__, s.whole) for s in shares] == [
        ("DataShare", False), ("EvalShare", False), ("EvalShare", False), ("EvalShare", False)]
    expected, records = read_records(tmp_path / "one"), read_records(tmp_path / "shared")
    assert len(records) == 4 and {"eval_loss", "eval_rewards/margins", "num_tokens"} <= set().union(*records)
    assert records == expected


def test_packed_sft_train_on_shares_equals_one_process(tmp_path, monkeypatch):
    """sft.train packed (bfd: the training rows and the eval set packed as one process packs them, from the
    gathered lengths, each process tokenizing its rows' examples): the metrics of the share branches equal the
    one-process run's exactly."""
    from jaxpt import sft

    tokenizer = char_tokenizer()
    dataset = datasets.Dataset.from_list(arithmetic_texts(24))
    eval_dataset = datasets.Dataset.from_list(arithmetic_texts(10)[3:])

    def train(output_dir):
        config = sft.SFTConfig(output_dir=str(output_dir), max_length=16, packing=True, eval_packing=True,
                               per_device_train_batch_size=2, per_device_eval_batch_size=3, learning_rate=1e-2,
                               max_steps=2, logging_steps=1, save_steps=0, mesh_fsdp=1, disable_tqdm=True,
                               save_final_model=False, seed=0, eval_strategy="steps", eval_steps=1)
        sft.train(tiny_llama(len(tokenizer), seed=0, num_hidden_layers=1), tokenizer, dataset, config,
                  eval_dataset=eval_dataset)

    train(tmp_path / "one")
    shares = run_shared(monkeypatch, lambda: train(tmp_path / "shared"))
    assert [(type(s).__mro__[1].__name__, s.whole) for s in shares] == [("DataShare", False), ("EvalShare", False)]
    assert len(shares[0].needed) == 4 < shares[0].num_examples  # the 2 steps' packed rows
    assert shares[1].num_examples % 3  # a partial last eval batch
    expected, records = read_records(tmp_path / "one"), read_records(tmp_path / "shared")
    assert len(records) == 4 and {"eval_loss", "num_tokens"} <= set().union(*records)
    assert records == expected
