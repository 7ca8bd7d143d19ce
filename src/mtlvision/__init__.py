"""mtlvision: multi-task learning for computer vision on PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"
