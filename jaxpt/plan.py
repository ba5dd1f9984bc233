"""`jaxpt plan`: what a run costs per device, before renting the hardware.

```bash
jaxpt plan --model_name_or_path path/to/config.json --method sft --mesh data=1,fsdp=64,tensor=1 \\
    --per_device_train_batch_size 1 --max_length 2048 --gradient_checkpointing true --bf16 true --hbm_gib 95
```

It builds the model from its Hugging Face `config.json` alone, abstractly (`nnx.eval_shape`: no weights), the
`TrainState` with the method's real optimizer (`make_optimizer`), the method's real train step
(`make_train_step(config, mesh=..., state_sharding=...)`) and a batch shaped exactly as the method's `collate`
makes it, then lowers and compiles that step for the mesh on simulated devices:

- CPU devices: `--xla_force_host_platform_device_count` must be set before jax starts, so when this process has
  fewer devices than the mesh needs, `plan()` runs `python -m jaxpt.plan` in a child process with the flag set
  and reads back its last stdout line (JSON);
- a TPU topology (`--topology v5p:4x4x4`) through `jax.experimental.topologies`, when `libtpu` is installed
  (`pip install 'jaxpt[tpu-plan]'`): the compiler targets TPU on a machine without one.

From the compiled executable it reads, per device: memory (`memory_analysis()`: argument, output, temp, peak),
matmul flops and collective traffic (both from the compiled HLO text, with every loop body counted as often as
the loop runs: XLA's `cost_analysis()` counts a loop body once, so its `flops` is reported as `xla_flops` only).
On a TPU topology the compiler writes matmuls as convolutions, some with padded windows whose taps are counted in
full: there `flops` over-counts (2.2x at Llama-3-8B shapes, 2 layers); take flops from a CPU plan.

Like `cli.py`, this module reaches into the methods; nothing shared imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

METHODS = ("sft", "dpo", "kto", "reward", "grpo", "rloo")
# `jaxpt plan --use_peft --lora_r 16 ...`: TRL's ModelConfig LoRA flags (jaxpt.lora.LoraConfig)
LORA_FLAGS = ("--use_peft", "--lora_r", "--lora_alpha", "--lora_dropout", "--lora_target_modules",
              "--lora_modules_to_save", "--use_rslora", "--load_in_4bit", "--load_in_8bit", "--bnb_4bit_quant_type")
COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
GIB = 1024**3


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------


def parse_mesh(mesh_shape: str | dict) -> dict[str, int]:
    """`"data=1,fsdp=64,tensor=1"` (or a dict) -> `{"data": 1, "fsdp": 64, "tensor": 1}`; missing axes are 1."""
    from jaxpt.sharding import MESH_AXES

    if isinstance(mesh_shape, str):
        sizes = {}
        for part in filter(None, (p.strip() for p in mesh_shape.split(","))):
            name, _, value = part.partition("=")
            try:
                sizes[name.strip()] = int(value)
            except ValueError:
                raise ValueError(f"mesh={mesh_shape!r}: {part!r} is not AXIS=SIZE; write e.g. "
                                 "data=1,fsdp=64,tensor=1.") from None
    else:
        sizes = dict(mesh_shape)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh={mesh_shape!r} names unknown axes {unknown}; the axes are {MESH_AXES}.")
    bad = {name: size for name, size in sizes.items() if not isinstance(size, int) or size < 1}
    if bad:
        raise ValueError(f"mesh={mesh_shape!r}: axis sizes must be integers >= 1 (a plan needs the device count), "
                         f"got {bad}.")
    return {name: sizes.get(name, 1) for name in MESH_AXES}


def config_dir(model_name_or_path: str | os.PathLike) -> Path:
    """The directory holding `config.json`: PATH itself, or the folder of PATH when it is that file."""
    path = Path(model_name_or_path).expanduser()
    if path.is_file():
        if path.name != "config.json":
            raise ValueError(f"model_name_or_path={str(path)!r} is a file but not a config.json: pass a Hugging Face "
                             "config.json or the directory holding one.")
        return path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"model_name_or_path={str(path)!r} does not exist: pass a Hugging Face config.json "
                                "or the directory holding one (no weights are needed).")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"No config.json in {path}: pass a Hugging Face config.json or the directory "
                                "holding one.")
    return path


def method_module(method: str):
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a jaxpt method; use one of {METHODS}.")
    import importlib

    return importlib.import_module(f"jaxpt.{method}")


def method_config(method: str, *, per_device_train_batch_size: int, max_length: int, gradient_checkpointing: bool,
                  bf16: bool, gradient_accumulation_steps: int, max_prompt_length: int | None,
                  max_completion_length: int | None, config_overrides: dict | None):
    """The method's config with the plan's shape fields (and any other field the user set), validated."""
    module = method_module(method)
    config_class = {"sft": "SFTConfig", "dpo": "DPOConfig", "kto": "KTOConfig", "reward": "RewardConfig",
                    "grpo": "GRPOConfig", "rloo": "RLOOConfig"}[method]
    config_class = getattr(module, config_class)
    if max_length is None or max_length < 2:
        raise ValueError(f"max_length={max_length}: the plan needs the sequence length (>= 2).")
    if per_device_train_batch_size < 1 or gradient_accumulation_steps < 1:
        raise ValueError(f"per_device_train_batch_size={per_device_train_batch_size} and gradient_accumulation_steps="
                         f"{gradient_accumulation_steps} must be >= 1.")
    fields = dict(per_device_train_batch_size=per_device_train_batch_size, bf16=bf16,
                  gradient_checkpointing=gradient_checkpointing,
                  gradient_accumulation_steps=gradient_accumulation_steps)
    if method in ("grpo", "rloo"):
        prompt_length, completion_length = rollout_lengths(max_length, max_prompt_length, max_completion_length)
        fields.update(max_prompt_length=prompt_length, max_completion_length=completion_length)
    else:
        if max_prompt_length is not None or max_completion_length is not None:
            raise ValueError(f"max_prompt_length / max_completion_length shape the rollouts of grpo and rloo; "
                             f"method={method!r} takes max_length only.")
        fields["max_length"] = max_length
    overrides = dict(config_overrides or {})
    clash = sorted(set(overrides) & set(fields))
    if clash:
        raise ValueError(f"config_overrides sets {clash}, which are plan arguments: pass them as such.")
    known = set(config_class.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"config_overrides has {unknown}, which are not {config_class.__name__} fields.")
    config = config_class(**fields, **overrides)
    config.validate()
    return config


def rollout_lengths(max_length: int, max_prompt_length: int | None,
                    max_completion_length: int | None) -> tuple[int, int]:
    """`(prompt, completion)` lengths of a GRPO/RLOO update batch: as given, or `max_length` split (the missing
    one gets the rest; neither given: half each)."""
    if max_prompt_length is None and max_completion_length is None:
        max_prompt_length = max_length // 2
    if max_prompt_length is None:
        max_prompt_length = max_length - max_completion_length
    if max_completion_length is None:
        max_completion_length = max_length - max_prompt_length
    if max_prompt_length < 1 or max_completion_length < 1:
        raise ValueError(f"max_prompt_length={max_prompt_length}, max_completion_length={max_completion_length} "
                         f"(from max_length={max_length}) must both be >= 1.")
    return max_prompt_length, max_completion_length


# --------------------------------------------------------------------------------------------------------------
# The abstract batch, as each method's collate (or rollout) lays it out
# --------------------------------------------------------------------------------------------------------------


def batch_layout(method: str, config, *, micro_batch: int, length: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """`{name: (shape, dtype)}` of one train-step batch, `[accumulation, micro_batch, ...]`, with the keys and
    dtypes the method's `collate` (GRPO/RLOO: rollout arrays) produces."""
    steps = config.gradient_accumulation_steps
    rows = (steps, micro_batch)
    ints, floats = "int32", "float32"
    if method == "sft":
        return {key: ((*rows, length), ints) for key in ("input_ids", "loss_mask", "attention_mask")}
    if method == "reward":
        return {key: ((*rows, 2, length), ints) for key in ("input_ids", "attention_mask")}
    if method == "dpo":
        batch = {key: ((*rows, 2, length), ints) for key in ("input_ids", "attention_mask", "completion_mask")}
        if config.precompute_ref_log_probs:
            batch.update({key: (rows, floats) for key in ("ref_chosen_logps", "ref_rejected_logps")})
        return batch
    if method == "kto":
        with_kl = config.loss_type == "kto"
        prefixes = ("", "kl_") if with_kl else ("",)
        batch = {f"{p}{key}": ((*rows, length), ints) for p in prefixes
                 for key in ("input_ids", "attention_mask", "completion_mask")}
        batch["label"] = (rows, ints)
        if config.precompute_ref_log_probs:
            batch.update({key: (rows, floats) for key in ("ref_logps", "ref_kl_logps")[:len(prefixes)]})
        return batch
    # grpo / rloo: the rollout arrays (left-padded prompts, completions) of one optimizer step.
    prompt, completion = config.max_prompt_length, config.max_completion_length
    batch = {"prompt_ids": ((*rows, prompt), ints), "prompt_mask": ((*rows, prompt), ints),
             "completion_ids": ((*rows, completion), ints), "attention_mask": ((*rows, completion), ints),
             "completion_mask": ((*rows, completion), ints), "advantages": (rows, floats),
             "sampler_logps": ((*rows, completion), floats)}  # the sampler's log-probs: mismatch metrics
    steps_per_generation = config.steps_per_generation or steps
    if config.generation_batch_size is not None:
        steps_per_generation = config.generation_batch_size // micro_batch
    if not (steps_per_generation == steps and config.num_iterations == 1):  # train() drops them when on-policy
        batch["old_logps"] = ((*rows, completion), floats)
    if method == "grpo" and config.beta != 0.0:
        batch["ref_logps"] = ((*rows, completion), floats)
    return batch


