"""Model size and cost: parameter counts and FLOPs of one forward pass (PyTorch's FLOP counter)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from mtlvision.models.backbones import BackboneStage
from mtlvision.models.multitask import MultiTaskModel


def count_parameters(model: MultiTaskModel) -> dict[str, int]:
    """Parameter counts: whole model, shared part (what balancers act on), task-specific part, trainable."""
    total = sum(p.numel() for p in model.parameters())
    shared = sum(p.numel() for p in {id(p): p for p in model.shared_parameters()}.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "shared": shared, "task_specific": total - shared, "trainable": trainable}


def count_flops(model: MultiTaskModel, image_size: Sequence[int], batch_size: int = 1) -> dict[str, int]:
    """FLOPs of one forward pass on ``batch_size`` images of ``image_size`` (height, width).

    ``backbone`` counts the backbone stages (every copy), ``heads`` the task heads; the rest of ``total``
    is the architecture's own modules (attention, gates, mixing). A multiply-add counts as two FLOPs.
    """
    height, width = (int(image_size[0]), int(image_size[1]))
    images = torch.zeros(batch_size, model.mean.shape[1], height, width, device=model.mean.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(images)
    finally:
        model.train(was_training)
    per_module = {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
    root = type(model).__name__

    def total_of(module_names: list[str]) -> int:
        return sum(per_module.get(f"{root}.{name}", 0) for name in module_names)

    stages = [name for name, module in model.named_modules() if isinstance(module, BackboneStage)]
    heads = [f"heads.{name}" for name in model.heads]
    return {
        "total": int(counter.get_total_flops()),
        "backbone": int(total_of(stages)),
        "heads": int(total_of(heads)),
    }


def model_complexity(model: MultiTaskModel, image_size: Sequence[int]) -> dict[str, Any]:
    """Parameters and forward FLOPs/MACs (batch of one) for ``metrics.json`` and ``mtlvision list``."""
    flops = count_flops(model, image_size)
    return {
        "image_size": [int(image_size[0]), int(image_size[1])],
        "parameters": count_parameters(model),
        "flops": flops,
        "macs": {name: value // 2 for name, value in flops.items()},
    }
