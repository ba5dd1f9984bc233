"""Datasets in TRL's formats: loading, format detection, chat templates, packing and length buckets.

TRL's formats (https://huggingface.co/docs/trl/dataset_formats), each standard (strings) or conversational
(lists of `{"role", "content"}` messages):

| kind                 | columns                                      | used by          |
|----------------------|----------------------------------------------|------------------|
| language modeling    | `text` (standard) / `messages` (conv.)       | SFT              |
| prompt-completion    | `prompt`, `completion`                       | SFT              |
| prompt-only          | `prompt`                                     | GRPO, RLOO       |
| preference           | `prompt`, `chosen`, `rejected` (or implicit: | DPO, Reward      |
|                      | `chosen`, `rejected` sharing a prompt)       |                  |
| unpaired preference  | `prompt`, `completion`, `label` (bool)       | KTO              |

Everything here is plain Python / numpy on the host; each method turns tokenized examples into batches itself.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_COLUMNS = {
    "language_modeling": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "prompt_only": ("prompt",),
    "preference": ("prompt", "chosen", "rejected"),
    "implicit_preference": ("chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
}


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


def looks_like_local_path(name_or_path: str | os.PathLike) -> bool:
    """True when `name_or_path` can only mean a local path: it exists, starts with `./`, `../`, `/` or `~`, has
    more than one `/` (a Hub id is `org/name`), a backslash, or a data-file suffix. Such a path that does not exist
    fails at once instead of after the Hub's retries."""
    name = str(name_or_path)
    return (Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
            or "\\" in name or name.endswith(DATA_FILE_SUFFIXES))


def load_dataset(name_or_path: str | os.PathLike, *, split: str = "train", config_name: str | None = None):
    """A `datasets.Dataset` from a local file (.json/.jsonl/.parquet/.csv), a local directory (saved with
    `save_to_disk`, or holding such files, optionally in `<split>.*` files), or a Hub dataset id. An empty file, a
    file without rows, or a malformed JSON line fails with the file (and line) named."""
    import datasets

    path = Path(name_or_path).expanduser()
    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
    if path.is_file():
        if split != "train":
            raise ValueError(f"{path} is one file, so it has only a 'train' split, not {split!r}: put the splits in "
                             "a directory as train.jsonl / test.jsonl (or set eval_strategy='no').")
        if path.suffix not in builders:
            raise ValueError(f"Cannot read {path}: supported files are {sorted(builders)}.")
        return _load_files(builders[path.suffix], [path], split)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"The dataset saved in {path} has the splits {sorted(loaded)}, not {split!r}: "
                                     "pass one of them (dataset_train_split / dataset_test_split).")
                loaded = loaded[split]
            return loaded
        files = sorted(p for p in path.iterdir() if p.suffix in builders)
        split_files = [p for p in files if p.stem == split or p.stem.startswith(f"{split}-")]
        chosen = split_files or ([] if any(p.stem in ("train", "test", "validation") for p in files) else files)
        if not chosen:
            raise FileNotFoundError(f"No {split!r} data files ({sorted(builders)}) in {path}.")
        return _load_files(builders[chosen[0].suffix], chosen, split)
    if looks_like_local_path(name_or_path):
        raise FileNotFoundError(f"No dataset file or directory at {path.absolute()} (dataset_name="
                                f"{str(name_or_path)!r}): check the path; a Hub dataset id has the form org/name.")
    try:
        return datasets.load_dataset(str(name_or_path), config_name, split=split)
    except Exception as error:
        raise FileNotFoundError(
            f"{str(name_or_path)!r} is neither a local file/directory (looked at {path.absolute()}) nor a dataset "
            f"the Hugging Face Hub served: {type(error).__name__}: {error}"
        ) from error


def _load_files(builder: str, files: Sequence[Path], split: str):
    """`datasets.load_dataset` of local files, with the file (and the line of a malformed JSON line) named when a
    file is empty, has no rows, or does not parse."""
    import datasets

    for file in files:
        if file.stat().st_size == 0 or (builder == "json" and not file.read_text(errors="replace").strip()):
            raise ValueError(f"The data file {file} is empty: it holds no rows.")
    try:
        dataset = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as error:
        for file in files:
            if builder == "json":
                _check_json_file(file)
            elif builder == "csv" and len(file.read_text(errors="replace").strip().splitlines()) <= 1:
                raise ValueError(f"The CSV file {file} holds a header but no rows.") from None
        raise ValueError(f"Cannot read the {split!r} data from {', '.join(map(str, files))}: "
                         f"{type(error).__name__}: {error} {error.__cause__ or ''}".rstrip()) from error
    if len(dataset) == 0:
        raise ValueError(f"The data file(s) {', '.join(map(str, files))} hold no rows"
                         + (" (a CSV header alone)" if builder == "csv" else "") + ".")
    return dataset


def _check_json_file(file: Path) -> None:
    """Raise `ValueError` naming the first line of a JSON-lines file that is not a JSON object (or a whole-file
    JSON error)."""
    import json

    text = file.read_text(errors="replace")
    try:
        json.loads(text)
        return  # one JSON document (a list of rows, or a dict of columns): well formed
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{file}, line {number}: malformed JSON ({error.msg} at column {error.colno}): "
                             f"{line[:80]!r}. Fix or remove that line.") from None
        if not isinstance(row, dict):
            raise ValueError(f"{file}, line {number}: a JSON-lines row must be an object ({{\"column\": value, "
                             f"...}}), not {type(row).__name__}: {line[:80]!r}.")


