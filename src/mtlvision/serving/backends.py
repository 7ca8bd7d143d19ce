"""What runs the network for a service: the run's PyTorch model, or its exported ONNX graph through
onnxruntime. Both take a float32 ``[B, 3, H, W]`` batch in [0, 1] (the model normalises) and give the
predictions dict that the tasks' ``decode`` reads, so everything after the network is shared.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from mtlvision.errors import ConfigError
from mtlvision.models.multitask import MultiTaskModel


class Backend(Protocol):
    """A network behind a service: a batch of images in, ``{task: prediction}`` out."""

    name: str
    device: str

    def __call__(self, images: Tensor) -> dict[str, Any]: ...


class TorchBackend:
    """The run's model in PyTorch, in eval mode, on ``device`` (``onnx`` is the other backend's; PyTorch's
    ``threads`` are set in the model's worker thread by the service)."""

    name = "torch"

    def __init__(
        self, model: MultiTaskModel, device: str, onnx: Path | None = None, threads: int | None = None
    ) -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"serve device {device!r}: CUDA is not available on this machine")
        self.device = device
        self.model = model.eval().to(device)

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> dict[str, Any]:
        return self.model(images.to(self.device, non_blocking=True))


class OnnxBackend:
    """The graph written by ``mtlvision export``, run by onnxruntime.

    The graph returns tensors only; a task whose prediction is a dict with other values (detection's input
    size) gets them from one PyTorch pass at start-up, since the graph's input size is fixed.
    """

    name = "onnx"

    def __init__(
        self, model: MultiTaskModel, device: str, onnx: Path | None = None, threads: int | None = None
    ) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise ConfigError(f"the onnx backend needs onnxruntime: pip install 'mtlvision[export]' ({exc})") from None
        if onnx is None or not onnx.is_file():
            raise ConfigError(f"{onnx}: no ONNX graph there; write it with `mtlvision export RUN` (or pass --onnx)")
        description_file = onnx.with_suffix(".json")
        if not description_file.is_file():
            raise ConfigError(f"{description_file}: the export's description is missing; run `mtlvision export` again")
        description = json.loads(description_file.read_text())
        self.image_size = (int(description["input"]["shape"][2]), int(description["input"]["shape"][3]))
        self.outputs = [(o["name"], o["task"]) for o in description["outputs"]]
        missing = sorted(set(model.tasks) - {task for _, task in self.outputs})
        if missing:
            raise ConfigError(f"{onnx}: the graph has no output for task(s) {', '.join(missing)}; export the run again")
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                raise ConfigError(
                    f"serve device {device!r} with the onnx backend needs onnxruntime-gpu (CUDAExecutionProvider)"
                )
            index = int(device.split(":")[1]) if ":" in device else 0
            providers = [("CUDAExecutionProvider", {"device_id": index})]  # type: ignore[list-item]  # ort's form
        self.device = device
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(onnx), options, providers=providers)
        with torch.no_grad():
            probe = model.eval().cpu()(torch.zeros(1, 3, *self.image_size))
        self.constants = {
            task: {k: v for k, v in prediction.items() if not isinstance(v, Tensor)}
            for task, prediction in probe.items()
            if isinstance(prediction, dict)
        }

    def __call__(self, images: Tensor) -> dict[str, Any]:
        if tuple(images.shape[2:]) != self.image_size:
            raise ConfigError(f"the ONNX graph takes {self.image_size} images, got {tuple(images.shape[2:])}")
        names = [name for name, _ in self.outputs]
        values = self.session.run(names, {"image": np.ascontiguousarray(images.numpy(), dtype=np.float32)})
        predictions: dict[str, Any] = {}
        for (name, task), value in zip(self.outputs, values, strict=True):
            tensor = torch.from_numpy(np.asarray(value))
            if name == task:
                predictions[task] = tensor
            else:
                predictions.setdefault(task, dict(self.constants.get(task, {})))[name[len(task) + 1 :]] = tensor
        return predictions


BACKENDS: dict[str, Callable[[MultiTaskModel, str, Path | None, int | None], Backend]] = {
    "torch": TorchBackend,
    "onnx": OnnxBackend,
}
"""Backend name -> its constructor ``(model, device, onnx_path, threads)``; ``threads`` sets onnxruntime's
intra-op threads (PyTorch's are set in the model's worker thread, see the service)."""
