"""Task kinds: one module each, registered in :data:`TASKS`."""

from __future__ import annotations

from mtlvision.tasks.base import TargetKind, Task, TaskMetric
from mtlvision.tasks.classification import Classification
from mtlvision.tasks.depth import Depth
from mtlvision.tasks.detection import Detection
from mtlvision.tasks.edges import Edges
from mtlvision.tasks.keypoints import Keypoints
from mtlvision.tasks.multilabel import MultiLabel
from mtlvision.tasks.normals import Normals
from mtlvision.tasks.registry import TASKS
from mtlvision.tasks.segmentation import Segmentation

__all__ = [
    "TASKS",
    "Classification",
    "Depth",
    "Detection",
    "Edges",
    "Keypoints",
    "MultiLabel",
    "Normals",
    "Segmentation",
    "Task",
    "TargetKind",
    "TaskMetric",
]
