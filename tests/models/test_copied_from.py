"""The "Copied from" check: blocks a family file marks as copies of another family's stay identical to it.

A marker is a comment on the line right above a `class`, `def` or assignment (decorators go below it):

    # Copied from jaxpt.models.llama.LlamaForCausalLM with Llama->Qwen2
    class Qwen2ForCausalLM(nnx.Module):

It names the source block by module and qualified name (`module.Class`, `module.Class.method`,
`module.CONSTANT`) and, optionally, replacements `Old->New` (comma-separated, applied in order, case-sensitive)
that turn the source's text into the copy's. Both blocks are compared as text after dedenting and dropping
"# Copied from" lines nested inside them (a nested marker is checked on its own). When a port changes a
copied block, change its source too, or remove the marker where the copy has become a real variant.
"""

import ast
import difflib
import re
import textwrap
from pathlib import Path

import pytest

MODELS_DIR = Path(__file__).resolve().parents[2] / "jaxpt" / "models"
MARKER = re.compile(r"^\s*# Copied from (?P<source>[\w.]+)(?: with (?P<replacements>.+))?\s*$")
MARKER_LINE = re.compile(r"^\s*# Copied from ")


def named_blocks(body: list[ast.stmt], prefix: str = ""):
    """(qualified name, node) of every class, def and assignment, classes searched recursively."""
    for node in body:
        name = defined_name(node)
        if name is None:
            continue
        yield prefix + name, node
        if isinstance(node, ast.ClassDef):
            yield from named_blocks(node.body, f"{prefix}{name}.")


def defined_name(node: ast.stmt) -> str | None:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id
    return None


def first_line(node: ast.stmt) -> int:
    """The node's first line, decorators included."""
    return min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])


def block_text(node: ast.stmt, lines: list[str]) -> str:
    return "\n".join(lines[first_line(node) - 1:node.end_lineno])


def normalise(block: str) -> str:
    kept = [line.rstrip() for line in block.splitlines() if not MARKER_LINE.match(line)]
    return textwrap.dedent("\n".join(kept)).strip("\n")


def parse_replacements(text: str | None) -> list[tuple[str, str]]:
    if text is None:
        return []
    pairs = []
    for item in text.split(","):
        old, arrow, new = item.strip().partition("->")
        if not arrow or not old or not new:
            raise ValueError(f"replacement {item.strip()!r} is not of the form Old->New")
        pairs.append((old, new))
    return pairs


def check_copies(modules: dict[str, str]) -> tuple[list[str], list[str]]:
    """Check every marker in `modules` (dotted module name -> source text).

    Returns the blocks checked (one line each: "target <- source") and the problems found: a malformed
    marker, a marker not right above a definition, a source that does not exist, a copy that differs from its
    source (with a diff).
    """
    parsed = {}
    for module, text in modules.items():
        lines = text.splitlines()
        blocks = dict(named_blocks(ast.parse(text).body))
        parsed[module] = (lines, blocks, {first_line(node): name for name, node in blocks.items()})
    checked, problems = [], []
    for module, (lines, blocks, starting_at) in parsed.items():
        for index, line in enumerate(lines):
            if not MARKER_LINE.match(line):
                continue
            where = f"{module} line {index + 1}"
            match = MARKER.match(line)
            if match is None:
                problems.append(f"{where}: malformed marker {line.strip()!r}; write "
                                "'# Copied from package.module.Name with Old->New, Old2->New2'.")
                continue
            if index + 2 not in starting_at:
                problems.append(f"{where}: a '# Copied from' marker must sit right above a class, def or assignment.")
                continue
            target = f"{module}.{starting_at[index + 2]}"
            source_name = match["source"]
            source_module = next((m for m in sorted(parsed, key=len, reverse=True)
                                  if source_name.startswith(m + ".")), None)
            source_node = None
            if source_module is not None:
                source_lines, source_blocks, _ = parsed[source_module]
                source_node = source_blocks.get(source_name[len(source_module) + 1:])
            if source_node is None:
                problems.append(f"{where}: the source {source_name} does not exist.")
                continue
            try:
                replacements = parse_replacements(match["replacements"])
            except ValueError as error:
                problems.append(f"{where}: {error}.")
                continue
            expected = normalise(block_text(source_node, source_lines))
            for old, new in replacements:
                expected = expected.replace(old, new)
            actual = normalise(block_text(blocks[starting_at[index + 2]], lines))
            checked.append(f"{target} <- {source_name}")
            if actual != expected:
                diff = "\n".join(difflib.unified_diff(expected.splitlines(), actual.splitlines(),
                                                      f"{source_name} (with replacements)", target, lineterm=""))
                problems.append(f"{target} differs from {source_name}; update it (or its source), or remove the "
                                f"marker if it is no longer a copy:\n{diff}")
    return checked, problems


