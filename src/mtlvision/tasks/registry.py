"""The task registry (``mtlvision list tasks``): task kind -> Task subclass."""

from __future__ import annotations

from mtlvision.registry import Registry
from mtlvision.tasks.base import Task

TASKS: Registry[type[Task]] = Registry("task")
