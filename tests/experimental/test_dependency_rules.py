"""`jaxpt.experimental`'s contract, checked on the import statements: stable code never imports it (the command
line reaches its commands lazily), and an experimental module imports no other experimental module, nor a stable
method module unless it extends that method."""

from pathlib import Path

import pytest

from jaxpt import cli
from tests.test_dependency_rules import METHODS, imported_modules

PACKAGE = Path(__file__).resolve().parents[2] / "jaxpt"
EXPERIMENTAL = sorted(p for p in (PACKAGE / "experimental").glob("*.py") if p.name != "__init__.py")
# Methods that are a stable method plus a small delta may import it (never another experimental module)
EXTENDS = {"bema": {"jaxpt.dpo"},  # BEMA is DPO with a moving reference
           "gmpo": {"jaxpt.grpo"},  # GMPO is GRPO with another loss
           "gkd": {"jaxpt.distillation"}, "gold": {"jaxpt.distillation"},  # distillation with deltas
           "iw_opd": {"jaxpt.distillation"}, "async_grpo": {"jaxpt.grpo"}}


def test_stable_code_never_imports_experimental():
    for path in PACKAGE.rglob("*.py"):
        if "experimental" in path.parts or path.name == "cli.py":
            continue
        assert not any(m.startswith("jaxpt.experimental") for m in imported_modules(path)), path


@pytest.mark.parametrize("path", EXPERIMENTAL, ids=lambda p: p.stem)
def test_experimental_modules_stand_alone(path):
    imported = imported_modules(path)
    others = {f"jaxpt.experimental.{p.stem}" for p in EXPERIMENTAL if p != path}
    assert not imported & (others | {"jaxpt.experimental"}), path.name
    assert imported & {f"jaxpt.{m}" for m in METHODS} <= EXTENDS.get(path.stem, set()), path.name


@pytest.mark.parametrize("path", EXPERIMENTAL, ids=lambda p: p.stem)
def test_every_experimental_method_has_a_command_listed_in_the_help(path, capsys):
    assert path.stem in cli.COMMANDS
    assert f"jaxpt {path.stem} " in cli.__doc__
    assert cli.main(["--help"]) == 0
    assert f"jaxpt {path.stem} " in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main([path.stem, "--help"])
    assert exit_info.value.code == 0
    assert "--output_dir" in capsys.readouterr().out


@pytest.mark.parametrize("path", EXPERIMENTAL, ids=lambda p: p.stem)
def test_every_experimental_method_is_in_the_readme_table_as_experimental(path):
    readme = (PACKAGE.parent / "README.md").read_text()
    rows = [line for line in readme.splitlines() if f"`jaxpt.experimental.{path.stem}`" in line]
    assert rows and all("| experimental |" in row and f"`jaxpt {path.stem}`" in row for row in rows), path.stem
