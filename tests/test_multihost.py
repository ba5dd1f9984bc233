"""Several processes: `jaxpt sft|dpo|kto|reward|grpo` (and packed SFT) on 2 CPU processes (2 devices each, a
coordinator on 127.0.0.1) give the metrics of one process with 4 devices, write one metrics.jsonl and one final/, and
resume after a stop or a kill (on 2 processes, or on 1); processes whose batches disagree get a clear error, not a
crash inside the collective.

To keep the suite fast, a pair of processes is started once and runs the commands one after another (`RUNNER_*`:
`jaxpt.cli.main` calls, as `jaxpt <method>` would, in processes with their own XLA_FLAGS; conftest's 8 devices are
for this process); a second pair resumes. The 1-process runs they are compared with run in this process on 4 of
its 8 devices (`--mesh_fsdp 4`), meanwhile.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import transformers

import jaxpt.models
from jaxpt import distributed
from jaxpt.sft import SFTConfig
from tests.conftest import TEST_XLA_FLAGS
from tests.helpers import arithmetic_texts, char_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parent.parent
# Seconds for one run (all its processes): a hang fails the test instead of blocking the suite. Generous, since the
# first pair runs six commands while the other test worker and this process's 1-process runs share the CPUs (on a
# loaded 2-core CI machine it took over 420 s).
TIMEOUT = int(os.environ.get("JAXPT_TEST_MULTIHOST_TIMEOUT", "1200"))
KILL_AT_CALL = "JAXPT_TEST_KILL_AT_REWARD_CALL"
_reward_calls = 0


def digits_or_kill(completions, **kwargs):
    """A dense toy reward (digits per character); on its call number $JAXPT_TEST_KILL_AT_REWARD_CALL it SIGKILLs
    its own process instead, as a crash in the middle of a run would (every process scores every rollout)."""
    global _reward_calls
    _reward_calls += 1
    if _reward_calls == int(os.environ.get(KILL_AT_CALL, "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


RUNNER_START = """
import faulthandler, json, signal, sys
faulthandler.register(signal.SIGUSR1, all_threads=True)  # Run.wait's stack dump on a timeout
from jaxpt import cli, distributed
commands, flags = json.loads(sys.argv[1]), sys.argv[2:]
given = dict(zip(flags[::2], flags[1::2]))  # the process flags, else the JAX_* variables
distributed.initialize(given.get("--coordinator_address"), *(int(given[name]) if name in given else None
                                                             for name in ("--num_processes", "--process_id")))
print("=== checks", flush=True)
"""
RUNNER_COMMANDS = """
for number, argv in enumerate(commands):  # as `jaxpt <argv...>`, one after another in this process
    print(f"=== command {number}", flush=True)
    if cli.main(argv + flags):
        sys.exit(f"command {number} failed")
