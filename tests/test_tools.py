"""Tool-using multi-turn rollouts (jaxpt/tools.py): call parsing, the turn loop and its masks (with a scripted
sampler), the sampler's per-row limits, tool-result tokens out of the loss, and a calculator task where a tiny
policy learns by GRPO to call its tool."""

import random
import re

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpt.sampling
from jaxpt import grpo, rloo, sft
from jaxpt.losses.grpo import grpo_loss
from jaxpt.rollout import make_logps_fn
from jaxpt.tools import (
    Toolbox,
    ToolCall,
    ToolFormat,
    find_tool_call,
    find_tool_calls,
    parse_function_call,
    parse_json_call,
    run_tool_turns,
    tool_metrics,
)
from tests.helpers import char_tokenizer, tiny_llama

TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


def tool_tokenizer():
    """The character tokenizer plus the four tool markers as single tokens (as Qwen's tokenizer has them)."""
    tokenizer = char_tokenizer()
    tokenizer.add_tokens(TOOL_TOKENS, special_tokens=True)
    return tokenizer


TOKENIZER = tool_tokenizer()
EOS = TOKENIZER.eos_token_id
PAD = TOKENIZER.pad_token_id


def calculator(expression: str) -> str:
    """Multiplies: '7*8' -> '56'."""
    left, right = expression.split("*")
    return str(int(left) * int(right))


# The calculator task's compact call: the body is the expression itself (a user-supplied parser).
CALCULATOR_FORMAT = ToolFormat(response_template="<tool_response>{content}</tool_response>",
                               parse_call=lambda body: ToolCall("calculator", {"expression": body}))


def encode(text):
    return TOKENIZER.encode(text, add_special_tokens=False)


# --------------------------------------------------------------------------------------------------------------
# Parsing and the toolbox
# --------------------------------------------------------------------------------------------------------------


def test_parse_json_and_function_calls():
    assert parse_json_call('{"name": "add", "arguments": {"a": 1, "b": 2}}') == ToolCall("add", {"a": 1, "b": 2})
    assert parse_json_call('{"name": "add", "arguments": "{\\"a\\": 1}"}') == ToolCall("add", {"a": 1})
    assert parse_json_call('{"name": "now"}') == ToolCall("now", {})
    for bad, message in [("{oops", "not valid JSON"), ('{"arguments": {}}', 'string "name"'),
                         ('{"name": "f", "arguments": [1]}', '"arguments" must be a JSON object')]:
        with pytest.raises(ValueError, match=message):
            parse_json_call(bad)
    assert parse_function_call("add(1, b=[2, 'x'])") == ToolCall("add", {"b": [2, "x"]}, (1,))
    for bad in ["add(", "1 + 2", "add(open('f'))", "obj.add(1)"]:
        with pytest.raises(ValueError):
            parse_function_call(bad)


def test_find_tool_call_needs_both_markers():
    fmt = ToolFormat()
    assert find_tool_call('so <tool_call>{"name": "f"}</tool_call> then', fmt) == ('{"name": "f"}', 39)
    assert find_tool_call("<tool_call>unfinished", fmt) is None
    assert find_tool_call("no call </tool_call>", fmt) is None


def test_toolbox_fails_early_on_bad_tools_and_survives_bad_calls():
    with pytest.raises(ValueError, match=r"tools\[1\]=42 is not callable"):
        Toolbox([calculator, 42])
    with pytest.raises(ValueError, match="two tools named 'calculator'"):
        Toolbox([calculator, calculator])
    with pytest.raises(ValueError, match="max_tool_calling_iterations=-1"):
        Toolbox([calculator], max_tool_calling_iterations=-1)
    with pytest.raises(ValueError, match="needs tools or an environment_factory"):
        Toolbox([])
    with pytest.raises(ValueError, match="has no callable reset"):
        Toolbox(environment_factory=object)
    with pytest.raises(ValueError, match="must contain '{content}'"):
        ToolFormat(response_template="<r></r>")
    toolbox = Toolbox([calculator])
    tools = toolbox.tools_for(None)
    assert toolbox.calls('{"name": "calculator", "arguments": {"expression": "6*7"}}', tools) == [("calculator", "42",
                                                                                                    False)]
    [(name, result, failed)] = toolbox.calls('{"name": "search", "arguments": {}}', tools)  # unknown tool: a result
    assert (name, failed) == ("search", True) and "Tool 'search' not found" in result["error"]
    [(name, result, failed)] = toolbox.calls('{"name": "calculator", "arguments": {"expression": "6+7"}}', tools)
    assert failed and result == {"error": "ValueError: not enough values to unpack (expected 2, got 1)"}
    assert [failed for _, _, failed in toolbox.calls("{oops", tools)] == [True]
    assert tool_metrics(4, 1, 8) == {"tools/call_frequency": 0.5, "tools/failure_frequency": 0.25}
    assert tool_metrics(0, 0, 8)["tools/failure_frequency"] == 0.0


