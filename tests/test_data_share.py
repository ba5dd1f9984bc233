"""Each process prepares only its share of the data: two processes simulated in this one (`sharding.process_rows`
patched: rows 0-3, then 4-7 of each batch of 8). Each simulated process prepares only the examples of its rows (and
what they need: KTO's KL partners, the filler row), and its batches equal the one-process batches at its rows, so
the global batch the processes place together, and every metric computed on it, is the one-process one. GRPO/RLOO:
the same for the prompts of the rollouts' generate input. The `train()` loops' share branches run on this one process
too (`distributed.shares_data` patched; every row its own): their metrics equal a one-process run's to the bit."""

import datasets
import jax
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


# The preference pairs and run options of the train() share tests (DPO, KTO): 2 steps, eval at each, precomputed
# reference log-probs.
PAIRS = [{"prompt": f"{i}+{i % 3}=", "chosen": str(i + i % 3), "rejected": str(i + i % 3 + 1 + i % 2) * (1 + i % 3)}
         for i in range(10)]
SHARED_RUN = dict(max_length=32, per_device_train_batch_size=4, learning_rate=1e-2, max_steps=2, logging_steps=1,
                  save_steps=0, mesh_fsdp=1, disable_tqdm=True, save_final_model=False, seed=0,
                  precompute_ref_log_probs=True, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4)


def test_kto_train_on_shares_equals_one_process(tmp_path, monkeypatch):
    """kto.train with paired data (unpaired first, then shared), precomputed reference log-probs (in the groups one
    process uses, with KL partners) and evaluation (a partial last eval batch): the metrics of the share branches
    equal the one-process run's exactly. The training share prepares only the examples the 2 steps take."""
    from jaxpt import kto

    tokenizer = char_tokenizer()
    # unpaired: 20 examples, the 10 chosen first
    dataset, eval_dataset = datasets.Dataset.from_list(PAIRS), datasets.Dataset.from_list(PAIRS[:3])

    def train(output_dir):
        config = kto.KTOConfig(output_dir=str(output_dir), **SHARED_RUN)
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
    dataset, eval_dataset = datasets.Dataset.from_list(PAIRS), datasets.Dataset.from_list(PAIRS[:5])

    def train(output_dir):
        config = dpo.DPOConfig(output_dir=str(output_dir), **SHARED_RUN)
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
def grpo_prompt_shares(monkeypatch):
    """GRPO's prompts on one process and on two simulated ones: 20 prompts, rollouts of 8 (generate's input
    `[8, length]` split over the 8 devices: process 0 feeds rows 0-3), 3 rollouts (the third starts the second
    epoch); the one long prompt sits at row 5 of the first rollout, a row of process 1."""
    from jaxpt import grpo, rollout

    tokenizer = char_tokenizer()
    config = grpo.GRPOConfig(output_dir="unused", max_steps=3, num_generations=2, max_completion_length=4, seed=1)
    orders = data.step_indices(20, 8, seed=1, shuffle=True)
    indices = [next(orders)[1] for _ in range(3)]
    rows = [{"prompt": f"{i}+{i}=", "solution": str(2 * i)} for i in range(20)]
    rows[indices[0][5]]["prompt"] = "1+2+3+4+5+6+7+8+9+10+11="
    dataset = datasets.Dataset.from_list(rows)
    args = dict(method="GRPO", mesh=sharding.make_mesh(), prompts_per_rollout=8, steps_per_rollout=1,
                start_rollout=0)
    everything, whole = rollout.prepare_rollout_prompts(dataset, tokenizer, config, whole=True, **args)
    shares = simulate_two_processes(monkeypatch, lambda: rollout.prepare_rollout_prompts(
        dataset, tokenizer, config, whole=False, **args))
    # what `agree_steps`' collective gives every process: both processes' longest prompt of every rollout
    local = []
    for prompts, share in shares:
        share.agree_steps(prompts, rollout._longest_prompt, start_step=0, total_steps=3)  # one process: its own
        local.append(share.totals.reshape(-1))
    monkeypatch.setattr(distributed, "gather_rows", lambda values: np.concatenate(local))
    return config, tokenizer, dataset, indices, (everything, whole), shares, local


