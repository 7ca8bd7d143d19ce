"""Does data loading starve training? The loader alone vs a training step, and the data-wait fraction.

Two datasets: the built-in ``scenes`` (rendered in memory at start-up) and a generated folder in the NYUv2
``.npy`` layout (scenes written by :func:`export_npy_layout`, read back from disk by the ``nyuv2`` loader,
so file reads and decoding are measured). Both go through the training joint transforms (flip and
scale-crop) and the library's collate.

For each ``num_workers`` and ``pin_memory`` setting it measures

- **loader alone**: batches per second when nothing else runs;
- **training**: the median step time of a resnet18 hard-sharing model (forward, every task's loss,
  backward, SGD step) and the **data-wait fraction** = time spent waiting for the next batch / total
  time, over the timed steps (the first ``--warmup`` steps, which start the workers, are not timed).

    python benchmarks/dataloading.py                      # short: 12 timed steps, workers 0 1 2
    python benchmarks/dataloading.py --steps 50 --image-size 128 --batch-size 32 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from mtlvision.data.collate import Collate
from mtlvision.data.datasets import DATASETS
from mtlvision.data.datasets.nyuv2 import export_npy_layout
from mtlvision.data.transforms import build_transforms, target_specs
from mtlvision.models.multitask import MultiTaskModel
from mtlvision.tasks import TASKS, Task

DENSE_TASKS = ("segmentation", "depth", "normals")


class Transformed(Dataset):
    """A dataset with the joint transform applied (picklable for worker processes)."""

    def __init__(self, dataset: Dataset, transform: Any) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.transform(self.dataset[index])


def make_datasets(args: argparse.Namespace, workdir: Path) -> dict[str, tuple[Dataset, dict[str, Task]]]:
    scenes = DATASETS.get("scenes")
    params = scenes.Params(name="scenes", train_size=args.samples, val_size=4, test_size=4, image_size=args.image_size)
    specs = {name: spec for name, spec in scenes.tasks(params).items() if name in DENSE_TASKS}
    scene_tasks = {name: TASKS.get(s.kind)(name, **s.params) for name, s in specs.items()}
    scene_train = scenes.build(params, "train")
    for split in ("train", "val"):
        export_npy_layout((scene_train[i] for i in range(len(scene_train))), workdir / split)
    nyu = DATASETS.get("nyuv2")
    nyu_params = nyu.Params(name="nyuv2", root=str(workdir), val_fraction=0.05)
    nyu_tasks = {name: TASKS.get(s.kind)(name, **s.params) for name, s in nyu.tasks(nyu_params).items()}
    return {
        "scenes": (scene_train, scene_tasks),
        "nyuv2-folder": (nyu.build(nyu_params, "train"), nyu_tasks),
    }


def loader_for(
    dataset: Dataset, tasks: dict[str, Task], args: argparse.Namespace, workers: int, pin: bool
) -> DataLoader:
    transform = build_transforms({"hflip": 0.5, "scale": [1.0, 1.25]}, target_specs(tasks), train=True)
    return DataLoader(
        Transformed(dataset, transform),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=pin,
        collate_fn=Collate(tasks),
        drop_last=True,
        persistent_workers=False,
    )


def endless(loader: DataLoader) -> Iterator[Any]:
    while True:
        yield from loader


def time_loader(loader: DataLoader, args: argparse.Namespace) -> float:
    batches = endless(loader)
    for _ in range(args.warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(args.steps):
        next(batches)
    return args.steps / (time.perf_counter() - start)


def time_training(loader: DataLoader, tasks: dict[str, Task], args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    model = MultiTaskModel("resnet18", list(tasks.values())).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    batches = endless(loader)
    waits, steps = [], []
    for step in range(args.warmup + args.steps):
        begin = time.perf_counter()
        batch = next(batches)
        got = time.perf_counter()
        images = batch["image"].to(device, non_blocking=True)
        outputs = model(images)
        loss = sum(
            task.loss(
                outputs[name], batch["targets"][name].to(device, non_blocking=True), batch["valid"][name].to(device)
            )
            for name, task in tasks.items()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        if step >= args.warmup:
            waits.append(got - begin)
            steps.append(end - begin)
    return {"step_s": statistics.median(steps), "data_wait_fraction": sum(waits) / sum(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=256, help="training samples per dataset")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    pins = [False, True] if args.device.startswith("cuda") else [False]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (dataset, tasks) in make_datasets(args, Path(tmp)).items():
            for workers in args.workers:
                for pin in pins:
                    alone = time_loader(loader_for(dataset, tasks, args, workers, pin), args)
                    train = time_training(loader_for(dataset, tasks, args, workers, pin), tasks, args)
                    rows.append(
                        {"dataset": name, "workers": workers, "pin_memory": pin, "loader_batches_per_s": alone, **train}
                    )
                    print(
                        f"{name:13s} workers={workers} pin={pin!s:5s}  loader {alone:7.1f} batch/s  "
                        f"step {1000 * train['step_s']:7.1f} ms  data wait {100 * train['data_wait_fraction']:5.1f}%",
                        flush=True,
                    )
    meta = {
        "device": args.device,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "steps": args.steps,
        "torch_threads": torch.get_num_threads(),
    }
    if args.out:
        args.out.write_text(json.dumps({"setting": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
