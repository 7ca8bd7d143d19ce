"""MoDo: multi-objective gradient with double sampling (Chen et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from mtlvision.balancers.base import ExtraStateMixin
from mtlvision.balancers.gradient._base import GramianBalancer
from mtlvision.balancers.gradient._solvers import project_to_simplex
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError


@BALANCERS.register(
    "modo",
    "MoDo: one projected-gradient step on the MGDA weights per iteration, then d = Gᵀλ.",
    "Chen et al., Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and "
    "Conflict-Avoidance, NeurIPS 2023",
)
class MoDo(ExtraStateMixin, GramianBalancer):
    """MoDo (Chen et al. 2023, Algorithm 1): ``λ ← Π_Δ(λ − γ(G_1ᵀG_2 λ + ρλ))``, then ``d = G_3ᵀλ``.

    The paper draws three independent mini-batches per step so that ``G_1ᵀG_2`` is an unbiased estimate
    of ``∇F(x)ᵀ∇F(x)``. Our engine hands one batch per step, so all three are that batch's ``G``: the
    λ-update uses ``K = GGᵀ``, which is biased by the per-batch gradient covariance (splitting the batch
    would not help: it changes the gradients the update uses, and costs two more backward passes). This
    is MoDo with ``z_1 = z_2 = z_3``. ``λ`` (start ``1/T``) is kept in the checkpoint. Defaults
    ``gamma=1e-3``, ``rho=0.1`` as LibMTL's port of the authors' code.
    """

    _state_names: ClassVar[tuple[str, ...]] = ("lambd",)

    def __init__(self, gamma: float = 1e-3, rho: float = 0.1) -> None:
        super().__init__()
        if gamma <= 0 or rho < 0:
            raise ConfigError(f"balancer.gamma must be > 0 and rho ≥ 0, got {gamma}, {rho}")
        self.gamma = gamma
        self.rho = rho
        self.lambd: torch.Tensor | None = None

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        t = gramian.shape[0]
        lambd = np.full(t, 1.0 / t) if self.lambd is None else self.lambd.numpy()
        if lambd.shape != (t,):
            raise ConfigError(f"MoDo state is for {lambd.shape[0]} tasks but there are {t}")
        lambd = project_to_simplex(lambd - self.gamma * (gramian @ lambd + self.rho * lambd))
        self.lambd = torch.from_numpy(lambd)
        return lambd
