"""PCGrad: project each task gradient off the gradients it conflicts with (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

import numpy as np
import torch

from mtlvision.balancers.gradient._base import GramianBalancer
from mtlvision.balancers.registry import BALANCERS


@BALANCERS.register(
    "pcgrad",
    "PCGrad: project conflicting task gradients onto each other's normal plane, then sum.",
    "Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020",
)
class PCGrad(GramianBalancer):
    """PCGrad (Yu et al. 2020, Algorithm 1).

    For every task i, ``g_i^PC`` starts at ``g_i`` and, for the other tasks j in a fresh random order,
    loses its component along ``g_j`` whenever ``g_i^PC · g_j < 0``; the update is ``Σ_i g_i^PC``.
    Every ``g_i^PC`` is a linear combination of the task gradients, so we track its coefficients and
    read every inner product off ``K`` (as torchjd does): the result is ``Σ_t w_t g_t``. The random
    orders come from torch's global generator, so a seeded run is reproducible.
    """

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        t = gramian.shape[0]
        weights = np.zeros(t)
        for i in range(t):
            coeffs = np.zeros(t)
            coeffs[i] = 1.0
            for j in torch.randperm(t).tolist():
                if j == i or gramian[j, j] <= 0.0:
                    continue
                inner = coeffs @ gramian[:, j]
                if inner < 0.0:
                    coeffs[j] -= inner / gramian[j, j]
            weights += coeffs
        return weights
