"""Uncertainty weighting (UW) and its IMTL-L relative: one learnable scale per task."""

from __future__ import annotations

from torch import Tensor

from mtlvision.balancers.base import TaskGradients, Update
from mtlvision.balancers.registry import BALANCERS
from mtlvision.balancers.weighting._common import LearnableTaskParameter


@BALANCERS.register(
    "uw",
    "Uncertainty weighting: learnable homoscedastic log-variances scale each task's loss.",
    "Kendall, Gal & Cipolla, CVPR 2018",
)
class UncertaintyWeighting(LearnableTaskParameter):
    """Kendall et al. (2018): minimise ``Σ_t ½·exp(-s_t)·L_t + ½·s_t`` jointly over the model and the
    log-variances ``s_t = log σ_t²`` (initialised to 0).

    The paper's regression form is used for every task (its classification form drops the ½ in front of
    ``exp(-s_t)``), as in the authors' follow-up work and common re-implementations. For a fixed loss the
    optimum is ``s_t = log L_t``. The model receives the gradient of ``Σ_t w_t L_t`` with
    ``w_t = ½·exp(-s_t)``; ``s`` learns through ``Update.extra_loss``.
    """

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        s = self.parameter_for(losses)
        scale = 0.5 * (-s).exp()
        extra = (scale * losses.detach().to(s.dtype) + 0.5 * s).sum()
        return Update(weights=scale.detach().to(losses.dtype), extra_loss=extra)


@BALANCERS.register(
    "imtl_l",
    "IMTL-L: learnable loss scales that drive every scaled loss to the same value.",
    "Liu et al., ICLR 2021 (Towards Impartial Multi-task Learning)",
)
class IMTLL(LearnableTaskParameter):
    """Loss-balanced part of IMTL (Liu et al., 2021): minimise ``Σ_t exp(s_t)·L_t − s_t`` over the model and
    ``s`` (initialised to 0). At the optimum over ``s`` every scaled loss ``exp(s_t)·L_t`` equals 1; the model
    receives the gradient of ``Σ_t exp(s_t)·L_t``.
    """

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        s = self.parameter_for(losses)
        scale = s.exp()
        extra = (scale * losses.detach().to(s.dtype) - s).sum()
        return Update(weights=scale.detach().to(losses.dtype), extra_loss=extra)
