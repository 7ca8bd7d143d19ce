"""The path from experts to one model, measured (``mtlvision compare``): every run against the experts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from mtlvision.engine.build import build_split, build_tasks, load_model
from mtlvision.engine.device import resolve_device
from mtlvision.engine.runs import BASELINES_NAME, Baselines, Run, directions
from mtlvision.errors import MtlvisionError
from mtlvision.evaluation.compare import CompareEntry, Comparison, time_inference
from mtlvision.models import MultiTaskModel
from mtlvision.models.modulated import TaskModulatedModel


def stored_size(model: MultiTaskModel) -> int:
    """The values a model keeps: its parameters; for a task-modulated model (EMR) also its unified vector,
    per-task statistics, rescalers and bit-masks, in 32-bit values (one bit per entry and task)."""
    if isinstance(model, TaskModulatedModel):
        return model.storage()["stored_values"]
    return sum(p.numel() for p in model.parameters())


def describe_run(run: Run, experts: Iterable[Path] = ()) -> str:
    """What a run is, read from its config and metrics: merged, distilled, started from another run, ..."""
    if run.report is not None and run.report.merge is not None:
        specific = run.report.merge.get("task_specific")
        if specific:
            count = len(specific["groups"])
            return f"merged ({run.report.merge['rule']}, task-specific backbones: {count} forwards), before training"
        return f"merged ({run.report.merge['rule']}), before training"
    resolved = {Path(p).resolve() for p in experts}
    if run.path.resolve() in resolved:
        return "single-task expert"
    parts = []
    init = Path(run.config.model.init)
    if init.is_dir():
        try:
            start = Run.load(init)
            merged = start.report.merge if start.report is not None else None
            parts.append(f"joint from merged ({merged['rule']})" if merged else f"joint from {init.name}")
        except MtlvisionError:
            parts.append(f"joint from {init.name}")
    elif len(run.config.tasks or []) != 1:
        parts.append("joint from scratch")
    else:
        parts.append("single-task from scratch")
    if run.config.distill.experts:
        parts.append("distilled from experts")
    if len(run.config.tasks or []) != 1:
        parts.append(f"{run.config.model.architecture_name} + {run.config.balancer.name}")
    return ", ".join(parts)


def compare_runs(
    runs: Sequence[str | Path],
    baselines: str | Path | None = None,
    *,
    batch_size: int = 8,
    repeats: int = 5,
    device: str = "cpu",
) -> Comparison:
    """Every run against the experts (see :func:`mtlvision.api.compare`); a baselines folder among ``runs``
    (``mtlvision compare runs/baseline-scenes runs/m-*``) names the experts instead of a run."""
    folders = [r for r in runs if (Path(r) / BASELINES_NAME).is_file()]
    if len(folders) > 1 or (folders and baselines):
        listed = ", ".join(str(f) for f in [*([baselines] if baselines else []), *folders])
        raise MtlvisionError(f"compare takes one set of experts; got several: {listed}")
    baselines = baselines or (folders[0] if folders else None)
    loaded = [Run.load(r) for r in runs if r not in folders]
    if not loaded:
        raise MtlvisionError("compare needs at least one run folder")
    first = loaded[0]
    if baselines:
        path = Baselines.locate(baselines)
    else:
        candidates = [Baselines.for_run(run.path, run.config) for run in loaded]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        raise MtlvisionError(
            f"no baselines at {path}: compare measures every run against the experts; pass --baselines"
        )
    stored = Baselines.load(path)
    expert_paths = stored.expert_runs()
    torch_device = resolve_device(device)
    split = first.report.split if first.report is not None else first.config.train.eval_split
    data = build_split(first.config, build_tasks(first.config), split, train=False)
    images = torch.stack([data[i]["image"] for i in range(min(batch_size, len(data)))])
    task_directions: dict[str, dict[str, bool]] = {}
    entries: list[CompareEntry] = []
    for run in loaded:
        report = run.evaluated
        if report.split != split:
            raise MtlvisionError(f"{run.path} was evaluated on {report.split}, the others on {split}")
        model, _ = load_model(run)
        task_directions.update(directions(model.tasks.values()))
        entries.append(
            CompareEntry(
                label=run.path.name,
                kind=describe_run(run, expert_paths.values()),
                path=str(run.path),
                metrics=report.metrics,
                parameters=stored_size(model),
                inference_ms=time_inference([model], images, repeats, torch_device),
            )
        )
    task_names = list(task_directions)
    expert_metrics = stored.metrics(task_names, split)
    experts = [load_model(p)[0] for p in dict.fromkeys(expert_paths[t] for t in task_names)]
    reference = CompareEntry(
        label=f"{len(experts)} experts",
        kind="single-task experts",
        path=str(path),
        metrics=expert_metrics,
        parameters=sum(p.numel() for m in experts for p in m.parameters()),
        inference_ms=time_inference(experts, images, repeats, torch_device),
    )
    return Comparison(
        experts=reference,
        runs=entries,
        directions=task_directions,
        split=split,
        baselines=str(path),
        batch_size=batch_size,
        device=str(torch_device),
    )
