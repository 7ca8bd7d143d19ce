"""Cost of deciding what to train: gradient-conflict diagnostics and the TAG affinity run, against a plain run.

Each arm trains the same model (built-in scenes, all six tasks, hard sharing, equal weights) for one epoch
of ``--steps`` steps on the same data, the arms interleaved (plain, diagnostics, affinity, plain, ...) in one
process so that machine load hits them alike; the first round warms up. Reported: the median epoch time
of each arm and the median of the per-round ratios to the plain epoch. Targets: diagnostics at
``every=50`` ≤ 1.05×; the affinity run at its default ``every=10`` ≤ 1.5×.

    python benchmarks/decide.py                          # 4 rounds of 100 steps, 32×32 images, batch 16
    python benchmarks/decide.py --rounds 2 --steps 50 --threads 1     # what docs/deciding.md reports
    python benchmarks/decide.py --device cuda --image-size 64 --batch-size 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtlvision.config import load_config
from mtlvision.engine.affinity_run import DEFAULT_EVERY, TaskAffinity
from mtlvision.engine.build import build_model, build_split, build_tasks
from mtlvision.engine.diagnostics import GradientDiagnostics
from mtlvision.engine.probes import StepProbe
from mtlvision.engine.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--diagnostics-every", type=int, default=50)
    parser.add_argument("--affinity-every", type=int, default=DEFAULT_EVERY)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=["diagnostics", "affinity"],
        default=["diagnostics", "affinity"],
        help="beside plain",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(
        "scenes",
        [
            f"data.image_size={args.image_size}",
            f"data.train_size={args.steps * args.batch_size}",
            "data.val_size=8",
            "data.test_size=8",
        ],
    )
    tasks = build_tasks(config)
    model = build_model(config, tasks)
    data = build_split(config, tasks, "train", train=True)
    known: dict[str, type[StepProbe] | None] = {
        "plain": None,
        "diagnostics": GradientDiagnostics,
        "affinity": TaskAffinity,
    }
    arms = {arm: known[arm] for arm in dict.fromkeys(["plain", *args.arms])}
    every = {"diagnostics": args.diagnostics_every, "affinity": args.affinity_every}
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    for round_ in range(args.rounds + 1):  # the first round warms up
        for arm, probe in arms.items():
            trainer = Trainer(
                model,
                "ew",
                epochs=1,
                batch_size=args.batch_size,
                device=args.device,
                progress=False,
                scheduler="none",
                probes=[probe(every[arm])] if probe is not None else [],
            )
            start = time.perf_counter()
            trainer.fit(data)
            if round_:
                seconds[arm].append(time.perf_counter() - start)
    print(
        f"scenes, {len(tasks)} tasks, {config.model.backbone}, {args.steps} steps of {args.batch_size} images "
        f"{args.image_size}×{args.image_size}, {args.device}, {args.rounds} rounds (median):"
    )
    for arm in arms:
        ratios = [a / b for a, b in zip(seconds[arm], seconds["plain"])]
        label = arm if arm == "plain" else f"{arm} every={every[arm]}"
        print(f"  {label:24s} {statistics.median(seconds[arm]):7.2f} s/epoch   ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
