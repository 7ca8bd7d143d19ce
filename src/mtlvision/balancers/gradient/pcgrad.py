"""PCGrad: project each task gradient off the gradients it conflicts with (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

import numpy as np

from mtlvision.balancers.gradient._base import GramianBalancer
from mtlvision.balancers.gradient._solvers import random_orders, scaled
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
    orders come from torch's global generator, so a seeded run is reproducible. The weights do not depend
    on the scale of ``K``, which is rescaled by a power of two first.
    """

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        t = gramian.shape[0]
        gramian, _ = scaled(gramian)
        coeffs = np.eye(t)  # row i: g_i^PC in the basis of the task gradients
        rows = np.arange(t)
        diagonal = np.diag(gramian)
        # all tasks i advance together, each through its own random order of the other tasks
        for others in random_orders(t).T:
            inner = np.einsum("ik,ki->i", coeffs, gramian[:, others])  # g_i^PC · g_j
            conflict = (inner < 0.0) & (diagonal[others] > 0.0)
            safe = np.where(conflict, diagonal[others], 1.0)
            coeffs[rows, others] -= np.where(conflict, inner / safe, 0.0)
        return coeffs.sum(axis=0)
