"""DSelect-k: differentiable top-k expert selection (Hazimeh et al., NeurIPS 2021)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor, nn

from mtlvision.errors import ConfigError
from mtlvision.models.architectures._gates import ExpertLayout, GatedExpertsSpec, GateFactory
from mtlvision.models.architectures.registry import ARCHITECTURES


def smooth_step(x: Tensor, gamma: float) -> Tensor:
    """0 below -gamma/2, 1 above gamma/2, the cubic -2x³/gamma³ + 3x/(2 gamma) + 1/2 in between (C¹)."""
    cubic = -2.0 / gamma**3 * x**3 + 3.0 / (2.0 * gamma) * x + 0.5
    return torch.where(x <= -gamma / 2, torch.zeros_like(x), torch.where(x >= gamma / 2, torch.ones_like(x), cubic))


def binary_codes(bits: int) -> Tensor:
    """[2**bits, bits] bool: row i is the binary encoding of i."""
    powers = 2 ** torch.arange(bits)
    return (torch.arange(2**bits).unsqueeze(1) // powers) % 2 == 1


class DSelectKGate(nn.Module):
    """Example-conditioned DSelect-k gate: k single-expert selectors mixed by a softmax.

    Selector ``i`` turns ``m = ceil(log2 E)`` logits into a distribution over the ``2**m`` binary codes:
    code ``j`` gets the product over bits of ``S(z_b)`` where bit ``b`` of ``j`` is 1 and ``1 - S(z_b)``
    where it is 0, ``S`` the smooth-step. Once every ``S(z_b)`` reaches 0 or 1 a selector picks exactly one
    code, so the gate uses at most k experts. When E is not a power of two some codes name no expert; the
    paper adds a loss term that keeps weight off them, we fold code ``j >= E`` onto expert ``j - E``
    instead, so the weights always sum to one without a loss the trainer must know about (no change for
    powers of two). Initialisation follows the reference: selector logits uniform in ±gamma/100, so
    every expert starts with nearly equal weight.
    """

    codes: Tensor  # buffers
    fold: Tensor

    def __init__(self, in_features: int, num_experts: int, k: int, gamma: float) -> None:
        super().__init__()
        self.k, self.gamma = k, gamma
        bits = max(1, math.ceil(math.log2(num_experts)))
        self.register_buffer("codes", binary_codes(bits), persistent=False)
        fold = torch.zeros(2**bits, num_experts)
        fold[torch.arange(2**bits), torch.arange(2**bits) % num_experts] = 1.0
        self.register_buffer("fold", fold, persistent=False)
        self.selector_logits = nn.Linear(in_features, k * bits)
        self.selector_weights = nn.Linear(in_features, k)
        nn.init.uniform_(self.selector_logits.weight, -gamma / 100, gamma / 100)
        nn.init.uniform_(self.selector_logits.bias, -gamma / 100, gamma / 100)
        nn.init.uniform_(self.selector_weights.weight, -0.05, 0.05)
        nn.init.uniform_(self.selector_weights.bias, -0.05, 0.05)

    def selectors(self, x: Tensor) -> Tensor:
        """[B, k, E]: each single-expert selector's distribution over the experts."""
        steps = smooth_step(self.selector_logits(x).view(x.shape[0], self.k, 1, -1), self.gamma)
        per_code = torch.where(self.codes, steps, 1 - steps).prod(dim=-1)
        return per_code @ self.fold

    def forward(self, x: Tensor) -> Tensor:
        return (self.selector_weights(x).softmax(dim=-1).unsqueeze(-1) * self.selectors(x)).sum(dim=1)


@ARCHITECTURES.register(
    "dselect_k",
    "MMoE with DSelect-k gates: differentiable selection of at most k experts per task",
    "Hazimeh et al., DSelect-k: Differentiable Selection in the Mixture of Experts, NeurIPS 2021",
)
@dataclass(frozen=True, repr=False)
class DSelectK(GatedExpertsSpec):
    """MMoE with DSelect-k gates: each task's gate converges to a mixture of at most ``k`` experts.

    Experts are copies of the backbone's stages after the first ``shared_stages``, gated per task and
    stage as in MMoE. ``gamma`` is the smooth-step width (1.0 in the reference implementation). The
    paper's optional entropy regulariser, which speeds up convergence to k experts, is not offered: the
    trainer has no hook for architecture-specific losses.
    """

    name: ClassVar[str] = "dselect_k"
    minimums: ClassVar[dict[str, int]] = {"num_experts": 2, "k": 1}
    num_experts: int = 4
    k: int = 2
    gamma: float = 1.0

    def check(self) -> None:
        if self.k > self.num_experts:
            raise ConfigError(f"architecture 'dselect_k': k={self.k} must not exceed num_experts={self.num_experts}.")
        if not self.gamma > 0:
            raise ConfigError(f"architecture 'dselect_k': gamma={self.gamma!r} must be positive.")

    def layout(self) -> ExpertLayout:
        return ExpertLayout(num_levels=1, task_experts=0, shared_experts=self.num_experts)

    def gate_factory(self) -> GateFactory:
        return partial(DSelectKGate, k=self.k, gamma=self.gamma)
