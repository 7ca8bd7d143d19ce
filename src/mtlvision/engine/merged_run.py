"""Experts into one run folder (``mtlvision merge``): sources checked, shared part merged, heads carried over,
BatchNorm statistics recomputed, the result evaluated like a trained run. A rule with task-specific weights
(EMR-merging) gives a :class:`TaskModulatedModel`, its BatchNorm statistics recomputed for each task's
backbone on its own."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from mtlvision.config import RunConfig, parse_override
from mtlvision.engine.build import build_model, build_tasks, load_model
from mtlvision.engine.checkpoint import read_weights, save_weights
from mtlvision.engine.device import resolve_device
from mtlvision.engine.job import evaluate_splits, evaluation_loader, input_size
from mtlvision.engine.merge import MergeReport, has_batch_norm, make_rule, merge_states, recompute_batch_norm
from mtlvision.engine.merge_data import MergeData, merge_data
from mtlvision.engine.merging.adamerging import AdaMerging
from mtlvision.engine.merging.base import DataRule, LearnedRule
from mtlvision.engine.merging.entropy import PREDICTION_ENTROPY
from mtlvision.engine.merging.statistics import collect_statistics
from mtlvision.engine.merging.test_time import EntropyObjective, stack_images
from mtlvision.engine.merging.wemoe import WEMoE, save_layout
from mtlvision.engine.runs import (
    BASELINES_NAME,
    INIT_WEIGHTS_NAME,
    WEIGHTS_NAME,
    Baselines,
    Run,
    RunReport,
    delta_m_against,
    write_config,
)
from mtlvision.errors import MtlvisionError
from mtlvision.models import MultiTaskModel
from mtlvision.models.complexity import model_complexity
from mtlvision.models.modulated import ModulationLayout, TaskModulatedModel


def merge_sources(sources: Sequence[str | Path]) -> list[Run]:
    """Run folders from the arguments: expert run folders, or a baselines folder/file standing for its experts."""
    runs: list[Run] = []
    for source in map(Path, sources):
        if (source / BASELINES_NAME).is_file() or source.name == BASELINES_NAME:
            runs.extend(Run.load(p) for p in Baselines.load(source).expert_runs().values())
        else:
            runs.append(Run.load(source))
    if not runs:
        raise MtlvisionError("merge needs at least one expert run")
    return runs


def check_mergeable(runs: Sequence[Run]) -> None:
    """Experts can be merged when they share backbone, architecture and data, and predict distinct tasks."""
    first = runs[0]
    for run in runs[1:]:
        for key in ("backbone", "architecture"):
            mine, theirs = getattr(first.config.model, key), getattr(run.config.model, key)
            if mine != theirs:
                raise MtlvisionError(
                    f"cannot merge: model.{key} differs ({mine!r} in {first.path}, {theirs!r} in {run.path}); "
                    "merging needs experts that share one backbone architecture"
                )
        if run.config.data.dataset_params != first.config.data.dataset_params:
            raise MtlvisionError(
                f"cannot merge: {run.path} was trained on other data than {first.path} "
                f"({run.config.data.dataset_params} vs {first.config.data.dataset_params})"
            )
    names = [e.name for run in runs for e in run.config.tasks or []]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise MtlvisionError(f"cannot merge: several experts predict task(s) {', '.join(repeated)}")


def default_out(experts: Sequence[str | Path], rule: str) -> Path:
    """``m-RULE`` beside the first source (``runs/baseline-scenes`` or its ``baselines.json`` -> ``runs/m-RULE``)."""
    first = Path(experts[0])
    folder = first.parent if first.name == BASELINES_NAME else first
    return folder.parent / f"m-{rule}"


def common_init(runs: Sequence[Run], rule: str) -> dict[str, torch.Tensor]:
    """The experts' common start (their ``init.safetensors``), checked to be one and the same.

    Rules on task vectors θ_t − θ_0 need it; experts from different starts are refused, with how to make
    experts that share one (``baseline`` trains them from one seed, or from ``model.init``).
    """
    how = (
        "train the experts from one start with `mtlvision baseline DATA` (one seed), or from given weights with "
        "`mtlvision baseline DATA --set model.init=RUN_OR_FILE.safetensors`; or use --rule average"
    )
    states = []
    for run in runs:
        path = run.path / INIT_WEIGHTS_NAME
        if not path.is_file():
            raise MtlvisionError(
                f"{run.path} holds no {INIT_WEIGHTS_NAME}: merging rule {rule!r} works on task vectors and needs "
                f"the experts' common start, which `mtlvision baseline` records; {how}"
            )
        states.append(read_weights(path))
    common = set.intersection(*(set(s) for s in states))
    for key in sorted(common):
        for run, state in zip(runs[1:], states[1:]):
            if not torch.equal(states[0][key], state[key]):
                raise MtlvisionError(
                    f"the experts did not start from one initialisation: tensor {key!r} of {INIT_WEIGHTS_NAME} "
                    f"differs between {runs[0].path} and {run.path}. Merging rule {rule!r} needs task vectors "
                    f"against one base: {how}"
                )
    return {k: states[0][k] for k in common}


def base_fingerprint(base: Mapping[str, torch.Tensor]) -> str:
    """A SHA-256 of the common start's shared tensors (names and bytes, in name order), recorded in the report."""
    digest = hashlib.sha256()
    for key in sorted(base):
        digest.update(key.encode())
        digest.update(base[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe_base(runs: Sequence[Run], base: Mapping[str, torch.Tensor] | None) -> dict[str, Any]:
    """What the experts started from: their ``model.init`` settings and, when known, the common start's hash."""
    starts = sorted({str(run.config.model.init) for run in runs})
    record: dict[str, Any] = {"model_init": starts[0] if len(starts) == 1 else starts}
    if base is not None:
        record["sha256"] = base_fingerprint(base)
    return record


def expert_statistics(
    runs: Sequence[Run], rule: DataRule, data: MergeData
) -> Callable[[Sequence[str]], dict[str, torch.Tensor]]:
    """What gathers the rule's data statistics from each expert on the first ``samples`` of ``data``'s split
    (read as evaluation reads it: no augmentation, in order; labels only for a rule that needs them)."""
    kind, samples = str(rule.statistics), rule.samples

    def gather(names: Sequence[str]) -> dict[str, torch.Tensor]:
        experts = {}
        for run in runs:
            expert, config = load_model(run)
            experts[str(run.path)] = (expert, data.loader(config, expert))
        return collect_statistics(kind, experts, names, samples, resolve_device(runs[0].config.train.device))

    return gather


def test_time_objective(
    runs: Sequence[Run], rule: AdaMerging | WEMoE, model: MultiTaskModel, data: MergeData
) -> EntropyObjective:
    """AdaMerging's (and WEMoE's) objective for ``model``: the images of ``data``'s split (``rule.split``;
    unlabelled: only the images are read) and, with ``regression=expert``, the experts of the tasks that
    define no entropy."""
    config = runs[0].config
    images = stack_images(
        (batch["image"] for batch in data.loader(config, model)), f"the {rule.split} split of {data.source}"
    )
    experts: dict[str, MultiTaskModel] = {}
    if rule.regression == "expert":
        for run in runs:
            names = [e.name for e in run.config.tasks or [] if model.tasks[e.name].kind not in PREDICTION_ENTROPY]
            if names:
                expert = load_model(run)[0]
                experts.update(dict.fromkeys(names, expert))
    return EntropyObjective(
        model,
        images,
        batch_size=rule.batch_size,
        batches=rule.batches,
        seed=rule.seed,
        regression=rule.regression,
        experts=experts,
        device=resolve_device(config.train.device),
    )


def task_modulated(
    config: RunConfig, model: MultiTaskModel, rule: str, groups: Sequence[Sequence[str]], report: MergeReport
) -> TaskModulatedModel:
    """The :class:`TaskModulatedModel` of a modulated merge: ``model`` holds the start and the heads, ``report``
    each group's modulation; with BatchNorm, each group's statistics are recomputed on the train split with
    that group's backbone on its own (``model`` is left with the last group's weights)."""
    modulation = report.modulation
    assert modulation is not None
    statistics = tuple(report.averaged_buffers) if has_batch_norm(model) else ()
    layout = ModulationLayout(
        rule=rule, groups=tuple(tuple(g) for g in groups), modulated=tuple(modulation.unified), statistics=statistics
    )
    modulated = cast(
        TaskModulatedModel, build_model(config, list(model.tasks.values()), load_init=False, layout=layout)
    )
    missing, unexpected = modulated.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("modulation.") for k in missing)
    per_group: list[dict[str, torch.Tensor]] = []
    if statistics:
        device = resolve_device(config.train.device)
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        loader, _ = evaluation_loader(config, model, "train")
        for g in range(len(groups)):
            model.load_state_dict({**base, **modulation.task_weights(base, g)})
            recompute_batch_norm(model.to(device), (batch["image"] for batch in loader), device)
            per_group.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in statistics})
    modulated.set_modulation(modulation.unified, modulation.masks, modulation.rescalers, per_group)
    return modulated.eval()


