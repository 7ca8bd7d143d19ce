"""The vmapped backward's two ways (``BACKWARD_VMAP``), per Jacobian path, against plain PyTorch, in one process.

The problem of ``benchmarks/balancers.py`` (resnet18 trunk, T = 3 or 40 tasks); steps interleaved round-robin
(the first round untimed), ``BACKWARD_VMAP["way"]`` set before each of our steps: ``func`` (``torch.func.vmap``
over one backward: the task dimension folded into the convolutions' batch) or ``autograd``
(``is_grads_batched``: torch's legacy vmap, a convolution's backward once per task) or ``auto`` (the
default: the layer path times both once and keeps the faster, the batched path ``autograd``). Prints each
configuration's median step time and its ratio to the equal-weights step and to the outputs-only floor.

    python benchmarks/vmap_ways.py --tasks 40 --batch 8 --size 32 --rounds 3 --threads 1
    python benchmarks/vmap_ways.py --tasks 40 --device cuda --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from balancers import build_problem, machine_line, ours_step, torch_step  # the sibling benchmark script
from mtlvision.balancers.jacobian.vmap import BACKWARD_VMAP, MEASURED_BACKWARDS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=40, choices=[3, 40])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds, the first untimed")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--method", default="mgda")
    parser.add_argument("--paths", nargs="+", default=["layers", "batched"], choices=["layers", "batched"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def make(step_of, method: str, mode: str):  # type: ignore[no-untyped-def]
        trunk, heads, task_losses, x = build_problem(args.tasks, args.batch, args.size, args.device)
        trunk.train(), heads.train()
        return step_of(method, mode, trunk, heads, task_losses, x)

    steps = {
        "torch/ew": (make(torch_step, "ew", "params"), "auto"),
        "torch/outputs (is_grads_batched)": (make(torch_step, "outputs", "params"), "auto"),
    }
    for path in args.paths:
        for way in ("auto", "func", "autograd"):
            steps[f"{args.method} {path}, {way}"] = (make(ours_step, args.method, path), way)
    times: dict[str, list[float]] = {key: [] for key in steps}
    for round_ in range(args.rounds):
        for key, (step, way) in steps.items():
            BACKWARD_VMAP["way"] = way
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            if round_:
                times[key].append(time.perf_counter() - start)
    BACKWARD_VMAP["way"] = "auto"
    print(machine_line(args.device, args.threads))
    print(f"# T = {args.tasks}, batch {args.batch} of {args.size}x{args.size}, {args.rounds - 1} timed rounds")
    print(f"# the layer path's measured choice: {sorted(set(MEASURED_BACKWARDS.values()))}")
    ew = statistics.median(times["torch/ew"])
    outputs = statistics.median(times["torch/outputs (is_grads_batched)"])
    print("| configuration | ms/step | × equal weights | × outputs-only floor |\n|---|---|---|---|")
    for key, values in times.items():
        median = statistics.median(values)
        print(f"| {key} | {median * 1e3:.0f} | {median / ew:.2f}× | {median / outputs:.2f}× |")


if __name__ == "__main__":
    main()
