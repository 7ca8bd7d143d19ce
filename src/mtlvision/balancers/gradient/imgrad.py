"""IMGrad: imbalance-sensitive conflict-averse gradient (Zhou et al., IJCAI 2025)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from mtlvision.balancers.base import TaskGradients, Update, require_grads
from mtlvision.balancers.gradient._base import GramianBalancer
from mtlvision.balancers.gradient._solvers import (
    conflict_averse_dual,
    min_norm_weights,
    scaled,
    to_numpy_gramian,
    to_tensor,
)
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError

#: the constant of the authors' objective, ``(OFFSET − cos)·g_wᵀg0 + cos·c‖g_w‖`` (``nyuv2/utils.py``)
OFFSET = 1.5


def imbalance_cosine(k: np.ndarray) -> float:
    """``cos(g0, g_m)`` between the mean gradient and MGDA's min-norm one (0 when either is zero)."""
    t = len(k)
    mean = np.full(t, 1.0 / t)
    u = min_norm_weights(k)
    denominator = np.sqrt(max(float(mean @ k @ mean), 0.0) * max(float(u @ k @ u), 0.0))
    return float(mean @ k @ u) / denominator if denominator > 0 else 0.0


@BALANCERS.register(
    "imgrad",
    "IMGrad: CAGrad's dual problem re-weighted by the cosine between the mean and the MGDA gradient.",
    "Zhou et al., Injecting Imbalance Sensitivity for Multi-Task Learning, IJCAI 2025",
)
class IMGrad(GramianBalancer):
    """Zhou et al. (2025), as in the authors' code (``nyuv2/utils.py``, ``imgrad``). With ``g0`` the mean
    gradient and ``g_m`` MGDA's min-norm convex combination, ``κ = cos(g0, g_m)`` measures how balanced
    the tasks are (``κ = 1`` when the mean already is the min-norm point). CAGrad's dual problem is then
    re-weighted by it: ``w = argmin_{w ∈ Δ} (1.5 − κ)·g_wᵀg0 + κ·c‖g_w‖`` with ``c = α‖g0‖``, solved with
    SLSQP from ``w = 1/T`` as the code does, and the shared parameters move along
    ``T·(g0 + (c/‖g_w‖)·g_w)/(1 + α²)`` (the code's ``rescale=1`` and its ``× T`` "to match the sum loss");
    the task-specific ones get the plain gradient of ``Σ_t L_t`` (returned weights are ones, the shared
    ones are ``shared_weights``). ``alpha = 0.8`` is the authors' NYUv2 and Cityscapes setting. When
    ``g_w`` vanishes only ``g0`` remains, as in the code. The weights do not depend on the scale of ``K``, so
    it is solved normalised.
    """

    supports_representation: ClassVar[bool] = False

    def __init__(self, alpha: float = 0.8) -> None:
        super().__init__()
        if not alpha >= 0:
            raise ConfigError(f"IMGrad needs alpha >= 0; got {alpha}")
        self.alpha = float(alpha)

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        """The shared parameters' weights ``T·(1/T + (c/‖g_w‖)·w)/(1 + α²)``."""
        t = gramian.shape[0]
        mean = np.full(t, 1.0 / t)
        gramian, _ = scaled(gramian)
        scale = float(np.trace(gramian)) / t
        rescale = t / (1.0 + self.alpha**2)
        if self.alpha == 0.0 or scale <= 0.0:
            return mean * rescale
        k = gramian / scale
        cosine = imbalance_cosine(k)
        c = self.alpha * np.sqrt(max(float(mean @ k @ mean), 0.0))
        w = conflict_averse_dual(k, OFFSET - cosine, cosine * c, "IMGrad")
        gw_norm = np.sqrt(max(float(w @ k @ w), 0.0))
        weights = mean if gw_norm < 1e-8 else mean + (c / gw_norm) * w
        return weights * rescale

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        gramian = to_numpy_gramian(require_grads(self, grads).gramian())
        shared = self.weights_from_gramian(gramian, losses.detach().to("cpu", torch.float64).numpy())
        return Update(weights=torch.ones_like(losses).detach(), shared_weights=to_tensor(shared, losses))
