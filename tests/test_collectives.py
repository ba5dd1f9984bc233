"""The compiled SFT, DPO and GRPO steps are data-parallel in their log-prob loss and FSDP in their weights: on an
fsdp=8 mesh no collective moves a `[tokens, vocab]` buffer (only the parameter-shaped embedding / output-projection
gathers and gradient reductions touch the vocabulary), no gradient is all-reduced at its full size (each is
reduce-scattered to its shards), a bfloat16 step gathers its weights in bfloat16, and the collective traffic per
device stays within a few parameter copies.

The collectives are read from the compiled HLO text by `jaxpt.plan.hlo_costs` (the parser `jaxpt plan` reports
with), each weighted by the trip counts of the `while` loops (scans) around it."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpt.models
from jaxpt import dpo, grpo, sft
from jaxpt.models import llama
from jaxpt.models.layers import BATCH_AXES, constrain, embedding_lookup
from jaxpt.plan import hlo_costs
from jaxpt.rollout import shared_prompt_group
from jaxpt.sharding import make_mesh, partition_spec, shard_batch
from jaxpt.train_state import TrainState
from tests.helpers import tiny_llama_config

# hidden 48 (shard 6) is no power of two, so a parameter-shaped [vocab, 48] buffer never looks like a
# [tokens, vocab] one: the token counts here (rows x chunk) are powers of two.
VOCAB, HIDDEN, FSDP = 32768, 48, 8
ROWS, SEQ, CHUNK = 8, 64, 16  # logits_chunk_size 16: several chunks per row, so the chunk scan is exercised


def collectives(hlo: str) -> list[dict]:
    """Every collective of a compiled module (`hlo_costs`' `collective_list`): kind, operand and result arrays,
    how many times it runs per step and the bytes it moves in all."""
    return hlo_costs(hlo)["collective_list"]


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
                    bad.append((collective["kind"], (dtype, dims)))
    return bad


def full_size_gradient_all_reduces(found: list[dict], params) -> list[tuple[str, tuple[int, ...]]]:
    """All-reduced buffers shaped like a whole weight matrix (a decoder layer's, without its layer axis, or the
    embedding / output projection): a gradient summed at full size on every device instead of reduce-scattered
    to its FSDP shards. (1-D weights, the norms, are not split and may be all-reduced.)"""
    shapes = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        stacked = "layers" in jax.tree_util.keystr(path)
        shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
        if len(shape) >= 2:
            shapes.update({shape, shape[::-1]})  # in either layout
    return [(dtype, dims) for c in found if c["kind"] == "all-reduce" for dtype, dims in c["operands"]
            if dims in shapes]


def gather_dtypes(lowered_text: str) -> list[str]:
    """Element types of the all-gathers written in the lowered (StableHLO) program, before XLA's passes: what the
    step asks the network to move. (XLA:CPU then widens bfloat16 collectives to float32, so the compiled CPU HLO
    cannot show it; TPU and GPU move bfloat16.)"""
    return [m.group(1) for m in re.finditer(r'"stablehlo.all_gather"\(.*?\(tensor<[0-9x]*x(\w+)>\)',
                                            lowered_text)]


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(data=1, fsdp=FSDP, tensor=1)


def _tiny(dtype=jnp.float32):
    config = tiny_llama_config(VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
    return jaxpt.models.from_config(config, dtype=dtype)


@pytest.fixture(scope="module")
def model():
    return _tiny()


def _check(step, state, *args, bf16=False):
    lowered = step.lower(state, *args)
    found = collectives(lowered.compile().as_text())
    parameter_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
    total = sum(c["bytes"] for c in found)
    assert found, "no collectives found: the parser is broken or the step is not sharded"
    assert any(VOCAB in dims for c in found for _, dims in c["results"])  # the projection gather is seen
    assert vocabulary_sized(found) == []
    # every weight's gradient is reduce-scattered (the output projection's and each layer's, in the layer scan)
    assert full_size_gradient_all_reduces(found, state.params) == []
    scattered = {tuple(sorted(dims)) for c in found if c["kind"] == "reduce-scatter" for _, dims in c["operands"]}
    assert {(HIDDEN, VOCAB), (HIDDEN, 96), (HIDDEN, HIDDEN), (24, HIDDEN)} <= scattered, scattered  # in any layout
    assert total <= 4 * parameter_bytes, (total / parameter_bytes, found[:5])
    dtypes = gather_dtypes(lowered.as_text())
    assert "i32" in dtypes, dtypes  # the token ids, gathered in their FSDP group by the embedding lookup
    dtypes = [dtype for dtype in dtypes if dtype != "i32"]
    assert len(dtypes) >= 8, dtypes  # the output projection and every matrix of the layer, gathered in the step
    assert set(dtypes) == {"bf16" if bf16 else "f32"}, dtypes
    return total / parameter_bytes


def test_sft_step_is_data_parallel(mesh, tmp_path):
    """bfloat16 compute with gradient checkpointing: weights gathered in bfloat16 inside the checkpointed layer."""
    model = jaxpt.models.set_gradient_checkpointing(_tiny(jnp.bfloat16), True)
    cfg = sft.SFTConfig(output_dir=str(tmp_path), max_length=SEQ, per_device_train_batch_size=1,
                        logits_chunk_size=CHUNK, save_final_model=False, bf16=True, gradient_checkpointing=True)
    state = TrainState.create(model, optax.sgd(1.0), mesh=mesh)
    ones = np.ones((1, ROWS, SEQ), np.int32)
    batch = shard_batch({"input_ids": ones, "loss_mask": ones, "attention_mask": ones}, mesh, batch_axis=1)
    _check(sft.make_train_step(cfg, mesh=mesh, state_sharding=state.shardings(mesh)), state, batch, bf16=True)


def test_dpo_step_is_data_parallel(mesh, model, tmp_path):
    """8 pairs (16 rows), the reference parameters inside the step."""
    cfg = dpo.DPOConfig(output_dir=str(tmp_path), max_length=SEQ, per_device_train_batch_size=1,
                        logits_chunk_size=CHUNK, save_final_model=False)
    state = TrainState.create(model, optax.sgd(1.0), mesh=mesh)
    ones = np.ones((1, ROWS, 2, SEQ), np.int32)
    batch = shard_batch({"input_ids": ones, "attention_mask": ones, "completion_mask": ones}, mesh, batch_axis=1)
    ref_params = jax.tree.map(jnp.copy, state.params)
    _check(dpo.make_train_step(cfg, mesh=mesh, state_sharding=state.shardings(mesh)), state, batch, ref_params)


@pytest.mark.parametrize("per_device,prompt_group", [(1, 1), (4, 4)])
def test_grpo_step_is_data_parallel(mesh, model, tmp_path, per_device, prompt_group):
    """Each row with its own prompt, and (4 completions per device, one prompt per device) each prompt run once
    for its group, as `grpo.train` chooses (`rollout.shared_prompt_group`)."""
    cfg = grpo.GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=per_device,
                          max_completion_length=SEQ // 2, logits_chunk_size=CHUNK, save_final_model=False)
    rows = per_device * FSDP
    assert shared_prompt_group(cfg.num_generations, rows, devices=FSDP) == prompt_group
    state = TrainState.create(model, optax.sgd(1.0), mesh=mesh)
    ids = np.ones((1, rows, SEQ // 2), np.int32)
    floats = np.zeros((1, rows, SEQ // 2), np.float32)
    batch = shard_batch({"prompt_ids": ids, "prompt_mask": ids, "completion_ids": ids, "attention_mask": ids,
                         "completion_mask": ids, "advantages": np.ones((1, rows), np.float32), "old_logps": floats},
                        mesh, batch_axis=1)
    step = grpo.make_train_step(cfg, mesh=mesh, state_sharding=state.shardings(mesh), prompt_group=prompt_group)
    _check(step, state, batch)


def test_tensor_parallel_weights_stay_split(tmp_path):
    """On fsdp=4 x tensor=2 each layer's weights are gathered over "fsdp" only and their gradients reduce-scattered
    within their "tensor" half: no collective moves a whole MLP matrix (left to XLA, the gathered MLP weights and
    their gradients were made whole over "tensor" as well, which at Llama-3-8B shapes doubled the layers' traffic
    and undid the tensor-parallel split of the MLP)."""
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    cfg = sft.SFTConfig(output_dir=str(tmp_path), max_length=SEQ, per_device_train_batch_size=2,
                        logits_chunk_size=CHUNK, save_final_model=False)
    state = TrainState.create(_tiny(), optax.sgd(1.0), mesh=mesh)
    ones = np.ones((1, ROWS, SEQ), np.int32)
    batch = shard_batch({"input_ids": ones, "loss_mask": ones, "attention_mask": ones}, mesh, batch_axis=1)
    step = sft.make_train_step(cfg, mesh=mesh, state_sharding=state.shardings(mesh))
    found = collectives(step.lower(state, batch).compile().as_text())
    moved = {dims for c in found if c["kind"] != "all-reduce" for _, dims in c["operands"] + c["results"]}
    # halves over "tensor", whole over "fsdp": gate / up [96, 48] -> [48, 48], down [48, 96] -> [48, 48],
    # q [48, 48] -> [24, 48], o [48, 48] -> [48, 24]
    assert {(HIDDEN, HIDDEN), (24, HIDDEN), (HIDDEN, 24)} <= moved, moved
    assert not moved & {(96, HIDDEN), (HIDDEN, 96)}, moved  # a whole MLP matrix


@pytest.mark.parametrize("sizes,vocab", [(dict(data=2, fsdp=4), 4096), (dict(data=2, fsdp=2, tensor=2), 4096),
                                         (dict(fsdp=4, tensor=2), 4096), (dict(fsdp=4, tensor=2), 4095)])
def test_embedding_lookup_moves_only_own_rows(sizes, vocab):
    """The embedding lookup (`layers.embedding_lookup`) equals `jnp.take` in values and table gradient, in float32
    and bfloat16, and on meshes with a "data" or "tensor" axis no collective moves more than one device's share of
    the embedded batch: left to XLA, the lookup's partitioning replicated the whole embedded batch there
    ("Involuntary full rematerialization"). Only the table's own shards (its gradient summed over "data") are
    bigger. A vocabulary that "tensor" does not divide (4095) keeps the table whole over "tensor"."""
    hidden, rows, seq = 16, 8, 32
    mesh = make_mesh(**sizes)
    rng = np.random.default_rng(0)
    table = rng.normal(size=(vocab, hidden)).astype(np.float32)
    ids = rng.integers(0, vocab, size=(rows, seq)).astype(np.int32)
    weights = rng.normal(size=(rows, seq, hidden)).astype(np.float32)

    def loss(table, ids, dtype):  # the embedded rows split over the batch axes, as the models constrain them
        embedded = constrain(embedding_lookup(table, ids, dtype), BATCH_AXES, None, None)
        return jnp.sum(embedded.astype(jnp.float32) * weights)

    expected_gradient = np.zeros_like(table)
    np.add.at(expected_gradient, ids, weights)
    spec = partition_spec("model.embed_tokens.weight", table.shape, llama.PARTITION_RULES, mesh)
    with jax.set_mesh(mesh):
        placed = jax.device_put(table, jax.NamedSharding(mesh, spec))
        placed_ids = shard_batch({"ids": ids}, mesh)["ids"]
        for dtype in (jnp.float32, jnp.bfloat16):
            values = jax.jit(embedding_lookup, static_argnums=2)(placed, placed_ids, dtype)
            assert values.dtype == dtype
            np.testing.assert_array_equal(np.asarray(values), np.asarray(jnp.asarray(table[ids], dtype)))
        gradient_step = jax.jit(jax.grad(loss), static_argnums=2)
        np.testing.assert_allclose(np.asarray(gradient_step(placed, placed_ids, jnp.float32)), expected_gradient,
                                   rtol=1e-6, atol=1e-6)
        found = collectives(gradient_step.lower(placed, placed_ids, jnp.float32).compile().as_text())
    share = rows * seq * hidden // (mesh.shape["data"] * mesh.shape["fsdp"])  # one device's embedded rows
    table_shard = math.prod(table.shape) // math.prod(mesh.shape[axis] for axis in spec if axis)
    assert "all-to-all" in {c["kind"] for c in found}, found  # the rows handed to their devices
    oversized = [(c["kind"], dims) for c in found for _, dims in c["operands"] + c["results"]
                 if math.prod(dims) > (table_shard if {vocab, vocab // 2} & set(dims) else share)]
    assert oversized == []


def test_parser_sees_loops_and_flags_logits_buffers():
    """The HLO reader weights loop bodies by their trip count and flags a [tokens, vocab] buffer, not a
    parameter-shaped one, and a full-size all-reduced gradient, not a reduce-scattered one."""
    hlo = """HloModule m

%body (p: (s32[], f32[512,32768])) -> (s32[], f32[512,32768]) {
  %p = (s32[], f32[512,32768]{1,0}) parameter(0)
  %x = f32[512,32768]{1,0} get-tuple-element(%p), index=1
  %all-reduce.1 = f32[512,32768]{1,0} all-reduce(%x), channel_id=1, to_apply=%add
  %g = f32[96,48]{1,0} get-tuple-element(%p), index=2
  %all-reduce.3 = f32[96,48]{1,0} all-reduce(%g), channel_id=3, to_apply=%add
  %reduce-scatter.4 = f32[96,6]{1,0} reduce-scatter(%g), channel_id=4, dimensions={1}, to_apply=%add
  ROOT %t = (s32[], f32[512,32768]{1,0}) tuple(%i, %all-reduce.1)
}

ENTRY %main (a: f32[32768,6]) -> f32[32768,48] {
  %a = f32[32768,6]{1,0} parameter(0)
  %all-gather.2 = f32[32768,48]{1,0} all-gather(%a), dimensions={1}
  %w = (s32[], f32[512,32768]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = f32[32768,48]{1,0} copy(%all-gather.2)
}
"""
    found = sorted(collectives(hlo), key=lambda c: (c["kind"], -c["bytes"]))
    assert [(c["kind"], c["runs"], c["bytes"]) for c in found] == [
        ("all-gather", 1, 32768 * 48 * 4), ("all-reduce", 3, 3 * 512 * 32768 * 4), ("all-reduce", 3, 3 * 96 * 48 * 4),
        ("reduce-scatter", 3, 3 * 96 * 48 * 4)]
    assert vocabulary_sized(found) == [("all-reduce", ("f32", (512, 32768)))] * 2  # operand and result
    params = {"layers": {"up_proj": jnp.zeros((2, 96, 48))}, "lm_head": jnp.zeros((32768, 48))}
    assert full_size_gradient_all_reduces(found, params) == [("f32", (96, 48))]
    lowered = '%3 = "stablehlo.all_gather"(%2) <{all_gather_dim = 1 : i64}> : (tensor<96x6xbf16>) -> tensor<96x48xbf16>'
    assert gather_dtypes(lowered) == ["bf16"]
