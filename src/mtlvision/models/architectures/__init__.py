"""Sharing architectures, one module each, registered in :data:`ARCHITECTURES`."""

from __future__ import annotations

from mtlvision.models.architectures import hps  # noqa: F401  (registers the architecture)
from mtlvision.models.architectures.base import Architecture, ArchitectureSpec, RepresentationUnavailable
from mtlvision.models.architectures.hps import HPS
from mtlvision.models.architectures.registry import ARCHITECTURES

__all__ = ["ARCHITECTURES", "HPS", "Architecture", "ArchitectureSpec", "RepresentationUnavailable"]
