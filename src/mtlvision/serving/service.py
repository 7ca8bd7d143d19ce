"""A served run: uploads decoded, batched through the backend, decoded per task at each image's own size.

Each image goes through the same steps as ``mtlvision predict`` (:mod:`mtlvision.engine.predict`): decoded
to RGB in [0, 1], resized bilinearly to the run's input size, run through the network, decoded by its tasks
and rescaled to the image's own size; so the service and ``predict`` give the same results.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from mtlvision.engine.build import image_size, load_model
from mtlvision.engine.predict import network_input
from mtlvision.engine.rescale import rescale_decoded
from mtlvision.engine.runs import Run
from mtlvision.errors import ConfigError
from mtlvision.export import preprocessing
from mtlvision.serving.backends import BACKENDS
from mtlvision.serving.batcher import DynamicBatcher
from mtlvision.serving.encode import MAP_FORMATS, MASK_FORMATS, VIEW_KINDS, Formats, encode_result
from mtlvision.serving.settings import ServeSettings
from mtlvision.serving.uploads import Upload, decode_upload
from mtlvision.tasks.drawing import display_size, resize_image


@dataclass
class Prepared:
    """An upload ready for the network: its name, the image at its own size and at the network's."""

    name: str
    image: Tensor
    network: Tensor


class Service:
    """A run's model served with dynamic batching (start the batcher with :meth:`start` on the event loop).

    Args:
        run: a run folder (or a loaded :class:`~mtlvision.engine.runs.Run`).
        settings: backend, device, batching and limits.
    """

    def __init__(self, run: str | Path | Run, settings: ServeSettings | None = None) -> None:
        self.settings = settings or ServeSettings()
        self.run = run if isinstance(run, Run) else Run.load(run)
        model, config = load_model(self.run)
        self.tasks = model.tasks
        onnx = Path(self.settings.onnx) if self.settings.onnx else self.run.path / "model.onnx"
        self.backend = BACKENDS[self.settings.backend](model, self.settings.device, onnx, self.settings.threads)
        self.size = image_size(config)
        graph_size = getattr(self.backend, "image_size", None)
        if graph_size is not None and self.size is not None and tuple(graph_size) != tuple(self.size):
            raise ConfigError(f"{onnx} takes {graph_size} images but the run's input size is {self.size}")
        self.size = self.size or graph_size
        self.preprocess = preprocessing(model, self.size) if self.size is not None else None
        threads = self.settings.threads
        setup = (lambda: torch.set_num_threads(threads)) if threads is not None else None
        self.batcher = DynamicBatcher(
            self.run_batch, self.settings.max_batch, self.settings.max_wait_ms / 1000, setup=setup
        )

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    def describe(self) -> dict[str, Any]:
        """What ``/model`` returns: tasks, class names, input size, preprocessing, limits, formats."""
        return {
            "run": self.run.path.name,
            "backend": self.backend.name,
            "device": self.backend.device,
            "tasks": {
                name: {**task.describe(), "target_kind": task.target_kind.value, "level": task.level}
                for name, task in self.tasks.items()
            },
            "input_size": list(self.size) if self.size is not None else None,
            "preprocess": self.preprocess,
            "batching": {"max_batch": self.settings.max_batch, "max_wait_ms": self.settings.max_wait_ms},
            "limits": self.settings.limits(),
            "formats": {"masks": list(MASK_FORMATS), "maps": list(MAP_FORMATS), "view": [0, 1]},
        }

    def prepare(self, upload: Upload) -> Prepared:
        """Decode and check one upload (:class:`~mtlvision.serving.uploads.ServeError` when refused)."""
        image = decode_upload(upload, self.settings.max_pixels)
        return Prepared(upload.name, image, network_input(image, self.size)[0])

    def run_batch(self, images: Sequence[Tensor]) -> list[dict[str, Any]]:
        """Network inputs -> per image, every task's decoded result at the network's size (images of one size
        run together; a run without a fixed input size may give several)."""
        results: list[dict[str, Any]] = [{} for _ in images]
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(index)
        for indices in groups.values():
            predictions = self.backend(torch.stack([images[i] for i in indices]))
            for name, task in self.tasks.items():
                for index, decoded in zip(indices, task.decode(predictions[name]), strict=True):
                    results[index][name] = decoded
        return results

    def finish(self, prepared: Prepared, decoded: dict[str, Any], formats: Formats) -> dict[str, Any]:
        """Every task's result at the image's own size, encoded; with ``formats.view`` the pictures of the
        dense tasks (the task's own drawing at a readable size, a PNG data URL)."""
        own = (int(prepared.image.shape[1]), int(prepared.image.shape[2]))
        net = (int(prepared.network.shape[1]), int(prepared.network.shape[2]))
        record: dict[str, Any] = {"name": prepared.name, "size": list(own), "network_size": list(net), "tasks": {}}
        shown = display_size(*own)
        picture = resize_image(prepared.image.permute(1, 2, 0).numpy(), *shown) if formats.view else None
        for name, task in self.tasks.items():
            result = encode_result(task, rescale_decoded(task, decoded[name], net, own), formats)
            if picture is not None and task.target_kind in VIEW_KINDS:
                drawn = task.draw(picture, rescale_decoded(task, decoded[name], net, shown))
                buffer = io.BytesIO()
                Image.fromarray(drawn).save(buffer, format="PNG")
                result["view"] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            record["tasks"][name] = result
        return record

    async def predict(self, uploads: Sequence[Upload], formats: Formats) -> dict[str, Any]:
        """Every task's result for each upload, with timings (ms): decode, then each image batched with
        whatever else is waiting, then rescaled and encoded."""
        started = time.perf_counter()
        prepared = await asyncio.to_thread(lambda: [self.prepare(upload) for upload in uploads])
        decoded_at = time.perf_counter()
        batched = await asyncio.gather(*(self.batcher.submit(p.network) for p in prepared))
        images = []
        for item, result in zip(prepared, batched, strict=True):
            encode_start = time.perf_counter()
            record = await asyncio.to_thread(self.finish, item, result.value, formats)
            record["timings_ms"] = {
                "queue": round(result.queue_ms, 3),
                "model": round(result.model_ms, 3),
                "batch_size": result.batch_size,
                "encode": round((time.perf_counter() - encode_start) * 1000, 3),
            }
            images.append(record)
        total = time.perf_counter() - started
        return {
            "images": images,
            "timings_ms": {"decode": round((decoded_at - started) * 1000, 3), "total": round(total * 1000, 3)},
        }

    def health(self) -> dict[str, Any]:
        """What ``/health`` returns: the service is up, and how many images and batches it has run."""
        batcher = self.batcher
        return {
            "status": "ok",
            "backend": self.backend.name,
            "images": batcher.items,
            "batches": batcher.batches,
            "mean_batch": round(batcher.items / batcher.batches, 3) if batcher.batches else None,
        }
