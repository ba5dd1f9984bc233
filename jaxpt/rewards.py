"""Ready reward functions for GRPO / RLOO, with TRL's calling convention.

A reward function is any Python callable called with keywords,

    reward_func(prompts=..., completions=..., completion_ids=..., **dataset_columns) -> list[float | None]

returning one reward per completion (`None`: this function does not score that completion). Completions are
strings for standard data and `[{"role": "assistant", "content": ...}]` for conversational data. Extra dataset
columns (e.g. `solution`) arrive as lists aligned with the completions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_THINK_FORMAT = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL | re.MULTILINE)


def completion_text(completion) -> str:
    """The text of a completion: the string itself, or the content of its last message."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: the last `\\boxed{...}`, else the last number, else the stripped text."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    text = text.strip()
    return text or None


def _same_answer(predicted: str | None, gold: str) -> bool:
    if predicted is None:
        return False
    try:
        return abs(float(predicted) - float(gold)) < 1e-9
    except ValueError:
        return predicted.strip() == gold.strip()


def accuracy_reward(completions: Sequence, solution: Sequence[str | None], **kwargs) -> list[float | None]:
    """1.0 when the completion's final answer (last `\\boxed{}` or last number) equals the `solution` column
    (numerically when both are numbers), else 0.0; `None` when the solution is missing. Exact matching, no
    symbolic math (TRL's `accuracy_reward` uses math_verify)."""
    rewards = []
    for completion, gold in zip(completions, solution, strict=True):
        if gold is None or str(gold).strip() == "":
            rewards.append(None)
            continue
        boxed = _BOXED.findall(str(gold))
        gold = boxed[-1].strip() if boxed else str(gold).strip()
        rewards.append(1.0 if _same_answer(extract_answer(completion_text(completion)), gold) else 0.0)
    return rewards


def exact_match_reward(completions: Sequence, solution: Sequence[str | None], **kwargs) -> list[float | None]:
    """1.0 when the completion text, stripped, equals the `solution` column, stripped (no answer extraction)."""
    return [None if gold is None else float(completion_text(c).strip() == str(gold).strip())
            for c, gold in zip(completions, solution, strict=True)]


def think_format_reward(completions: Sequence, **kwargs) -> list[float]:
    """1.0 when the completion is `<think>...</think>` (one think block, at the start) followed by the answer."""
    return [1.0 if _THINK_FORMAT.match(completion_text(c)) else 0.0 for c in completions]


