"""What GRPO and RLOO share: the batch arithmetic of a rollout (`rollout_shape`, TRL's rules), sampling
`num_generations` completions per prompt with the training parameters, decoding and scoring them
(`sample_and_score`), the completion log-probs the updates train on (`completion_logps`, and `make_ref_logps_fn`
for the reference model's), and evaluation by sampled rewards (`evaluate_rollouts`). Each method keeps its own
`rollout` (its advantages and metrics) and its loop.

`sample_and_score` returns numpy arrays, grouped contiguously (`num_generations` rows per prompt):
`prompt_ids`/`prompt_mask` `[n, prompt_bucket]` (left-padded), `completion_ids`/`attention_mask` `[n,
max_completion_length]` (1 on generated tokens, EOS included), `completion_mask` (the tokens the loss trains on:
`attention_mask`, without the completions cut at `max_completion_length` when `mask_truncated_completions`),
`sampler_logps` (the sampler's `log softmax(logits / temperature)` of each token), `lengths`, `finished` (ended
with EOS), the rewards `[n, num_functions]` (NaN = None) and the decoded completions (on several processes each
decodes and scores only its own groups, `own_group_rows`, the other rows are None; process 0 decodes all of them
when it logs completions).

Several processes. A rollout's prompts go into `generate` as one `[prompts_per_rollout, length]` array split over
the mesh's batch axes, so each process tokenizes only the prompts at the rows its devices hold over the run's
rollouts (`prepare_rollout_prompts`: a `distributed.DataShare` over the seeded rollout order of `data.step_indices`;
every row when the prompts do not divide the batch axes, as `generate` then replicates them), and all agree on every
rollout's longest prompt, hence its padded length, in one collective before the first rollout
(`agree_prompt_lengths`). Each rollout's records (`rollout_prompts`) hold every row's prompt and other columns, read
from the dataset (not tokenized: scoring and `log_completions` need them), and the token ids of the process's own
rows (stand-ins elsewhere, never placed: `shard_batch(global_batch=True)`); `sample_and_score(longest_prompt=...)`
reads the whole rollout's prompt ids back from the placed arrays, so the update holds the whole rollout on every
process as before. Evaluation rollouts likewise (`prepare_eval_prompts`, a `distributed.EvalShare`). Tool-using
rollouts, one process, and the methods that call `prepare_prompts` / `sample_and_score` themselves prepare every
prompt on every process.

Old log-probs. The sampler's log-probs equal the training forward pass's in exact arithmetic, but not in bfloat16
(decode loop vs teacher-forced pass: up to a few tenths of a nat per token), so the ratio and RLOO's KL penalty
never use them. As TRL: when a rollout feeds more than one optimizer step (`num_iterations > 1` or
`steps_per_generation > gradient_accumulation_steps`), its `old_logps` come from the training forward pass with
the parameters before the first update (`make_logps_fn`, the jitted `completion_logps` the train step runs);
with one step per rollout the update is on-policy, old = stop_gradient(current), and the ratio is exactly 1.
The reference log-probs go through the very same jitted function, so RLOO's KL penalty is exactly 0 while the
reference equals the policy. `sampler_logps` stay in the batch for the mismatch metrics and the optional
importance-sampling correction (`jaxpt.losses.sampler_mismatch`).

Shared prompts. A rollout's rows come in groups of `num_generations` completions of one prompt. When every
micro-batch of the update holds whole groups that split evenly over the mesh's batch axes (`shared_prompt_group`;
not for tool-using rollouts, nor under LoRA dropout), the update and the old/reference log-probs run each prompt
through the model once for its group (`completion_logps(prompt_group=...)`, `attention.SharedPrompts`): equal
values up to float rounding, the prompt's token-wise work done once instead of `num_generations` times. The loop
checks every rollout's order (`check_prompt_groups`); the log-prob function shares only for rows in such runs.

Sampling options (TRL's GRPO/RLOO names): `temperature`, `top_k`, `top_p`, `min_p`, `repetition_penalty`, and
`generation_kwargs`, a dict (JSON on the command line) whose `top_k` / `top_p` / `min_p` / `repetition_penalty`
override those fields for sampling only (`sampling_options`); any other key fails (`check_generation_options`): jaxpt
samples with its own decode loop (`jaxpt.sampling`), not `transformers.GenerationConfig` or vLLM's
`SamplingParams`. `num_generations_eval` sets the group size of evaluation rollouts (`eval_config`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxpt import data, distributed
from jaxpt.losses.logprobs import chunked_token_logps
from jaxpt.models.attention import shared_prompt_inputs, shared_prompt_predictions
from jaxpt.rewards import check_reward_functions, reward_function_name, score_completions
from jaxpt.sampling import generate
from jaxpt.sharding import batch_divisor, host_array, shard_batch


@dataclasses.dataclass
class Rollout:
    arrays: dict[str, np.ndarray]
    rewards: np.ndarray  # [n, num_functions], NaN where a function returned None
    reward_names: tuple[str, ...]
    prompts: list  # the prompt of each completion (repeated num_generations times)
    completions: list  # strings, or [{"role": "assistant", "content": ...}] for conversational prompts
    lengths: np.ndarray  # the model's tokens per completion (tool results not counted, as TRL)
    finished: np.ndarray
    tool_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # with tools: TRL's tools/* metrics

    def records(self, advantages: np.ndarray) -> list[dict]:
        """One JSON-able record per completion (for `log_completions`)."""
        return [{"prompt": p, "completion": c, "advantage": float(a),
                 **{name: (None if np.isnan(r) else float(r)) for name, r in zip(self.reward_names, row, strict=True)}}
                for p, c, a, row in zip(self.prompts, self.completions, advantages, self.rewards, strict=True)]


GENERATION_KWARGS = ("top_k", "top_p", "min_p", "repetition_penalty")  # what generation_kwargs may set


def json_dict_option(value, *, name: str) -> dict | None:
    """A dict option (`generation_kwargs`, `chat_template_kwargs`) as a dict: None, a dict, or a JSON object string
    (what the command line passes, as TRL's `--generation_kwargs '{"top_k": 5}'`)."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"{name}={value!r} is not valid JSON ({error}): pass a JSON object, e.g. "
                             '{"top_k": 20}.') from None
        if isinstance(parsed, dict):
            return parsed
    raise ValueError(f"{name}={value!r} must be a dict (or a JSON object string on the command line).")


