"""Prediction entropy of each task kind on unlabelled images: what AdaMerging minimises.

Yang et al. (AdaMerging, ICLR 2024) learn merge coefficients by minimising the Shannon entropy of the merged
model's class distribution on unlabelled test batches (``-(softmax · log_softmax).sum(1)``, mean over the
batch). The same quantity exists for every task here whose output is a distribution:

- classification: the softmax entropy per sample;
- segmentation: the softmax entropy per pixel (a per-pixel classifier);
- multilabel: per sample, the summed Bernoulli entropies of its labels' sigmoids (labels are independent);
- detection (FCOS): per location, the summed Bernoulli entropies of its class scores.

Each is averaged over samples (and pixels or locations). Depth and normals are regressions: their outputs
define no distribution, so no entropy is registered for them (see
:mod:`mtlvision.engine.merging.test_time` for what AdaMerging does with them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from mtlvision.registry import Registry

Entropy = Callable[[Any], Tensor]
PREDICTION_ENTROPY: Registry[Entropy] = Registry("prediction entropy (by task kind)")


def softmax_entropy(logits: Tensor) -> Tensor:
    """The entropy of softmax over dim 1, per sample (and pixel): ``[B, C, ...] -> [B, ...]``."""
    logits = logits.float()
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def bernoulli_entropy(logits: Tensor) -> Tensor:
    """The entropy of Bernoulli(σ(logit)), elementwise: H(σ(x)) = BCE(x, σ(x))."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.sigmoid(logits), reduction="none")


@PREDICTION_ENTROPY.register("classification", "softmax entropy per sample", "Yang et al., AdaMerging, ICLR 2024")
def classification_entropy(logits: Tensor) -> Tensor:
    return softmax_entropy(logits).mean()


@PREDICTION_ENTROPY.register("segmentation", "softmax entropy per pixel, mean over pixels")
def segmentation_entropy(logits: Tensor) -> Tensor:
    return softmax_entropy(logits).mean()


@PREDICTION_ENTROPY.register("multilabel", "sum of the labels' Bernoulli entropies per sample")
def multilabel_entropy(logits: Tensor) -> Tensor:
    return bernoulli_entropy(logits).sum(1).mean()


@PREDICTION_ENTROPY.register("detection", "sum of the class scores' Bernoulli entropies per location")
def detection_entropy(outputs: dict[str, Any]) -> Tensor:
    return bernoulli_entropy(outputs["cls_logits"]).sum(-1).mean()
