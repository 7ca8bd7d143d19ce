"""Loss-weighting and gradient-balancing methods, and the gradient engine that runs them."""

from __future__ import annotations

from typing import Any

from mtlvision.balancers import bilevel, gradient, weighting  # noqa: F401  (registers the methods)
from mtlvision.balancers.aggregate import aggregate
from mtlvision.balancers.backward import MultiTaskBackward, mtl_backward
from mtlvision.balancers.base import Balancer, Needs, TaskGradients, Update
from mtlvision.balancers.engine import GradientEngine, RecordedStep, resolve_jacobian_path
from mtlvision.balancers.gradient._solvers import NonFiniteGramianError, SolverError
from mtlvision.balancers.layers import LayerTaps
from mtlvision.balancers.registry import BALANCERS


def get(name: str, **hparams: Any) -> Balancer:
    """Build the balancer registered as ``name`` with its hyper-parameters."""
    from mtlvision.errors import ConfigError

    cls = BALANCERS.get(name)
    try:
        return cls(**hparams)
    except TypeError as exc:
        raise ConfigError(f"balancer {name!r}: {exc}") from None


__all__ = [
    "BALANCERS",
    "Balancer",
    "aggregate",
    "GradientEngine",
    "LayerTaps",
    "MultiTaskBackward",
    "Needs",
    "NonFiniteGramianError",
    "RecordedStep",
    "SolverError",
    "TaskGradients",
    "Update",
    "get",
    "mtl_backward",
    "resolve_jacobian_path",
]
