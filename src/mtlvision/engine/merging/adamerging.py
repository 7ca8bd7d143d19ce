"""AdaMerging: task-wise or layer-wise merge coefficients learnt by entropy minimisation on unlabelled
test batches (Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mtlvision.data.datasets.base import SPLITS
from mtlvision.engine.merging.base import (
    MERGE_RULES,
    DataUse,
    LearnedRule,
    Objective,
    check_choice,
    check_range,
    check_whole,
)

GRANULARITIES = ("task", "layer")
#: what the rule does with a task that defines no prediction entropy (depth, normals)
REGRESSION = ("refuse", "expert")


def check_learning_options(rule: str, options: Any) -> None:
    """The options every rule learnt on unlabelled batches of the experts' data shares (AdaMerging's and
    WEMoE's): ``split``, ``regression``, ``steps``, ``batch_size``, ``batches``, ``seed`` and ``lr``."""
    for name, allowed in {"split": SPLITS, "regression": REGRESSION}.items():
        check_choice(rule, name, getattr(options, name), allowed)
    for name in ("steps", "batch_size", "batches", "seed"):
        check_whole(rule, name, getattr(options, name), 0 if name == "seed" else 1)
    check_range(rule, "lr", options.lr, 0.0, 1.0)


def merged_tensors(
    coefficients: Tensor, vectors: Mapping[str, Tensor], base: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """θ^l = θ_0^l + Σ_t λ_t^l τ_t^l for coefficients ``[L or 1, T]`` (one row per tensor, or one for all)."""
    rows = coefficients.shape[0]
    return {
        key: base[key] + torch.tensordot(coefficients[i if rows > 1 else 0], vectors[key], dims=1)
        for i, key in enumerate(vectors)
    }


@MERGE_RULES.register(
    "adamerging",
    "AdaMerging: θ_0 + Σ_t λ_t τ_t with λ per task or per layer learnt by minimising prediction entropy on "
    "unlabelled test batches",
    "Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024",
)
@dataclass
class AdaMerging(LearnedRule):
    """Task arithmetic with learnt coefficients, clamped to [0, 1], started at ``prior`` (0.3) and optimised by
    Adam (``lr`` 1e-3, betas 0.9/0.999, no weight decay) for ``steps`` (500) steps, each on ``batches`` (2)
    random unlabelled batches of ``batch_size`` (16) images of the experts' ``split`` (the test split, as in the
    paper): the paper's defaults. ``granularity`` ``task`` learns one λ per task, ``layer`` one per task and
    shared tensor (the paper's layer-wise AdaMerging). The objective is the sum over tasks of the mean
    prediction entropy (:mod:`~mtlvision.engine.merging.entropy`); a regression task (depth, normals) has
    none and is refused unless ``regression=expert``, which uses the L1 distance of the merged model's
    output to that task's own expert's output on the same images instead (a label-free surrogate of ours,
    not part of the paper). ``seed`` fixes the batches drawn."""

    needs_base: ClassVar[bool] = True
    granularity: str = "layer"
    prior: float = 0.3
    steps: int = 500
    lr: float = 1e-3
    batch_size: int = 16
    batches: int = 2
    split: str = "test"
    regression: str = "refuse"
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("adamerging", "granularity", self.granularity, GRANULARITIES)
        check_learning_options("adamerging", self)
        check_range("adamerging", "prior", self.prior, 0.0, 1.0, open_low=False)
        self.learned = {}

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "learned"}

    def data_use(self) -> DataUse:
        """The images of ``split`` (the test split by default, as in the paper), unlabelled."""
        return DataUse(split=self.split, labels=False)

    def learn(
        self, experts: Mapping[str, Tensor], base: Mapping[str, Tensor], objective: Objective
    ) -> dict[str, Tensor]:
        vectors = {k: v - base[k] for k, v in experts.items()}
        count = next(iter(experts.values())).shape[0]
        rows = len(vectors) if self.granularity == "layer" else 1
        raw = torch.full((rows, count), float(self.prior), requires_grad=True)
        optimizer = torch.optim.Adam([raw], lr=self.lr, betas=(0.9, 0.999), weight_decay=0.0)
        losses = []
        for _ in range(self.steps):
            loss = objective(merged_tensors(raw.clamp(0.0, 1.0), vectors, base))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        coefficients = raw.detach().clamp(0.0, 1.0)
        self.learned = {
            "objective_first_step": losses[0],
            "objective_last_step": losses[-1],
            "mean_coefficient_per_expert": [round(float(c), 4) for c in coefficients.mean(0)],
            "coefficients": (
                {k: [round(float(c), 4) for c in coefficients[i]] for i, k in enumerate(vectors)}
                if rows > 1
                else [round(float(c), 4) for c in coefficients[0]]
            ),
        }
        with torch.no_grad():
            return merged_tensors(coefficients, vectors, base)
