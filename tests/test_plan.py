"""`jaxpt plan` and abstract `TrainState`s: a train step compiled for simulated devices without any weights."""

import json
import math
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest
import transformers
from flax import nnx

import jaxpt.models
from jaxpt import cli, plan
from jaxpt.sharding import make_mesh
from jaxpt.train_state import TrainState

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
KEYS = {"devices", "mesh", "method", "backend", "params", "argument_bytes", "output_bytes", "temp_bytes", "peak_bytes",
        "flops", "collective_bytes", "collectives", "compile_seconds", "fits"}


@pytest.fixture(scope="module")
def tiny_config_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_config")
    transformers.LlamaConfig(**TINY).save_pretrained(directory)
    assert not list(directory.glob("*.safetensors"))  # a config alone: nothing to load weights from
    return directory


def _tiny_model():
    return jaxpt.models.from_config(transformers.LlamaConfig(**TINY))


def test_create_on_an_abstract_model_with_a_mesh_matches_the_concrete_state():
    mesh = make_mesh(fsdp=8)
    tx = optax.adamw(1e-3)
    abstract = TrainState.create(nnx.eval_shape(_tiny_model), tx, mesh=mesh)
    concrete = TrainState.create(_tiny_model(), tx, mesh=mesh)
    abstract_leaves, concrete_leaves = jax.tree.leaves(abstract), jax.tree.leaves(concrete)
    assert len(abstract_leaves) == len(concrete_leaves) > 10
    for leaf, real in zip(abstract_leaves, concrete_leaves, strict=True):
        assert isinstance(leaf, jax.ShapeDtypeStruct)
        assert (leaf.shape, leaf.dtype) == (real.shape, real.dtype)
        assert leaf.sharding == real.sharding
    # The embedding is split over fsdp: the abstract state carries the partition rules' layout.
    embedding = abstract.params["model"]["embed_tokens"]["weight"].value
    assert embedding.sharding.spec != jax.sharding.PartitionSpec()
    assert jax.tree.structure(abstract) == jax.tree.structure(concrete)


def test_create_on_an_abstract_model_without_a_mesh_allocates_nothing():
    state = TrainState.create(nnx.eval_shape(_tiny_model), optax.adamw(1e-3))
    leaves = jax.tree.leaves(state)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state.params))
    moments = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state.opt_state))
    assert moments == 2 * params + 1  # Adam's mu and nu, and its step count


def test_hlo_costs_count_loop_bodies_as_often_as_they_run():
    mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
    sharded = lambda shape, spec: jax.ShapeDtypeStruct(shape, jnp.float32,
                                                       sharding=jax.sharding.NamedSharding(mesh, spec))
    layers, rows, width = 10, 64, 256
    weights = sharded((layers, width, width), jax.sharding.PartitionSpec(None, "x", None))
    inputs = sharded((rows, width), jax.sharding.PartitionSpec("x", None))

    def loss(w, x):
        out, _ = jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)
        return out.sum()

    compiled = jax.jit(jax.grad(loss)).lower(weights, inputs).compile()
    costs = plan.hlo_costs(compiled.as_text())
    # Forward, input-gradient and weight-gradient matmuls of every layer, on this device's quarter of the rows.
    assert costs["flops"] == 3 * layers * 2 * (rows // 4) * width * width
    assert costs["unknown_trip_counts"] == 0
    # Each layer's weight is gathered (forward and backward: 2 x 10 all-gathers of the whole weight from its
    # quarters) and its gradient all-reduced, every iteration; a collective counts the whole buffer it handles.
    assert costs["collectives"]["all-gather"] == 2 * layers
    assert costs["collective_bytes_by_kind"]["all-gather"] == 2 * layers * width * width * 4
    assert costs["collective_operand_bytes"] == 2 * layers * width * width * 4 // 4 + layers * width * width * 4
    assert costs["collective_bytes_by_kind"]["all-reduce"] == layers * width * width * 4
    assert costs["collective_bytes"] == sum(costs["collective_bytes_by_kind"].values())
    assert costs["largest_collective"]["bytes"] == width * width * 4


def test_plan_sft_in_process_reports_memory_flops_and_collectives(tiny_config_dir):
    result = plan.plan(tiny_config_dir / "config.json", method="sft", mesh_shape="data=1,fsdp=8,tensor=1",
                       per_device_train_batch_size=2, max_length=64, hbm_gib=1e-3)
    assert KEYS <= set(result)
    assert result["devices"] == 8 and result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    model = _tiny_model()
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert result["params"] == params
    assert result["matmul_params"] == params - TINY["vocab_size"] * TINY["hidden_size"]  # all but the lookup table
    assert result["tokens_per_device"] == 2 * 64
    # float32 parameters and Adam's two moments, split 8 ways (norm weights are not split), plus the batch.
    state_bytes = 3 * 4 * params / 8
    assert state_bytes <= result["argument_bytes"] <= 1.1 * state_bytes
    assert result["peak_bytes"] >= result["argument_bytes"] + result["temp_bytes"]
    # A training step: 6 x matmul parameters x tokens, plus attention's score and value matmuls.
    assert 6.0 <= result["flops_per_param_token"] <= 9.0
    assert result["collective_bytes"] > 0 and sum(result["collectives"].values()) > 0
    assert result["compile_seconds"] > 0 and result["backend"] == "cpu"
    assert result["fits"] is False  # 1 MiB is too little


def test_plan_on_a_tensor_axis_counts_a_devices_share(tiny_config_dir):
    """fsdp=4 x tensor=2: the two devices of a tensor group share their rows' layer matmuls, so a device's flops
    per (layer parameters / 2 + output projection) and token stay a training step's 6-9."""
    result = plan.plan(tiny_config_dir / "config.json", method="sft", mesh_shape="data=1,fsdp=4,tensor=2",
                       per_device_train_batch_size=2, max_length=64)
    assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2} and result["tokens_per_device"] == 2 * 64
    assert 6.0 <= result["flops_per_param_token"] <= 9.0