"""


class Run:
    """`commands` (each the argv of a `jaxpt` command) run in turn by `num_processes` processes with `devices` CPU
    devices each, started at once: the process set-up from the flags (passed to every command too) or, with
    `env_setup`, from the JAX_* variables; `checks` (Python code) first. `wait()` returns the exit codes, killing
    (only) its own processes if they outlive the timeout."""

    def __init__(self, commands, *, num_processes, devices, log_dir, extra_env=None, env_setup=False, checks="",
                 compilation_cache=None):
        port = free_port()
        self.logs, self.processes = [], []
        log_dir.mkdir(parents=True, exist_ok=True)
        for index in range(num_processes):
            env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k == "JAX_PLATFORMS"}
            env.update(XLA_FLAGS=f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}",
                       JAX_PLATFORMS="cpu",
                       PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                       PYTHONUNBUFFERED="1", **(extra_env or {}))
            if compilation_cache:  # a later pair on the same devices reuses the programs an earlier one compiled
                env.update(JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
                           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
            command = [sys.executable, "-c", RUNNER_START + checks + RUNNER_COMMANDS, json.dumps(commands)]
            if env_setup:
                env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
                           JAX_PROCESS_ID=str(index))
            else:
                command += ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(num_processes),
                            "--process_id", str(index)]
            log = log_dir / f"process{index}.log"
            self.logs.append(log)
            with open(log, "w") as out:
                self.processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=out,
                                                       stderr=subprocess.STDOUT, start_new_session=True))

    def wait(self, timeout=TIMEOUT) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in self.processes]
        except subprocess.TimeoutExpired:
            pass
        for process in self.processes:  # every thread's Python stack into its log, to show where each waits
            if process.poll() is None:
                process.send_signal(signal.SIGUSR1)
        time.sleep(5)
        self.kill()
        pytest.fail(f"timed out after {timeout}s:\n{self.output()}")

    def check(self) -> None:
        codes = self.wait()
        assert codes == [0] * len(codes), self.output()

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # its own session: this run's process and children
                process.wait()

    def output(self, tail: int = 3000) -> str:
        """Each process's last command and the end of its log (after a timeout, its threads' Python stacks)."""
        parts = []
        for log in self.logs:
            text = log.read_text()
            last = [line for line in text.splitlines() if line.startswith("=== ")][-1:] or ["(none)"]
            parts.append(f"--- {log.name}, last started: {last[0]}\n{text[-tail:]}")
        return "\n".join(parts)

    def section(self, part, process=0) -> str:
        """What process `process` printed during command number `part` (or `"checks"`)."""
        text = self.logs[process].read_text()
        mark = "=== checks\n" if part == "checks" else f"=== command {part}\n"
        assert mark in text, self.output()
        return text.split(mark, 1)[1].split("=== command ", 1)[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("multihost")
    tokenizer = char_tokenizer()
    model_dir = directory / "model"
    tokenizer.save_pretrained(model_dir)
    jaxpt.models.save_pretrained(tiny_llama(len(tokenizer)), model_dir)
    texts = arithmetic_texts(64)
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": str(int(r["completion"]) + 2)}
             for r in texts]
    prompts = [{"prompt": f"{a}+{b}=", "solution": str(a + b)} for a in range(4) for b in range(4)]
    unpaired = [{"prompt": r["prompt"], "completion": r["completion"] if i % 2 else str(int(r["completion"]) + 2),
                 "label": bool(i % 2)} for i, r in enumerate(texts)]
    files = {}
    for name, rows in (("sft", texts), ("dpo", pairs), ("grpo", prompts), ("kto", unpaired), ("reward", pairs)):
        files[name] = directory / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": str(model_dir), **{k: str(v) for k, v in files.items()}}


def read_metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(ours, expected):
    """Same steps and keys; every number within 1e-5 relative (the losses are what the issue asks for)."""
    assert [r["step"] for r in ours] == [r["step"] for r in expected]
    for mine, theirs in zip(ours, expected, strict=True):
        assert set(mine) == set(theirs)
        for key, value in theirs.items():
            if isinstance(value, float):
                np.testing.assert_allclose(mine[key], value, rtol=1e-5, atol=1e-6, err_msg=f"step {theirs['step']} "
                                                                                           f"{key}")
            else:
                assert mine[key] == value, key


def assert_one_run_written(output_dir):
    """Process 0 alone writes metrics.jsonl and final/; nothing per-process beside them."""
    assert sorted(os.listdir(output_dir)) == ["checkpoints", "final", "metrics.jsonl"]


def assert_export_matches(final_dir):
    """The 2-process export loads in transformers and gives jaxpt's logits."""
    import torch

    hf = transformers.AutoModelForCausalLM.from_pretrained(final_dir).eval()
    ids = np.array([[5, 9, 3, 7, 2, 11, 4, 6]])
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(jaxpt.models.from_pretrained(final_dir)(ids))
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def assert_own_share(run, part, *, prepared, of):
    """Each process tokenized only the examples of its own rows (`prepared` of the dataset's `of`) in command
    `part`: process 0 says so, and every process's tokenizing progress bar counts `prepared` rows (processes other
    than 0 log warnings only)."""
    assert f"Process 0 prepares {prepared} of the {of} examples" in run.section(part), run.output()
    for process in range(len(run.logs)):
        assert f"| {prepared}/{prepared} [" in run.section(part, process), run.output()


