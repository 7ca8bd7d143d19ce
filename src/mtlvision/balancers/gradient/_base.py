"""Shared plumbing for gradient methods: fetching G or K, and state that travels in checkpoints."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from mtlvision.balancers.base import Balancer, Needs, TaskGradients, Update, require_grads
from mtlvision.balancers.gradient._solvers import to_numpy_gramian, to_tensor


class GradientBalancer(Balancer):
    """Base of the gradient methods.

    ``prefers_representation`` marks the "-UB" variants (Sener & Koltun 2018, Sec. 3.3): the same method,
    registered under its own name so that a config can ask for it; the trainer runs a balancer that
    prefers it in ``balancer.mode=representation`` (the gradients of the shared representation).
    """

    prefers_representation: ClassVar[bool] = False


class GramianBalancer(GradientBalancer):
    """A method whose update is ``Σ_t w_t g_t`` with ``w`` computed from ``K = G Gᵀ`` (and the losses)."""

    needs: ClassVar[Needs] = Needs.GRAMIAN

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        gramian = to_numpy_gramian(require_grads(self, grads).gramian())
        weights = self.weights_from_gramian(gramian, losses.detach().to("cpu", torch.float64).numpy())
        return Update(weights=to_tensor(weights, losses))

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        """Task weights ``w`` [T] for the Gramian ``K`` [T, T] (float64) and the loss values [T]."""
        raise NotImplementedError
