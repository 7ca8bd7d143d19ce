"""The options of ``mtlvision serve``: backend, device, batching and the limits on what a request may send."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mtlvision.errors import ConfigError

BACKEND_NAMES = ("torch", "onnx")
"""The backends a service can run its model on (see :mod:`mtlvision.serving.backends`)."""


@dataclass(frozen=True)
class ServeSettings:
    """How a service runs and what it accepts; every limit has a safe default.

    Args:
        backend: ``torch`` (the run's weights) or ``onnx`` (the exported graph through onnxruntime).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        max_batch: most images run in one forward pass.
        max_wait_ms: how long the first image of a batch waits for others to join it.
        max_images: most images in one request.
        max_upload_bytes: most bytes in one request body (all its images together).
        max_pixels: most pixels of one image, checked from its header before it is decoded.
        onnx: the ONNX graph for the onnx backend (default: ``RUN/model.onnx``, written by ``mtlvision export``).
        threads: intra-op threads for the model, PyTorch's or onnxruntime's (default: theirs, one per core).
    """

    backend: str = "torch"
    device: str = "cpu"
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_images: int = 16
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 16_777_216
    onnx: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_NAMES:
            raise ConfigError(f"serve backend {self.backend!r}: choose one of {', '.join(BACKEND_NAMES)}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ConfigError(f"serve device {self.device!r}: choose cpu, cuda or cuda:N")
        for name in ("max_batch", "max_images", "max_upload_bytes", "max_pixels", "threads"):
            value = getattr(self, name)
            if name == "threads" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"serve {name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_wait_ms, (int, float)) or not 0 <= self.max_wait_ms <= 10_000:
            raise ConfigError(f"serve max_wait_ms must be between 0 and 10000 ms, got {self.max_wait_ms!r}")

    def limits(self) -> dict[str, Any]:
        """The limits a client must respect, as ``/model`` reports them."""
        return {k: v for k, v in asdict(self).items() if k in ("max_images", "max_upload_bytes", "max_pixels")}
