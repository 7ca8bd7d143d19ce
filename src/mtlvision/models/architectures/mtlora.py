"""MTLoRA: task-agnostic and task-specific low-rank adapters over a shared ViT (Agiza et al., CVPR 2024).

Every linear layer ``W`` of the transformer blocks gets a low-rank update ``s · B A`` (LoRA, Hu et al.
2022: ``A`` Kaiming-uniform, ``B`` zero, so an adapted model starts equal to its base). MTLoRA places a
task-agnostic adapter (TA-LoRA) in the shared blocks and, in the blocks that make the task-specific
features, one adapter per task (MT-LoRA): task ``t`` computes ``W x_t + s_t B_t A_t x_t`` on its own
tokens ``x_t``, as the authors' ``MTLoRALinear`` does in its default ("matrix") mode. The paper adapts a
Swin transformer, with MT-LoRA at the end of every stage; a plain ViT has one stage, so here the last
``task_blocks`` blocks run once per task with the task's adapters, and each task's tokens go through the
backbone's (shared) feature pyramid. The base weights are frozen (``freeze_backbone``, as in the paper)
or trained along.

:meth:`MTLoRANetwork.merged` folds every adapter into plain weights (``W + s B A``; the task-specific
blocks become one plain copy per task) for inference and ONNX export.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtlvision.errors import ConfigError
from mtlvision.models.architectures._stages import require_at_least
from mtlvision.models.architectures.base import Architecture, ArchitectureSpec, RepresentationUnavailable
from mtlvision.models.architectures.registry import ARCHITECTURES
from mtlvision.models.backbones import Backbone
from mtlvision.models.vit import ViTBackbone


class LoRALinear(nn.Module):
    """``base(x) + scale · x Aᵀ Bᵀ`` with ``A`` of shape ``[rank, in]`` and ``B`` of shape ``[out, rank]``.

    ``base`` is held, not copied: the task-specific views of a block share their base layers.
    """

    def __init__(self, base: nn.Linear, rank: int, scale: float) -> None:
        super().__init__()
        self.base = base
        self.scale = float(scale)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * ((x @ self.lora_a.T) @ self.lora_b.T)

    def merged(self) -> nn.Linear:
        """A plain linear layer computing the same function."""
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        merged = merged.to(self.base.weight.device)
        with torch.no_grad():
            merged.weight.copy_(self.base.weight + self.scale * self.lora_b @ self.lora_a)
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged


def adapted(module: nn.Module, adapt: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    """A view of ``module`` with every ``nn.Linear`` replaced by ``adapt(linear)``; other leaves are shared.

    Modules on the path to a linear layer are shallow copies (their own parameters and buffers shared).
    """
    if isinstance(module, nn.Linear):
        return adapt(module)
    if not any(isinstance(m, nn.Linear) for m in module.modules()):
        return module
    view = copy.copy(module)
    view._modules = {name: None if child is None else adapted(child, adapt) for name, child in module._modules.items()}
    return view


def merged_module(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every :class:`LoRALinear` folded into a plain ``nn.Linear``."""
    if isinstance(module, LoRALinear):
        return module.merged()
    clone = copy.copy(module)
    clone._parameters = {k: None if v is None else nn.Parameter(v.detach().clone(), v.requires_grad)
                         for k, v in module._parameters.items()}  # fmt: skip
    clone._buffers = {k: None if v is None else v.clone() for k, v in module._buffers.items()}
    clone._modules = {k: None if v is None else merged_module(v) for k, v in module._modules.items()}
    return clone


