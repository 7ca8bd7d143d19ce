"""IMTL: impartial multi-task learning, gradient part and the hybrid with learned loss scales (Liu et al. 2021)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from mtlvision.balancers.base import Needs, TaskGradients, Update, require_grads
from mtlvision.balancers.gradient._base import GradientBalancer, GramianBalancer
from mtlvision.balancers.gradient._solvers import gradient_norms, nonzero_tasks, pinv_psd, scaled, to_numpy_gramian
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError

CITATION = "Liu et al., Towards Impartial Multi-task Learning, ICLR 2021"


def imtl_g_weights(gramian: np.ndarray) -> np.ndarray:
    """IMTL-G weights: ``α`` summing to one with equal projections ``dᵀu_t`` of ``d = Σ α_t g_t`` on every
    unit gradient ``u_t``.

    Equal projections mean ``Kα = s·n`` (``n_t = ‖g_t‖``). With ``N = diag(n)``, ``K = N K̃ N`` for the
    Gramian ``K̃`` of the unit gradients, so ``β = Nα`` solves ``K̃β = s·1``: ``α = N⁻¹K̃⁺1 / 1ᵀN⁻¹K̃⁺1``.
    With ``K`` invertible this is exactly ``K⁻¹n / 1ᵀK⁻¹n``, the paper's closed form
    ``α_{2:T} = g_1 Uᵀ(DUᵀ)⁻¹``; solving with ``K̃`` (ones on its diagonal) instead of ``K`` makes the solve
    blind to the gradients' sizes, so one task's gradient 10⁻⁴ of another's costs no accuracy. The
    pseudo-inverse extends it to linearly dependent gradients (as torchjd's ``K⁺n`` does; the two coincide
    whenever equal projections are attainable, and otherwise both are least-squares solutions, ours in the
    unit gradients' metric). Its eigenvalues are cut relative to the Gramian's own precision and scale
    (:func:`~._solvers.pinv_psd`): float64's round-off for a float64 Gramian, float32's for a float32 one.
    Tasks with a zero gradient have no unit gradient and get weight 0; all weights are 0 when ``1ᵀN⁻¹K̃⁺1``
    vanishes (e.g. all gradients 0).
    """
    gramian, _ = scaled(gramian)
    t = gramian.shape[0]
    active = nonzero_tasks(gramian)
    v = np.zeros(t)
    if not active.any():
        return v
    norms = gradient_norms(gramian)[active]
    unit = gramian[np.ix_(active, active)] / norms[:, None] / norms[None, :]
    v[active] = (pinv_psd(unit) @ np.ones(len(norms))) / norms
    total = v.sum()
    if not np.isfinite(total) or abs(total) <= 1e-12 * np.abs(v).sum(initial=0.0) or total == 0.0:
        return np.zeros(t)
    return np.asarray(v / total)


@BALANCERS.register("imtl_g", "IMTL-G: the update with equal projections on every task's unit gradient.", CITATION)
class IMTLG(GramianBalancer):
    """IMTL-G (Liu et al. 2021, Sec. 3.2): see :func:`imtl_g_weights`. The paper applies it to the
    gradients of the shared representation, so representation mode is supported."""

    supports_representation: ClassVar[bool] = True

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        return imtl_g_weights(gramian)


@BALANCERS.register(
    "imtl",
    "IMTL (hybrid): learned loss scales (IMTL-L) with IMTL-G on the shared parameters.",
    CITATION,
)
class IMTL(GradientBalancer):
    """IMTL hybrid (Liu et al. 2021, Algorithm 1).

    Each task's loss is scaled as ``e^{s_t} L_t − s_t`` with a learnable ``s_t`` (IMTL-L). Task-specific
    parameters follow their scaled loss, ``e^{s_t}∇L_t``; the scales minimise ``Σ e^{s_t}L_t − s_t``
    (``extra_loss``, on the detached losses); the shared parameters move along IMTL-G of the scaled
    gradients ``e^{s_t} g_t``, whose weights ``α`` depend on ``K`` only. Since the shared and task-specific
    parameters see different weights, the shared update is returned as ``shared_weights = α_t e^{s_t}``;
    ``weights`` are the scales ``e^{s_t}``.

    The scales are parameters for the optimiser: they are created by :meth:`setup` (called by the trainer
    before it builds the optimiser) or by passing ``num_tasks``.
    """

    needs: ClassVar[Needs] = Needs.GRAMIAN
    supports_representation: ClassVar[bool] = True

    def __init__(self, num_tasks: int | None = None) -> None:
        super().__init__()
        self.log_scales: nn.Parameter | None = None
        if num_tasks is not None:
            self.setup(num_tasks)

    def setup(self, num_tasks: int) -> None:
        if num_tasks < 1:
            raise ConfigError(f"IMTL: the number of tasks must be positive, got {num_tasks}")
        if self.log_scales is None:
            self.log_scales = nn.Parameter(torch.zeros(num_tasks))
        elif self.log_scales.numel() != num_tasks:
            raise ConfigError(f"IMTL was set up for {self.log_scales.numel()} tasks but is given {num_tasks}")

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        grads = require_grads(self, grads)
        if self.log_scales is None:
            raise ConfigError(
                "IMTL learns one loss scale per task: call balancer.setup(num_tasks) before building the "
                "optimiser (or pass num_tasks=...)"
            )
        if losses.numel() != self.log_scales.numel():
            raise ConfigError(f"IMTL was set up for {self.log_scales.numel()} tasks but got {losses.numel()} losses")
        scales = self.log_scales.detach().exp().to(losses.device)
        scales_np = scales.cpu().double().numpy()
        scaled_gramian = to_numpy_gramian(grads.gramian()) * np.outer(scales_np, scales_np)
        alpha = torch.as_tensor(imtl_g_weights(scaled_gramian) * scales_np, device=scales.device)  # float64
        extra = (self.log_scales.exp() * losses.detach().to(self.log_scales.device) - self.log_scales).sum()
        return Update(weights=scales.to(losses.dtype), shared_weights=alpha, extra_loss=extra)
