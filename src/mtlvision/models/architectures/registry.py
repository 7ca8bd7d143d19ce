"""The architecture registry (``mtlvision list architectures``): name -> ArchitectureSpec subclass."""

from __future__ import annotations

from mtlvision.models.architectures.base import ArchitectureSpec
from mtlvision.registry import Registry

ARCHITECTURES: Registry[type[ArchitectureSpec]] = Registry("architecture")
