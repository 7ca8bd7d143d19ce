"""Every merging rule on experts fine-tuned from one shared start, then a short joint fine-tune from the best.

Steps (each skipped when its run folder is already finished, so the script can be re-run to add rules):
1. ``shared-start``: a joint model trained for ``--start-epochs`` (the common base θ_0 of every task vector);
2. ``baseline-<data>``: one expert per task fine-tuned from it (``mtlvision baseline --set model.init=shared-start``);
3. ``m-<rule>``: every merging rule (``mtlvision merge``), timed; BatchNorm recomputed, evaluated;
4. ``joint-from-<best>``: a joint fine-tune of ``--joint-epochs`` from the merge with the lowest Δm, and
   ``joint-from-start``, a joint fine-tune from the shared start with the experts' total epochs plus
   ``--joint-epochs`` (equal compute, counted in epochs over the training split);
5. a table (``merging.md`` and ``merging.json`` in ``--out``) from ``mtlvision compare``.

    python benchmarks/merging.py --out runs-merging                       # scenes, small CPU settings
    python benchmarks/merging.py --out runs-merging --stage merges --rules iso_c tsv_m
    python benchmarks/merging.py --out runs-merging --stage merges --rules adamerging:granularity=task,steps=100

A rule may carry its hyper-parameters after a colon (``NAME:KEY=VALUE,KEY=VALUE``); its folder is then
``m-NAME-VALUE-...``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import mtlvision as mv
from mtlvision.config import parse_override
from mtlvision.engine.merging import MERGE_RULES
from mtlvision.engine.runs import METRICS_NAME, Run

STAGES = ("start", "experts", "merges", "joint", "table")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="scenes")
    parser.add_argument("--out", default="runs-merging")
    parser.add_argument("--rules", nargs="+", default=None, help="default: every registered rule")
    parser.add_argument("--stage", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--start-epochs", type=int, default=2)
    parser.add_argument("--expert-epochs", type=int, default=2)
    parser.add_argument("--joint-epochs", type=int, default=2)
    parser.add_argument(
        "--timings", default="timings.json", help="file in --out for wall times (one per parallel invocation)"
    )
    parser.add_argument("--no-equal-compute", action="store_true", help="skip the joint model from the start")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[
            "data.image_size=32",
            "data.train_size=400",
            "data.val_size=100",
            "data.test_size=200",
            "train.progress=false",
        ],
        help="settings for every run (KEY=VALUE)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    common = dict(map(parse_override, args.set))  # values parsed as the CLI parses them (1000 is a number)
    timings = _load_json(out / args.timings)
    start, baseline = out / "shared-start", out / f"baseline-{args.data}"

    def train(name: str, epochs: int, **extra: Any) -> Path:
        if not (out / name / METRICS_NAME).is_file():
            began = time.perf_counter()
            mv.train(args.data, {**common, "train.epochs": epochs, **extra}, out=out, name=name)
            timings[name] = round(time.perf_counter() - began, 1)
            _save_json(out / args.timings, timings)
        return out / name

    if "start" in args.stage:
        train("shared-start", args.start_epochs)
    if "experts" in args.stage and not (baseline / "baselines.json").is_file():
        began = time.perf_counter()
        mv.baseline(
            args.data,
            {**common, "train.epochs": args.expert_epochs, "model.init": str(start)},
            out=out,
        )
        timings[baseline.name] = round(time.perf_counter() - began, 1)
        _save_json(out / args.timings, timings)
    if "merges" in args.stage:
        for spec in args.rules or MERGE_RULES.names():
            rule, _, settings = spec.partition(":")
            hparams = [item for item in settings.split(",") if item]
            folder = out / "-".join(["m", rule, *(item.split("=", 1)[1] for item in hparams)])
            if not (folder / METRICS_NAME).is_file():
                began = time.perf_counter()
                mv.merge([baseline], folder, rule=rule, hparams=hparams)
                timings[folder.name] = round(time.perf_counter() - began, 1)
                _save_json(out / args.timings, timings)
    merges = sorted(p for p in out.glob("m-*") if (p / METRICS_NAME).is_file())
    if "joint" in args.stage and merges:
        best = min(merges, key=lambda p: _delta(Run.load(p)))
        train(f"joint-from-{best.name[2:]}", args.joint_epochs, **{"model.init": str(best)})
        if not args.no_equal_compute:
            experts = len(json.loads((baseline / "baselines.json").read_text())["experts"])
            train("joint-from-start", experts * args.expert_epochs + args.joint_epochs, **{"model.init": str(start)})
    if "table" in args.stage:
        for other in sorted(out.glob("timings*.json")):
            timings = {**_load_json(other), **timings}
        runs = [*merges, *sorted(out.glob("joint-from-*")), start]
        comparison = mv.compare([r for r in runs if (r / METRICS_NAME).is_file()], baseline / "baselines.json")
        rows = []
        for run in merges:
            record = Run.load(run).report.merge
            hparams = ", ".join(f"{k}={v}" for k, v in record["hparams"].items()) or "—"
            rows.append(
                f"| {run.name} | {record['rule']} | {hparams} | {record['merge_seconds']:.2f} | "
                f"{timings.get(run.name, float('nan')):.0f} |"
            )
        text = "\n\n".join(
            [
                comparison.markdown(),
                "| run | rule | hyper-parameters | merge (s, the rule alone) | merge job (s: merge, BatchNorm, "
                "evaluation) |\n|---|---|---|---|---|\n" + "\n".join(rows),
                "Wall time of each training step (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
                f"Settings: {args.data}, {' '.join(args.set)}; shared start {args.start_epochs} epochs, experts "
                f"{args.expert_epochs} epochs each from it, joint fine-tune {args.joint_epochs} epochs.",
            ]
        )
        (out / "merging.md").write_text(text + "\n")
        print(text)


def _delta(run: Run) -> float:
    value = run.report.delta_m if run.report is not None else None
    return float("inf") if value is None else float(value["overall"])


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
