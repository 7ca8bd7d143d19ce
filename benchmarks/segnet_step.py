"""Training-step time of the NYUv2 benchmark networks: mtlvision's balancers against a plain loop and LibMTL.

Setting: the network of a benchmark preset (``--network``: ``nyuv2_segnet_mtan``, SegNet-MTAN, 44.2M
parameters, the per-task attention balanced with the trunk as in the Nash-MTL/FAMO code; or
``nyuv2_resnet50``, LibMTL's dilated ResNet-50 with DeepLabV3 heads, 71.9M parameters), segmentation, depth
and normals with the preset's losses, a random batch of ``--batch`` images of ``--size`` (288 × 384) with
NYUv2-like targets, Adam at lr 1e-4. One step is forward, the task losses, the balancer's update, the optimiser
step. The plain loop is what a PyTorch user writes for equal weights on the same network (forward, sum of the
losses, backward, step); it is the reference each ratio divides by.

LibMTL: its 1.1.5 weighting classes (``EW``, ``MGDA``; the package has no Nash-MTL or FAMO) drive the same
model on the same batch: the model's shared parameters are LibMTL's "encoder", its ``backward`` computes the
per-task gradients its own way (one backward pass per task for MGDA). LibMTL is installed as
``benchmarks/balancers.py`` does it (``.bench_envs/libmtl``, ``pip install --no-deps``; ``--wheels DIR``
offline; ``--no-libmtl`` skips it). Each configuration runs ``--warmup`` untimed then ``--steps`` timed
steps; the median is reported.

    python benchmarks/segnet_step.py --size 96 128                # CPU, a smaller image
    python benchmarks/segnet_step.py --device cuda --steps 20     # steps per second on a GPU, 288×384
    python benchmarks/segnet_step.py --network nyuv2_resnet50 --batch 8 --device cuda --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from mtlvision.config import load_config
from mtlvision.engine.build import build_model, build_tasks
from mtlvision.engine.trainer import Trainer

BALANCERS = ["ew", "mgda", "nash_mtl", "famo"]
NETWORKS = ["nyuv2_segnet_mtan", "nyuv2_resnet50"]


def libmtl_step(method: str, model: Any, losses_of: Callable[[], Any], lr: float) -> Callable[[], None] | None:
    """LibMTL 1.1.5's weighting ``method`` (our name) driving ``model``; None where LibMTL has no such method."""
    from balancers import LIBMTL, import_framework

    if method not in LIBMTL:
        return None
    import_framework("libmtl")
    import LibMTL.weighting as weighting

    class_name, kwargs = LIBMTL[method]
    shared = list(model.shared_parameters())

    class Bench(getattr(weighting, class_name)):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.task_num, self.task_name = len(model.task_names), list(model.task_names)
            self.device, self.rep_grad, self.epoch = shared[0].device, False, 2
            self.init_param()

        def get_share_params(self) -> Any:
            return iter(shared)

        def zero_grad_share_params(self) -> None:
            for parameter in shared:
                if parameter.grad is not None:
                    parameter.grad.zero_()

    method_obj = Bench()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        method_obj.backward(losses_of(), **kwargs)
        optimizer.step()

    return step


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
    parser.add_argument("--network", choices=NETWORKS, default=NETWORKS[0])
    parser.add_argument("--no-libmtl", action="store_true", help="skip LibMTL's figures")
    parser.add_argument("--wheels", help="install LibMTL offline from the wheels in this folder")
    args = parser.parse_args()
    device = torch.device(args.device)
    if not args.no_libmtl:
        from balancers import peer_path

        sys.path.insert(0, str(peer_path("libmtl", args.wheels)))
    config = load_config(args.network)
    task_list = build_tasks(config)
    tasks = {task.name: task for task in task_list}
    batch = random_batch(args.batch, *args.size, device)

    torch.manual_seed(0)
    model = build_model(config, task_list).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def losses() -> torch.Tensor:
        predictions = model(batch["image"])
        return torch.stack(
            [task.loss(predictions[name], batch["targets"][name], batch["valid"][name]) for name, task in tasks.items()]
        )

    def plain_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        losses().sum().backward()
        optimizer.step()

    plain = timed(plain_step, args.warmup, args.steps, device)
    print(f"{args.network}, batch {args.batch} of {args.size[0]}x{args.size[1]}, {args.device}, median of {args.steps}")
    print(f"{'loop':<22} {'s/step':>8} {'steps/s':>8} {'vs plain':>9}")
    print(f"{'plain PyTorch (EW)':<22} {plain:8.3f} {1 / plain:8.2f} {1.0:9.2f}")
    for name in args.balancers:
        trainer = Trainer(model, name, lr=1e-4, optimizer="adam", weight_decay=0.0, device=args.device, progress=False)
        seconds = timed(lambda trainer=trainer: trainer.train_step([batch]), args.warmup, args.steps, device)
        print(f"{'mtlvision ' + name:<22} {seconds:8.3f} {1 / seconds:8.2f} {seconds / plain:9.2f}")
        if args.no_libmtl:
            continue
        step = libmtl_step(name, model, losses, 1e-4)
        if step is None:
            print(f"{'LibMTL ' + name:<22} {'-':>8} {'-':>8} {'-':>9}  (not in LibMTL 1.1.5)")
            continue
        seconds = timed(step, args.warmup, args.steps, device)
        print(f"{'LibMTL ' + name:<22} {seconds:8.3f} {1 / seconds:8.2f} {seconds / plain:9.2f}")


if __name__ == "__main__":
    main()
