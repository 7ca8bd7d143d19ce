"""Start-up time of the command line: ``mtlvision --help``, ``--version`` and ``list balancers``, against
``python -c "import torch"`` for scale. Each command runs in a fresh interpreter (``python -m mtlvision``, so
the figures are the package's and not a console script's); the figure is the median wall time of the runs,
measured from outside the process (start, import, work, exit).

    python benchmarks/startup.py              # 7 runs of each, a markdown table
    python benchmarks/startup.py --runs 15
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS: list[tuple[str, list[str]]] = [
    ("mtlvision --help", ["-m", "mtlvision", "--help"]),
    ("mtlvision --version", ["-m", "mtlvision", "--version"]),
    ("mtlvision list balancers", ["-m", "mtlvision", "list", "balancers"]),
    ('python -c "import torch"', ["-c", "import torch"]),
]


def wall_times(args: list[str], runs: int) -> list[float]:
    """Seconds each of ``runs`` fresh ``python ARGS`` processes took, after one unmeasured warm-up run (which
    fills the file-system cache)."""
    subprocess.run([sys.executable, *args], check=True, capture_output=True)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="measured runs per command (default: 7)")
    args = parser.parse_args()
    print(f"| command | median s ({args.runs} runs) | min s | max s |")
    print("|---|---:|---:|---:|")
    for label, command in COMMANDS:
        times = wall_times(command, args.runs)
        print(f"| `{label}` | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} |")


if __name__ == "__main__":
    main()