# --------------------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetFormat:
    kind: str  # a key of FORMAT_COLUMNS
    conversational: bool


def is_conversational(example: dict) -> bool:
    """True when the example's text columns are lists of `{"role", "content"}` messages."""
    for key in ("messages", "prompt", "chosen", "rejected", "completion"):
        value = example.get(key)
        if isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0]:
            return True
    return False


def detect_format(example: dict, *, text_field: str = "text") -> DatasetFormat:
    """Which TRL format an example is in (see the table at the top of this module)."""
    keys = set(example)
    conversational = is_conversational(example)
    if {"prompt", "completion", "label"} <= keys:
        kind = "unpaired_preference"
    elif {"chosen", "rejected"} <= keys:
        kind = "preference" if "prompt" in keys else "implicit_preference"
    elif {"prompt", "completion"} <= keys:
        kind = "prompt_completion"
    elif text_field in keys or "messages" in keys:
        kind = "language_modeling"
    elif "prompt" in keys:
        kind = "prompt_only"
    else:
        raise ValueError(
            f"Cannot tell the dataset format from its columns {sorted(keys)}. TRL's formats: "
            + "; ".join(f"{k}: {', '.join(v)}" for k, v in FORMAT_COLUMNS.items())
            + ". Language modeling also accepts 'messages' (conversational)."
        )
    return DatasetFormat(kind, conversational)


def require_format(dataset, allowed: Sequence[str], *, method: str, text_field: str = "text") -> DatasetFormat:
    """The dataset's format, or a `ValueError` saying which format was detected and which columns `method`
    needs. Also rejects empty datasets."""
    if len(dataset) == 0:
        raise ValueError(f"The {method} dataset is empty.")
    fmt = detect_format(dataset[0], text_field=text_field)
    if fmt.kind not in allowed:
        needs = " or ".join(f"{kind} ({', '.join(FORMAT_COLUMNS[kind])})" for kind in allowed)
        raise ValueError(
            f"{method} needs a {needs} dataset, but the columns {sorted(dataset.column_names)} look like "
            f"{fmt.kind} ({', '.join(FORMAT_COLUMNS[fmt.kind])})."
        )
    return fmt


def extract_prompt(example: dict) -> dict:
    """Implicit-prompt preference example -> explicit `prompt`, `chosen`, `rejected` (TRL's `extract_prompt`):
    the prompt is the longest common prefix of chosen and rejected (messages, or characters for strings, not
    cutting after a trailing space)."""
    chosen, rejected = example["chosen"], example["rejected"]
    index = 0
    limit = min(len(chosen), len(rejected))
    while index < limit and chosen[index] == rejected[index]:
        index += 1
    if index < limit and isinstance(chosen, str) and index > 0 and chosen[index - 1] == " ":
        index -= 1
    return {**example, "prompt": chosen[:index], "chosen": chosen[index:], "rejected": rejected[index:]}


# --------------------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------------------


def check_chat_template(tokenizer, fmt: DatasetFormat, *, method: str) -> None:
    if fmt.conversational and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The {method} dataset is conversational (lists of role/content messages) but the tokenizer has no chat "
            "template: set `tokenizer.chat_template` (or pass a tokenizer that has one), or convert the dataset "
            "to standard (string) format."
        )


MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")


def text_columns(fmt: DatasetFormat, *, text_field: str = "text") -> tuple[str, ...]:
    """The columns of `fmt` that hold text (strings) or messages."""
    if fmt.kind == "language_modeling":
        return ("messages",) if fmt.conversational else (text_field,)
    return tuple(c for c in FORMAT_COLUMNS[fmt.kind] if c != "label")


