"""Every task of this package fulfils the Task contract: registry entry, attributes, placeholders, describe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtlvision.tasks import (
    TASKS,
    Classification,
    Depth,
    Edges,
    MultiLabel,
    Normals,
    Segmentation,
    TargetKind,
    Task,
)

TASKS_UNDER_TEST = {
    "classification": (Classification("c", 3), TargetKind.LABEL),
    "multilabel": (MultiLabel("m", 3), TargetKind.LABELS),
    "segmentation": (Segmentation("s", 3), TargetKind.MASK),
    "depth": (Depth("d"), TargetKind.DEPTH),
    "normals": (Normals("n"), TargetKind.NORMALS),
    "edges": (Edges("e"), TargetKind.EDGES),
}


def _raw_output(task: Task, batch: int, height: int, width: int) -> torch.Tensor:
    if task.level == "image":
        return torch.randn(batch, task.output_channels)
    return torch.randn(batch, task.output_channels, height, width)


@pytest.mark.parametrize("kind", sorted(TASKS_UNDER_TEST))
def test_task_fulfils_the_contract(kind: str) -> None:
    task, target_kind = TASKS_UNDER_TEST[kind]
    entry = TASKS.entry(kind)
    assert entry.obj is type(task) and entry.description
    assert task.kind == kind and task.target_kind == target_kind
    assert task.primary_metric in task.metric_directions
    assert task.default_head in ("mlp", "fpn")

    height, width = 6, 7
    placeholders = [task.placeholder_target(height, width) for _ in range(2)]
    for placeholder in placeholders:
        task.check_target(placeholder, "placeholder")
    targets = task.collate(placeholders)
    prediction = task.postprocess(_raw_output(task, 2, height, width).requires_grad_(True))

    loss = task.loss(prediction, targets, torch.tensor([False, False]))  # placeholders cost nothing
    assert loss.ndim == 0 and loss.item() == 0.0 and loss.requires_grad

    metric = task.metric()
    assert metric.to("cpu") is metric
    metric.update(prediction.detach(), targets, torch.tensor([False, False]))
    assert set(metric.compute()) == set(task.metric_directions)

    decoded = task.decode(prediction.detach())
    assert len(decoded) == 2
    picture = task.draw(np.zeros((height, width, 3), np.uint8), decoded[0])
    assert picture.shape == (height, width, 3) and picture.dtype == np.uint8

    description = task.describe()
    assert description["kind"] == kind and description["name"] == task.name
    rebuilt = type(task)(**{k: v for k, v in description.items() if k != "kind"})
    assert rebuilt.describe() == description and repr(rebuilt) == repr(task)
