"""Device selection and reproducibility switches."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from mtlvision.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine; use cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={name!r} but MPS is not available on this machine; use cpu or auto")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; in deterministic mode also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False


def _numpy_state() -> dict[str, object]:
    # NumPy's state holds an ndarray, which weights_only loading refuses: store it as a tensor.
    state = np.random.get_state(legacy=False)
    inner = state["state"]
    return {**state, "state": {"key": torch.from_numpy(inner["key"].astype(np.int64)), "pos": inner["pos"]}}


def rng_state() -> dict[str, object]:
    """Every RNG state a step can touch, as tensors and plain values (safe for weights_only loading)."""
    state: dict[str, object] = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, object]) -> None:
    """Restore the states saved by :func:`rng_state`."""
    py_state = state["python"]
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))  # type: ignore[index]  # random.getstate()'s tuple
    numpy_state = dict(state["numpy"])  # type: ignore[call-overload]  # the dict of _numpy_state()
    numpy_state["state"] = {
        "key": numpy_state["state"]["key"].numpy().astype(np.uint32),
        "pos": int(numpy_state["state"]["pos"]),
    }
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])  # type: ignore[arg-type]  # the tensor of torch.get_rng_state()
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])  # type: ignore[arg-type]  # torch.cuda.get_rng_state_all()'s list
