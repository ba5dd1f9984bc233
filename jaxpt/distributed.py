"""Process set-up for runs on several hosts (TPU pods, multi-node GPU clusters, several CPU processes).

Every process of a run starts the same command; before any JAX computation each one joins the run with
`jax.distributed.initialize`. jaxpt takes the three values from, in order:

1. the config fields / CLI flags `--coordinator_address HOST:PORT --num_processes N --process_id I`;
2. the environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`;
3. `--coordinator_address auto` (or `JAX_COORDINATOR_ADDRESS=auto`): plain `jax.distributed.initialize()`, which
   detects the cluster itself (Cloud TPU pods, SLURM, Open MPI, Kubernetes).

With none of them set, the run is single-host and nothing is initialised: auto-detection is never tried unasked
(on a login node it could wait for peers that never come). `output_dir` must be on a filesystem every process
sees (orbax checkpoints are written by all processes; process 0 alone writes metrics.jsonl and final/).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("jaxpt")

AUTO = "auto"
ENV_VARS = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
            "process_id": "JAX_PROCESS_ID"}


def check_process_fields(coordinator_address: str | None, num_processes: int | None, process_id: int | None, *,
                         source: str = "config") -> None:
    """`ValueError` naming the value and the fix unless the three describe a valid run: all unset (single host),
    `coordinator_address='auto'` (the others optional), or `HOST:PORT` with `num_processes >= 1` and
    `0 <= process_id < num_processes`. `source` says where they came from (config fields or environment)."""
    names = _names(source)
    if coordinator_address is None:
        given = [names[n] for n, v in (("num_processes", num_processes), ("process_id", process_id)) if v is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} given without {names['coordinator_address']}: pass the "
                             "coordinator's HOST:PORT (the same on every process; process 0 listens there), or "
                             f"{names['coordinator_address']}={AUTO} to let jax.distributed detect the cluster.")
        return
    if not isinstance(coordinator_address, str) or not coordinator_address.strip():
        raise ValueError(f"{names['coordinator_address']}={coordinator_address!r} must be HOST:PORT (e.g. "
                         f"10.0.0.1:1234) or {AUTO!r}.")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"{names['num_processes']}={num_processes} must be >= 1 (the number of processes of the "
                         "run, one per host).")
    if process_id is not None and process_id < 0:
        raise ValueError(f"{names['process_id']}={process_id} must be >= 0 (0 .. num_processes-1; process 0 runs "
                         "the coordinator).")
    if coordinator_address == AUTO:
        return
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{names['coordinator_address']}={coordinator_address!r} must be HOST:PORT with a port in "
                         f"1..65535 (e.g. 10.0.0.1:1234, the same on every process), or {AUTO!r} for "
                         "auto-detection (TPU pods, SLURM, Open MPI).")
    missing = [names[n] for n, v in (("num_processes", num_processes), ("process_id", process_id)) if v is None]
    if missing:
        raise ValueError(f"{names['coordinator_address']}={coordinator_address} needs {' and '.join(missing)} too "
                         "(every process: the same num_processes, its own process_id), or use "
                         f"{names['coordinator_address']}={AUTO} on a cluster jax.distributed detects.")
    if process_id >= num_processes:
        raise ValueError(f"{names['process_id']}={process_id} must be below {names['num_processes']}="
                         f"{num_processes} (ids run 0 .. {num_processes - 1}).")


def _names(source: str) -> dict[str, str]:
    if source == "environment":
        return dict(ENV_VARS)
    return {name: name for name in ENV_VARS}


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"The environment variable {name}={value!r} must be an integer.") from None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None) -> tuple[str | None, int | None, int | None]:
    """The run's `(coordinator_address, num_processes, process_id)`: the values given (config/CLI), else the
    environment's `JAX_*` variables; checked (`check_process_fields`) either way."""
    if coordinator_address is not None or num_processes is not None or process_id is not None:
        check_process_fields(coordinator_address, num_processes, process_id)
        return coordinator_address, num_processes, process_id
    address = os.environ.get(ENV_VARS["coordinator_address"]) or None
    count, index = _env_int(ENV_VARS["num_processes"]), _env_int(ENV_VARS["process_id"])
    check_process_fields(address, count, index, source="environment")
    return address, count, index


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join a multi-process run (`jax.distributed.initialize`) if the arguments or the environment ask for one;
    returns whether this process is part of one. Must come before any JAX computation. Calling it again with
    the same run (or with nothing) is a no-op; a different run is an error."""
    import jax

    address, count, index = resolve(coordinator_address, num_processes, process_id)
    if address is None:
        return jax.distributed.is_initialized()
    if jax.distributed.is_initialized():
        if (count is not None and jax.process_count() != count) or (index is not None and jax.process_index() != index):
            raise ValueError(f"This process already joined a run as process {jax.process_index()} of "
                             f"{jax.process_count()}, not process_id={index} of num_processes={count}: pass the "
                             "values it was started with, or none.")
        return True
    if count == 1 and address != AUTO:
        return False  # a run of one process: nothing to coordinate
    try:
        if address == AUTO:
            jax.distributed.initialize(num_processes=count, process_id=index)
        else:
            jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
    except RuntimeError as error:
        if "before any JAX" in str(error):
            raise ValueError("The multi-process set-up (coordinator_address / num_processes / process_id) must "
                             "happen before any JAX computation: call jaxpt.distributed.initialize(...) (or "
                             "jax.distributed.initialize) first thing in the program, before building a model or "
                             "an array.") from error
        raise
    except ValueError as error:
        if address == AUTO:
            raise ValueError(f"coordinator_address={AUTO!r}: jax.distributed could not detect the cluster ({error})."
                             " Pass --coordinator_address HOST:PORT --num_processes N --process_id I instead.") \
                from error
        raise
    logger.info("Joined a run of %d processes as process %d (%d local devices, %d in all)", jax.process_count(),
                jax.process_index(), jax.local_device_count(), jax.device_count())
    return True


def initialize_from_config(config) -> bool:
    """`initialize` with a `TrainingConfig`'s `coordinator_address` / `num_processes` / `process_id` (or the
    environment when they are unset). Every `train()` and command calls it first."""
    return initialize(config.coordinator_address, config.num_processes, config.process_id)


def check_same_data(examples, *, what: str) -> None:
    """On several processes: `ValueError` unless every process prepared the same `examples` (a digest of each
    one's arrays and values, compared in one small collective). Every process builds the same global batches
    from them, so hosts that read different files or tokenize differently must not train silently on a mix."""
    import zlib

    import jax
    import numpy as np

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = 0
    for example in examples:
        for key in sorted(example):
            value = example[key]
            raw = np.ascontiguousarray(value).tobytes() if isinstance(value, np.ndarray) else repr(value).encode()
            digest = zlib.crc32(key.encode() + raw, digest)
    mine = np.asarray([len(examples), digest], np.int64)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2)
    if not (every == every[0]).all():
        each = ", ".join(f"process {i}: {int(n)} examples, digest {int(d):08x}" for i, (n, d) in enumerate(every))
        raise ValueError(f"The processes prepared different {what} ({each}): every process must read the same "
                         "dataset (same files, split and revision) with the same tokenizer and config.")


# ----------------------------------------------------------------------------------------------------------------
# Each process's share of the data
# ----------------------------------------------------------------------------------------------------------------


FIRST_OWN = object()  # DataShare.step_examples' default stand-in


def shares_data() -> bool:
    """Whether each process prepares only its share of the data: on several processes. The offline methods'
    `train()` then take their `DataShare` / `EvalShare` branches, and a share is not whole by default. (A test
    patches it to run those branches on one process, where every row is this process's own.)"""
    import jax

    return jax.process_count() > 1


class DataShare:
    """The part of a run's data one process feeds, for the offline methods' `train()` loops, and the prompts of
    GRPO/RLOO's rollouts (a step: the `[prompts_per_rollout, length]` input of `generate`, `jaxpt.rollout`).

    Every process draws the same global step order (`data.step_indices`: a seeded permutation per epoch, so the
    global batches are those of one process, whatever the process count), and feeds only its own rows of each
    global batch: the rows of the batch dimension its devices hold. So it needs, and tokenizes, only the examples
    that land in its rows over the run's steps (`needed`): about 1/N of what the steps use in one epoch (more over
    several epochs, whose orders differ). Rows a process does not feed are filled with one of its own examples
    (never placed: `shard_batch(global_batch=True)` copies only a process's own rows), padded to the length every
    process agreed on (`agree_steps`: one collective for all the steps, before the first).

    On one process (`whole=True`) nothing changes: every example is prepared and every row is its own.

    `examples_per_step` dataset rows per step, laid out `[accumulation, micro_batch]` (row `j` of a step's index
    list is micro-batch row `j % micro_batch`). `with_previous`: a process also prepares, for each of its rows, the
    example before it in the step's list (cyclically), which KTO pairs with it. `replicated`: the rows are not split
    over the batch axes but held by every device (GRPO/RLOO's generate input when its prompts do not divide them):
    every process feeds every row of the steps, and process 0 counts them.
    """

    def __init__(self, num_examples: int, examples_per_step: int, *, micro_batch: int, mesh, seed: int,
                 shuffle: bool, start_step: int, total_steps: int, whole: bool | None = None,
                 with_previous: bool = False, replicated: bool = False):
        import jax
        import numpy as np

        from jaxpt import data
        from jaxpt.sharding import process_rows

        self.num_examples, self.examples_per_step = num_examples, examples_per_step
        self.seed, self.shuffle = seed, shuffle
        self.first_step, self.totals = start_step, None  # agree_steps
        self.whole = not shares_data() or mesh is None if whole is None else whole
        rows = np.arange(examples_per_step) % micro_batch
        if self.whole:
            self.positions = self.own_positions = self.counted = np.arange(examples_per_step)
            self.needed = None
            return
        if replicated:
            own, first_owner = np.ones(micro_batch, bool), np.full(micro_batch, jax.process_index() == 0)
        else:
            own, first_owner = process_rows(mesh, micro_batch)
        self.positions = np.flatnonzero(own[rows])  # positions of a step's index list this process feeds
        self.counted = np.flatnonzero(first_owner[rows])  # ... and counts in sums (rows replicated on processes)
        self.own_positions = self.positions
        if with_previous:  # each row also reads the example before it in the step (KTO's mismatched KL pairs)
            self.positions = np.union1d(self.positions, (self.positions - 1) % examples_per_step)
        if num_examples < examples_per_step:  # data.steps_per_epoch reports it, on every process alike
            self.needed = np.zeros(0, np.int64)
            return
        order = data.step_indices(num_examples, examples_per_step, seed=seed, shuffle=shuffle, start_step=start_step)
        used = [next(order)[1][self.positions] for _ in range(start_step, total_steps)]
        self.needed = np.unique(np.concatenate(used)) if used else np.zeros(0, np.int64)
        logger.info("Process %d prepares %d of the %d examples: the rows it feeds over steps %d-%d",
                    jax.process_index(), len(self.needed), num_examples, start_step + 1, total_steps)

    def agree_steps(self, examples: list, measure, *, start_step: int, total_steps: int) -> None:
        """Agree on every step's `(longest, count)` (e.g. the padded length and the token count of its global
        batch) in one collective before the first step, so the loop never waits on the other processes:
        `measure(rows, counted)` (`step_examples`' pair) gives this process's values, the run's are their max and
        their sum. On a whole share nothing is computed ahead (`step_totals` measures each step's rows)."""
        import numpy as np

        from jaxpt import data

        self.first_step, self.totals = start_step, None
        if self.whole or start_step >= total_steps:
            return
        order = data.step_indices(self.num_examples, self.examples_per_step, seed=self.seed, shuffle=self.shuffle,
                                  start_step=start_step)
        local = np.asarray([measure(*self.step_examples(next(order)[1], examples))
                            for _ in range(start_step, total_steps)], np.int64).reshape(-1, 2)
        every = gather_rows(local.reshape(-1)).reshape(-1, len(local), 2)  # [processes, steps, 2]
        self.totals = np.stack([every[..., 0].max(axis=0), every[..., 1].sum(axis=0)], axis=-1)

    def step_totals(self, step: int, rows: list, counted: list, measure) -> tuple[int, int]:
        """Step `step`'s agreed `(longest, count)` (`agree_steps`), or on a whole share `measure(rows, counted)`."""
        if self.totals is None:
            longest, count = measure(rows, counted)
            return int(longest), int(count)
        longest, count = self.totals[step - self.first_step]
        return int(longest), int(count)

    def select(self, dataset):
        """The dataset rows this process prepares (all of them on one process), in dataset order."""
        return dataset if self.whole else select_rows(dataset, self.needed)

    def step_examples(self, indices, examples: list, *, stand_in=FIRST_OWN) -> tuple[list, list]:
        """`(rows, counted)` of one step from its global example `indices` and this process's prepared `examples`
        (aligned with `needed`): `rows` (one per index) holds the step's examples at this process's positions and
        `stand_in` elsewhere (by default its first own example, so a stand-in is never the longest row);
        `counted` lists the examples this process counts in the step's totals (each row counted by one process)."""
        import numpy as np

        if self.whole:
            rows = [examples[i] for i in indices]
            return rows, rows
        local = np.searchsorted(self.needed, np.asarray(indices)[self.positions])
        own = [examples[i] for i in local]
        rows = [own[0] if stand_in is FIRST_OWN else stand_in] * len(indices)
        for position, example in zip(self.positions, own, strict=True):
            rows[position] = example
        counted = [rows[p] for p in self.counted]
        return rows, counted


class EvalShare:
    """The rows of the eval batches one process feeds, for the offline methods' `evaluate` and GRPO/RLOO's
    evaluation rollouts (`repeat_last`).

    The eval set runs in order, in batches of `batch_size` examples (the last one filled with no-loss rows). Each
    process prepares, and tokenizes, only the examples at its rows of every batch (`needed`: about 1/N of the eval
    set), plus example 0, whose fields give the no-loss filler rows (a process may own no example of the set). Rows
    a process does not feed hold the filler (never placed: `shard_batch(global_batch=True)` copies only a process's
    own rows); all processes pad each batch to the length they agreed on (`agree`: one collective for the whole
    eval set, before the first evaluation). Metrics are computed on the global batches, so they are those of one
    process.

    On one process (`whole=True`) nothing changes: every example is prepared and every row is its own.

    `with_previous`: a process also prepares, for each of its rows, the example before it in the batch (cyclically
    over the batch's examples: the first row's is the batch's last example), which KTO pairs with it. `micro_batch`:
    a batch laid out `[accumulation, micro_batch]` (row `j` is micro-batch row `j % micro_batch`; default one
    micro-batch of `batch_size`). `repeat_last`: the last batch's rows past the end of the set hold the set's last
    example (GRPO/RLOO's evaluation rollouts repeat it, so every rollout has one shape), which the processes feeding
    them read too."""

    def __init__(self, num_examples: int, batch_size: int, *, mesh, whole: bool | None = None,
                 with_previous: bool = False, micro_batch: int | None = None, repeat_last: bool = False):
        import jax
        import numpy as np

        from jaxpt.sharding import process_rows

        self.num_examples, self.batch_size = num_examples, batch_size
        self.num_batches = -(-num_examples // batch_size)
        self.lengths = None  # agree
        self.with_previous, self.repeat_last = with_previous, repeat_last
        self.whole = not shares_data() or mesh is None if whole is None else whole
        if self.whole:
            self.positions, self.needed = np.arange(batch_size), np.arange(num_examples)
            return
        micro_batch = micro_batch or batch_size
        own = process_rows(mesh, micro_batch)[0]
        self.positions = np.flatnonzero(own[np.arange(batch_size) % micro_batch])  # this process's rows of a batch
        indices = [self.example_index(batch, self.read_positions(batch)) for batch in range(self.num_batches)]
        self.needed = np.union1d(np.concatenate(indices or [np.zeros(0, np.int64)]), [0] if num_examples else [])
        logger.info("Process %d prepares %d of the %d eval examples: the rows it feeds", jax.process_index(),
                    len(self.needed), num_examples)

    def batch_examples(self, batch: int) -> int:
        """How many examples of the set eval batch `batch` holds (`batch_size`, fewer in the last one)."""
        return min(self.batch_size, self.num_examples - batch * self.batch_size)

    def own_positions(self, batch: int):
        """This process's rows of eval batch `batch` that hold an example of the set."""
        return self.positions[self.positions < self.batch_examples(batch)]

    def read_positions(self, batch: int):
        """The rows of eval batch `batch` whose examples this process reads: its own, with `with_previous` the
        row before each (the batch's last example before its first row), with `repeat_last` its rows past the end
        of the set too."""
        import numpy as np

        if self.repeat_last:
            return self.positions
        positions = self.own_positions(batch)
        if self.with_previous and len(positions):
            positions = np.union1d(positions, (positions - 1) % self.batch_examples(batch))
        return positions

    def example_index(self, batch: int, positions):
        """The examples of the set at rows `positions` of eval batch `batch` (with `repeat_last`, the set's last
        example past its end)."""
        import numpy as np

        indices = batch * self.batch_size + np.asarray(positions, np.int64)
        return np.minimum(indices, self.num_examples - 1) if self.repeat_last else indices

    def select(self, dataset):
        """The eval dataset rows this process prepares (all of them on one process), in dataset order."""
        return dataset if self.whole else select_rows(dataset, self.needed)

    def measure(self, examples: list, measure):
        """This process's longest row of every batch (`measure(example)`, 0 where it feeds no example)."""
        import numpy as np

        longest = np.zeros(self.num_batches, np.int64)
        for batch in range(self.num_batches):
            rows, _ = self.batch_rows(batch, examples, None)
            longest[batch] = max((measure(rows[p]) for p in self.own_positions(batch)), default=0)
        return longest

    def agree(self, examples: list, measure) -> None:
        """Agree on every eval batch's longest row (`measure(example)`: the padded length of its global batch) in one
        collective; every process must call it at the same point. On a whole share nothing is computed ahead
        (`batch_rows` gives no length: the batch's own rows tell it)."""
        if self.whole:
            return
        self.agree_lengths(self.measure(examples, measure))

    def agree_lengths(self, longest) -> None:
        """`agree` from this process's longest row of every batch (`longest`, 0 where it feeds none), measured by
        the caller (KTO: a row's length depends on its partner too). One collective; every process calls it."""
        self.lengths = gather_rows(longest).reshape(-1, self.num_batches).max(axis=0)

    def batch_rows(self, batch: int, examples: list, filler) -> tuple[list, int | None]:
        """`(rows, longest)` of eval batch `batch` from this process's prepared `examples` (aligned with `needed`):
        `batch_size` rows, the batch's examples at the rows this process reads (`read_positions`) and `filler`
        elsewhere (past the end of the set too, unless `repeat_last`), and the agreed longest row of the global
        batch (`agree`; None on a whole share)."""
        import numpy as np

        rows = [filler] * self.batch_size
        positions = self.read_positions(batch)
        for position, index in zip(positions, self.example_index(batch, positions), strict=True):
            rows[position] = examples[int(index) if self.whole else int(np.searchsorted(self.needed, index))]
        return rows, None if self.lengths is None else int(self.lengths[batch])


def select_rows(dataset, indices):
    """Rows `indices` of a `datasets.Dataset`, a list of rows or a dict of columns (same kind out)."""
    if hasattr(dataset, "select") and hasattr(dataset, "column_names"):
        return dataset.select([int(i) for i in indices])
    if isinstance(dataset, dict):
        return {name: [column[int(i)] for i in indices] for name, column in dataset.items()}
    return [dataset[int(i)] for i in indices]


def gather_rows(values):
    """Every process's `values` (a 1-D numpy array, lengths may differ), concatenated in process order, on every
    process (two small collectives); on one process `values` itself."""
    import jax
    import numpy as np

    values = np.asarray(values)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(values)], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), values.dtype)
    padded[:len(values)] = values
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return np.concatenate([row[:size] for row, size in zip(every, sizes, strict=True)])


def on_every_process(prepare, *args, what: str, **kwargs):
    """`prepare(*args, **kwargs)` on a process's share of the data, with its failure told to every process: the
    process that failed raises its own error (its example numbers count within its share), the others a
    `RuntimeError` naming it, so none waits forever in the next collective."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return prepare(*args, **kwargs)
    from jax.experimental import multihost_utils

    result, failure = None, None
    try:
        result = prepare(*args, **kwargs)
    except Exception as error:
        failure = error
    failed = np.asarray(multihost_utils.process_allgather(np.asarray([failure is not None], np.int32))).reshape(-1)
    if failure is not None:
        if isinstance(failure, ValueError):
            raise ValueError(f"{failure} (process {jax.process_index()} prepares its own share of the {what}: "
                             "example numbers count within that share)") from failure
        raise failure
    if failed.any():
        raise RuntimeError(f"Preparing the {what} failed on process(es) {np.flatnonzero(failed).tolist()}: see their "
                           "error.")
    return result
