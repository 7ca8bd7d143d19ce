"""Smooth Tchebycheff scalarisation."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mtlvision.balancers.base import TaskGradients, Update
from mtlvision.balancers.registry import BALANCERS
from mtlvision.balancers.weighting._common import LossWeighting, WeightingError, checked_losses
from mtlvision.errors import ConfigError


@BALANCERS.register(
    "stch",
    "Smooth Tchebycheff: a log-sum-exp smoothing of the worst normalised log loss.",
    "Lin et al., ICML 2024 (Smooth Tchebycheff Scalarization for Multi-Objective Optimization)",
)
class STCH(LossWeighting):
    """Lin et al. (2024): minimise ``T·μ·log Σ_t exp(ℓ_t / μ)`` (the paper's smooth Tchebycheff function
    with uniform preference) over the normalised log losses ``ℓ_t = log(L_t / n_t + ε)``, whose ideal point is
    0. As in the authors' multi-task code, the nadir point ``n`` is each task's mean loss over epoch
    ``warmup_epochs`` and the first ``warmup_epochs + 1`` epochs minimise ``Σ_t log(L_t + ε)``. Defaults
    ``μ = 1``, ``warmup_epochs = 4``, ``ε = 1e-20`` (authors' configuration). Epochs are counted by
    :meth:`on_epoch_end`. Effective weights: ``T·softmax(ℓ/μ)_t / (L_t + ε·n_t)``; during warm-up
    ``1 / (L_t + ε)``.
    """

    _state_names: ClassVar[tuple[str, ...]] = ("epoch", "loss_sum", "loss_count", "nadir")

    def __init__(self, mu: float = 1.0, warmup_epochs: int = 4, eps: float = 1e-20) -> None:
        super().__init__()
        if not mu > 0 or warmup_epochs < 0:
            raise ConfigError(f"STCH needs mu > 0 and warmup_epochs >= 0; got mu={mu}, warmup_epochs={warmup_epochs}")
        self.mu, self.warmup_epochs, self.eps = float(mu), int(warmup_epochs), float(eps)
        self.epoch = 0
        self.loss_sum: Tensor | None = None
        self.loss_count = 0
        self.nadir: Tensor | None = None

    def on_epoch_end(self, mean_losses: Tensor) -> None:
        self.epoch += 1

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        values = checked_losses(self, losses, strict=False).cpu()
        if self.epoch <= self.warmup_epochs:
            if self.epoch == self.warmup_epochs:
                self.loss_sum = values if self.loss_sum is None else self.loss_sum + values
                self.loss_count += 1
            weights = 1.0 / (values + self.eps)
        else:
            if self.nadir is None:
                if self.loss_sum is None:
                    raise WeightingError(
                        f"STCH takes its nadir point from epoch {self.warmup_epochs}, which saw no training step"
                    )
                nadir = self.loss_sum / self.loss_count
                if not (nadir > 0).all():
                    raise WeightingError(
                        f"STCH normalises each loss by its mean over epoch {self.warmup_epochs}, which is zero for "
                        f"task(s) {torch.nonzero(nadir <= 0).flatten().tolist()}"
                    )
                self.nadir = nadir
            normalised = (values / self.nadir + self.eps).log()
            weights = losses.numel() * torch.softmax(normalised / self.mu, dim=0) / (values + self.eps * self.nadir)
        return Update(weights=weights.to(device=losses.device, dtype=losses.dtype))