# name: (command, dataset, options). Each runs 2 steps on 2 processes (GRPO: 4, killed in its third) and on 1.
COMMANDS = {
    "sft": ("sft", "sft", ["--max_length", "16", "--per_device_train_batch_size", "2", "--learning_rate", "0.003"]),
    # DPO with the reference log-probs computed inside the step
    "dpo": ("dpo", "dpo", ["--max_length", "16", "--per_device_train_batch_size", "2", "--learning_rate", "0.003",
                           "--beta", "0.5"]),
    # KTO: desirable examples only pushed up, fast, so the KL estimate of step 2 (from the mismatched pairs) is > 0
    "kto": ("kto", "kto", ["--max_length", "16", "--per_device_train_batch_size", "2", "--learning_rate", "0.03",
                           "--undesirable_weight", "0"]),
    "reward": ("reward", "reward", ["--max_length", "6", "--per_device_train_batch_size", "2",
                                    "--learning_rate", "0.003"]),
    "packed": ("sft", "sft", ["--max_length", "16", "--per_device_train_batch_size", "2", "--learning_rate", "0.003",
                              "--packing", "true"]),
    # GRPO with a KL term, so the reference log-probs run on the 2-process mesh too; 4 prompts a rollout, split over
    # the 4 devices (each process tokenizes only its 2 rows' prompts)
    "grpo": ("grpo", "grpo", ["--max_steps", "4", "--reward_funcs", "tests.test_multihost.digits_or_kill",
                              "--num_generations", "2", "--per_device_train_batch_size", "2",
                              "--max_completion_length", "6", "--learning_rate", "0.03", "--beta", "0.04"]),
}
NAMES = list(COMMANDS)
ONE_PROCESS = ["--mesh_fsdp", "4"]  # in this process: 4 of conftest's 8 devices, the 2 processes' device count


def command(inputs, name, output_dir, *extra):
    method, dataset, options = COMMANDS[name]
    return [method, "--model_name_or_path", inputs["model"], "--dataset_name", inputs[dataset], "--output_dir",
            str(output_dir), "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "3", "--save_steps", "2",
            "--lr_scheduler_type", "constant", *options, *extra]


def two_steps(name):
    return [] if name == "grpo" else ["--max_steps", "2"]


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    """Two pairs of processes and the 1-process runs they are compared with (in this process, meanwhile):
    - `first` (process set-up from the flags): the error checks (`CHECKS`), then 2 steps of each command; GRPO's
      processes SIGKILL themselves while scoring its third rollout (the last command);
    - `resumed` (set-up from the JAX_* variables): SFT from its step-2 checkpoint to step 4, GRPO after the kill;
    - 1 process: every command (SFT and GRPO 4 steps), and SFT resumed to step 4 from a copy of the 2-process
      run's step-2 checkpoint."""
    from jaxpt import cli

    root = tmp_path_factory.mktemp("runs")
    first = Run([command(inputs, name, root / "two" / name, *two_steps(name)) for name in NAMES], num_processes=2,
                devices=2, log_dir=root / "logs_first", extra_env={KILL_AT_CALL: "3"}, checks=CHECKS,
                compilation_cache=root / "compiled")
    try:
        for name in NAMES:
            steps = ["--max_steps", "4"] if name == "sft" else two_steps(name)
            assert cli.main(command(inputs, name, root / "one" / name, *steps, *ONE_PROCESS)) == 0
        first_codes = first.wait()
    finally:
        first.kill()
    before_resume = {name: read_metrics(root / "two" / name) for name in ("sft", "grpo")}
    shutil.copytree(root / "two" / "sft", root / "two_then_one")
    resume = ["--resume_from_checkpoint", "latest"]
    resumed = Run([command(inputs, "sft", root / "two" / "sft", "--max_steps", "4", *resume),
                   command(inputs, "grpo", root / "two" / "grpo", *resume)], num_processes=2, devices=2,
                  log_dir=root / "logs_resumed", env_setup=True, compilation_cache=root / "compiled")
    try:
        assert cli.main(command(inputs, "sft", root / "two_then_one", "--max_steps", "4", *resume,
                                *ONE_PROCESS)) == 0
        resumed.check()
    finally:
        resumed.kill()
    return {"root": root, "first": first, "first_codes": first_codes, "resumed": resumed,
            "before_resume": before_resume}


