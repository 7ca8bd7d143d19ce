"""Merging single-task experts into one multi-task model: heads carried over, the shared part combined.

A merging rule has a one-line contract: the experts' shared parameters flattened into one row each,
``experts [T, P]``, and the common initialisation ``base [P]`` (or None when the rule needs none) in; the
merged vector ``[P]`` out. Every rule sees the whole flattened vector at once, as the papers define them
(TIES trims the top-k% of each task vector over all its parameters, not layer by layer).

:func:`merge_states` sorts the target model's tensors into three groups: those every expert holds
(the shared backbone: parameters combined by the rule, floating buffers averaged until
:func:`recompute_batch_norm` replaces the BatchNorm statistics, integer buffers taken from the first expert),
those one expert alone holds (its head and any task-specific part of the architecture: copied unchanged),
and those no expert holds (an error).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from mtlvision.errors import ConfigError
from mtlvision.registry import Registry


class MergeRule(ABC):
    """Combines the experts' flattened shared parameters ``[T, P]`` (and a base ``[P]``) into ``[P]``."""

    needs_base: ClassVar[bool] = False

    @abstractmethod
    def __call__(self, experts: Tensor, base: Tensor | None) -> Tensor: ...

    def describe(self) -> dict[str, float]:
        return {k: float(v) for k, v in vars(self).items()}


MERGE_RULES: Registry[type[MergeRule]] = Registry("merging rule")


@MERGE_RULES.register(
    "average",
    "the mean of the experts' weights",
    "Wortsman et al., Model soups, ICML 2022; Matena & Raffel, Merging Models with Fisher-Weighted Averaging, "
    "NeurIPS 2022 (isotropic case)",
)
@dataclass
class WeightAverage(MergeRule):
    """θ = (1/T) Σ_t θ_t."""

    def __call__(self, experts: Tensor, base: Tensor | None) -> Tensor:
        return experts.mean(0)


@MERGE_RULES.register(
    "task_arithmetic",
    "the base plus the scaled sum of the task vectors θ_t - θ_0",
    "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
)
@dataclass
class TaskArithmetic(MergeRule):
    """θ = θ_0 + λ Σ_t (θ_t − θ_0); the paper picks λ on held-out data, 0.3 is its usual value."""

    needs_base: ClassVar[bool] = True
    scale: float = 0.3

    def __call__(self, experts: Tensor, base: Tensor | None) -> Tensor:
        assert base is not None
        return base + self.scale * (experts - base).sum(0)


@MERGE_RULES.register(
    "ties",
    "TIES: trim each task vector to its top-k% magnitudes, elect a sign by total mass, disjoint mean",
    "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023",
)
@dataclass
class Ties(MergeRule):
    """TIES-merging with ``density`` = k (the fraction of each task vector kept, 0.2 in the paper) and
    ``scale`` = λ (1 in the paper's default)."""

    needs_base: ClassVar[bool] = True
    density: float = 0.2
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"ties: density must be in (0, 1], got {self.density}")

    def __call__(self, experts: Tensor, base: Tensor | None) -> Tensor:
        assert base is not None
        vectors = experts - base
        keep = max(1, math.ceil(self.density * vectors.shape[1]))
        top = vectors.abs().topk(keep, dim=1).indices
        trimmed = torch.zeros_like(vectors).scatter_(1, top, vectors.gather(1, top))
        elected = trimmed.sum(0).sign()
        agrees = (trimmed.sign() == elected) & (trimmed != 0)
        merged = (trimmed * agrees).sum(0) / agrees.sum(0).clamp_min(1)
        return base + self.scale * merged


def make_rule(name: str, hparams: Mapping[str, float] | None = None) -> MergeRule:
    """The rule ``name`` with its hyper-parameters; an unknown one is named with the allowed ones."""
    cls = MERGE_RULES.get(name)
    try:
        return cls(**dict(hparams or {}))
    except TypeError as exc:
        allowed = ", ".join(cls.__dataclass_fields__) or "none"  # type: ignore[attr-defined]  # rules are dataclasses
        raise ConfigError(f"merging rule {name!r}: {exc}; its hyper-parameters: {allowed}") from None


@dataclass
class MergeReport:
    """Which tensors were combined by the rule, averaged, or copied from one expert (tensor -> task)."""

    merged: list[str] = field(default_factory=list)
    averaged_buffers: list[str] = field(default_factory=list)
    copied: dict[str, str] = field(default_factory=dict)

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
) -> tuple[dict[str, Tensor], MergeReport]:
    """The state dict of ``target`` built from the experts' state dicts (keyed by their task name)."""
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
    if combined:
        if rule.needs_base and base is None:
            raise ConfigError(f"merging rule {type(rule).__name__} needs the experts' common initialisation")
        if base is not None:
            missing = [k for k in combined if k not in base]
            if missing:
                raise ConfigError(f"the initial weights lack {len(missing)} shared tensors (e.g. {missing[0]})")
        rows = torch.stack([torch.cat([experts[task][k].float().flatten() for k in combined]) for task in experts])
        flat_base = torch.cat([base[k].float().flatten() for k in combined]) if base is not None else None
        merged = rule(rows, flat_base)
        offset = 0
        for key in combined:
            n = own[key].numel()
            state[key] = merged[offset : offset + n].view_as(own[key]).to(own[key].dtype)
            offset += n
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
