"""The Task contract: everything that is specific to one kind of vision task lives in one Task subclass.

A task knows its target kind (how joint transforms and collate treat its labels), its output (how many
channels its head predicts, at image level or per pixel), its loss with a per-sample validity mask (samples
whose label is missing cost nothing), its metrics with their direction, how to decode a prediction into a
JSON-able result and how to draw it. Tasks import nothing of mtlvision above them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from mtlvision.errors import DataError


def pad_instances(
    targets: Sequence[Mapping[str, Tensor]],
    fields: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    device: torch.device,
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-image instance targets (boxes, keypoints, ...) as one batch: each of ``fields`` (name: the shape after
    the instance dimension, dtype) zero-padded to ``[B, N, *shape]`` with N the batch's largest instance count
    (at least one, so that gathering by instance index always has a row), and the real-instance mask ``[B, N]``.
    The count is read from the first field (the task's own check makes every field agree)."""
    count_key = next(iter(fields))
    largest = max([1, *(int(t[count_key].shape[0]) for t in targets)])
    padded = {
        name: torch.zeros(len(targets), largest, *shape, dtype=dtype, device=device)
        for name, (shape, dtype) in fields.items()
    }
    real = torch.zeros(len(targets), largest, dtype=torch.bool, device=device)
    for row, target in enumerate(targets):
        count = int(target[count_key].shape[0])
        for name, tensor in padded.items():
            tensor[row, :count] = target[name].to(device=device, dtype=tensor.dtype)
        real[row, :count] = True
    return padded, real


class TargetKind(str, Enum):
    """How a target is stored and transformed (see ``mtlvision.data.transforms``).

    - ``label``: int64 scalar class index.
    - ``labels``: float32 ``[C]`` multi-hot vector.
    - ``mask``: int64 ``[H, W]`` class map; ``ignore_index`` marks unlabelled pixels.
    - ``depth``: float32 ``[1, H, W]`` metric depth; 0 marks invalid pixels.
    - ``normals``: float32 ``[3, H, W]`` unit vectors (x right, y down, z towards the camera); all-zero
      vectors mark invalid pixels.
    - ``boxes``: dict with ``boxes`` float32 ``[N, 4]`` (x1, y1, x2, y2 in pixels) and ``labels`` int64 ``[N]``.
    - ``edges``: int64 ``[H, W]`` map of 1 (edge) and 0; ``ignore_index`` marks unlabelled pixels. Transformed
      as a mask; decoded into edge probabilities.
    - ``keypoints``: dict with ``keypoints`` float32 ``[N, K, 3]`` (x, y, v in pixels; v 0 unlabelled, 1 hidden,
      2 visible, as COCO) and ``boxes`` float32 ``[N, 4]`` (x1, y1, x2, y2), one row per instance.
    """

    LABEL = "label"
    LABELS = "labels"
    MASK = "mask"
    DEPTH = "depth"
    NORMALS = "normals"
    BOXES = "boxes"
    EDGES = "edges"
    KEYPOINTS = "keypoints"


class TaskMetric(Protocol):
    """A metric accumulated over a whole split (never an average of batch averages)."""

    def update(self, prediction: Any, target: Any, valid: Tensor) -> None: ...

    def compute(self) -> dict[str, float]: ...

    def reset(self) -> None: ...

    def to(self, device: torch.device | str) -> TaskMetric: ...


class Task(ABC):
    """One task of a multi-task model.

    Subclasses set the class attributes and implement the abstract methods. ``name`` is the instance's
    name (the key in the model's output dict and in the batch's targets); ``kind`` is the registry name.
    """

    kind: ClassVar[str]
    target_kind: ClassVar[TargetKind]
    level: ClassVar[Literal["image", "dense"]]
    default_head: ClassVar[str]
    #: metric name -> True when higher is better. Every metric listed here is reported and enters Δm.
    metric_directions: ClassVar[dict[str, bool]]
    #: the task's headline metric: the one number that stands for the task when a single one is wanted (a key
    #: of metric_directions, e.g. ``miou`` for segmentation), for callers that report one metric per task.
    #: The trainer does not read it: best-model selection and early stopping follow ``train.select``
    #: (``loss``, or an explicit ``TASK.METRIC``).
    primary_metric: ClassVar[str]

    def __init__(self, name: str) -> None:
        self.name = name

    # ----------------------------------------------------------------------------------------- model side
    @property
    @abstractmethod
    def output_channels(self) -> int:
        """Channels of the raw head output (logits, depth, normal components, ...)."""

    def build_custom_head(self, feature_channels: Sequence[int], feature_strides: Sequence[int]) -> nn.Module | None:
        """A head of the task's own (e.g. detection); ``None`` lets the model build its standard head."""
        return None

    def postprocess(self, raw: Any) -> Any:
        """Turn the raw head output into the task's prediction (identity unless overridden)."""
        return raw

    # ------------------------------------------------------------------------------------------ training
    @abstractmethod
    def loss(self, prediction: Any, target: Any, valid: Tensor) -> Tensor:
        """Mean loss over the samples with ``valid[i]`` True; a zero that keeps the graph when none is."""

    @abstractmethod
    def metric(self) -> TaskMetric:
        """A fresh accumulator for this task's metrics."""

    # ------------------------------------------------------------------------------------------- data side
    @abstractmethod
    def placeholder_target(self, height: int, width: int) -> Any:
        """The target stored for a sample whose label is missing (its ``valid`` flag is False)."""

    @abstractmethod
    def check_target(self, target: Any, where: str) -> None:
        """Raise :class:`DataError` naming ``where`` (a file or sample) if the target is malformed."""

    def collate(self, targets: Sequence[Any]) -> Any:
        """Batch the targets of several samples (stack by default; variable-length kinds override)."""
        return torch.stack(list(targets))

    # ----------------------------------------------------------------------------------------- prediction
    @abstractmethod
    def decode(self, prediction: Any) -> list[Any]:
        """Split a batch prediction into one JSON-able result per sample."""

    @abstractmethod
    def draw(self, image: np.ndarray, decoded: Any) -> np.ndarray:
        """Return an ``H x W x 3`` uint8 picture of one decoded result over (or beside) ``image``."""

    # ----------------------------------------------------------------------------------------------- misc
    def describe(self) -> dict[str, Any]:
        """The task's configuration, as written to the run's config and reports."""
        return {"name": self.name, "kind": self.kind}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "kind")
        return f"{type(self).__name__}({args})"


def masked_mean(per_sample: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``per_sample`` over valid samples; zero (graph kept) when no sample is valid."""
    weights = valid.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp_min(1.0)


def require(condition: bool, where: str, message: str) -> None:
    """Raise :class:`DataError` with ``where`` named when ``condition`` is false."""
    if not condition:
        raise DataError(f"{where}: {message}")
