"""Per-task datasets: the multi-source dataset and the seeded, shardable batch sampler."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlvision.data.sampling import (
    MultiSourceBatchSampler,
    MultiSourceDataset,
    TaskView,
    batch_composition,
    source_weights,
)
from mtlvision.errors import ConfigError
from mtlvision.tasks import TASKS


class Tiny(torch.utils.data.Dataset):
    def __init__(self, task: str, size: int, hw: int = 4) -> None:
        self.task, self.size, self.hw = task, size, hw

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        return {
            "image": torch.zeros(3, self.hw, self.hw),
            "targets": {self.task: torch.tensor(i)},
            "valid": {self.task: True},
            "id": str(i),
        }


def test_multi_source_dataset_marks_other_tasks_missing() -> None:
    data = MultiSourceDataset(
        {"digits": Tiny("digit", 3), "masks": Tiny("seg", 2)},
        {"digit": lambda h, w: torch.tensor(0), "seg": lambda h, w: torch.full((h, w), 255)},
    )
    assert len(data) == 5 and data.locate(3) == (1, 0)
    item = data[4]
    assert item["valid"] == {"seg": True, "digit": False} and item["id"] == "masks:1"
    assert int(item["targets"]["seg"]) == 1 and int(item["targets"]["digit"]) == 0
    assert torch.equal(data[0]["targets"]["seg"], torch.full((4, 4), 255))
    with pytest.raises(IndexError):
        data[5]


def test_weights() -> None:
    sizes = [100, 400, 900]
    assert np.allclose(source_weights(sizes, "round_robin"), 1 / 3)
    assert np.allclose(source_weights(sizes, "proportional"), np.array(sizes) / 1400)
    assert np.allclose(source_weights(sizes, "temperature", 1.0), source_weights(sizes, "proportional"))
    t2 = source_weights(sizes, "temperature", 2.0)
    assert np.allclose(t2, np.array([10, 20, 30]) / 60)  # p ∝ n^(1/2)
    assert np.allclose(source_weights(sizes, "temperature", 1e6), 1 / 3, atol=1e-4)
    with pytest.raises(ConfigError, match="strategy"):
        source_weights(sizes, "bogus")  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 64), sizes=st.lists(st.integers(1, 1000), min_size=1, max_size=6))
def test_composition_sums_and_follows_weights(batch: int, sizes: list[int]) -> None:
    weights = source_weights(sizes, "proportional")
    counts = batch_composition(batch, weights)
    assert sum(counts) == batch and min(counts) >= 0
    if batch >= len(sizes):
        assert min(counts) >= 1
    else:
        assert np.all(np.abs(np.array(counts) - batch * weights) < 1.0 + 1e-9)


def test_mixed_batches_have_fixed_composition_and_walk_each_source() -> None:
    sizes = [30, 10]
    sampler = MultiSourceBatchSampler(sizes, batch_size=4, strategy="proportional", seed=1)
    assert len(sampler) == 10  # ceil(30 / (4 * 0.75))
    seen = Counter()
    for batch in sampler:
        sources = [0 if i < 30 else 1 for i in batch]
        assert sources.count(0) == 3 and sources.count(1) == 1
        seen.update(batch)
    assert set(range(30)) <= set(seen) and max(seen[i] for i in range(30)) == 1  # largest seen once


def test_single_source_batches_follow_probabilities() -> None:
    sizes = [100, 300]
    sampler = MultiSourceBatchSampler(sizes, 8, strategy="proportional", mixing="single", steps_per_epoch=2000)
    counts = Counter(0 if batch[0] < 100 else 1 for batch in sampler)
    assert abs(counts[1] / 2000 - 0.75) < 0.04
    for batch in MultiSourceBatchSampler(sizes, 8, strategy="round_robin", mixing="single", steps_per_epoch=4):
        assert len({i < 100 for i in batch}) == 1
    order = [
        b[0] < 100
        for b in MultiSourceBatchSampler(sizes, 8, strategy="round_robin", mixing="single", steps_per_epoch=4)
    ]
    assert order == [True, False, True, False]


def test_determinism_epochs_and_resume() -> None:
    make = lambda **kw: MultiSourceBatchSampler([7, 5, 20], 6, strategy="temperature", temperature=2.0, seed=3, **kw)
    a, b = list(make()), list(make())
    assert a == b
    other = make()
    other.set_epoch(1)
    assert list(other) != a
    assert list(make(start=2)) == a[2:]


def test_ranks_get_disjoint_slices_with_the_same_composition() -> None:
    sizes = [40, 40]
    ranks = [list(MultiSourceBatchSampler(sizes, 4, seed=7, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    for b0, b1 in zip(*ranks):
        assert not set(b0) & set(b1)
        assert sorted(i < 40 for i in b0) == sorted(i < 40 for i in b1)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        MultiSourceBatchSampler([3], 0)
    with pytest.raises(ConfigError, match="mixing"):
        MultiSourceBatchSampler([3], 2, mixing="both")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rank"):
        MultiSourceBatchSampler([3], 2, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="empty"):
        MultiSourceDataset({"a": Tiny("a", 0)}, {})


def test_dataloader_with_collate_and_transforms() -> None:
    from mtlvision.data.collate import Collate
    from mtlvision.data.transforms import build_transforms, target_specs
    from mtlvision.tasks import Classification, Segmentation

    tasks = {"digit": Classification("digit", num_classes=10), "seg": Segmentation("seg", num_classes=3)}

    class Masks(Tiny):
        def __getitem__(self, i: int) -> dict:
            return {
                "image": torch.rand(3, 6, 6),
                "targets": {"seg": torch.full((6, 6), i % 3)},
                "valid": {"seg": True},
                "id": str(i),
            }

    data = MultiSourceDataset(
        {"digits": Tiny("digit", 9, hw=6), "masks": Masks("seg", 5)},
        {n: t.placeholder_target for n, t in tasks.items()},
    )
    transform = build_transforms({"hflip": 0.5, "scale": [0.8, 1.2]}, target_specs(tasks), train=True)

    class Transformed(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> dict:
            return transform(data[i])

    sampler = MultiSourceBatchSampler(data.sizes, 4, strategy="round_robin")
    loader = torch.utils.data.DataLoader(Transformed(), batch_sampler=sampler, collate_fn=Collate(tasks))
    batches = list(loader)
    assert len(batches) == len(sampler)
    for batch in batches:
        assert batch["valid"]["digit"].sum() == 2 and batch["valid"]["seg"].sum() == 2
        assert batch["targets"]["seg"].shape == (4, 6, 6)
        assert (batch["targets"]["seg"][~batch["valid"]["seg"]] == 255).all()


def test_task_view_selects_and_renames() -> None:
    view = TaskView(Tiny("segmentation", 3), {"seg_a": "segmentation"})
    item = view[2]
    assert set(item["targets"]) == {"seg_a"} and item["valid"] == {"seg_a": True} and int(item["targets"]["seg_a"]) == 2
    with pytest.raises(ConfigError, match="no task 'depth'"):
        TaskView(Tiny("segmentation", 3), {"d": "depth"})[0]


def test_multi_input_segmentation_from_scenes_and_digits_from_multimnist() -> None:
    """Two real built-in datasets, one task each, mixed per batch; one training step sees both losses."""
    from mtlvision.data.collate import Collate
    from mtlvision.data.datasets import DATASETS
    from mtlvision.data.transforms import build_transforms, target_specs
    from mtlvision.models.multitask import MultiTaskModel

    scenes, mnist = DATASETS.get("scenes"), DATASETS.get("multimnist")
    scene_params = scenes.Params(name="scenes", train_size=6, val_size=1, test_size=1, image_size=32)
    mnist_params = mnist.Params(name="multimnist", train_size=10, val_size=1, test_size=1)
    specs = {"seg": scenes.tasks(scene_params)["segmentation"], "digit": mnist.tasks(mnist_params)["left"]}
    tasks = {n: TASKS.get(s.kind)(n, **s.params) for n, s in specs.items()}
    data = MultiSourceDataset(
        {
            "scenes": TaskView(scenes.build(scene_params, "train"), {"seg": "segmentation"}),
            "digits": TaskView(mnist.build(mnist_params, "train"), {"digit": "left"}),
        },
        {n: t.placeholder_target for n, t in tasks.items()},
    )
    transform = build_transforms({"resize": [32, 32], "hflip": 0.5}, target_specs(tasks), train=True)
    sampler = MultiSourceBatchSampler(data.sizes, 4, strategy="temperature", temperature=2.0)
    collate = Collate(tasks)
    batch = collate([transform(data[i]) for i in next(iter(sampler))])
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["valid"]["seg"].any() and batch["valid"]["digit"].any()
    assert not (batch["valid"]["seg"] & batch["valid"]["digit"]).any()
    model = MultiTaskModel("resnet18", list(tasks.values()))
    out = model(batch["image"])
    losses = {n: t.loss(out[n], batch["targets"][n], batch["valid"][n]) for n, t in tasks.items()}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