def test_grpo_and_rloo_check_tool_arguments(tmp_path):
    prompts = datasets.Dataset.from_list([{"prompt": "a"}] * 4)
    common = dict(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=4, max_steps=1,
                  mesh_fsdp=1, disable_tqdm=True, save_steps=0)
    with pytest.raises(ValueError, match="max_tool_calling_iterations=-1"):
        grpo.GRPOConfig(**common, max_tool_calling_iterations=-1)
    with pytest.raises(ValueError, match="are set but there are no tools"):
        grpo.train(None, TOKENIZER, prompts, grpo.GRPOConfig(**common,
                   max_tool_calling_iterations=2), reward_funcs=[lambda completions, **kw: [0.0] * len(completions)])
    with pytest.raises(ValueError, match=r"tools\[0\]='calculator' is not callable"):
        rloo.train(None, TOKENIZER, prompts, rloo.RLOOConfig(**common),
                   reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], tools=["calculator"])


# --------------------------------------------------------------------------------------------------------------
# The turn loop, with a scripted sampler
# --------------------------------------------------------------------------------------------------------------


class ScriptedSampler:
    """Stands in for `generate`: call i returns `script[i][row]` (text) for each row, cut at the row's limit, with
    log-prob -(position + 1) per token, and records what it was given."""

    def __init__(self, script, max_new_tokens):
        self.script, self.max_new_tokens, self.calls = script, max_new_tokens, []

    def __call__(self, prompt_ids, prompt_mask, *, key, max_new_tokens, eos_token_ids, num_return_sequences,
                 max_new_tokens_per_row):
        self.calls.append({"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "stop": list(eos_token_ids),
                           "limits": max_new_tokens_per_row, "repeats": num_return_sequences})
        texts = self.script[len(self.calls) - 1]
        ids = np.full((len(texts), max_new_tokens), PAD, np.int32)
        logps = np.zeros((len(texts), max_new_tokens), np.float32)
        lengths = np.zeros(len(texts), np.int32)
        for row, text in enumerate(texts):
            tokens = encode(text)[:max_new_tokens if max_new_tokens_per_row is None else max_new_tokens_per_row[row]]
            ids[row, :len(tokens)] = tokens
            logps[row, :len(tokens)] = -np.arange(1, len(tokens) + 1)
            lengths[row] = len(tokens)
        return {"completion_ids": ids, "completion_logps": logps, "lengths": lengths}


def test_turn_loop_appends_results_masks_them_and_continues_within_budget():
    max_new = 128
    prompt = encode("6*7=")
    script = [
        # turn 1: row 0 calls, row 1 answers at once, row 2 calls an unknown tool, row 3 calls with a result too long
        ["<tool_call>6*7</tool_call>", "41</s>", "<tool_call>x</tool_call>", "<tool_call>9*9</tool_call>"],
        # turn 2 (every row sampled, only rows 0 and 2 have a budget)
        ["42</s>", "", "??</s>", ""],
    ]
    sampler = ScriptedSampler(script, max_new)

    def parse(body):
        return ToolCall("calculator" if "*" in body else "search", {"expression": body})

    def long_calculator(expression):
        return calculator(expression) if expression != "9*9" else "8" * 130

    fmt = ToolFormat(response_template="<tool_response>{content}</tool_response>", parse_call=parse)
    toolbox = Toolbox([long_calculator], tool_format=fmt)
    toolbox.tools = {"calculator": long_calculator}
    out = run_tool_turns(sampler, np.asarray([prompt] * 2, np.int32), np.ones((2, 4), np.int32),
                         key=jax.random.key(0), toolbox=toolbox, tokenizer=TOKENIZER, max_new_tokens=max_new,
                         eos_token_ids=[EOS], pad_token_id=PAD, num_return_sequences=2)
    assert sampler.calls[0]["stop"] == [EOS, TOKENIZER.convert_tokens_to_ids("</tool_call>")]  # stops at a call
    assert sampler.calls[0]["repeats"] == 2 and sampler.calls[1]["repeats"] == 1
    call, result = encode("<tool_call>6*7</tool_call>"), encode("<tool_response>42</tool_response>")
    assert out.completion_ids[0, :out.lengths[0]].tolist() == call + result + encode("42</s>")
    assert out.tool_mask[0, :out.lengths[0]].tolist() == [1] * len(call) + [0] * len(result) + [1, 1, 1]
    assert out.attention_mask[0].sum() == out.lengths[0] and out.tool_mask[0, out.lengths[0]:].all()
    np.testing.assert_array_equal(out.sampler_logps[0, len(call):len(call) + len(result)], 0.0)
    assert out.sampler_logps[0, len(call) + len(result)] == -1.0  # the continuation's own log-probs follow
    assert out.completion_ids[1, :out.lengths[1]].tolist() == encode("41</s>") and out.tool_mask[1].all()
    error = '<tool_response>{"error": "Tool \'search\' not found; the tools are [\'calculator\']."}</tool_response>'
    assert TOKENIZER.decode(out.completion_ids[2, :out.lengths[2]]) == "<tool_call>x</tool_call>" + error + "??</s>"
    # row 3: the 130-token result does not fit in 128 tokens: dropped, the completion ends with its call, unfinished
    assert out.completion_ids[3, :out.lengths[3]].tolist() == encode("<tool_call>9*9</tool_call>")
    assert out.finished.tolist() == [True, True, True, False]
    assert (out.tool_call_count, out.tool_failure_count) == (3, 1)
    # the continuation: every row's whole sequence so far, left-padded to prompt + max_new_tokens, with its budget
    second = sampler.calls[1]
    assert second["prompt_ids"].shape == (4, 4 + max_new)
    row0 = second["prompt_ids"][0][second["prompt_mask"][0].astype(bool)].tolist()
    assert row0 == prompt + call + result
    assert second["limits"].tolist() == [max_new - len(call) - len(result), 0,
                                         max_new - len(encode("<tool_call>x</tool_call>")) - len(encode(error)), 0]
    assert [m["role"] for m in out.segments[0]] == ["assistant", "tool", "assistant"]
    assert out.segments[0][1] == {"role": "tool", "name": "calculator", "content": "42",
                                  "text": "<tool_response>42</tool_response>"}