DPO_COMMON = dict(method="dpo", mesh_shape="fsdp=2", per_device_train_batch_size=1, max_length=32)
LORA_OPTIONS = {"lora_r": 2, "lora_target_modules": ["all-linear"]}


@pytest.fixture(scope="module")
def dpo_plan(tiny_config_dir):
    """The plan of full DPO fine-tuning, the reference forward in the step (compiled once: two tests read it)."""
    return plan.plan(tiny_config_dir, **DPO_COMMON)


@pytest.fixture(scope="module")
def dpo_lora_plan(tiny_config_dir):
    """The plan of DPO with LoRA adapters on the float base (compiled once: two tests read it)."""
    return plan.plan(tiny_config_dir, **DPO_COMMON, lora=LORA_OPTIONS)


def test_plan_dpo_counts_the_reference_forward(tiny_config_dir, dpo_plan):
    with_reference = dpo_plan
    precomputed = plan.plan(tiny_config_dir, **DPO_COMMON, config_overrides={"precompute_ref_log_probs": True})
    assert with_reference["tokens_per_device"] == precomputed["tokens_per_device"] == 2 * 32  # chosen + rejected
    # The in-step reference adds one forward pass (2 flops per parameter and token) and a policy-sized argument.
    extra = with_reference["flops_per_param_token"] - precomputed["flops_per_param_token"]
    assert 1.5 <= extra <= 2.5
    assert 6.0 <= precomputed["flops_per_param_token"] <= 9.0
    params_bytes = 4 * with_reference["params"] / 2
    assert with_reference["argument_bytes"] - precomputed["argument_bytes"] == pytest.approx(params_bytes, rel=0.1)


