"""Δm of every balancer on MultiMNIST (left and right digit), mean and spread over seeds.

For each seed: single-task experts (``mtlvision baseline``), then one joint model per balancer, all with
the same settings; Δm of each joint model against that seed's experts (DESIGN.md's formula, lower is
better). Everything runs in this one process through the Python API.

    python benchmarks/methods_multimnist.py --seeds 0 1 2 --epochs 5 --device cuda
    python benchmarks/methods_multimnist.py --methods ew pcgrad --seeds 0 --epochs 1 --train-size 256   # quick check

Seeds can run in separate processes (``--seeds 0 --json s0.json`` ...), then one table from all of them:
``python benchmarks/methods_multimnist.py --table s0.json s1.json s2.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import mtlvision as mv
from mtlvision.balancers import BALANCERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered balancer")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--eval-size", type=int, default=2_000, help="pairs in each of val and test")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--table",
        nargs="+",
        default=None,
        metavar="JSON",
        help="print one table from the --json files of earlier runs (no training)",
    )
    args = parser.parse_args()
    if args.table:
        merged: dict[str, list[dict]] = {}
        runs = [json.loads(Path(f).read_text()) for f in args.table]
        for run in runs:
            for method, records in run["results"].items():
                merged.setdefault(method, []).extend(records)
        print_table(merged, runs[0]["settings"], sorted({s for run in runs for s in run["settings"]["seeds"]}))
        return
    methods = args.methods or [n for n in BALANCERS.names() if n != "fixed"]
    common = {
        "train.epochs": args.epochs,
        "train.batch_size": args.batch_size,
        "train.device": args.device,
        "data.train_size": args.train_size,
        "data.val_size": args.eval_size,
        "data.test_size": args.eval_size,
        "model.backbone": args.backbone,
        "train.progress": False,
    }
    settings = {
        "backbone": args.backbone,
        "epochs": args.epochs,
        "train_size": args.train_size,
        "eval_size": args.eval_size,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        results: dict[str, list[dict]] = {m: [] for m in methods}
        for seed in args.seeds:
            out = root / f"seed{seed}"
            mv.baseline("multimnist", {**common, "seed": seed}, out=out)
            for method in methods:
                start = time.perf_counter()
                try:
                    run = mv.train(
                        "multimnist", {**common, "seed": seed, "balancer.name": method}, out=out, name=method
                    )
                except mv.MtlvisionError as exc:
                    print(f"{method} (seed {seed}) failed: {exc}", flush=True)
                    results[method].append({"error": str(exc)})
                    continue
                record = {
                    "delta_m": run.metrics.get("delta_m"),
                    "left": run.metrics["left"]["accuracy"],
                    "right": run.metrics["right"]["accuracy"],
                    "seconds": time.perf_counter() - start,
                }
                results[method].append(record)
                print(f"{method} seed {seed}: {record}", flush=True)
                if args.json:  # after every run, so that an interrupted sweep keeps what it measured
                    Path(args.json).write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    print_table(results, settings, args.seeds)


def print_table(results: dict[str, list[dict]], settings: dict, seeds: list[int]) -> None:
    print(
        f"\nMultiMNIST, {settings['backbone']}, {settings['epochs']} epochs, {settings['train_size']} training "
        f"pairs, {settings['eval_size']} test pairs, seeds {seeds}; Δm % against each seed's single-task experts "
        "(lower is better)\n"
    )
    print("| method | Δm % (mean ± std) | left acc | right acc | s/run |")
    print("|---|---|---|---|---|")

    def spread(values: list[float]) -> str:
        return (
            f"{statistics.mean(values):+.2f} ± {statistics.stdev(values):.2f}"
            if len(values) > 1
            else f"{values[0]:+.2f}"
        )

    for method, records in sorted(
        results.items(),
        key=lambda kv: statistics.mean([r["delta_m"] for r in kv[1] if r.get("delta_m") is not None] or [float("inf")]),
    ):
        ok = [r for r in records if "error" not in r and r["delta_m"] is not None]
        if not records:
            print(f"| {method} | not run | | | |")
            continue
        if not ok:
            print(f"| {method} | failed: {records[0].get('error', 'no Δm')[:60]} | | | |")
            continue
        print(
            f"| {method} | {spread([r['delta_m'] for r in ok])} | "
            f"{statistics.mean(r['left'] for r in ok):.4f} | {statistics.mean(r['right'] for r in ok):.4f} | "
            f"{statistics.mean(r['seconds'] for r in ok):.0f} |"
        )


if __name__ == "__main__":
    main()
