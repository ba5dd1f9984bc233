"""Blocks an experimental module marks `# Copied from jaxpt.experimental.<module>.<name>` (its sibling's helper, kept
in the file so that each method reads top to bottom and imports no other experimental module) stay identical to
their source: the checker of tests/models/test_copied_from.py, run over `jaxpt/experimental/`."""

from pathlib import Path

from tests.models.test_copied_from import check_copies

EXPERIMENTAL_DIR = Path(__file__).resolve().parents[2] / "jaxpt" / "experimental"


def test_copied_blocks_match_their_source():
    modules = {f"jaxpt.experimental.{path.stem}": path.read_text() for path in sorted(EXPERIMENTAL_DIR.glob("*.py"))}
    checked, problems = check_copies(modules)
    assert not problems, "\n\n".join(problems)
    # the markers really are there (a check over no markers would pass vacuously)
    for copy in ("xpo.value_for_epoch", "xpo.combined_scores", "nash_md.value_for_epoch", "nash_md.combined_scores",
                 "nash_md.sampling_options", "sdft.update_teacher"):
        assert any(line.startswith(f"jaxpt.experimental.{copy} <- ") for line in checked), copy
