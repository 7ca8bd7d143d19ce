"""Excess-risk weighting."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mtlvision.balancers.base import Needs, TaskGradients, Update, jacobian_shaped_state, require_grads
from mtlvision.balancers.registry import BALANCERS
from mtlvision.balancers.weighting._common import LossWeighting, WeightingError
from mtlvision.errors import ConfigError


@BALANCERS.register(
    "excess_mtl",
    "ExcessMTL: weights grow with each task's estimated excess risk (distance to its optimum).",
    "He et al., ICML 2024 (Robust Multi-Task Learning with Excess Risks)",
)
class ExcessMTL(LossWeighting):
    """He et al. (2024). Each task's excess risk is estimated with a diagonal (AdaGrad) Hessian
    approximation: ``e_t = g_tᵀ diag(√(Σ_{s≤k} g_{t,s}² + ε))⁻¹ g_t``, normalised by its value at the first
    step; the weights follow exponentiated gradient ascent ``w_t ← w_t·exp(η·e_t / e_t(1))``, renormalised to
    sum to ``T`` (``w = 1`` at the first step). Defaults ``η = 1e-2``, ``ε = 1e-7`` (authors' code). Needs the
    shared-parameter Jacobian; the AdaGrad sums are over parameters, so representation mode is not supported.
    """

    needs: ClassVar[Needs] = Needs.JACOBIAN
    supports_representation: ClassVar[bool] = False
    _state_names: ClassVar[tuple[str, ...]] = ("task_weights", "grad_square_sum", "initial_risk")

    def __init__(self, step_size: float = 1e-2, eps: float = 1e-7) -> None:
        super().__init__()
        if not step_size > 0 or not eps > 0:
            raise ConfigError(f"ExcessMTL needs step_size > 0 and eps > 0; got {step_size}, {eps}")
        self.step_size, self.eps = float(step_size), float(eps)
        self.task_weights: Tensor | None = None
        self.grad_square_sum: Tensor | None = None
        self.initial_risk: Tensor | None = None

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        grads = require_grads(self, grads)
        shape = (grads.num_tasks, grads.num_columns)
        if self.grad_square_sum is not None and tuple(self.grad_square_sum.shape) != shape:
            raise ConfigError(
                f"ExcessMTL's AdaGrad state has shape {tuple(self.grad_square_sum.shape)} but this step's Jacobian "
                f"has {shape}"
            )
        if self.task_weights is None:
            self.task_weights = torch.ones(losses.numel(), dtype=torch.float64)
        square_sum: Tensor | None = None
        risk: Tensor | None = None
        # AdaGrad sums and the risk estimate block by block, in place: no [T, P] temporary beside the state
        # (the weighted update needs this step's Jacobian afterwards, so the blocks are kept).
        for columns, block in grads.jacobian_blocks():
            if square_sum is None or risk is None:
                square_sum = jacobian_shaped_state(self.grad_square_sum, shape, block)
                risk = torch.zeros(shape[0], dtype=torch.float64, device=block.device)
            block_sum = square_sum[:, columns]
            block_sum.addcmul_(block, block)
            scaled = (block_sum + self.eps).rsqrt_().mul_(block).mul_(block)  # g² / √(Σg² + ε), one temporary
            risk += scaled.sum(dim=1).double()
            del scaled
        assert square_sum is not None and risk is not None
        self.grad_square_sum = square_sum
        risk = risk.cpu()
        assert self.task_weights is not None
        if self.initial_risk is None:
            if not (risk > 0).all():
                zero = torch.nonzero(risk <= 0).flatten().tolist()
                raise WeightingError(
                    f"ExcessMTL normalises each task's excess risk by its first value; task(s) {zero} start "
                    "with a zero gradient"
                )
            self.initial_risk = risk
        else:
            weights = self.task_weights * torch.exp(self.step_size * risk / self.initial_risk)
            self.task_weights = losses.numel() * weights / weights.sum()
        return Update(weights=self.task_weights.to(device=losses.device, dtype=losses.dtype))
