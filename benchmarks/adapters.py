"""MTLoRA against full fine-tuning on a ViT: trainable parameters and training-step time.

One model per setting over the same ViT backbone with ViTDet's feature pyramid and the built-in scenes
tasks (``--tasks``, default count, segmentation, depth), each with its default head:

- **full fine-tuning**: hard parameter sharing (``hps``), every weight trained;
- **MTLoRA**: ``mtlora`` (task-agnostic LoRA in the shared blocks, per-task LoRA in the last block),
  the ViT frozen as in the paper; the pyramid and heads trained;
- **MTLoRA, ViT trained**: the same adapters with ``freeze_backbone: false``.

One step: forward, the sum of the task losses, backward and an AdamW step over the trainable parameters
(frozen weights get no gradient, so the step skips them: the saving MTLoRA is about). The table gives
total and trainable parameters and the median of ``--steps`` timed steps after ``--warmup`` untimed ones.

    python benchmarks/adapters.py                                  # short: vit_tiny, batch 16 of 64 x 64
    python benchmarks/adapters.py --backbone vit_small_patch16_224 --image-size 224 --batch-size 32 \\
        --steps 20 --device cuda --out adapters.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from heads import scenes_batch, to_device
from mtlvision.models.architectures import HPS, ArchitectureSpec, MTLoRA
from mtlvision.models.complexity import count_parameters
from mtlvision.models.multitask import MultiTaskModel

SETTINGS: dict[str, ArchitectureSpec] = {
    "full fine-tuning (hps)": HPS(),
    "MTLoRA (ViT frozen)": MTLoRA(),
    "MTLoRA (ViT trained)": MTLoRA(freeze_backbone=False),
}


def step_ms(model: MultiTaskModel, batch: dict[str, Any], device: torch.device, warmup: int, steps: int) -> float:
    """Median wall time of one training step in milliseconds."""
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    images = batch["image"].to(device)
    targets, valid = to_device(batch["targets"], device), to_device(batch["valid"], device)
    times = []
    for index in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        predictions = model(images)
        loss: Tensor = sum(  # type: ignore[assignment]
            task.loss(predictions[name], targets[name], valid[name]) for name, task in model.tasks.items()
        )
        loss.backward()
        optimiser.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def run(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    all_tasks, batch = scenes_batch(args)
    tasks = [all_tasks[name] for name in args.tasks]
    batch = {
        "image": batch["image"],
        "targets": {name: batch["targets"][name] for name in args.tasks},
        "valid": {name: batch["valid"][name] for name in args.tasks},
    }
    rows = []
    for label, spec in SETTINGS.items():
        torch.manual_seed(0)
        model = MultiTaskModel(args.backbone, tasks, architecture=spec).to(device).train()
        counts = count_parameters(model)
        rows.append(
            (label, counts["total"], counts["trainable"], step_ms(model, batch, device, args.warmup, args.steps))
        )
    base_trainable, base_ms = rows[0][2], rows[0][3]
    hardware = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    lines = [
        f"Training step (forward, losses, backward, AdamW) on {args.backbone} + feature pyramid, tasks "
        f"{', '.join(args.tasks)}; batch {args.batch_size} of {args.image_size}x{args.image_size}, "
        f"{device.type} ({hardware}), median of {args.steps} steps.",
        "",
        "| setting | parameters | trainable | trainable vs full | ms / step | vs full |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, total, trainable, ms in rows:
        lines.append(
            f"| {label} | {total / 1e6:.2f}M | {trainable / 1e6:.3f}M | {trainable / base_trainable:.3f}x | "
            f"{ms:.1f} | {ms / base_ms:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="vit_tiny_patch16_224")
    parser.add_argument("--tasks", nargs="+", default=["count", "segmentation", "depth"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
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