def test_turn_loop_stops_at_the_round_limit_and_cuts_a_multi_token_end_marker():
    fmt = ToolFormat(call_start="[[", call_end="]]", response_template="={content};", parse_call=parse_function_call)
    script = [["[[calculator('2*3')]] and more text"], ["[[calculator('6*6')]]</s>"], ["never sampled"]]
    sampler = ScriptedSampler(script, 64)
    out = run_tool_turns(sampler, np.asarray([encode("q")], np.int32), np.ones((1, 1), np.int32),
                         key=jax.random.key(0), toolbox=Toolbox([calculator], tool_format=fmt,
                                                                max_tool_calling_iterations=1),
                         tokenizer=TOKENIZER, max_new_tokens=64, eos_token_ids=[EOS], pad_token_id=PAD,
                         num_return_sequences=1)
    assert sampler.calls[0]["stop"] == [EOS]  # "]]" is two tokens: cut after it instead
    # the text after the first call is dropped; the second round's call is not run (max_tool_calling_iterations=1)
    assert TOKENIZER.decode(out.completion_ids[0, :out.lengths[0]]) == "[[calculator('2*3')]]=6;[[calculator('6*6')]]"
    assert len(sampler.calls) == 2 and out.tool_call_count == 1 and not out.finished[0]


def test_several_calls_in_one_body_are_parsed_in_order():
    assert parse_json_call('[{"name": "add", "arguments": {"a": 1}}, {"name": "now"}]') == [
        ToolCall("add", {"a": 1}), ToolCall("now", {})]
    assert parse_function_call("[add(1, b=2), now()]") == [ToolCall("add", {"b": 2}, (1,)), ToolCall("now", {})]
    for bad in ["[]", '[{"name": "add"}, 3]']:
        with pytest.raises(ValueError):
            parse_json_call(bad)
    for bad in ["[]", "[add(1), 2]"]:
        with pytest.raises(ValueError):
            parse_function_call(bad)
    text = "<tool_call>a</tool_call> x <tool_call>b</tool_call><tool_call>c"
    assert find_tool_calls(text, ToolFormat()) == ["a", "b"]
    toolbox = Toolbox([calculator], tool_format=ToolFormat(parse_call=parse_function_call))
    assert toolbox.calls("[calculator('2*3'), search(1), calculator('4*5')]", toolbox.tools_for(None)) == [
        ("calculator", "6", False),
        ("search", {"error": "Tool 'search' not found; the tools are ['calculator']."}, True),
        ("calculator", "20", False)]
    with pytest.raises(ValueError, match="must be True .* or False"):
        ToolFormat(parallel_calls=1)
    wrong = Toolbox([calculator], tool_format=ToolFormat(parse_call=lambda body: ("calculator", {})))
    with pytest.raises(ValueError, match="must return a jaxpt.tools.ToolCall or a list of them"):
        wrong.calls("x", wrong.tools_for(None))


