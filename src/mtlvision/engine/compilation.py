"""``train.compile``: the model's forwards through ``torch.compile``, with the shared representation kept
as a boundary between two graphs.

Gradient balancing differentiates each task's loss with respect to the trunk's output. In one compiled
graph that output would only be a sibling of the predictions (autograd sees one node producing both) and
its gradient would silently be zero; compiling the trunk (``encode``) and the rest (``decode`` and the
heads) as two graphs, with the cut representation between them, keeps it an ordinary autograd edge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mtlvision.errors import ConfigError
from mtlvision.models.multitask import CutRepresentation, MultiTaskModel


class CompiledModel:
    """``forward`` and ``forward_cut`` of ``model``, compiled on first use.

    A failure to compile raises :class:`ConfigError` naming the cause (``train.compile=true`` is never
    dropped silently); an architecture without a shared representation still raises
    :class:`RepresentationUnavailable`.
    """

    def __init__(self, model: MultiTaskModel) -> None:
        self.model = model
        self._forward = torch.compile(model)
        self._encode = torch.compile(model.encode)
        self._predict = torch.compile(model.predict_from_representation)

    def __call__(self, images: Tensor) -> dict[str, Any]:
        return _reported(self._forward, images)

    def forward_cut(self, images: Tensor) -> tuple[dict[str, Any], CutRepresentation]:
        cut = CutRepresentation.of(_reported(self._encode, images))
        return _reported(self._predict, cut.inputs, images.shape[-2:]), cut


def _reported(function: Callable[..., Any], *args: Any) -> Any:
    try:
        return function(*args)
    except torch._dynamo.exc.TorchDynamoException as exc:  # compile-time failures (graph capture, backend)
        raise ConfigError(f"train.compile=true failed on this set-up: {type(exc).__name__}: {exc}") from None
