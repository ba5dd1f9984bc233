"""The compiled SFT, DPO and GRPO steps are data-parallel in their log-prob loss: on an fsdp=8 mesh no collective
moves a `[tokens, vocab]` buffer (only the parameter-shaped embedding / output-projection gathers and gradient
reductions touch the vocabulary), and the collective traffic per device stays within a few parameter copies.

The collectives are read from the compiled HLO text, each weighted by the trip counts of the `while` loops
(scans) around it, since one op in a loop body runs once per iteration."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpt import dpo, grpo, sft
from jaxpt.sharding import make_mesh, shard_batch
from jaxpt.train_state import TrainState
from tests.helpers import tiny_llama

# hidden 48 (shard 6) is no power of two, so a parameter-shaped [vocab, 48] buffer never looks like a
# [tokens, vocab] one: the token counts here (rows x chunk) are powers of two.
VOCAB, HIDDEN, FSDP = 32768, 48, 8
ROWS, SEQ, CHUNK = 8, 64, 16  # logits_chunk_size 16: several chunks per row, so the chunk scan is exercised
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
         "s64": 8, "u64": 8, "f64": 8}
ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*")


def _arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in ARRAY.findall(text)]


def _nbytes(arrays) -> int:
    return sum(BYTES[dtype] * math.prod(dims) for dtype, dims in arrays)


def _closing(text: str, depth: int) -> int:
    """Index of the parenthesis that brings `depth` open ones back to zero."""
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return index
    raise ValueError(f"unbalanced parentheses in {text[:200]!r}")


def _split_instruction(rest: str) -> tuple[str, str, str, str]:
    """`SHAPE opcode(operands), attributes` -> (shape, opcode, operands, attributes)."""
    if rest.startswith("("):  # a tuple shape, up to its matching parenthesis
        end = _closing(rest, 0)
        shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode, _, rest = rest.partition("(")
    end = _closing(rest, 1)
    return shape, opcode.strip(), rest[:end], rest[end + 1:]


def collectives(hlo: str) -> list[dict]:
    """Every collective of a compiled module: opcode, operand and result arrays, and how many times it runs."""
    shapes, computations, current = {}, {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$", line)
        if header and not INSTRUCTION.match(line):
            current = header.group(1)
            computations[current] = {"entry": line.startswith("ENTRY"), "instructions": []}
            continue
        match = INSTRUCTION.match(line)
        if match and current is not None:
            shape, opcode, operands, attributes = _split_instruction(line[match.end():])
            shapes[match.group(1)] = re.sub(r"/\*.*?\*/", "", shape)
            computations[current]["instructions"].append((opcode, operands, attributes, shape))

    # how often each computation runs: the entry once; a while body trip-count times its caller
    runs = {name: 1 for name, c in computations.items() if c["entry"]}
    pending = list(runs)
    while pending:
        caller = pending.pop()
        for opcode, _, attributes, _ in computations[caller]["instructions"]:
            trips = 1
            if opcode == "while":
                known = re.search(r'"known_trip_count":\{"n":"(\d+)"', attributes)
                assert known, f"a while loop without a known trip count: {attributes[:200]}"
                trips = int(known.group(1))
            for callee in re.findall(r"(?:body|condition|calls|to_apply|branch_computations=\{[^}]*)=?%([\w.\-]+)",
                                     attributes):
                if callee in computations and callee not in runs:
                    runs[callee] = runs[caller] * trips
                    pending.append(callee)

    found = []
    for name, computation in computations.items():
        for opcode, operands, _, shape in computation["instructions"]:
            base = opcode.removesuffix("-start")
            if base not in COLLECTIVES:
                continue
            operand_arrays = [a for op in re.findall(r"%([\w.\-]+)", operands) for a in _arrays(shapes.get(op, ""))]
            result_arrays = _arrays(re.sub(r"/\*.*?\*/", "", shape))
            if opcode.endswith("-start") and base == "all-gather":  # result (operands, gathered)
                result_arrays = result_arrays[len(operand_arrays):]
            found.append({"opcode": base, "operands": operand_arrays, "results": result_arrays,
                          "runs": runs.get(name, 1),
                          "bytes": max(_nbytes(operand_arrays), _nbytes(result_arrays)) * runs.get(name, 1)})
    return found


def vocabulary_sized(found: list[dict]) -> list[tuple[str, tuple[int, ...]]]:
    """Collective buffers with a vocabulary-sized dimension that are not a parameter ([vocab, hidden], whole or
    split over the mesh, in any layout): what a [tokens, vocab] logits buffer would show up as."""
    parameter_like = {HIDDEN, HIDDEN // FSDP}
    bad = []
    for collective in found:
        for dtype, dims in collective["operands"] + collective["results"]:
            if VOCAB in dims or VOCAB // FSDP in dims:
                vocab_dim = VOCAB if VOCAB in dims else VOCAB // FSDP
                others = math.prod(dims) // vocab_dim
                if others not in parameter_like:
                    bad.append((collective["opcode"], (dtype, dims)))
    return bad


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(data=1, fsdp=FSDP, tensor=1)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)


def _check(step, state, *args):
    found = collectives(step.lower(state, *args).compile().as_text())
    parameter_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
    total = sum(c["bytes"] for c in found)
    assert found, "no collectives found: the parser is broken or the step is not sharded"
    assert any(VOCAB in dims for c in found for _, dims in c["results"])  # the projection gather is seen
    assert vocabulary_sized(found) == []
    assert total <= 4 * parameter_bytes, (total / parameter_bytes, sorted(found, key=lambda c: -c["bytes"])[:5])
    return total / parameter_bytes


def test_sft_step_is_data_parallel(mesh, model, tmp_path):
    cfg = sft.SFTConfig(output_dir=str(tmp_path), max_length=SEQ, per_device_train_batch_size=1,
                        logits_chunk_size=CHUNK, save_final_model=False)
    state = TrainState.create(model, optax.sgd(1.0), mesh=mesh)
    ones = np.ones((1, ROWS, SEQ), np.int32)
    batch = shard_batch({"input_ids": ones, "loss_mask": ones, "attention_mask": ones}, mesh, batch_axis=1)
    _check(sft.make_train_step(cfg, mesh=mesh, state_sharding=state.shardings(mesh)), state, batch)


def test_dpo_step_is_data_parallel(mesh, model, tmp_path):
    """8 pairs (16 rows), the reference parameters inside the step."""
    cfg = dpo.DPOConfig(output_dir=str(tmp_path), max_length=SEQ, per_device_train_batch_size=1,
                        logits_chunk_size=CHUNK, save_final_model=False)
    state = TrainState.create(model, optax.sgd(1.0), mesh=mesh)
    ones = np.ones((1, ROWS, 2, SEQ), np.int32)
    batch = shard_batch({"input_ids": ones, "attention_mask": ones, "completion_mask": ones}, mesh, batch_axis=1)
    ref_params = jax.tree.map(jnp.copy, state.params)
    _check(dpo.make_train_step(cfg, mesh=mesh, state_sharding=state.shardings(mesh)), state, batch, ref_params)


def test_grpo_step_is_data_parallel(mesh, model, tmp_path):
    cfg = grpo.GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=1,
                          max_completion_length=SEQ // 2, logits_chunk_size=CHUNK, save_final_model=False)
    state = TrainState.create(model, optax.sgd(1.0), mesh=mesh)
    ids = np.ones((1, ROWS, SEQ // 2), np.int32)
    floats = np.zeros((1, ROWS, SEQ // 2), np.float32)
    batch = shard_batch({"prompt_ids": ids, "prompt_mask": ids, "completion_ids": ids, "attention_mask": ids,
                         "completion_mask": ids, "advantages": np.ones((1, ROWS), np.float32), "old_logps": floats},
                        mesh, batch_axis=1)
    _check(grpo.make_train_step(cfg, mesh=mesh, state_sharding=state.shardings(mesh)), state, batch)


def test_parser_sees_loops_and_flags_logits_buffers():
    """The HLO reader weights loop bodies by their trip count and flags a [tokens, vocab] buffer, not a
    parameter-shaped one."""
    hlo = """HloModule m

%body (p: (s32[], f32[512,32768])) -> (s32[], f32[512,32768]) {
  %p = (s32[], f32[512,32768]{1,0}) parameter(0)
  %x = f32[512,32768]{1,0} get-tuple-element(%p), index=1
  %all-reduce.1 = f32[512,32768]{1,0} all-reduce(%x), channel_id=1, to_apply=%add
  ROOT %t = (s32[], f32[512,32768]{1,0}) tuple(%i, %all-reduce.1)
}

ENTRY %main (a: f32[32768,6]) -> f32[32768,48] {
  %a = f32[32768,6]{1,0} parameter(0)
  %all-gather.2 = f32[32768,48]{1,0} all-gather(%a), dimensions={1}
  %w = (s32[], f32[512,32768]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = f32[32768,48]{1,0} copy(%all-gather.2)
}
"""
    found = sorted(collectives(hlo), key=lambda c: c["opcode"])
    assert [(c["opcode"], c["runs"], c["bytes"]) for c in found] == [
        ("all-gather", 1, 32768 * 48 * 4), ("all-reduce", 3, 3 * 512 * 32768 * 4)]
    assert vocabulary_sized(found) == [("all-reduce", ("f32", (512, 32768)))] * 2  # operand and result