def test_turn_loop_runs_every_call_of_a_turn_in_order():
    """`parallel_calls=True`: a turn runs to EOS, all its call blocks run in order, their results follow it in
    order (all masked), each call counts in the metrics; results that do not all fit are all dropped."""
    fmt = ToolFormat(response_template="<tool_response>{content}</tool_response>", parallel_calls=True,
                     parse_call=lambda body: ToolCall("calculator" if "*" in body else "search", {"expression": body}))
    max_new = 96
    first_turn = "<tool_call>2*3</tool_call><tool_call>x</tool_call><tool_call>4*5</tool_call></s>"
    script = [[first_turn,                                  # three calls, one failing
               "<tool_call>7*7</tool_call>",                # no EOS: the turn was cut by the budget, no call runs
               "<tool_call>9*9</tool_call>ok</s>",          # one call, text after it kept (part of the turn)
               "<tool_call>3*3</tool_call><tool_call>8*8</tool_call></s>"],  # results too long together
              ["6 20</s>", "", "81</s>", ""]]
    sampler = ScriptedSampler(script, max_new)

    def calculator_or_long(expression):
        return "7" * 45 if expression in ("3*3", "8*8") else calculator(expression)

    toolbox = Toolbox([calculator_or_long], tool_format=fmt)
    toolbox.tools = {"calculator": calculator_or_long}
    out = run_tool_turns(sampler, np.asarray([encode("q"), encode("r")], np.int32), np.ones((2, 1), np.int32),
                         key=jax.random.key(0), toolbox=toolbox, tokenizer=TOKENIZER, max_new_tokens=max_new,
                         eos_token_ids=[EOS], pad_token_id=PAD, num_return_sequences=2)
    assert sampler.calls[0]["stop"] == [EOS]  # the sampler does not stop at a call: the turn runs to EOS
    error = '{"error": "Tool \'search\' not found; the tools are [\'calculator\']."}'
    results = "".join(f"<tool_response>{r}</tool_response>" for r in ["6", error, "20"])
    turn, answer = encode(first_turn), encode("6 20</s>")
    assert out.completion_ids[0, :out.lengths[0]].tolist() == turn + encode(results) + answer
    assert out.tool_mask[0, :out.lengths[0]].tolist() == [1] * len(turn) + [0] * len(encode(results)) + [1] * len(
        answer)
    np.testing.assert_array_equal(out.sampler_logps[0, len(turn):len(turn) + len(encode(results))], 0.0)
    assert [(m["role"], m.get("name"), m["content"]) for m in out.segments[0]] == [
        ("assistant", None, first_turn[:-4]), ("tool", "calculator", "6"), ("tool", "search", error),
        ("tool", "calculator", "20"), ("assistant", None, "6 20")]
    assert out.completion_ids[1, :out.lengths[1]].tolist() == encode("<tool_call>7*7</tool_call>")
    third = encode("<tool_call>9*9</tool_call>ok</s>") + encode("<tool_response>81</tool_response>")
    assert out.completion_ids[2, :out.lengths[2]].tolist() == third + encode("81</s>")
    # row 3: each 47-token result would fit alone, not both: both are dropped and the completion ends with its calls
    assert out.completion_ids[3, :out.lengths[3]].tolist() == encode(script[0][3])
    assert out.tool_mask[3].all() and out.tool_mask[1].all()
    assert (out.tool_call_count, out.tool_failure_count) == (6, 1)  # 3 + 0 + 1 + 2 (dropped ones count, as TRL's)
    assert tool_metrics(out.tool_call_count, out.tool_failure_count, 4) == {
        "tools/call_frequency": 1.5, "tools/failure_frequency": 1 / 6}
    assert sampler.calls[1]["limits"].tolist() == [max_new - len(turn) - len(encode(results)), 0,
                                                   max_new - len(third), 0]


def test_turn_loop_runs_a_list_of_calls_from_one_block():
    """The default format stops at the first call block; a block holding a list of calls runs them all."""
    fmt = ToolFormat(response_template="<tool_response>{content}</tool_response>", parse_call=parse_function_call)
    script = [["<tool_call>[calculator('2*3'), calculator('5*5')]</tool_call>"], ["31</s>"]]
    sampler = ScriptedSampler(script, 64)
    out = run_tool_turns(sampler, np.asarray([encode("q")], np.int32), np.ones((1, 1), np.int32),
                         key=jax.random.key(0), toolbox=Toolbox([calculator], tool_format=fmt), tokenizer=TOKENIZER,
                         max_new_tokens=64, eos_token_ids=[EOS], pad_token_id=PAD, num_return_sequences=1)
    call, results = encode(script[0][0]), encode("<tool_response>6</tool_response><tool_response>25</tool_response>")
    assert out.completion_ids[0, :out.lengths[0]].tolist() == call + results + encode("31</s>")
    assert out.tool_mask[0, :out.lengths[0]].tolist() == [1] * len(call) + [0] * len(results) + [1] * 3
    assert (out.tool_call_count, out.tool_failure_count) == (2, 0)


