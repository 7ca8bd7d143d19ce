"""Byzantine-robust aggregators, as torchjd ships them: Krum (Blanchard et al. 2017) and the coordinate-wise
trimmed mean (Yin et al. 2018). Both were designed to combine the gradients of workers some of which may be
adversarial; applied to task gradients they discard the gradients that lie far from the others."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from mtlvision.balancers.base import Needs, TaskGradients, Update, require_grads
from mtlvision.balancers.gradient._base import GradientBalancer, GramianBalancer
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError


def check_task_count(balancer: GradientBalancer, t: int, rule: str) -> None:
    """Refuse ``t`` tasks when ``balancer`` needs more (``rule`` says why), naming the method."""
    if t < balancer.min_tasks():
        raise ConfigError(f"{type(balancer).__name__} needs at least {balancer.min_tasks()} tasks ({rule}), got {t}")


@BALANCERS.register(
    "krum",
    "Krum: keep the task gradient(s) closest to their T − f − 2 nearest neighbours (Byzantine-robust).",
    "Blanchard et al., Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent, NeurIPS 2017",
)
class Krum(GramianBalancer):
    """Krum and Multi-Krum (Blanchard et al. 2017, Sec. 4), as torchjd's ``Krum``. With ``f`` the number of
    Byzantine rows (``n_byzantine``), each gradient's score is the sum of its Euclidean distances to its
    ``T − f − 2`` nearest other gradients; the ``m`` (``n_selected``) gradients of lowest score are averaged.
    Distances come from the Gramian, ``‖g_i − g_j‖² = K_ii + K_jj − 2K_ij``. It needs ``T ≥ f + 3`` and
    ``T ≥ m`` (default ``f = 0``, ``m = 1``); weights are ``1/m`` on the selected tasks and 0 elsewhere, so
    the other tasks' heads do not move at that step either.
    """

    def __init__(self, n_byzantine: int = 0, n_selected: int = 1) -> None:
        super().__init__()
        if n_byzantine < 0 or n_selected < 1:
            raise ConfigError(
                f"balancer.n_byzantine must be ≥ 0 and balancer.n_selected ≥ 1, got {n_byzantine}, {n_selected}"
            )
        self.n_byzantine, self.n_selected = int(n_byzantine), int(n_selected)

    def min_tasks(self) -> int:
        return max(self.n_byzantine + 3, self.n_selected)

    def setup(self, num_tasks: int) -> None:
        check_task_count(self, num_tasks, f"n_byzantine + 3 and n_selected, n_byzantine={self.n_byzantine}")

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        t = gramian.shape[0]
        self.setup(t)
        norms = np.diag(gramian)
        distances = np.sqrt(np.clip(norms[None, :] + norms[:, None] - 2.0 * gramian, 0.0, None))
        closest = t - self.n_byzantine - 2
        # each row's own distance (0) sorts first; the next `closest` are its nearest neighbours
        scores = np.sort(distances, axis=1)[:, 1 : closest + 1].sum(axis=1)
        selected = np.argsort(scores, kind="stable")[: self.n_selected]
        weights = np.zeros(t)
        weights[selected] = 1.0 / self.n_selected
        return weights


@BALANCERS.register(
    "trimmed_mean",
    "Trimmed mean: per coordinate, drop the k largest and k smallest task gradients, average the rest.",
    "Yin et al., Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates, ICML 2018",
)
class TrimmedMean(GradientBalancer):
    """Coordinate-wise trimmed mean (Yin et al. 2018, Definition 2), as torchjd's ``TrimmedMean``: per
    coordinate of the shared gradient, the ``k`` (``trim_number``) largest and ``k`` smallest task values are
    removed and the ``T − 2k`` others averaged. It needs ``T ≥ 2k + 1`` (default ``k = 1``); ``k = 0`` is the
    mean gradient.
    ``weights`` are ``1/T`` (the task-specific parameters get the mean's share of each task's gradient).
    """

    needs: ClassVar[Needs] = Needs.JACOBIAN

    def __init__(self, trim_number: int = 1) -> None:
        super().__init__()
        if trim_number < 0:
            raise ConfigError(f"balancer.trim_number must be ≥ 0, got {trim_number}")
        self.trim_number = int(trim_number)

    def min_tasks(self) -> int:
        return 2 * self.trim_number + 1

    def setup(self, num_tasks: int) -> None:
        check_task_count(self, num_tasks, f"2 · trim_number + 1, trim_number={self.trim_number}")

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        grads = require_grads(self, grads)
        t = grads.num_tasks
        self.setup(t)
        direction: Tensor | None = None
        for columns, block in grads.jacobian_blocks(release=True):
            if direction is None:
                direction = block.new_empty(grads.num_columns)
            kept = torch.sort(block.detach(), dim=0).values[self.trim_number : t - self.trim_number]
            direction[columns] = kept.mean(dim=0)
        assert direction is not None
        return Update(weights=torch.full_like(losses.detach(), 1.0 / t), direction=direction)
