"""TAG's affinity on the scenes tasks, checked against ground truth: every pair of tasks trained.

1. the six single-task experts (``mtlvision baseline``);
2. one joint run of all six with the affinity measured every ``--every`` steps, the best split into
   ``--groups`` networks, each group and all-together trained and compared (``mtlvision affinity --validate``);
3. each of the 15 pairs trained; the measured gain of task j from task i is minus j's Δm term in the pair
   run (its relative improvement over its expert, %); Spearman's rank correlation (scipy) between TAG's
   ``Z[i→j]`` and those gains (30 directed values), and between the symmetric ``(Z[i→j] + Z[j→i]) / 2`` and
   minus the pair's Δm (15 values).

Every Δm here is computed from the runs' metrics.json over the metrics whose expert value is not exactly 0
(at these settings the colors expert's exact-match accuracy is 0; the left-out metrics are listed in
summary.json). Every run uses the same small settings (``SETTINGS``) and seed. Finished runs are reused when
the script is run again with the same ``--out``. Writes ``summary.json`` into ``--out``.

    python benchmarks/affinity_scenes.py --out runs/affinity-scenes-check      # 25 small runs, ~25 min on 2 CPUs
"""

from __future__ import annotations

import argparse
import json
from itertools import combinations, permutations
from pathlib import Path

import torch
from scipy.stats import spearmanr

import mtlvision as mv
from mtlvision.evaluation.delta_m import delta_m

SETTINGS = [
    "data.image_size=32",
    "data.train_size=128",
    "data.val_size=32",
    "data.test_size=64",
    "train.epochs=2",
    "train.batch_size=16",
    "train.progress=false",
]


def pair_run(out: Path, a: str, b: str) -> mv.Run:
    folder = out / "pairs" / f"{a}+{b}"
    if (folder / "metrics.json").is_file():
        return mv.Run.load(folder)
    overrides = [*SETTINGS, f"tasks=[{a},{b}]", f"baselines={out / 'baseline-scenes' / 'baselines.json'}"]
    return mv.train("scenes", overrides, out=out / "pairs", name=f"{a}+{b}")


def delta(metrics: dict, experts: dict, directions: dict) -> tuple[float, dict[str, float]]:
    """Δm (overall, per task) over the metrics whose expert value is not exactly 0 (a relative change from 0
    is undefined; the left-out metrics are listed in summary.json)."""
    kept = {t: {m: h for m, h in directions[t].items() if experts[t][m] != 0} for t in metrics}
    result = delta_m({t: metrics[t] for t in kept}, experts, kept)
    return result.overall, result.per_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/affinity-scenes-check")
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--skip-pairs", action="store_true", help="only the experts and the affinity run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    experts_file = mv.baseline("scenes", SETTINGS, out=out)
    folder = out / "affinity-scenes"
    if not (folder / "grouping.json").is_file():
        mv.affinity("scenes", SETTINGS, every=args.every, groups=args.groups, validate=True, out=out)
    grouping = json.loads((folder / "grouping.json").read_text())
    rows = (folder / "affinity.csv").read_text().splitlines()
    tasks = rows[0].split(",")[1:]
    matrix = [[float(v) for v in row.split(",")[1:]] for row in rows[1:]]
    split = "test"
    baselines = json.loads(Path(experts_file).read_text())["experts"]
    expert_metrics = {t: baselines[t]["metrics"][split] for t in tasks}
    directions = {t.name: dict(t.metric_directions) for t in mv.build_tasks("scenes", SETTINGS)}
    zero = sorted(f"{t}.{m}" for t in tasks for m, v in expert_metrics[t].items() if v == 0 and m in directions[t])
    validation = {}
    runs = {}
    for group in [*grouping["groups"], tasks]:
        run = mv.Run.load(folder / "validate" / "+".join(group))
        runs[tuple(group)] = run
        overall, per_task = delta(run.evaluated.metrics, expert_metrics, directions)
        validation["+".join(group)] = {"delta_m": overall, "per_task": per_task}
    served = {t: runs[tuple(grouping["served_by"][t])].evaluated.metrics[t] for t in tasks}
    overall, per_task = delta(served, expert_metrics, directions)
    validation["grouping"] = {"delta_m": overall, "per_task": per_task}
    summary: dict = {
        "settings": SETTINGS,
        "every": grouping["every"],
        "steps": grouping["steps"],
        "tasks": tasks,
        "affinity": matrix,
        "grouping": grouping,
        "metrics_left_out_of_delta_m": zero,
        "validation": validation,
    }
    if not args.skip_pairs:
        index = {t: i for i, t in enumerate(tasks)}
        gains, directed, pair_delta, symmetric = {}, [], [], []
        for a, b in combinations(tasks, 2):
            run = pair_run(out, a, b)
            overall, per_task = delta(run.evaluated.metrics, expert_metrics, directions)
            gains[f"{a}+{b}"] = {"delta_m": overall, "per_task": per_task}
            pair_delta.append(-overall)
            symmetric.append((matrix[index[a]][index[b]] + matrix[index[b]][index[a]]) / 2)
        for i, j in permutations(tasks, 2):
            key = f"{i}+{j}" if f"{i}+{j}" in gains else f"{j}+{i}"
            directed.append((matrix[index[i]][index[j]], -gains[key]["per_task"][j]))
        rho_directed = spearmanr([z for z, _ in directed], [g for _, g in directed])
        rho_symmetric = spearmanr(symmetric, pair_delta)
        summary["pairs"] = gains
        summary["spearman"] = {
            "directed": {"rho": float(rho_directed.statistic), "p": float(rho_directed.pvalue), "n": len(directed)},
            "symmetric": {"rho": float(rho_symmetric.statistic), "p": float(rho_symmetric.pvalue), "n": len(symmetric)},
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        json.dumps(
            {k: summary[k] for k in ("metrics_left_out_of_delta_m", "validation", "spearman") if k in summary}, indent=2
        )
    )


if __name__ == "__main__":
    main()