class MultiplyEnv:
    def reset(self, **row):
        self.row, self.results = row, []

    def calculator(self, expression: str) -> str:
        self.results.append(calculator(expression))
        return self.results[-1]

    def get_reward(self):
        return float(self.row["solution"] in self.results)


class EchoEnv:
    def reset(self, **row):
        self.row = row

    def echo(self, text: str) -> str:
        return text


def test_dict_environment_factory_routes_rows_to_their_environment():
    """TRL's dict `environment_factory`: each row's `environment` picks its environment (and only its tools), the
    column is not passed to `reset`, instances are pooled per environment, and `get_reward` is one reward per class
    (None for rows of other environments)."""
    toolbox = Toolbox(environment_factory={"multiply": MultiplyEnv, "echo": EchoEnv, "times": MultiplyEnv},
                      tool_format=ToolFormat(response_template="<tool_response>{content}</tool_response>"))
    assert toolbox.multi_environment and [f.__name__ for f in toolbox.environment_rewards] == ["MultiplyEnv"]
    rows = [{"prompt": "q", "environment": "multiply", "solution": "6"}] * 2 + [
        {"prompt": "r", "environment": "echo", "solution": "-"}] * 2
    environments = toolbox.environments(rows)
    assert [type(e) for e in environments] == [MultiplyEnv, MultiplyEnv, EchoEnv, EchoEnv]
    assert len({id(e) for e in environments}) == 4 and environments[0].row == {"prompt": "q", "solution": "6"}
    multiply = '<tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}</tool_call>'
    echo = '<tool_call>{"name": "echo", "arguments": {"text": "hi"}}</tool_call>'
    script = [[multiply, echo, echo, multiply], ["</s>"] * 4]
    out = run_tool_turns(ScriptedSampler(script, 128), np.asarray([encode("q"), encode("r")], np.int32),
                         np.ones((2, 1), np.int32), key=jax.random.key(0), toolbox=toolbox, tokenizer=TOKENIZER,
                         max_new_tokens=128, eos_token_ids=[EOS], pad_token_id=PAD, num_return_sequences=2,
                         environments=environments)
    assert [[m["content"] for m in segment if m["role"] == "tool"] for segment in out.segments] == [
        ["6"], ['{"error": "Tool \'echo\' not found; the tools are [\'calculator\']."}'], ["hi"],
        ['{"error": "Tool \'calculator\' not found; the tools are [\'echo\']."}']]
    assert (out.tool_call_count, out.tool_failure_count) == (4, 2)
    assert toolbox.environment_rewards[0](environments=environments) == [1.0, 0.0, None, None]
    # the pools are reused, and grow when a rollout needs more instances of one environment
    again = toolbox.environments([rows[0]] * 3 + [rows[2]])
    assert [id(e) for e in again[:2]] == [id(e) for e in environments[:2]] and again[3] is environments[2]
    assert again[2] not in environments and again[1].results == []  # reset
    with pytest.raises(ValueError, match=r"Row 1 of the prompts has environment='chess'.*\['echo', 'multiply', "
                                         r"'times'\]"):
        toolbox.environments([rows[0], {"prompt": "q", "environment": "chess"}])
    with pytest.raises(ValueError, match="Row 0 of the prompts has environment=None"):
        toolbox.check_rows([{"prompt": "q"}])
    Toolbox(environment_factory=MultiplyEnv).check_rows([{"prompt": "q"}])  # one factory: no column needed


