"""Keypoint targets read from tiny files in the folder format (one JSON of instances per image) and the COCO
keypoints format (``person_keypoints_*.json``), and the errors that name the bad file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtlvision.data.datasets import DATASETS
from mtlvision.data.datasets.coco import Coco, CocoParams
from mtlvision.errors import ConfigError, DataError
from mtlvision.tasks import TASKS

NAMES = ["nose", "left_eye", "right_eye"]


def _images(folder: Path, names: list[str], height: int = 20, width: int = 40) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / name)


# ----------------------------------------------------------------------------------------------- folder format
def _folder(root: Path, instances: object) -> object:
    _images(root / "images", ["a.png", "b.png"])
    (root / "keypoints").mkdir()
    (root / "keypoints" / "a.json").write_text(json.dumps({"instances": instances}))
    source = DATASETS.get("folder")
    task = {"kind": "keypoints", "path": "keypoints", "keypoint_names": NAMES, "sigmas": [0.03, 0.02, 0.02]}
    task["flip_pairs"] = [["left_eye", "right_eye"]]
    params = source.Params(name="folder", root=str(root), tasks={"face": task}, val_fraction=0.0, test_fraction=0.0)
    return source, params


def test_the_folder_format_gives_keypoints_and_boxes(tmp_path: Path) -> None:
    instance = {"keypoints": [10, 5, 2, 8, 4, 1, 0, 0, 0], "bbox": [6, 2, 10, 8]}
    source, params = _folder(tmp_path, [instance])
    spec = source.tasks(params)["face"]
    task = TASKS.get(spec.kind)("face", **spec.params)
    assert task.flip_permutation == [0, 2, 1] and task.sigmas == [0.03, 0.02, 0.02]
    train = source.build(params, "train")
    samples = {train[i]["id"]: train[i] for i in range(len(train))}
    target = samples["a.png"]["targets"]["face"]
    assert samples["a.png"]["valid"]["face"] and not samples["b.png"]["valid"]["face"]  # b has no file
    torch.testing.assert_close(target["keypoints"], torch.tensor([[[10.0, 5, 2], [8, 4, 1], [0, 0, 0]]]))
    torch.testing.assert_close(target["boxes"], torch.tensor([[6.0, 2, 16, 10]]))
    task.check_target(target, "a.json")


@pytest.mark.parametrize(
    ("instances", "message"),
    [
        ([{"keypoints": [10, 5, 2, 8, 4], "bbox": [6, 2, 10, 8]}], "must be 9 finite numbers"),
        ([{"keypoints": [10, 5, 3, 8, 4, 1, 0, 0, 0], "bbox": [6, 2, 10, 8]}], "visibility must be 0, 1 or 2"),
        ([{"keypoints": [10, 5, 2, 8, 4, 1, 0, 0, 0], "bbox": [6, 2, 0, 8]}], "bbox must be"),
        ({"keypoints": []}, "expected"),
    ],
)
def test_a_bad_keypoints_file_is_named(tmp_path: Path, instances: object, message: str) -> None:
    source, params = _folder(tmp_path, instances)
    train = source.build(params, "train")
    index = train.keys.index("a.png")
    with pytest.raises(DataError, match=rf"a\.json.*{message}"):
        train[index]


def test_the_folder_keypoints_task_needs_its_names(tmp_path: Path) -> None:
    _images(tmp_path / "images", ["a.png"])
    source = DATASETS.get("folder")
    params = source.Params(name="folder", root=str(tmp_path), tasks={"face": {"kind": "keypoints", "path": "kp"}})
    with pytest.raises(ConfigError, match="keypoint_names"):
        source.tasks(params)


# ------------------------------------------------------------------------------------------------ COCO format
def _coco(root: Path, annotations: list[dict]) -> CocoParams:
    _images(root / "images" / "train", ["p.png", "q.png"])
    content = {
        "images": [
            {"id": 1, "file_name": "p.png", "height": 20, "width": 40},
            {"id": 2, "file_name": "q.png", "height": 20, "width": 40},
        ],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person", "keypoints": NAMES, "skeleton": [[1, 2], [1, 3]]}],
    }
    (root / "annotations").mkdir()
    (root / "annotations" / "person_keypoints_train.json").write_text(json.dumps(content))
    return CocoParams(
        name="coco", root=str(root), image_size=(40, 80), annotation_file="annotations/person_keypoints_{split}.json"
    )


def _person(**fields: object) -> dict:
    person = {
        "id": 7,
        "image_id": 1,
        "category_id": 1,
        "iscrowd": 0,
        "bbox": [4.0, 2.0, 20.0, 12.0],
        "area": 100.0,
        "keypoints": [10, 5, 2, 8, 4, 1, 0, 0, 0],
        "num_keypoints": 2,
        "segmentation": [[4, 2, 24, 2, 24, 14, 4, 14]],
    }
    return {**person, **fields}


def test_coco_keypoints_are_read_scaled_with_names_skeleton_and_flip_pairs(tmp_path: Path) -> None:
    crowd = _person(id=8, iscrowd=1, num_keypoints=0, keypoints=[0] * 9)
    params = _coco(tmp_path, [_person(), crowd])
    spec = Coco.tasks(params)["keypoints"]
    assert spec.params["keypoint_names"] == NAMES
    assert spec.params["skeleton"] == [["nose", "left_eye"], ["nose", "right_eye"]]
    assert spec.params["flip_pairs"] == [["left_eye", "right_eye"]]
    task = TASKS.get(spec.kind)("keypoints", **spec.params, sigmas=[0.03, 0.02, 0.02])
    dataset = Coco.build(params, "train")
    first, second = dataset[0], dataset[1]
    # the image is resized from 40 x 20 to 80 x 40: every coordinate doubles; the crowd annotation is left out
    torch.testing.assert_close(
        first["targets"]["keypoints"]["keypoints"], torch.tensor([[[20.0, 10, 2], [16, 8, 1], [0, 0, 0]]])
    )
    torch.testing.assert_close(first["targets"]["keypoints"]["boxes"], torch.tensor([[8.0, 4, 48, 28]]))
    assert second["valid"]["keypoints"] and second["targets"]["keypoints"]["boxes"].shape == (0, 4)
    task.check_target(first["targets"]["keypoints"], "p.png")


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        (_person(keypoints=[10, 5, 2]), "annotation 7: keypoints must be 9"),
        (_person(keypoints=[10, 5, 2, 8, 4, 7, 0, 0, 0]), "annotation 7: keypoint visibility"),
        (_person(num_keypoints=3), "annotation 7: num_keypoints is 3 but 2 are labelled"),
        (_person(image_id=99), "annotation 7 names image id 99"),
    ],
)
def test_bad_coco_keypoints_are_named(tmp_path: Path, annotation: dict, message: str) -> None:
    params = _coco(tmp_path, [annotation])
    with pytest.raises(DataError, match=rf"person_keypoints_train\.json: {message}"):
        Coco.build(params, "train")


def test_coco_without_keypoint_names_offers_no_keypoints_task(tmp_path: Path) -> None:
    params = _coco(tmp_path, [_person()])
    path = tmp_path / "annotations" / "person_keypoints_train.json"
    content = json.loads(path.read_text())
    content["categories"][0].pop("keypoints")
    path.write_text(json.dumps(content))
    assert "keypoints" not in Coco.tasks(params)
    assert "keypoints" not in Coco.build(params, "train")[0]["targets"]
