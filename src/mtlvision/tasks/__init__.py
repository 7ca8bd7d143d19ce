"""Task kinds: one module each, registered in :data:`TASKS`."""

from __future__ import annotations

from mtlvision.tasks.base import Task, TargetKind, TaskMetric
from mtlvision.tasks.detection import Detection
from mtlvision.tasks.registry import TASKS

__all__ = ["TASKS", "Task", "TargetKind", "TaskMetric"]
