"""SDMGrad: stochastic direction-oriented multi-objective gradient (Xiao et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from mtlvision.balancers.base import ExtraStateMixin
from mtlvision.balancers.gradient._base import GramianBalancer
from mtlvision.balancers.gradient._solvers import gradient_norms, project_to_simplex, scaled
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError


@BALANCERS.register(
    "sdmgrad",
    "SDMGrad: MGDA weights regularised towards the mean gradient, d = (g_w + λ g0)/(1 + λ).",
    "Xiao et al., Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms, NeurIPS 2023",
)
class SDMGrad(ExtraStateMixin, GramianBalancer):
    """SDMGrad (Xiao et al. 2023, Algorithm 1): ``w`` minimises ``½‖G_ξᵀw + λ g0‖²`` over the simplex by
    ``niter`` projected gradient steps (warm-started at the previous step's ``w``, kept in the checkpoint),
    then ``d = (G_ζᵀ w + λ g0)/(1 + λ)`` with ``g0`` the mean gradient.

    As in the authors' code, ``K`` is divided by the squared mean gradient norm before the inner loop (without
    their ``+1e-8``, so that the weights do not depend on the gradients' scale), and
    the inner steps use learning rate ``lr = 5`` with momentum 0.5 (``momentum=0`` is the paper's plain
    projected SGD); ``lamda = 0.3`` and ``niter = 20`` are their defaults. The paper samples independent
    batches ξ, ξ′, ζ; the engine gives one batch per step, so ``K`` comes from the same batch as the
    update (an estimate biased by the batch's gradient covariance, see :class:`~.modo.MoDo`).
    """

    _state_names: ClassVar[tuple[str, ...]] = ("w",)

    def __init__(self, lamda: float = 0.3, niter: int = 20, lr: float = 5.0, momentum: float = 0.5) -> None:
        super().__init__()
        if lamda < 0 or niter < 1 or lr <= 0 or not 0 <= momentum < 1:
            raise ConfigError(
                "balancer.lamda ≥ 0, niter ≥ 1, lr > 0 and 0 ≤ momentum < 1 required, got "
                f"{lamda}, {niter}, {lr}, {momentum}"
            )
        self.lamda = lamda
        self.niter = niter
        self.lr = lr
        self.momentum = momentum
        self.w: torch.Tensor | None = None

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        t = gramian.shape[0]
        w = np.full(t, 1.0 / t) if self.w is None else self.w.numpy()
        if w.shape != (t,):
            raise ConfigError(f"SDMGrad state is for {w.shape[0]} tasks but there are {t}")
        gramian, _ = scaled(gramian)  # the normalised K below does not depend on K's scale
        scale = gradient_norms(gramian).mean()
        k = gramian / scale**2 if scale > 0 else gramian
        k_mean = k.mean(axis=1)
        velocity = np.zeros(t)
        for _ in range(self.niter):
            velocity = self.momentum * velocity + (k @ w + self.lamda * k_mean)
            w = project_to_simplex(w - self.lr * velocity)
        self.w = torch.from_numpy(w)
        return (w + self.lamda / t) / (1.0 + self.lamda)
