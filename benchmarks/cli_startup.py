"""Benchmark: wall time of `metis --help` and `metis validate recipes/tiny.yaml` (target < 0.3 s).

Run: .venv/bin/python benchmarks/cli_startup.py [--repeats 10]
Prints one JSON line with the median and min wall seconds of each command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def wall_times(argv: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, cwd=REPO, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    metis = shutil.which("metis") or str(Path(sys.executable).with_name("metis"))
    report = {}
    for name, argv in {
        "help": [metis, "--help"],
        "validate_tiny": [metis, "validate", "recipes/tiny.yaml"],
        "python_baseline": [sys.executable, "-c", "pass"],
    }.items():
        times = wall_times(argv, args.repeats)
        report[name] = {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4)}
    report["help_target_s"] = 0.3
    report["help_within_target"] = report["help"]["median_s"] < 0.3
    print(json.dumps(report))


if __name__ == "__main__":
    main()
