"""Geometric loss strategy."""

from __future__ import annotations

from torch import Tensor

from mtlvision.balancers.base import TaskGradients, Update
from mtlvision.balancers.registry import BALANCERS
from mtlvision.balancers.weighting._common import LossWeighting, checked_losses


@BALANCERS.register(
    "gls",
    "Geometric loss strategy: minimise the geometric mean of the task losses.",
    "Chennupati et al., CVPR Workshops 2019 (MultiNet++)",
)
class GLS(LossWeighting):
    """Chennupati et al. (2019): minimise ``(Π_t L_t)^(1/T)``. Its gradient is ``Σ_t w_t ∇L_t`` with
    ``w_t = GM / (T·L_t)``, computed in log space so that losses from 1e-10 to 1e15 stay finite. Undefined
    for a zero or negative loss (a clear error).
    """

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        log_losses = checked_losses(self, losses).log()
        weights = (log_losses.mean() - log_losses).exp() / losses.numel()
        return Update(weights=weights.to(device=losses.device, dtype=losses.dtype))