def check_rows(dataset, fmt: DatasetFormat, *, method: str, tokenizer=None, text_field: str = "text",
               columns: Sequence[str] | None = None, number_columns: Sequence[str] = ()) -> None:
    """Check every row of the text columns (default: all of `fmt`'s) before tokenizing, so bad data fails with
    the row and the column named (never a `KeyError`/`TypeError` from inside the tokenizer or chat template):
    strings in standard data, lists of `{"role", "content"}` messages with known roles in conversational data (no
    mixing), no nulls, not every row empty; for preference data, not every pair with identical chosen and
    rejected (a warning when some are, as TRL trains on them); finite numbers in `number_columns` (e.g. the reward
    `margin`) and booleans in the `label` of unpaired preference data."""
    import logging

    columns = tuple(columns) if columns is not None else text_columns(fmt, text_field=text_field)
    template = str(getattr(tokenizer, "chat_template", None) or "")
    kind = "conversational (lists of role/content messages)" if fmt.conversational else "standard (strings)"
    values: dict[str, Any] = {}
    for name in columns:
        strings = None if fmt.conversational else _string_column(dataset, name)
        if strings is not None:  # an Arrow string column: the same checks, without a Python object per row
            _check_string_column(strings, name, method=method, text_field=text_field)
            values[name] = strings
            continue
        column = values[name] = _column(dataset, name)
        if all(value is None for value in column):
            raise ValueError(f"The {method} dataset's {name!r} column is null in every row: fill it (or use a "
                             "dataset with that column).")
        for index, value in enumerate(column):
            where = f"{method} dataset, row {index}, column {name!r}"
            if value is None:
                raise ValueError(f"{where} is null: fill it or drop the row.")
            if fmt.conversational:
                _check_messages(value, where=where, kind=kind, template=template)
            elif not isinstance(value, str):
                if _is_messages(value):
                    raise ValueError(f"{where} holds messages, but the dataset is {kind} (its first row): use one "
                                     "format for every row and column.")
                raise ValueError(f"{where} is {type(value).__name__} {value!r}; a {kind} dataset needs a string "
                                 "there: convert the column to text (e.g. str(value)).")
        if name in ("text", text_field, "completion", "chosen", "rejected") and not fmt.conversational and all(
                value == "" for value in column):
            raise ValueError(f"The {method} dataset's {name!r} column is an empty string in every row, so there is "
                             "no token to train on: check the column mapping.")
    if "chosen" in values:
        chosen, rejected = values["chosen"], values["rejected"]
        if isinstance(chosen, list) or isinstance(rejected, list):
            same = sum(c == r for c, r in zip(_as_list(chosen), _as_list(rejected), strict=True))
        else:
            import pyarrow.compute as pc

            same = int(pc.sum(pc.equal(chosen, rejected)).as_py() or 0)
        if same == len(dataset):
            raise ValueError(f"Every one of the {len(dataset)} pairs of the {method} dataset has identical chosen "
                             "and rejected completions: such a pair carries no preference signal.")
        if same:
            logging.getLogger("jaxpt").warning(
                "%d of %d pairs of the %s dataset have identical chosen and rejected completions: they carry no "
                "preference signal (TRL trains on them too; filter them out).", same, len(dataset), method)
    checked = [*number_columns, *(["label"] if fmt.kind == "unpaired_preference" else [])]
    for name in checked:
        if name in column_names(dataset):
            column = _column(dataset, name)
            if all(value is None for value in column):
                raise ValueError(f"The {method} dataset's {name!r} column is null in every row: fill it"
                                 + ("." if name == "label" else " or drop the column."))
            for index, value in enumerate(column):
                number = isinstance(value, (int, float, np.integer, np.floating, np.bool_))
                if value is None or not number or not math.isfinite(float(value)):
                    raise ValueError(f"{method} dataset, row {index}: {name}={value!r}; "
                                     + ("KTO labels are booleans (True: desirable, False: undesirable)."
                                        if name == "label" else "it must be a finite number."))


def column_names(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    return list(names) if names is not None else sorted({k for row in dataset for k in row})


def _column(dataset, name: str) -> list:
    if hasattr(dataset, "column_names"):
        if name not in dataset.column_names:
            return [None] * len(dataset)
        if hasattr(dataset, "select_columns"):  # a datasets.Dataset: one formatted batch (row by row is slow)
            return list(dataset.select_columns([name])[:][name])
        return list(dataset[name])
    return [row.get(name) for row in dataset]


def _as_list(column) -> list:
    return column if isinstance(column, list) else column.to_pylist()


def _string_column(dataset, name: str):
    """The column as an Arrow (chunked) string array when `dataset` is a `datasets.Dataset` whose feature for it is
    a plain string (not e.g. a `Json` column, stored as strings but decoded by the formatter), else None."""
    features = getattr(dataset, "features", None)
    if features is None or not hasattr(dataset, "with_format") or name not in features:
        return None
    feature = features[name]
    if type(feature).__name__ != "Value" or getattr(feature, "dtype", None) not in ("string", "large_string"):
        return None
    return dataset.with_format("arrow")[name]  # follows an indices mapping (select, shuffle)


def _check_string_column(strings, name: str, *, method: str, text_field: str) -> None:
    """`check_rows`' checks of a standard column, on its Arrow strings: no nulls, not every row empty."""
    import pyarrow.compute as pc

    nulls = strings.null_count
    if nulls == len(strings):
        raise ValueError(f"The {method} dataset's {name!r} column is null in every row: fill it (or use a "
                         "dataset with that column).")
    if nulls:
        index = pc.index(pc.is_null(strings), True).as_py()
        raise ValueError(f"{method} dataset, row {index}, column {name!r} is null: fill it or drop the row.")
    if name in ("text", text_field, "completion", "chosen", "rejected") and len(strings) and pc.all(
            pc.equal(pc.binary_length(strings), 0)).as_py():
        raise ValueError(f"The {method} dataset's {name!r} column is an empty string in every row, so there is "
                         "no token to train on: check the column mapping.")


def _is_messages(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, dict) for m in value)


def _check_messages(value, *, where: str, kind: str, template: str) -> None:
    if isinstance(value, str):
        raise ValueError(f"{where} is a string, but the dataset is {kind} (its first row): use one format for "
                         "every row and column.")
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where} is {type(value).__name__} {value!r}; a {kind} dataset needs a list of "
                         "{'role': ..., 'content': ...} messages there.")
    for number, message in enumerate(value):
        at = f"{where}, message {number}"
        if not isinstance(message, dict):
            raise ValueError(f"{at} is {type(message).__name__} {message!r}, not a {{'role', 'content'}} dict.")
        role = message.get("role")
        if role is None:
            raise ValueError(f"{at} has no 'role' (keys: {sorted(k for k, v in message.items() if v is not None)}).")
        # a role the chat template names explicitly (e.g. 'ipython') is one it knows
        if role not in MESSAGE_ROLES and f"'{role}'" not in template and f'"{role}"' not in template:
            raise ValueError(f"{at} has role={role!r}, which neither the standard roles {list(MESSAGE_ROLES)} "
                             "nor the tokenizer's chat template name: rename it.")
        content = message.get("content")
        if content is None and not message.get("tool_calls"):
            if message.get("text") is not None:
                raise ValueError(f"{at} has a 'text' key instead of 'content': rename the key to 'content'.")
            raise ValueError(f"{at} (role {role!r}) has no 'content'.")
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError(f"{at} has content of type {type(content).__name__} ({content!r}); message content "
                             "must be a string: convert it.")


