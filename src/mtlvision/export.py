"""``mtlvision export``: a run's model as one ONNX graph, checked against PyTorch with onnxruntime.

The graph takes ``image`` (float32 ``[batch, C, H, W]`` (NCHW), RGB in [0, 1], the run's input size; the
batch is dynamic) and includes the model's normalisation; an image of another size is resized bilinearly
(``align_corners=False``, no antialiasing) as ``predict`` does, which the JSON's ``preprocess`` spells out.
Every task gives its prediction as ``predict`` sees it before decoding: logits for classification,
multi-label and segmentation, the depth map, unit normals; a detection task gives its per-location outputs
as ``<task>.cls_logits``, ``<task>.box_distances``, ``<task>.centerness``, ``<task>.points`` and
``<task>.strides`` (decode: score ``sqrt(sigmoid(cls) * sigmoid(centerness))``, box ``points -/+
distances``, then class-wise NMS); a keypoints task gives CenterNet's maps as ``<task>.center``,
``<task>.center_offset``, ``<task>.size``, ``<task>.joints``, ``<task>.keypoint_heatmaps`` and
``<task>.keypoint_offset`` at the stride its description names (decode: :mod:`mtlvision.tasks.keypoint_decode`).
A JSON file beside the graph describes every input and output, how to
prepare an image, the tasks' class names and the detection decoding settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mtlvision.errors import ConfigError
from mtlvision.models.multitask import MultiTaskModel

DEFAULT_OPSET = 18


@dataclass
class ExportReport:
    """What was written and how closely onnxruntime reproduced PyTorch on a random batch."""

    onnx: str
    description: str
    outputs: list[str]
    image_size: tuple[int, int]
    opset: int
    max_abs_difference: float


class _FlatOutputs(nn.Module):
    """The model with its outputs flattened into a tuple of tensors, in ``names`` order."""

    def __init__(self, model: MultiTaskModel, names: list[tuple[str, str | None]]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        predictions = self.model(images)
        return tuple(predictions[task] if key is None else predictions[task][key] for task, key in self.names)


def output_names(predictions: dict[str, Any]) -> list[tuple[str, str | None]]:
    """``(task, key)`` of every tensor output: key None for a tensor prediction, the dict key otherwise."""
    names: list[tuple[str, str | None]] = []
    for task, prediction in predictions.items():
        if isinstance(prediction, Tensor):
            names.append((task, None))
        elif isinstance(prediction, dict):
            names += [(task, key) for key, value in prediction.items() if isinstance(value, Tensor)]
        else:
            raise ConfigError(f"task {task!r} predicts a {type(prediction).__name__}, which ONNX cannot return")
    return names


def preprocessing(model: MultiTaskModel, image_size: tuple[int, int]) -> dict[str, Any]:
    """How an image file becomes the graph's input, step by step, exactly as ``mtlvision predict`` does it,
    and how outputs go back to the image's own size (written into the export's JSON description)."""
    height, width = image_size
    mean = [round(float(v), 6) for v in model.mean.flatten()]
    std = [round(float(v), 6) for v in model.std.flatten()]
    return {
        "steps": [
            "decode the file and convert it to RGB (grey and palette images become RGB, alpha is dropped)",
            "to float32 and divide by 255: values in [0, 1]",
            "to layout CHW (channels first), add the batch axis: [1, 3, H, W] (NCHW)",
            f"resize to {height} x {width} bilinearly, without antialiasing: "
            f"torch.nn.functional.interpolate(x, size=({height}, {width}), mode='bilinear', align_corners=False)",
            "do not normalise: the graph subtracts the mean and divides by the std itself",
        ],
        "color": "RGB",
        "dtype": "float32",
        "layout": "NCHW",
        "value_range": [0.0, 1.0],
        "resize": {
            "size": [height, width],
            "mode": "bilinear",
            "align_corners": False,
            "antialias": False,
            "keep_aspect_ratio": False,
        },
        "normalization": {
            "inside_graph": True,
            "mean": mean,
            "std": std,
            "formula": "(image - mean) / std, per channel, done by the graph",
        },
        "outputs_to_image_size": (
            "mtlvision predict gives outputs at the image's own size: class maps (argmax of segmentation logits) "
            "resized by nearest neighbour (source pixel floor(i * h / H)), depth and normal maps bilinearly "
            "(normals renormalised), edge probabilities (sigmoid of the edge logits) bilinearly, boxes scaled by the "
            "ratio of the sizes (keypoints too)"
        ),
    }


def export_onnx(
    model: MultiTaskModel,
    path: str | Path,
    image_size: tuple[int, int],
    *,
    opset: int = DEFAULT_OPSET,
    check_batch: int = 2,
    tolerance: float = 1e-3,
) -> ExportReport:
    """Write ``model`` to ``path`` as ONNX (dynamic batch), check it with onnxruntime, describe it in JSON.

    Raises :class:`ConfigError` when the ONNX packages are missing, and when onnxruntime's outputs differ
    from PyTorch's by more than ``tolerance`` relative to each output's largest magnitude.
    """
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as exc:
        raise ConfigError(f"ONNX export needs the export extra: pip install 'mtlvision[export]' ({exc})") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu().merged()
    channels = int(model.mean.shape[1])
    generator = torch.Generator().manual_seed(0)
    examples = [torch.rand(n, channels, *image_size, generator=generator) for n in (check_batch, check_batch + 1)]
    with torch.no_grad():
        names = output_names(model(examples[0]))
    flat_names = [task if key is None else f"{task}.{key}" for task, key in names]
    wrapper = _FlatOutputs(model, names).eval()
    program = torch.onnx.export(
        wrapper,
        (examples[0],),
        dynamo=True,
        input_names=["image"],
        output_names=flat_names,
        opset_version=opset,
        dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}},
        external_data=False,
        verbose=False,
    )
    assert program is not None  # torch.onnx.export returns an ONNXProgram when dynamo=True
    program.save(str(path))

    # two batch sizes: the outputs must match PyTorch's, and the batch must really be dynamic
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst, shapes = 0.0, []
    for example in examples:
        got = session.run(flat_names, {"image": example.numpy()})
        with torch.no_grad():
            want = [t.float().numpy() for t in wrapper(example)]
        for name, reference, theirs in zip(flat_names, want, got, strict=True):
            if reference.shape != theirs.shape:
                raise ConfigError(f"ONNX output {name!r} has shape {theirs.shape}, PyTorch gives {reference.shape}")
            difference = float(np.abs(reference - theirs).max()) if reference.size else 0.0
            scale = max(1.0, float(np.abs(reference).max()) if reference.size else 1.0)
            if difference > tolerance * scale:
                raise ConfigError(
                    f"the exported graph's output {name!r} differs from PyTorch by {difference:.3g} (tolerance "
                    f"{tolerance * scale:.3g}); {path} was written but should not be trusted"
                )
            worst = max(worst, difference)
        shapes.append([r.shape for r in want])
    outputs = [
        {"name": name, "task": task, "shape": ["batch" if a != b else a for a, b in zip(small, large, strict=True)]}
        for name, (task, _), small, large in zip(flat_names, names, *shapes, strict=True)
    ]
    description = path.with_suffix(".json")
    description.write_text(
        json.dumps(
            {
                "opset": opset,
                "input": {
                    "name": "image",
                    "shape": ["batch", channels, *image_size],
                    "dtype": "float32",
                    "layout": "NCHW",
                    "range": [0.0, 1.0],
                    "note": "the model's normalisation is inside the graph",
                },
                "preprocess": preprocessing(model, image_size),
                "outputs": outputs,
                "tasks": {name: task.describe() for name, task in model.tasks.items()},
            },
            indent=2,
        )
        + "\n"
    )
    return ExportReport(str(path), str(description), flat_names, image_size, opset, worst)