def check_sft_on_two_processes_matches_one_and_resumes(runs):
    """2 processes x 2 devices, each tokenizing only its rows: 2 steps, then a resumed run to step 4, equal to an
    uninterrupted 4-step run of one process with 4 devices. The step-2 checkpoint of 2 processes also resumes on
    1 process (4 devices) with the same metrics."""
    root, first, resumed = runs["root"], runs["first"], runs["resumed"]
    expected = read_metrics(root / "one" / "sft")
    assert "Trained 2 steps" in first.section(NAMES.index("sft")), first.output()
    assert_own_share(first, NAMES.index("sft"), prepared=8, of=64)  # 2 steps x 8 rows, 4 on each process's devices
    assert_same_metrics(runs["before_resume"]["sft"], expected[:2])
    assert "Resumed from" in resumed.section(0)
    assert_own_share(resumed, 0, prepared=8, of=64)  # only the rows of steps 3-4: not those trained on already
    assert "the rows it feeds over steps 3-4" in resumed.section(0)
    assert_same_metrics(read_metrics(root / "two" / "sft"), expected)
    assert_one_run_written(root / "two" / "sft")
    assert sorted(os.listdir(root / "two" / "sft" / "checkpoints")) == ["2", "4"]
    assert_export_matches(root / "two" / "sft" / "final")
    assert_same_metrics(read_metrics(root / "two_then_one"), expected)  # resumed on 1 process


def check_dpo_kto_reward_and_packed_sft_on_two_processes_match_one(runs):
    """DPO, KTO (each process also prepares the example before each of its rows: its KL partner), the reward model
    (which drops pairs over max_length) and packed SFT (whose bins need every length: each process first measures
    a block of the dataset, then tokenizes the examples of its rows): 2 processes equal 1."""
    root, first = runs["root"], runs["first"]
    for name in ("dpo", "kto", "reward", "packed"):
        assert "Trained 2 steps" in first.section(NAMES.index(name)), first.output()
        records = read_metrics(root / "two" / name)
        assert_same_metrics(records, read_metrics(root / "one" / name))
        assert_one_run_written(root / "two" / name)
    assert read_metrics(root / "two" / "dpo")[-1]["loss"] < read_metrics(root / "two" / "dpo")[0]["loss"]
    assert_own_share(first, NAMES.index("dpo"), prepared=8, of=64)
    assert read_metrics(root / "one" / "kto")[1]["kl"] > 0.1  # the pairs' numbers are compared, not only zeros
    # KTO in dataset order: process 0 feeds rows 0-3 of each step and reads row 7 too (row 0's partner)
    assert_own_share(first, NAMES.index("kto"), prepared=10, of=64)
    # 22 of the 64 pairs fit in 6 tokens; 4 rows a step on each process
    assert_own_share(first, NAMES.index("reward"), prepared=8, of=22)
    assert "Dropped 42 of 64 preference pairs" in first.section(NAMES.index("reward"))
    # packed: 8 of the packed rows (2 steps x 4 rows per process); each process measured its 32-example block
    packed = NAMES.index("packed")
    assert "Process 0 prepares 8 of the " in first.section(packed)
    assert all("| 32/32 [" in first.section(packed, process) for process in (0, 1)), first.output()


