"""Model Stock: per layer, the interpolation between the experts' average and their start that the angle
between their task vectors predicts (Jang et al., Model Stock: All we need is just a few fine-tuned models,
ECCV 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mtlvision.engine.merging.base import MERGE_RULES, TensorRule


def interpolation_ratio(vectors: Tensor) -> Tensor:
    """t = N cos θ / (1 + (N − 1) cos θ) of task vectors ``[N, ...]``, cos θ the mean pairwise cosine
    similarity; negative cosines count as 0 (orthogonal task vectors: t = 0, the start), a vector of zeros has
    cosine 0 with any other."""
    count = vectors.shape[0]
    flat = vectors.flatten(1)
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
    cosines = unit @ unit.T
    pairs = cosines[torch.triu_indices(count, count, offset=1).unbind()]
    cos = pairs.mean().clamp(0.0, 1.0)
    return count * cos / (1 + (count - 1) * cos)


@MERGE_RULES.register(
    "model_stock",
    "Model Stock: per layer, t·average + (1-t)·start with t from the angle between the task vectors",
    "Jang et al., Model Stock: All we need is just a few fine-tuned models, ECCV 2024",
)
@dataclass
class ModelStock(TensorRule):
    """θ = t θ̄ + (1 − t) θ_0 per tensor, t = N cos θ / (1 + (N − 1) cos θ). Made for several fine-tunings of
    one task; for experts of different tasks whose task vectors are near orthogonal it stays near the start.
    One expert is returned unchanged."""

    needs_base: ClassVar[bool] = True

    def merge_tensor(self, experts: Tensor, base: Tensor | None) -> Tensor:
        assert base is not None
        if experts.shape[0] == 1:
            return experts[0]
        t = interpolation_ratio(experts - base)
        return t * experts.mean(0) + (1 - t) * base
