"""GradNorm."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mtlvision.balancers.base import Needs, TaskGradients, Update, require_grads
from mtlvision.balancers.registry import BALANCERS
from mtlvision.balancers.weighting._common import LearnableTaskParameter, checked_losses
from mtlvision.errors import ConfigError


@BALANCERS.register(
    "gradnorm",
    "GradNorm: learn task weights so that weighted gradient norms follow each task's training rate.",
    "Chen et al., ICML 2018",
)
class GradNorm(LearnableTaskParameter):
    """Chen et al. (2018). Learnable weights ``w`` (initialised to 1, renormalised to sum to ``T`` before
    every use) minimise ``Σ_t |w_t·‖g_t‖ − Ḡ·r_t^α|`` where ``g_t`` is task t's gradient, ``Ḡ`` the mean of
    ``w_t·‖g_t‖``, ``r_t = L̃_t / mean(L̃)`` the relative inverse training rate, ``L̃_t = L_t / L_t(0)``; the
    target ``Ḡ·r_t^α`` is a constant (paper, Sec. 3). ``α = 1.5`` is the paper's NYUv2 setting.

    The norms ``‖g_t‖ = √K_tt`` come from the Gramian (``Needs.GRAMIAN``): of the shared parameters, or of the
    shared representation in representation mode, which is the cheap stand-in for the paper's "last shared
    layer" (the balancer knows no model, so it cannot pick that layer). Weights are kept at least 1e-8 before
    renormalising, since the paper's update can step a weight below zero, where GradNorm is undefined.
    """

    needs: ClassVar[Needs] = Needs.GRAMIAN
    initial_value: ClassVar[float] = 1.0
    _state_names: ClassVar[tuple[str, ...]] = ("initial_losses",)

    def __init__(self, alpha: float = 1.5, num_tasks: int | None = None) -> None:
        if alpha < 0:
            raise ConfigError(f"balancer.alpha must be non-negative, got {alpha}")
        super().__init__(num_tasks)
        self.alpha = float(alpha)
        self.initial_losses: Tensor | None = None

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        weights = self.parameter_for(losses)
        num_tasks = losses.numel()
        with torch.no_grad():
            weights.clamp_(min=1e-8).mul_(num_tasks / weights.sum())
        values = checked_losses(self, losses, strict=self.initial_losses is None)
        if self.initial_losses is None:
            self.initial_losses = values.cpu()
        norms = require_grads(self, grads).gramian().diagonal().clamp(min=0).sqrt().to(weights.device, weights.dtype)
        training_rate = values / self.initial_losses.to(values.device)
        inverse_rate = (training_rate / training_rate.mean()).to(weights.device, weights.dtype)
        weighted_norms = weights * norms
        target = (weighted_norms.mean() * inverse_rate**self.alpha).detach()
        extra = (weighted_norms - target).abs().sum()
        return Update(weights=weights.detach().to(losses.dtype), extra_loss=extra)