def test_environment_factory_fails_early_on_what_trl_does_not_support(tmp_path):
    with pytest.raises(ValueError, match="environment_factory=42 must be callable .* or a dict"):
        Toolbox(environment_factory=42)
    with pytest.raises(ValueError, match="environment_factory={} is empty"):
        Toolbox(environment_factory={})
    with pytest.raises(ValueError, match="environment_factory has 'echo': 'EchoEnv'"):
        Toolbox(environment_factory={"echo": "EchoEnv"})
    with pytest.raises(ValueError, match="environment_factory has 1: "):
        Toolbox(environment_factory={1: EchoEnv})
    with pytest.raises(ValueError, match=r"environment_factory returned a dict .* pass the dict itself"):
        Toolbox(environment_factory=lambda: {"multiply": MultiplyEnv()})
    with pytest.raises(ValueError, match=r"environment_factory\['bad'\] returned a object, which has no callable"):
        Toolbox(environment_factory={"echo": EchoEnv, "bad": object})
    with pytest.raises(ValueError, match=r"The methods \['calculator'\] of environment_factory\['multiply'\]"):
        Toolbox([calculator], environment_factory={"multiply": MultiplyEnv})
    # before anything compiles or the model is used: a train row without a known `environment`
    prompts = datasets.Dataset.from_list([{"prompt": "a", "environment": "echo"}] * 3 + [{"prompt": "b",
                                                                                          "environment": "chess"}])
    config = grpo.GRPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=4,
                             max_steps=1, mesh_fsdp=1, disable_tqdm=True, save_steps=0)
    with pytest.raises(ValueError, match="Row 3 of the train prompts has environment='chess'"):
        grpo.train(None, TOKENIZER, prompts, config, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                   environment_factory={"echo": EchoEnv, "multiply": MultiplyEnv})


# --------------------------------------------------------------------------------------------------------------
# The sampler's per-row limits
# --------------------------------------------------------------------------------------------------------------


def test_generate_per_row_limits_stop_rows_without_changing_the_others():
    model = tiny_llama(len(TOKENIZER))
    graphdef, params = nnx.split(model, nnx.Param)
    ids = np.asarray([encode("abc"), encode("xyz"), encode("hello"[:3])], np.int32)
    common = dict(key=jax.random.key(3), max_new_tokens=6, pad_token_id=PAD)
    full = jaxpt.sampling.generate(graphdef, params, ids, **common)
    limited = jaxpt.sampling.generate(graphdef, params, ids, **common, max_new_tokens_per_row=np.asarray([6, 0, 2]))
    assert np.asarray(limited.lengths).tolist() == [6, 0, 2] and not np.asarray(limited.finished).any()
    np.testing.assert_array_equal(np.asarray(limited.completion_ids[0]), np.asarray(full.completion_ids[0]))
    np.testing.assert_array_equal(np.asarray(limited.completion_ids[2, :2]), np.asarray(full.completion_ids[2, :2]))
    assert (np.asarray(limited.completion_ids[1]) == PAD).all()
    with pytest.raises(ValueError, match=r"max_new_tokens_per_row has shape \(2,\)"):
        jaxpt.sampling.generate(graphdef, params, ids, **common, max_new_tokens_per_row=np.asarray([1, 2]))
    with pytest.raises(ValueError, match="must be in \\[0, max_new_tokens=6\\]"):
        jaxpt.sampling.generate(graphdef, params, ids, **common, max_new_tokens_per_row=np.asarray([1, 2, 7]))


# --------------------------------------------------------------------------------------------------------------
# The calculator task: a tiny policy, SFT-ed on demonstrations that call the tool 30% of the time
# --------------------------------------------------------------------------------------------------------------

PROBLEMS = [(a, b) for a in range(2, 10) for b in range(2, 10)]
MAX_COMPLETION = 16
QUIET = dict(mesh_fsdp=1, disable_tqdm=True, save_steps=0, seed=0, save_final_model=False)


def demonstrations(seed=0, tool_share=0.3):
    """'7*8=' -> a call and its result (the completion's answer), or (70%) a wrong guess."""
    rng = random.Random(seed)
    rows = []
    for a, b in PROBLEMS * 4:
        if rng.random() < tool_share:
            completion = f"<tool_call>{a}*{b}</tool_call><tool_response>{a * b}</tool_response>"
        else:
            completion = str(rng.choice([n for n in range(4, 82) if n != a * b]))
        rows.append({"prompt": f"{a}*{b}=", "completion": completion})
    return rows


def answer_reward(completions, solution, **kwargs):
    """1 when the completion's last number (a tool result counts: the policy may answer with it) is the product."""
    return [float(re.findall(r"\d+", c)[-1:] == [s]) for c, s in zip(completions, solution, strict=True)]


PROMPTS = datasets.Dataset.from_list([{"prompt": f"{a}*{b}=", "solution": str(a * b)} for a, b in PROBLEMS])


def grpo_config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), num_generations=8, per_device_train_batch_size=64,
                    max_completion_length=MAX_COMPLETION, learning_rate=2e-3, max_steps=10, logging_steps=1,
                    max_tool_calling_iterations=2, **QUIET)
    settings.update(overrides)
    return grpo.GRPOConfig(**settings)