def check_grpo_on_two_processes_matches_one_and_resumes_after_a_kill(runs):
    """GRPO: both processes are SIGKILLed while scoring the third rollout; the resumed run continues from the
    step-2 checkpoint and its metrics equal an uninterrupted single-process run."""
    root, codes, resumed = runs["root"], runs["first_codes"], runs["resumed"]
    # each process kills itself at its third reward call; one may instead be stopped by the run's coordination
    # service noticing the other's death first (process 0 hosts it): either way no process finishes
    assert -signal.SIGKILL in codes and 0 not in codes, (codes, runs["first"].output())
    assert [r["step"] for r in runs["before_resume"]["grpo"]] == [1, 2]
    # the rollouts' generate input [4 prompts, length] split over the 4 devices: process 0 tokenized the prompts of
    # its 2 rows of each of the 4 rollouts, then of the 2 still to run
    assert "Process 0 prepares 8 of the 16 examples" in runs["first"].section(NAMES.index("grpo")), \
        runs["first"].output()
    assert "Resumed from" in resumed.section(1)
    assert "Process 0 prepares 4 of the 16 examples: the rows it feeds over steps 3-4" in resumed.section(1)
    expected = read_metrics(root / "one" / "grpo")
    assert len({r["loss"] for r in expected}) > 1  # the rewards differ within groups: a real update
    assert_same_metrics(read_metrics(root / "two" / "grpo"), expected)
    assert_one_run_written(root / "two" / "grpo")


CHECKS = """
import jax, numpy as np
from jaxpt.sharding import agreed_max, make_mesh, shard_batch
mesh, index = make_mesh(), jax.process_index()
assert shard_batch({"input_ids": np.ones((2, 8), np.int32)}, mesh)["input_ids"].shape == (4, 8)
print("agreed", agreed_max(8 + index))
try:
    shard_batch({"input_ids": np.ones((2, 8 + index), np.int32), "loss_mask": np.ones((2, 8), np.int32)}, mesh)
except ValueError as error:
    print("error", error)

from jaxpt.rollout import score_own_groups
def length_reward(completions, **kwargs):  # fails on process 1's group only
    assert "bad" not in completions, "a reward function failed"
    return [float(len(c)) for c in completions]
texts = ["a", "bb", "ccc", "dddd"] * 2
print("rewards", score_own_groups([length_reward], prompts=texts, completions=texts, completion_ids=[[1]] * 8,
                                  columns={}, group_size=4).ravel().tolist())
texts[5] = "bad"
try:
    score_own_groups([length_reward], prompts=texts, completions=texts, completion_ids=[[1]] * 8, columns={},
                     group_size=4)
except (AssertionError, RuntimeError) as error:
    print("scoring", type(error).__name__, error)

distributed.check_same_data([{"input_ids": np.arange(3)}, {"input_ids": np.arange(5)}], what="SFT examples")
try:
    distributed.check_same_data([{"input_ids": np.arange(3 + index)}], what="SFT examples")
except ValueError as error:
    print("data", error)
"""


def check_processes_with_different_batch_shapes_get_a_clear_error(runs):
    """Rows padded to different lengths on the two processes: a ValueError on both naming the field and each
    process's shape (without the check, gloo fails with 'Received data size doesn't match expected size').
    Rollout scoring shared among processes: each scores its own group, all get every reward, and a reward
    function failing on one process fails every process (none waits for the others forever). Processes that
    prepared different data are told so before training. (The first pair's checks, before its commands.)"""
    first = runs["first"]
    for process in (0, 1):
        text = first.section("checks", process)
        assert "agreed 9" in text
        assert ("error shard_batch: the 2 processes disagree on the batch's shapes (field 'input_ids': process 0: "
                "(2, 8) int32, process 1: (2, 9) int32)") in text, text
        assert "rewards [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]" in text  # each scored one group; both have all
        assert "data The processes prepared different SFT examples (process 0: 1 examples, digest" in text
    assert "scoring AssertionError a reward function failed" in first.section("checks", 1)
    assert "scoring RuntimeError Scoring the rollout failed on process(es) [1]" in first.section("checks", 0)


