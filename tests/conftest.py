"""Test setup: 8 host devices for mesh tests, CPU only, small models built in code (never downloaded)."""

import os

# Must happen before JAX is imported anywhere: mesh tests need 8 (fake) devices on the CPU.
# The suite's time is ~70% XLA compilation of tiny programs: without LLVM's expensive optimisation passes a test
# compiles ~35% faster and runs its few steps barely slower (the HLO program is the same; only its machine code is
# less optimised).
# Subprocesses that inherit this environment get the same flags.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAGS, "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same tiny programs (each builds its own jitted step): a compilation cache shared by the
# run's test workers (a fresh directory per run, made by the first process that imports this file; the workers
# inherit it) compiles each program once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and os.environ.get("JAXPT_TEST_COMPILATION_CACHE", "1") == "1":
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="jaxpt-test-compiled-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    _owner = os.getpid()
    atexit.register(lambda: os.getpid() == _owner and shutil.rmtree(_cache, ignore_errors=True))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield


# The longest tests first, so that the test workers (pytest -n) run them alongside the many short ones instead of
# one worker finishing them alone at the end: the pairs of processes (minutes), the demo runs, the notebooks.
LONGEST_FIRST = ("tests/test_multihost.py::test_commands_on_two_processes", "tests/test_demo.py::test_demo_",
                 "tests/test_notebooks.py::test_notebook_runs")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        return next((i for i, prefix in enumerate(LONGEST_FIRST) if item.nodeid.startswith(prefix)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: the same order on every worker
