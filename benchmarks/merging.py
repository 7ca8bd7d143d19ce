"""Every merging rule on experts fine-tuned from one shared start, then joint fine-tunes at equal compute.

Stages, all run by one invocation (each skipped when its run folder is already finished, so the script can
be re-run to add rules or finish an interrupted run):

1. ``start``: ``shared-start``, a joint model trained for ``--start-epochs`` (the common base θ_0 of every task
   vector);
2. ``experts``: ``baseline-<data>``, one expert per task fine-tuned from it for ``--expert-epochs``;
3. ``merges``: ``m-<rule>`` for every merging rule (default: every registered one), timed; a rule that fails
   is recorded with its error (``failures.json``) and the others go on;
4. ``joint``: ``joint-from-<best>``, a joint fine-tune of ``--joint-epochs`` from the merge with the lowest Δm,
   and ``joint-from-start``, the equal-compute control: the shared start trained jointly for the experts'
   epochs (T × ``--expert-epochs``) plus ``--joint-epochs``, so both spend the same epochs over the training
   split in all;
5. ``table``: ``merging.md`` and ``merging.json`` in ``--out``: per rule its hyper-parameters, Δm before any
   training, Δm per task, parameters and latency (from ``mtlvision compare``: the merged model against the T
   experts run one after another on one batch) and merge time; then the joint models with their compute.

    python benchmarks/merging.py --out runs-merging                                 # scenes, small CPU settings
    python benchmarks/merging.py --out runs-merging --device cuda --set data.image_size=64 data.train_size=1500
    python benchmarks/merging.py --out runs-merging --stage merges table --rules iso_c adamerging:steps=100

A rule may carry its hyper-parameters after a colon (``NAME:KEY=VALUE,KEY=VALUE``); its folder is then
``m-NAME-VALUE-...``. By default ``adamerging`` runs with ``regression=expert`` (the scenes' depth and normals
define no entropy; the setting changes nothing on data without regression tasks).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mtlvision as mv
from mtlvision.config import load_config, parse_override
from mtlvision.engine.build import is_plain_start
from mtlvision.engine.merging import MERGE_RULES
from mtlvision.engine.runs import BASELINES_NAME, METRICS_NAME, Run
from mtlvision.errors import MtlvisionError
from mtlvision.evaluation.compare import CompareEntry, Comparison

STAGES = ("start", "experts", "merges", "joint", "table")
SMALL = ("data.image_size=32", "data.train_size=400", "data.val_size=100", "data.test_size=200")
#: the benchmark's settings of a rule named without any
RULE_DEFAULTS = {"adamerging": "regression=expert"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="scenes", help="preset or YAML file of every run (default: scenes)")
    parser.add_argument("--out", default="runs-merging")
    parser.add_argument("--rules", nargs="+", default=None, help="default: every registered rule")
    parser.add_argument("--stage", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--device", default="cpu", help="train.device of every run and the latency's device")
    parser.add_argument("--start-epochs", type=int, default=2)
    parser.add_argument("--expert-epochs", type=int, default=2)
    parser.add_argument("--joint-epochs", type=int, default=2)
    parser.add_argument("--no-equal-compute", action="store_true", help="skip the joint model from the start")
    parser.add_argument("--batch-size", type=int, default=8, help="images per timed batch (latency)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes; the median is reported")
    parser.add_argument("--timings", default="timings.json", help="file in --out for wall times")
    parser.add_argument(
        "--set", nargs="*", default=list(SMALL), help=f"settings of every run, KEY=VALUE (default: {' '.join(SMALL)})"
    )
    return parser.parse_args(argv)


class Bench:
    """The benchmark's run folders under ``out`` and the wall time of each step (``timings.json``)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        # values parsed as the CLI parses them (1000 is a number); the device goes to every run
        self.common = {**dict(map(parse_override, args.set)), "train.device": args.device, "train.progress": False}
        self.timings_path = self.out / args.timings
        self.timings: dict[str, dict[str, float]] = _load_json(self.timings_path)
        self.failures_path = self.out / "failures.json"
        self.failures: dict[str, str] = _load_json(self.failures_path)
        self.start = self.out / "shared-start"
        # where `baseline` puts the experts, and where merged and joint runs look for them (their Δm)
        self.baseline = self.out / f"baseline-{load_config(args.data, self.common).data.name}"

    def timed(self, name: str, step: Callable[[], object]) -> None:
        """Run ``step`` and record its wall and CPU (this process, all threads) seconds under ``name``."""
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        self.timings[name] = {
            "wall_s": round(time.perf_counter() - wall, 1),
            "cpu_s": round(time.process_time() - cpu, 1),
        }
        _save_json(self.timings_path, self.timings)

    def train(self, name: str, epochs: int, **extra: Any) -> Path:
        if not (self.out / name / METRICS_NAME).is_file():
            settings = {**self.common, "train.epochs": epochs, **extra}
            self.timed(name, lambda: mv.train(self.args.data, settings, out=self.out, name=name))
        return self.out / name

    def experts(self) -> None:
        if (self.baseline / BASELINES_NAME).is_file():
            return
        settings = {**self.common, "train.epochs": self.args.expert_epochs, "model.init": str(self.start)}
        self.timed(self.baseline.name, lambda: mv.baseline(self.args.data, settings, out=self.out))

    def merge(self, spec: str) -> None:
        """One rule (``NAME`` or ``NAME:KEY=VALUE,...``); its error, if any, recorded and not raised."""
        rule, _, settings = spec.partition(":")
        hparams = [item for item in (settings or RULE_DEFAULTS.get(rule, "")).split(",") if item]
        folder = self.out / "-".join(["m", rule, *(item.split("=", 1)[1] for item in hparams)])
        if (folder / METRICS_NAME).is_file():
            return
        if folder.exists():  # left by a failed or interrupted try
            shutil.rmtree(folder)
        try:
            self.timed(folder.name, lambda: mv.merge([self.baseline], folder, rule=rule, hparams=hparams))
        except Exception as error:  # a failing rule is a result of the benchmark: recorded, the others go on
            self.failures[folder.name] = f"{rule} {' '.join(hparams)}: {type(error).__name__}: {error}"
            print(f"{folder.name} failed:\n{traceback.format_exc()}", flush=True)
        else:
            self.failures.pop(folder.name, None)
        _save_json(self.failures_path, self.failures)

    def merges(self) -> list[Path]:
        return sorted(p for p in self.out.glob("m-*") if (p / METRICS_NAME).is_file())

    def expert_count(self) -> int:
        return len(json.loads((self.baseline / BASELINES_NAME).read_text())["experts"])

    def joint(self) -> None:
        # the fine-tune starts from the best merge that is one set of weights (EMR's task-specific backbones and
        # WEMoE's routed blocks cannot be a model.init)
        startable = [p for p in self.merges() if is_plain_start(p)]
        ranked = sorted((d, p) for p in startable if (d := _delta(Run.load(p))) is not None)
        if ranked:
            best = ranked[0][1]
            self.train(f"joint-from-{best.name[2:]}", self.args.joint_epochs, **{"model.init": str(best)})
        else:
            print(
                "no merge of one set of weights has a Δm (see failures.json, each merge's metrics.json): no fine-tune"
            )
        if not self.args.no_equal_compute:
            epochs = self.expert_count() * self.args.expert_epochs + self.args.joint_epochs
            self.train("joint-from-start", epochs, **{"model.init": str(self.start)})

    def epochs(self, run: Path) -> int:
        """Training epochs behind ``run`` in all (over the training split): the shared start, the experts'
        fine-tunes behind a merge, and the run's own."""
        start = self.args.start_epochs
        experts = self.expert_count() * self.args.expert_epochs
        if run == self.start:
            return start
        if run.name.startswith("m-"):
            return start + experts
        own = int(Run.load(run).config.train.epochs)
        return start + own + (experts if run.name != "joint-from-start" else 0)

    def table(self) -> dict[str, Any]:
        timings = dict(self.timings)
        for other in sorted(self.out.glob("timings*.json")):
            timings = {**_load_json(other), **timings}
        merges = self.merges()
        joints = sorted(p for p in self.out.glob("joint-from-*") if (p / METRICS_NAME).is_file())
        runs = [*merges, *joints, *([self.start] if (self.start / METRICS_NAME).is_file() else [])]
        comparison = mv.compare(
            runs, self.baseline / BASELINES_NAME, batch_size=self.args.batch_size, repeats=self.args.repeats,
            device=self.args.device,
        )  # fmt: skip
        entries = {Path(e.path).name: e for e in comparison.runs}
        result = {
            "settings": {
                "data": self.args.data,
                "set": self.args.set,
                "device": self.args.device,
                "start_epochs": self.args.start_epochs,
                "expert_epochs": self.args.expert_epochs,
                "joint_epochs": self.args.joint_epochs,
            },
            "experts": _model(
                comparison, comparison.experts, self.args.start_epochs + self.expert_count() * self.args.expert_epochs
            ),
            "merges": [],
            "joint": [],
            "timings": timings,
        }
        for run in merges:
            record = Run.load(run).evaluated.merge or {}
            row = _model(comparison, entries[run.name], self.epochs(run))
            row.update(
                rule=record.get("rule"),
                hparams=record.get("hparams"),
                merge_seconds=record.get("merge_seconds"),
                job_seconds=timings.get(run.name, {}).get("wall_s"),
                data=record.get("data"),
            )
            result["merges"].append(row)
        for name, error in sorted(self.failures.items()):
            result["merges"].append({"run": name, "rule": name[2:], "error": error})
        for run in [*joints, *([self.start] if self.start in runs else [])]:
            result["joint"].append(
                {
                    **_model(comparison, entries[run.name], self.epochs(run)),
                    "init": str(Run.load(run).config.model.init),
                }
            )
        (self.out / "merging.json").write_text(json.dumps(result, indent=1))
        text = render(result, comparison)
        (self.out / "merging.md").write_text(text)
        print(text)
        return result