@pytest.fixture(scope="module")
def sft_policy(tmp_path_factory):
    model = tiny_llama(len(TOKENIZER), hidden_size=64, intermediate_size=128)
    config = sft.SFTConfig(output_dir=str(tmp_path_factory.mktemp("sft")), max_length=32,
                           per_device_train_batch_size=32, learning_rate=3e-3, max_steps=120, logging_steps=120,
                           **QUIET)
    return sft.train(model, TOKENIZER, datasets.Dataset.from_list(demonstrations()), config).state


@pytest.fixture(scope="module")
def tool_rollout(sft_policy, tmp_path_factory):
    config = grpo_config(tmp_path_factory.mktemp("rollout"))
    prompts = grpo.data.prepare_prompts(PROMPTS, TOKENIZER, method="GRPO")[:8]
    toolbox = Toolbox([calculator], tool_format=CALCULATOR_FORMAT, max_tool_calling_iterations=2)
    arrays, metrics, records = grpo.rollout(sft_policy, prompts, [answer_reward], TOKENIZER, config,
                                            key=jax.random.key(0), mesh=None, prompt_buckets=[16], tools=toolbox)
    return config, arrays, metrics, records


def test_tool_rollout_masks_results_and_old_logps_align_with_the_final_sequence(sft_policy, tool_rollout):
    config, arrays, metrics, records = tool_rollout
    attention, tool_mask = arrays["attention_mask"], arrays["tool_mask"]
    result_tokens = (attention == 1) & (tool_mask == 0)
    assert metrics["tools/call_frequency"] > 0.1 and result_tokens.sum() > 10
    np.testing.assert_array_equal(arrays["completion_mask"], attention * tool_mask)
    # every masked stretch is exactly one rendered tool result, and what follows it is the model's again
    for row in np.flatnonzero(result_tokens.any(1)):
        text = TOKENIZER.decode(arrays["completion_ids"][row][result_tokens[row]])
        assert text.startswith("<tool_response>") and text.endswith("</tool_response>")
    assert metrics["completions/mean_length"] == pytest.approx((attention * tool_mask).sum(1).mean())
    assert {"tools/call_frequency", "tools/failure_frequency", "reward"} <= set(metrics)
    assert any("<tool_response>" in r["completion"] for r in records)
    # Old log-probs from one forward pass over the final sequences equal the sampler's, turn after turn (each
    # continuation re-prefilled the sequence so far): they align token for token.
    logps = make_logps_fn(sft_policy.graphdef, temperature=1.0, chunk_size=64, micro_batch=len(attention))(
        sft_policy.params, arrays)
    model_tokens = arrays["completion_mask"].astype(bool)
    after_a_result = model_tokens & (np.cumsum(result_tokens, 1) > 0)
    assert after_a_result.sum() > 5  # the check covers tokens sampled after a tool result
    np.testing.assert_allclose(logps[model_tokens], arrays["sampler_logps"][model_tokens], atol=2e-5)


def test_tool_result_logits_do_not_change_the_loss(sft_policy, tool_rollout, monkeypatch):
    """The GRPO loss (and its gradient) are the same when the log-probs of tool-result tokens change, and not when
    those of a model token do."""
    config, arrays, _, _ = tool_rollout
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    batch["old_logps"] = jnp.asarray(arrays["sampler_logps"]) - 0.05  # off-policy: the ratio sees the log-probs
    tool_results = jnp.asarray((arrays["attention_mask"] == 1) & (arrays["tool_mask"] == 0), jnp.float32)
    totals = {"tokens": jnp.maximum(batch["completion_mask"].sum(), 1.0), "sequences": float(len(arrays["tool_mask"]))}
    real_logps = grpo.completion_logps
    # the shift of each token's log-prob rides in the batch, so one compiled function serves every shift
    monkeypatch.setattr(grpo, "completion_logps", lambda params, graphdef, batch, **k: (
        lambda lp, ent: (lp + batch["logp_shift"], ent))(*real_logps(params, graphdef, batch, **k)))
    value_and_grad = jax.jit(lambda params, batch: jax.value_and_grad(grpo.loss_fn, has_aux=True)(
        params, sft_policy.graphdef, batch, config, totals))

    def loss_and_grad(shift):
        (loss, _), grads = value_and_grad(sft_policy.params, {**batch, "logp_shift": shift + 0 * tool_results})
        return float(loss), jax.tree.leaves(grads)

    base_loss, base_grads = loss_and_grad(0.0)
    shifted_loss, shifted_grads = loss_and_grad(3.0 * tool_results)
    assert shifted_loss == base_loss
    for base, shifted in zip(base_grads, shifted_grads, strict=True):
        np.testing.assert_array_equal(np.asarray(base), np.asarray(shifted))
    model_token = jnp.zeros_like(tool_results).at[np.argwhere(arrays["completion_mask"])[0]].set(0.5)
    assert loss_and_grad(model_token)[0] != pytest.approx(base_loss, abs=1e-7)
    # the same on the loss function itself: masked positions carry no gradient
    mask = jnp.asarray(arrays["completion_mask"], jnp.float32)
    advantages = jnp.asarray(arrays["advantages"])

    def loss_of(logps):
        return grpo_loss(logps, batch["old_logps"], None, advantages, mask, loss_type="dapo")[0]

    gradient = jax.grad(loss_of)(batch["old_logps"] + 0.1)
    assert float(jnp.abs(gradient * tool_results).max()) == 0.0 and float(jnp.abs(gradient).max()) > 0