class MTLoRANetwork(Architecture):
    """A ViT backbone with TA-LoRA in its shared blocks and per-task LoRA in its last ``task_blocks`` blocks.

    Each task's blocks and the (shared) feature pyramid turn the shared blocks' tokens into that task's
    features. It has no representation mode (:meth:`encode` raises): the task blocks' base weights and the
    pyramid are shared but run after the task-specific adapters.
    """

    def __init__(self, backbone: ViTBackbone, task_names: Sequence[str], spec: MTLoRA) -> None:
        super().__init__()
        self.backbone = backbone
        self.task_names = list(task_names)
        self.feature_channels = list(backbone.feature_channels)
        self.feature_strides = list(backbone.feature_strides)
        blocks = list(backbone.trunk.blocks)
        if spec.task_blocks > len(blocks):
            raise ConfigError(
                f"architecture 'mtlora': task_blocks={spec.task_blocks} exceeds the {len(blocks)} blocks of "
                f"backbone {backbone.name!r}."
            )
        if spec.freeze_backbone:
            backbone.stages[0].requires_grad_(False)
        split = len(blocks) - spec.task_blocks
        self.shared_blocks = nn.Sequential(
            *(adapted(block, lambda linear: LoRALinear(linear, spec.rank, spec.scale)) for block in blocks[:split])
        )
        self.task_blocks = nn.ModuleDict(
            {
                name: nn.Sequential(
                    *(
                        adapted(block, lambda linear: LoRALinear(linear, spec.task_rank, spec.task_scale))
                        for block in blocks[split:]
                    )
                )
                for name in self.task_names
            }
        )

    def encode(self, images: Tensor) -> list[Tensor]:
        raise RepresentationUnavailable(
            "architecture 'mtlora' has no shared representation that every shared parameter lies before: the "
            "task blocks' base weights and the feature pyramid are shared, but run on each task's own tokens "
            "after its adapters. Use balancer.mode=params."
        )

    def forward(self, images: Tensor) -> dict[str, list[Tensor]]:
        trunk = self.backbone.trunk
        tokens = self.shared_blocks(trunk.embed(images))
        return {
            name: self.backbone.pyramid(trunk.to_map(self.task_blocks[name](tokens), images.shape[-2:]))
            for name in self.task_names
        }

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        task_specific = {id(p) for name in self.task_names for p in self.task_adapter_parameters(name)}
        return (p for p in self.parameters() if id(p) not in task_specific)

    def task_adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """The LoRA matrices of task ``name`` (its blocks' base weights are shared)."""
        for module in self.task_blocks[name].modules():
            if isinstance(module, LoRALinear):
                yield module.lora_a
                yield module.lora_b

    def merged(self) -> Architecture:
        return merged_module(self)  # type: ignore[return-value]  # a copy of this class, adapters folded in


@ARCHITECTURES.register(
    "mtlora",
    "MTLoRA: task-agnostic LoRA in the shared ViT blocks, per-task LoRA in the last blocks (ViT backbones)",
    "Agiza, Neseem and Reda, MTLoRA: Low-Rank Adaptation Approach for Efficient Multi-Task Learning, CVPR 2024",
)
@dataclass(frozen=True)
class MTLoRA(ArchitectureSpec):
    """Low-rank adapters over a shared ViT backbone (``model.backbone``: a timm ViT, e.g. vit_tiny_patch16_224).

    ``rank`` / ``scale``: rank and scaling of the task-agnostic adapters of the shared blocks;
    ``task_rank`` / ``task_scale``: those of every task's adapters in the last ``task_blocks`` blocks
    (scales are constants, as the authors' ``lora_shared_scale`` and ``lora_task_scale``);
    ``freeze_backbone``: keep the ViT's own weights frozen (the paper) or train them with the adapters.
    The feature pyramid and the heads are always trained. With every adapted layer a ``Linear(i, o)``,
    the adapters hold ``rank (i + o)`` parameters per shared layer and ``T task_rank (i + o)`` per
    task-specific layer.
    """

    name: ClassVar[str] = "mtlora"
    #: measured on this backbone by `mtlvision list architectures`; any timm plain ViT works
    backbone: ClassVar[str | None] = "vit_tiny_patch16_224"
    rank: int = 4
    task_rank: int = 4
    scale: float = 1.0
    task_scale: float = 1.0
    task_blocks: int = 1
    freeze_backbone: bool = True

    def __post_init__(self) -> None:
        require_at_least(self.name, "rank", self.rank, 1)
        require_at_least(self.name, "task_rank", self.task_rank, 1)
        require_at_least(self.name, "task_blocks", self.task_blocks, 1)
        for field in ("scale", "task_scale"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"architecture 'mtlora': {field}={value!r} must be a positive number.")
        if not isinstance(self.freeze_backbone, bool):
            raise ConfigError(
                f"architecture 'mtlora': freeze_backbone must be true or false, got {self.freeze_backbone!r}."
            )

    def build(self, backbone_factory: Callable[[], Backbone], task_names: Sequence[str]) -> Architecture:
        backbone = backbone_factory()
        if not isinstance(backbone, ViTBackbone):
            got = getattr(backbone, "name", type(backbone).__name__)
            raise ConfigError(
                "architecture 'mtlora' adapts the linear layers of a ViT's blocks and needs a timm ViT backbone "
                f"(e.g. model.backbone=vit_tiny_patch16_224); got {got!r}."
            )
        return MTLoRANetwork(backbone, task_names, self)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}