def _model(comparison: Comparison, entry: CompareEntry, epochs: int) -> dict[str, Any]:
    """One model's row: Δm (or why there is none), parameters and latency against the experts, epochs."""
    row: dict[str, Any] = {
        "run": entry.label,  # the run folder's name; "T experts" for the experts
        "kind": entry.kind,
        "parameters": entry.parameters,
        "inference_ms": round(entry.inference_ms, 2),
        "latency_vs_experts": round(entry.inference_ms / comparison.experts.inference_ms, 3),
        "epochs": epochs,
    }
    try:
        delta = comparison.delta(entry)
    except MtlvisionError as error:  # e.g. an expert's metric is 0: Δm is undefined, said so in the table
        row["delta_m_error"] = str(error)
    else:
        row["delta_m"] = round(delta.overall, 2)
        row["delta_m_per_task"] = {t: round(v, 2) for t, v in delta.per_task.items()}
    return row


def _cells(row: dict[str, Any]) -> list[str]:
    if "delta_m" not in row:
        return [f"n/a ({row['delta_m_error']})", "—"]
    per_task = ", ".join(f"{t} {v:+.1f}" for t, v in row["delta_m_per_task"].items())
    return [f"{row['delta_m']:+.2f}", per_task]


def _size(row: dict[str, Any]) -> list[str]:
    return [f"{row['parameters'] / 1e6:.2f}M", f"{row['inference_ms']:.1f} ({row['latency_vs_experts']:.2f}×)"]


