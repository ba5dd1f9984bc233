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
