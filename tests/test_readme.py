"""Every ```python block of README.md runs, in order, in one namespace (docs whose code does not run are bugs)."""

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 2


def test_readme_python_blocks_run(tmp_path):
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)  # examples write under the working directory
    try:
        for index, block in enumerate(python_blocks()):
            try:
                exec(compile(block, f"README.md python block {index}", "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"README python block {index} failed:\n{block}") from error
    finally:
        os.chdir(cwd)
    assert namespace["losses"][-1] < namespace["losses"][0]  # the custom loop example trains


def test_ci_runs_the_readme_test_command():
    """`.ci/run` runs exactly the README's install + lint + test command (the second bash block)."""
    bash_blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    test_command = bash_blocks[1].strip()
    assert "ruff check ." in test_command and "pytest" in test_command
    ci_script = (README.parent / ".ci" / "run").read_text()
    assert test_command in ci_script.splitlines()