def check_generation_options(config) -> None:
    """Validate (and parse from JSON) the sampling options GRPO and RLOO share: `repetition_penalty` > 0,
    `generation_kwargs` keys among `GENERATION_KWARGS` with values `jaxpt.sampling.generate` accepts,
    `num_generations_eval` >= 2, `chat_template_kwargs` a dict."""
    if not (isinstance(config.repetition_penalty, int | float) and config.repetition_penalty > 0):
        raise ValueError(f"repetition_penalty={config.repetition_penalty!r} must be > 0 (1.0: off; > 1 discourages "
                         "repeated tokens).")
    config.generation_kwargs = json_dict_option(config.generation_kwargs, name="generation_kwargs")
    config.chat_template_kwargs = json_dict_option(config.chat_template_kwargs, name="chat_template_kwargs")
    reasons = {"temperature": "set temperature itself (it also scales the training log-probs)",
               "max_new_tokens": "set max_completion_length", "do_sample": "RL sampling always samples",
               "num_return_sequences": "set num_generations"}
    for key in config.generation_kwargs or {}:
        if key not in GENERATION_KWARGS:
            why = reasons.get(key, "jaxpt's sampler (jaxpt.sampling.generate) has no such option")
            raise ValueError(f"generation_kwargs has {key!r}: {why}. generation_kwargs may set "
                             f"{list(GENERATION_KWARGS)} (the sampler's options), overriding the fields of the same "
                             "names for sampling.")
    if config.generation_kwargs:  # the sampler's own argument checks, now rather than at the first rollout
        from jaxpt.sampling import _options

        options = sampling_options(config)
        try:
            _options(max_new_tokens=1, temperature=options["temperature"], top_k=options["top_k"],
                     top_p=options["top_p"], min_p=options["min_p"], greedy=False, eos_token_ids=None,
                     pad_token_id=0, repetition_penalty=options["repetition_penalty"])
        except ValueError as error:
            raise ValueError(f"generation_kwargs={config.generation_kwargs!r}: {error}") from None
    if config.num_generations_eval is not None and config.num_generations_eval < 2:
        raise ValueError(f"num_generations_eval={config.num_generations_eval} must be >= 2 (completions per "
                         "evaluation prompt; None: num_generations).")


def sampling_options(config) -> dict:
    """`jaxpt.sampling.generate`'s sampling arguments from a GRPO/RLOO config: the fields, overridden by
    `generation_kwargs` (configs without these fields sample with the defaults)."""
    options = {"temperature": config.temperature, "top_k": config.top_k,
               "top_p": config.top_p, "min_p": config.min_p,
               "repetition_penalty": getattr(config, "repetition_penalty", 1.0)}
    options.update(getattr(config, "generation_kwargs", None) or {})
    top_p = options["top_p"]
    return {**options, "top_k": options["top_k"] or None,
            "top_p": top_p if top_p is not None and top_p < 1.0 else None}


def eval_config(config, *, prompts_per_rollout: int, micro_batch: int):
    """The config evaluation rollouts run with: `num_generations_eval` completions per prompt when set (TRL's
    option), checked to give whole micro-batches of `micro_batch` rows."""
    if getattr(config, "num_generations_eval", None) is None:
        return config
    if prompts_per_rollout * config.num_generations_eval % micro_batch:
        raise ValueError(f"num_generations_eval={config.num_generations_eval}: an evaluation rollout of "
                         f"{prompts_per_rollout} prompts x {config.num_generations_eval} completions must be a "
                         f"multiple of per_device_train_batch_size x devices = {micro_batch}: pick another value.")
    return config.replace(num_generations=config.num_generations_eval)


def rollout_shape(config, devices: int) -> tuple[int, int, int]:
    """`(micro_batch, steps_per_generation, prompts_per_rollout)` from the config and the data-parallel device
    count, with TRL's rules; clear errors when they do not divide."""
    micro_batch = config.per_device_train_batch_size * devices
    if config.generation_batch_size is not None:
        if config.generation_batch_size % micro_batch:
            raise ValueError(f"generation_batch_size={config.generation_batch_size} must be a multiple of "
                             f"per_device_train_batch_size x devices = {micro_batch}.")
        steps_per_generation = config.generation_batch_size // micro_batch
    else:
        steps_per_generation = config.steps_per_generation or config.gradient_accumulation_steps
    if steps_per_generation % config.gradient_accumulation_steps:
        raise ValueError(f"steps_per_generation={steps_per_generation} must be a multiple of "
                         f"gradient_accumulation_steps={config.gradient_accumulation_steps} (each optimizer step "
                         "takes whole micro-batches of one rollout).")
    generation_batch = micro_batch * steps_per_generation
    if generation_batch % config.num_generations:
        raise ValueError(f"The generation batch ({generation_batch} completions = per_device_train_batch_size x "
                         f"devices x steps_per_generation) must be divisible by num_generations="
                         f"{config.num_generations}: adjust per_device_train_batch_size or num_generations.")
    return micro_batch, steps_per_generation, generation_batch // config.num_generations


