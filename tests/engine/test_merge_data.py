"""``merge --data``: which data each rule reads, checked before any weight is loaded."""

from __future__ import annotations

import pytest
import torch

from mtlvision import api
from mtlvision.config import load_config
from mtlvision.engine.build import build_tasks
from mtlvision.engine.merge_data import EXPERTS_DATA, merge_data, rules_reading_data
from mtlvision.engine.merged_run import default_out
from mtlvision.engine.merging import DataUse, make_rule
from mtlvision.errors import ConfigError, MtlvisionError
from mtlvision.models import MultiTaskModel
from tests.engine.tinyrun import tiny_backbone

SIZES = {"data.train_size": 6, "data.val_size": 4, "data.test_size": 5, "train.batch_size": 4}
MERGED = load_config("scenes", {**SIZES, "data.image_size": 16, "tasks": ["count", "segmentation"]})
OTHER = load_config("multimnist", SIZES)  # left and right digits: no labels of the scenes' tasks


def test_each_rule_reads_the_split_its_paper_defines() -> None:
    assert make_rule("fisher").data_use() == DataUse(split="train", labels=True)
    assert make_rule("regmean").data_use() == DataUse(split="train", labels=False)
    assert make_rule("adamerging").data_use() == DataUse(split="test", labels=False)
    assert make_rule("adamerging", {"split": "val"}).data_use() == DataUse(split="val", labels=False)
    assert make_rule("ties").data_use() is None and make_rule("average").data_use() is None
    assert {"fisher", "regmean", "adamerging"} <= set(rules_reading_data())
    assert not {"average", "ties", "task_arithmetic", "iso_c"} & set(rules_reading_data())


def test_data_for_a_rule_that_reads_none_is_refused_naming_those_that_do() -> None:
    with pytest.raises(ConfigError, match="--data multimnist: merging rule 'ties' .* reads no data.*regmean"):
        merge_data(make_rule("ties"), "ties", MERGED, OTHER, "multimnist")
    assert merge_data(make_rule("ties"), "ties", MERGED) is None


def test_a_rule_needing_labels_refuses_data_without_the_tasks_labels() -> None:
    with pytest.raises(ConfigError, match="train split has no labels for task\\(s\\) count; merging rule 'fisher'"):
        merge_data(make_rule("fisher"), "fisher", MERGED, OTHER, "multimnist")


def test_other_data_is_read_as_images_alone_by_a_rule_that_needs_no_labels() -> None:
    data = merge_data(make_rule("regmean"), "regmean", MERGED, OTHER, "multimnist")
    assert data is not None
    assert data.record() == {"source": "multimnist", "dataset": "multimnist", "split": "train", "labels": False}
    model = MultiTaskModel(tiny_backbone, build_tasks(MERGED))
    batches = list(data.loader(MERGED, model))
    assert sum(len(b["image"]) for b in batches) == 6 and batches[0]["targets"] == {}
    assert batches[0]["image"].shape[1:] == (3, 36, 36)  # MultiMNIST's own images, not the scenes'


def test_the_experts_own_data_is_the_default_and_labels_are_read_when_needed() -> None:
    data = merge_data(make_rule("fisher"), "fisher", MERGED)
    assert data is not None and data.config is None
    assert data.record() == {"source": EXPERTS_DATA, "dataset": "each expert's own", "split": "train", "labels": True}
    model = MultiTaskModel(tiny_backbone, build_tasks(MERGED))
    batch = next(iter(data.loader(MERGED, model)))
    assert set(batch["targets"]) == {"count", "segmentation"} and batch["image"].shape[1:] == (3, 16, 16)
    assert batch["valid"]["count"].dtype == torch.bool


def test_a_split_the_data_cannot_give_is_named() -> None:
    empty = load_config("multimnist", {**SIZES, "data.val_size": 0})
    with pytest.raises(ConfigError, match="--data mm: .*val split"):
        merge_data(make_rule("adamerging", {"split": "val"}), "adamerging", MERGED, empty, "mm")


def test_api_arguments_and_the_default_output_folder(tmp_path) -> None:
    with pytest.raises(MtlvisionError, match="data_overrides apply to the data given with data="):
        api.merge([tmp_path], rule="regmean", data_overrides=["data.train_size=4"])
    assert default_out(["runs/baseline-scenes"], "regmean").as_posix() == "runs/m-regmean"
    assert default_out(["runs/baseline-scenes/baselines.json"], "ties").as_posix() == "runs/m-ties"
