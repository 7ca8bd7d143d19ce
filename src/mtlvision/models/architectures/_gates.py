"""Gated mixtures of expert stages: the machinery shared by MMoE, CGC, PLE and DSelect-k.

Experts are copies of a group of backbone stages. Each task owns a gate that turns its input into mixture
weights over the experts it may use (weights >= 0 that sum to one). The papers mix one output per expert;
a dense-prediction backbone has one output per stage, so a task's feature at stage ``s`` is the gated sum of
the experts' outputs at stage ``s``, with one gate per task and stage. The experts themselves run
unmixed through their stages, as in the papers; only PLE feeds gated mixtures into the next level.

Gates read their input (the image, or the feature map that enters the level) average-pooled to a fixed
``pool_size x pool_size`` grid and flattened: the papers' gates are linear in the input, and LibMTL flattens
the whole image, which ties the model to one image size; pooling keeps the gate linear in a summary of the
input at any size.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlvision.models.architectures._stages import (
    backbone_stages,
    feature_layout,
    image_channels,
    require_at_least,
    run_stages,
    stage_copies,
)
from mtlvision.models.architectures.base import Architecture, ArchitectureSpec, RepresentationUnavailable
from mtlvision.models.backbones import Backbone

GateFactory = Callable[[int, int], nn.Module]
"""``(in_features, num_experts) -> gate``; a gate maps ``[B, in_features]`` to weights ``[B, num_experts]``."""


class SoftmaxGate(nn.Module):
    """A linear map of the gate input followed by a softmax over the experts (Ma et al., KDD 2018)."""

    def __init__(self, in_features: int, num_experts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_experts)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).softmax(dim=-1)


def gate_input(x: Tensor, pool_size: int) -> Tensor:
    """``x`` [B, C, H, W] average-pooled to ``pool_size``² cells and flattened to [B, C·pool_size²]."""
    return F.adaptive_avg_pool2d(x, pool_size).flatten(1)


def mix(weights: Tensor, outputs: Tensor) -> Tensor:
    """Per-sample weighted sum of stacked expert outputs: weights [B, E], outputs [E, B, C, H, W]."""
    return torch.einsum("be,ebchw->bchw", weights, outputs)


class ExpertLevel(nn.Module):
    """One extraction level (Tang et al., RecSys 2020): task-specific and shared experts over a stage group.

    Each task's gate at each stage mixes the task's own experts and the shared experts. With
    ``shared_gate``, a further gate mixes every expert's last-stage output into the input of the next
    level's shared experts (PLE's shared path). MMoE is a level with no task-specific experts.
    """

    def __init__(
        self,
        backbone_factory: Callable[[], Backbone],
        stages: tuple[int, int],
        num_tasks: int,
        task_experts: int,
        shared_experts: int,
        in_channels: int,
        gate_factory: GateFactory,
        pool_size: int,
        shared_gate: bool,
    ) -> None:
        super().__init__()
        start, stop = stages
        self.num_stages = stop - start
        self.pool_size = pool_size
        self.task_experts = nn.ModuleList(
            stage_copies(backbone_factory, task_experts, start, stop) for _ in range(num_tasks)
        )
        self.shared_experts = stage_copies(backbone_factory, shared_experts, start, stop)
        gate_features = in_channels * pool_size**2
        self.task_gates = nn.ModuleList(
            nn.ModuleList(gate_factory(gate_features, task_experts + shared_experts) for _ in range(self.num_stages))
            for _ in range(num_tasks)
        )
        self.shared_gate = (
            gate_factory(gate_features, num_tasks * task_experts + shared_experts) if shared_gate else None
        )

    def gate_weights(
        self, task_inputs: Sequence[Tensor], shared_input: Tensor
    ) -> tuple[list[list[Tensor]], Tensor | None]:
        """Mixture weights: per task and stage [B, own + shared experts], and the shared gate's [B, all experts]."""
        per_task = []
        for gates, x in zip(self.task_gates, task_inputs):
            assert isinstance(gates, nn.ModuleList)  # one ModuleList of gates per task, built in __init__
            features = gate_input(x, self.pool_size)
            per_task.append([gate(features) for gate in gates])
        shared = None if self.shared_gate is None else self.shared_gate(gate_input(shared_input, self.pool_size))
        return per_task, shared

    def forward(self, task_inputs: Sequence[Tensor], shared_input: Tensor) -> tuple[list[list[Tensor]], Tensor | None]:
        """Per-task features at every stage of the group, and the next level's shared input (or None)."""
        task_weights, shared_weights = self.gate_weights(task_inputs, shared_input)
        # Stacked once per stage and reused by every task's gate, so that autograd keeps one copy.
        # Experts are ModuleLists of stages (stage_copies), and task_experts holds one ModuleList of them per task.
        shared = stacked_stages(
            [run_stages(cast(nn.ModuleList, expert), shared_input) for expert in self.shared_experts]
        )
        assert shared is not None  # indexed below unconditionally: every spec's layout has a shared expert
        own = [
            stacked_stages([run_stages(cast(nn.ModuleList, expert), x) for expert in cast(nn.ModuleList, experts)])
            for experts, x in zip(self.task_experts, task_inputs)
        ]
        features = [
            [
                mix(weights[stage], shared[stage] if mine is None else torch.cat([mine[stage], shared[stage]]))
                for stage in range(self.num_stages)
            ]
            for mine, weights in zip(own, task_weights)
        ]
        shared_next = None
        if shared_weights is not None:
            every_expert = [mine[-1] for mine in own if mine is not None] + [shared[-1]]
            shared_next = mix(shared_weights, torch.cat(every_expert))
        return features, shared_next


