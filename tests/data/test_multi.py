"""The ``multi`` dataset: tasks taken from several datasets by one config, and its config errors."""

from __future__ import annotations

import pytest

from mtlvision.config import load_config
from mtlvision.engine.build import build_tasks, dataset_source
from mtlvision.errors import ConfigError

SOURCES = {
    "scenes": {
        "name": "scenes",
        "image_size": 32,
        "train_size": 3,
        "val_size": 2,
        "test_size": 2,
        "tasks": {"seg": "segmentation", "how_many": "count"},
    },
    "digits": {"name": "multimnist", "train_size": 5, "val_size": 2, "test_size": 2, "tasks": {"digit": "left"}},
}


def config(sources=SOURCES, **data):
    return load_config("multi_demo", {"data.sources": sources, **{f"data.{k}": v for k, v in data.items()}})


def test_tasks_and_samples_come_from_their_own_source():
    cfg = config()
    tasks = {t.name: t for t in build_tasks(cfg)}
    assert list(tasks) == ["seg", "how_many", "digit"]
    assert tasks["digit"].num_classes == 10 and tasks["seg"].kind == "segmentation"
    source, params = dataset_source(cfg)
    train = source.build(params, "train")
    assert len(train) == 8 and train.sizes == [3, 5]
    scene, digit = train[0], train[3]
    assert scene["id"].startswith("scenes:") and digit["id"].startswith("digits:")
    assert scene["valid"] == {"seg": True, "how_many": True, "digit": False}
    assert digit["valid"] == {"seg": False, "how_many": False, "digit": True}
    assert digit["targets"]["seg"].shape == digit["image"].shape[-2:]  # placeholder of the image's size
    assert bool((digit["targets"]["seg"] == tasks["seg"].ignore_index).all())
    assert int(digit["targets"]["digit"]) == int(source.build(params, "train").datasets[1][0]["targets"]["digit"])


@pytest.mark.parametrize(
    "sources, fragment",
    [
        (
            {"a": {"name": "scenes", "tasks": {"x": "nope"}}},
            "data.sources.a.tasks.x: dataset 'scenes' has no task 'nope'",
        ),
        (
            {"a": {"name": "scenes", "tasks": {"x": "count"}}, "b": {"name": "multimnist", "tasks": {"x": "left"}}},
            "task 'x' is already taken from source 'a'",
        ),
        ({"a": {"name": "scenes", "image_size": 3, "tasks": {"x": "count"}}}, "data.sources.a.image_size"),
        ({"a": {"name": "scenes", "tasks": {}}}, "data.sources.a.tasks is empty"),
        ({"a": {"name": "multi", "tasks": {"x": "y"}}}, "cannot hold another multi dataset"),
    ],
)
def test_config_errors_name_the_key(sources, fragment):
    with pytest.raises(ConfigError) as error:
        build_tasks(config(sources))
    assert fragment in str(error.value)


def test_sampling_keys_are_validated():
    with pytest.raises(ConfigError, match="data.sampling"):
        dataset_source(config(sampling={"strategy": "random"}))
