"""Training targets and losses of the CenterNet multi-pose head (Zhou, Wang and Krähenbühl, "Objects as Points",
2019, §4; the ``multi_pose`` dataset and loss of the authors' code).

A sample's target is ``{"keypoints": [N, K, 3], "boxes": [N, 4]}``: per instance K keypoints (x, y, v) in pixels
(v as COCO: 0 unlabelled, 1 labelled but hidden, 2 visible) and its box (x1, y1, x2, y2, pixel edges). At output
stride ``s`` a pixel position ``p`` is the cell position ``p / s``; its cell is ``floor(p / s)`` (clamped into the
map, so a point on the image's right or bottom edge belongs to the last cell) and its sub-cell offset the rest.

- The centre heatmap holds, per instance, a Gaussian around its box centre's cell, of radius CenterNet's
  :func:`gaussian_radius` of the box size in cells (sigma = (2 r + 1) / 6, cut at r), the maximum over instances.
  An instance without labelled keypoints gets the Gaussian with its peak at 0.9999 instead of 1 (CenterNet's
  rule: it is no positive, and costs little where predicted).
- Keypoint ``j``'s heatmap holds the same Gaussians around the cells of the instances' labelled keypoints ``j``.
- Regressions, read at each instance's centre cell: the centre's sub-cell offset, the box size in cells (both
  only for instances with labelled keypoints, as CenterNet) and the offset of each labelled keypoint from the
  centre cell; the keypoints' sub-cell offsets are read at each labelled keypoint's cell.

Loss (CenterNet's weights): the penalty-reduced focal loss (alpha 2, beta 4) of both heatmaps, each divided by its
number of peaks, plus the L1 losses of the joint offsets (weight 1), the box size (0.1), the centre offset (1) and
the keypoint offset (1), each divided by its number of labelled entries (coordinates for the joints). Invalid
samples (missing labels) cost nothing. The heatmap probabilities' logarithms are log-sigmoids of the logits, where
CenterNet clamps the sigmoid to [1e-4, 1 - 1e-4].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlvision.tasks.base import pad_instances

#: CenterNet's loss weights of the regressions
JOINT_WEIGHT, SIZE_WEIGHT, CENTER_OFFSET_WEIGHT, KEYPOINT_OFFSET_WEIGHT = 1.0, 0.1, 1.0, 1.0
#: the peak of an instance without labelled keypoints (no positive)
UNSCORED_PEAK = 0.9999


def gaussian_radius(height: Tensor, width: Tensor, min_overlap: float = 0.7) -> Tensor:
    """CenterNet's (and CornerNet's) radius: the smallest of the three radii at which a box displaced by it keeps an
    IoU of ``min_overlap`` with the box of size ``height x width`` (in cells)."""
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1**2 - 4 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + torch.sqrt(b2**2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


@dataclass
class EncodedTargets:
    """The targets of a batch at one stride (``B`` images, ``N`` the batch's largest instance count, ``K`` keypoints;
    positions in cells): heatmaps, then per instance and keypoint the regression targets and their masks."""

    center_heatmap: Tensor  # [B, 1, h, w]
    keypoint_heatmaps: Tensor  # [B, K, h, w]
    center_index: Tensor  # [B, N] flat cell index of the centre
    instance_mask: Tensor  # [B, N] instances with labelled keypoints
    center_offset: Tensor  # [B, N, 2]
    size: Tensor  # [B, N, 2]
    joints: Tensor  # [B, N, K, 2] keypoint minus centre cell
    keypoint_index: Tensor  # [B, N, K] flat cell index of each keypoint
    keypoint_offset: Tensor  # [B, N, K, 2]
    keypoint_mask: Tensor  # [B, N, K] labelled keypoints


def _cells(position: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Integer cells ``[..., 2]`` (x, y) of cell positions, clamped into the map, and the sub-cell offsets."""
    limit = torch.tensor([width - 1, height - 1], device=position.device, dtype=position.dtype)
    cell = torch.minimum(position.floor().clamp_min(0), limit)
    return cell, position - cell


def _gaussians(cells: Tensor, radius: Tensor, height: int, width: int) -> Tensor:
    """``[..., h, w]`` Gaussians of sigma (2 r + 1) / 6 centred on ``cells`` ``[..., 2]``, zero beyond ``r`` cells
    (and below float epsilon of the peak, as CenterNet)."""
    xs = torch.arange(width, device=cells.device, dtype=cells.dtype)
    ys = torch.arange(height, device=cells.device, dtype=cells.dtype)
    dx = xs - cells[..., 0, None]  # [..., w]
    dy = ys - cells[..., 1, None]  # [..., h]
    sigma = ((2 * radius + 1) / 6)[..., None, None]
    square = dy[..., :, None] ** 2 + dx[..., None, :] ** 2
    values = torch.exp(-square / (2 * sigma**2))
    inside = (dy.abs()[..., :, None] <= radius[..., None, None]) & (dx.abs()[..., None, :] <= radius[..., None, None])
    return torch.where(inside & (values >= torch.finfo(values.dtype).eps), values, torch.zeros_like(values))


