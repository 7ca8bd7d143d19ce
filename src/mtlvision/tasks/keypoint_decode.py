"""Decoding of the CenterNet multi-pose outputs (Zhou, Wang and Krähenbühl, "Objects as Points", 2019, §4, and the
``multi_pose_decode`` of the authors' code) into instances with keypoints, in pixels.

1. The centre heatmap's peaks (cells equal to the maximum of their 3 x 3 neighbourhood), the ``top_k`` highest:
   each is an instance, scored by its centre probability. Its box is the centre (cell + sub-cell offset) with the
   regressed size around it.
2. Its keypoints are regressed: the centre cell plus the joint offsets.
3. Each keypoint heatmap's ``top_k`` peaks above ``keypoint_threshold`` (cell + the keypoint sub-cell offset) are
   candidates; a regressed keypoint snaps to its nearest candidate unless that candidate lies outside the
   instance's box or farther than 0.3 times the box's longer side, as CenterNet does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlvision.tasks.keypoint_targets import gather_cells

#: a snapped keypoint lies within this fraction of its instance box's longer side (CenterNet)
SNAP_DISTANCE = 0.3


@dataclass
class DecodedInstances:
    """A batch's instances, ``T`` per image in decreasing score, positions in pixels."""

    scores: Tensor  # [B, T]
    boxes: Tensor  # [B, T, 4] x1, y1, x2, y2
    keypoints: Tensor  # [B, T, K, 2] x, y
    keypoint_scores: Tensor  # [B, T, K] the snapped peak's probability; 0 where the regression was kept


def heatmap_peaks(probability: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Scores and flat cell indices ``[B, C, k]`` of the ``k = min(top_k, h * w)`` highest 3 x 3 local maxima of
    each channel of ``probability`` ``[B, C, h, w]``."""
    kept = probability * (F.max_pool2d(probability, 3, stride=1, padding=1) == probability)
    return kept.flatten(2).topk(min(top_k, kept.shape[2] * kept.shape[3]), dim=2)


def _positions(index: Tensor, width: int) -> Tensor:
    """Cells ``[..., 2]`` (x, y) of flat cell indices."""
    return torch.stack([index % width, torch.div(index, width, rounding_mode="floor")], dim=-1).float()


def decode_instances(
    prediction: dict[str, Tensor], top_k: int, keypoint_threshold: float, stride: int
) -> DecodedInstances:
    """The instances of a batch of raw head outputs (module docstring); ``top_k`` instances per image."""
    center = prediction["center"].float().sigmoid()
    batch, _, height, width = center.shape
    scores, index = heatmap_peaks(center, top_k)
    scores, index = scores[:, 0], index[:, 0]  # [B, T]
    cell = _positions(index, width)
    middle = cell + gather_cells(prediction["center_offset"].float(), index)
    half = gather_cells(prediction["size"].float(), index) / 2
    boxes = torch.cat([middle - half, middle + half], dim=-1)
    joints = gather_cells(prediction["joints"].float(), index)
    regressed = cell[:, :, None, :] + joints.reshape(batch, index.shape[1], -1, 2)  # [B, T, K, 2]

    heat = prediction["keypoint_heatmaps"].float().sigmoid()
    peak_scores, peak_index = heatmap_peaks(heat, top_k)  # [B, K, P]
    num_keypoints, peaks = peak_scores.shape[1], peak_scores.shape[2]
    offsets = gather_cells(prediction["keypoint_offset"].float(), peak_index.reshape(batch, -1))
    candidates = (_positions(peak_index, width) + offsets.reshape(batch, num_keypoints, peaks, 2)).transpose(1, 2)
    candidate_scores = peak_scores.transpose(1, 2)  # [B, P, K]
    # nearest candidate of each regressed keypoint: distances [B, T, P, K]
    distance = (regressed[:, :, None] - candidates[:, None]).norm(dim=-1)
    distance = torch.where(
        candidate_scores[:, None] >= keypoint_threshold, distance, torch.full_like(distance, torch.inf)
    )
    nearest_distance, nearest = distance.min(dim=2)  # [B, T, K]
    chosen = torch.gather(candidates, 1, nearest[..., None].expand(-1, -1, -1, 2))
    chosen_score = torch.gather(candidate_scores, 1, nearest)
    left, top, right, bottom = (boxes[..., i, None] for i in range(4))
    longer = torch.maximum(right - left, bottom - top)
    snap = (
        torch.isfinite(nearest_distance)
        & (chosen[..., 0] >= left)
        & (chosen[..., 0] <= right)
        & (chosen[..., 1] >= top)
        & (chosen[..., 1] <= bottom)
        & (nearest_distance <= SNAP_DISTANCE * longer)
    )
    keypoints = torch.where(snap[..., None], chosen, regressed)
    return DecodedInstances(
        scores=scores,
        boxes=boxes * stride,
        keypoints=keypoints * stride,
        keypoint_scores=torch.where(snap, chosen_score, torch.zeros_like(chosen_score)),
    )
