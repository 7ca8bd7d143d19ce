"""Auto-Lambda: task weights meta-learnt on validation data after a virtual step (Liu, Davison & Johns 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlvision.balancers.bilevel._base import BilevelBalancer, BilevelProblem, flat, gradients, moved
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError


@BALANCERS.register(
    "auto_lambda",
    "Auto-Lambda: task weights follow the validation loss after a virtual SGD step (finite-difference meta-gradient).",
    "Liu, Davison & Johns, Auto-Lambda: Disentangling Dynamic Task Relationships, TMLR 2022",
)
class AutoLambda(BilevelBalancer):
    """Auto-Lambda (Liu et al. 2022, Sec. 3), as LibMTL runs it (``bacth_forward_AutoLambda``, from the
    authors' code). With weights ``w = softmax(ξ)``, the training batch's losses ``L`` and a validation batch's
    ``V``, each step first takes a virtual SGD step ``θ' = θ − α ∇_θ Σ_t w_t L_t(θ)`` (``α`` the optimiser's
    current learning rate), then ``d = ∇_θ' Σ_t V_t(θ')``, and moves ``ξ`` with Adam (``outer_lr``, default
    1e-3) along the second-order term of ``∇_ξ Σ_t V_t(θ')``, by central differences (DARTS' approximation):
    ``−α J_softmax(ξ)ᵀ [L(θ + εd) − L(θ − εd)] / (2ε)`` with ``ε = 0.01/‖d‖``. The training step then weights
    the losses by the new ``w``. Every task is a primary task (the paper's multi-task setting). LibMTL and the
    authors take the outer batch from training data (a second batch); here it is a validation-split batch.
    The virtual step is plain SGD (the authors' code adds the momentum and weight-decay terms of an SGD
    optimiser). Extra cost per step: three forward passes and two backward passes of the model.
    """

    def __init__(self, outer_lr: float = 1e-3, fd_scale: float = 0.01) -> None:
        super().__init__(outer_lr)
        if not fd_scale > 0:
            raise ConfigError(f"balancer.fd_scale must be > 0, got {fd_scale}")
        self.fd_scale = float(fd_scale)

    def meta_gradient(self, problem: BilevelProblem) -> Tensor:
        params, lr = problem.parameters, problem.lr
        train = problem.train_losses(params)
        step = gradients((self.task_weights().to(train) * train).sum(), params)
        virtual = moved(params, step, -lr)
        direction = gradients(problem.val_losses(virtual).sum(), virtual)
        norm = float(flat(direction).norm())
        if norm == 0.0:  # the validation loss is flat after the virtual step: nothing to learn from
            return torch.zeros_like(self.task_weights())
        eps = self.fd_scale / norm
        with torch.no_grad():
            plus = problem.train_losses(moved(params, direction, eps)).double().cpu()
            minus = problem.train_losses(moved(params, direction, -eps)).double().cpu()
        return -lr * self.softmax_jacobian().T @ ((plus - minus) / (2.0 * eps))
