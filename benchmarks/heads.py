"""What does each task head cost? Training-step time of every head on the same backbone features.

One hard-sharing model over the built-in ``scenes`` tasks (classification, multi-label, segmentation,
depth, normals, detection), each with its default head (MLP, FPN, FCOS, ...). For a batch of scenes it
times the median of ``--steps`` training steps (forward, the task's loss, backward; after ``--warmup``
untimed steps) of:

- **backbone alone**: the backbone's features to a dummy loss (the mean of every feature map);
- **head alone**: the head and its loss on fixed backbone features (gradients still flow into the
  features, as in training);
- **backbone + head**: the whole single-task step.

and prints a markdown table with the head's parameters and its times relative to the backbone step.

    python benchmarks/heads.py                                   # short: batch 16 of 64 x 64, 5 timed steps
    python benchmarks/heads.py --steps 30 --device cuda --out heads.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtlvision.data.collate import Collate
from mtlvision.data.datasets import DATASETS
from mtlvision.models.multitask import MultiTaskModel
from mtlvision.tasks import TASKS, Task


def median_step_ms(
    step: Callable[[], Tensor], model: torch.nn.Module, device: torch.device, warmup: int, steps: int
) -> float:
    """Median wall time of ``step().backward()`` in milliseconds, gradients cleared in between."""
    times = []
    for index in range(warmup + steps):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def scenes_batch(args: argparse.Namespace) -> tuple[dict[str, Task], dict[str, Any]]:
    scenes = DATASETS.get("scenes")
    params = scenes.Params(
        name="scenes", train_size=args.batch_size, val_size=1, test_size=1, image_size=args.image_size
    )
    tasks = {name: TASKS.get(spec.kind)(name, **spec.params) for name, spec in scenes.tasks(params).items()}
    split = scenes.build(params, "train")
    return tasks, Collate(tasks)([split[i] for i in range(len(split))])


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, list):
        return [to_device(item, device) for item in value]
    return value


def run(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tasks, batch = scenes_batch(args)
    model = MultiTaskModel(args.backbone, list(tasks.values())).to(device).train()
    images = batch["image"].to(device)
    targets, valid = to_device(batch["targets"], device), to_device(batch["valid"], device)
    size = (images.shape[-2], images.shape[-1])
    first = next(iter(tasks))

    def backbone_step() -> Tensor:
        features = model.architecture(model.normalise(images))[first]
        return sum(feature.mean() for feature in features)

    backbone_ms = median_step_ms(backbone_step, model, device, args.warmup, args.steps)
    with torch.no_grad():
        fixed = [f.detach() for f in model.architecture(model.normalise(images))[first]]

    rows = []
    for name, task in tasks.items():
        head = model.heads[name]

        def head_step(task: Task = task, head: torch.nn.Module = head, name: str = name) -> Tensor:
            features = [f.clone().requires_grad_() for f in fixed]
            return task.loss(task.postprocess(head(features, size)), targets[name], valid[name])

        def full_step(task: Task = task, head: torch.nn.Module = head, name: str = name) -> Tensor:
            features = model.architecture(model.normalise(images))[name]
            return task.loss(task.postprocess(head(features, size)), targets[name], valid[name])

        head_ms = median_step_ms(head_step, model, device, args.warmup, args.steps)
        full_ms = median_step_ms(full_step, model, device, args.warmup, args.steps)
        parameters = sum(p.numel() for p in head.parameters())
        rows.append((name, task.kind, type(head).__name__, parameters, head_ms, full_ms))

    lines = [
        f"Head training-step times: {args.backbone} features, batch {args.batch_size} of "
        f"{args.image_size}x{args.image_size}, {device.type}"
        + (
            f" ({torch.get_num_threads()} threads)"
            if device.type == "cpu"
            else f" ({torch.cuda.get_device_name(device)})"
        )
        + f", median of {args.steps} steps.",
        "",
        f"Backbone alone: {backbone_ms:.1f} ms per step.",
        "",
        "| task | kind | head | head params | head alone (ms) | head / backbone | backbone + head (ms) | "
        "step / backbone |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, kind, head_type, parameters, head_ms, full_ms in rows:
        lines.append(
            f"| {name} | {kind} | {head_type} | {parameters / 1e6:.2f} M | {head_ms:.1f} | "
            f"{head_ms / backbone_ms:.2f}x | {full_ms:.1f} | {full_ms / backbone_ms:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args()
    table = run(args)
    print(table)
    if args.out:
        args.out.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
