"""Checkpoints and weights files: written atomically, read without unpickling anything.

- Model weights: safetensors (``model.safetensors``), with the mtlvision version and a model signature in
  the metadata so that a file for another model is refused with the mismatch named; a task-modulated model
  (EMR-merging) records its :class:`ModulationLayout` there too (:func:`modulation_layout`).
- Resumable checkpoints (``checkpoint.pt``): a dict of tensors and plain Python values saved with
  ``torch.save`` and read back with ``torch.load(weights_only=True)``, which refuses pickled code.
Every write goes to a temporary file in the same folder and is moved into place with ``os.replace``, so a
crash or kill during a write leaves the previous file intact; the file gets the ordinary mode of a new file
(0666 less the umask, 0644 usually). Weights read back are checked: floating tensors must be finite, and a
tensor must have the kind of dtype (floating or integer) the model has there.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mtlvision._version import __version__
from mtlvision.errors import CheckpointError, ConfigError
from mtlvision.models.modulated import ModulationLayout, TaskModulatedModel

#: the metadata key of a weights file holding a task-modulated model's layout
MODULATION_KEY = "modulation"


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path`` and atomically move it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _new_file_mode())  # mkstemp makes 0600; a run's files are read by others like any file
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process's umask (read without changing it where the
    system says it, as setting it to read it back is not thread-safe)."""
    try:
        with open("/proc/self/status") as status:
            mask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def read_weights(path: Path, like: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, refused (CheckpointError) when the file is unreadable, a floating
    tensor holds an infinite or NaN value, or a tensor is integer where ``like`` (the model's state) is
    floating, or the other way round."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); it is truncated or was not written by mtlvision"
        ) from None
    like = like or {}
    wrong = [
        f"{k} ({v.dtype}, model {like[k].dtype})"
        for k, v in state.items()
        if k in like and v.is_floating_point() != like[k].is_floating_point()
    ]
    if wrong:
        raise CheckpointError(
            f"{path} holds tensors of the wrong kind of dtype: {', '.join(wrong[:3])}"
            + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
            + "; it was not saved from this model"
        )
    non_finite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if non_finite:
        raise CheckpointError(
            f"{path} holds infinite or NaN values in {len(non_finite)} tensor(s) (e.g. {', '.join(non_finite[:3])}); "
            "the weights are corrupt or training diverged: retrain, or lower train.lr"
        )
    return state


def model_signature(model: nn.Module) -> str:
    """A short description of the parameter layout, stored with weights to detect mismatches."""
    state = model.state_dict()
    return f"{len(state)} tensors, {sum(t.numel() for t in state.values())} values"


def modulation_layout(path: Path) -> ModulationLayout | None:
    """The task modulation recorded in a weights file (EMR-merging's one backbone per task), or None."""
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    text = metadata.get(MODULATION_KEY)
    if text is None:
        return None
    try:
        return ModulationLayout.from_json(text, str(path))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def save_weights(model: nn.Module, path: Path) -> None:
    """Save the model's state dict as safetensors (shared tensors are stored once, contiguously), with a
    task-modulated model's layout in the metadata."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"mtlvision_version": __version__, "signature": model_signature(model)}
    if isinstance(model, TaskModulatedModel):
        metadata[MODULATION_KEY] = model.layout.to_json()
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def load_weights(model: nn.Module, path: Path, strict: bool = True) -> None:
    """Load safetensors weights into ``model``, naming missing, unexpected or mis-shaped tensors."""
    path = Path(path)
    own = model.state_dict()
    state = read_weights(path, like=own)
    if not isinstance(model, TaskModulatedModel) and modulation_layout(path) is not None:
        raise CheckpointError(
            f"{path} holds a task-specific merged backbone (EMR-merging: one start, a unified vector and a mask per "
            "task), not one set of weights: load its run folder with mtlvision.load_model, which rebuilds it"
        )
    mis_shaped = [
        f"{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if mis_shaped or (strict and (missing or unexpected)):
        parts = []
        if mis_shaped:
            parts.append("shapes differ for " + ", ".join(mis_shaped[:5]))
        if missing:
            parts.append(f"{len(missing)} tensors missing from the file (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(
            f"{path} does not match this model: "
            + "; ".join(parts)
            + ". Was it saved from a model with other tasks, backbone or architecture?"
        )
    model.load_state_dict(state, strict=strict)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomically save a resumable checkpoint (tensors and plain values only)."""
    payload = {"mtlvision_version": __version__, **state}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: a file carrying pickled code is refused unrun."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols concern it, not the user
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or others for foreign files
        raise CheckpointError(
            f"{path} is not a safe mtlvision checkpoint and was not loaded: {_refusal_reason(exc)}. "
            "mtlvision never unpickles code; a checkpoint it wrote holds only tensors and plain values."
        ) from None
    if not isinstance(state, dict) or "mtlvision_version" not in state:
        raise CheckpointError(f"{path} is not an mtlvision checkpoint")
    return state


def _refusal_reason(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, without torch's advice to load it unsafely."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it refers to Python code ({found.group(1)}), which a checkpoint never holds"
    if "Unsupported operand" in text or "WeightsUnpickler" in text:
        return "it is not a file written by torch.save (its pickle stream holds operations a checkpoint never has)"
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip()
        and "weights_only" not in line
        and "Weights only load failed" not in line
        and "file an issue" not in line
        and "documentation of torch.load" not in line
    ]
    return f"{type(exc).__name__}: {lines[0] if lines else 'unreadable'}"
