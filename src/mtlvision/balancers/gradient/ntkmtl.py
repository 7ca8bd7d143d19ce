"""NTKMTL: balancing the tasks' convergence speeds through their neural tangent kernels (Qin et al. 2025)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from mtlvision.balancers.base import TaskGradients, Update, require_grads
from mtlvision.balancers.gradient._base import GramianBalancer
from mtlvision.balancers.gradient._solvers import nonzero_tasks, scaled, to_numpy_gramian, to_tensor
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError


def ntk_weights(gramian: np.ndarray, exponent: float) -> np.ndarray:
    """``w_t = (Σ_s λ_s / λ_t)^exponent`` with ``λ_t = K_tt``, the (1 × 1) NTK of task t for ``n = 1``;
    tasks with a zero gradient (nothing to speed up) get weight 0."""
    k, _ = scaled(gramian)
    diagonal = np.clip(np.diag(k), 0.0, None)
    weights = np.zeros(len(diagonal))
    active = nonzero_tasks(gramian)
    if active.any():
        weights[active] = (diagonal.sum() / diagonal[active]) ** exponent
    return weights


@BALANCERS.register(
    "ntkmtl",
    "NTKMTL: shared gradients weighted by (trace K / K_tt)^p so that every task's NTK, hence its convergence "
    "speed, is alike.",
    "Qin et al., NTKMTL: Mitigating Task Imbalance in Multi-Task Learning from Neural Tangent Kernel "
    "Perspective, NeurIPS 2025",
)
class NTKMTL(GramianBalancer):
    """Qin et al. (2025). Under gradient flow each task's loss falls at a rate set by the largest
    eigenvalue ``λ_t`` of its neural tangent kernel; NTKMTL weights task t's gradient by
    ``(Σ_s λ_s / λ_t)^p`` so that slow tasks are sped up. With ``n = 1`` sample per task's kernel (the paper's
    setting for NTKMTL, and the authors' code) the kernel is the scalar ``‖g_t‖² = K_tt``, so the method reads
    the Gramian's diagonal only. As in the code (``methods/weight_methods.py``, ``NTKMTL``) the shared
    parameters receive ``T·Σ_t w_t g_t``, clipped to norm ``max_norm`` (1.0; 0 disables it), and the
    task-specific ones the plain gradient of ``Σ_t L_t`` (returned weights are ones, the shared ones are
    ``shared_weights``). ``ntk_exp = p = 0.5`` is the paper's square root; the authors' NYUv2 script uses
    0.75.

    NTKMTL-SR, the variant on the shared representation with ``n = 4`` per-sample kernels, needs per-sample
    losses, which the engine does not form (losses are batch means); it is not provided. Representation
    mode here runs the same ``n = 1`` rule on the representation's gradients.
    """

    supports_representation: ClassVar[bool] = True

    def __init__(self, ntk_exp: float = 0.5, max_norm: float = 1.0) -> None:
        super().__init__()
        if not ntk_exp >= 0 or not max_norm >= 0:
            raise ConfigError(f"NTKMTL needs ntk_exp >= 0 and max_norm >= 0; got {ntk_exp}, {max_norm}")
        self.ntk_exp, self.max_norm = float(ntk_exp), float(max_norm)

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        """The shared parameters' weights ``T·w``, scaled down so that ``‖Gᵀ(T·w)‖ ≤ max_norm``."""
        weights = len(gramian) * ntk_weights(gramian, self.ntk_exp)
        if self.max_norm > 0:
            k, s = scaled(gramian)
            root = weights * np.sqrt(s)
            norm = np.sqrt(max(float(root @ k @ root), 0.0))
            if norm > self.max_norm:
                weights = weights * (self.max_norm / norm)
        return weights

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        gramian = to_numpy_gramian(require_grads(self, grads).gramian())
        shared = self.weights_from_gramian(gramian, losses.detach().to("cpu", torch.float64).numpy())
        return Update(weights=torch.ones_like(losses).detach(), shared_weights=to_tensor(shared, losses))
