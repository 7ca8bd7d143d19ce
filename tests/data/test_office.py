"""Office-31 / Office-Home from LibMTL's list files: one domain per task, each with its own images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtlvision.data.datasets import DATASETS
from mtlvision.data.sampling import MultiSourceBatchSampler, MultiSourceDataset
from mtlvision.errors import DataError

DOMAINS = ("amazon", "dslr", "webcam")


def write_office31(root: Path, counts: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    lists = root / "data_txt" / "office-31"
    lists.mkdir(parents=True)
    for domain, count in counts.items():
        for split in ("train", "val", "test"):
            lines = []
            for i in range(count):
                label = int(rng.integers(0, 31))
                rel = f"{domain}/images/class_{label}/frame_{split}_{i:04d}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (10 + i, 12, 3), dtype=np.uint8)).save(root / rel)
                lines.append(f"{rel} {label}")
            (lists / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")


def test_each_domain_is_a_task_with_its_own_images(tmp_path: Path) -> None:
    write_office31(tmp_path, {"amazon": 4, "dslr": 2, "webcam": 3})
    source = DATASETS.get("office31")
    params = source.Params(name="office31", root=str(tmp_path))
    specs = source.tasks(params)
    assert list(specs) == list(DOMAINS) and all(s.params["num_classes"] == 31 for s in specs.values())
    train = source.build(params, "train")
    assert isinstance(train, MultiSourceDataset) and train.sizes == [4, 2, 3] and len(train) == 9
    lines = (tmp_path / "data_txt" / "office-31" / "dslr_train.txt").read_text().split("\n")
    item = train[5]  # the second dslr image
    assert item["valid"] == {"amazon": False, "dslr": True, "webcam": False}
    assert int(item["targets"]["dslr"]) == int(lines[1].split()[1])
    assert item["id"] == "dslr:" + lines[1].split()[0]
    assert item["targets"]["amazon"].dtype == torch.int64  # the placeholder of the other tasks


def test_officehome_domains_and_custom_list_dir(tmp_path: Path) -> None:
    source = DATASETS.get("officehome")
    assert list(source.tasks(source.Params(name="officehome"))) == ["art", "clipart", "product", "real_world"]
    lists = tmp_path / "my_lists"
    lists.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    for domain in ("Art", "Clipart", "Product", "Real_World"):
        (lists / f"{domain}_test.txt").write_text("a.jpg 64\n")
    test = source.build(source.Params(name="officehome", root=str(tmp_path), list_dir="my_lists"), "test")
    assert len(test) == 4 and int(test[3]["targets"]["real_world"]) == 64


def test_bad_list_lines_are_named(tmp_path: Path) -> None:
    write_office31(tmp_path, {"amazon": 2, "dslr": 1, "webcam": 1})
    path = tmp_path / "data_txt" / "office-31" / "webcam_val.txt"
    path.write_text(path.read_text() + "webcam/images/x.jpg 31\n")
    source = DATASETS.get("office31")
    with pytest.raises(DataError, match=r"webcam_val.txt, line 2: class 31"):
        source.build(source.Params(name="office31", root=str(tmp_path)), "val")


def test_sampler_mixes_domains_in_every_batch(tmp_path: Path) -> None:
    write_office31(tmp_path, {"amazon": 6, "dslr": 2, "webcam": 4})
    source = DATASETS.get("office31")
    train = source.build(source.Params(name="office31", root=str(tmp_path)), "train")
    sampler = MultiSourceBatchSampler(train.sizes, batch_size=3, strategy="round_robin")
    for batch in sampler:
        assert sorted(train.locate(i)[0] for i in batch) == [0, 1, 2]