def test_commands_on_two_processes(runs):
    """One test for the checks on the pairs of processes: each test worker (pytest -n) that ran a test using `runs`
    would start its own pairs (minutes each)."""
    check_processes_with_different_batch_shapes_get_a_clear_error(runs)
    check_sft_on_two_processes_matches_one_and_resumes(runs)
    check_dpo_kto_reward_and_packed_sft_on_two_processes_match_one(runs)
    check_grpo_on_two_processes_matches_one_and_resumes_after_a_kill(runs)


@pytest.mark.parametrize(("fields", "message"), [
    (dict(num_processes=2), "num_processes given without coordinator_address"),
    (dict(coordinator_address="localhost"), "must be HOST:PORT"),
    (dict(coordinator_address="localhost:99999", num_processes=2, process_id=0), "must be HOST:PORT"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=2), "needs process_id too"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=2), "process_id=2 must be below"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=0, process_id=0), "num_processes=0 must be >= 1"),
])
def test_bad_process_fields_fail_at_config_time(fields, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        SFTConfig(output_dir=str(tmp_path), **fields)


def test_process_set_up_from_the_environment(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert distributed.resolve() == ("10.0.0.1:1234", 4, 3)
    assert distributed.resolve("10.0.0.2:99", 2, 0) == ("10.0.0.2:99", 2, 0)  # flags win over the environment
    monkeypatch.setenv("JAX_PROCESS_ID", "4")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID=4 must be below JAX_NUM_PROCESSES=4"):
        distributed.resolve()
    monkeypatch.setenv("JAX_PROCESS_ID", "three")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='three' must be an integer"):
        distributed.resolve()
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name)
    assert distributed.resolve() == (None, None, None)  # nothing set: one process, no auto-detection


def test_data_share_feeds_the_global_batches_from_the_rows_it_needs():
    """`DataShare` on one process, not whole: it prepares exactly the examples the run's steps use (max_steps
    below one epoch: not all of them), and each step's rows are the global batch's examples."""
    from jaxpt.data import step_indices
    from jaxpt.sharding import make_mesh

    mesh = make_mesh()
    share = distributed.DataShare(50, 16, micro_batch=8, mesh=mesh, seed=1, shuffle=True, start_step=0,
                                  total_steps=2, whole=False)
    order = step_indices(50, 16, seed=1, shuffle=True)
    steps = [next(order)[1] for _ in range(2)]
    np.testing.assert_array_equal(share.needed, np.sort(np.concatenate(steps)))
    assert len(share.needed) == 32
    examples = [{"index": int(i)} for i in share.needed]  # what preparing share.select(dataset) gives
    assert [row["index"] for row in distributed.select_rows([{"index": i} for i in range(50)], share.needed)] == \
        share.needed.tolist()
    rows, counted = share.step_examples(steps[1], examples)
    assert [row["index"] for row in rows] == steps[1].tolist() == [row["index"] for row in counted]
    share.agree_steps(examples, lambda rows, counted: (max(r["index"] for r in rows), len(counted)), start_step=1,
                      total_steps=2)  # the steps' values up front (one collective on several processes)
    assert share.step_totals(1, rows, counted, None) == (int(steps[1].max()), 16)


def test_resumed_data_share_prepares_only_the_steps_still_to_run(tmp_path):
    """A run resumed at step 2 of 4 prepares the rows of steps 3-4 only (`loop.planned_start_step`: the newest
    checkpoint, known before resume), and feeds each of them the rows the whole share feeds; a resume that restores
    an older step than planned (the newest was damaged) stops with the fix."""
    from jaxpt import loop
    from jaxpt.data import step_indices
    from jaxpt.sharding import make_mesh

    config = SFTConfig(output_dir=str(tmp_path), resume_from_checkpoint="latest")
    assert loop.planned_start_step(config) == 0  # no checkpoint yet
    for name in ("2", "4", "6.orbax-checkpoint-tmp-1"):  # the last one half-written
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert loop.planned_start_step(config) == 4
    config.resume_from_checkpoint = str(tmp_path / "checkpoints" / "2")
    assert loop.planned_start_step(config) == 2
    config.resume_from_checkpoint = None
    assert loop.planned_start_step(config) == 0

    args = dict(micro_batch=8, mesh=make_mesh(), seed=1, shuffle=True, total_steps=4)
    whole = distributed.DataShare(50, 16, start_step=0, whole=True, **args)
    resumed = distributed.DataShare(50, 16, start_step=2, whole=False, **args)
    order = step_indices(50, 16, seed=1, shuffle=True)
    steps = [next(order)[1] for _ in range(4)]
    np.testing.assert_array_equal(resumed.needed, np.unique(np.concatenate(steps[2:])))
    examples = [{"index": i} for i in range(50)]
    for indices in steps[2:]:
        rows, _ = resumed.step_examples(indices, [examples[i] for i in resumed.needed])
        assert rows == whole.step_examples(indices, examples)[0]
    loop.check_planned_start(resumed, 2)
    loop.check_planned_start(whole, 0)
    with pytest.raises(ValueError, match="Resumed from step 0, but this run prepared its share .* after step 2.*"
                                         "run the same command again"):
        loop.check_planned_start(resumed, 0)


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "wrapped"])
def test_packed_share_gives_the_rows_one_process_packs(strategy):
    """`sft._packed_share` (forced to share on one process): its rows are exactly the ones `prepare_dataset`
    packs from the whole dataset at the positions it feeds, though it tokenized the others only to measure them."""
    import datasets

    from jaxpt import sft
    from jaxpt.sharding import make_mesh

    tokenizer = char_tokenizer()
    rows = arithmetic_texts(40) + [{"prompt": "1+2+3+4+5=", "completion": "15 and more digits"}]
    dataset = datasets.Dataset.from_list(rows)
    config = SFTConfig(output_dir="unused", max_length=12, packing=True, packing_strategy=strategy, max_steps=2)
    share_args = dict(micro_batch=8, mesh=make_mesh(), seed=0, shuffle=True, start_step=0, whole=False)
    ours, share = sft._packed_share(dataset, tokenizer, config, 8, share_args)
    expected = sft.prepare_dataset(dataset, tokenizer, config)
    assert share.num_examples == len(expected) and len(ours) == len(share.needed) == 16
    for row, index in zip(ours, share.needed, strict=True):
        for key in ("input_ids", "loss_mask", "segment_ids"):
            np.testing.assert_array_equal(row[key], expected[index][key])


