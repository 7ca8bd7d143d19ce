"""Training throughput for 1 and N processes (torchrun, gloo/nccl), and mixed precision vs fp32.

Each configuration runs in fresh processes: a few warm-up steps, then ``--steps`` timed optimisation steps
of the built-in scenes model (resnet18, hard sharing, every scenes task but detection, equal weights) on
the per-rank batch ``--batch-size``. Throughput is global images per second, the median over steps.

    python benchmarks/scaling.py                           # CPU: 1 and 2 processes
    python benchmarks/scaling.py --device cuda --precisions fp32 bf16 fp16 --processes 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = "[count,colors,segmentation,depth,normals]"


def worker(args: argparse.Namespace) -> None:
    import torch

    from mtlvision.config import load_config
    from mtlvision.engine import distributed as dist
    from mtlvision.engine.build import build_model, build_split, build_tasks
    from mtlvision.engine.trainer import Trainer
    from mtlvision.evaluation.evaluator import move_batch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, args.threads // world))
    config = load_config(
        "scenes",
        [
            f"tasks={TASKS}",
            f"data.image_size={args.image_size}",
            f"data.train_size={args.batch_size * world * (args.steps + args.warmup)}",
            "data.val_size=8",
            "data.test_size=8",
        ],
    )
    tasks = build_tasks(config)
    model = build_model(config, tasks)
    trainer = Trainer(
        model, "ew", batch_size=args.batch_size, device=args.device, precision=args.precision, progress=False, seed=0
    )
    loader = trainer.loader(build_split(config, tasks, "train", train=True), shuffle=True)
    times = []
    for i, batch in enumerate(loader):
        batch = move_batch(batch, trainer.device)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train_step([batch])
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    dist.barrier()
    if dist.is_main():
        median = statistics.median(times)
        result = {
            "processes": world,
            "precision": args.precision,
            "device": str(trainer.device),
            "step_s": median,
            "images_per_s": args.batch_size * world / median,
        }
        if trainer.device.type == "cuda":
            result["gpu"] = torch.cuda.get_device_name()
            result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        Path(args.out).write_text(json.dumps(result))
    dist.cleanup()


def launch(args: argparse.Namespace, processes: int, precision: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        common = [
            __file__,
            "--worker",
            "--out",
            str(out),
            "--precision",
            precision,
            "--device",
            args.device,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--batch-size",
            str(args.batch_size),
            "--image-size",
            str(args.image_size),
            "--threads",
            str(args.threads),
        ]
        if processes == 1:
            command = [sys.executable, *common]
        else:
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={processes}",
                *common,
            ]
        subprocess.run(command, check=True)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by all ranks")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = [launch(args, n, p) for p in args.precisions for n in args.processes]
    base = {r["precision"]: r["images_per_s"] for r in rows if r["processes"] == 1}
    print("| device | processes | precision | batch/rank | step (s) | images/s | vs 1 process | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    fp32 = {r["processes"]: r["images_per_s"] for r in rows if r["precision"] == "fp32"}
    for r in rows:
        device = r.get("gpu", r["device"])
        vs_one = r["images_per_s"] / base[r["precision"]] if r["precision"] in base else float("nan")
        vs_fp32 = r["images_per_s"] / fp32[r["processes"]] if r["processes"] in fp32 else float("nan")
        print(
            f"| {device} | {r['processes']} | {r['precision']} | {args.batch_size} | {r['step_s']:.3f} | "
            f"{r['images_per_s']:.1f} | {vs_one:.2f}x | {vs_fp32:.2f}x |"
        )


if __name__ == "__main__":
    main()
