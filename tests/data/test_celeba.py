"""CelebA from its official files: attribute list with header lines, evaluation partition, aligned images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtlvision.data.datasets import DATASETS
from mtlvision.data.datasets.celeba import ATTRIBUTES
from mtlvision.errors import ConfigError, DataError
from mtlvision.tasks import TASKS


def write_celeba(root: Path, partitions: list[int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    (root / "img_align_celeba").mkdir(parents=True)
    values = rng.choice([-1, 1], size=(len(partitions), 40))
    lines = [str(len(partitions)), " ".join(ATTRIBUTES) + " "]
    for i, row in enumerate(values):
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(rng.integers(0, 255, (21, 17, 3), dtype=np.uint8)).save(root / "img_align_celeba" / name)
        lines.append(name + " " + " ".join(f"{v:2d}" for v in row))  # the official file pads with spaces
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {p}\n" for i, p in enumerate(partitions)))
    return values


def test_forty_binary_tasks_per_official_partition(tmp_path: Path) -> None:
    values = write_celeba(tmp_path, [0, 0, 1, 2, 0, 2])
    source = DATASETS.get("celeba")
    params = source.Params(name="celeba", root=str(tmp_path))
    specs = source.tasks(params)
    assert len(specs) == 40 and list(specs)[0] == "5_o_clock_shadow" and "smiling" in specs
    assert all(s.kind == "classification" and s.params["num_classes"] == 2 for s in specs.values())
    sizes = {split: len(source.build(params, split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 3, "val": 1, "test": 2}
    test = source.build(params, "test")
    item = test[1]
    assert item["id"] == "000006.jpg" and item["image"].shape == (3, 21, 17)
    smiling = ATTRIBUTES.index("Smiling")
    assert int(item["targets"]["smiling"]) == int(values[5, smiling] == 1)
    assert all(item["valid"].values())
    task = TASKS.get("classification")("smiling", **specs["smiling"].params)
    task.check_target(item["targets"]["smiling"], item["id"])


def test_multilabel_and_attribute_subset(tmp_path: Path) -> None:
    values = write_celeba(tmp_path, [0, 0, 1])
    source = DATASETS.get("celeba")
    params = source.Params(name="celeba", root=str(tmp_path), as_multilabel=True, attributes=["Male", "young"])
    specs = source.tasks(params)
    assert list(specs) == ["attributes"] and specs["attributes"].params["num_labels"] == 2
    item = source.build(params, "train")[1]
    expected = (values[1, [ATTRIBUTES.index("Male"), ATTRIBUTES.index("Young")]] == 1).astype(np.float32)
    assert torch.equal(item["targets"]["attributes"], torch.from_numpy(expected))
    with pytest.raises(ConfigError, match="Smilling"):
        source.tasks(source.Params(name="celeba", root=str(tmp_path), attributes=["Smilling"]))


def test_malformed_files_are_named(tmp_path: Path) -> None:
    write_celeba(tmp_path, [0, 1, 2])
    text = (tmp_path / "list_attr_celeba.txt").read_text().replace(" 1", " 0", 1)
    (tmp_path / "list_attr_celeba.txt").write_text(text)
    source = DATASETS.get("celeba")
    with pytest.raises(DataError, match=r"list_attr_celeba.txt, line 3"):
        source.build(source.Params(name="celeba", root=str(tmp_path)), "train")
    other = tmp_path / "b"
    write_celeba(other, [0, 1])
    (other / "img_align_celeba" / "000001.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(DataError, match="000001.jpg"):
        source.build(source.Params(name="celeba", root=str(other)), "train")[0]
