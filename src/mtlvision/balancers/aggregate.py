"""``aggregate(name, G)``: any registered gradient method as a pure function of a [T, P] matrix."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtlvision.balancers.base import TaskGradients
from mtlvision.balancers.gradient._base import GradientBalancer
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError


class MatrixGradients(TaskGradients):
    """:class:`TaskGradients` over a given matrix ``G`` [T, P].

    The Gramian is accumulated in float64 and handed over in ``G``'s precision (float64 for float64 ``G``,
    float32 for narrower floats): its dtype tells the methods the precision of the numbers, so that their
    rank decisions (eigenvalue cut-offs) follow the input, as torchjd's do. Rounding a float64 product to
    float32 is more accurate than accumulating it in float32, as the engine's default Gramian does.
    """

    def __init__(self, matrix: Tensor) -> None:
        self._matrix = matrix
        self._gramian: Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return int(self._matrix.shape[0])

    def jacobian(self) -> Tensor:
        return self._matrix

    def gramian(self) -> Tensor:
        if self._gramian is None:
            g = self._matrix.double()
            self._gramian = (g @ g.T).to(torch.promote_types(self._matrix.dtype, torch.float32))
        return self._gramian


def aggregate(name: str, G: Tensor, *, losses: Tensor | None = None, **hparams: Any) -> Tensor:
    """Combine the task gradients ``G`` [T, P] with the gradient method ``name`` into one vector [P].

    The method starts from a fresh state (stateful methods take their first step). ``losses`` [T] are
    needed only by methods that read loss values (MGDA's ``"loss"`` normalisations, IMTL's scales); they
    default to ones. Methods whose update is a weighted sum return ``weights @ G``, the others their
    direction. Loss-weighting methods (even those that read gradients, such as GradNorm) have no gradient
    aggregation and raise :class:`ConfigError`.
    """
    entry = BALANCERS.entry(name)
    if not isinstance(G, Tensor) or G.ndim != 2 or G.shape[0] < 1 or not G.is_floating_point():
        shape = tuple(G.shape) if isinstance(G, Tensor) else type(G).__name__
        raise ConfigError(f"aggregate({name!r}, G): G must be a floating-point matrix [T, P] with T ≥ 1, got {shape}")
    if not torch.isfinite(G).all():
        raise ConfigError(f"aggregate({name!r}, G): G holds NaN or infinite values")
    if not _is_gradient_method(entry.obj):
        raise ConfigError(
            f"{name!r} is a loss-weighting method: it weights losses and has no aggregation of a gradient "
            f"matrix. Gradient methods: {', '.join(gradient_methods())}"
        )
    try:
        balancer = entry.obj(**hparams)
    except TypeError as exc:
        raise ConfigError(f"balancer {name!r}: {exc}") from None
    balancer.setup(int(G.shape[0]))
    G = G.detach()
    if losses is None:
        losses = torch.ones(G.shape[0], dtype=G.dtype, device=G.device)
    elif losses.shape != (G.shape[0],):
        raise ConfigError(f"aggregate({name!r}, G): losses must have shape [{G.shape[0]}], got {tuple(losses.shape)}")
    update = balancer.balance(losses.detach(), MatrixGradients(G))
    if update.direction is not None:
        return update.direction.to(G.dtype)
    shared = update.shared_weights if update.shared_weights is not None else update.weights
    return shared.to(G.dtype) @ G


def _is_gradient_method(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, GradientBalancer)


def gradient_methods() -> list[str]:
    """Names of the registered gradient methods (those that combine per-task gradients into the update)."""
    return [entry.name for entry in BALANCERS if _is_gradient_method(entry.obj)]
