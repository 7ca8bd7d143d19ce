"""A multi-task model with one backbone per task, kept as modulations of one start (EMR-merging).

Experts merged by EMR-merging (Huang, Ye, Li et al., NeurIPS 2024) do not share one set of weights: the
tasks of expert group g run with θ_0 + λ_g · M_g ⊙ τ_uni. :class:`TaskModulatedModel` holds θ_0 in its own
parameters (with the heads), and in its ``modulation`` buffers the unified vector τ_uni, one bit-packed
mask per group, the rescalers λ_g and each group's BatchNorm statistics. Every forward rebuilds each
group's backbone tensors and runs the architecture once per group, each group's heads on its own features:
the compute of G backbones, the storage of about two.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mtlvision.errors import ConfigError
from mtlvision.models.multitask import MultiTaskModel

PREFIX = "architecture."


def pack_bits(mask: Tensor) -> Tensor:
    """Boolean masks ``[G, *shape]`` packed eight to a byte: ``[G, ceil(n / 8)]`` uint8 (bit i of byte j is
    entry 8j + i)."""
    flat = mask.reshape(mask.shape[0], -1).to(torch.uint8)
    pad = (-flat.shape[1]) % 8
    flat = torch.nn.functional.pad(flat, (0, pad)).view(flat.shape[0], -1, 8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=mask.device)
    return (flat * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """The boolean mask of ``shape`` packed in one row of :func:`pack_bits`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten()[: math.prod(shape)].view(*shape).bool()