def test_grpo_prompt_share_prepares_its_rows_of_every_rollout(monkeypatch):
    """GRPO/RLOO on several processes: each process tokenizes only the prompts at its rows of the run's rollouts'
    generate input; all agree on every rollout's longest prompt, hence on the buckets and each rollout's padded
    length, those of one process (the long prompt is process 1's: process 0 alone would pad shorter); the generate
    input each builds equals the one-process input at its rows, and every row's prompt and columns (for scoring and
    logging) are the one-process ones, read from the dataset, not tokenized."""
    from jaxpt import rollout

    config, tokenizer, dataset, indices, (everything, whole), shares, local = grpo_prompt_shares(monkeypatch)
    buckets = rollout.agree_prompt_lengths(whole, everything, start_rollout=0, total_rollouts=3)
    assert buckets == data.length_buckets(24, min_length=16)  # the long prompt's 24 tokens
    for process, (prompts, share) in enumerate(shares):
        rows_of = np.arange(8) // 4 == process
        needed = np.unique(np.concatenate([i[rows_of] for i in indices]))
        assert share.needed.tolist() == needed.tolist() and len(needed) < 20
        assert [p["prompt_ids"] for p in prompts] == [everything[i]["prompt_ids"] for i in needed]
        assert rollout.agree_prompt_lengths(share, prompts, start_rollout=0, total_rollouts=3) == buckets
        for index, rollout_indices in enumerate(indices):
            expected_records = [everything[i] for i in rollout_indices]
            records, longest = rollout.rollout_prompts(share, prompts, dataset, rollout_indices, index)
            assert longest == max(len(p["prompt_ids"]) for p in expected_records)
            assert [(r["prompt"], r["columns"]) for r in records] == [(r["prompt"], r["columns"])
                                                                       for r in expected_records]
            ids, mask = rollout.prompt_batch(records, buckets, 0, longest=longest)
            expected_ids, expected_mask = rollout.prompt_batch(expected_records, buckets, 0)
            assert ids.shape == expected_ids.shape
            np.testing.assert_array_equal(ids[rows_of], expected_ids[rows_of])
            np.testing.assert_array_equal(mask[rows_of], expected_mask[rows_of])
    assert local[0][0] < local[1][0] == 24  # rollout 0: process 0's own longest prompt is shorter