def merge_experts(
    experts: Sequence[str | Path],
    out: str | Path | None,
    rule: str = "average",
    hparams: Mapping[str, Any] | Sequence[str] | None = None,
    data: RunConfig | None = None,
    data_source: str | None = None,
) -> Run:
    """One multi-task run folder from experts (see :func:`mtlvision.api.merge`); ``data`` (named
    ``data_source``) replaces the experts' data where the rule reads samples (:mod:`~mtlvision.engine.merge_data`)."""
    settings = dict(hparams) if isinstance(hparams, Mapping) else dict(parse_override(h) for h in hparams or [])
    merging = make_rule(rule, settings)
    runs = merge_sources(experts)
    check_mergeable(runs)
    run_dir = Path(out) if out is not None else default_out(experts, rule)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise MtlvisionError(f"--out {run_dir} already exists and is not empty; choose another folder")
    first = runs[0].config
    config = first.model_copy(
        update={
            "tasks": [entry for run in runs for entry in run.config.tasks or []],
            "model": first.model.model_copy(update={"init": "kaiming"}),
            "distill": first.distill.model_copy(update={"experts": None}),
        }
    )
    reads = merge_data(merging, rule, config, data, data_source)
    tasks = build_tasks(config)
    model = build_model(config, tasks, load_init=False)
    own = model.state_dict()
    states = {
        "+".join(e.name for e in run.config.tasks or []): read_weights(run.path / WEIGHTS_NAME, like=own)
        for run in runs
    }
    base = common_init(runs, rule) if merging.needs_base else None
    started = time.perf_counter()
    gather = expert_statistics(runs, merging, reads) if isinstance(merging, DataRule) and reads else None
    objective = test_time_objective(runs, merging, model, reads) if isinstance(merging, AdaMerging) and reads else None
    if isinstance(merging, WEMoE):
        assert base is not None and reads is not None  # WEMoE needs the base (common_init) and test images
        state, merge_report = merge_states(model, states, merging.arithmetic(), base)
        model.load_state_dict(state)
        merging.upscale(model, states, base, merge_report.merged)
        merging.learn_routers(model, test_time_objective(runs, merging, model, reads))
    else:
        state, merge_report = merge_states(model, states, merging, base, gather, objective)
        model.load_state_dict(state)
    merge_seconds = time.perf_counter() - started
    if merge_report.modulation is not None:
        model = task_modulated(
            config, model, rule, [[e.name for e in r.config.tasks or []] for r in runs], merge_report
        )
    elif has_batch_norm(model):
        device = resolve_device(config.train.device)
        model.to(device)
        loader, _ = evaluation_loader(config, model, "train")
        recompute_batch_norm(model, (batch["image"] for batch in loader), device)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, config)
    save_weights(model, run_dir / WEIGHTS_NAME)
    if isinstance(merging, WEMoE):
        save_layout(run_dir, merging.layout(len(states)))
    split = config.train.eval_split
    metrics = evaluate_splits(config, model, ["val", split])
    report = RunReport(
        split=split,
        metrics=metrics[split],
        val_metrics=metrics["val"],
        model=model_complexity(model.cpu(), image_size=input_size(config, evaluation_loader(config, model, split)[1])),
        merge={
            "rule": rule,
            "hparams": merging.describe(),
            "experts": {name: str(run.path) for name, run in zip(states, runs)},
            "base": describe_base(runs, base),
            "merge_seconds": round(merge_seconds, 3),
            **({"data": reads.record()} if reads is not None else {}),
            "batch_norm": batch_norm_record(model),
            **merge_report.summary(),
            **({"task_specific": task_specific_record(model, merge_report)} if merge_report.modulation else {}),
            **({"learned": merging.learned} if isinstance(merging, LearnedRule | WEMoE) else {}),
        },
        **delta_m_against(Baselines.for_run(run_dir, config), config, tasks, metrics[split], split),
    )
    report.save(run_dir)
    return Run(path=run_dir, config=config, report=report)


def batch_norm_record(model: MultiTaskModel) -> str:
    """How the merged model's BatchNorm statistics were made, for the report."""
    if not has_batch_norm(model):
        return "none in the model"
    if isinstance(model, TaskModulatedModel):
        return "recomputed on the train split for each task's backbone on its own"
    return "recomputed on the train split"


def task_specific_record(model: MultiTaskModel, report: MergeReport) -> dict[str, Any]:
    """What a modulated merge stores and runs: groups, rescalers, the fraction of entries each mask keeps, sizes."""
    assert isinstance(model, TaskModulatedModel) and report.modulation is not None
    masks = report.modulation.masks.values()
    total = sum(m[0].numel() for m in masks)
    kept = [sum(int(m[g].sum()) for m in masks) / total for g in range(len(model.layout.groups))]
    return {
        "groups": [list(g) for g in model.layout.groups],
        "rescalers": [round(float(v), 6) for v in report.modulation.rescalers],
        "mask_density": [round(v, 6) for v in kept],
        "storage": model.storage(),
    }
