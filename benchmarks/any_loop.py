"""Step time of the any-loop API (``mv.MultiTaskBackward``) against the Trainer's own step, and against
torchjd's ``mtl_backward`` for the methods both libraries have.

1. **Against the Trainer** (EW and MGDA): the same ``MultiTaskModel`` (resnet18, hard sharing; count,
   segmentation and depth heads), the same batch and the same optimiser, one step being
   ``Trainer.train_step([batch])`` or the user's loop (``zero_grad``, forward inside ``mtl.record()``, the
   tasks' losses, ``mtl.backward``, ``step``). Each takes its own default path (the Trainer cuts the shared
   representation, the API walks the losses' graph for the heads). The ratio API / Trainer should be 1 within
   noise.
2. **Against torchjd** (``torchjd.autojac.mtl_backward`` then ``jac_to_grad`` with the method's aggregator,
   torchjd's documented loop) on ``benchmarks/balancers.py``'s problem: a resnet18 trunk, batch 16 of
   64×64, T = 3 (classification, segmentation, depth); also the engine wired by hand as
   ``benchmarks/balancers.py`` does, which the API should match.

Every configuration is timed in one process with the steps interleaved round-robin, so that a slow spell of
a shared machine falls on each alike; medians are reported.

    python benchmarks/any_loop.py                        # both tables, 10 timed steps
    python benchmarks/any_loop.py --steps 20 --methods upgrad mgda pcgrad imtl_g aligned_mtl dualproj
    python benchmarks/any_loop.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import balancers as bench  # (benchmarks/balancers.py: the problem, torchjd's step, the hand wiring)

BOTH = [name for name, aggregator in bench.TORCHJD.items() if aggregator is not None]


def trainer_steps(method: str, batch: int, size: int, device: str) -> dict[str, Callable[[], None]]:
    """The Trainer's step and the any-loop API's on two copies of one model, on the same batch."""
    import torch

    import mtlvision as mv

    data_config = {"data.image_size": size, "data.train_size": batch, "tasks": ["count", "segmentation", "depth"]}
    samples = mv.split("scenes", "train", data_config)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(mv.MultiTaskModel("resnet18", mv.build_tasks("scenes", data_config)))
    options: dict[str, Any] = dict(epochs=1, batch_size=batch, lr=1e-3, optimizer="sgd", progress=False, device=device)
    trainer = mv.Trainer(models[0], method, **options)
    helper = mv.Trainer(models[1], "ew", **options)  # the same optimiser and the same task losses for the loop
    data = bench_batch(trainer, samples, batch)
    mtl = mv.MultiTaskBackward(models[1].architecture, method)
    model, optimizer = models[1], helper.optimizer

    def api_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with mtl.record():
            losses = helper.task_losses(model(data["image"]), data)
        mtl.backward(losses)
        optimizer.step()

    return {f"trainer/{method}": lambda: trainer.train_step([data]), f"api/{method}": api_step}


def bench_batch(trainer: Any, samples: Any, batch: int) -> dict[str, Any]:
    from mtlvision.evaluation.evaluator import move_batch

    return move_batch(trainer.collate([samples[i] for i in range(batch)]), trainer.device)


def torchjd_steps(method: str, batch: int, size: int, device: str) -> dict[str, Callable[[], None]]:
    """torchjd's loop, the engine wired by hand and the any-loop API, each on a fresh copy of the problem."""
    import torch

    import mtlvision as mv

    steps = {
        f"torchjd/{method}": bench.torchjd_step(method, "params", *bench.build_problem(3, batch, size, device)),
        f"by-hand/{method}": bench.ours_step(method, "params", *bench.build_problem(3, batch, size, device)),
    }
    trunk, heads, task_losses, x = bench.build_problem(3, batch, size, device)
    mtl = mv.MultiTaskBackward(trunk, method)
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=1e-3)

    def api_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with mtl.record():
            losses = task_losses(heads, trunk(x))
        mtl.backward(losses)
        optimizer.step()

    steps[f"api/{method}"] = api_step
    return steps


def interleaved(steps: dict[str, Callable[[], None]], warmup: int, count: int, cuda: bool) -> dict[str, float]:
    """Median seconds per step of each, the steps run round-robin (the starting one rotating)."""
    times: dict[str, list[float]] = {key: [] for key in steps}
    order = list(steps)
    for round_ in range(warmup + count):
        for key in order[round_ % len(order) :] + order[: round_ % len(order)]:
            seconds = bench.timed(steps[key], cuda)
            if round_ >= warmup:
                times[key].append(seconds)
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--methods", nargs="+", default=BOTH, help="methods timed against torchjd")
    parser.add_argument("--skip-trainer", action="store_true", help="leave out the Trainer comparison")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    started = time.perf_counter()
    where = f"{args.device}, {torch.get_num_threads()} threads" if not cuda else torch.cuda.get_device_name()
    print(f"# any-loop API step time ({where}; batch {args.batch} of {args.size}x{args.size}, T = 3)\n")
    if not args.skip_trainer:
        steps: dict[str, Callable[[], None]] = {}
        for method in ("ew", "mgda"):
            steps.update(trainer_steps(method, args.batch, args.size, args.device))
        medians = interleaved(steps, args.warmup, args.steps, cuda)
        print("| method | Trainer.train_step (ms) | MultiTaskBackward loop (ms) | API / Trainer |")
        print("|---|---|---|---|")
        for method in ("ew", "mgda"):
            ours, theirs = medians[f"api/{method}"], medians[f"trainer/{method}"]
            print(f"| {method} | {theirs * 1e3:.0f} | {ours * 1e3:.0f} | {ours / theirs:.2f}× |")
        print()
    steps = {}
    for method in ["ew", *args.methods]:
        steps.update(torchjd_steps(method, args.batch, args.size, args.device))
    medians = interleaved(steps, args.warmup, args.steps, cuda)
    print("| method | torchjd mtl_backward (ms) | engine by hand (ms) | MultiTaskBackward (ms) | API / torchjd |")
    print("|---|---|---|---|---|")
    for method in ["ew", *args.methods]:
        jd, hand, api = (medians[f"{who}/{method}"] for who in ("torchjd", "by-hand", "api"))
        print(f"| {method} | {jd * 1e3:.0f} | {hand * 1e3:.0f} | {api * 1e3:.0f} | {api / jd:.2f}× |")
    print(f"\n{args.steps} timed steps after {args.warmup} warm-up, interleaved; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