def test_grpo_prompt_share_samples_and_scores_its_rows_as_one_process(monkeypatch):
    """The rollout each simulated process samples from its generate input (own rows, stand-ins elsewhere, placed
    with `shard_batch(global_batch=True)`, prompt ids read back from the device) equals the one-process rollout at
    its rows: prompt ids, completions, sampler log-probs and rewards."""
    import optax

    from jaxpt import rollout
    from jaxpt.train_state import TrainState

    config, tokenizer, dataset, indices, (everything, whole), shares, _ = grpo_prompt_shares(monkeypatch)
    mesh = sharding.make_mesh()
    state = TrainState.create(tiny_llama(len(tokenizer), num_hidden_layers=1), optax.sgd(0.1), mesh=mesh)
    buckets = rollout.agree_prompt_lengths(whole, everything, start_rollout=0, total_rollouts=3)
    solution = lambda completions, solution, **kwargs: [float(c == s) - len(c) for c, s in  # noqa: E731
                                                        zip(completions, solution, strict=True)]
    sample = dict(reward_funcs=[solution], tokenizer=tokenizer, config=config, key=jax.random.key(2), mesh=mesh,
                  prompt_buckets=buckets)
    expected = rollout.sample_and_score(state, [everything[i] for i in indices[0]], **sample)
    for process, (prompts, share) in enumerate(shares):
        rollout.agree_prompt_lengths(share, prompts, start_rollout=0, total_rollouts=3)
        records, longest = rollout.rollout_prompts(share, prompts, dataset, indices[0], 0)
        sampled = rollout.sample_and_score(state, records, longest_prompt=longest, **sample)
        rows_of = np.repeat(np.arange(8) // 4 == process, config.num_generations)
        for key, value in expected.arrays.items():
            assert sampled.arrays[key].shape == value.shape
            np.testing.assert_array_equal(sampled.arrays[key][rows_of], value[rows_of], err_msg=f"{process} {key}")
        np.testing.assert_array_equal(sampled.rewards[rows_of], expected.rewards[rows_of])
        assert not np.array_equal(sampled.arrays["prompt_ids"], expected.arrays["prompt_ids"])  # stand-ins


def test_grpo_eval_prompt_share_feeds_its_rows_of_every_evaluation_rollout(monkeypatch):
    """Evaluation rollouts of 8 prompts over 13 eval prompts (the last rollout filled up with prompt 12): each
    process tokenizes only the prompts at its rows (process 1: prompt 12 for its rows past the end too, and prompt 0,
    the filler's fields), all agree on every rollout's longest prompt (the long prompt 5 is process 1's), and every
    rollout gets the one-process prompts and columns at every row and the one-process token ids at its rows."""
    from jaxpt import grpo, rollout

    tokenizer = char_tokenizer()
    config = grpo.GRPOConfig(output_dir="unused", num_generations=2)
    rows = [{"prompt": f"{i}+{i}=", "solution": str(2 * i)} for i in range(13)]
    rows[5]["prompt"] = "1+2+3+4+5+6+7+8+9+10+11="
    dataset = datasets.Dataset.from_list(rows)
    args = dict(method="GRPO", mesh=sharding.make_mesh(), prompts_per_rollout=8)
    calls = []

    def fake_rollout(state, prompts, reward_funcs, tokenizer, config, *, key, mesh, prompt_buckets,
                     ref_logps_fn=None, policy_logps_fn=None, longest_prompt=None):
        calls.append((prompts, longest_prompt))
        return None, {"reward": 0.0}, []

    def evaluate(prompts, share):
        calls.clear()
        rollout.evaluate_rollouts(fake_rollout, None, prompts, [], tokenizer, config, mesh=None, prompt_buckets=[64],
                                  prompts_per_rollout=8, share=share, dataset=dataset)
        return list(calls)

    everything, whole = rollout.prepare_eval_prompts(dataset, tokenizer, config, whole=True, **args)
    expected = evaluate(everything, whole)
    assert [[p["prompt"] for p in prompts] for prompts, _ in expected][1][-4:] == ["12+12="] * 4
    lengths = [len(p["prompt_ids"]) for p in everything] + [len(everything[12]["prompt_ids"])] * 3
    local = [np.asarray([max(lengths[b * 8 + 4 * p: b * 8 + 4 * p + 4]) for b in range(2)]) for p in range(2)]
    gathered = []
    monkeypatch.setattr(distributed, "gather_rows", lambda values: gathered.append(values) or np.concatenate(local))
    shares = simulate_two_processes(monkeypatch, lambda: rollout.prepare_eval_prompts(
        dataset, tokenizer, config, whole=False, **args))
    assert [share.needed.tolist() for _, share in shares] == [[0, 1, 2, 3, 8, 9, 10, 11], [0, 4, 5, 6, 7, 12]]
    np.testing.assert_array_equal(gathered[0], local[0])  # each process's longest prompt of every rollout
    np.testing.assert_array_equal(gathered[1], local[1])
    assert local[0][0] < local[1][0]  # process 0 alone would pad the first rollout shorter
    for process, (prompts, share) in enumerate(shares):
        assert [p["prompt_ids"] for p in prompts] == [everything[i]["prompt_ids"] for i in share.needed]
        rows_of = np.arange(8) // 4 == process
        for (got, longest), (want, _) in zip(evaluate(prompts, share), expected, strict=True):
            assert longest == max(len(p["prompt_ids"]) for p in want)
            assert [(p["prompt"], p["columns"]) for p in got] == [(p["prompt"], p["columns"]) for p in want]
            assert [got[i]["prompt_ids"] for i in np.flatnonzero(rows_of)] == \
                [want[i]["prompt_ids"] for i in np.flatnonzero(rows_of)]


def test_replicated_share_feeds_every_row_of_its_steps():
    """`DataShare(replicated=True)`: GRPO/RLOO's generate input when its prompts do not divide the batch axes (2
    prompts, 8 devices: `generate` replicates them): every process feeds every row, so it prepares the prompts of
    every rollout of the run (here 3 rollouts, 6 of the 20 prompts), and process 0 counts them."""
    share = distributed.DataShare(20, 2, micro_batch=2, mesh=sharding.make_mesh(), seed=1, shuffle=True,
                                  start_step=0, total_steps=3, whole=False, replicated=True)
    orders = data.step_indices(20, 2, seed=1, shuffle=True)
    used = np.concatenate([next(orders)[1] for _ in range(3)])
    assert share.positions.tolist() == share.counted.tolist() == [0, 1]  # (this process is process 0)
    assert share.needed.tolist() == sorted(used.tolist()) and len(share.needed) == 6