def tokenize(tokenizer, text_or_messages, *, add_generation_prompt: bool = False,
             assistant_mask: bool = False, tools: Any = None,
             chat_template_kwargs: dict | None = None) -> dict[str, list[int]]:
    """Token ids of a string, or of messages rendered by the tokenizer's chat template (with
    `chat_template_kwargs`, e.g. `{"enable_thinking": False}`).

    With `assistant_mask`, also `assistant_masks` (1 on tokens generated by the assistant), which needs a chat
    template with `{% generation %}` markers."""
    if isinstance(text_or_messages, str):
        ids = tokenizer(text_or_messages, add_special_tokens=True)["input_ids"]
        return {"input_ids": list(ids)}
    out = tokenizer.apply_chat_template(text_or_messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt, tools=tools,
                                        return_assistant_tokens_mask=assistant_mask, **(chat_template_kwargs or {}))
    result = {"input_ids": list(out["input_ids"])}
    if assistant_mask:
        result["assistant_masks"] = list(out["assistant_masks"])
    return result


def tokenize_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of many strings, as `tokenizer(texts, add_special_tokens=True)["input_ids"]` gives them. A
    `transformers` fast tokenizer without truncation or padding set on its backend is run through the backend's
    `encode_batch_fast` (no offsets, no per-text Python conversion); the first texts are checked against the
    ordinary call, which serves whenever they differ."""
    texts = list(texts)
    backend = getattr(tokenizer, "_tokenizer", None)
    encode = getattr(backend, "encode_batch_fast", None)
    if encode is not None and backend.truncation is None and backend.padding is None and \
            backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False)):
        ids = [encoding.ids for encoding in encode(texts, add_special_tokens=True)]
        probe = texts[:4]
        if [list(i) for i in tokenizer(probe, add_special_tokens=True)["input_ids"]] == ids[:len(probe)]:
            return ids
    return [list(i) for i in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    length = 0
    for a, b in zip(ids, other, strict=False):
        if a != b:
            break
        length += 1
    return length


def tokenize_prompt_completion(tokenizer, prompt, completion, *, conversational: bool,
                               eos_token: str | None = None) -> tuple[list[int], int]:
    """Ids of prompt + completion and the length of the prompt part (the completion starts where the tokenized
    prompt and prompt+completion diverge, as in TRL). Standard text gets the EOS token appended to the
    completion if missing; conversational text gets the chat template (prompt with the generation prompt)."""
    if conversational:
        prompt_ids = tokenize(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
        full_ids = tokenize(tokenizer, list(prompt) + list(completion))["input_ids"]
    else:
        eos_token = eos_token or tokenizer.eos_token
        if eos_token and not completion.endswith(eos_token):
            completion = completion + eos_token
        prompt_ids = tokenize(tokenizer, prompt)["input_ids"]
        full_ids = tokenize(tokenizer, prompt + completion)["input_ids"]
    return full_ids, common_prefix_length(prompt_ids, full_ids)


def check_nonempty(ids: Sequence[int], *, what: str, index: int) -> None:
    if len(ids) == 0:
        raise ValueError(empty_tokens_message(what=what, index=index))


def empty_tokens_message(*, what: str, index: int) -> str:
    return (f"Example {index}: the {what} tokenized to no tokens. Check that the tokenizer matches the model "
            "family (a WordLevel tokenizer saved for a qwen2 model is rebuilt as byte-level by transformers and "
            "encodes to nothing).")


def prepare_prompts(dataset, tokenizer, *, method: str, max_prompt_length: int | None = None,
                    chat_template_kwargs: dict | None = None, num_proc: int | None = None) -> list[dict]:
    """Prompts of a prompt-only dataset (GRPO, RLOO) as `{"prompt", "prompt_ids", "columns"}`: the original
    prompt (string or messages), its token ids (chat template with the generation prompt for conversational
    data; the last `max_prompt_length` tokens when set, as prompts are cut from the left), and every other
    column (handed to the reward functions). `chat_template_kwargs`: extra chat-template arguments (conversational
    prompts only). Tokenized in batches (`map_columns`: `datasets.Dataset.map(batched=True, num_proc=num_proc)`
    for a `datasets.Dataset`)."""
    fmt = require_format(dataset, ("prompt_only", "prompt_completion"), method=method)
    if chat_template_kwargs and not fmt.conversational:
        raise ValueError(f"chat_template_kwargs={chat_template_kwargs!r} is set but the {method} prompts are plain "
                         "strings (no chat template is applied): drop it, or pass conversational prompts.")
    check_chat_template(tokenizer, fmt, method=method)
    check_rows(dataset, fmt, method=method, tokenizer=tokenizer, columns=("prompt",))
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length={max_prompt_length} must be >= 1 (or None: no truncation).")
    options = {"tokenizer": tokenizer, "conversational": fmt.conversational,
               "chat_template_kwargs": chat_template_kwargs}
    tokenized = map_columns(dataset, _tokenize_prompts_batch, columns=("prompt",), num_proc=num_proc,
                            fn_kwargs=options, desc=f"Tokenizing the {method} prompts")
    prompt_ids = tokenized["prompt_ids"]
    if len(prompt_ids.lengths) and prompt_ids.lengths.min() == 0:
        check_nonempty([], what="prompt", index=int(np.argmin(prompt_ids.lengths)))
    prompts = prompt_rows(dataset)
    for record, ids in zip(prompts, prompt_ids.rows(), strict=True):
        record["prompt_ids"] = (ids if max_prompt_length is None else ids[-max_prompt_length:]).tolist()
    return prompts


def _tokenize_prompts_batch(batch: dict[str, list], *, tokenizer, conversational: bool,
                            chat_template_kwargs: dict | None) -> dict[str, list]:
    if not conversational:
        return {"prompt_ids": tokenize_texts(tokenizer, batch["prompt"])}
    return {"prompt_ids": [tokenize(tokenizer, prompt, add_generation_prompt=True,
                                    chat_template_kwargs=chat_template_kwargs)["input_ids"]
                           for prompt in batch["prompt"]]}


def prompt_rows(dataset) -> list[dict]:
    """The rows of a prompt dataset as `prepare_prompts` records without their token ids, `{"prompt", "columns"}`:
    read, not tokenized (what scoring and logging need of the prompts another process feeds)."""
    return [{"prompt": row["prompt"], "columns": {k: v for k, v in row.items() if k != "prompt"}} for row in dataset]


@dataclasses.dataclass(frozen=True)
class Ragged:
    """A column of variable-length sequences in an Arrow list column's layout: every row's values one after the
    other in `values`, and each row's length in `lengths`."""

    values: np.ndarray
    lengths: np.ndarray

    @property
    def starts(self) -> np.ndarray:
        """Where each row starts in `values`."""
        return np.cumsum(self.lengths) - self.lengths

    def rows(self) -> list[np.ndarray]:
        """One view of `values` per row."""
        return np.split(self.values, np.cumsum(self.lengths)[:-1]) if len(self.lengths) else []


