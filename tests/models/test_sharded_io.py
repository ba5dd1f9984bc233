"""Loading and export at size: weights read straight into their shards on a mesh, export streamed one tensor at a
time (host memory bounded by the largest tensor), in the checkpoint's own dtype unless told otherwise."""

import json
import threading
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import psutil
import pytest
import torch
import transformers
from flax import nnx

import jaxpt.models
from jaxpt import cli, sft
from jaxpt.models import safetensors_io
from jaxpt.models.safetensors_io import INDEX_FILE, SafetensorsReader
from jaxpt.sharding import make_mesh, tree_shardings
from jaxpt.train_state import TrainState
from tests.models import parity

# Dimensions the 8-device meshes below divide (fsdp=4 x tensor=2).
CONFIG = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  initializer_range=0.1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    return parity.make_hf_checkpoint(transformers.LlamaForCausalLM, CONFIG, directory), directory


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory, checkpoint):
    hf_model, _ = checkpoint
    directory = tmp_path_factory.mktemp("llama_bf16")
    bf16 = transformers.LlamaForCausalLM(CONFIG).eval()
    bf16.load_state_dict(hf_model.state_dict())
    bf16.to(torch.bfloat16).save_pretrained(directory)
    return bf16, directory


def test_loading_on_a_mesh_reads_only_each_devices_shard(checkpoint, monkeypatch):
    _, directory = checkpoint
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    blocks = []  # (global shape, block shape) of every host block that went to a device
    original = jax.make_array_from_callback

    def recording(shape, sharding, callback, *args, **kwargs):
        def recorded(index):
            block = callback(index)
            blocks.append((tuple(shape), block.shape, sharding.shard_shape(tuple(shape))))
            return block

        return original(shape, sharding, recorded, *args, **kwargs)

    monkeypatch.setattr(jax, "make_array_from_callback", recording)
    monkeypatch.setattr(jax, "device_put", lambda *a, **k: pytest.fail("from_pretrained(mesh=) placed a whole array"))
    model = jaxpt.models.from_pretrained(directory, mesh=mesh)
    monkeypatch.undo()

    # every block read from the file is exactly one device's shard, never the whole tensor for a split one
    assert blocks and all(block == shard for _, block, shard in blocks)
    split = [(full, block) for full, block, _ in blocks if block != full]
    assert len(split) >= 8 * 9  # embed, lm_head and 7 stacked per-layer weights, on each of the 8 devices
    params = nnx.state(model, nnx.Param)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf.sharding, jax.sharding.NamedSharding) and leaf.sharding.mesh == mesh, name
        assert len(leaf.addressable_shards) == 8, name
        for shard in leaf.addressable_shards:
            assert shard.data.shape == leaf.sharding.shard_shape(leaf.shape), name
    up = model.model.layers.mlp.up_proj.weight[...]  # [layers, 128, 64] split tensor=2 x fsdp=4
    assert up.addressable_shards[0].data.shape == (2, 64, 16)
    embed = model.model.embed_tokens.weight[...]
    assert embed.addressable_shards[0].data.shape == (64, 16)

    ids, mask = parity.right_padded_batch(128, (20, 9), 20)
    expected = parity.hf_logits(checkpoint[0], ids, mask)
    parity.assert_close_on(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)), expected, mask)


def test_train_state_keeps_a_sharded_model_where_it_is(checkpoint):
    """train() builds TrainState.create(model, tx, mesh=mesh): a model loaded onto that mesh is not moved."""
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    model = jaxpt.models.from_pretrained(checkpoint[1], mesh=mesh)
    state = TrainState.create(model, optax.adamw(1e-3), mesh=mesh)
    loaded = jax.tree.leaves(nnx.state(model, nnx.Param))
    for before, after in zip(loaded, jax.tree.leaves(state.params), strict=True):
        assert after.sharding == before.sharding
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before))


def test_cli_loads_the_model_onto_the_runs_mesh_in_the_asked_dtype(bf16_checkpoint, tmp_path):
    _, directory = bf16_checkpoint
    config = sft.SFTConfig(output_dir=str(tmp_path), mesh_fsdp=4, mesh_tensor=2)
    for flag, expected in (("auto", jnp.bfloat16), ("float32", jnp.float32)):
        model_args = cli.ModelConfig(model_name_or_path=str(directory), dtype=flag)
        model = cli.load_model(str(directory), model_args, config)
        weight = model.model.layers.mlp.up_proj.weight[...]
        assert weight.dtype == expected
        assert weight.sharding.mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2}
        assert weight.addressable_shards[0].data.shape == (2, 64, 16)
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        cli.parse(sft.SFTConfig, ["--model_name_or_path", str(directory), "--dataset_name", "x", "--output_dir",
                                  str(tmp_path), "--dtype", "int8"])


def test_bf16_checkpoint_exports_bf16_by_default_and_dtype_overrides(bf16_checkpoint, tmp_path):
    bf16_model, directory = bf16_checkpoint
    model = jaxpt.models.from_pretrained(directory, mesh=make_mesh(fsdp=8))  # float32 parameters
    assert model.model.norm.weight[...].dtype == jnp.float32
    jaxpt.models.save_pretrained(model, tmp_path / "default")
    original, exported = SafetensorsReader(directory), SafetensorsReader(tmp_path / "default")
    assert exported.names() == original.names()
    for name in original.names():  # bfloat16 in, float32 in between, the very same bfloat16 out
        assert exported.dtype(name) == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(np.asarray(exported.get(name)), np.asarray(original.get(name)), err_msg=name)
    assert json.loads((tmp_path / "default" / "config.json").read_text())["dtype"] == "bfloat16"

    jaxpt.models.save_pretrained(model, tmp_path / "f32", dtype="float32")
    assert {SafetensorsReader(tmp_path / "f32").dtype(n) for n in original.names()} == {np.dtype(np.float32)}
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "f32").eval()
    assert reloaded.dtype == torch.float32
    ids, mask = parity.right_padded_batch(128, (20, 9), 20)
    parity.assert_close_on(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)),
                           parity.hf_logits(reloaded, ids, mask), mask)
    with pytest.raises(ValueError, match="dtype='int8' is not a floating dtype"):
        jaxpt.models.save_pretrained(model, tmp_path / "bad", dtype="int8")


