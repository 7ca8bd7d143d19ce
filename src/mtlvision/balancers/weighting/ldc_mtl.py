"""LDC-MTL: loss discrepancy control, a penalised single-level form of bilevel loss balancing."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mtlvision.balancers.base import TaskGradients, Update
from mtlvision.balancers.registry import BALANCERS
from mtlvision.balancers.weighting._common import LearnableTaskParameter, checked_losses
from mtlvision.errors import ConfigError


def discrepancy_objective(weights: Tensor, losses: Tensor, lamb: float) -> Tensor:
    """``Σ_t w_t ℓ_t / Σ_t w_t + λ Σ_t |w_t ℓ_t − w_{t+1} ℓ_{t+1}|`` for normalised losses ``ℓ``."""
    weighted = weights * losses
    return weighted.sum() / weights.sum() + lamb * (weighted[:-1] - weighted[1:]).abs().sum()


@BALANCERS.register(
    "ldc_mtl",
    "LDC-MTL: router weights learnt to shrink the gaps between consecutive weighted, normalised losses; "
    "O(1) extra cost per step.",
    "Xiao et al., LDC-MTL: Balancing Multi-Task Learning through Scalable Loss Discrepancy Control, 2025 "
    "(arXiv:2502.08585)",
)
class LDCMTL(LearnableTaskParameter):
    """Xiao et al. (2025), as in the authors' code (``experiments/*/trainer.py``). The losses are first
    normalised by their values at the first step, ``ℓ_t = L_t / r_t`` with ``r_t = L_t⁰ / min_s L_s⁰`` (so a
    zero first loss is an error; ``normalise=False`` skips it, as the CelebA code does); router
    weights ``w = clamp(softmax(ξ), min_weight, max_weight)`` then enter the single-level objective
    ``Σ_t w_t ℓ_t / Σ_t w_t + λ Σ_t |w_t ℓ_t − w_{t+1} ℓ_{t+1}|`` (:func:`discrepancy_objective`), the
    penalised form of the bilevel problem "keep the weighted losses level while minimising them". The model
    follows its gradient, a weighted sum of the task gradients (the recorded weights are those
    coefficients, ``∂/∂L_t``); the router logits ``ξ`` follow its gradient in ``ξ`` with the losses held
    fixed, through the model's optimiser, as the code trains its router with the model. Only losses are read:
    O(1) time and memory per step. The penalty pairs tasks in their configured order, as the paper does.

    ``lamb = λ = 0.05`` is the code's NYUv2 and QM9 setting (Cityscapes 0.1, CelebA 0.01). The router's input
    differs: a balancer sees only the losses, so ours has none (learnable logits, initialised to 0); the
    code's CelebA router is likewise a free vector (through a sigmoid), its NYUv2 and Cityscapes router a
    linear layer on pooled decoder features, clamped to ``[0.2, 0.8]`` (``min_weight=0.2 max_weight=0.8``
    here; the default does not clamp). Bounds that would clamp every weight at the uniform start leave the
    router nothing to learn and are refused.
    """

    _state_names: ClassVar[tuple[str, ...]] = ("ratios",)

    def __init__(
        self,
        lamb: float = 0.05,
        normalise: bool = True,
        min_weight: float = 0.0,
        max_weight: float = 1.0,
        num_tasks: int | None = None,
    ) -> None:
        if not lamb >= 0 or not 0.0 <= min_weight < max_weight <= 1.0:
            raise ConfigError(
                f"LDC-MTL needs lamb >= 0 and 0 <= min_weight < max_weight <= 1; got lamb={lamb}, "
                f"min_weight={min_weight}, max_weight={max_weight}"
            )
        super().__init__()
        self.lamb, self.normalise = float(lamb), bool(normalise)
        self.min_weight, self.max_weight = float(min_weight), float(max_weight)
        self.ratios: Tensor | None = None
        if num_tasks is not None:
            self.setup(num_tasks)

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        if not self.min_weight <= 1.0 / num_tasks <= self.max_weight:
            raise ConfigError(
                f"LDC-MTL: with {num_tasks} tasks the router starts at weights 1/{num_tasks} = {1 / num_tasks:.3g}, "
                f"outside [min_weight, max_weight] = [{self.min_weight:g}, {self.max_weight:g}]: every weight "
                "would be clamped and the router would learn nothing"
            )

    def router_weights(self, logits: Tensor) -> Tensor:
        """``clamp(softmax(ξ), min_weight, max_weight)``."""
        return torch.softmax(logits, dim=0).clamp(self.min_weight, self.max_weight)

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        logits = self.parameter_for(losses)
        if self.ratios is None:
            if self.normalise:  # the normalisation divides by the first losses
                first = checked_losses(self, losses)
                self.ratios = (first / first.min()).cpu()
            else:
                self.ratios = torch.ones(losses.numel(), dtype=torch.float64)
        if self.ratios.numel() != losses.numel():
            raise ConfigError(f"LDC-MTL has loss ratios for {self.ratios.numel()} tasks but got {losses.numel()}")
        ratios = self.ratios.to(losses.device)
        normalised = checked_losses(self, losses, strict=False) / ratios
        weights = self.router_weights(logits)
        fixed = weights.detach().double()
        # ∂/∂ℓ_t of the objective: w_t/Σw + λ w_t (s_t − s_{t−1}), s_t = sign(w_t ℓ_t − w_{t+1} ℓ_{t+1})
        signs = torch.sign(fixed[:-1] * normalised[:-1] - fixed[1:] * normalised[1:])
        zero = signs.new_zeros(1)
        slope = fixed / fixed.sum() + self.lamb * fixed * (torch.cat([signs, zero]) - torch.cat([zero, signs]))
        router_loss = discrepancy_objective(weights, normalised.to(weights.dtype), self.lamb)
        return Update(weights=(slope / ratios).to(device=losses.device, dtype=losses.dtype), extra_loss=router_loss)