def stacked_stages(outputs: Sequence[Sequence[Tensor]]) -> list[Tensor] | None:
    """Experts' per-stage outputs (expert, stage) as one [E, B, C, H, W] tensor per stage; None without experts."""
    if not outputs:
        return None
    return [torch.stack(per_stage) for per_stage in zip(*outputs)]


def split_stages(first: int, count: int, groups: int) -> list[tuple[int, int]]:
    """Split stages ``first:first+count`` into ``groups`` contiguous ranges; earlier ranges take the remainder."""
    size, extra = divmod(count, groups)
    ranges, start = [], first
    for group in range(groups):
        stop = start + size + (1 if group < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


class GatedExperts(Architecture):
    """Backbone stages as experts, mixed by per-task gates at every stage, over one or more levels.

    The first ``shared_stages`` stages (the stem at least, when > 0) form one trunk that every expert
    reads; the remaining stages are split into ``num_levels`` extraction levels.
    """

    def __init__(
        self,
        architecture: str,
        backbone_factory: Callable[[], Backbone],
        task_names: Sequence[str],
        *,
        shared_stages: int,
        num_levels: int,
        task_experts: int,
        shared_experts: int,
        gate_factory: GateFactory,
        gate_pool_size: int,
    ) -> None:
        super().__init__()
        backbone = backbone_factory()
        stages = backbone_stages(
            backbone,
            architecture,
            shared_stages + num_levels,
            f"{shared_stages} shared stage(s) and at least one stage for each of {num_levels} expert level(s)",
        )
        self.architecture = architecture
        self.task_names = list(task_names)
        self.feature_channels, self.feature_strides = feature_layout(backbone)
        self.trunk = nn.ModuleList(list(stages)[:shared_stages])
        levels = []
        ranges = split_stages(shared_stages, len(stages) - shared_stages, num_levels)
        for index, (start, stop) in enumerate(ranges):
            in_channels = image_channels(stages, architecture) if start == 0 else self.feature_channels[start - 1]
            levels.append(
                ExpertLevel(
                    backbone_factory,
                    (start, stop),
                    len(self.task_names),
                    task_experts,
                    shared_experts,
                    in_channels,
                    gate_factory,
                    gate_pool_size,
                    shared_gate=index < num_levels - 1,
                )
            )
        self.levels = nn.ModuleList(levels)

    def forward(self, images: Tensor) -> dict[str, list[Tensor]]:
        trunk_features = run_stages(self.trunk, images)
        x = trunk_features[-1] if trunk_features else images
        task_inputs, shared_input = [x] * len(self.task_names), x
        per_task = [list(trunk_features) for _ in self.task_names]
        for level in self.levels:
            features, shared_input = level(task_inputs, shared_input)
            for collected, task_features in zip(per_task, features):
                collected.extend(task_features)
            task_inputs = [task_features[-1] for task_features in features]
        return dict(zip(self.task_names, per_task))

    def encode(self, images: Tensor) -> list[Tensor]:
        raise RepresentationUnavailable(
            f"architecture {self.architecture!r} has no single shared representation: each task mixes the "
            "experts' features with its own gate. Use balancer.mode=params."
        )

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The trunk, every shared expert and shared gate, and whatever feeds a shared gate.

        In PLE a task's experts below the last level feed the shared gate, so every task depends on them;
        so does a task's gate at a level's last stage when its output feeds such experts. The last level's
        task experts and all other task gates serve one task only.
        """
        yield from self.trunk.parameters()
        levels = cast(list[ExpertLevel], list(self.levels))  # __init__ fills self.levels with ExpertLevels
        last = len(levels) - 1
        for index, level in enumerate(levels):
            yield from level.shared_experts.parameters()
            if level.shared_gate is not None:
                yield from level.shared_gate.parameters()
            if index < last:
                yield from level.task_experts.parameters()
            feeds_shared_task_experts = (
                index + 1 < last and len(cast(nn.ModuleList, levels[index + 1].task_experts[0])) > 0
            )
            if feeds_shared_task_experts:
                for gates in level.task_gates:
                    assert isinstance(gates, nn.ModuleList)  # one ModuleList of gates per task
                    yield from gates[-1].parameters()


class ExpertLayout(NamedTuple):
    """How a gated-experts spec arranges its experts: levels, experts per task and shared experts per level."""

    num_levels: int
    task_experts: int
    shared_experts: int


@dataclass(frozen=True)
class GatedExpertsSpec(ArchitectureSpec):
    """The spec of a :class:`GatedExperts` architecture: what MMoE, CGC, PLE and DSelect-k have in common.

    ``shared_stages`` backbone stages form a trunk under the experts (0: experts are full backbone copies, as
    in LibMTL); gates read their input pooled to ``gate_pool_size``². Both are keyword-only, so that a
    subclass's own hyper-parameters keep their positions. A subclass declares its own fields, their minimums
    in :attr:`minimums` (checked before the shared fields, in that order), any further checks in
    :meth:`check`, and its experts in :meth:`layout`; :meth:`gate_factory` gives softmax gates unless
    overridden. Subclasses are declared ``@dataclass(frozen=True, repr=False)`` to keep this class's repr.
    """

    shared_stages: int = field(default=0, kw_only=True)
    gate_pool_size: int = field(default=8, kw_only=True)

    minimums: ClassVar[Mapping[str, int]] = {}
    """``{field: smallest value}`` for the subclass's integer hyper-parameters."""

    def __post_init__(self) -> None:
        for name, minimum in {**self.minimums, "shared_stages": 0, "gate_pool_size": 1}.items():
            require_at_least(self.name, name, getattr(self, name), minimum)
        self.check()

    def check(self) -> None:
        """Checks beyond the minimums (raise :class:`ConfigError`); none by default."""

    @abstractmethod
    def layout(self) -> ExpertLayout:
        """The number of levels, and of task-specific and shared experts per level."""

    def gate_factory(self) -> GateFactory:
        return SoftmaxGate

    def build(self, backbone_factory: Callable[[], Backbone], task_names: Sequence[str]) -> Architecture:
        return GatedExperts(
            self.name,
            backbone_factory,
            task_names,
            shared_stages=self.shared_stages,
            gate_factory=self.gate_factory(),
            gate_pool_size=self.gate_pool_size,
            **self.layout()._asdict(),
        )

    def hyperparameters(self) -> dict[str, Any]:
        """The hyper-parameters in the order the constructor takes them: the subclass's, then the shared ones."""
        # fields() gives kw_only resolved to a bool (never MISSING)
        return {f.name: getattr(self, f.name) for f in sorted(fields(self), key=lambda f: f.kw_only is True)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.hyperparameters()}

    def __repr__(self) -> str:
        # Subclasses pass repr=False, so that the shared fields come last here too.
        args = ", ".join(f"{key}={value!r}" for key, value in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"
