"""Overhead of mtlvision's training loop against a plain PyTorch loop, and the data-wait fraction.

Both loops train the same model (built-in scenes, resnet18, hard sharing, count/colors/segmentation/depth,
equal weights) on the same DataLoader batches with AdamW, alternating epochs A B A B ... in one process;
the figure is the median epoch time ratio. The data-wait fraction is the share of mtlvision's epoch spent
waiting for the next batch.

    python benchmarks/overhead.py                 # 5 pairs of epochs of 10 steps each
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtlvision.config import load_config
from mtlvision.engine.build import build_model, build_split, build_tasks
from mtlvision.engine.trainer import Trainer
from mtlvision.evaluation.evaluator import move_batch


def plain_epoch(model, tasks, loader, optimizer, device) -> float:
    """The loop a PyTorch user writes by hand: forward, sum of task losses, backward, step."""
    model.train()
    start = time.perf_counter()
    for batch in loader:
        batch = move_batch(batch, device)
        optimizer.zero_grad(set_to_none=True)
        predictions = model(batch["image"])
        loss = sum(task.loss(predictions[n], batch["targets"][n], batch["valid"][n]) for n, task in tasks.items())
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = load_config(
        "scenes",
        [
            "tasks=[count,colors,segmentation,depth]",
            f"data.train_size={args.steps * args.batch_size}",
            "data.val_size=8",
            "data.test_size=8",
            f"data.num_workers={args.workers}",
        ],
    )
    tasks = build_tasks(config)
    model = build_model(config, tasks)
    data = build_split(config, tasks, "train", train=True)
    ours, plain, waits = [], [], []
    for pair in range(args.pairs + 1):  # the first pair warms up
        trainer = Trainer(
            model,
            "ew",
            epochs=1,
            batch_size=args.batch_size,
            device=args.device,
            num_workers=args.workers,
            progress=False,
            scheduler="none",
        )
        start = time.perf_counter()
        row = trainer.fit(data).history[-1]
        mtl_seconds = time.perf_counter() - start
        loader = trainer.loader(data, shuffle=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
        plain_seconds = plain_epoch(model, trainer.tasks, loader, optimizer, trainer.device)
        if pair:
            ours.append(mtl_seconds)
            plain.append(plain_seconds)
            waits.append(row["data_wait_fraction"])
    ratios = [a / b for a, b in zip(ours, plain)]
    print("| loop | median epoch (s) | steps | batch |\n|---|---|---|---|")
    print(f"| plain PyTorch | {statistics.median(plain):.2f} | {args.steps} | {args.batch_size} |")
    print(f"| mtlvision Trainer (ew) | {statistics.median(ours):.2f} | {args.steps} | {args.batch_size} |")
    print(f"\noverhead (median of per-pair ratios): {100 * (statistics.median(ratios) - 1):+.1f}%")
    print(f"data-wait fraction of the mtlvision epoch (median): {100 * statistics.median(waits):.1f}%")


if __name__ == "__main__":
    main()
