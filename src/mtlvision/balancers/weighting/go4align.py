"""GO4Align: group optimisation for multi-task alignment."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from mtlvision.balancers.base import TaskGradients, Update
from mtlvision.balancers.registry import BALANCERS
from mtlvision.balancers.weighting._common import LossWeighting, checked_losses
from mtlvision.errors import ConfigError


def kmeans_1d(values: np.ndarray, groups: int) -> np.ndarray:
    """The optimal ``groups``-means clustering of the numbers ``values``: each value replaced by the mean of
    its cluster.

    In one dimension an optimal clustering splits the sorted values into contiguous runs, so dynamic
    programming over the split points finds the global minimum of the within-cluster sum of squares
    exactly (``O(groups · T²)``), where Lloyd's iterations may stop at a local one.
    """
    t = len(values)
    order = np.argsort(values, kind="stable")
    x = values[order]
    prefix = np.concatenate([[0.0], np.cumsum(x)])
    prefix_sq = np.concatenate([[0.0], np.cumsum(x * x)])

    def cost(i: int, j: int) -> float:  # sum of squares of x[i:j] around its mean
        s = prefix[j] - prefix[i]
        return float(prefix_sq[j] - prefix_sq[i] - s * s / (j - i))

    best = np.full((groups + 1, t + 1), np.inf)
    split = np.zeros((groups + 1, t + 1), dtype=int)
    best[0, 0] = 0.0
    for k in range(1, groups + 1):
        for j in range(k, t + 1):
            for i in range(k - 1, j):
                candidate = best[k - 1, i] + cost(i, j)
                if candidate < best[k, j]:
                    best[k, j], split[k, j] = candidate, i
    centres = np.empty(t)
    j = t
    for k in range(groups, 0, -1):
        i = split[k, j]
        centres[i:j] = x[i:j].mean()
        j = i
    out = np.empty(t)
    out[order] = centres
    return out


@BALANCERS.register(
    "go4align",
    "GO4Align: risk-guided task weights (loss-scale × running risk indicator), averaged within k-means groups.",
    "Shen et al., GO4Align: Group Optimization for Multi-Task Alignment, NeurIPS 2024",
)
class GO4Align(LossWeighting):
    """Shen et al. (2024), as in the authors' code (``methods/cluster_methods.py``, ``GO4ALIGN``).

    Each step: the scale ``s_t = Σ_k L_k / L_t`` balances the losses' magnitudes; the risk indicator ``p``
    (starting at ``1/T``) follows ``p_t ← p_t·exp(−η L_t)``, renormalised to sum to one, so a task whose loss
    stays high keeps its share; the task weights ``γ_t = s_t p_t`` are then clustered into ``num_groups``
    groups by k-means, and every task gets its group's mean weight (dynamical group assignment). ``η =
    robust_step_size = 1e-4`` is the authors' default. ``num_groups = 2`` by default (capped at T); with one
    group every task gets the mean of ``γ`` (the authors' trainer flag defaults to 1). The code clusters
    with Lloyd's k-means from a random start (kmeans_pytorch); we solve the one-dimensional k-means exactly
    (:func:`kmeans_1d`), which is deterministic and never stops at a worse local optimum. The scale divides
    by each loss, so a zero loss is an error.
    """

    _state_names: ClassVar[tuple[str, ...]] = ("risk",)

    def __init__(self, num_groups: int = 2, robust_step_size: float = 1e-4) -> None:
        super().__init__()
        if num_groups < 1 or not robust_step_size >= 0:
            raise ConfigError(
                f"GO4Align needs num_groups >= 1 and robust_step_size >= 0; got {num_groups}, {robust_step_size}"
            )
        self.num_groups, self.robust_step_size = int(num_groups), float(robust_step_size)
        self.risk: Tensor | None = None

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        values = checked_losses(self, losses).cpu()
        t = values.numel()
        if self.risk is None:
            self.risk = torch.full((t,), 1.0 / t, dtype=torch.float64)
        if self.risk.numel() != t:
            raise ConfigError(f"GO4Align has risk indicators for {self.risk.numel()} tasks but got {t} losses")
        # r ← r·exp(−η L) / Σ(r·exp(−η L)), in log space: exp(−η L) underflows to 0 for every task at large
        # losses (1e7 with η = 1e-4 gives exp(−1e3)), and the plain form then divides 0 by 0
        self.risk = torch.softmax(self.risk.log() - self.robust_step_size * values.double(), dim=0)
        gamma = (values.sum() / values) * self.risk
        grouped = kmeans_1d(gamma.numpy(), min(self.num_groups, t))
        return Update(weights=torch.from_numpy(grouped).to(device=losses.device, dtype=losses.dtype))
