"""benchmarks/guard.py's verdict: a regression only when every compared figure falls below the tolerance."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("guard", Path(__file__).parent.parent / "benchmarks" / "guard.py")
guard = importlib.util.module_from_spec(spec)
spec.loader.exec_module(guard)


def runs(throughputs, ratios=None):
    rows = [{"jaxpt_tokens_per_s": value} for value in throughputs]
    for row, ratio in zip(rows, ratios or [], strict=False):
        row["ratio"] = ratio
    return rows


@pytest.mark.parametrize(("base", "head", "regressed"), [
    (runs([100, 101, 99]), runs([96, 95, 97]), False),          # -4%: inside the 5% tolerance
    (runs([100, 101, 99]), runs([90, 94, 80]), True),           # median -6%
    (runs([100, 100, 100], [1.0, 1.0, 1.0]), runs([80, 80, 80], [1.0, 1.01, 0.99]), False),  # load, not code
    (runs([100, 100, 100], [1.0, 1.0, 1.0]), runs([80, 80, 80], [0.9, 0.9, 0.9]), True),
])
def test_compare_flags_only_real_slowdowns(base, head, regressed):
    row = guard.compare("forward_backward", base, head, tolerance=0.05)
    assert row["regressed"] is regressed
    assert row["jaxpt_tokens_per_s"]["head_over_base"] == pytest.approx(
        sorted(r["jaxpt_tokens_per_s"] for r in head)[1] / sorted(r["jaxpt_tokens_per_s"] for r in base)[1], abs=1e-3)


def test_bad_arguments_fail_early():
    with pytest.raises(SystemExit):
        guard.parse_args(["--base", "HEAD", "--runs", "0"])
    with pytest.raises(SystemExit):
        guard.parse_args(["--base", "HEAD", "--tolerance", "1.5"])