@pytest.mark.parametrize("method", ["sft", "dpo", "reward"])
def test_eval_share_gives_each_process_its_rows_of_the_global_eval_batches(method, monkeypatch):
    """Two processes simulated in this one (`process_rows` patched: rows 0-3, then 4-7 of each eval batch of 8):
    each prepares only its rows' examples (and example 0, whose fields give the filler rows), and its eval batches
    hold exactly the rows of the one-process batches at its rows, padded to the one-process length though its own
    rows are shorter (the long example is process 1's); the last batch's missing rows are no-loss fillers. The
    reward model keeps the pairs within max_length first (row 13 is dropped) and gathers every pair's margin."""
    import datasets

    from jaxpt import data, dpo, reward, sft, sharding

    tokenizer = char_tokenizer()
    long_pair = {"prompt": "1+2+3+4+5+6+7+8=", "chosen": "36 is the sum", "rejected": "37 or so, I think"}
    if method == "sft":
        module, config = sft, SFTConfig(output_dir="unused")
        rows = arithmetic_texts(13)
        rows[5] = {"prompt": "1+2+3+4+5+6+7+8=", "completion": "36 is the sum of the first eight"}
        measure = lambda example: len(example["input_ids"])  # noqa: E731
    else:
        rows = [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(13)]
        rows[5] = long_pair
        module, config, measure = dpo, dpo.DPOConfig(output_dir="unused"), dpo._longest
        if method == "reward":
            rows = [{**row, "margin": float(i)} for i, row in enumerate(rows + [{**long_pair, "rejected": "x" * 60}])]
            module, config, measure = reward, reward.RewardConfig(output_dir="unused", max_length=40), reward._longest
    dataset = datasets.Dataset.from_list(rows)
    kept = np.arange(13)
    if method == "reward":
        kept = reward._kept_pairs(dataset, tokenizer, config, what="reward eval dataset")
        assert kept.tolist() == list(range(13))

    def batches_of(examples, share):
        return [batch[0] if method == "reward" else batch
                for batch in module.eval_batches(examples, share, data.length_buckets(64), 0)]

    everything = module.prepare_dataset(dataset, tokenizer, config)
    expected = batches_of(everything, distributed.EvalShare(13, 8, mesh=None, whole=True))
    assert len(expected) == 2 and expected[0]["input_ids"].shape[1] == 8

    shares, prepared, local = [], [], []
    for process in range(2):
        own = np.arange(8) // 4 == process
        monkeypatch.setattr(sharding, "process_rows", lambda mesh, rows, own=own: (own, own))
        share = distributed.EvalShare(13, 8, mesh=sharding.make_mesh(), whole=False)
        examples = module.prepare_dataset(distributed.select_rows(dataset, kept[share.needed]), tokenizer, config)
        share.agree(examples, measure)  # one process: its own lengths; two: their max (simulated below)
        shares.append(share), prepared.append(examples), local.append(share.lengths)
    assert shares[0].needed.tolist() == [0, 1, 2, 3, 8, 9, 10, 11] and shares[1].needed.tolist() == [0, 4, 5, 6, 7, 12]
    agreed = np.maximum(*local)  # what `agree`'s collective gives every process
    assert local[0][0] < agreed[0] == measure(everything[5])  # process 0 alone would pad batch 0 shorter
    for process, (share, examples) in enumerate(zip(shares, prepared, strict=True)):
        share.lengths = agreed
        rows_of = np.arange(8) // 4 == process
        batches = batches_of(examples, share)
        assert len(batches) == 2
        for batch, reference in zip(batches, expected, strict=True):
            assert sorted(batch) == sorted(reference)
            for key, value in batch.items():
                assert value.shape == reference[key].shape, (process, key)
                np.testing.assert_array_equal(value[:, rows_of], reference[key][:, rows_of])
    last = expected[1]
    mask = {"sft": "loss_mask", "dpo": "completion_mask", "reward": "attention_mask"}[method]
    assert last[mask][0, :5, ..., 1:].sum() > 0 and last[mask][0, 5:, ..., 1:].sum() == 0  # 3 fillers: no loss
    if method == "reward":  # `_prepare_eval` gathers each process's margins: together, every pair's
        margins = np.zeros(13, np.float32)
        for share, examples in zip(shares, prepared, strict=True):
            margins[share.needed] = [e["margin"] for e in examples]
        np.testing.assert_array_equal(margins, [e["margin"] for e in everything])
        assert [real for _, real in reward.eval_batches(everything, shares[0], data.length_buckets(64), 0)] == [8, 5]


def test_eval_share_of_a_process_without_eval_rows(monkeypatch):
    """An eval set of 3 examples in batches of 8: process 1 (rows 4-7) feeds none of them; it still prepares
    example 0 (the filler's fields) and feeds a batch of fillers, measured 0 so the others' length wins."""
    from jaxpt import sharding

    monkeypatch.setattr(sharding, "process_rows", lambda mesh, rows: (np.arange(rows) >= 4,) * 2)
    share = distributed.EvalShare(3, 8, mesh=sharding.make_mesh(), whole=False)
    assert share.needed.tolist() == [0] and share.num_batches == 1
    examples = [{"index": 0}]
    assert share.measure(examples, lambda example: 100).tolist() == [0]
    assert share.batch_rows(0, examples, "filler") == (["filler"] * 8, None)
