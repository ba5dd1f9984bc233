"""Sharded == unsharded: meshes of several shapes give the same logits and gradients as no mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx
from jax.sharding import PartitionSpec

import jaxpt.models
from jaxpt.losses.logprobs import masked_mean, next_token_targets, token_logps
from jaxpt.sharding import make_mesh, path_name, shard_batch, tree_shardings
from jaxpt.train_state import TrainState
from tests.models import parity

CONFIG = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  pad_token_id=0)
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_mesh")
    parity.make_hf_checkpoint(transformers.LlamaForCausalLM, CONFIG, directory)
    return directory


@pytest.fixture(scope="module")
def batch():
    ids, mask = parity.right_padded_batch(96, (24, 24, 20, 17, 24, 9, 3, 24), 24, seed=5)
    return {"input_ids": ids, "attention_mask": mask}


def loss_and_grads(model, batch, mesh=None):
    """Mean next-token NLL and its gradients, jitted (inside the mesh context when there is one)."""
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        targets, target_mask = next_token_targets(batch["input_ids"], batch["attention_mask"])
        return -masked_mean(token_logps(logits, targets), target_mask), logits

    def run(params, batch):
        if mesh is None:
            return jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jax.value_and_grad(loss_fn, has_aux=True)(params, batch)

    (loss, logits), grads = jax.jit(run)(params, batch)
    return float(loss), np.asarray(logits), {k: np.asarray(v) for k, v in nnx.to_flat_state(grads)}


@pytest.fixture(scope="module")
def reference(checkpoint, batch):
    model = jaxpt.models.from_pretrained(checkpoint)
    return loss_and_grads(model, {k: jnp.asarray(v) for k, v in batch.items()})


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_mesh_gives_same_logits_and_gradients(shape, checkpoint, batch, reference):
    mesh = make_mesh(data=shape[0], fsdp=shape[1], tensor=shape[2])
    model = jaxpt.models.from_pretrained(checkpoint, mesh=mesh)
    # Parameters really are split over the mesh, following the Llama partition rules; the stacked layers'
    # leading layer axis stays whole.
    q_proj = model.model.layers.self_attn.q_proj.weight[...]
    down_proj = model.model.layers.mlp.down_proj.weight[...]
    embed = model.model.embed_tokens.weight[...]
    fsdp = "fsdp" if shape[1] > 1 else None
    tensor = "tensor" if shape[2] > 1 else None
    assert q_proj.sharding.spec == PartitionSpec(None, tensor, fsdp)
    assert down_proj.sharding.spec == PartitionSpec(None, fsdp, tensor)
    assert embed.sharding.spec == PartitionSpec(tensor, fsdp)
    if shape[1] * shape[2] > 1:
        assert q_proj.addressable_shards[0].data.size < q_proj.size

    loss, logits, grads = loss_and_grads(model, shard_batch(batch, mesh), mesh)
    ref_loss, ref_logits, ref_grads = reference
    assert abs(loss - ref_loss) < 1e-5
    mask = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(logits[mask], ref_logits[mask], atol=2e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        np.testing.assert_allclose(grad, ref_grads[name], atol=2e-6, rtol=1e-4, err_msg=str(name))


def test_train_state_on_mesh_shards_optimizer_moments(checkpoint):
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    model = jaxpt.models.from_pretrained(checkpoint, mesh=mesh)
    state = TrainState.create(model, optax.adamw(1e-3), mesh=mesh)
    mu = by_name(state.opt_state[0].mu)  # adamw = chain(scale_by_adam, ...): first moments mirror the params
    assert mu["model.layers.mlp.gate_proj.weight"].sharding.spec == PartitionSpec(None, "tensor", "fsdp")
    assert state.step.sharding.spec == PartitionSpec()
    shardings = by_name(state.shardings(mesh).params)
    assert shardings["model.layers.mlp.down_proj.weight"].spec == PartitionSpec(None, "fsdp", "tensor")
    assert shardings["model.layers.input_layernorm.weight"].spec == PartitionSpec(None, None)


def by_name(tree):
    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_sharded_train_step_matches_unsharded(checkpoint, batch):
    """The jit + in/out shardings + donation pattern: one AdamW step on (2,2,2) equals the unsharded step."""

    def one_step(mesh):
        model = jaxpt.models.from_pretrained(checkpoint, mesh=mesh)
        state = TrainState.create(model, optax.adamw(1e-2), mesh=mesh)

        def step(state, batch):
            def loss_fn(params):
                logits = state.replace(params=params).model()(batch["input_ids"],
                                                               attention_mask=batch["attention_mask"])
                targets, target_mask = next_token_targets(batch["input_ids"], batch["attention_mask"])
                return -masked_mean(token_logps(logits, targets), target_mask)

            loss, grads = jax.value_and_grad(loss_fn)(state.params)
            return state.apply_gradients(grads), loss

        shardings = state.shardings(mesh)
        batch_in = shard_batch(batch, mesh)
        if mesh is None:
            jitted = jax.jit(step, donate_argnums=0)
        else:
            batch_sharding = jax.tree.map(lambda x: x.sharding, batch_in)
            jitted = jax.jit(step, in_shardings=(shardings, batch_sharding),
                             out_shardings=(shardings, None), donate_argnums=0)
        state, loss = jitted(state, batch_in)
        return float(loss), {k: np.asarray(v) for k, v in nnx.to_flat_state(state.params)}, state

    loss, params, _ = one_step(None)
    mesh_loss, mesh_params, mesh_state = one_step(make_mesh(data=2, fsdp=2, tensor=2))
    assert abs(loss - mesh_loss) < 1e-5
    for name in params:
        np.testing.assert_allclose(mesh_params[name], params[name], atol=1e-5, err_msg=str(name))
    assert int(mesh_state.step) == 1


def test_make_mesh_validates_sizes():
    assert dict(make_mesh(data=2, fsdp=-1, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="data \\* fsdp \\* tensor"):
        make_mesh(data=3, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match="Only one mesh axis"):
        make_mesh(data=-1, fsdp=-1)


def test_shard_batch_rejects_indivisible_batch():
    mesh = make_mesh(data=2, fsdp=4, tensor=1)
    with pytest.raises(ValueError, match="multiple of data\\*fsdp"):
        shard_batch({"input_ids": np.zeros((6, 4), np.int32)}, mesh)


def test_tree_shardings_follow_rules_by_name():
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    stacked = {"self_attn": {"o_proj": {"weight": jnp.zeros((3, 32, 32))}},
               "input_layernorm": {"weight": jnp.zeros((3, 32))}}
    tree = {"model": {"layers": stacked, "norm": {"weight": jnp.zeros((32,))}},
            "lm_head": {"weight": jnp.zeros((96, 32))}, "count": jnp.zeros(()),
            "one_layer": {"layers": {0: {"self_attn": {"o_proj": {"weight": jnp.zeros((32, 32))}}}}}}
    rules = jaxpt.models.llama.PARTITION_RULES
    shardings = tree_shardings(tree, mesh, rules)
    # Rules describe one layer; stacked decoder layers [num_layers, ...] keep the layer axis unsharded.
    layers = shardings["model"]["layers"]
    assert layers["self_attn"]["o_proj"]["weight"].spec == PartitionSpec(None, "fsdp", "tensor")
    assert layers["input_layernorm"]["weight"].spec == PartitionSpec(None, None)
    one_layer = shardings["one_layer"]["layers"][0]["self_attn"]["o_proj"]["weight"]
    assert one_layer.spec == PartitionSpec("fsdp", "tensor")
    assert shardings["model"]["norm"]["weight"].spec == PartitionSpec(None)
    assert shardings["lm_head"]["weight"].spec == PartitionSpec("tensor", "fsdp")
    assert shardings["count"].spec == PartitionSpec()
