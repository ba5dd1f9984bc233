"""SFT data preparation at scale: jaxpt vs TRL's `SFTTrainer` preprocessing, same rows, same tokenizer, one process.

Rows: `--rows` synthetic language-modeling texts of 4 to 48 words (`w<number>`, drawn from `--vocab_words` of them),
tokenized by a word-level `tokenizers` tokenizer wrapped in
`transformers.PreTrainedTokenizerFast` (one token per word, EOS `</s>` appended by both sides), packed with
best-fit decreasing into rows of `--max_length` tokens.

- jaxpt: `jaxpt.sft.prepare_dataset(dataset, tokenizer, SFTConfig(packing=True, ...))`: checks, batched tokenization
  through `datasets.Dataset.map`, truncation and packing on flat arrays; train-ready rows out.
- TRL: `SFTTrainer._prepare_dataset` (on a bare trainer, as tests/test_sft_trl_parity.py does): add EOS, tokenize,
  build labels (per-row `Dataset.map`s) and `pack_dataset`.

Also timed on their own: the packing alone, jaxpt's `sft.pack_ragged` (and its `data.bfd_bins`) on the tokenized
rows, and TRL's `pack_dataset` on the same token columns. TRL packs each 1000-row batch of its `map` on its own;
jaxpt packs the whole dataset at once (so it needs fewer rows: both counts are printed). Prints each side's
seconds (median over `--repeats`), the ratio TRL / jaxpt (above 1: jaxpt faster) and one JSON line.

    python benchmarks/data_prep.py                    # 1M rows
    python benchmarks/data_prep.py --rows 100000      # smaller
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--max_length", type=int, default=256, help="packed row length")
    parser.add_argument("--packing_strategy", default="bfd", choices=["bfd", "bfd_split", "wrapped"])
    parser.add_argument("--vocab_words", type=int, default=2000)
    parser.add_argument("--dataset_num_proc", type=int, default=None, help="both sides' datasets.map processes")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per side (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_trl", action="store_true")
    return parser.parse_args()


def word_tokenizer(vocab_words: int):
    """One token per `w<i>` word (split on whitespace), `<pad>`=0, `</s>`=1 (EOS), `<unk>`=2."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(vocab_words)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


def synthetic_texts(rows: int, vocab_words: int, seed: int) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    texts = []
    for chunk in range(0, rows, 100_000):  # in chunks: a million rows' words as Python strings at once would be GBs
        lengths = rng.integers(4, 49, min(100_000, rows - chunk))
        words = np.char.add("w", rng.integers(0, vocab_words, int(lengths.sum())).astype(str)).tolist()
        ends = np.cumsum(lengths).tolist()
        texts += [" ".join(words[start:end]) for start, end in zip([0, *ends[:-1]], ends, strict=True)]
    return texts


CPU_SECONDS: dict[str, float] = {}  # per label: this process's CPU seconds (all threads), median over repeats


def timed(function, repeats: int, label: str):
    """Median wall seconds of `function()` over `repeats` runs, and its last result; the median CPU seconds go
    to `CPU_SECONDS[label]` (on a shared, loaded machine they move less than the wall seconds)."""
    seconds, cpu_seconds, result = [], [], None
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = function()
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    CPU_SECONDS[label] = statistics.median(cpu_seconds)
    return statistics.median(seconds), result