def ragged_from_lists(rows: Sequence[Sequence[int]], dtype=np.int32) -> Ragged:
    import itertools

    lengths = np.fromiter(map(len, rows), np.int64, count=len(rows))
    values = np.fromiter(itertools.chain.from_iterable(rows), dtype, count=int(lengths.sum()))
    return Ragged(values, lengths)


def ragged_from_arrow(column, dtype=np.int32) -> Ragged:
    """An Arrow list column (chunked or not, sliced or not) as `Ragged`, without a Python object per row."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return Ragged(values, lengths)


def _arrow_outputs(batch: dict[str, list], *, function, function_kwargs: dict[str, Any]):
    """`function`'s outputs as an Arrow table (int32 lists for lists of token ids or masks): `datasets` writes
    it as it is, where Python lists would be inferred value by value. (A table replaces the batch's columns,
    which `map_columns` removes anyway.)"""
    import pyarrow as pa

    out = {}
    for name, value in function(batch, **function_kwargs).items():
        is_lists = len(value) and isinstance(value[0], (list, tuple))
        out[name] = pa.array(value, type=pa.list_(pa.int32()) if is_lists else None)
    return pa.table(out)


def map_columns(dataset, function, *, columns: Sequence[str], fn_kwargs: dict[str, Any],
                num_proc: int | None = None, desc: str | None = None) -> dict[str, Ragged | np.ndarray]:
    """`function(batch, **fn_kwargs)` (a dict of column lists in, a dict of equally long lists out) over the
    `columns` of `dataset`: with `datasets.Dataset.map(batched=True, num_proc=num_proc)` for a `datasets.Dataset`
    (so the datasets cache serves a file-backed dataset the second time), else in one call on plain rows (a list of
    dicts or a dict of lists). List outputs come back as `Ragged`, the others as numpy arrays: read from the Arrow
    table, never row by row."""
    if num_proc is not None and (not isinstance(num_proc, int) or num_proc < 1):
        raise ValueError(f"dataset_num_proc={num_proc!r} must be a positive number of processes (or None: one).")
    if hasattr(dataset, "map") and hasattr(dataset, "select_columns"):
        import pyarrow as pa

        mapped = dataset.select_columns(list(columns)).map(
            _arrow_outputs, batched=True, num_proc=num_proc if num_proc and num_proc > 1 else None,
            remove_columns=list(columns), fn_kwargs={"function": function, "function_kwargs": fn_kwargs}, desc=desc)
        table = mapped.with_format("arrow")[:]  # follows an indices mapping, if any
        out: dict[str, Ragged | np.ndarray] = {}
        for name in table.column_names:
            column = table.column(name)
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                out[name] = ragged_from_arrow(column)
            else:
                out[name] = column.to_numpy(zero_copy_only=False)
        return out
    if isinstance(dataset, dict):
        batch = {name: list(dataset[name]) for name in columns}
    else:
        batch = {name: [row.get(name) for row in dataset] for name in columns}
    result = function(batch, **fn_kwargs)
    return {name: ragged_from_lists(value) if value and isinstance(value[0], (list, tuple, np.ndarray))
            else np.asarray(value) for name, value in result.items()}


def check_model_fits(model, examples: Sequence[dict], keys: Sequence[str], *, method: str, length_fields: str,
                     extra_length: int = 0, extra_ids: Sequence[int | None] = (), longest: int | None = None) -> None:
    """Fail before anything compiles when tokenized data does not fit `model`: a token id (of `examples[i][key]`
    or `extra_ids`, e.g. the pad token) outside the model's vocabulary (the tokenizer belongs to another model; the
    embedding lookup would turn into NaN), or a sequence (the longest of `keys`, per packed segment, or `longest`
    when the caller knows better, plus `extra_length`, e.g. the completion length of a rollout) longer than its
    `max_position_embeddings`."""
    known_longest = longest
    longest, max_id = 0, max([i for i in extra_ids if i is not None], default=-1)
    for example in examples:
        for key in keys:
            ids = np.asarray(example[key])
            if ids.size:
                max_id = max(max_id, int(ids.max()))
                if "segment_ids" in example:  # packed: positions restart in every segment
                    longest = max(longest, int(np.bincount(np.asarray(example["segment_ids"]))[1:].max(initial=0)))
                else:
                    longest = max(longest, int(ids.size))
    longest = longest if known_longest is None else known_longest
    config = getattr(model, "config", None)
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and max_id >= vocab_size:
        raise ValueError(f"The {method} data holds token id {max_id}, but the model's vocabulary has vocab_size="
                         f"{vocab_size} ids (0..{vocab_size - 1}): the tokenizer does not belong to this model. Pass "
                         "the model's own tokenizer (--tokenizer_name_or_path), or a model whose embeddings cover it.")
    max_positions = getattr(getattr(config, "rope", None), "max_position_embeddings", None)
    if max_positions is not None and longest + extra_length > max_positions:
        raise ValueError(f"The {method} run feeds sequences of up to {longest + extra_length} tokens, more than the "
                         f"model's max_position_embeddings={max_positions}: lower {length_fields} (to at most "
                         f"{max_positions} in all) or shorten the data.")


# --------------------------------------------------------------------------------------------------------------
# Packing and bucketing
# --------------------------------------------------------------------------------------------------------------


def pack_bfd(lengths: Sequence[int], seq_length: int) -> list[list[int]]:
    """Best-fit-decreasing bins of example indices whose lengths sum to at most `seq_length` (longer examples
    must be truncated first). Sequences are placed longest first (ties in index order), each into the fullest bin
    it fits; among equally full bins, the one that has had that free space longest (TRL's order, so the bins are
    TRL's). Empty examples are left out. `bfd_bins` gives the same bins as arrays, in O(n log n)."""
    members, sizes = bfd_bins(lengths, seq_length)
    return [part.tolist() for part in np.split(members, np.cumsum(sizes)[:-1])] if len(sizes) else []


def bfd_bins(lengths: Sequence[int] | np.ndarray, seq_length: int) -> tuple[np.ndarray, np.ndarray]:
    """`pack_bfd`'s bins as `(members, sizes)`: the example indices of every bin, bin after bin (in the order the
    bins were opened, each bin's members in the order they were placed), and the number of examples per bin.

    O(n log n) (one sort) plus O(seq_length) per distinct length, with no Python step per sequence. Sequences of
    one length L are placed together: the bin that fits L most tightly (free space v >= L, the smallest such v)
    takes v // L of them in a row, since after each one its free space is again the smallest >= L, or below L.
    So every bin with the same free space takes the same number, and a queue of bins per free space (in the order
    they got it, TRL's tie-break) hands out whole runs of bins as numpy arrays."""
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    if seq_length < 1:
        raise ValueError(f"pack_bfd: seq_length={seq_length} must be >= 1.")
    if lengths.size and int(lengths.max()) > seq_length:
        raise ValueError("pack_bfd: truncate examples to seq_length before packing.")
    order = np.argsort(-lengths, kind="stable")  # longest first, ties in index order
    order = order[lengths[order] > 0]
    run_values, run_counts = np.unique(-lengths[order], return_counts=True)
    queues: list[deque] = [deque() for _ in range(seq_length)]  # free space -> arrays of bin ids, oldest first
    queued = np.zeros(seq_length, np.int64)  # bins waiting in each queue
    free = np.empty(len(order), np.int64)  # free space of each opened bin (never more bins than sequences)
    bin_of_placed = []  # per run: the bin of each sequence, in placing order
    num_bins = 0
    for negative_length, count in zip(run_values.tolist(), run_counts.tolist(), strict=True):
        length, left = -negative_length, count
        touched, taken = [], []  # bins in the order they were filled, and how many sequences each took
        for space in (np.flatnonzero(queued[length:]) + length).tolist():
            per_bin = space // length
            queue = queues[space]
            while queue and left:
                bins = queue.popleft()
                take = min(len(bins), -(-left // per_bin))
                if take < len(bins):
                    queue.appendleft(bins[take:])
                queued[space] -= take
                counts = np.full(take, per_bin, np.int64)
                counts[-1] = left - per_bin * (take - 1)  if per_bin * take > left else per_bin
                touched.append(bins[:take])
                taken.append(counts)
                left -= int(counts.sum())
            if not left:
                break
        if left:  # no open bin fits the rest: open bins, each filled with as many as fit
            per_bin = seq_length // length
            new = -(-left // per_bin)
            counts = np.full(new, per_bin, np.int64)
            counts[-1] = left - per_bin * (new - 1)
            free[num_bins:num_bins + new] = seq_length
            touched.append(np.arange(num_bins, num_bins + new))
            taken.append(counts)
            num_bins += new
        bins, counts = np.concatenate(touched), np.concatenate(taken)
        bin_of_placed.append(np.repeat(bins, counts))
        free[bins] -= counts * length
        # Queue every touched bin under its new free space, in the order the bins were filled (TRL queues a bin
        # when it gets its free space; a stable sort keeps that order within each free space).
        spaces = free[bins]
        by_space = np.argsort(spaces, kind="stable")
        spaces, bins = spaces[by_space], bins[by_space]
        starts = np.flatnonzero(np.diff(spaces, prepend=-1))
        for start, end in zip(starts.tolist(), [*starts[1:].tolist(), len(bins)], strict=True):
            space = int(spaces[start])
            if space:  # a full bin takes nothing more
                queues[space].append(bins[start:end])
                queued[space] += end - start
    if not bin_of_placed:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    bin_of_placed = np.concatenate(bin_of_placed)
    by_bin = np.argsort(bin_of_placed, kind="stable")  # each bin's members in placing order
    return order[by_bin], np.bincount(bin_of_placed, minlength=num_bins)


def length_buckets(max_length: int, *, min_length: int = 64) -> list[int]:
    """Padded lengths a run compiles for: 64, 96, 128, 192, 256, 384, ... up to and including `max_length`.

    Two buckets per octave keep padding waste under a third (about a sixth on average) while a run compiles at
    most ~2 log2(max_length / 64) shapes (TRL pads each batch to its longest sequence: no waste, but a compile
    per distinct length would be unaffordable under XLA)."""
    buckets = []
    size = min_length
    while size < max_length:
        buckets.append(size)
        half_step = size + size // 2
        if half_step < max_length:
            buckets.append(half_step)
        size *= 2
    buckets.append(max_length)
    return sorted(set(buckets))


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    for bucket in buckets:
        if length <= bucket:
            return bucket
    return buckets[-1]


def pad_rows(rows: Sequence[Sequence[int]], length: int, pad_value: int = 0, *, left: bool = False) -> np.ndarray:
    """`[len(rows), length]` int32 array, each row padded (right by default) with `pad_value`."""
    out = np.full((len(rows), length), pad_value, np.int32)
    for i, row in enumerate(rows):
        row = list(row)[:length]
        if left:
            out[i, length - len(row):] = row
        else:
            out[i, : len(row)] = row
    return out


def pad_token_id(tokenizer) -> int:
    """The id every method pads with: the tokenizer's pad token, else its EOS token (TRL's fallback), else 0.
    Padding is masked out of attention and losses, so the id changes no loss; it matters where a model or
    exported config reads it (a reward model pools at the last token that is not padding)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


# --------------------------------------------------------------------------------------------------------------
# Epochs and steps
# --------------------------------------------------------------------------------------------------------------


def steps_per_epoch(num_examples: int, examples_per_step: int, *, method: str) -> int:
    if num_examples < examples_per_step:
        raise ValueError(
            f"The {method} dataset has {num_examples} examples after preprocessing, fewer than one optimizer step "
            f"needs ({examples_per_step} = per_device_train_batch_size x data-parallel devices x "
            "gradient_accumulation_steps): lower the batch size or add data."
        )
    return num_examples // examples_per_step  # the last partial step is dropped: shapes stay static


def total_steps(config, steps_in_epoch: int) -> int:
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.num_train_epochs * steps_in_epoch))


def step_indices(num_examples: int, examples_per_step: int, *, seed: int, shuffle: bool,
                 start_step: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """`(epoch, example indices)` for every optimizer step from `start_step` on, forever.

    The order of epoch `e` is a permutation seeded by `(seed, e)`, so a resumed run sees exactly the examples
    the uninterrupted run would have seen."""
    per_epoch = num_examples // examples_per_step
    step = start_step
    order_epoch, order = -1, None
    while True:
        epoch, position = divmod(step, per_epoch)
        if epoch != order_epoch:
            order_epoch = epoch
            order = (np.random.default_rng([seed, epoch]).permutation(num_examples) if shuffle
                     else np.arange(num_examples))
        yield epoch, order[position * examples_per_step:(position + 1) * examples_per_step]
        step += 1


# ---------------------------------------------------------------------------------------------------------------
# Preference pairs with BOS/EOS added (TRL's CPO and ORPO tokenization; DPO's is `tokenize_prompt_completion`)
# ---------------------------------------------------------------------------------------------------------------


def tokenize_pairs_with_special_tokens(dataset, tokenizer, fmt, *, max_length: int, method: str,
                                       num_proc: int | None = None) -> list[dict]:
    """A checked preference dataset (`fmt` from `require_format`) tokenized as TRL's CPOTrainer/ORPOTrainer do:
    conversational rows rendered to text by the chat template first; the prompt tokenized without special tokens,
    BOS prepended and EOS appended when missing, and the completion (never the prompt) cut to `max_length`.
    Examples: `{"chosen_input_ids", "chosen_completion_mask", "rejected_input_ids", "rejected_completion_mask"}`
    (int32 numpy arrays, 1 on completion tokens); `collate_pairs` batches them."""
    columns = [c for c in text_columns(fmt) if c in column_names(dataset)]
    tokenized = map_columns(dataset, _tokenize_pairs_batch, columns=columns, num_proc=num_proc,
                                 desc=f"Tokenizing the {method} dataset",
                                 fn_kwargs={"tokenizer": tokenizer, "implicit": fmt.kind == "implicit_preference",
                                            "conversational": fmt.conversational, "method": method})
    names = ("chosen_prompt_ids", "chosen_ids", "rejected_prompt_ids", "rejected_ids")
    examples = []
    for index, (chosen_prompt, chosen, rejected_prompt, rejected) in enumerate(zip(
            *(tokenized[name].rows() for name in names), strict=True)):
        example = {}
        for side, prompt_ids, ids in (("chosen", chosen_prompt, chosen), ("rejected", rejected_prompt, rejected)):
            ids = ids[:max(0, max_length - len(prompt_ids))]  # TRL cuts the completion, never the prompt
            if len(ids) == 0:
                raise ValueError(f"Example {index}: the prompt is {len(prompt_ids)} tokens, so max_length="
                                 f"{max_length} leaves no {side} completion token: raise max_length or shorten/filter "
                                 "long prompts.")
            example[f"{side}_input_ids"] = np.concatenate([prompt_ids, ids]).astype(np.int32)
            example[f"{side}_completion_mask"] = np.repeat(np.asarray([0, 1], np.int32), [len(prompt_ids), len(ids)])
        examples.append(example)
    return examples


def render_preference_chat(tokenizer, row: dict, *, method: str) -> dict:
    """A conversational preference row as text, as TRL's `apply_chat_template` renders it: the prompt with the
    generation prompt (or continuing a final assistant message), each completion the rest of prompt + completion
    after the longest common prefix of the texts."""
    prompt = list(row["prompt"])
    last_role = prompt[-1]["role"]
    if last_role not in ("user", "tool", "assistant"):
        raise ValueError(f"The prompt's last message has role {last_role!r}; {method} prompts end with a 'user', "
                         "'tool' or 'assistant' message.")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=last_role != "assistant",
                                                continue_final_message=last_role == "assistant")
    full = {side: tokenizer.apply_chat_template(prompt + list(row[side]), tokenize=False)
            for side in ("chosen", "rejected")}
    for text in full.values():  # some templates add text to the generation prompt only (DeepSeek-R1)
        prompt_text = prompt_text[:common_prefix_length(prompt_text, text)]
    return {"prompt": prompt_text, **{side: text[len(prompt_text):] for side, text in full.items()}}


def _tokenize_pairs_batch(batch: dict[str, list], *, tokenizer, implicit: bool, conversational: bool,
                          method: str) -> dict[str, list]:
    """`tokenize_pair_with_special_tokens` over a batch of rows (`datasets.Dataset.map(batched=True)`)."""
    out: dict[str, list] = {"chosen_prompt_ids": [], "chosen_ids": [], "rejected_prompt_ids": [], "rejected_ids": []}
    for values in zip(*batch.values(), strict=True):
        row = dict(zip(batch, values, strict=True))
        if implicit:
            row = extract_prompt(row)
        if conversational:
            row = render_preference_chat(tokenizer, row, method=method)
        pair = tokenize_pair_with_special_tokens(tokenizer, row["prompt"], row["chosen"], row["rejected"])
        for key, ids in pair.items():
            out[key].append(ids)
    return out


def tokenize_pair_with_special_tokens(tokenizer, prompt: str, chosen: str, rejected: str) -> dict[str, list[int]]:
    """`{"chosen_prompt_ids", "chosen_ids", "rejected_prompt_ids", "rejected_ids"}` as TRL's CPO/ORPO tokenize a
    pair: each completion is what prompt + completion tokenizes to beyond the prompt's own tokens (one token earlier
    when the tokenizer merged the prompt's last token into the completion); BOS starts each prompt, EOS ends each
    completion (added when missing)."""
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])
    prompt_ids = encode(prompt)
    sides = {}
    for side, completion in (("chosen", chosen), ("rejected", rejected)):
        full = encode(prompt + completion)
        start = len(prompt_ids)
        if full[:start] != prompt_ids:
            start -= 1
        sides[side] = [full[:start], full[start:]]
    (chosen_prompt, _), (rejected_prompt, _) = sides["chosen"], sides["rejected"]
    if abs(len(chosen_prompt) - len(rejected_prompt)) > 1 or sum(
            a != b for a, b in zip(chosen_prompt, rejected_prompt, strict=False)) > 1:
        raise ValueError(f"The prompt {prompt!r} tokenizes differently before its chosen and its rejected completion "
                         "by more than the last token: check the tokenizer.")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for side in sides.values():
        if bos is not None and (not side[0] or side[0][0] != bos):
            side[0] = [bos] + side[0]
        if eos is not None and (not side[1] or side[1][-1] != eos):
            side[1] = side[1] + [eos]
    return {"chosen_prompt_ids": sides["chosen"][0], "chosen_ids": sides["chosen"][1],
            "rejected_prompt_ids": sides["rejected"][0], "rejected_ids": sides["rejected"][1]}


def collate_pairs(examples: Sequence[dict], *, accumulation_steps: int, buckets: Sequence[int],
                  pad_token_id: int = 0, longest: int | None = None,
                  sides: Sequence[str] = ("chosen", "rejected")) -> dict[str, np.ndarray]:
    """A step's preference pairs (`{side}_input_ids`, `{side}_completion_mask` for each of `sides`) -> `input_ids`,
    `attention_mask`, `completion_mask` `[accumulation_steps, micro_batch, len(sides), length]` (rows in the order of
    `sides`: chosen, rejected, ...), right-padded to the smallest length bucket that fits the longest sequence.
    `longest`: the longest sequence of the whole global batch, when `examples` hold only some of its rows (several
    processes)."""
    longest = max(longest or 0, *(len(e[f"{side}_input_ids"]) for e in examples for side in sides))
    length = bucket_length(longest, buckets)

    def stacked(rows_of, pad_value):  # [n, sides, length]
        return np.stack([pad_rows([rows_of(e, side) for e in examples], length, pad_value) for side in sides],
                        axis=1)

    batch = {
        "input_ids": stacked(lambda e, side: e[f"{side}_input_ids"], pad_token_id),
        "attention_mask": stacked(lambda e, side: np.ones(len(e[f"{side}_input_ids"]), np.int32), 0),
        "completion_mask": stacked(lambda e, side: e[f"{side}_completion_mask"], 0),
    }
    micro = len(examples) // accumulation_steps
    return {k: v.reshape(accumulation_steps, micro, len(sides), length) for k, v in batch.items()}