def encode_targets(
    targets: Sequence[dict[str, Tensor]], num_keypoints: int, stride: int, height: int, width: int, device: torch.device
) -> EncodedTargets:
    """The :class:`EncodedTargets` of a batch for an output map of ``height x width`` cells at ``stride``."""
    fields = {"boxes": ((4,), torch.float32), "keypoints": ((num_keypoints, 3), torch.float32)}
    padded, real = pad_instances(targets, fields, device)
    keypoints, boxes = padded["keypoints"], padded["boxes"]
    boxes = boxes / stride
    labelled = (keypoints[..., 2] > 0) & real[..., None]  # [B, N, K]
    scored = labelled.any(dim=2)  # [B, N]
    size = boxes[..., 2:] - boxes[..., :2]
    radius = gaussian_radius(size[..., 1].ceil(), size[..., 0].ceil()).floor().clamp_min(0)
    center_cell, center_offset = _cells((boxes[..., :2] + boxes[..., 2:]) / 2, height, width)
    peak = torch.where(scored, 1.0, UNSCORED_PEAK) * real
    center = (_gaussians(center_cell, radius, height, width) * peak[..., None, None]).amax(dim=1, keepdim=True)
    keypoint_cell, keypoint_offset = _cells(keypoints[..., :2] / stride, height, width)
    blobs = _gaussians(keypoint_cell, radius[..., None].expand_as(labelled), height, width)
    keypoint_heatmaps = (blobs * labelled[..., None, None]).amax(dim=1)
    return EncodedTargets(
        center_heatmap=center,
        keypoint_heatmaps=keypoint_heatmaps,
        center_index=(center_cell[..., 1] * width + center_cell[..., 0]).long(),
        instance_mask=scored,
        center_offset=center_offset,
        size=size,
        joints=keypoints[..., :2] / stride - center_cell[..., None, :],
        keypoint_index=(keypoint_cell[..., 1] * width + keypoint_cell[..., 0]).long(),
        keypoint_offset=keypoint_offset,
        keypoint_mask=labelled,
    )


def focal_loss(logits: Tensor, heatmap: Tensor, valid: Tensor) -> Tensor:
    """CenterNet's penalty-reduced focal loss over the valid samples' cells, divided by their peaks (cells at 1;
    at least one)."""
    weight = valid.to(logits.dtype)[:, None, None, None]
    probability = logits.sigmoid()
    positive = (heatmap == 1).to(logits.dtype) * weight
    negative = (1 - heatmap).pow(4) * (heatmap < 1).to(logits.dtype) * weight
    positive_loss = F.logsigmoid(logits) * (1 - probability).pow(2) * positive
    negative_loss = F.logsigmoid(-logits) * probability.pow(2) * negative
    return -(positive_loss.sum() + negative_loss.sum()) / positive.sum().clamp_min(1)


def gather_cells(maps: Tensor, index: Tensor) -> Tensor:
    """Values ``[B, *index.shape[1:], C]`` of ``maps`` ``[B, C, h, w]`` at flat cell indices ``index`` ``[B, ...]``."""
    flat = maps.flatten(2).transpose(1, 2)  # [B, h*w, C]
    picked = torch.gather(flat, 1, index.reshape(index.shape[0], -1, 1).expand(-1, -1, flat.shape[2]))
    return picked.reshape(*index.shape, flat.shape[2])


def _l1(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Masked L1 summed over the entries, divided by the masked entries (CenterNet's ``RegL1Loss``)."""
    weight = mask.to(prediction.dtype)
    return ((prediction - target).abs() * weight).sum() / (weight.sum() + 1e-4)


def keypoint_loss(prediction: dict[str, Tensor], encoded: EncodedTargets, valid: Tensor) -> dict[str, Tensor]:
    """Every term of the loss (module docstring), already weighted; their sum is the task's loss."""
    num_keypoints = encoded.keypoint_heatmaps.shape[1]
    valid = valid.to(device=encoded.center_heatmap.device, dtype=torch.bool)
    instance = encoded.instance_mask & valid[:, None]
    keypoint = encoded.keypoint_mask & valid[:, None, None]
    joints = gather_cells(prediction["joints"], encoded.center_index).reshape(*instance.shape, num_keypoints, 2)
    keypoint_offset = gather_cells(prediction["keypoint_offset"], encoded.keypoint_index)
    return {
        "center": focal_loss(prediction["center"], encoded.center_heatmap, valid),
        "keypoint_heatmaps": focal_loss(prediction["keypoint_heatmaps"], encoded.keypoint_heatmaps, valid),
        "joints": JOINT_WEIGHT * _l1(joints, encoded.joints, keypoint[..., None].expand_as(joints)),
        "size": SIZE_WEIGHT
        * _l1(
            gather_cells(prediction["size"], encoded.center_index), encoded.size, instance[..., None].expand(-1, -1, 2)
        ),
        "center_offset": CENTER_OFFSET_WEIGHT
        * _l1(
            gather_cells(prediction["center_offset"], encoded.center_index),
            encoded.center_offset,
            instance[..., None].expand(-1, -1, 2),
        ),
        "keypoint_offset": KEYPOINT_OFFSET_WEIGHT
        * _l1(keypoint_offset, encoded.keypoint_offset, keypoint[..., None].expand_as(keypoint_offset)),
    }


def as_logits(heatmap: Tensor, eps: float = 1e-6) -> Tensor:
    """Logits whose sigmoid is ``heatmap`` (clamped to ``[eps, 1 - eps]``): ideal predictions, for tests and checks."""
    return torch.logit(heatmap.clamp(eps, 1 - eps))
