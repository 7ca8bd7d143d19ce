"""``predict`` on a newcomer's own images (#16.3, #16.4): outputs at each image's own size, pictures that can be
read whatever the input size, and unreadable files named, or skipped and reported with ``--skip-bad``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mtlvision import api
from mtlvision.cli import main
from mtlvision.engine.rescale import rescale_decoded
from mtlvision.errors import DataError
from mtlvision.tasks import Depth, Detection, Normals, Segmentation
from mtlvision.tasks.drawing import PANEL_MIN, display_size, draw_text, fit_font

TINY = {
    "data.image_size": 32,
    "data.train_size": 16,
    "data.val_size": 8,
    "data.test_size": 8,
    "train.epochs": 1,
    "train.batch_size": 8,
    "train.progress": False,
    "train.device": "cpu",
    "model.backbone": "test_resnet",
    "tasks": ["count", "segmentation", "depth", "normals"],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return api.train("scenes", TINY, out=tmp_path_factory.mktemp("runs"), name="joint").path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((28, 28)) * 255).astype(np.uint8)).save(folder / "digit.png")  # grey, MNIST-sized
    Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).save(folder / "wide.png")
    return folder


@pytest.mark.parametrize(("name", "size"), [("digit", (28, 28)), ("wide", (40, 50))])
def test_outputs_are_at_the_input_images_own_size(run, images, tmp_path, name, size) -> None:
    results = api.predict(run, [images / f"{name}.png"], out=tmp_path)
    record = results[0]
    assert record["size"] == list(size) and record["network_size"] == [32, 32]
    mask = np.array(Image.open(tmp_path / record["tasks"]["segmentation"]["mask"]))
    assert mask.shape == size
    assert sum(record["tasks"]["segmentation"]["class_histogram"].values()) == size[0] * size[1]
    depth = np.load(tmp_path / record["tasks"]["depth"])
    assert depth.shape == size and np.isfinite(depth).all()
    normals = np.load(tmp_path / record["tasks"]["normals"])
    assert normals.shape == (*size, 3)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1.0, rtol=1e-4)


def test_pictures_are_drawn_at_a_readable_size(run, images, tmp_path) -> None:
    assert main(["predict", str(run), str(images / "digit.png"), "--out", str(tmp_path)]) == 0
    picture = Image.open(tmp_path / "digit.png")
    panels = 1 + len(TINY["tasks"])
    assert picture.width == panels * display_size(28, 28)[1] and picture.width >= panels * PANEL_MIN
    assert picture.height > PANEL_MIN


def test_display_size_enlarges_small_and_reduces_large_images() -> None:
    assert display_size(28, 28) == (256, 256)
    assert display_size(32, 128) == (256, 1024)
    assert display_size(3000, 4000) == (768, 1024)
    assert display_size(300, 400) == (300, 400)


def test_labels_are_whole_on_small_panels() -> None:
    """A label wider than the panel is drawn smaller, then wrapped, never cut off."""
    line = "weather: partly cloudy with a chance of rain (0.87)"
    font, lines = fit_font([line], 120, 20)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert "".join(lines) == line and all(measure.textlength(t, font=font) <= 120 for t in lines)
    picture = draw_text(np.zeros((256, 256, 3), np.uint8), [line])
    assert picture.shape == (256, 256, 3) and picture.any()


def test_decoded_results_move_to_the_image_size_by_kind() -> None:
    network, own = (32, 32), (64, 96)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 2
    seg = rescale_decoded(Segmentation("seg", num_classes=3), {"mask": mask, "class_histogram": {}}, network, own)
    assert seg["mask"].shape == own and seg["mask"].dtype == np.uint8
    assert (seg["mask"][:, :48] == 0).all() and (seg["mask"][:, 48:] == 2).all()  # nearest: classes stay whole
    assert sum(seg["class_histogram"].values()) == 64 * 96
    ramp = np.tile(np.linspace(1.0, 2.0, 32, dtype=np.float32), (32, 1))
    depth = rescale_decoded(Depth("depth"), ramp, network, own)
    assert depth.shape == own and 1.0 <= depth.min() and depth.max() <= 2.0 and len(np.unique(depth)) > 32
    normals = np.zeros((32, 32, 3), np.float32)
    normals[..., 2] = 1.0
    moved = rescale_decoded(Normals("normals"), normals, network, own)
    np.testing.assert_allclose(np.linalg.norm(moved, axis=-1), 1.0, rtol=1e-5)
    boxes = {"boxes": [[8.0, 4.0, 16.0, 32.0]], "scores": [0.9], "labels": [0], "class_names": ["a"]}
    scaled = rescale_decoded(Detection("objects", num_classes=1), boxes, network, own)
    assert scaled["boxes"] == [[24.0, 8.0, 48.0, 64.0]] and scaled["scores"] == [0.9]


@pytest.fixture
def folder_with_a_bad_file(images, tmp_path) -> Path:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("digit.png", "wide.png"):
        (folder / name).write_bytes((images / name).read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return folder


def test_an_unreadable_file_stops_predict_with_its_name(run, folder_with_a_bad_file, tmp_path) -> None:
    with pytest.raises(DataError, match=r"broken\.jpg.*--skip-bad"):
        api.predict(run, [folder_with_a_bad_file], out=tmp_path / "p")


def test_skip_bad_predicts_the_rest_and_reports_the_skipped(run, folder_with_a_bad_file, tmp_path) -> None:
    results = api.predict(run, [folder_with_a_bad_file], out=tmp_path / "p", skip_bad=True)
    assert sorted(Path(r["image"]).name for r in results) == ["digit.png", "wide.png"]
    assert [Path(s["image"]).name for s in results.skipped] == ["broken.jpg"]
    assert "cannot decode" in results.skipped[0]["reason"]


def test_skip_bad_on_the_command_line(run, folder_with_a_bad_file, tmp_path, capsys) -> None:
    out = tmp_path / "p"
    assert main(["predict", str(run), str(folder_with_a_bad_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "--skip-bad" in err and "Traceback" not in err
    assert main(["predict", str(run), str(folder_with_a_bad_file), "--out", str(out), "--skip-bad"]) == 0
    printed = capsys.readouterr()
    assert "broken.jpg" in printed.err and "Skipped 1" in " ".join(printed.out.split())
    assert json.loads((out / "wide.json").read_text())["size"] == [40, 50]
