"""The layer path's two ways to a convolution's T weight gradients, against plain PyTorch, in one process.

The problem of ``benchmarks/balancers.py`` (resnet18 trunk, batch 16 of 64×64, T = 3); steps interleaved
round-robin (the first round untimed), ``Conv2dRule.weight_way`` set before each of the layer path's steps:
``gemm`` (the unfolded GEMM, the way before issue 24) or ``kernel`` (the convolution's own weight-gradient
kernel per task). Prints each configuration's median step time and its ratio to the equal-weights step.

    python benchmarks/layer_ways.py --threads 1 --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from balancers import build_problem, machine_line, ours_step, torch_step  # the sibling benchmark script
from mtlvision.balancers.layers import RULES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds, the first untimed")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--method", default="mgda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def make(step_of, method: str, mode: str):  # type: ignore[no-untyped-def]
        trunk, heads, task_losses, x = build_problem(3, 16, 64, "cpu")
        trunk.train(), heads.train()
        return step_of(method, mode, trunk, heads, task_losses, x)

    steps = {
        "torch/ew": (make(torch_step, "ew", "params"), "measure"),
        "torch/floor": (make(torch_step, "floor", "params"), "measure"),
        f"{args.method} layers, gemm": (make(ours_step, args.method, "layers"), "gemm"),
        f"{args.method} layers, kernel": (make(ours_step, args.method, "layers"), "kernel"),
        f"{args.method} batched": (make(ours_step, args.method, "batched"), "measure"),
    }
    times: dict[str, list[float]] = {key: [] for key in steps}
    for round_ in range(args.rounds):
        for key, (step, way) in steps.items():
            RULES[nn.Conv2d].weight_way = way  # type: ignore[attr-defined]
            start = time.perf_counter()
            step()
            if round_:
                times[key].append(time.perf_counter() - start)
    print(machine_line("cpu", args.threads))
    ew = statistics.median(times["torch/ew"])
    for key, values in times.items():
        median = statistics.median(values)
        print(f"| {key} | {median * 1e3:.0f} ms | {median / ew:.2f}× |")


if __name__ == "__main__":
    main()
