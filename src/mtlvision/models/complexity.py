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

    ``shared`` counts the operations of modules whose own weights are all shared parameters,
    ``backbone`` those inside backbone stages (every copy), ``heads`` those of the task heads; the rest of
    ``total`` is the architecture's own modules (attention, gates, mixing). A multiply-add is two FLOPs.
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
    # The counter attributes an operation to every module on the call stack, keyed "<Root>.<name>".
    root = type(model).__name__
    per_module = {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
    modules = dict(model.named_modules())

    def inclusive(name: str) -> int:
        return int(per_module.get(f"{root}.{name}" if name else root, 0))

    def own(name: str) -> int:
        prefix = f"{name}." if name else ""
        children = [prefix + child for child, _ in modules[name].named_children()]
        return inclusive(name) - sum(inclusive(child) for child in children)

    shared_ids = {id(p) for p in model.shared_parameters()}
    shared = 0
    for name, module in modules.items():
        weights = list(module.parameters(recurse=False))
        if weights and all(id(w) in shared_ids for w in weights):
            shared += own(name)
    stages = [name for name, module in modules.items() if isinstance(module, BackboneStage)]
    return {
        "total": int(counter.get_total_flops()),
        "shared": shared,
        "backbone": sum(inclusive(name) for name in stages),
        "heads": sum(inclusive(f"heads.{name}") for name in model.heads),
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
