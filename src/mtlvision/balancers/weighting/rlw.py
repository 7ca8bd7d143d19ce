"""Random loss weighting."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mtlvision.balancers.base import TaskGradients, Update
from mtlvision.balancers.registry import BALANCERS
from mtlvision.balancers.weighting._common import LossWeighting
from mtlvision.errors import ConfigError


def _normal(num_tasks: int) -> Tensor:
    return torch.softmax(torch.randn(num_tasks, dtype=torch.float64), dim=0)


def _uniform(num_tasks: int) -> Tensor:
    return torch.softmax(torch.rand(num_tasks, dtype=torch.float64), dim=0)


def _dirichlet(num_tasks: int) -> Tensor:
    concentration = torch.ones(num_tasks, dtype=torch.float64)
    return torch.distributions.Dirichlet(concentration).sample()


_SAMPLERS: dict[str, Callable[[int], Tensor]] = {"normal": _normal, "uniform": _uniform, "dirichlet": _dirichlet}


@BALANCERS.register(
    "rlw",
    "Random loss weighting: fresh random weights on the simplex at every step.",
    "Lin et al., TMLR 2022 (Reasonable Effectiveness of Random Weighting)",
)
class RLW(LossWeighting):
    """Lin et al. (2022): at each step sample ``λ̃`` and weight the losses by ``softmax(λ̃)``.
    ``distribution``: ``normal`` (``λ̃ ~ N(0, I)``, the paper's default), ``uniform`` (``U(0, 1)``) or
    ``dirichlet`` (``Dir(1)``, sampled directly on the simplex). The weights sum to 1. Draws use torch's
    global generator, which the trainer seeds and checkpoints.
    """

    def __init__(self, distribution: str = "normal") -> None:
        super().__init__()
        if distribution not in _SAMPLERS:
            raise ConfigError(
                f"balancer.distribution must be one of {', '.join(sorted(_SAMPLERS))}, got {distribution!r}"
            )
        self.distribution = distribution

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        weights = _SAMPLERS[self.distribution](losses.numel())
        return Update(weights=weights.to(device=losses.device, dtype=losses.dtype))
