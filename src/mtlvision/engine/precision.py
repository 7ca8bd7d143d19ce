"""Mixed precision: bf16 autocast on CPU and CUDA, fp16 autocast with a gradient scaler on CUDA."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from mtlvision.errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast context and gradient scaling for ``train.precision``."""

    def __init__(self, name: str, device: torch.device) -> None:
        if name not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
        if name == "fp16" and device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA device; on CPU use bf16")
        self.name = name
        self.device = device
        self.dtype = PRECISIONS[name]
        self.scaler = torch.amp.GradScaler("cuda") if name == "fp16" else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.dtype):
            yield
