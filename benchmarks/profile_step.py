"""Where one training step's CPU time goes, per Jacobian path, against plain PyTorch's floor (issue 24).

Builds the problem of ``benchmarks/balancers.py`` (resnet18 trunk, batch 16 of 64×64, T = 3 or 40 tasks),
warms every configuration's step up, then profiles ``--steps`` steps of each with ``torch.profiler``, the
configurations interleaved round-robin, and prints per configuration the median wall time of the profiled
steps, the CPU time of its top-level operators (children included) summed by category, and the top
operators. Categories: ``conv/gemm`` (convolutions,
matrix products, their backward kernels), ``elementwise`` (adds, multiplies, norms' and activations' kernels
and their backward), ``copy/layout`` (copies, ``cat``/``stack``, ``unfold``, contiguous), ``reduction`` (sums,
dot products), ``alloc`` (empty/zeros), ``vmap`` (batching-rule plumbing), ``python+autograd`` (wall time
left outside every operator: the interpreter, hooks and autograd's engine). The machine is printed first.

    python benchmarks/profile_step.py                             # T=3: floor, ew, MGDA on every path, rep
    python benchmarks/profile_step.py --configs torch/floor ours/mgda/layers --top 15
    python benchmarks/profile_step.py --tasks 40 --steps 2 --configs torch/floor torch/outputs ours/mgda/layers

A configuration is ``torch/<ew|floor|outputs>`` or ``ours/<method>/<params|layers|batched|loop|rep>``
(``params``: the path ``balancer.jacobian=auto`` takes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from balancers import STEPS, build_problem, machine_line  # the sibling benchmark script

#: median wall ms, mean wall ms, ms per step by top-level operator
Profiled = tuple[float, float, dict[str, float]]

DEFAULT_CONFIGS = [
    "torch/ew",
    "torch/floor",
    "torch/outputs",
    "ours/mgda/layers",
    "ours/mgda/batched",
    "ours/mgda/loop",
    "ours/mgda/rep",
]

#: operator-name fragments per category, first match wins
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("vmap", ("vmap", "batch_rule", "_add_batch_dim", "_remove_batch_dim", "makebatched")),
    ("conv/gemm", ("conv", "mm", "matmul", "linear", "einsum", "tensordot", "addmm", "bmm", "dot")),
    (
        "copy/layout",
        ("copy", "cat", "stack", "unfold", "im2col", "col2im", "contiguous", "clone", "aten::to", "_to_copy", "index"),
    ),
    ("alloc", ("empty", "zeros", "ones", "full", "resize", "new_")),
    ("reduction", ("sum", "mean", "norm", "max", "min")),
]


def category(name: str) -> str:
    low = name.lower()
    for label, fragments in CATEGORIES:
        if any(fragment in low for fragment in fragments):
            return label
    return "elementwise"


def make_step(config: str, tasks: int, batch: int, size: int) -> Callable[[], None]:
    parts = config.split("/")
    if parts[0] == "torch" and len(parts) == 2:
        framework, method, mode = "torch", parts[1], "params"
    elif parts[0] == "ours" and len(parts) == 3:
        framework, method, mode = parts
    else:
        raise SystemExit(f"configuration {config!r}: expected torch/<method> or ours/<method>/<path>")
    trunk, heads, task_losses, x = build_problem(tasks, batch, size, "cpu")
    trunk.train(), heads.train()
    return STEPS[framework](method, mode, trunk, heads, task_losses, x)


def profile_interleaved(steps: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, Profiled]:
    """Each configuration's steps profiled one at a time, round-robin (so that a slow spell of a shared machine
    falls on every configuration alike): median wall ms, mean wall ms, and ms per step by top-level operator."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    walls: dict[str, list[float]] = {key: [] for key in steps}
    by_op: dict[str, dict[str, float]] = {key: defaultdict(float) for key in steps}
    order = list(steps)
    for round_ in range(rounds):
        for key in order[round_ % len(order) :] + order[: round_ % len(order)]:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                steps[key]()
                walls[key].append(time.perf_counter() - start)
            # top-level operators only (children included): a nested op's time is inside its parent's
            for event in prof.events():
                if event.cpu_parent is None:
                    by_op[key][event.name] += event.cpu_time_total / 1e3 / rounds
    return {
        key: (statistics.median(walls[key]) * 1e3, statistics.mean(walls[key]) * 1e3, dict(by_op[key])) for key in steps
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--tasks", type=int, default=3, choices=[3, 40])
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--top", type=int, default=8, help="top operators listed per configuration")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line("cpu"))
    print(f"# T = {args.tasks}, batch {args.batch} of {args.size}x{args.size}, {args.steps} profiled steps\n")
    steps = {config: make_step(config, args.tasks, args.batch, args.size) for config in args.configs}
    results = profile_interleaved(steps, args.steps, args.warmup)
    base = results.get("torch/ew", results[args.configs[0]])[0]
    labels = [label for label, _ in CATEGORIES] + ["elementwise", "python+autograd"]
    print("| configuration | ms/step (median) | × torch/ew | " + " | ".join(labels) + " |")
    print("|" + "---|" * (3 + len(labels)))
    for config, (median, mean, by_op) in results.items():
        sums: dict[str, float] = defaultdict(float)
        for name, ms in by_op.items():
            sums[category(name)] += ms
        sums["python+autograd"] = max(mean - sum(by_op.values()), 0.0)
        cells = [f"{sums[label]:.1f}" for label in labels]
        print(f"| {config} | {median:.1f} | {median / base:.2f}× | " + " | ".join(cells) + " |")
    for config, (_, _, by_op) in results.items():
        print(f"\n## {config}: top operators (ms per step, self + children of top-level calls)\n")
        for name, ms in sorted(by_op.items(), key=lambda item: -item[1])[: args.top]:
            print(f"  {ms:8.2f}  {name}")


if __name__ == "__main__":
    main()
