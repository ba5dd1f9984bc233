"""Performance guard: this checkout's jaxpt vs a base git revision, side by side, median of `--runs` runs.

For each benchmark (default: `forward_backward`, `dpo_step`, `generate`, `grpo_iteration`) the guard runs the
base revision's script with the base's `jaxpt` and this checkout's script with this checkout's `jaxpt`,
alternating base and head `--runs` times so that both sides see the same machine load. Each run is a separate
process (`python -m benchmarks.NAME`) whose last stdout line is the benchmark's JSON. The base revision is
checked out with `git worktree add --detach` into a temporary directory and removed afterwards.

Compared per benchmark: jaxpt's own throughput (higher is better; `head / base` below 1 - `--tolerance` is a
regression) and, where the benchmark also runs its reference (transformers or TRL) in the same process, the
ratio jaxpt / reference, which cancels most of the machine's load. A benchmark regresses when both its
throughput and its load-free ratio (when there is one) fall below the tolerance. Prints a table, one JSON line,
and exits 1 on a regression.

    python -m benchmarks.guard --base HEAD~3
    python -m benchmarks.guard --base main --benchmarks forward_backward generate --runs 5
    python -m benchmarks.guard --base v0.3.0 --skip_reference     # jaxpt only: faster, but load-sensitive
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# benchmark -> (jaxpt throughput field, load-free ratio field or None, flag that skips the reference side)
METRICS = {
    "forward_backward": ("jaxpt_tokens_per_s", "ratio", "--skip_torch"),
    "dpo_step": ("jaxpt_pairs_per_s", "ratio", "--skip_trl"),
    "generate": ("sampled_jaxpt_tokens_per_s", "sampled_ratio", "--skip_torch"),
    "grpo_iteration": ("jaxpt_completions_per_s", "ratio", "--skip_trl"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare against (e.g. HEAD~1, main)")
    parser.add_argument("--benchmarks", nargs="+", default=list(METRICS), choices=list(METRICS))
    parser.add_argument("--runs", type=int, default=3, help="runs per side (median reported)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed slowdown (0.05: 5%%)")
    parser.add_argument("--skip_reference", action="store_true", help="do not run transformers / TRL")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark run")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: run each side at least once")
    if not 0 <= args.tolerance < 1:
        parser.error(f"--tolerance {args.tolerance}: give a fraction in [0, 1), e.g. 0.05")
    return args


def run_benchmark(tree: Path, name: str, extra: list[str], *, timeout: float) -> dict:
    """One benchmark process in `tree` (its script, its jaxpt); the JSON of its last stdout line."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *extra], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        raise RuntimeError(f"benchmarks.{name} in {tree} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def compare(name: str, base: list[dict], head: list[dict], *, tolerance: float) -> dict:
    throughput_field, ratio_field, _ = METRICS[name]
    row = {"benchmark": name}
    regressed = []
    for field in (throughput_field, ratio_field):
        if field is None or field not in base[0] or field not in head[0]:
            continue
        base_values, head_values = [r[field] for r in base], [r[field] for r in head]
        change = statistics.median(head_values) / statistics.median(base_values)
        row[field] = {"base": base_values, "head": head_values, "head_over_base": round(change, 3)}
        regressed.append(change < 1 - tolerance)
    row["regressed"] = bool(regressed) and all(regressed)
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="jaxpt_guard_") as scratch:
        base_tree = Path(scratch) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(base_tree), args.base], cwd=REPO,
                       check=True)
        try:
            for name in args.benchmarks:
                extra = [METRICS[name][2]] if args.skip_reference else []
                results = {"base": [], "head": []}
                for run in range(args.runs):
                    for side, tree in (("base", base_tree), ("head", REPO)):
                        results[side].append(run_benchmark(tree, name, extra, timeout=args.timeout))
                        print(f"{name} run {run + 1}/{args.runs} {side} done", file=sys.stderr, flush=True)
                rows.append(compare(name, results["base"], results["head"], tolerance=args.tolerance))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, check=False)
    print(f"{'benchmark':18s} {'metric':28s} {'base median':>12s} {'head median':>12s} {'head/base':>9s}")
    for row in rows:
        for field, values in row.items():
            if isinstance(values, dict):
                print(f"{row['benchmark']:18s} {field:28s} {statistics.median(values['base']):12.2f} "
                      f"{statistics.median(values['head']):12.2f} {values['head_over_base']:9.3f}"
                      f"{'  REGRESSION' if row['regressed'] else ''}")
    print(json.dumps({"benchmark": "guard", "base": args.base, "runs": args.runs, "tolerance": args.tolerance,
                      "results": rows}))
    return 1 if any(row["regressed"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