def test_sharded_export_writes_an_index_and_loads_in_transformers(checkpoint, tmp_path):
    hf_model, directory = checkpoint
    model = jaxpt.models.from_pretrained(directory, mesh=make_mesh(data=1, fsdp=4, tensor=2))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(b"an earlier export")  # stale: would shadow the index
    jaxpt.models.save_pretrained(model, tmp_path / "out", max_shard_size="40KB")
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == files
    reader = SafetensorsReader(tmp_path / "out")
    assert set(index["weight_map"]) == set(reader.names()) == set(SafetensorsReader(directory).names())
    assert index["metadata"]["total_size"] == sum(reader.get(n).nbytes for n in reader.names())
    for file_name in files:  # each file within the limit unless it holds one larger tensor
        header, _ = safetensors_io.read_header(tmp_path / "out" / file_name)
        sizes = [e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k != "__metadata__"]
        assert sum(sizes) <= 40_000 or len(sizes) == 1
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = parity.right_padded_batch(128, (20, 9), 20)
    parity.assert_close_on(parity.hf_logits(reloaded, ids, mask), parity.hf_logits(hf_model, ids, mask), mask)


def test_multi_host_gather_path_replicates_then_copies_once():
    """What a process of a multi-host run does per tensor (arrays not fully addressable): replicate on the devices,
    copy one replica; exercised here on an 8-device sharded array in one process."""
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    values = np.arange(16 * 24, dtype=np.float32).reshape(16, 24)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor"))
    array = jax.device_put(values, sharding)
    np.testing.assert_array_equal(jaxpt.models._replicated_to_host(array), values)
    np.testing.assert_array_equal(jaxpt.models.gather_to_host(array), values)


def test_export_host_memory_is_bounded_by_the_largest_tensor(tmp_path):
    """A ~270 MB float32 model on 8 devices exports with host memory growing by a few of its 4 MB tensors, never
    by the model (gathering it whole, as export did before, grows it by the model's size)."""
    config = transformers.LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=2048, num_hidden_layers=16,
                                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
    mesh = make_mesh(fsdp=8)
    abstract = nnx.eval_shape(lambda: jaxpt.models.from_config(config))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    shardings = tree_shardings(abstract_params, mesh, abstract.partition_rules)
    fill = jax.jit(lambda: jax.tree.map(lambda leaf: jnp.full(leaf.shape, 0.01, leaf.dtype), abstract_params),
                   out_shardings=shardings)
    params = jax.block_until_ready(fill())
    model = nnx.merge(graphdef, params)
    model_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    largest = 512 * 2048 * 4  # one layer's up/gate/down projection
    assert 250e6 < model_bytes < 300e6

    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        jaxpt.models.save_pretrained(model, tmp_path, dtype=jnp.bfloat16, max_shard_size="50MB")
    finally:
        done.set()
        sampler.join()
    growth = peak - baseline
    assert growth < 12 * largest, f"export grew host memory by {growth / 1e6:.0f} MB (model {model_bytes / 1e6:.0f} MB)"
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) == 3 and (tmp_path / INDEX_FILE).exists()  # 135 MB of bfloat16 in files of <= 50 MB
    reader = SafetensorsReader(tmp_path)
    assert reader.dtype("model.layers.15.mlp.up_proj.weight") == ml_dtypes.bfloat16
    assert float(reader.get("model.layers.15.mlp.up_proj.weight")[3, 5]) == float(jnp.bfloat16(0.01))


WORKER = """
import os, sys
process_id, port, source, output = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id, initialization_timeout=120)
import jaxpt.models
from jaxpt.sharding import make_mesh
model = jaxpt.models.from_pretrained(source, mesh=make_mesh(data=1, fsdp=2, tensor=2))
assert not model.model.layers.mlp.up_proj.weight[...].is_fully_addressable
jaxpt.models.save_pretrained(model, output, dtype="bfloat16", max_shard_size="40KB")
jax.distributed.shutdown()
"""


@pytest.mark.slow  # two fresh processes (~20 s of CPU); test_multi_host_gather_path... covers the gather in one
def test_two_process_export_gathers_on_every_process_and_process_0_writes(checkpoint, tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    _, source = checkpoint
    (tmp_path / "worker.py").write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(root)}
    workers = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(i), str(port), str(source),
                                 str(tmp_path / f"out{i}")], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [worker.communicate(timeout=300)[0] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    assert [w.returncode for w in workers] == [0, 0], "\n".join(logs)[-3000:]
    assert not (tmp_path / "out1").exists()  # every process gathers, only process 0 writes
    exported, original = SafetensorsReader(tmp_path / "out0"), SafetensorsReader(source)
    assert (tmp_path / "out0" / INDEX_FILE).exists() and exported.names() == original.names()
    for name in original.names():
        expected = np.asarray(original.get(name)).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(np.asarray(exported.get(name)), expected, err_msg=name)
