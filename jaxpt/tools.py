"""Tool-using, multi-turn rollouts for GRPO and RLOO (TRL's `tools` and `environment_factory`).

```python
def multiply(a: int, b: int) -> int:
    return a * b

jaxpt.grpo.train(model, tokenizer, prompts, GRPOConfig(..., max_tool_calling_iterations=4),
                 reward_funcs=[...], tools=[multiply])
```

A rollout then runs in turns. The in-process sampler (`jaxpt.sampling.generate`) stops a completion at the end of a
tool call (`ToolFormat.call_end`: a stop token when it is one token, else the completion is cut just after it); the
call's body is parsed (`ToolFormat.parse_call`: JSON `{"name": ..., "arguments": {...}}` by default), the tool runs
(a plain Python callable), its result is rendered with `ToolFormat.response_template`, tokenized and appended, and
generation continues after it, each row up to its remaining `max_completion_length` budget, until no row calls a
tool or `max_tool_calling_iterations` rounds of calls have run (TRL's name; None: only the length budget limits
them). Each continuation prefills the whole sequence so far again (no cache is carried between turns): simple,
and one extra compilation, since continuation prompts always have the one width `prompt + max_completion_length`.

What TRL does, jaxpt does too:
- the tool-result tokens stay in the sequence (the model attends to them; old and reference log-probs come from
  the forward pass over the final sequence, so they align with it token for token) but not in the loss:
  `completion_mask` is 0 on them, and the rollout's `tool_mask` marks them (0 on tool results, 1 elsewhere);
- a call to an unknown tool, a body that does not parse, or a tool that raises gives an error result the model
  reads (`{"error": ...}`) and counts as a failure, never a crash;
- a tool result that would push the completion past `max_completion_length` is dropped and the completion ends;
- metrics `tools/call_frequency` (calls per completion) and `tools/failure_frequency` (failed calls / calls);
- completion lengths (`completions/*`) count the model's tokens only.

`environment_factory`: a callable returning an environment object; every completion gets its own instance (pooled
and reused across rollouts), whose `reset(**row)` is called with the prompt's dataset row before sampling, and
whose public methods (other than `reset` and `get_reward`) are tools of that completion, next to the plain `tools`.
Or, as TRL's, a dict `{name: factory}`: each dataset row's `environment` column names its environment (checked
before training; that column is not passed to `reset`), so one run mixes tasks, each row seeing only its own
environment's tools. An environment with a `get_reward()` method owns a reward: it is scored once per completion,
after the last turn, as an extra reward function named after its class (weight 1; one per class, None, so
ignored, for rows of other environments). Reward functions get the environments as the keyword
`environments`. Unlike TRL, a string returned by `reset` is not appended to the prompt: jaxpt raises instead
(put the observation in the dataset's prompt).

Several calls per turn, as TRL: a call body may hold several calls (`parse_call` returns a list: a JSON array,
or `[f(1), g(2)]`), and with `ToolFormat(parallel_calls=True)` a turn runs to EOS and may hold several call blocks
(a chat model's `<tool_call>...</tool_call><tool_call>...</tool_call><|im_end|>`). All run in order, each counts
in the metrics, and their results follow the turn in order; when they do not all fit, none is appended.
On several processes every process runs every call of the rollout (it holds the whole rollout), so tools must be
deterministic.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["ToolCall", "ToolFormat", "Toolbox", "ToolRollout", "find_tool_call", "find_tool_calls",
           "parse_function_call",
           "parse_json_call", "run_tool_turns", "tool_metrics"]


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One parsed call: the tool's name and its arguments (keywords, and positional ones for `name(a, b)`)."""

    name: str
    arguments: dict[str, Any]
    positional: tuple = ()