def check_rollout_inputs(reward_funcs: Sequence[Callable], models: Sequence, prompts: Sequence[dict],
                         eval_prompts: Sequence[dict] | None, tokenizer, config, *, method: str, tools=None) -> None:
    """Before anything compiles: every reward function finds the columns it needs in the train (and eval) prompts
    (and `environments` with a `tools.environment_factory`; with a dict one, every row names a known `environment`),
    and each model (`None` entries skipped) fits the
    prompts plus `max_completion_length` tokens."""
    extra = ["environments"] if tools is not None and tools.environment_factory is not None else []
    for checked_prompts, where in ((prompts, "the train prompts"), (eval_prompts or [], "the eval prompts")):
        if checked_prompts:
            check_reward_functions(reward_funcs, columns=[*checked_prompts[0]["columns"], *extra])
        if tools is not None:  # a dict environment_factory: every row names its environment
            tools.check_rows([p["columns"] for p in checked_prompts], where=where)
    for model in models:
        if model is not None:
            data.check_model_fits(model, list(prompts) + list(eval_prompts or []), ("prompt_ids",), method=method,
                                  length_fields="max_prompt_length + max_completion_length",
                                  extra_length=config.max_completion_length,
                                  extra_ids=(tokenizer.eos_token_id, data.pad_token_id(tokenizer)))