def main():
    args = parse_args()
    import datasets
    import numpy as np
    import pyarrow as pa

    from jaxpt import data, sft

    datasets.disable_progress_bars()
    tokenizer = word_tokenizer(args.vocab_words)
    start = time.perf_counter()
    dataset = datasets.Dataset.from_dict({"text": synthetic_texts(args.rows, args.vocab_words, args.seed)})
    print(f"{args.rows} rows synthesised in {time.perf_counter() - start:.1f} s; max_length={args.max_length}, "
          f"{args.packing_strategy}, dataset_num_proc={args.dataset_num_proc}")
    output_dir = tempfile.mkdtemp()
    results = {"rows": args.rows, "max_length": args.max_length, "packing_strategy": args.packing_strategy,
               "dataset_num_proc": args.dataset_num_proc, "repeats": args.repeats}

    config = sft.SFTConfig(output_dir=output_dir, max_length=args.max_length, packing=True,
                           packing_strategy=args.packing_strategy, dataset_num_proc=args.dataset_num_proc)
    seconds, packed = timed(lambda: sft.prepare_dataset(dataset, tokenizer, config), args.repeats, "jaxpt")
    tokens = int(sum(int((row["segment_ids"] > 0).sum()) for row in packed))
    results.update(jaxpt_s=seconds, jaxpt_packed_rows=len(packed),
                   jaxpt_fill=tokens / (len(packed) * args.max_length))
    print(f"jaxpt prepare_dataset: {seconds:.2f} s ({CPU_SECONDS['jaxpt']:.2f} CPU s) -> {len(packed)} rows "
          f"({results['jaxpt_fill']:.4f} full)")
    del packed

    # The packing alone, on the tokenized rows (EOS appended, as prepare_dataset tokenizes them).
    columns = data.map_columns(dataset, sft.tokenize_batch, columns=("text",), fn_kwargs={
        "tokenizer": tokenizer, "columns": ("text",), "conversational": False, "eos_token": tokenizer.eos_token,
        "assistant_only_loss": False})
    input_ids = columns["input_ids"]
    if args.packing_strategy == "bfd":
        input_ids = data.Ragged(input_ids.values[np.arange(len(input_ids.values)) - np.repeat(
            input_ids.starts, input_ids.lengths) < args.max_length], np.minimum(input_ids.lengths, args.max_length))
    loss_mask = np.ones(len(input_ids.values), np.int32)
    results["tokens"] = int(input_ids.lengths.sum())
    results["jaxpt_bfd_bins_s"] = timed(lambda: data.bfd_bins(input_ids.lengths, args.max_length), args.repeats,
                                        "jaxpt_bfd_bins")[0]
    results["jaxpt_pack_s"] = timed(lambda: sft.pack_ragged(input_ids, loss_mask, args.max_length,
                                                            strategy=args.packing_strategy), args.repeats,
                                    "jaxpt_pack")[0]
    print(f"jaxpt packing alone: {results['jaxpt_pack_s']:.2f} s (bfd_bins {results['jaxpt_bfd_bins_s']:.2f} s) "
          f"for {args.rows} examples, {results['tokens']} tokens")

    if not args.skip_trl:
        import trl

        trl_args = trl.SFTConfig(output_dir=output_dir, report_to="none", use_cpu=True, max_length=args.max_length,
                                 packing=True, packing_strategy=args.packing_strategy,
                                 dataset_num_proc=args.dataset_num_proc)
        trainer = object.__new__(trl.SFTTrainer)  # only _prepare_dataset runs: no model
        trainer._tokenizer = tokenizer
        trainer.chat_template = None
        trainer.completion_only_loss = False  # SFTTrainer.__init__'s default for language-modeling data
        seconds, prepared = timed(lambda: trainer._prepare_dataset(dataset, tokenizer, trl_args, True, None,
                                                                   "train"), args.repeats, "trl")
        lengths = prepared.with_format("arrow")["seq_lengths"]
        trl_tokens = int(pa.compute.sum(pa.compute.list_flatten(lengths)).as_py())
        results.update(trl_s=seconds, trl_packed_rows=len(prepared),
                       trl_fill=trl_tokens / (len(prepared) * args.max_length))
        print(f"TRL _prepare_dataset: {seconds:.2f} s ({CPU_SECONDS['trl']:.2f} CPU s) -> {len(prepared)} rows "
              f"({results['trl_fill']:.4f} full)")
        del prepared

        offsets = pa.array(np.concatenate([[0], np.cumsum(input_ids.lengths)]), pa.int32())
        ids = pa.ListArray.from_arrays(offsets, pa.array(input_ids.values.astype(np.int64)))
        token_columns = datasets.Dataset(pa.table({"input_ids": ids, "labels": ids}))
        results["trl_pack_s"] = timed(lambda: trl.pack_dataset(token_columns, args.max_length,
                                                               args.packing_strategy), args.repeats, "trl_pack")[0]
        print(f"TRL pack_dataset alone: {results['trl_pack_s']:.2f} s")
        results["trl_over_jaxpt"] = results["trl_s"] / results["jaxpt_s"]
        results["pack_trl_over_jaxpt"] = results["trl_pack_s"] / results["jaxpt_pack_s"]
        results["cpu_trl_over_jaxpt"] = CPU_SECONDS["trl"] / CPU_SECONDS["jaxpt"]
        print(f"TRL / jaxpt: preparation {results['trl_over_jaxpt']:.2f}x ({results['cpu_trl_over_jaxpt']:.2f}x in "
              f"CPU seconds), packing alone {results['pack_trl_over_jaxpt']:.2f}x (above 1: jaxpt faster)")
    results.update({f"{label}_cpu_s": value for label, value in CPU_SECONDS.items()})
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