def format_reward(pattern: str, *, name: str = "format_reward") -> Callable:
    """A reward function giving 1.0 to completions that fully match the regular expression `pattern`."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(completions: Sequence, **kwargs) -> list[float]:
        return [1.0 if compiled.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]

    reward.__name__ = name
    return reward


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> Callable:
    """DAPO's soft length penalty (Yu et al. 2025, Eq. 13): 0 up to `max - cache` tokens, then linearly down to
    -1 at `max_completion_len`, -1 beyond."""

    def soft_overlong_punishment_reward(completion_ids: Sequence[Sequence[int]], **kwargs) -> list[float]:
        rewards = []
        for ids in completion_ids:
            length = len(ids)
            if length <= max_completion_len - soft_punish_cache:
                rewards.append(0.0)
            elif length <= max_completion_len:
                rewards.append((max_completion_len - soft_punish_cache - length) / soft_punish_cache)
            else:
                rewards.append(-1.0)
        return rewards

    return soft_overlong_punishment_reward


REWARD_FUNCTIONS = {  # the names TRL's scripts accept, plus short aliases
    "accuracy_reward": accuracy_reward,
    "exact_match_reward": exact_match_reward,
    "think_format_reward": think_format_reward,
    "get_soft_overlong_punishment": get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256),
    "accuracy": accuracy_reward,
    "exact_match": exact_match_reward,
    "think_format": think_format_reward,
}


def resolve_reward_function(name_or_callable) -> Callable:
    """A reward function from a callable, a name in `REWARD_FUNCTIONS`, or an import path
    (`my_lib.rewards.custom_reward` or `my_lib.rewards:custom_reward`)."""
    if callable(name_or_callable):
        return name_or_callable
    name = str(name_or_callable)
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    separator = ":" if ":" in name else "."
    if separator in name:
        import importlib
        import os
        import sys

        module, attribute = name.rsplit(separator, 1)
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            return getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"Cannot import reward function {name!r}: {error}") from error
    raise ValueError(f"Unknown reward function {name!r}: use one of {sorted(REWARD_FUNCTIONS)} or an import path "
                     "like my_lib.rewards.custom_reward.")


def reward_function_name(function: Callable) -> str:
    return getattr(function, "__name__", type(function).__name__)


STANDARD_ARGUMENTS = ("prompts", "completions", "completion_ids")  # what every reward function is called with


def check_reward_functions(reward_funcs: Sequence[Callable], *, columns: Sequence[str]) -> None:
    """Before the first rollout: a `ValueError` naming the function and the argument when a reward function
    requires an argument (e.g. `solution`) that is neither a standard one (`prompts`, `completions`,
    `completion_ids`) nor a dataset column, or cannot take the keywords it will get (no `**kwargs`), instead of a
    `TypeError` after the first generation."""
    import inspect

    available = set(STANDARD_ARGUMENTS) | set(columns)
    for function in reward_funcs:
        try:
            parameters = list(inspect.signature(function).parameters.values())
        except (TypeError, ValueError):  # a builtin or C callable: nothing to inspect
            continue
        named = {p.name for p in parameters}
        unexpected = sorted(available - named)
        if unexpected and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            raise ValueError(f"Reward function {reward_function_name(function)!r} takes no **kwargs, but it is called "
                             f"with every standard argument and dataset column as a keyword, {unexpected} included "
                             "(TRL's convention): add **kwargs to its signature.")
        required = [p.name for p in parameters if p.default is inspect.Parameter.empty
                    and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        missing = [name for name in required if name not in available]
        if missing:
            raise ValueError(f"Reward function {reward_function_name(function)!r} needs the column(s) {missing}, "
                             f"which the dataset lacks (its columns: {sorted(columns)}; every function also gets "
                             f"{list(STANDARD_ARGUMENTS)}): add the column, or give the argument a default.")


def score_completions(reward_funcs: Sequence[Callable], *, prompts: Sequence, completions: Sequence,
                      completion_ids: Sequence[Sequence[int]], columns: dict[str, Sequence]) -> np.ndarray:
    """`[n, len(reward_funcs)]` float32 rewards, NaN where a function returned None (or NaN, as TRL). Raises,
    naming the function, if one fails on a missing column, returns the wrong number of rewards, a value that is
    not a number, or an infinite one."""
    rewards = np.full((len(completions), len(reward_funcs)), np.nan, np.float32)
    for index, function in enumerate(reward_funcs):
        name = reward_function_name(function)
        try:
            values = function(prompts=list(prompts), completions=list(completions),
                              completion_ids=[list(ids) for ids in completion_ids], **columns)
        except KeyError as error:
            raise ValueError(f"Reward function {name!r} looked up {error} and failed: it gets "
                             f"{list(STANDARD_ARGUMENTS)} and the dataset columns {sorted(columns)}.") from error
        try:
            count = len(values)
        except TypeError:
            raise ValueError(f"Reward function {name!r} returned {type(values).__name__} {values!r}; it must return "
                             "a list with one float (or None) per completion.") from None
        if count != len(completions):
            raise ValueError(f"Reward function {name!r} returned {count} rewards for {len(completions)} completions.")
        for row, value in enumerate(values):
            if value is None:
                continue
            try:
                rewards[row, index] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"Reward function {name!r} returned {value!r} for completion {row}; rewards are "
                                 "floats (or None: not scored).") from None
            if np.isinf(rewards[row, index]):
                raise ValueError(f"Reward function {name!r} returned {value!r} for completion {row}: an infinite "
                                 "reward makes every advantage of its group NaN. Return a finite float, or None "
                                 "(or NaN) for a completion it does not score.")
    return rewards


def model_reward(model, tokenizer, *, name: str = "reward_model", batch_size: int = 32) -> Callable:
    """A reward function scoring `prompt + completion` with a jaxpt sequence classifier (`num_labels=1`, e.g.
    trained with `jaxpt.reward`), using its own tokenizer and chat template for conversational data."""
    import jax
    from flax import nnx

    from jaxpt.data import bucket_length, length_buckets, pad_rows, tokenize

    graphdef, params = nnx.split(model, nnx.Param)
    score = jax.jit(lambda params, ids, mask: nnx.merge(graphdef, params)(ids, attention_mask=mask)[:, 0])

    def reward(prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        rows = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if isinstance(completion, str):
                rows.append(tokenize(tokenizer, prompt + completion)["input_ids"])
            else:
                rows.append(tokenize(tokenizer, list(prompt) + list(completion))["input_ids"])
        longest = max(len(r) for r in rows)
        length = bucket_length(longest, length_buckets(max(longest, 64)))
        scores = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape per length
            ids = pad_rows(chunk, length)
            mask = pad_rows([[1] * len(r) for r in chunk], length)
            scores.extend(np.asarray(score(params, ids, mask)).tolist())
        return scores[:len(rows)]

    reward.__name__ = name
    return reward