def family_modules() -> dict[str, str]:
    return {f"jaxpt.models.{path.stem}": path.read_text() for path in sorted(MODELS_DIR.glob("*.py"))}


def test_copied_blocks_match_their_source():
    checked, problems = check_copies(family_modules())
    assert not problems, "\n\n".join(problems)
    # The markers really are there (a check over no markers would pass vacuously).
    for family in ("qwen2", "qwen3", "gemma"):
        assert any(line.startswith(f"jaxpt.models.{family}.") for line in checked), family
    assert len(checked) >= 20, checked


# ---- the checker itself, on synthetic snippets -------------------------------------------------------------------

SOURCE = '''
class LlamaMLP:
    """Llama's MLP."""

    def __call__(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


RULES = (1, 2)
'''

COPY = '''
# Copied from pkg.llama.LlamaMLP with Llama->Qwen2
class Qwen2MLP:
    """Qwen2's MLP."""

    def __call__(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class Qwen2Attention:
    # Copied from pkg.llama.LlamaMLP.__call__
    def __call__(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


# Copied from pkg.llama.RULES
RULES = (1, 2)
'''


def test_checker_accepts_faithful_copies_with_replacements():
    checked, problems = check_copies({"pkg.llama": SOURCE, "pkg.qwen2": COPY})
    assert problems == []
    assert checked == ["pkg.qwen2.Qwen2MLP <- pkg.llama.LlamaMLP",
                       "pkg.qwen2.Qwen2Attention.__call__ <- pkg.llama.LlamaMLP.__call__",
                       "pkg.qwen2.RULES <- pkg.llama.RULES"]


@pytest.mark.parametrize("drift", [
    ("* self.up(x))", "+ self.up(x))"),  # a changed operator in both copies of the method body
    ('"""Qwen2\'s MLP."""', '"""The MLP."""'),  # a changed docstring
    ("RULES = (1, 2)", "RULES = (1, 3)"),  # a changed constant
])
def test_checker_reports_a_drifted_copy(drift):
    old, new = drift
    drifted = COPY.replace(old, new)
    assert drifted != COPY
    _, problems = check_copies({"pkg.llama": SOURCE, "pkg.qwen2": drifted})
    assert problems and all("differs from" in problem for problem in problems)
    assert all(new in problem for problem in problems)  # the diff shows the drifted line


def test_checker_reports_a_drifted_source():
    """Editing the source without its copies fails too."""
    _, problems = check_copies({"pkg.llama": SOURCE.replace("x))", "x) + x)"), "pkg.qwen2": COPY})
    assert len(problems) == 2 and all("differs from pkg.llama.LlamaMLP" in p for p in problems)


@pytest.mark.parametrize(("marker", "message"), [
    ("# Copied from pkg.llama.LlamaMLPX with Llama->Qwen2", "does not exist"),
    ("# Copied from pkg.mistral.LlamaMLP with Llama->Qwen2", "does not exist"),
    ("# Copied from pkg.llama.LlamaMLP with Llama=>Qwen2", "not of the form Old->New"),
    ("# Copied from pkg.llama.LlamaMLP with", "malformed marker"),
])
def test_checker_reports_a_bad_marker(marker, message):
    copy = COPY.replace("# Copied from pkg.llama.LlamaMLP with Llama->Qwen2", marker)
    _, problems = check_copies({"pkg.llama": SOURCE, "pkg.qwen2": copy})
    assert len(problems) == 1 and message in problems[0]


def test_checker_reports_a_marker_that_marks_nothing():
    copy = COPY.replace("# Copied from pkg.llama.RULES\nRULES", "# Copied from pkg.llama.RULES\n\nRULES")
    _, problems = check_copies({"pkg.llama": SOURCE, "pkg.qwen2": copy})
    assert len(problems) == 1 and "must sit right above" in problems[0]
