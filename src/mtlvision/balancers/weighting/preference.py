"""Preference-vector scalarisations, as torchjd defines them: COSMOS (Ruchte & Grabocka 2021) and PBI
(Zhang & Li 2007). Each minimises a scalar function ``S(L)`` of the loss vector; its gradient with respect to
the model is ``Σ_t (∂S/∂L_t) ∇L_t``, so the task weights of a step are ``∂S/∂L`` at that step's losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlvision.balancers.base import TaskGradients, Update
from mtlvision.balancers.registry import BALANCERS
from mtlvision.balancers.weighting._common import LossWeighting
from mtlvision.errors import ConfigError

#: torchjd's constant under PBI's square root, which keeps its gradient finite on the preference ray
PBI_EPSILON = 1e-12


def _vector(values: Sequence[float] | None, name: str, t: int, default: float) -> Tensor:
    if values is None:
        return torch.full((t,), default, dtype=torch.float64)
    if len(values) != t:
        raise ConfigError(f"balancer.{name} has {len(values)} values but there are {t} tasks")
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def _preferences(values: Sequence[float] | None) -> list[float] | None:
    if values is None:
        return None
    prefs = [float(v) for v in values]
    if any(v < 0 for v in prefs) or not any(v > 0 for v in prefs):
        raise ConfigError(f"balancer.pref_vector must be non-negative and not all zero, got {prefs}")
    return prefs


@BALANCERS.register(
    "cosmos",
    "COSMOS: preference-weighted loss sum minus λ times the cosine between losses and preferences.",
    "Ruchte & Grabocka, Scalable Pareto Front Approximation for Deep Multi-Objective Learning, ICDM 2021",
)
class COSMOS(LossWeighting):
    """COSMOS (Ruchte & Grabocka 2021, Eq. 4), as torchjd's ``COSMOS`` scalariser: minimise
    ``S(L) = rᵀL − λ cos(r, L)`` for the preference vector ``r`` (``pref_vector``, default ``1/T``) and
    ``λ ≥ 0`` (``lam``; the paper uses 0.01 to 8, default 1). Weights ``∂S/∂L = r − λ (r/(‖r‖‖L‖) −
    (rᵀL) L/(‖r‖‖L‖³))``. The paper also samples ``r`` from a Dirichlet distribution at every step and feeds
    it to the model to learn the whole Pareto front; as in torchjd, this balancer is the objective for one
    fixed ``r`` (one trade-off). All losses zero leave the cosine undefined: that step raises.
    """

    def __init__(self, lam: float = 1.0, pref_vector: Sequence[float] | None = None) -> None:
        super().__init__()
        if not lam >= 0:
            raise ConfigError(f"balancer.lam must be ≥ 0, got {lam}")
        self.lam = float(lam)
        self.pref_vector = _preferences(pref_vector)

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        values = losses.detach().to("cpu", torch.float64)
        r = _vector(self.pref_vector, "pref_vector", values.numel(), 1.0 / values.numel())
        norm = float(values.norm())
        if norm == 0.0:
            raise ConfigError(
                "COSMOS: every task loss is 0, where the cosine between losses and preferences is undefined"
            )
        r_norm = float(r.norm())
        cosine_grad = r / (r_norm * norm) - float(r @ values) * values / (r_norm * norm**3)
        weights = r - self.lam * cosine_grad
        return Update(weights=weights.to(device=losses.device, dtype=losses.dtype))


@BALANCERS.register(
    "pbi",
    "PBI: distance along the preference ray plus θ times the distance to it (MOEA/D's decomposition).",
    "Zhang & Li, MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition, IEEE TEVC 2007",
)
class PBI(LossWeighting):
    """Penalty-based boundary intersection (Zhang & Li 2007, Sec. II-C), as torchjd's ``PBI`` scalariser:
    with ``f = L − z*`` (``reference`` ``z*``, default 0), ``ŵ`` the normalised preference vector
    (``pref_vector``, default uniform), ``d₁ = fᵀŵ`` and ``d₂ = √(‖f − d₁ŵ‖² + 10⁻¹²)``, minimise
    ``d₁ + θ d₂`` (``theta``, default 5 as in the paper). Weights ``ŵ + θ (f − d₁ŵ)/d₂``.
    """

    def __init__(
        self, theta: float = 5.0, pref_vector: Sequence[float] | None = None, reference: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        if not theta >= 0:
            raise ConfigError(f"balancer.theta must be ≥ 0, got {theta}")
        self.theta = float(theta)
        self.pref_vector = _preferences(pref_vector)
        self.reference = None if reference is None else [float(v) for v in reference]

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        t = losses.numel()
        f = losses.detach().to("cpu", torch.float64) - _vector(self.reference, "reference", t, 0.0)
        direction = _vector(self.pref_vector, "pref_vector", t, 1.0)
        direction = direction / direction.norm()
        along = float(f @ direction)
        perpendicular = f - along * direction
        distance = float((perpendicular @ perpendicular + PBI_EPSILON).sqrt())
        weights = direction + self.theta * perpendicular / distance
        return Update(weights=weights.to(device=losses.device, dtype=losses.dtype))
