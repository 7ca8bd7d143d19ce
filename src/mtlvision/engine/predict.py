"""Prediction on image files (``mtlvision predict``): one JSON and one picture of every task's output per image."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from mtlvision.data.io import read_image
from mtlvision.engine.build import image_size, load_model
from mtlvision.engine.runs import Run
from mtlvision.errors import DataError

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


def _panel(image: np.ndarray, drawings: dict[str, np.ndarray]) -> Image.Image:
    tiles = [("input", image)] + list(drawings.items())
    height = max(t.shape[0] for _, t in tiles)
    width = sum(t.shape[1] for _, t in tiles)
    canvas = Image.new("RGB", (width, height + 14), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for title, tile in tiles:
        canvas.paste(Image.fromarray(tile), (x, 14))
        draw.text((x + 2, 1), title, fill="black")
        x += tile.shape[1]
    return canvas


@torch.no_grad()
def predict_images(run: str | Path | Run, inputs: Iterable[str | Path], out: str | Path = "preds") -> list[dict[str, Any]]:
    """Predict every task on images (files or folders): one JSON and one picture per image in ``out``."""
    model, config = load_model(run)
    size = image_size(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for file in image_files(inputs):
        image = read_image(file)
        if size is not None:
            image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        predictions = model(image[None])
        picture = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        stem = out / file.stem
        record: dict[str, Any] = {"image": str(file), "tasks": {}}
        drawings = {}
        for name, task in model.tasks.items():
            decoded = task.decode(predictions[name])[0]
            record["tasks"][name] = _jsonable(decoded, stem, name)
            drawings[name] = task.draw(picture, decoded)
        stem.with_suffix(".json").write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
        _panel(picture, drawings).save(stem.with_suffix(".png"))
        results.append(record)
    return results