def prompt_batch(prompts: Sequence[dict], prompt_buckets: Sequence[int], pad_token_id: int, *,
                 longest: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(prompt_ids, prompt_mask)` `[len(prompts), length]`, left-padded, of `prepare_prompts` records: `length` is
    the bucket of the longest prompt, or of `longest` when given (several processes agreed on it, each holding
    only its own rows' prompts, `rollout_prompts`)."""
    if longest is None:
        longest = max(len(p["prompt_ids"]) for p in prompts)
    length = data.bucket_length(longest, prompt_buckets)
    prompt_ids = data.pad_rows([p["prompt_ids"] for p in prompts], length, pad_token_id, left=True)
    prompt_mask = data.pad_rows([[1] * len(p["prompt_ids"]) for p in prompts], length, 0, left=True)
    return prompt_ids, prompt_mask


def prepare_rollout_prompts(dataset, tokenizer, config, *, method: str, mesh, prompts_per_rollout: int,
                            steps_per_rollout: int, start_rollout: int, whole: bool):
    """`(prompts, share)`: the train prompts this process prepares (`data.prepare_prompts` records) and its
    `distributed.DataShare` of the rollouts' prompts, a rollout being a step of `prompts_per_rollout` prompts in the
    seeded order of `data.step_indices` (rollouts `start_rollout` on; `start_rollout`: the planned resume step's).

    `whole` (one process, or tool-using rollouts): every prompt, checked to be the same on every process. Otherwise
    each process tokenizes only the prompts of the rows of `generate`'s input `[prompts_per_rollout, length]` its
    devices hold over the run (`jaxpt.sharding.process_rows`; every row when the prompts do not divide the mesh's
    batch axes, as `generate` then replicates them)."""
    options = dict(method=method, max_prompt_length=config.max_prompt_length,
                   chat_template_kwargs=config.chat_template_kwargs)
    if whole:
        prompts = data.prepare_prompts(dataset, tokenizer, **options)
        distributed.check_same_data(prompts, what=f"{method} prompts")  # every process builds the same batches
    else:
        data.require_format(dataset, ("prompt_only", "prompt_completion"), method=method)
        distributed.check_same_data([{"rows": len(dataset), "columns": data.column_names(dataset)}],
                                    what=f"{method} datasets")
    num_prompts = len(prompts) if whole else len(dataset)
    rollouts_per_epoch = data.steps_per_epoch(num_prompts, prompts_per_rollout, method=method)
    total_rollouts = -(-data.total_steps(config, rollouts_per_epoch * steps_per_rollout) // steps_per_rollout)
    share = distributed.DataShare(num_prompts, prompts_per_rollout, micro_batch=prompts_per_rollout, mesh=mesh,
                                  seed=config.seed, shuffle=config.shuffle_dataset, start_step=start_rollout,
                                  total_steps=total_rollouts, whole=whole,
                                  replicated=prompts_per_rollout % batch_divisor(mesh) != 0)
    if not whole:  # (none to prepare when resumed at the last step)
        prompts = distributed.on_every_process(
            lambda: data.prepare_prompts(share.select(dataset), tokenizer, **options) if len(share.needed) else [],
            what=f"{method} prompts")
    return prompts, share


def _longest_prompt(rows: Sequence[dict], counted: Sequence[dict]) -> tuple[int, int]:
    return max(len(p["prompt_ids"]) for p in rows), 0


def agree_prompt_lengths(share, prompts: Sequence[dict], *, start_rollout: int, total_rollouts: int) -> list[int]:
    """The prompt length buckets of a run, and on several processes every rollout's longest prompt, agreed in one
    collective before the first rollout (`DataShare.agree_steps`). Buckets from 16 tokens up to the longest prompt:
    of the dataset on a whole share, of the rollouts still to run otherwise (the processes do not tokenize the
    others)."""
    share.agree_steps(prompts, _longest_prompt, start_step=start_rollout, total_steps=total_rollouts)
    if share.whole:
        longest = max(len(p["prompt_ids"]) for p in prompts)
    else:
        longest = int(share.totals[:, 0].max()) if share.totals is not None else 0
    return data.length_buckets(max(longest, 16), min_length=16)


def rollout_prompts(share, prompts: Sequence[dict], dataset, indices: np.ndarray,
                    rollout_index: int) -> tuple[list[dict], int | None]:
    """`(records, longest_prompt)` of the rollout of dataset rows `indices` (rollout `rollout_index`), for
    `sample_and_score`. A whole share: the prepared prompts, None. Otherwise one record per row with the prompt and
    its other columns read from `dataset` (not tokenized: scoring and `log_completions` need them), and the token
    ids of this process's rows (a stand-in, one of its own, elsewhere), and the rollout's agreed longest prompt."""
    if share.whole:
        return [prompts[i] for i in indices], None
    rows, _ = share.step_examples(indices, prompts)
    longest, _ = share.step_totals(rollout_index, rows, rows, _longest_prompt)
    read = data.prompt_rows(distributed.select_rows(dataset, indices))
    return [{**record, "prompt_ids": row["prompt_ids"]} for record, row in zip(read, rows, strict=True)], longest


def prepare_eval_prompts(eval_dataset, tokenizer, config, *, method: str, mesh, prompts_per_rollout: int,
                         whole: bool):
    """`(prompts, share)`: the eval prompts this process prepares and its `distributed.EvalShare` of the evaluation
    rollouts (`evaluate_rollouts`: the prompts in order, `prompts_per_rollout` at a time, the last rollout filled up
    with the last prompt). `whole` (one process, tool-using rollouts), or prompts that do not divide the mesh's
    batch axes (`generate` replicates them): every prompt. Otherwise each process tokenizes only the prompts at the
    rows of the rollouts' generate input its devices hold, and all agree on every rollout's longest prompt (one
    collective, here)."""
    options = dict(method=method, max_prompt_length=config.max_prompt_length,
                   chat_template_kwargs=config.chat_template_kwargs)
    if whole or prompts_per_rollout % batch_divisor(mesh):
        prompts = data.prepare_prompts(eval_dataset, tokenizer, **options)
        return prompts, distributed.EvalShare(len(prompts), prompts_per_rollout, mesh=mesh, whole=True,
                                              repeat_last=True)
    data.require_format(eval_dataset, ("prompt_only", "prompt_completion"), method=method)
    share = distributed.EvalShare(len(eval_dataset), prompts_per_rollout, mesh=mesh, whole=False, repeat_last=True)
    prompts = distributed.on_every_process(
        lambda: data.prepare_prompts(share.select(eval_dataset), tokenizer, **options), what=f"{method} eval prompts")
    share.agree(prompts, lambda prompt: len(prompt["prompt_ids"]))  # every rollout's longest prompt, up front
    return prompts, share


def eval_rollout_prompts(share, prompts: Sequence[dict], dataset, index: int) -> tuple[list[dict], int]:
    """`rollout_prompts` for evaluation rollout `index` of a (not whole) `EvalShare`: every row's prompt and columns
    read from `dataset`, the token ids of this process's rows (one of them elsewhere), the agreed longest prompt."""
    rows, longest = share.batch_rows(index, prompts, None)
    stand_in = next(row for row in rows if row is not None)
    read = data.prompt_rows(distributed.select_rows(dataset, share.example_index(index, np.arange(share.batch_size))))
    return [{**record, "prompt_ids": (stand_in if row is None else row)["prompt_ids"]}
            for record, row in zip(read, rows, strict=True)], longest


def sample_and_score(state, prompts: Sequence[dict], reward_funcs: Sequence[Callable], tokenizer, config, *,
                     key: jax.Array, mesh, prompt_buckets: Sequence[int], tools=None,
                     longest_prompt: int | None = None) -> Rollout:
    """Sample `config.num_generations` completions for each prompt (`data.prepare_prompts` records) with
    `state`'s parameters and the config's sampling options, then score them. `tools` (a `jaxpt.tools.Toolbox`):
    multi-turn sampling with tool calls (`sample_and_score_with_tools`).

    `longest_prompt`: the rollout's longest prompt, which every process agreed on (`rollout_prompts`); then each
    process holds the token ids of only the prompts its devices feed (the others' rows hold stand-ins, never placed:
    `shard_batch(global_batch=True)`), and the whole rollout's prompt ids come back from the placed arrays. Default
    (None): every process holds every prompt."""
    if tools is not None:
        return sample_and_score_with_tools(state, prompts, reward_funcs, tokenizer, config, key=key, mesh=mesh,
                                           prompt_buckets=prompt_buckets, toolbox=tools)
    group = config.num_generations
    repeated = [p for p in prompts for _ in range(group)]
    pad_id = data.pad_token_id(tokenizer)
    unique_ids, unique_mask = prompt_batch(prompts, prompt_buckets, pad_id, longest=longest_prompt)
    inputs = {"ids": unique_ids, "mask": unique_mask}
    if longest_prompt is not None and mesh is not None and len(prompts) % batch_divisor(mesh) == 0:
        # split over the batch axes as generate splits them: each process places its own rows
        inputs = shard_batch(inputs, mesh, global_batch=True, check_shapes=False)  # the length was agreed
    # Each prompt is prefilled once for its group (num_return_sequences); the update takes the repeated rows.
    out = generate(state.graphdef, state.full_params(), inputs["ids"], inputs["mask"], key=key,  # LoRA: adapters on
                   max_new_tokens=config.max_completion_length, eos_token_ids=eos_token_ids(tokenizer),
                   pad_token_id=pad_id, num_return_sequences=group, mesh=mesh, **sampling_options(config))
    unique_ids, unique_mask = host_array(inputs["ids"]), host_array(inputs["mask"])  # every process's rows
    prompt_ids, prompt_mask = np.repeat(unique_ids, group, axis=0), np.repeat(unique_mask, group, axis=0)
    # the whole rollout on every process (gathered when the batch spans several)
    completion_ids, sampler_logps, attention_mask, lengths, finished = (host_array(a) for a in (
        out.completion_ids, out.completion_logps, out.completion_mask, out.lengths, out.finished))
    id_lists = [row[: int(n)].tolist() for row, n in zip(completion_ids, lengths, strict=True)]
    # Each process decodes (and scores) only its own groups; process 0 decodes all when it logs completions.
    first, last = own_group_rows(len(id_lists), group)
    decoded = range(len(id_lists)) if getattr(config, "log_completions", False) and jax.process_index() == 0 \
        else range(first, last)
    texts: list = [None] * len(id_lists)  # None: another process's completion, not decoded here
    for row, text in zip(decoded, tokenizer.batch_decode([id_lists[i] for i in decoded], skip_special_tokens=True),
                         strict=True):
        texts[row] = text
    conversational = not isinstance(prompts[0]["prompt"], str)
    completions = [t if t is None else [{"role": "assistant", "content": t}] for t in texts] if conversational \
        else texts
    columns = {name: [p["columns"][name] for p in repeated] for name in repeated[0]["columns"]}
    prompt_texts = [p["prompt"] for p in repeated]
    rewards = score_own_groups(reward_funcs, prompts=prompt_texts, completions=completions, completion_ids=id_lists,
                               columns=columns, group_size=group)
    attention_mask = np.asarray(attention_mask, np.int32)
    arrays = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": np.asarray(completion_ids),
              "attention_mask": attention_mask, "sampler_logps": np.asarray(sampler_logps),
              "completion_mask": loss_mask(attention_mask, finished,
                                           mask_truncated_completions=config.mask_truncated_completions)}
    return Rollout(arrays, rewards, tuple(reward_function_name(f) for f in reward_funcs), prompt_texts, completions,
                   np.asarray(lengths), np.asarray(finished))


def sample_and_score_with_tools(state, prompts: Sequence[dict], reward_funcs: Sequence[Callable], tokenizer, config,
                                *, key: jax.Array, mesh, prompt_buckets: Sequence[int], toolbox) -> Rollout:
    """`sample_and_score` in turns (`jaxpt.tools.run_tool_turns`): the sampler stops at tool calls, the tools run,
    their results are appended and sampling goes on. The arrays add `tool_mask` (0 on tool-result tokens), which
    `completion_mask` includes; `attention_mask` covers the tool results (the model reads them)."""
    from jaxpt import tools as tools_module

    group = config.num_generations
    repeated = [p for p in prompts for _ in range(group)]
    pad_id = data.pad_token_id(tokenizer)
    unique_ids, unique_mask = prompt_batch(prompts, prompt_buckets, pad_id)
    environments = toolbox.environments([{"prompt": p["prompt"], **p["columns"]} for p in repeated])
    params = state.full_params()  # LoRA: adapters on

    def generate_fn(prompt_ids, prompt_mask, **options):
        out = generate(state.graphdef, params, prompt_ids, prompt_mask, mesh=mesh, pad_token_id=pad_id,
                       **sampling_options(config), **options)
        return {"completion_ids": host_array(out.completion_ids), "completion_logps": host_array(out.completion_logps),
                "lengths": host_array(out.lengths)}

    turns = tools_module.run_tool_turns(generate_fn, unique_ids, unique_mask, key=key, toolbox=toolbox,
                                        tokenizer=tokenizer, max_new_tokens=config.max_completion_length,
                                        eos_token_ids=eos_token_ids(tokenizer), pad_token_id=pad_id,
                                        num_return_sequences=group, environments=environments)
    conversational = not isinstance(prompts[0]["prompt"], str)
    completions = [tools_module.completion_text(s, conversational=conversational) for s in turns.segments]
    id_lists = [row[: int(n)].tolist() for row, n in zip(turns.completion_ids, turns.lengths, strict=True)]
    columns = {name: [p["columns"][name] for p in repeated] for name in repeated[0]["columns"]}
    if environments is not None:
        columns["environments"] = environments
    reward_funcs = [*reward_funcs, *toolbox.environment_rewards]
    prompt_texts = [p["prompt"] for p in repeated]
    rewards = score_own_groups(reward_funcs, prompts=prompt_texts, completions=completions, completion_ids=id_lists,
                               columns=columns, group_size=group)
    mask = loss_mask(turns.attention_mask, turns.finished, mask_truncated_completions=config.mask_truncated_completions)
    arrays = {"prompt_ids": np.repeat(unique_ids, group, axis=0), "prompt_mask": np.repeat(unique_mask, group, axis=0),
              "completion_ids": turns.completion_ids, "attention_mask": turns.attention_mask,
              "sampler_logps": turns.sampler_logps, "tool_mask": turns.tool_mask,
              "completion_mask": mask * turns.tool_mask}
    model_tokens = (turns.attention_mask * turns.tool_mask).sum(1)
    return Rollout(arrays, rewards, tuple(reward_function_name(f) for f in reward_funcs), prompt_texts, completions,
                   model_tokens, turns.finished,
                   tools_module.tool_metrics(turns.tool_call_count, turns.tool_failure_count, len(repeated)))


def own_group_rows(num_rows: int, group_size: int) -> tuple[int, int]:
    """`(first, last)`: the rows of a rollout (`num_rows`, groups of `group_size` contiguous rows) whose decoding
    and scoring fall to this process, a contiguous block of whole groups (all rows on one process)."""
    count = jax.process_count()
    if count == 1:
        return 0, num_rows
    num_groups = num_rows // group_size
    per_process = -(-num_groups // count)
    return tuple(min(i * per_process, num_groups) * group_size for i in (jax.process_index(),
                                                                        jax.process_index() + 1))


def score_own_groups(reward_funcs: Sequence[Callable], *, prompts: Sequence, completions: Sequence,
                     completion_ids: Sequence, columns: dict[str, Sequence], group_size: int) -> np.ndarray:
    """`score_completions` of a whole rollout, the scoring shared among processes: each scores a contiguous block of
    whole groups (a group never straddles processes) and the rewards are gathered, so every process holds all of
    them and computes the same advantages and metrics. One process: `score_completions` of everything."""
    count = jax.process_count()
    if count == 1:
        return score_completions(reward_funcs, prompts=prompts, completions=completions,
                                 completion_ids=completion_ids, columns=columns)
    from jax.experimental import multihost_utils

    num_groups = len(completions) // group_size
    per_process = -(-num_groups // count)
    first, last = own_group_rows(len(completions), group_size)
    own, failure = np.zeros((0, len(reward_funcs)), np.float32), None
    if last > first:
        try:
            own = score_completions(reward_funcs, prompts=prompts[first:last], completions=completions[first:last],
                                    completion_ids=completion_ids[first:last],
                                    columns={k: v[first:last] for k, v in columns.items()})
        except Exception as error:  # told to every process below, so none waits for the others' rewards
            failure = error
    failed = np.asarray(multihost_utils.process_allgather(np.asarray([failure is not None], np.int32))).reshape(-1)
    if failure is not None:
        raise failure
    if failed.any():
        raise RuntimeError(f"Scoring the rollout failed on process(es) {np.flatnonzero(failed).tolist()}: see "
                           "their error.")
    padded = np.full((per_process * group_size, len(reward_funcs)), np.nan, np.float32)
    padded[:len(own)] = own
    gathered = np.asarray(multihost_utils.process_allgather(padded))  # [processes, rows, functions]
    return gathered.reshape(-1, len(reward_funcs))[:len(completions)]


def loss_mask(attention_mask: np.ndarray, finished: np.ndarray, *, mask_truncated_completions: bool) -> np.ndarray:
    """The completion tokens the loss trains on `[n, completion_len]`: every generated token, or with
    `mask_truncated_completions` only those of completions that ended with EOS (TRL's option)."""
    if mask_truncated_completions:
        attention_mask = attention_mask * np.asarray(finished)[:, None]
    return np.asarray(attention_mask, np.int32)


def completion_logps(params, graphdef, batch: dict, *, temperature: float, chunk_size: int = 1024,
                     entropy_gradient: bool = False, prompt_group: int = 1):
    """Per-token log-probs and entropies `[batch, completion_len]` of the completion tokens under
    `softmax(logits / temperature)` (what the update trains on), from the final hidden states in chunks (never
    full logits). `batch`: `prompt_ids`/`prompt_mask` (left-padded) and `completion_ids`/`attention_mask`.
    `entropy_gradient`: the entropies are differentiable (an entropy bonus in the loss), else a metric.

    `prompt_group`: the rows come in runs of `prompt_group` with the same prompt (a rollout's `num_generations`
    completions of each prompt, in the rollout's order; only the first row of a run is read): each prompt then goes
    through the model once for its whole run (`attention.shared_prompt_inputs`), the same values up to float
    rounding with less work (GRPO at 32 prompt + 64 completion tokens, 8 generations: a third fewer tokens). Rows
    that are not in such runs get NaN log-probs and entropies (so a NaN loss), never another prompt's values."""
    from flax import nnx

    if not isinstance(prompt_group, int) or prompt_group < 1:
        raise ValueError(f"prompt_group={prompt_group!r} must be an int >= 1 (the completions per prompt in a run "
                         "of rows, rollout.shared_prompt_group; 1: a row each).")
    model = nnx.merge(graphdef, params)
    prompt_length = batch["prompt_ids"].shape[-1]
    completion_length = batch["completion_ids"].shape[-1]
    if prompt_group > 1:
        input_ids, positions, segments = shared_prompt_inputs(
            batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["attention_mask"],
            group=prompt_group)
        hidden = model.hidden_states(input_ids, positions=positions, segment_ids=segments)
        predicting = shared_prompt_predictions(hidden, prompt_len=prompt_length, group=prompt_group)
    else:
        input_ids = jnp.concatenate([batch["prompt_ids"], batch["completion_ids"]], axis=-1)
        attention_mask = jnp.concatenate([batch["prompt_mask"], batch["attention_mask"]], axis=-1)
        hidden = model.hidden_states(input_ids, attention_mask=attention_mask)
        predicting = hidden[:, prompt_length - 1: prompt_length + completion_length - 1]  # predict the completion
    logps, entropy = chunked_token_logps(predicting, model.lm_head_weight(), batch["completion_ids"],
                                         chunk_size=chunk_size, logit_softcap=model.final_logit_softcap,
                                         temperature=temperature, return_entropy=True,
                                         entropy_gradient=entropy_gradient)
    if prompt_group > 1:  # rows not in runs of one prompt: NaN (a loud loss), never another row's prompt's values
        grouped = prompts_in_runs(batch, prompt_group)
        logps, entropy = jnp.where(grouped, logps, jnp.nan), jnp.where(grouped, entropy, jnp.nan)
    return logps, entropy


def prompts_in_runs(arrays: dict, prompt_group: int):
    """Whether `prompt_ids` and `prompt_mask` (`[n, prompt_len]`, `n` a multiple of `prompt_group`) come in runs of
    `prompt_group` equal rows: a bool, numpy for numpy arrays (the loops' host check), traced inside a step."""
    def runs_equal(rows):
        runs = rows.reshape(-1, prompt_group, rows.shape[-1])
        return (runs == runs[:, :1]).all()

    return runs_equal(arrays["prompt_ids"]) & runs_equal(arrays["prompt_mask"])


def shared_prompt_group(num_generations: int, micro_batch: int, *, devices: int = 1, tools=None,
                        adapter_dropout: bool = False) -> int:
    """The `prompt_group` (`completion_logps`) of updates over a rollout's arrays in micro-batches of `micro_batch`
    rows, in the rollout's order: `num_generations` when every micro-batch holds whole groups of one prompt's
    completions and its prompts split evenly over the `devices` of the mesh's batch axes
    (`sharding.batch_divisor`), else 1 (every row computes its prompt). 1 too for tool-using rollouts, and under
    LoRA dropout (`lora.has_adapter_dropout`: each row's prompt tokens draw their own dropout masks, as in peft)."""
    if tools is not None or adapter_dropout or num_generations <= 1 or micro_batch % num_generations:
        return 1
    return num_generations if (micro_batch // num_generations) % devices == 0 else 1


def rows_share_prompts(arrays: dict, prompt_group: int) -> bool:
    """Whether the rows of `arrays` (`prompt_ids`, `prompt_mask` `[n, prompt_len]`) come in runs of `prompt_group`
    with the same prompt: what `completion_logps(prompt_group=...)` assumes. A cheap host check."""
    if prompt_group == 1:
        return True
    if len(arrays["prompt_ids"]) % prompt_group:
        return False
    return bool(prompts_in_runs({name: np.asarray(arrays[name]) for name in ("prompt_ids", "prompt_mask")},
                                prompt_group))


def check_prompt_groups(arrays: dict, prompt_group: int) -> None:
    """Raise unless the rollout's rows come in runs of `prompt_group` with the same prompt (`rows_share_prompts`):
    what an update with `prompt_group` assumes. Run on every rollout before its update."""
    if not rows_share_prompts(arrays, prompt_group):
        raise RuntimeError(f"The rollout's prompts do not come in runs of {prompt_group} equal rows; the update's "
                           "shared prompt forward pass needs them in the rollout's order.")


def reference_params(state):
    """The default reference of an online method's KL term: a copy of the initial parameters, or under LoRA the
    base model, i.e. the adapters switched off joined with the frozen base (no second copy of the base)."""
    from jaxpt.lora import without_adapters

    if state.frozen is None:
        return jax.tree.map(jnp.copy, state.params)  # a copy: the step donates (and so deletes) state.params
    return state.full_params(jax.tree.map(jnp.copy, without_adapters(state.params)))


def make_logps_fn(graphdef, *, temperature: float, chunk_size: int, micro_batch: int,
                  mesh=None, prompt_group: int = 1) -> Callable[[object, dict], np.ndarray]:
    """`logps(params, arrays) -> [n, completion_len]`: the training forward pass's per-token log-probs of a
    rollout's arrays (`completion_logps`, the function the train step differentiates, jitted once, no gradient),
    micro-batch by micro-batch of `micro_batch` rows (the train step's), for old and reference log-probs alike.
    `prompt_group`: the train step's (`shared_prompt_group`), used for arrays whose rows come in such runs
    (`rows_share_prompts`: an evaluation rollout with another `num_generations_eval` may not)."""
    options = dict(temperature=temperature, chunk_size=chunk_size)

    @functools.partial(jax.jit, static_argnames="group")
    def compute(params, batch, group):
        if mesh is None:
            return completion_logps(params, graphdef, batch, prompt_group=group, **options)[0]
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # sharding hints and data-parallel log-probs
            return completion_logps(params, graphdef, batch, prompt_group=group, **options)[0]

    def logps(params, arrays: dict) -> np.ndarray:
        keys = ("prompt_ids", "prompt_mask", "completion_ids", "attention_mask")
        group = prompt_group if rows_share_prompts(arrays, prompt_group) else 1
        out = []
        for start in range(0, len(arrays["prompt_ids"]), micro_batch):
            batch = shard_batch({k: arrays[k][start:start + micro_batch] for k in keys}, mesh, global_batch=True,
                                check_shapes=False)  # the whole rollout is on every process: same shapes
            out.append(host_array(compute(params, batch, group)))
        return np.concatenate(out)

    return logps


def make_ref_logps_fn(ref_params, graphdef, *, temperature: float, chunk_size: int, micro_batch: int,
                      mesh=None, logps_fn: Callable | None = None) -> Callable[[dict], np.ndarray]:
    """Reference per-token log-probs of a rollout's arrays: `logps_fn` (default: a new `make_logps_fn`) with
    `ref_params`. Pass the policy's `logps_fn` so the reference runs the very computation the old log-probs do."""
    if logps_fn is None:
        logps_fn = make_logps_fn(graphdef, temperature=temperature, chunk_size=chunk_size, micro_batch=micro_batch,
                                 mesh=mesh)
    return functools.partial(logps_fn, ref_params)


def check_reference_dtypes(policy_params, ref_params) -> None:
    """A reference model runs with the policy's graph (its compute dtype): its parameters must have the policy's
    dtypes too, or the KL to an identical reference is not 0 (a bfloat16 policy against a float32 copy of it)."""
    leaves_with_names = jax.tree_util.tree_leaves_with_path
    policy = {jax.tree_util.keystr(path): leaf.dtype for path, leaf in leaves_with_names(policy_params)}
    for path, leaf in leaves_with_names(ref_params):
        name = jax.tree_util.keystr(path)
        if name in policy and leaf.dtype != policy[name]:
            raise ValueError(f"ref_model parameter {name} is {leaf.dtype} but the policy's is {policy[name]}: load "
                             "the reference with the policy's param_dtype (from_pretrained(..., param_dtype=...)).")


def evaluate_rollouts(rollout: Callable, state, prompts: Sequence[dict], reward_funcs: Sequence[Callable], tokenizer,
                      config, *, mesh, prompt_buckets: Sequence[int], prompts_per_rollout: int,
                      ref_logps_fn: Callable | None = None,
                      policy_logps_fn: Callable | None = None, tools=None, share=None,
                      dataset=None) -> dict[str, float]:
    """Sampled rewards on the eval prompts (TRL's reward metrics with an `eval_` prefix), averaged over rollouts of
    `prompts_per_rollout` prompts made by the method's `rollout` (the last one filled up with its last prompt, so
    every rollout has the one compiled shape). `ref_logps_fn` and `policy_logps_fn` go to `rollout`, for a method
    whose rollout needs the reference and the policy's forward log-probs (RLOO's KL penalty in the reward).
    `tools` (a `jaxpt.tools.Toolbox`) goes to `rollout` when given. `share` (`prepare_eval_prompts`, not whole):
    `prompts` are this process's only, and each rollout's other rows are read from the eval `dataset`."""
    totals: dict[str, list[float]] = {}
    key = jax.random.key(config.seed + 1)
    whole = share is None or share.whole
    for index, start in enumerate(range(0, len(prompts) if whole else share.num_examples, prompts_per_rollout)):
        options = {"tools": tools} if tools is not None else {}
        if whole:
            chunk = list(prompts[start:start + prompts_per_rollout])
            chunk += [chunk[-1]] * (prompts_per_rollout - len(chunk))
        else:
            chunk, options["longest_prompt"] = eval_rollout_prompts(share, prompts, dataset, index)
        _, metrics, _ = rollout(state, chunk, reward_funcs, tokenizer, config, key=jax.random.fold_in(key, index),
                                mesh=mesh, prompt_buckets=prompt_buckets, ref_logps_fn=ref_logps_fn,
                                policy_logps_fn=policy_logps_fn, **options)
        for name, value in metrics.items():
            totals.setdefault(name, []).append(value)
    return {f"eval_{name}": float(np.mean(values)) for name, values in totals.items()}


def completion_metrics(lengths: np.ndarray, finished: np.ndarray) -> dict[str, float]:
    """TRL's `completions/*` metrics: lengths of all completions and of those that ended with EOS."""
    lengths = np.asarray(lengths, np.float64)
    terminated = lengths[np.asarray(finished, bool)]
    metrics = {"completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
               "completions/max_length": lengths.max(), "completions/clipped_ratio": 1.0 - np.mean(finished)}
    if terminated.size:
        metrics.update({"completions/mean_terminated_length": terminated.mean(),
                        "completions/min_terminated_length": terminated.min(),
                        "completions/max_terminated_length": terminated.max()})
    return {k: float(v) for k, v in metrics.items()}


def tool_reward_weights(reward_weights: Sequence[float] | None, num_functions: int) -> list[float] | None:
    """The configured reward weights, with weight 1 for the rewards a tool environment adds (`get_reward`, TRL)."""
    if reward_weights is None:
        return None
    return [*reward_weights, *[1.0] * (num_functions - len(reward_weights))]


def toolbox_from(config, *, tools, environment_factory, tool_format, method: str):
    """The run's `jaxpt.tools.Toolbox`, or None without tools; `max_tool_calling_iterations` without tools fails
    (it would be ignored)."""
    from jaxpt.tools import Toolbox

    if not tools and environment_factory is None:
        if config.max_tool_calling_iterations is not None or tool_format is not None:
            raise ValueError(f"{method}: max_tool_calling_iterations={config.max_tool_calling_iterations} / "
                             f"tool_format={tool_format!r} are set but there are no tools: pass tools=[...] or "
                             "environment_factory=..., or leave them unset.")
        return None
    return Toolbox(tools, environment_factory=environment_factory, tool_format=tool_format,
                   max_tool_calling_iterations=config.max_tool_calling_iterations)


def eos_token_ids(tokenizer) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos_token: completions need one to end.")
    return [tokenizer.eos_token_id]


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Append rows to a JSON-lines file (process 0 only)."""
    if jax.process_index() != 0:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