def render(result: dict[str, Any], comparison: Comparison) -> str:
    """The Markdown of ``merging.md``: the merges, the joint models, the experts, the settings."""
    merges = sorted(result["merges"], key=lambda r: (r.get("delta_m") is None, r.get("delta_m") or 0.0))
    lines = [
        "| run | hyper-parameters | Δm % (before training) | Δm per task % | params | ms/batch (vs experts) | "
        "merge (s) | job (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in merges:
        if "error" in row:
            lines.append(f"| {row['run']} | — | failed: {row['error']} | — | — | — | — | — |")
            continue
        hparams = ", ".join(f"{k}={v}" for k, v in (row["hparams"] or {}).items()) or "—"
        job = row["job_seconds"]
        lines.append(
            "| "
            + " | ".join(
                [row["run"], hparams, *_cells(row), *_size(row), f"{row['merge_seconds']:.1f}"]
                + ["—" if job is None else f"{job:.0f}"]
            )
            + " |"
        )
    joint = [
        "| model | what it is | epochs in all | Δm % | Δm per task % | params | ms/batch (vs experts) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in [result["experts"], *result["joint"]]:
        joint.append("| " + " | ".join([row["run"], row["kind"], str(row["epochs"]), *_cells(row), *_size(row)]) + " |")
    settings = result["settings"]
    timings = ", ".join(f"{k} {v['wall_s']:.0f} ({v['cpu_s']:.0f} CPU)" for k, v in result["timings"].items())
    return (
        "\n\n".join(
            [
                f"Δm against the experts of `{comparison.baselines}` on the {comparison.split} split (lower is "
                f"better); latency: a batch of {comparison.batch_size} images on {comparison.device}, median; "
                "merge: the rule alone (statistics and learning included); job: merge, BatchNorm recomputation "
                "and evaluation.",
                "\n".join(lines),
                "Joint models, with the training epochs behind each in all (shared start, experts, fine-tune):",
                "\n".join(joint),
                f"Wall time of each step in seconds (CPU seconds of the process): {timings}.",
                f"Settings: {settings['data']} on {settings['device']}, {' '.join(settings['set'])}; shared start "
                f"{settings['start_epochs']} epochs, experts {settings['expert_epochs']} epochs each from it, joint "
                f"fine-tune {settings['joint_epochs']} epochs.",
            ]
        )
        + "\n"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    bench = Bench(args)
    if "start" in args.stage:
        bench.train("shared-start", args.start_epochs)
    if "experts" in args.stage:
        bench.experts()
    if "merges" in args.stage:
        for spec in args.rules or MERGE_RULES.names():
            bench.merge(spec)
    if "joint" in args.stage:
        bench.joint()
    return bench.table() if "table" in args.stage else None


def _delta(run: Run) -> float | None:
    value = run.report.delta_m if run.report is not None else None
    return None if value is None else float(value["overall"])


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