@dataclass(frozen=True)
class ModulationLayout:
    """What a task-modulated model holds, recorded with its weights.

    Attributes:
        rule: the merging rule that made it (``emr``).
        groups: the tasks of each expert, in the experts' order (one backbone per group).
        modulated: the shared parameters rebuilt per group (state names, all under ``architecture.``).
        statistics: the floating buffers (BatchNorm running statistics) each group holds its own copy of.
    """

    rule: str
    groups: tuple[tuple[str, ...], ...]
    modulated: tuple[str, ...]
    statistics: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str, source: str) -> ModulationLayout:
        """The layout recorded in ``source`` (a weights file), with a clear error when it is malformed."""
        try:
            raw: dict[str, Any] = json.loads(text)
            return cls(
                rule=str(raw["rule"]),
                groups=tuple(tuple(str(t) for t in g) for g in raw["groups"]),
                modulated=tuple(str(n) for n in raw["modulated"]),
                statistics=tuple(str(n) for n in raw.get("statistics", ())),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{source}: the recorded task modulation is malformed ({exc})") from None


class TaskModulatedModel(MultiTaskModel):
    """A :class:`MultiTaskModel` whose backbone is task-specific: group g's tensors are
    ``θ_0 + rescalers[g] · masks[g] ⊙ unified``, rebuilt at every forward.

    Args:
        *args: those of :class:`MultiTaskModel`.
        layout: the groups, modulated parameters and per-group statistics (see :class:`ModulationLayout`).
        **kwargs: those of :class:`MultiTaskModel`.
    """

    def __init__(self, *args: Any, layout: ModulationLayout, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        grouped = [t for g in layout.groups for t in g]
        if sorted(grouped) != sorted(self.task_names):
            raise ConfigError(f"task modulation groups {layout.groups} do not cover the tasks {self.task_names} once")
        params, buffers = dict(self.named_parameters()), dict(self.named_buffers())
        unknown = [n for n in layout.modulated if n not in params or not n.startswith(PREFIX)]
        unknown += [n for n in layout.statistics if n not in buffers or not n.startswith(PREFIX)]
        if unknown:
            raise ConfigError(f"task modulation names tensors the model's architecture lacks: {', '.join(unknown[:3])}")
        self.layout = layout
        count = len(layout.groups)
        self.modulation = nn.Module()
        for i, name in enumerate(layout.modulated):
            self.modulation.register_buffer(f"unified_{i}", torch.zeros_like(params[name].data))
            packed = torch.zeros(count, math.ceil(params[name].numel() / 8), dtype=torch.uint8)
            self.modulation.register_buffer(f"mask_{i}", packed)
        self.modulation.register_buffer("rescalers", torch.ones(count))
        for g in range(count):
            for j, name in enumerate(layout.statistics):
                self.modulation.register_buffer(f"statistics_{g}_{j}", buffers[name].detach().clone())

    @torch.no_grad()
    def set_modulation(
        self,
        unified: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        rescalers: Tensor,
        statistics: Sequence[Mapping[str, Tensor]] = (),
    ) -> None:
        """Fill the modulation: ``unified {name: shape}``, ``masks {name: [G, *shape]}`` booleans, ``rescalers
        [G]`` and, per group, ``{buffer name: tensor}`` of its statistics."""
        own = dict(self.modulation.named_buffers())
        for i, name in enumerate(self.layout.modulated):
            own[f"unified_{i}"].copy_(unified[name])
            own[f"mask_{i}"].copy_(pack_bits(masks[name].bool()))
        own["rescalers"].copy_(rescalers)
        for g, group in enumerate(statistics):
            for j, name in enumerate(self.layout.statistics):
                own[f"statistics_{g}_{j}"].copy_(group[name])

    def group_tensors(self, group: int) -> dict[str, Tensor]:
        """Group ``group``'s modulated parameters and statistics, keyed by state name."""
        own = dict(self.modulation.named_buffers())
        params = dict(self.named_parameters())
        scale = own["rescalers"][group]
        tensors = {}
        for i, name in enumerate(self.layout.modulated):
            mask = unpack_bits(own[f"mask_{i}"][group], params[name].shape)
            tensors[name] = params[name] + scale * mask * own[f"unified_{i}"]
        for j, name in enumerate(self.layout.statistics):
            tensors[name] = own[f"statistics_{group}_{j}"]
        return tensors

    def group_state(self, group: int) -> dict[str, Tensor]:
        """The state dict of a plain :class:`MultiTaskModel` with group ``group``'s backbone (every head kept)."""
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("modulation.")}
        state.update({k: v.detach() for k, v in self.group_tensors(group).items()})
        return state

    def forward(self, images: Tensor) -> dict[str, Any]:
        normalised = self.normalise(images)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        predictions: dict[str, Any] = {}
        for g, tasks in enumerate(self.layout.groups):
            tensors = {k[len(PREFIX) :]: v for k, v in self.group_tensors(g).items()}
            features = functional_call(self.architecture, tensors, (normalised,))
            for name in tasks:
                predictions[name] = self._tasks[name].postprocess(self.heads[name](features[name], size))
        return {name: predictions[name] for name in self.task_names}

    def encode(self, images: Tensor) -> list[Tensor]:
        raise ConfigError(
            f"this model's backbone is task-specific ({self.layout.rule} merging: one per expert group): it has no "
            "single shared representation"
        )

    def merged(self) -> MultiTaskModel:
        raise ConfigError(
            f"this model's backbone is task-specific ({self.layout.rule} merging: one backbone per expert group, "
            "rebuilt from one start at every forward), so it has no single set of plain weights: ONNX export needs "
            "one network. Export the experts themselves, or merge with a rule that gives one set of weights (e.g. "
            "--rule ties)"
        )

    def storage(self) -> dict[str, int]:
        """What the model stores and runs: parameters (start and heads), the unified vector, packed mask bytes,
        per-group statistics, all of it in 32-bit values (four mask bytes to a value), and backbone forwards
        per batch."""
        own = dict(self.modulation.named_buffers())
        parameters = sum(p.numel() for p in self.parameters())
        unified = sum(own[f"unified_{i}"].numel() for i in range(len(self.layout.modulated)))
        masks = sum(own[f"mask_{i}"].numel() for i in range(len(self.layout.modulated)))
        statistics = sum(v.numel() for k, v in own.items() if k.startswith("statistics_"))
        return {
            "parameters": parameters,
            "unified_vector": unified,
            "mask_bytes": masks,
            "group_statistics": statistics,
            "stored_values": parameters + unified + statistics + len(self.layout.groups) + math.ceil(masks / 4),
            "forwards_per_batch": len(self.layout.groups),
        }
