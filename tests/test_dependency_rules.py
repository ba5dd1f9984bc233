"""DESIGN.md's dependency rules, checked on the import statements: a loss module imports only jax/numpy and the
neutral loss modules, and a method module imports neither a sibling method nor a sibling's loss module."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxpt"
METHODS = ("sft", "dpo", "reward", "kto", "grpo", "rloo")
NEUTRAL_LOSS_MODULES = {"jaxpt.losses.logprobs", "jaxpt.losses.metrics", "jaxpt.losses.sampled_rewards"}


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from jaxpt import data` imports the module jaxpt.data
            modules.update(f"{node.module}.{alias.name}" if node.module == "jaxpt" else node.module
                           for alias in node.names)
    return modules


@pytest.mark.parametrize("path", sorted((PACKAGE / "losses").glob("*.py")), ids=lambda p: p.name)
def test_loss_modules_import_only_jax_numpy_and_neutral_losses(path):
    if path.name == "__init__.py":
        return
    own = f"jaxpt.losses.{path.stem}"
    for module in imported_modules(path):
        if module.split(".")[0] in ("__future__", "jax", "numpy", "math", "collections", "functools", "typing"):
            continue
        assert module in NEUTRAL_LOSS_MODULES - {own}, f"{path.name} imports {module}"


@pytest.mark.parametrize("method", METHODS)
def test_methods_import_no_sibling_nor_its_loss(method):
    siblings = [m for m in METHODS if m != method]
    forbidden = {f"jaxpt.{m}" for m in siblings} | {f"jaxpt.losses.{m}" for m in siblings}
    assert not imported_modules(PACKAGE / f"{method}.py") & forbidden
    for path in (PACKAGE / "losses").glob("*.py"):  # a method's loss module neither
        if path.stem == method:
            assert not imported_modules(path) & forbidden, path.name
