"""Prediction on image files (``mtlvision predict``): one JSON and one picture of every task's output per image.

Outputs are given at each image's own size; pictures are drawn at a readable size whatever the input's.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mtlvision.data.io import read_image
from mtlvision.engine.build import image_size, load_model
from mtlvision.engine.rescale import rescale_decoded
from mtlvision.engine.runs import Run
from mtlvision.errors import DataError
from mtlvision.tasks.drawing import compose_panels, display_size, resize_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def image_files(inputs: Iterable[str | Path]) -> list[Path]:
    """The image files named by ``inputs``: files as given, folders searched recursively by suffix."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"predict input {item} does not exist")
    if not files:
        raise DataError("predict found no image among its inputs")
    return files


def _jsonable(value: Any, stem: Path, key: str) -> Any:
    """Replace arrays by files beside the JSON: integer maps as PNG, float maps as .npy; a number that is not
    finite becomes null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _jsonable(v, stem, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, stem, key) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.ndim == 2 and np.issubdtype(value.dtype, np.integer) and value.max(initial=0) < 256:
            path = stem.with_name(f"{stem.name}.{key}.png")
            Image.fromarray(value.astype(np.uint8)).save(path)
        else:
            path = stem.with_name(f"{stem.name}.{key}.npy")
            np.save(path, value)
        return path.name
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Predictions(list):
    """The per-image records of :func:`predict_images` (a list), with ``skipped``: the files that could not
    be read (``{"image": path, "reason": message}``), with ``skip_bad``."""

    def __init__(self, records: Iterable[dict[str, Any]] = (), skipped: Iterable[dict[str, str]] = ()) -> None:
        super().__init__(records)
        self.skipped: list[dict[str, str]] = list(skipped)


def network_input(image: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """The image as the network takes it: ``[1, 3, H, W]`` at the run's input size (bilinear, no antialias,
    as the export description says), or as it is for runs on images of varying size."""
    batch = image[None]
    if size is None or tuple(image.shape[1:]) == tuple(size):
        return batch
    return torch.nn.functional.interpolate(batch, size=size, mode="bilinear", align_corners=False)


def _predict_one(
    model: Any, file: Path, image: torch.Tensor, size: tuple[int, int] | None, out: Path
) -> dict[str, Any]:
    """Predict one image, write its JSON, output files and picture into ``out``; its record."""
    own = (int(image.shape[1]), int(image.shape[2]))
    network = network_input(image, size)
    net_size = (int(network.shape[2]), int(network.shape[3]))
    predictions = model(network)
    shown = display_size(*own)
    picture = resize_image(image.permute(1, 2, 0).numpy(), *shown)
    stem = out / file.stem
    record: dict[str, Any] = {"image": str(file), "size": list(own), "network_size": list(net_size), "tasks": {}}
    tiles = [("input", picture)]
    for name, task in model.tasks.items():
        decoded = task.decode(predictions[name])[0]
        record["tasks"][name] = _jsonable(rescale_decoded(task, decoded, net_size, own), stem, name)
        tiles.append((name, task.draw(picture, rescale_decoded(task, decoded, net_size, shown))))
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    compose_panels(tiles).save(stem.with_suffix(".png"))
    return record


@torch.no_grad()
def predict_images(
    run: str | Path | Run, inputs: Iterable[str | Path], out: str | Path = "preds", *, skip_bad: bool = False
) -> Predictions:
    """Predict every task on images (files or folders): one JSON and one picture per image in ``out``.

    Outputs are at each image's own size (class maps resized nearest, continuous maps bilinearly, boxes
    scaled; see :mod:`mtlvision.engine.rescale`); the picture shows every task at a readable size. A file
    that cannot be read stops the job with a message naming it, or, with ``skip_bad``, is skipped and listed
    in the result's ``skipped`` (and logged) while the other images are predicted.
    """
    model, config = load_model(run)
    size = image_size(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = Predictions()
    for file in image_files(inputs):
        try:
            image = read_image(file)
        except DataError as exc:
            if not skip_bad:
                raise DataError(
                    f"{exc} To skip unreadable images and predict the rest, pass --skip-bad "
                    "(skip_bad=True from Python)."
                ) from None
            logger.warning("skipped an unreadable image: %s", exc)
            results.skipped.append({"image": str(file), "reason": str(exc)})
            continue
        results.append(_predict_one(model, file, image, size, out))
    return results