def test_rloo_rollout_with_an_environment(sft_policy, tmp_path):
    """`environment_factory`: one reset environment per completion, its methods as tools, its `get_reward` as an
    extra reward (named after its class), the environments passed to the reward functions."""

    class CalculatorEnv:
        def reset(self, prompt, solution, **kwargs):
            self.solution, self.results = solution, []

        def calculator(self, expression: str) -> str:
            self.results.append(calculator(expression))
            return self.results[-1]

        def get_reward(self):
            return float(self.solution in self.results)

    seen = []

    def reward_with_environments(completions, environments, **kwargs):
        seen.append(environments)
        return [0.0] * len(completions)

    config = rloo.RLOOConfig(output_dir=str(tmp_path), num_generations=8, per_device_train_batch_size=64,
                             max_completion_length=MAX_COMPLETION, beta=0.0, **QUIET)
    prompts = rloo.data.prepare_prompts(PROMPTS, TOKENIZER, method="RLOO")[:8]
    toolbox = Toolbox(environment_factory=CalculatorEnv, tool_format=CALCULATOR_FORMAT)
    arrays, metrics, records = rloo.rollout(sft_policy, prompts, [reward_with_environments], TOKENIZER, config,
                                            key=jax.random.key(1), mesh=None, prompt_buckets=[16], tools=toolbox)
    environments = seen[0]
    assert len(environments) == 64 and len({id(e) for e in environments}) == 64
    assert [e.solution for e in environments[:9]] == [PROMPTS[0]["solution"]] * 8 + [PROMPTS[1]["solution"]]
    called = [bool(e.results) for e in environments]
    assert metrics["tools/call_frequency"] == pytest.approx(sum(len(e.results) for e in environments) / 64)
    assert any(called)
    env_rewards = [r["CalculatorEnv"] for r in records]
    assert env_rewards == [float(e.solution in e.results) for e in environments] and sum(env_rewards) > 0
    np.testing.assert_array_equal(arrays["completion_mask"], arrays["attention_mask"] * arrays["tool_mask"])
    # the pool is reused: a second rollout resets the same 64 instances
    rloo.rollout(sft_policy, prompts, [reward_with_environments], TOKENIZER, config, key=jax.random.key(2),
                 mesh=None, prompt_buckets=[16], tools=toolbox)
    assert [id(e) for e in seen[1]] == [id(e) for e in environments]
    # rloo.train with only the environment's reward (no reward_funcs): one step, TRL's metrics logged
    result = rloo.train(sft_policy.model(), TOKENIZER, PROMPTS.select(range(8)), config.replace(max_steps=1,
                        logging_steps=1), reward_funcs=[], environment_factory=CalculatorEnv,
                        tool_format=CALCULATOR_FORMAT)
    logged = result.metrics[0]
    assert logged["tools/call_frequency"] > 0 and "rewards/CalculatorEnv/mean" in logged
    assert np.isfinite(logged["loss"])


def test_grpo_learns_to_call_the_calculator(sft_policy, tmp_path):
    """Reward rises and tool calls succeed: GRPO moves the policy from calling its tool on about a third of the
    problems (and guessing the rest) to calling it on nearly all, and the successful calls rise with them."""
    result = grpo.train(sft_policy.model(), TOKENIZER, PROMPTS, grpo_config(tmp_path), reward_funcs=[answer_reward],
                        tools=[calculator], tool_format=CALCULATOR_FORMAT)
    rewards = np.asarray([m["reward"] for m in result.metrics])
    calls = np.asarray([m["tools/call_frequency"] for m in result.metrics])
    failures = np.asarray([m["tools/failure_frequency"] for m in result.metrics])
    successful_calls = calls * (1 - failures)  # successful calls per completion
    assert len(rewards) == 10 and calls[0] < 0.5
    assert calls[-3:].mean() > calls[:2].mean() + 0.25
    assert successful_calls[-3:].mean() > successful_calls[:2].mean() + 0.25
    assert rewards[-3:].mean() > rewards[:2].mean() + 0.15
    assert failures[-3:].mean() < 0.25