def parse_json_call(body: str) -> ToolCall | list[ToolCall]:
    """`{"name": "multiply", "arguments": {"a": 3, "b": 4}}` (Hermes / Qwen's `<tool_call>` body; `arguments` may
    also be a JSON string, as OpenAI's), or a JSON array of such objects (several calls in one body, as Mistral's
    `[TOOL_CALLS]`), which gives a list. Raises ValueError when the body is neither."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError as error:
        raise ValueError(f"tool call is not valid JSON ({error.msg}): {body!r}") from None
    if isinstance(call, list):
        if not call:
            raise ValueError(f"tool call is an empty JSON array: {body!r}")
        return [_json_call(item, body) for item in call]
    return _json_call(call, body)


def _json_call(call, body: str) -> ToolCall:
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ValueError(f'tool call must be a JSON object with a string "name": {body!r}')
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            raise ValueError(f"tool call arguments are not valid JSON ({error.msg}): {arguments!r}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f'tool call "arguments" must be a JSON object: {body!r}')
    return ToolCall(call["name"], arguments)


def parse_function_call(body: str) -> ToolCall | list[ToolCall]:
    """`multiply(3, b=4)`: a Python call whose arguments are literals (read with `ast.literal_eval`, never
    executed), or a list of such calls, `[multiply(3, 4), add(a=1, b=2)]` (Llama 3.2's pythonic form: several calls
    in one body), which gives a list. Raises ValueError otherwise."""
    try:
        tree = ast.parse(body.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError(f"tool call is not of the form name(arguments): {body!r}") from None
    if isinstance(tree, ast.List):
        if not tree.elts:
            raise ValueError(f"tool call is an empty list: {body!r}")
        return [_function_call(element, body) for element in tree.elts]
    return _function_call(tree, body)


def _function_call(tree: ast.expr, body: str) -> ToolCall:
    if not isinstance(tree, ast.Call) or not isinstance(tree.func, ast.Name):
        raise ValueError(f"tool call is not of the form name(arguments): {body!r}")
    try:
        positional = tuple(ast.literal_eval(arg) for arg in tree.args)
        keywords = {kw.arg: ast.literal_eval(kw.value) for kw in tree.keywords if kw.arg is not None}
    except ValueError:
        raise ValueError(f"tool call arguments must be literals (numbers, strings, lists ...): {body!r}") from None
    if len(keywords) != len(tree.keywords):
        raise ValueError(f"tool call cannot unpack **arguments: {body!r}")
    return ToolCall(tree.func.id, keywords, positional)


@dataclasses.dataclass(frozen=True)
class ToolFormat:
    """How calls and results look in the token stream. The defaults are Hermes / Qwen's (`<tool_call>` JSON
    `</tool_call>`); pick markers that are single tokens of your tokenizer when you can (the sampler then stops on
    the end marker itself instead of being cut after it). `response_template` formats a result with `{name}` (the
    tool's name) and `{content}` (the result: a string as is, anything else as JSON); for a chat model, make it the
    chat template's text between an assistant turn that ends in a call and the next assistant turn.

    `parse_call` returns a ToolCall, or a list of them for a body holding several calls. `parallel_calls`: False
    (default), the sampler stops at the first complete call block, so a turn has one block; True, a turn runs until
    EOS (a chat model's end-of-turn token, e.g. Qwen's `<|im_end|>`), as TRL's turns do, and every call block in it
    runs, in order: that is how a chat model writes several `<tool_call>` blocks in one turn. Either way, all the
    calls of a turn run in order and their results (each rendered with `response_template`) follow the turn in that
    order; the EOS ending a turn with calls stays in the completion (the model's token, in the loss)."""

    call_start: str = "<tool_call>"
    call_end: str = "</tool_call>"
    response_template: str = "<tool_response>\n{content}\n</tool_response>\n"
    parse_call: Callable[[str], ToolCall | list[ToolCall]] = parse_json_call
    parallel_calls: bool = False

    def __post_init__(self):
        if not self.call_start or not self.call_end:
            raise ValueError(f"ToolFormat call_start={self.call_start!r} and call_end={self.call_end!r} must be "
                             "non-empty strings.")
        if "{content}" not in self.response_template:
            raise ValueError(f"ToolFormat response_template={self.response_template!r} must contain '{{content}}', "
                             "where the tool's result goes.")
        if not callable(self.parse_call):
            raise ValueError(f"ToolFormat parse_call={self.parse_call!r} must be callable (body -> ToolCall), e.g. "
                             "jaxpt.tools.parse_json_call.")
        if not isinstance(self.parallel_calls, bool):
            raise ValueError(f"ToolFormat parallel_calls={self.parallel_calls!r} must be True (a turn runs to EOS and "
                             "all its call blocks run) or False (the sampler stops at the first call block).")


def find_tool_call(text: str, tool_format: ToolFormat) -> tuple[str, int] | None:
    """The first complete call in `text`: `(body, end)`, where `end` is the index just after `call_end`; None
    when there is none."""
    start = text.find(tool_format.call_start)
    if start < 0:
        return None
    body_start = start + len(tool_format.call_start)
    end = text.find(tool_format.call_end, body_start)
    if end < 0:
        return None
    return text[body_start:end], end + len(tool_format.call_end)


def find_tool_calls(text: str, tool_format: ToolFormat) -> list[str]:
    """The bodies of every complete call in `text`, in order (an unfinished last one is left out)."""
    bodies = []
    while (found := find_tool_call(text, tool_format)) is not None:
        bodies.append(found[0])
        text = text[found[1]:]
    return bodies


def _tool_name(tool: Callable) -> str:
    return getattr(tool, "__name__", type(tool).__name__)


def _environment_tools(environment) -> dict[str, Callable]:
    """An environment's public methods, bar `reset` and `get_reward` (listed on the class: properties of the
    instance are not evaluated)."""
    return {name: getattr(environment, name) for name, _ in inspect.getmembers(type(environment), inspect.isfunction)
            if name not in ("reset", "get_reward") and not name.startswith("_")}


class Toolbox:
    """The tools of a run, checked once: plain `tools` (callables, named by `__name__`), an optional
    `environment_factory` (a callable, or TRL's dict `{name: callable}`), how calls look (`tool_format`) and the
    round limit (`max_tool_calling_iterations`)."""

    def __init__(self, tools: Sequence[Callable] | None = None, *,
                 environment_factory: Callable | dict[str, Callable] | None = None,
                 tool_format: ToolFormat | None = None, max_tool_calling_iterations: int | None = None):
        tools = list(tools or [])
        self.tools: dict[str, Callable] = {}
        for index, tool in enumerate(tools):
            if not callable(tool):
                raise ValueError(f"tools[{index}]={tool!r} is not callable: tools are Python functions (or callable "
                                 "objects) the model calls by name.")
            name = _tool_name(tool)
            if name in self.tools:
                raise ValueError(f"tools has two tools named {name!r}: the model calls tools by name, so names must "
                                 "be unique.")
            self.tools[name] = tool
        factories = _environment_factories(environment_factory)
        if max_tool_calling_iterations is not None and (isinstance(max_tool_calling_iterations, bool) or not isinstance(
                max_tool_calling_iterations, int) or max_tool_calling_iterations < 0):
            raise ValueError(f"max_tool_calling_iterations={max_tool_calling_iterations!r} must be None (no limit) or "
                             "an integer >= 0.")
        if tool_format is not None and not isinstance(tool_format, ToolFormat):
            raise ValueError(f"tool_format={tool_format!r} must be a jaxpt.tools.ToolFormat.")
        self.environment_factory = environment_factory
        self.tool_format = tool_format or ToolFormat()
        self.max_tool_calling_iterations = max_tool_calling_iterations
        self.environment_factories = factories  # {name: factory}; one unnamed (None) for a single factory
        self._pools: dict[str | None, list] = {}
        self.environment_rewards: list[Callable] = []  # one per environment class with get_reward (TRL)
        for name, factory in (factories or {}).items():
            probe = factory()
            where = "environment_factory" if name is None else f"environment_factory[{name!r}]"
            if isinstance(probe, dict):
                raise ValueError(f"{where} returned a dict ({probe!r}); it must return an environment instance (an "
                                 "object with reset() whose methods are the tools). For several environments, pass "
                                 "the dict itself: environment_factory={name: factory}, with an `environment` "
                                 "column naming each row's environment.")
            if not callable(getattr(probe, "reset", None)):
                raise ValueError(f"{where} returned a {type(probe).__name__}, which has no callable reset(): every "
                                 "environment needs reset(**row) (called before each rollout).")
            clashes = sorted(set(_environment_tools(probe)) & set(self.tools))
            if clashes:
                raise ValueError(f"The methods {clashes} of {where}'s environment have the names of tools in `tools`: "
                                 "rename one of them (the model calls tools by name).")
            self._pools[name] = [probe]  # the probe is the pool's first instance
            reward_types = [getattr(reward, "environment_type", None) for reward in self.environment_rewards]
            if callable(getattr(probe, "get_reward", None)) and type(probe) not in reward_types:
                self.environment_rewards.append(_environment_reward_function(type(probe)))
        if not self.tools and environment_factory is None:
            raise ValueError("A Toolbox needs tools or an environment_factory.")

    @property
    def multi_environment(self) -> bool:
        """A dict `environment_factory`: each row's `environment` column picks its environment (TRL)."""
        return self.environment_factories is not None and None not in self.environment_factories

    def check_rows(self, rows: Sequence[dict], *, where: str = "the prompts") -> None:
        """With a dict `environment_factory`, every row (dataset columns) names a known environment in its
        `environment` column. Raises ValueError otherwise; nothing to check for a single factory."""
        if not self.multi_environment:
            return
        for index, row in enumerate(rows):
            if row.get("environment") not in self.environment_factories:
                raise ValueError(f"Row {index} of {where} has environment={row.get('environment')!r}: with a dict "
                                 "environment_factory every row needs an `environment` column naming one of "
                                 f"{sorted(self.environment_factories)}.")

    def environments(self, rows: Sequence[dict]) -> list | None:
        """One reset environment per completion (`rows`: the dataset row of each), or None without a factory. With a
        dict factory each row's `environment` picks the pool, and is not passed to `reset` (TRL)."""
        if self.environment_factories is None:
            return None
        self.check_rows(rows)
        environments = []
        handed_out: dict[str | None, int] = {}  # instances of each pool given to this rollout so far
        for row in rows:
            name = row["environment"] if self.multi_environment else None
            pool, index = self._pools[name], handed_out.get(name, 0)
            if index == len(pool):
                pool.append(self.environment_factories[name]())
            handed_out[name] = index + 1
            environment = pool[index]
            arguments = {k: v for k, v in row.items() if k != "environment"} if self.multi_environment else row
            observation = environment.reset(**arguments)
            if observation is not None:
                raise ValueError(f"{type(environment).__name__}.reset returned {observation!r}: jaxpt does not append "
                                 "observations to the prompt (TRL does); put that text in the dataset's prompt and "
                                 "return None.")
            environments.append(environment)
        return environments

    def tools_for(self, environment) -> dict[str, Callable]:
        return self.tools if environment is None else {**self.tools, **_environment_tools(environment)}

    def calls(self, body: str, tools: dict[str, Callable]) -> list[tuple[str, Any, bool]]:
        """Run the calls in `body` (one, or several when `parse_call` returns a list), in order: one
        `(tool name, result, failed)` each. A body that does not parse is one failed call; an unknown name or a tool
        that raises gives `{"error": ...}` and failed=True."""
        try:
            parsed = self.tool_format.parse_call(body)
        except Exception as error:  # the model wrote it: its mistakes are results, not crashes
            return [("unknown", {"error": str(error)}, True)]
        parsed = parsed if isinstance(parsed, list | tuple) else [parsed]
        for call in parsed:
            if not isinstance(call, ToolCall):  # the parser is the user's code: a wrong type is a bug, not a result
                raise ValueError(f"ToolFormat parse_call={self.tool_format.parse_call!r} returned {call!r} for "
                                 f"{body!r}: it must return a jaxpt.tools.ToolCall or a list of them.")
        return [self._run(call, tools) for call in parsed]

    @staticmethod
    def _run(call: ToolCall, tools: dict[str, Callable]) -> tuple[str, Any, bool]:
        if call.name not in tools:
            return call.name, {"error": f"Tool {call.name!r} not found; the tools are {sorted(tools)}."}, True
        try:
            return call.name, tools[call.name](*call.positional, **call.arguments), False
        except Exception as error:
            return call.name, {"error": f"{type(error).__name__}: {error}"}, True

    @staticmethod
    def content(result: Any) -> str:
        """A result as text: a string as is, anything else as JSON."""
        return result if isinstance(result, str) else json.dumps(result, default=str)


def _environment_factories(environment_factory) -> dict | None:
    """`environment_factory` as `{name: factory}` (None: the single factory's key), checked."""
    if environment_factory is None:
        return None
    if isinstance(environment_factory, dict):
        if not environment_factory:
            raise ValueError("environment_factory={} is empty: pass {name: factory, ...} with at least one "
                             "environment, a single factory, or None.")
        for name, factory in environment_factory.items():
            if not isinstance(name, str) or not callable(factory):
                raise ValueError(f"environment_factory has {name!r}: {factory!r}; a dict environment_factory maps "
                                 "environment names (strings, the values of the `environment` column) to callables "
                                 "returning a new environment.")
        return dict(environment_factory)
    if not callable(environment_factory):
        raise ValueError(f"environment_factory={environment_factory!r} must be callable (it returns a new "
                         "environment instance) or a dict {name: such a callable}.")
    return {None: environment_factory}


def _environment_reward_function(environment_type: type) -> Callable:
    """The reward an environment class owns (`get_reward`), named after it; None for rows whose environment is
    another class (NaN: ignored), as TRL's, so environments with and without rewards mix."""

    def reward(environments, **kwargs):
        return [environment.get_reward() if type(environment) is environment_type else None
                for environment in environments]

    reward.__name__ = environment_type.__name__
    reward.environment_type = environment_type
    return reward


@dataclasses.dataclass
class ToolRollout:
    """What `run_tool_turns` returns: numpy arrays `[n, max_new_tokens]` (`completion_ids`, `sampler_logps` 0 on
    tool results, `attention_mask` 1 on every token of the completion, `tool_mask` 0 on tool-result tokens) and
    `[n]` (`lengths` all tokens, `finished` ended with EOS), the completions as text segments, and the counts."""

    completion_ids: np.ndarray
    sampler_logps: np.ndarray
    attention_mask: np.ndarray
    tool_mask: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray
    segments: list[list[dict]]  # per completion: {"role": "assistant" | "tool", "content", "text" (, "name")}
    tool_call_count: int
    tool_failure_count: int


def run_tool_turns(generate_fn: Callable, prompt_ids: np.ndarray, prompt_mask: np.ndarray, *, key: jax.Array,
                   toolbox: Toolbox, tokenizer, max_new_tokens: int, eos_token_ids: Sequence[int],
                   pad_token_id: int, num_return_sequences: int, environments: Sequence | None = None) -> ToolRollout:
    """Multi-turn sampling. `generate_fn(prompt_ids, prompt_mask, *, key, max_new_tokens, eos_token_ids,
    num_return_sequences, max_new_tokens_per_row)` is `jaxpt.sampling.generate` with the parameters and sampling
    options bound, returning host numpy arrays (`completion_ids`, `completion_logps`, `lengths`). Prompts are the
    unique left-padded prompts `[p, width]`; completions come `num_return_sequences` per prompt, grouped."""
    tool_format = toolbox.tool_format
    eos = [int(i) for i in eos_token_ids]
    end_ids = tokenizer.encode(tool_format.call_end, add_special_tokens=False)
    stops_at_call = not tool_format.parallel_calls and len(end_ids) == 1
    stop_ids = eos + ([end_ids[0]] if stops_at_call else [])
    group = num_return_sequences
    real_prompts = [row[mask.astype(bool)].tolist() for row, mask in zip(prompt_ids, prompt_mask, strict=True)]
    rows = len(real_prompts) * group
    tokens = [[] for _ in range(rows)]
    logps = [[] for _ in range(rows)]
    is_model = [[] for _ in range(rows)]
    segments = [[] for _ in range(rows)]
    calls = failures = 0

    out = generate_fn(prompt_ids, prompt_mask, key=key, max_new_tokens=max_new_tokens, eos_token_ids=stop_ids,
                      num_return_sequences=group, max_new_tokens_per_row=None)
    active = list(range(rows))
    rounds = 0
    while True:
        pending = []  # (row, the turn's call bodies)
        for row in active:
            new = out["completion_ids"][row, :int(out["lengths"][row])].tolist()
            new_logps = out["completion_logps"][row, :len(new)].tolist()
            if tool_format.parallel_calls:  # the whole turn, to EOS; a turn cut by the budget has no room left
                bodies = find_tool_calls(tokenizer.decode(new), tool_format) if new and new[-1] in eos else []
                cut = (len(new), bodies) if bodies else None
            else:
                cut = _cut_at_call(new, tokenizer, tool_format)
                if cut is not None:
                    new, new_logps = new[:cut[0]], new_logps[:cut[0]]
                    cut = (cut[0], [cut[1]])
            tokens[row] += new
            logps[row] += new_logps
            is_model[row] += [1] * len(new)
            if new:
                text = tokenizer.decode([t for t in new if t not in eos])
                segments[row].append({"role": "assistant", "content": text, "text": text})
            if cut is not None:
                pending.append((row, cut[1]))
        limit = toolbox.max_tool_calling_iterations
        if not pending or (limit is not None and rounds >= limit):
            break
        continuing = []
        for row, bodies in pending:
            environment = environments[row] if environments is not None else None
            tools = toolbox.tools_for(environment)
            results = [result for body in bodies for result in toolbox.calls(body, tools)]  # in order (TRL)
            calls += len(results)
            failures += sum(failed for _, _, failed in results)
            messages = []
            for name, result, _ in results:
                content = toolbox.content(result)
                messages.append({"role": "tool", "name": name, "content": content,
                                 "text": tool_format.response_template.format(name=name, content=content)})
            response = tokenizer.encode("".join(m["text"] for m in messages), add_special_tokens=False)
            if len(tokens[row]) + len(response) >= max_new_tokens:
                continue  # no room for the results and a reply: the completion ends with its calls (TRL drops all)
            tokens[row] += response
            logps[row] += [0.0] * len(response)
            is_model[row] += [0] * len(response)
            segments[row] += messages
            continuing.append(row)
        if not continuing:
            break
        rounds += 1
        # Every row goes in (a fixed batch, one compiled shape); rows not continuing get a limit of 0 tokens.
        width = prompt_ids.shape[1] + max_new_tokens
        sequences = [real_prompts[row // group] + tokens[row] for row in range(rows)]
        next_ids = np.full((rows, width), pad_token_id, np.int32)
        next_mask = np.zeros((rows, width), np.int32)
        for row, sequence in enumerate(sequences):
            next_ids[row, width - len(sequence):] = sequence
            next_mask[row, width - len(sequence):] = 1
        limits = np.zeros(rows, np.int32)
        for row in continuing:
            limits[row] = max_new_tokens - len(tokens[row])
        out = generate_fn(next_ids, next_mask, key=jax.random.fold_in(key, rounds), max_new_tokens=max_new_tokens,
                          eos_token_ids=stop_ids, num_return_sequences=1, max_new_tokens_per_row=limits)
        active = continuing

    completion_ids = np.full((rows, max_new_tokens), pad_token_id, np.int32)
    sampler_logps = np.zeros((rows, max_new_tokens), np.float32)
    attention_mask = np.zeros((rows, max_new_tokens), np.int32)
    tool_mask = np.ones((rows, max_new_tokens), np.int32)  # 1 on padding, as TRL's
    for row in range(rows):
        length = len(tokens[row])
        completion_ids[row, :length] = tokens[row]
        sampler_logps[row, :length] = logps[row]
        attention_mask[row, :length] = 1
        tool_mask[row, :length] = is_model[row]
    lengths = attention_mask.sum(1).astype(np.int32)
    finished = np.asarray([bool(t) and t[-1] in eos for t in tokens])
    return ToolRollout(completion_ids, sampler_logps, attention_mask, tool_mask, lengths, finished, segments, calls,
                       failures)


def _cut_at_call(tokens: list[int], tokenizer, tool_format: ToolFormat) -> tuple[int, str] | None:
    """`(k, body)`: the shortest prefix `tokens[:k]` holding a complete call, and the call's body; None when
    `tokens` hold none. Special tokens are kept when decoding: markers are often special tokens."""
    found = find_tool_call(tokenizer.decode(tokens), tool_format)
    if found is None:
        return None
    low, high = 1, len(tokens)  # the predicate "tokens[:k] hold a complete call" is monotone in k
    while low < high:
        middle = (low + high) // 2
        if find_tool_call(tokenizer.decode(tokens[:middle]), tool_format) is None:
            low = middle + 1
        else:
            high = middle
    return low, found[0]


def completion_text(segments: list[dict], *, conversational: bool):
    """A tool rollout's completion as the reward functions get it: the whole text (calls and results inline), or
    for conversational prompts the messages (assistant turns and `{"role": "tool", ...}` results)."""
    if conversational:
        messages = [{k: v for k, v in message.items() if k != "text"} for message in segments]
        return messages or [{"role": "assistant", "content": ""}]
    return "".join(message["text"] for message in segments)


def tool_metrics(tool_call_count: int, tool_failure_count: int, num_completions: int) -> dict[str, float]:
    """TRL's `tools/call_frequency` (calls per completion) and `tools/failure_frequency` (failed / all calls)."""
    return {"tools/call_frequency": tool_call_count / max(num_completions, 1),
            "tools/failure_frequency": tool_failure_count / tool_call_count if tool_call_count else 0.0}
