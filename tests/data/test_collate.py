"""Collate: one row per sample for every task, each task batching its own targets, validity alongside."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from mtlvision.data.collate import Collate, collate
from mtlvision.data.datasets import DATASETS
from mtlvision.errors import DataError
from mtlvision.tasks.base import TargetKind, Task
from mtlvision.tasks.registry import TASKS


class StackedLabel(Task):
    """A test double of the Task contract: int64 scalar targets, batched by the base class's stack."""

    kind = "double"
    target_kind = TargetKind.LABEL
    level = "image"
    default_head = "linear"
    metric_directions = {"accuracy": True}
    primary_metric = "accuracy"

    @property
    def output_channels(self) -> int:
        return 3

    def loss(self, prediction: Any, target: Any, valid: Tensor) -> Tensor:
        raise NotImplementedError

    def metric(self) -> Any:
        raise NotImplementedError

    def placeholder_target(self, height: int, width: int) -> Tensor:
        return torch.tensor(0)

    def check_target(self, target: Any, where: str) -> None:
        pass

    def decode(self, prediction: Any) -> list[Any]:
        raise NotImplementedError

    def draw(self, image: np.ndarray, decoded: Any) -> np.ndarray:
        raise NotImplementedError


class VariableBoxes(StackedLabel):
    """A double whose targets differ in length per sample, so it batches them as a list."""

    def collate(self, targets: Sequence[Any]) -> list[Any]:
        return list(targets)


def sample(index: int, size: int = 8, label: int | None = 1, boxes: int = 1) -> dict:
    return {
        "image": torch.full((3, size, size), float(index)),
        "targets": {"label": torch.tensor(0 if label is None else label), "boxes": torch.ones(boxes, 4) * index},
        "valid": {"label": label is not None, "boxes": True},
        "id": f"s{index}",
    }


TASKS_UNDER_TEST = {"label": StackedLabel("label"), "boxes": VariableBoxes("boxes")}


def test_batches_images_targets_validity_and_ids() -> None:
    batch = collate([sample(0, label=2, boxes=1), sample(1, label=None, boxes=3), sample(2, label=1, boxes=0)],
                    TASKS_UNDER_TEST)  # fmt: skip
    assert batch["image"].shape == (3, 3, 8, 8) and torch.equal(batch["image"][:, 0, 0, 0], torch.tensor([0.0, 1, 2]))
    assert torch.equal(batch["targets"]["label"], torch.tensor([2, 0, 1]))  # the placeholder stays in its row
    assert batch["valid"]["label"].dtype == torch.bool
    assert batch["valid"]["label"].tolist() == [True, False, True] and batch["valid"]["boxes"].tolist() == [True] * 3
    assert isinstance(batch["targets"]["boxes"], list) and [len(b) for b in batch["targets"]["boxes"]] == [1, 3, 0]
    assert batch["ids"] == ["s0", "s1", "s2"]


def test_only_the_requested_tasks_are_batched() -> None:
    batch = Collate({"label": StackedLabel("label")})([sample(0), sample(1)])
    assert set(batch["targets"]) == set(batch["valid"]) == {"label"}


def test_errors_name_the_sample() -> None:
    with pytest.raises(DataError, match=r"s1 .*\(3, 6, 6\)"):
        collate([sample(0), sample(1, size=6)], TASKS_UNDER_TEST)
    missing = sample(4)
    del missing["targets"]["boxes"]
    with pytest.raises(DataError, match=r"s4.*'boxes'"):
        collate([sample(0), missing], TASKS_UNDER_TEST)
    with pytest.raises(DataError, match="empty"):
        collate([], TASKS_UNDER_TEST)


def test_picklable_for_worker_processes() -> None:
    restored = pickle.loads(pickle.dumps(Collate(TASKS_UNDER_TEST)))
    assert torch.equal(restored([sample(0), sample(1)])["targets"]["label"], torch.tensor([1, 1]))


@pytest.mark.parametrize(("dataset", "size"), [("scenes", 32), ("multimnist", 36)])
def test_real_tasks_accept_and_batch_the_built_in_datasets(dataset: str, size: int) -> None:
    """The contract between the datasets and the task kinds: every target passes check_target and batches."""
    source = DATASETS.get(dataset)
    extra = {"image_size": 32} if dataset == "scenes" else {}
    params = source.Params(name=dataset, train_size=6, val_size=2, test_size=2, **extra)
    split = source.build(params, "val")
    tasks = {name: TASKS.get(spec.kind)(name, **spec.params) for name, spec in source.tasks(params).items()}
    for i in range(len(split)):
        for name, task in tasks.items():
            task.check_target(split[i]["targets"][name], split[i]["id"])
    batch = next(iter(DataLoader(split, batch_size=2, collate_fn=Collate(tasks))))
    assert batch["image"].shape == (2, 3, size, size)
    assert batch["ids"] == ["val/0", "val/1"]
    for name, task in tasks.items():
        target = batch["targets"][name]
        if task.target_kind in (TargetKind.BOXES, TargetKind.KEYPOINTS):  # instances: one dict per image
            assert isinstance(target, list) and len(target) == 2
        else:
            assert isinstance(target, Tensor) and target.shape[0] == 2
        assert batch["valid"][name].tolist() == [True, True]