def matmul_params(params, *, classifier: bool, tensor: int = 1) -> int:
    """Parameters that multiply every token: all but the input embedding table, which is a lookup (unless a
    causal LM ties its output projection to it). With `tensor` > 1, those one device of a tensor group multiplies:
    its share of the decoder layers', which the "tensor" axis splits, and the rest whole (the log-prob loss runs
    the output projection whole on every device of the group)."""
    import jax

    from jaxpt.sharding import path_name

    named = {path_name(path): math.prod(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    embedding = sum(size for name, size in named.items() if name.endswith("embed_tokens.weight"))
    separate_head = classifier or any(name.endswith("lm_head.weight") for name in named)
    layers = sum(size for name, size in named.items() if "layers" in name.split("."))
    return sum(named.values()) - (embedding if separate_head else 0) - layers + layers // tensor


def tokens_per_device(method: str, config, *, length: int, devices_in_batch: int, micro_batch: int,
                      prompt_group: int = 1) -> int:
    """Tokens one device runs through the model with gradient in a step (for the analytic flops band); grpo / rloo
    run a prompt once per `prompt_group` completions (`rollout.shared_prompt_group`)."""
    rows_per_device = micro_batch // devices_in_batch * config.gradient_accumulation_steps
    if method in ("grpo", "rloo"):
        return (rows_per_device * config.max_completion_length
                + rows_per_device // prompt_group * config.max_prompt_length)
    sequences = 2 if method in ("dpo", "reward") else 1
    return rows_per_device * sequences * length


# --------------------------------------------------------------------------------------------------------------
# Reading the compiled HLO: matmul flops and collective bytes, loops counted as often as they run
# --------------------------------------------------------------------------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_ARRAY_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([^\s(]+)\s*\(.*\{\s*$")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (a tuple's elements summed)."""
    total = 0.0
    for dtype, dims in _ARRAY_SHAPE.findall(shape):
        size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def _dims(shape: str) -> list[int]:
    match = _ARRAY_SHAPE.search(shape)
    return [int(d) for d in match.group(2).split(",") if d] if match else []


def _closing(text: str, depth: int = 0) -> int:
    """Index of the parenthesis that closes the one open at `depth` (or opened by text[0] when depth is 0)."""
    for index, char in enumerate(text):
        depth += char == "("
        depth -= char == ")"
        if depth == 0:
            return index
    return len(text)


def _split_instruction(line: str):
    """`(name, shape, opcode, operand_names, attributes, operand_text)` of an HLO instruction line, or None."""
    match = _INSTRUCTION.match(line)
    if not match:
        return None
    rest = line[match.end():]
    if rest.startswith("("):  # tuple shape: up to its closing parenthesis
        end = _closing(rest)
        shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode, paren, rest = rest.partition("(")
    if not paren:
        return None
    end = _closing(rest, depth=1)
    operands = re.findall(r"%([^\s,()]+)", rest[:end])
    return match.group(1), shape, opcode.strip(), operands, rest[end + 1:], rest[:end]


def _trip_count_from_condition(computations: dict, condition) -> int | None:
    """A loop's trip count from its condition `counter < N` (jax's scans and fori loops count 0, 1, ...), when
    the backend did not annotate it; None when the condition is anything else."""
    if condition is None:
        return None
    instructions = computations.get(condition.group(1), [])
    constants = {name: text for name, _, opcode, _, _, text in instructions if opcode == "constant"}
    compares = [inst for inst in instructions if inst[2] == "compare" and "direction=LT" in inst[4]]
    if len(compares) != 1:
        return None
    bounds = [constants[o] for o in compares[0][3][1:] if o in constants]
    return int(bounds[0]) if bounds and bounds[0].strip().isdigit() else None


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """`[(dtype, dims), ...]` of an HLO shape string (the elements of a tuple shape, layouts ignored)."""
    shape = re.sub(r"/\*.*?\*/", "", shape)
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY_SHAPE.findall(shape)
            if dtype in _DTYPE_BYTES or dtype.startswith("f8")]


def _array_bytes(arrays) -> int:
    return int(sum(_DTYPE_BYTES.get(dtype, 1) * math.prod(dims) for dtype, dims in arrays))


def hlo_costs(hlo_text: str) -> dict[str, Any]:
    """Per-device matmul flops and collective traffic of a compiled (SPMD-partitioned) HLO module.

    Every computation is read once; a while loop's body counts `known_trip_count` times (once, and
    `unknown_trip_counts` incremented, when XLA could not tell), fusions and calls once per call, a conditional
    as its costliest branch. The collectives are all-reduce, all-gather, reduce-scatter, all-to-all and
    collective-permute (their async `-start` forms too). `collective_list` has one entry per collective instruction:
    `kind`, `operands` and `results` (`[(dtype, dims), ...]`), `runs` (how often it runs per step) and `bytes`
    (`runs` x the larger of its operand and result bytes: the whole, unsplit buffer it gathers, scatters or
    reduces; an all-reduce moves about twice that over a ring). `collective_bytes` sums them; the sums of operand
    bytes alone (`collective_operand_bytes`, what earlier plans reported) undercount gathers by the device count.
    Also returns the largest collective (bytes, kind, shape), which shows e.g. a vocabulary-sized buffer moving."""
    computations: dict[str, list] = {}
    entry = None
    current = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        parsed = _split_instruction(line)
        if parsed:
            computations[current].append(parsed)

    unknown_trip_counts = 0
    memo: dict[str, dict] = {}
    found: dict[tuple[str, str], dict] = {}  # (computation, instruction) -> the collective, without runs

    def zero():
        return {"flops": 0, "runs": {}}

    def add(into, other, times=1):
        into["flops"] += other["flops"] * times
        for key, runs in other["runs"].items():
            into["runs"][key] = into["runs"].get(key, 0) + runs * times

    def cost(name):
        nonlocal unknown_trip_counts
        if name in memo:
            return memo[name]
        memo[name] = zero()  # guards against recursion
        total = zero()
        shapes = {inst[0]: inst[1] for inst in computations.get(name, [])}
        for instruction, shape, opcode, operands, attributes, _ in computations.get(name, []):
            base = opcode.removesuffix("-start")
            if base in COLLECTIVE_KINDS:
                operand_arrays = [a for o in operands for a in _arrays(shapes.get(o, ""))]
                result_arrays = _arrays(shape)
                if opcode.endswith("-start") and len(result_arrays) > len(operand_arrays):  # (operands, results)
                    result_arrays = result_arrays[len(operand_arrays):]
                found[(name, instruction)] = {"kind": base, "operands": operand_arrays, "results": result_arrays,
                                              "operand_bytes": _array_bytes(operand_arrays),
                                              "result_bytes": _array_bytes(result_arrays)}
                total["runs"][(name, instruction)] = total["runs"].get((name, instruction), 0) + 1
            elif opcode == "dot":
                lhs = _dims(shapes.get(operands[0], "")) if operands else []
                contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", attributes)
                depth = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
                total["flops"] += 2 * math.prod(_dims(shape)) * depth
            elif opcode == "convolution" and len(operands) > 1:  # TPU writes dots as convolutions
                kernel = _dims(shapes.get(operands[1], ""))
                labels = re.search(r"dim_labels=[^_]*_([^-]*)->", attributes)
                if labels and "o" in labels.group(1) and len(labels.group(1)) == len(kernel):
                    out_features = kernel[labels.group(1).index("o")]
                    total["flops"] += 2 * math.prod(_dims(shape)) * math.prod(kernel) // max(out_features, 1)
            if opcode == "while":
                body = re.search(r"body=%([^\s,]+)", attributes)
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', attributes)
                trips = int(trips.group(1)) if trips else _trip_count_from_condition(
                    computations, re.search(r"condition=%([^\s,]+)", attributes))
                if trips is None:
                    unknown_trip_counts += 1
                if body:
                    add(total, cost(body.group(1)), trips if trips is not None else 1)
                continue
            if opcode == "conditional":
                branches = re.findall(r"%([^\s,{}]+)", " ".join(re.findall(
                    r"(?:branch_computations=\{[^}]*\}|true_computation=%\S+|false_computation=%\S+)", attributes)))
                if branches:
                    add(total, max((cost(b) for b in branches), key=lambda c: c["flops"]))
                continue
            for called in re.findall(r"(?:calls|to_apply)=%([^\s,]+)", attributes):
                if opcode in ("fusion", "call", "async-start") or called in computations and opcode.endswith("start"):
                    add(total, cost(called))
        memo[name] = total
        return total

    result = cost(entry) if entry else zero()
    collective_list = []
    for key, runs in result["runs"].items():
        collective = dict(found[key], runs=int(runs))
        collective["bytes"] = int(runs) * max(collective["operand_bytes"], collective["result_bytes"])
        collective_list.append(collective)
    collective_list.sort(key=lambda c: -c["bytes"])
    by_kind = {kind: sum(c["bytes"] for c in collective_list if c["kind"] == kind) for kind in COLLECTIVE_KINDS}
    counts = {kind: sum(c["runs"] for c in collective_list if c["kind"] == kind) for kind in COLLECTIVE_KINDS}
    largest = {"bytes": 0, "kind": None, "shape": None}
    for c in collective_list:
        size = max(c["operand_bytes"], c["result_bytes"])
        if size > largest["bytes"]:
            arrays = c["operands"] if c["operand_bytes"] >= c["result_bytes"] else c["results"]
            largest = {"bytes": size, "kind": c["kind"],
                       "shape": " ".join(f"{dtype}[{','.join(map(str, dims))}]" for dtype, dims in arrays)}
    return {"flops": int(result["flops"]), "collective_bytes": int(sum(by_kind.values())),
            "collective_bytes_by_kind": by_kind, "collectives": counts,
            "collective_operand_bytes": int(sum(c["runs"] * c["operand_bytes"] for c in collective_list)),
            "collective_list": collective_list, "largest_collective": largest,
            "unknown_trip_counts": unknown_trip_counts}


# --------------------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------------------


def plan(model_name_or_path: str | os.PathLike, *, method: str, mesh_shape: str | dict,
         per_device_train_batch_size: int, max_length: int, gradient_checkpointing: bool = False, bf16: bool = False,
         topology: str | None = None, hbm_gib: float | None = None, gradient_accumulation_steps: int = 1,
         max_prompt_length: int | None = None, max_completion_length: int | None = None,
         config_overrides: dict | None = None, lora: dict | None = None,
         in_process: bool | None = None) -> dict[str, Any]:
    """Compile `method`'s real train step for a mesh of simulated devices and report its per-device cost.

    `model_name_or_path`: a Hugging Face `config.json` or the directory holding one (no weights are read).
    `mesh_shape`: `"data=1,fsdp=64,tensor=1"` or a dict. `topology`: a TPU topology name for
    `jax.experimental.topologies.get_topology_desc` (e.g. `"v5p:4x4x4"`; needs `libtpu`, extra `tpu-plan`);
    otherwise CPU devices, `mesh` many, in a child process when this one has fewer. `config_overrides`: other
    fields of the method's config (`{"precompute_ref_log_probs": True, "beta": 0.04}`). GRPO/RLOO plan the
    update on a rollout batch of `max_prompt_length + max_completion_length` tokens (default: `max_length` split in
    half). `lora`: LoRA adapters on the model (`jaxpt.lora.LoraConfig` fields, `{"lora_r": 16,
    "lora_target_modules": ["all-linear"]}`): the step trains only them, so parameters and optimizer state are the
    adapters' while the frozen base is an argument beside them (and DPO/KTO's reference is the base with the
    adapters off, no copy). `in_process`: force (True) or forbid (False) compiling here; default: here when enough
    devices exist.

    Returns a dict (also the JSON line `jaxpt plan` prints last): `devices`, `mesh`, `method`, `backend`,
    `params`, `tokens_per_device`, `argument_bytes`, `output_bytes`, `alias_bytes`, `temp_bytes`, `peak_bytes`
    (at least argument + temp + unaliased output), `flops` (matmul flops per device, loops counted fully),
    `matmul_params` (all but the input embedding table), `flops_per_param_token` (flops / (matmul_params x
    tokens_per_device), the decoder layers' parameters divided by the "tensor" size: a tensor group splits its
    rows' layer matmuls, while each of its devices runs the output projection whole; a training step is about 6, 8
    with gradient checkpointing, +2 per reference forward, plus attention), `xla_flops`, `collective_bytes`,
    `collectives`, `compile_seconds`, `use_peft`,
    `trainable_params` and `frozen_params` (under LoRA: the adapters, and the base), `trainable_bytes`,
    `frozen_bytes`, `optimizer_state_bytes` (whole, over all devices), and with `hbm_gib`: `hbm_bytes`, `fits`.
    """
    mesh_sizes = parse_mesh(mesh_shape)
    directory = config_dir(model_name_or_path)
    request = dict(model_name_or_path=str(directory), method=method, mesh_shape=mesh_sizes,
                   per_device_train_batch_size=per_device_train_batch_size, max_length=max_length,
                   gradient_checkpointing=bool(gradient_checkpointing), bf16=bool(bf16), topology=topology,
                   hbm_gib=hbm_gib, gradient_accumulation_steps=gradient_accumulation_steps,
                   max_prompt_length=max_prompt_length, max_completion_length=max_completion_length,
                   config_overrides=dict(config_overrides or {}), lora=_lora_fields(lora))
    # Validate everything the user gave here, before any compile or child process.
    method_config(method, **{k: request[k] for k in (
        "per_device_train_batch_size", "max_length", "gradient_checkpointing", "bf16", "gradient_accumulation_steps",
        "max_prompt_length", "max_completion_length", "config_overrides")})
    if hbm_gib is not None and hbm_gib <= 0:
        raise ValueError(f"hbm_gib={hbm_gib} must be > 0 (the memory of one device, GiB).")
    num_devices = math.prod(mesh_sizes.values())
    if topology is not None:
        _require_libtpu(topology)
        return _plan_here(request)
    import jax

    if in_process is None:
        in_process = len(jax.devices()) >= num_devices
    if in_process:
        if len(jax.devices()) < num_devices:
            raise ValueError(f"in_process=True, but this process has {len(jax.devices())} devices and mesh "
                             f"{mesh_sizes} needs {num_devices}: leave in_process unset to plan in a child process.")
        return _plan_here(request)
    return _plan_in_child(request, num_devices)


def _lora_fields(lora: dict | None) -> dict | None:
    """The LoRA options as `LoraConfig` fields (validated here, before any compile), or None without LoRA."""
    if not lora:
        return None
    import dataclasses

    from jaxpt.lora import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(lora) - known)
    if unknown:
        raise ValueError(f"lora={lora!r} has unknown fields {unknown}; LoraConfig's are {sorted(known)}.")
    config = LoraConfig(**{**lora, "use_peft": True})
    return dataclasses.asdict(config)


def _plan_in_child(request: dict, num_devices: int) -> dict:
    """Run the plan in `python -m jaxpt.plan` with `num_devices` CPU devices; its last stdout line is the JSON."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    package_root = str(Path(__file__).resolve().parent.parent)  # the jaxpt this process runs, also in the child
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    process = subprocess.run([sys.executable, "-m", "jaxpt.plan", "--request_json", json.dumps(request)],
                             env=env, capture_output=True, text=True)
    lines = process.stdout.strip().splitlines()
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"The planning child process failed (exit code {process.returncode}):\n"
                           f"{process.stderr[-4000:]}")
    return json.loads(lines[-1])


def _require_libtpu(topology: str) -> None:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ValueError(f"topology={topology!r} compiles for TPU, which needs the libtpu wheel: pip install "
                         "'jaxpt[tpu-plan]' (libtpu at the version jax pins), or leave --topology out to plan on "
                         "CPU devices.") from None


def _topology_mesh(topology: str, mesh_sizes: dict[str, int]):
    """A mesh over the devices of a TPU topology description (compile-only; no TPU needed, libtpu is)."""
    _require_libtpu(topology)
    import jax
    from jax.experimental import topologies
    from jax.sharding import AxisType

    from jaxpt.sharding import MESH_AXES

    description = topologies.get_topology_desc(topology, "tpu")
    devices = description.devices
    needed = math.prod(mesh_sizes.values())
    if len(devices) != needed:
        raise ValueError(f"topology={topology!r} has {len(devices)} devices but mesh {mesh_sizes} needs {needed}: "
                         "make data * fsdp * tensor equal the topology's chip count.")
    shape = tuple(mesh_sizes[name] for name in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _plan_here(request: dict) -> dict:
    """Build, lower and compile in this process (enough devices, or a TPU topology)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxpt.models
    from jaxpt.lora import has_adapter_dropout
    from jaxpt.rollout import shared_prompt_group
    from jaxpt.sharding import batch_divisor, batch_sharding, make_mesh
    from jaxpt.train_state import TrainState, make_optimizer

    method = request["method"]
    mesh_sizes = request["mesh_shape"]
    config = method_config(method, **{k: request[k] for k in (
        "per_device_train_batch_size", "max_length", "gradient_checkpointing", "bf16", "gradient_accumulation_steps",
        "max_prompt_length", "max_completion_length", "config_overrides")})
    module = method_module(method)
    if request["topology"]:
        mesh = _topology_mesh(request["topology"], mesh_sizes)
    else:
        mesh = make_mesh(**mesh_sizes, devices=jax.devices()[:math.prod(mesh_sizes.values())])
    hf_config = jaxpt.models.load_hf_config(request["model_name_or_path"])
    num_labels = 1 if method == "reward" else None
    dtype = jnp.bfloat16 if config.bf16 else jnp.float32
    lora_config = None
    if request.get("lora"):
        from jaxpt.lora import LoraConfig, apply_lora

        lora_config = LoraConfig(**request["lora"])

    def build():
        model = jaxpt.models.from_config(hf_config, num_labels=num_labels, dtype=dtype)
        return model if lora_config is None else apply_lora(model, lora_config)

    model = nnx.eval_shape(build)
    jaxpt.models.set_gradient_checkpointing(model, config.gradient_checkpointing)
    tx, _ = make_optimizer(config, num_training_steps=1000)
    state = TrainState.create(model, tx, mesh=mesh)  # abstract: ShapeDtypeStructs with their shardings
    state_sharding = state.shardings(mesh)

    devices_in_batch = batch_divisor(mesh)
    micro_batch = config.per_device_train_batch_size * devices_in_batch
    if method in ("grpo", "rloo"):
        module.rollout_shape(config, devices_in_batch)  # TRL's divisibility rules, as train() checks them
    length = config.max_length if method not in ("grpo", "rloo") else None
    layout = batch_layout(method, config, micro_batch=micro_batch, length=length)
    sharding = batch_sharding(mesh, batch_axis=1)
    batch = {key: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype_name), sharding=sharding)
             for key, (shape, dtype_name) in layout.items()}
    extra = ()
    prompt_group = 1
    if method == "dpo":
        step = module.make_train_step(config, mesh=mesh, state_sharding=state_sharding)
        # the reference: a policy-shaped copy (under LoRA: the adapters switched off, joined with the frozen base)
        extra = (None if config.precompute_ref_log_probs else state.params,)
    elif method == "kto":
        reference = None if config.precompute_ref_log_probs else state.params
        step = module.make_train_step(config, mesh=mesh, state_sharding=state_sharding,
                                      ref_sharding=None if reference is None else state_sharding.params)
        extra = (reference,)
    elif method in ("grpo", "rloo"):  # each prompt runs once for its group, as train() runs it
        prompt_group = shared_prompt_group(config.num_generations, micro_batch, devices=devices_in_batch,
                                           adapter_dropout=has_adapter_dropout(model))
        step = module.make_train_step(config, mesh=mesh, state_sharding=state_sharding, prompt_group=prompt_group)
    else:
        step = module.make_train_step(config, mesh=mesh, state_sharding=state_sharding)

    start = time.perf_counter()
    compiled = step.lower(state, batch, *extra).compile()
    compile_seconds = time.perf_counter() - start

    memory = compiled.memory_analysis()
    argument = int(memory.argument_size_in_bytes)
    output = int(memory.output_size_in_bytes)
    alias = int(memory.alias_size_in_bytes)
    temp = int(memory.temp_size_in_bytes)
    peak = max(int(getattr(memory, "peak_memory_in_bytes", 0) or 0), argument + temp + max(output - alias, 0))
    xla_cost = compiled.cost_analysis()
    if isinstance(xla_cost, list):  # older jax: one dict per program
        xla_cost = xla_cost[0] if xla_cost else {}
    costs = hlo_costs(compiled.as_text())
    count = lambda tree: sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))  # noqa: E731
    size = lambda tree: sum(math.prod(leaf.shape) * leaf.dtype.itemsize  # noqa: E731
                            for leaf in jax.tree_util.tree_leaves(tree))
    params = count(state.params) + count(state.frozen)
    matmul = matmul_params(state.full_params(), classifier=num_labels is not None)
    per_device_matmul = matmul_params(state.full_params(), classifier=num_labels is not None,
                                      tensor=mesh_sizes.get("tensor", 1))
    tokens = tokens_per_device(method, config, length=length, devices_in_batch=devices_in_batch,
                               micro_batch=micro_batch, prompt_group=prompt_group)
    result = {
        "method": method, "model_type": hf_config.model_type, "devices": math.prod(mesh_sizes.values()),
        "mesh": mesh_sizes, "backend": f"tpu:{request['topology']}" if request["topology"] else jax.default_backend(),
        "params": int(params), "use_peft": lora_config is not None, "trainable_params": int(count(state.params)),
        "frozen_params": int(count(state.frozen)), "trainable_bytes": int(size(state.params)),
        "frozen_bytes": int(size(state.frozen)), "optimizer_state_bytes": int(size(state.opt_state)),
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "sequence_length": length if length is not None else config.max_prompt_length + config.max_completion_length,
        "gradient_checkpointing": config.gradient_checkpointing, "bf16": bool(config.bf16),
        "tokens_per_device": int(tokens), "prompt_group": prompt_group,
        "argument_bytes": argument, "output_bytes": output, "alias_bytes": alias, "temp_bytes": temp,
        "argument_plus_temp_bytes": argument + temp, "peak_bytes": peak,
        "matmul_params": int(matmul), "flops": costs["flops"],
        "flops_per_param_token": costs["flops"] / max(per_device_matmul * tokens, 1),
        "xla_flops": float(xla_cost.get("flops", 0.0)),
        "collective_bytes": costs["collective_bytes"], "collective_bytes_by_kind": costs["collective_bytes_by_kind"],
        "collectives": costs["collectives"], "collective_operand_bytes": costs["collective_operand_bytes"],
        "largest_collective": costs["largest_collective"],
        "unknown_trip_counts": costs["unknown_trip_counts"], "compile_seconds": round(compile_seconds, 2),
    }
    if request["hbm_gib"] is not None:
        result["hbm_bytes"] = int(request["hbm_gib"] * GIB)
        result["fits"] = peak <= result["hbm_bytes"]
    return result


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    """The human-readable summary `jaxpt plan` prints before its JSON line."""
    gib = lambda n: f"{n / GIB:.2f} GiB"
    mesh = ",".join(f"{k}={v}" for k, v in result["mesh"].items())
    rows = [
        ("method / model", f"{result['method']} / {result['model_type']}, {result['params'] / 1e9:.3f} B parameters"),
        ("trained", f"{result['trainable_params'] / 1e6:.3f} M parameters"
                    + (" (LoRA adapters; the base is frozen)" if result["use_peft"] else "")
                    + f", optimizer state {gib(result['optimizer_state_bytes'])} (all devices)"),
        ("devices", f"{result['devices']} ({result['backend']}), mesh {mesh}"),
        ("batch per device", f"{result['per_device_train_batch_size']} x {result['sequence_length']} tokens x "
                             f"{result['gradient_accumulation_steps']} accumulation"
                             + (f", each prompt once per {result['prompt_group']} completions"
                                if result.get("prompt_group", 1) > 1 else "")),
        ("arguments", gib(result["argument_bytes"])),
        ("outputs (aliased)", f"{gib(result['output_bytes'])} ({gib(result['alias_bytes'])})"),
        ("temporaries", gib(result["temp_bytes"])),
        ("arguments + temp", gib(result["argument_plus_temp_bytes"])),
        ("peak", gib(result["peak_bytes"])),
        ("flops", f"{result['flops']:.4g} ({result['flops_per_param_token']:.2f} x params x tokens)"),
        ("collective bytes", f"{gib(result['collective_bytes'])} in "
                             + ", ".join(f"{v} {k}" for k, v in result["collectives"].items() if v)),
        ("largest collective", f"{gib(result['largest_collective']['bytes'])} "
                               f"{result['largest_collective']['kind']} {result['largest_collective']['shape']}"),
        ("compile", f"{result['compile_seconds']:.1f} s"),
    ]
    if result["unknown_trip_counts"]:
        rows.append(("note", f"{result['unknown_trip_counts']} loop(s) of unknown trip count counted once: flops and "
                             "collective bytes are lower bounds"))
    if "fits" in result:
        rows.append(("fits", f"{'yes' if result['fits'] else 'NO'} in {gib(result['hbm_bytes'])}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxpt plan", description="Per-device memory, flops and collective traffic of a method's train step, "
        "compiled for a mesh of simulated devices (no weights needed). Other --FIELD VALUE pairs set fields of the "
        "method's config (e.g. --precompute_ref_log_probs true, --beta 0.04).")
    parser.add_argument("--model_name_or_path", required=True, help="a Hugging Face config.json or its directory")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--mesh", required=True, help="axis sizes, e.g. data=1,fsdp=64,tensor=1")
    parser.add_argument("--per_device_train_batch_size", type=int, required=True)
    parser.add_argument("--max_length", type=int, required=True, help="tokens per sequence (grpo/rloo: prompt + "
                        "completion, split in half unless --max_prompt_length / --max_completion_length)")
    parser.add_argument("--max_prompt_length", type=int, default=None)
    parser.add_argument("--max_completion_length", type=int, default=None)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", type=_bool, default=False)
    parser.add_argument("--bf16", type=_bool, default=False)
    parser.add_argument("--topology", default=None, help="TPU topology, e.g. v5p:4x4x4 (needs libtpu: pip install "
                        "'jaxpt[tpu-plan]')")
    parser.add_argument("--hbm_gib", type=float, default=None, help="memory per device (GiB): report whether it fits")
    return parser


def parse_overrides(method: str, extra: list[str]) -> dict:
    """`--FIELD VALUE` pairs -> method config fields, typed by `transformers.HfArgumentParser`."""
    if not extra:
        return {}
    from transformers import HfArgumentParser

    module = method_module(method)
    config_class = next(getattr(module, name) for name in dir(module)
                        if name.lower() == f"{method}config" and isinstance(getattr(module, name), type))
    parsed, = HfArgumentParser(config_class).parse_args_into_dataclasses(args=extra)
    named = {arg[2:].split("=")[0] for arg in extra if arg.startswith("--")}
    return {name: getattr(parsed, name) for name in named}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--request_json"]:  # the child process plan() starts
        print(json.dumps(_plan_here(json.loads(argv[1]))))
        return 0
    args, extra = build_parser().parse_known_args(argv)
    lora = None
    if any(arg.split("=")[0] in LORA_FLAGS for arg in extra):
        from transformers import HfArgumentParser

        from jaxpt.lora import LoraConfig

        lora_args, extra = HfArgumentParser(LoraConfig).parse_args_into_dataclasses(
            args=extra, return_remaining_strings=True)
        if not lora_args.use_peft:
            raise ValueError("LoRA options (--lora_r, --lora_target_modules, ...) without --use_peft: add --use_peft "
                             "to plan with adapters, or drop them.")
        lora = {k: v for k, v in vars(lora_args).items() if k != "use_peft"}
    result = plan(args.model_name_or_path, method=args.method, mesh_shape=args.mesh,
                  per_device_train_batch_size=args.per_device_train_batch_size, max_length=args.max_length,
                  gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16, topology=args.topology,
                  hbm_gib=args.hbm_gib, gradient_accumulation_steps=args.gradient_accumulation_steps,
                  max_prompt_length=args.max_prompt_length, max_completion_length=args.max_completion_length,
                  config_overrides=parse_overrides(args.method, extra), lora=lora)
    print(format_table(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
