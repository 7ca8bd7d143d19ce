"""CR-MOGM: a moving average of another Gramian method's task weights (Zhou et al., NeurIPS 2022)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from mtlvision.balancers.base import ExtraStateMixin, Needs, TaskGradients, Update
from mtlvision.balancers.gradient._base import GradientBalancer, GramianBalancer
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError


@BALANCERS.register(
    "cr_mogm",
    "CR-MOGM: exponential moving average of a Gramian method's task weights (default UPGrad's) across steps.",
    "Zhou et al., On the Convergence of Stochastic Multi-Objective Gradient Manipulation and Beyond, NeurIPS 2022",
)
class CRMOGM(ExtraStateMixin, GradientBalancer):
    """CR-MOGM (Zhou et al. 2022, Algorithm 2), as torchjd's ``CRMOGMWeighting``: with ``λ̂_k`` the weights the
    wrapped method (``base``, any method whose update is ``Σ_t w_t g_t``, built with ``base_hparams``) gives at
    step ``k``, the update is ``Σ_t λ_k,t g_t`` with ``λ_k = α λ_{k−1} + (1 − α) λ̂_k`` and ``λ_0 = λ̂_1`` (so
    the first step is the wrapped method's). ``alpha = 0`` is the wrapped method, ``alpha = 1`` freezes the
    first weights; the paper's Corollary 1 lets ``α_k`` grow towards 1 as the learning rate decays, torchjd
    and we keep it fixed (default 0.9). The smoothed weights travel in checkpoints.
    """

    needs: ClassVar[Needs] = Needs.GRAMIAN
    _state_names: ClassVar[tuple[str, ...]] = ("smoothed",)

    def __init__(self, base: str = "upgrad", alpha: float = 0.9, base_hparams: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"balancer.alpha must lie in [0, 1], got {alpha}")
        cls = BALANCERS.get(base)
        if not (isinstance(cls, type) and issubclass(cls, GramianBalancer)):
            raise ConfigError(
                f"balancer.base={base!r}: CR-MOGM smooths the task weights of a method whose update is a weighted "
                "sum of the task gradients computed from their Gramian (upgrad, dualproj, mgda, imtl_g, nash_mtl, "
                "...)"
            )
        try:
            self.base: GramianBalancer = cls(**(base_hparams or {}))
        except TypeError as exc:
            raise ConfigError(f"balancer.base_hparams for {base!r}: {exc}") from None
        self.alpha = float(alpha)
        self.smoothed: Tensor | None = None

    def setup(self, num_tasks: int) -> None:
        self.base.setup(num_tasks)

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        update = self.base.balance(losses, grads)
        if update.direction is not None or update.shared_weights is not None:
            raise ConfigError(f"CR-MOGM: {type(self.base).__name__} did not answer with task weights alone")
        current = update.weights.detach().to("cpu", torch.float64)
        if self.smoothed is not None and self.smoothed.shape != current.shape:
            raise ConfigError(f"CR-MOGM has weights for {self.smoothed.numel()} tasks but got {current.numel()}")
        previous = current if self.smoothed is None else self.smoothed
        self.smoothed = self.alpha * previous + (1.0 - self.alpha) * current
        return Update(weights=self.smoothed.to(device=losses.device, dtype=losses.dtype))