def test_plan_in_a_child_process_with_more_devices_and_no_weights(tmp_path):
    # Float32 weights and Adam moments of this config take ~33 GiB: more than this machine's memory. Planning
    # it must stay small, because nothing is allocated.
    config = transformers.LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                                      num_hidden_layers=1, num_attention_heads=64, num_key_value_heads=8)
    config.save_pretrained(tmp_path)
    argv = ["plan", "--model_name_or_path", str(tmp_path), "--method", "sft", "--mesh", "fsdp=16",
            "--per_device_train_batch_size", "1", "--max_length", "32", "--gradient_checkpointing", "true",
            "--bf16", "true", "--hbm_gib", "100", "--logits_chunk_size", "16"]
    process = subprocess.run([sys.executable, "-m", "jaxpt.cli", *argv], capture_output=True, text=True,
                             timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    lines = process.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert "arguments + temp" in process.stdout  # the table comes first
    assert result["devices"] == 16 and result["backend"] == "cpu" and result["gradient_checkpointing"]
    params = result["params"]
    assert params > 2.5e9
    assert 3 * 4 * params / 16 <= result["argument_bytes"] <= 1.05 * 3 * 4 * params / 16
    assert result["fits"] is True  # 100 GiB per device
    peak_rss_bytes = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert peak_rss_bytes < 0.2 * 3 * 4 * params  # far below the weights and moments it describes


def test_plan_rejects_bad_input_before_compiling(tiny_config_dir, tmp_path):
    common = dict(method="sft", mesh_shape="fsdp=8", per_device_train_batch_size=1, max_length=64)
    with pytest.raises(ValueError, match="method='ppo'"):
        plan.plan(tiny_config_dir, **{**common, "method": "ppo"})
    with pytest.raises(ValueError, match="unknown axes"):
        plan.plan(tiny_config_dir, **{**common, "mesh_shape": "fsdp=8,pipeline=2"})
    with pytest.raises(ValueError, match="AXIS=SIZE"):
        plan.plan(tiny_config_dir, **{**common, "mesh_shape": "fsdp:8"})
    with pytest.raises(ValueError, match=">= 1"):
        plan.plan(tiny_config_dir, **{**common, "mesh_shape": "fsdp=-1"})
    with pytest.raises(FileNotFoundError, match="No config.json"):
        plan.plan(tmp_path, **common)
    with pytest.raises(ValueError, match="not SFTConfig fields"):
        plan.plan(tiny_config_dir, **common, config_overrides={"beta": 0.1})
    with pytest.raises(ValueError, match="loss_type"):
        plan.plan(tiny_config_dir, **common, config_overrides={"loss_type": "nope"})
    with pytest.raises(ValueError, match="max_prompt_length"):
        plan.plan(tiny_config_dir, **common, max_prompt_length=8)
    with pytest.raises(ValueError, match="hbm_gib"):
        plan.plan(tiny_config_dir, **common, hbm_gib=0)


def test_rollout_lengths_split_max_length():
    assert plan.rollout_lengths(512, None, None) == (256, 256)
    assert plan.rollout_lengths(512, 100, None) == (100, 412)
    assert plan.rollout_lengths(512, None, 400) == (112, 400)
    assert plan.rollout_lengths(512, 64, 128) == (64, 128)


def test_grpo_batch_layout_is_the_rollout_arrays():
    config = plan.method_config("grpo", per_device_train_batch_size=2, max_length=96, gradient_checkpointing=False,
                                bf16=False, gradient_accumulation_steps=2, max_prompt_length=32,
                                max_completion_length=None, config_overrides={"beta": 0.04})
    layout = plan.batch_layout("grpo", config, micro_batch=16, length=None)
    assert layout["prompt_ids"] == ((2, 16, 32), "int32")
    assert layout["completion_mask"] == ((2, 16, 64), "int32")
    assert layout["advantages"] == ((2, 16), "float32")
    assert layout["ref_logps"] == ((2, 16, 64), "float32")  # beta != 0: the KL term needs them
    assert "old_logps" not in layout  # one optimizer step per rollout, one iteration: on-policy
    config.num_iterations = 2
    assert plan.batch_layout("grpo", config, micro_batch=16, length=None)["old_logps"] == ((2, 16, 64), "float32")


def test_topology_without_libtpu_names_the_extra(tiny_config_dir):
    try:
        import libtpu  # noqa: F401
        pytest.skip("libtpu is installed here: the TPU path is exercised by benchmarks/plan_8b.py --topology")
    except ImportError:
        pass
    with pytest.raises(ValueError, match=r"jaxpt\[tpu-plan\]"):
        cli.main(["plan", "--model_name_or_path", str(tiny_config_dir), "--method", "sft", "--mesh", "fsdp=8",
                  "--per_device_train_batch_size", "1", "--max_length", "64", "--topology", "v5p:2x2x2"])


@pytest.mark.parametrize("method, per_device, tokens, prompt_group, band", [
    ("kto", 1, 32, 1, (11.0, 15.0)),  # + the KL pairs' forward, the reference's two forwards, the mean-logits metric
    ("reward", 1, 2 * 32, 1, (6.0, 9.0)),  # chosen + rejected; no output projection over the vocabulary
    ("grpo", 1, 32, 1, (4.0, 9.0)),  # log-probs of the completion half only; 8 completions of one prompt over 8 devices
    # 2 completions of each prompt on each device (num_generations=2): each 16-token prompt runs once for both
    ("rloo", 2, 2 * 16 + 16, 2, (4.0, 9.0)),
])
def test_plan_other_methods_compile_their_collated_batches(tiny_config_dir, method, per_device, tokens, prompt_group,
                                                            band):
    result = plan.plan(tiny_config_dir, method=method, mesh_shape="fsdp=8", per_device_train_batch_size=per_device,
                       max_length=32)
    assert result["method"] == method and result["tokens_per_device"] == tokens
    assert result["prompt_group"] == prompt_group
    assert band[0] <= result["flops_per_param_token"] <= band[1]
    assert result["argument_bytes"] >= 3 * 4 * result["params"] / 8


def test_plan_with_lora_counts_adapters_and_holds_one_copy_of_the_base(tiny_config_dir, dpo_plan, dpo_lora_plan):
    """`plan(..., lora=...)`: the trained parameters are the adapters (the count apply_lora gives a real model),
    the optimizer state is theirs (AdamW: two moments), and the compiled DPO step takes one copy of the base (the
    frozen state; the reference is the adapters switched off), where full fine-tuning takes parameters, two moments
    and a reference copy: four. (`jaxpt plan --use_peft` on the command line: the QLoRA test below.)"""
    from jaxpt import lora

    full, adapted = dpo_plan, dpo_lora_plan
    model = lora.apply_lora(_tiny_model(), lora.LoraConfig(use_peft=True, **LORA_OPTIONS))
    adapters = lora.adapter_parameter_count(model)
    assert adapted["use_peft"] and not full["use_peft"]
    assert adapted["trainable_params"] == adapters and adapted["params"] == full["params"] + adapters
    assert adapted["frozen_params"] == full["params"] and full["trainable_params"] == full["params"]
    assert 2 * 4 * adapters <= adapted["optimizer_state_bytes"] <= 2 * 4 * adapters + 64
    base_bytes = 4 * full["params"]
    per_device = lambda result: result["argument_bytes"] * result["devices"]  # noqa: E731  (fsdp: split evenly)
    assert 4 * base_bytes <= per_device(full) < 4.2 * base_bytes
    assert base_bytes <= per_device(adapted) < 1.3 * base_bytes, (per_device(adapted), base_bytes)

    with pytest.raises(ValueError, match="without --use_peft"):
        plan.main(["--model_name_or_path", str(tiny_config_dir), "--method", "sft", "--mesh", "fsdp=2",
                   "--per_device_train_batch_size", "1", "--max_length", "32", "--lora_r", "4"])


def test_plan_with_qlora_counts_the_quantized_base(tiny_config_dir, dpo_lora_plan, capsys):
    """`jaxpt plan --use_peft --load_in_4bit`: the frozen base is the NF4 one (the bytes a real quantized model's
    state holds), smaller than LoRA's float base; int8 lies in between. (The float base's plan is the LoRA DPO one:
    the frozen and trained bytes do not depend on the method.)"""
    from jaxpt import lora, quantize

    common = dict(method="sft", mesh_shape="fsdp=2", per_device_train_batch_size=1, max_length=32)
    options = LORA_OPTIONS
    float_base = dpo_lora_plan
    assert plan.main(["--model_name_or_path", str(tiny_config_dir), "--method", "sft", "--mesh", "fsdp=2",
                      "--per_device_train_batch_size", "1", "--max_length", "32", "--use_peft", "--lora_r", "2",
                      "--lora_target_modules", "all-linear", "--load_in_4bit"]) == 0
    printed = capsys.readouterr().out
    nf4 = json.loads(printed.strip().splitlines()[-1])
    assert nf4["use_peft"] and nf4["trainable_params"] < nf4["params"] / 10
    assert "(LoRA adapters; the base is frozen)" in printed
    int8 = plan.plan(tiny_config_dir, **common, lora={**options, "load_in_8bit": True})
    real = lora.apply_lora(_tiny_model(), lora.LoraConfig(use_peft=True, load_in_4bit=True, **options))
    assert nf4["frozen_bytes"] == quantize.parameter_bytes(TrainState.create(real, optax.adamw(1e-3)).frozen)
    assert nf4["frozen_bytes"] < int8["frozen_bytes"] < float_base["frozen_bytes"]
    assert nf4["trainable_bytes"] == float_base["trainable_bytes"]  # the same adapters
    with pytest.raises(ValueError, match="--use_peft"):
        plan.main(["--model_name_or_path", str(tiny_config_dir), "--method", "sft", "--mesh", "fsdp=2",
                   "--per_device_train_batch_size", "1", "--max_length", "32", "--load_in_4bit"])
