"""Extra cost per training step of the bilevel balancers (Auto-Lambda, MOML, FORUM) against equal weights.

Each method trains the same model (built-in scenes, hard sharing, count/colors/segmentation/depth) through
``Trainer.train_step`` on the same batches; a bilevel method also takes its meta-step on a validation batch
first. Methods alternate step by step (A B C A B C ...) after warm-up steps, so that a load that changes
over time falls on all of them; the figure is each method's median step time and its ratio to EW's.

    python benchmarks/bilevel_step.py                                  # resnet18, 64 px, batch 16, CPU
    python benchmarks/bilevel_step.py --backbone test_resnet --size 32 --steps 3   # quick check
    python benchmarks/bilevel_step.py --device cuda --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from mtlvision.balancers.bilevel import BilevelBalancer
from mtlvision.config import load_config
from mtlvision.engine.bilevel import MetaStep
from mtlvision.engine.build import build_model, build_split, build_tasks
from mtlvision.engine.trainer import Trainer
from mtlvision.evaluation.evaluator import move_batch


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["ew", "auto_lambda", "moml", "forum"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    overrides = [
        "tasks=[count,colors,segmentation,depth]",
        f"model.backbone={args.backbone}",
        f"data.image_size={args.size}",
        f"data.train_size={args.batch_size}",
        f"data.val_size={args.batch_size}",
        "data.test_size=4",
    ]
    config = load_config("scenes", overrides)
    tasks = build_tasks(config)
    train = build_split(config, tasks, "train", train=True)
    val = build_split(config, tasks, "val", train=False)
    trainers: dict[str, Trainer] = {}
    for method in args.methods:
        torch.manual_seed(0)
        trainer = Trainer(
            build_model(config, tasks), method, epochs=1, batch_size=args.batch_size, device=args.device, progress=False
        )
        if isinstance(trainer.balancer, BilevelBalancer):
            trainer._meta = MetaStep(trainer, val)
        trainers[method] = trainer
    batch: dict[str, Any] = next(iter(next(iter(trainers.values())).loader(train, shuffle=False)))
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    for step in range(args.warmup + args.steps):
        for method, trainer in trainers.items():
            moved = move_batch(batch, trainer.device)
            synchronise(trainer.device)
            start = time.perf_counter()
            trainer.train_step([moved])
            synchronise(trainer.device)
            if step >= args.warmup:
                times[method].append(time.perf_counter() - start)
    reference = statistics.median(times[args.methods[0]])
    device = next(iter(trainers.values())).device
    print(f"{args.backbone}, {args.size} px, batch {args.batch_size}, 4 tasks, {device}, {args.steps} timed steps\n")
    print(f"| method | median step (ms) | × {args.methods[0]} |\n|---|---|---|")
    for method in args.methods:
        median = statistics.median(times[method])
        print(f"| {method} | {1000 * median:.1f} | {median / reference:.2f}× |")


if __name__ == "__main__":
    main()
