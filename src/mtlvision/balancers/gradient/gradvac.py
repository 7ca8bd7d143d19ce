"""GradVac: steer pairwise gradient similarities towards their running averages (Wang et al., ICLR 2021)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from mtlvision.balancers.base import ExtraStateMixin
from mtlvision.balancers.gradient._base import GramianBalancer
from mtlvision.balancers.gradient._solvers import random_orders, scaled
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError


@BALANCERS.register(
    "gradvac",
    "GradVac: raise each pair's gradient cosine to its EMA target by adding the other gradient.",
    "Wang et al., Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively "
    "Multilingual Models, ICLR 2021",
)
class GradVac(ExtraStateMixin, GramianBalancer):
    """GradVac (Wang et al. 2021, Algorithm 1), on the whole shared parameter vector.

    For every task i, ``g_i'`` starts at ``g_i``; for the other tasks j in a random order, with
    ``φ = cos(g_i', g_j)`` and the target ``φ̂_ij``: if ``φ < φ̂_ij``, add
    ``‖g_i'‖(φ̂√(1−φ²) − φ√(1−φ̂²)) / (‖g_j‖√(1−φ̂²)) · g_j`` (which makes the cosine exactly ``φ̂``); then
    ``φ̂_ij ← (1−β)φ̂_ij + βφ``. Targets start at 0 and are kept in the checkpoint. The update is
    ``Σ_i g_i'``, a combination of task gradients tracked through ``K``. ``beta = 0.01`` is the paper's;
    LibMTL uses 0.5. The paper applies it per layer; the engine hands the whole shared gradient, so this is
    the whole-model granularity (LibMTL's default).
    """

    _state_names: ClassVar[tuple[str, ...]] = ("targets",)

    def __init__(self, beta: float = 0.01) -> None:
        super().__init__()
        if not 0.0 < beta <= 1.0:
            raise ConfigError(f"balancer.beta must be in (0, 1], got {beta}")
        self.beta = beta
        self.targets: torch.Tensor | None = None

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        t = gramian.shape[0]
        if self.targets is None:
            self.targets = torch.zeros(t, t, dtype=torch.float64)
        if self.targets.shape != (t, t):
            raise ConfigError(f"GradVac state is for {self.targets.shape[0]} tasks but there are {t}")
        targets = self.targets.numpy()
        gramian, _ = scaled(gramian)  # the weights do not depend on K's scale; this keeps products finite
        norms = np.sqrt(np.clip(np.diag(gramian), 0.0, None))
        coeffs = np.eye(t)  # row i: g_i' in the basis of the task gradients
        rows = np.arange(t)
        # all tasks i advance together, each through its own random order of the other tasks
        for others in random_orders(t).T:
            products = coeffs @ gramian  # row i: g_i' · g_k for every task k
            current_norm = np.sqrt(np.clip((products * coeffs).sum(axis=1), 0.0, None))
            denom = current_norm * norms[others]
            inner = products[rows, others]
            cosine = np.where(denom > 0, np.clip(inner / np.where(denom > 0, denom, 1.0), -1.0, 1.0), 0.0)
            target = targets[rows, others]
            room = np.sqrt(np.clip(1.0 - target**2, 0.0, None))
            adjust = (cosine < target) & (denom > 0) & (room > 0)
            safe = np.where(adjust, norms[others] * room, 1.0)
            step = current_norm * (target * np.sqrt(np.clip(1.0 - cosine**2, 0.0, None)) - cosine * room) / safe
            coeffs[rows, others] += np.where(adjust, step, 0.0)
            targets[rows, others] = (1.0 - self.beta) * target + self.beta * cosine
        return coeffs.sum(axis=0)
