"""Training-step time of SegNet-MTAN on NYUv2-sized batches: mtlvision's balancers against a plain loop.

Setting: the ``nyuv2_segnet_mtan`` network (SegNet-MTAN, 44.2M parameters, segmentation/depth/normals with
MTAN's prediction layers, the per-task attention balanced with the trunk as in the Nash-MTL/FAMO code), a
random batch of ``--batch`` images of 288 × 384 with NYUv2-like targets, Adam at lr 1e-4. One step is
forward, the task losses, the balancer's update, the optimiser step. The plain loop is what a PyTorch user
writes for equal weights on the same network (forward, sum of the losses, backward, step); it is the
reference each ratio divides by. LibMTL has no SegNet-MTAN in its package (its NYUv2 SegNet lives in its
examples), so no LibMTL figure is given. Each configuration runs ``--warmup`` untimed then ``--steps``
timed steps; the median is reported.

    python benchmarks/segnet_step.py                           # batch 2 at 288×384, 3 timed steps, CPU
    python benchmarks/segnet_step.py --device cuda --steps 20  # steps per second on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mtlvision.config import load_config
from mtlvision.engine.build import build_model, build_tasks
from mtlvision.engine.trainer import Trainer

BALANCERS = ["ew", "mgda", "nash_mtl", "famo"]


def random_batch(batch: int, height: int, width: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    normals = F.normalize(torch.randn(batch, 3, height, width, generator=generator), dim=1)
    targets = {
        "segmentation": torch.randint(0, 13, (batch, height, width), generator=generator),
        "depth": torch.rand(batch, 1, height, width, generator=generator) * 9 + 0.5,
        "normals": normals,
    }
    return {
        "image": torch.rand(batch, 3, height, width, generator=generator).to(device),
        "targets": {name: target.to(device) for name, target in targets.items()},
        "valid": {name: torch.ones(batch, dtype=torch.bool, device=device) for name in targets},
    }


def timed(step: Callable[[], object], warmup: int, steps: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=[288, 384])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--balancers", nargs="+", default=BALANCERS)
    args = parser.parse_args()
    device = torch.device(args.device)
    config = load_config("nyuv2_segnet_mtan")
    task_list = build_tasks(config)
    tasks = {task.name: task for task in task_list}
    batch = random_batch(args.batch, *args.size, device)

    torch.manual_seed(0)
    model = build_model(config, task_list).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def plain_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        predictions = model(batch["image"])
        loss = sum(
            task.loss(predictions[name], batch["targets"][name], batch["valid"][name]) for name, task in tasks.items()
        )
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        optimizer.step()

    plain = timed(plain_step, args.warmup, args.steps, device)
    print(f"SegNet-MTAN, batch {args.batch} of {args.size[0]}x{args.size[1]}, {args.device}, median of {args.steps}")
    print(f"{'loop':<22} {'s/step':>8} {'steps/s':>8} {'vs plain':>9}")
    print(f"{'plain PyTorch (EW)':<22} {plain:8.3f} {1 / plain:8.2f} {1.0:9.2f}")
    for name in args.balancers:
        trainer = Trainer(model, name, lr=1e-4, optimizer="adam", weight_decay=0.0, device=args.device, progress=False)
        seconds = timed(lambda trainer=trainer: trainer.train_step([batch]), args.warmup, args.steps, device)
        print(f"{'mtlvision ' + name:<22} {seconds:8.3f} {1 / seconds:8.2f} {seconds / plain:9.2f}")


if __name__ == "__main__":
    main()
