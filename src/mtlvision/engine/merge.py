"""Merging single-task experts into one multi-task model: heads carried over, the shared part combined.

The rules live in :mod:`mtlvision.engine.merging`, one module each: a rule takes the experts' shared
parameters stacked tensor by tensor (``{name: [T, *shape]}``) and their common start, and returns the merged
tensors; rules defined on the whole flattened task vector (TIES, DARE) and per layer (TSV-M, Iso-C, Model
Stock) share that contract.

:func:`merge_states` sorts the target model's tensors into three groups: those every expert holds
(the shared backbone: parameters combined by the rule, floating buffers averaged until
:func:`recompute_batch_norm` replaces the BatchNorm statistics, integer buffers taken from the first expert),
those one expert alone holds (its head and any task-specific part of the architecture: copied unchanged),
and those no expert holds (an error).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from mtlvision.engine.merging import (
    MERGE_RULES,
    LearnedRule,
    MergeRule,
    ModulatedRule,
    Objective,
    TaskArithmetic,
    TaskModulation,
    Ties,
    WeightAverage,
    make_rule,
)
from mtlvision.errors import ConfigError

__all__ = [
    "MERGE_RULES",
    "MergeReport",
    "MergeRule",
    "TaskArithmetic",
    "Ties",
    "WeightAverage",
    "has_batch_norm",
    "make_rule",
    "merge_states",
    "recompute_batch_norm",
]


@dataclass
class MergeReport:
    """Which tensors were combined by the rule, averaged, or copied from one expert (tensor -> task)."""

    merged: list[str] = field(default_factory=list)
    averaged_buffers: list[str] = field(default_factory=list)
    copied: dict[str, str] = field(default_factory=dict)
    #: a :class:`ModulatedRule`'s per-expert modulation of the start (the merged tensors are then the start)
    modulation: TaskModulation | None = None

    def summary(self) -> dict[str, object]:
        per_task: dict[str, int] = {}
        for task in self.copied.values():
            per_task[task] = per_task.get(task, 0) + 1
        return {
            "merged_tensors": len(self.merged),
            "averaged_buffers": len(self.averaged_buffers),
            "copied_tensors_per_task": per_task,
        }


def _shape_error(key: str, shapes: Mapping[str, tuple[int, ...]]) -> ConfigError:
    listed = ", ".join(f"{task}: {shape}" for task, shape in shapes.items())
    return ConfigError(
        f"the experts cannot be merged: tensor {key!r} has different shapes ({listed}). Merging needs experts "
        "that share one backbone architecture (same model.backbone and model.architecture)."
    )


def merge_states(
    target: nn.Module,
    experts: Mapping[str, Mapping[str, Tensor]],
    rule: MergeRule,
    base: Mapping[str, Tensor] | None = None,
    statistics: Callable[[Sequence[str]], Mapping[str, Tensor]] | None = None,
    objective: Objective | None = None,
) -> tuple[dict[str, Tensor], MergeReport]:
    """The state dict of ``target`` built from the experts' state dicts (keyed by their task name).

    ``statistics`` gathers, for the names of the shared parameters, the data statistics a rule such as
    Fisher merging or RegMean needs (``{name: [T, ...]}``, experts in the order of ``experts``). A rule that
    learns its coefficients (AdaMerging) minimises ``objective``, a loss of ``target`` given its shared
    tensors: ``target`` is loaded with the carried-over heads and buffers first. A :class:`ModulatedRule`
    (EMR) leaves the start in the shared tensors and returns each expert's modulation in the report.
    """
    own = target.state_dict()
    parameters = {name for name, _ in target.named_parameters()}
    report = MergeReport()
    state: dict[str, Tensor] = {}
    combined: list[str] = []
    for key, reference in own.items():
        holders = {task: expert[key] for task, expert in experts.items() if key in expert}
        shapes = {task: tuple(t.shape) for task, t in holders.items()}
        if any(shape != tuple(reference.shape) for shape in shapes.values()):
            raise _shape_error(key, {"merged model": tuple(reference.shape), **shapes})
        if len(holders) == len(experts) and len(experts) > 1:
            if key in parameters:
                combined.append(key)
            elif reference.is_floating_point():
                state[key] = torch.stack([t.float() for t in holders.values()]).mean(0).to(reference.dtype)
                report.averaged_buffers.append(key)
            else:
                state[key] = next(iter(holders.values())).clone()
        elif len(holders) == 1:
            task, tensor = next(iter(holders.items()))
            state[key] = tensor.clone()
            report.copied[key] = task
        elif not holders:
            raise ConfigError(
                f"no expert holds tensor {key!r} of the merged model: the experts' architecture lacks a part "
                "the merged model needs"
            )
        else:
            raise ConfigError(
                f"tensor {key!r} is held by the experts for {', '.join(holders)} but not by the others: it is "
                "neither shared by all nor specific to one task"
            )
    if combined or isinstance(rule, ModulatedRule):  # a modulated rule refuses one expert itself
        if rule.needs_base and base is None:
            raise ConfigError(f"merging rule {type(rule).__name__} needs the experts' common initialisation")
        if base is not None:
            missing = [k for k in combined if k not in base]
            if missing:
                raise ConfigError(f"the initial weights lack {len(missing)} shared tensors (e.g. {missing[0]})")
        if rule.statistics is not None and statistics is None:
            raise ConfigError(
                f"merging rule {type(rule).__name__} needs data statistics ({rule.statistics}) from each expert on "
                "a few training samples; none were given"
            )
        stacked = {k: torch.stack([experts[task][k].float() for task in experts]) for k in combined}
        start = {k: base[k].float() for k in combined} if base is not None else None
        gathered = statistics(combined) if rule.statistics is not None and statistics is not None else None
        if isinstance(rule, ModulatedRule):
            assert start is not None  # needs_base
            report.modulation = rule.decompose(stacked, start, list(experts))
            merged = start
        elif isinstance(rule, LearnedRule):
            if objective is None or start is None:
                raise ConfigError(
                    f"merging rule {type(rule).__name__} learns its coefficients: it needs the experts' common "
                    "start and an objective on unlabelled data"
                )
            target.load_state_dict(state, strict=False)
            merged = rule.learn(stacked, start, objective)
        else:
            merged = rule.merge(stacked, start, gathered)
        for key in combined:
            state[key] = merged[key].reshape(own[key].shape).to(own[key].dtype)
        report.merged = combined
    return state, report


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, images: Iterable[Tensor], device: torch.device | None = None) -> None:
    """Replace every BatchNorm's running statistics by the exact mean and variance over ``images``.

    Merged weights make the experts' running statistics wrong (the activations they describe changed);
    ``torch.optim.swa_utils.update_bn`` resets them and accumulates a cumulative average over one pass in
    training mode, as done after weight averaging in SWA (Izmailov et al., UAI 2018). It takes an iterable
    of input tensors, so we hand it the images of our dict batches.
    """
    update_bn(images, model, device=device)
