"""Dual-Balancing Multi-Task Learning."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mtlvision.balancers.base import Needs, TaskGradients, Update, jacobian_shaped_state, require_grads
from mtlvision.balancers.registry import BALANCERS
from mtlvision.balancers.weighting._common import (
    LossWeighting,
    WeightingError,
    checked_losses,
)
from mtlvision.errors import ConfigError


@BALANCERS.register(
    "db_mtl",
    "DB-MTL: log-transformed losses, and task gradients rescaled to the largest gradient norm.",
    "Lin et al., 2023 (Dual-Balancing for Multi-Task Learning)",
)
class DBMTL(LossWeighting):
    """Lin et al. (2023). Loss-scale balancing: every loss enters as ``log(L_t + ε)``, whose gradient is
    ``g_t / (L_t + ε)``. Gradient-magnitude balancing: an exponential moving average
    ``ĝ_t ← β_k·ĝ_t + (1 − β_k)·g_t/(L_t + ε)`` with ``β_k = β / k^σ`` at step k (ĝ starts at 0), then the
    shared parameters move along ``Σ_t (max_s ‖ĝ_s‖ / ‖ĝ_t‖)·ĝ_t``. Defaults ``β = 0.9``, ``σ = 0``,
    ``ε = 1e-8`` as in the authors' LibMTL code. The task-specific parameters follow ``Σ_t log(L_t + ε)``, so
    the recorded weights are ``1 / (L_t + ε)``. Needs the shared-parameter Jacobian; the moving average is over
    parameters, so representation mode (whose rows change with every batch) is not supported.
    """

    needs: ClassVar[Needs] = Needs.JACOBIAN
    supports_representation: ClassVar[bool] = False
    _state_names: ClassVar[tuple[str, ...]] = ("step", "grad_average")

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8) -> None:
        super().__init__()
        if not 0 <= beta < 1 or beta_sigma < 0:
            raise ConfigError(f"DB-MTL needs 0 <= beta < 1 and beta_sigma >= 0; got {beta}, {beta_sigma}")
        self.beta, self.beta_sigma, self.eps = float(beta), float(beta_sigma), float(eps)
        self.step = 0
        self.grad_average: Tensor | None = None

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        grads = require_grads(self, grads)
        scale = 1.0 / (checked_losses(self, losses, strict=False) + self.eps)
        shape = (grads.num_tasks, grads.num_columns)
        if self.grad_average is not None and tuple(self.grad_average.shape) != shape:
            raise ConfigError(
                f"DB-MTL's gradient average has shape {tuple(self.grad_average.shape)} but this step's "
                f"Jacobian has {shape}"
            )
        self.step += 1
        beta = self.beta / self.step**self.beta_sigma
        average: Tensor | None = None
        # The moving average is updated block by block, in place: no [T, P] temporary beside the state.
        for columns, block in grads.jacobian_blocks(release=True):
            if average is None:
                average = jacobian_shaped_state(self.grad_average, shape, block)
                coefficient = ((1 - beta) * scale).to(block.device, block.dtype)[:, None]
            average[:, columns].mul_(beta).addcmul_(block, coefficient)
        assert average is not None
        self.grad_average = average
        norms = average.norm(dim=1)
        if not (norms > 0).all():
            zero = torch.nonzero(norms <= 0).flatten().tolist()
            raise WeightingError(
                f"DB-MTL rescales each task's gradient to the largest norm; task(s) {zero} have a zero gradient"
            )
        direction = (norms.max() / norms) @ average
        return Update(weights=scale.to(device=losses.device, dtype=losses.dtype), direction=direction)
