"""The bottom-up keypoint head of CenterNet's multi-person pose (Zhou, Wang and Krähenbühl, "Objects as Points",
2019, §4 and its ``multi_pose`` head): every output at one stride.

The backbone levels at the chosen stride and coarser are merged top-down (an FPN, Lin et al. 2017) into one map,
from which one 3 x 3 convolution + ReLU + 1 x 1 convolution branch per output predicts:

- ``center`` ``[B, 1, h, w]``: the instance-centre heatmap (logits);
- ``center_offset`` ``[B, 2, h, w]``: the centre's sub-cell offset (x, y), in cells;
- ``size`` ``[B, 2, h, w]``: the instance box's width and height, in cells;
- ``joints`` ``[B, 2K, h, w]``: per keypoint, its offset (x, y) from the centre cell, in cells;
- ``keypoint_heatmaps`` ``[B, K, h, w]``: one heatmap per keypoint (logits);
- ``keypoint_offset`` ``[B, 2, h, w]``: a keypoint's sub-cell offset (x, y), shared by all keypoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from mtlvision.errors import ConfigError

#: the heatmap branches start at this probability everywhere (CenterNet's bias of -2.19)
PRIOR_PROBABILITY = 0.1


def _branch(width: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, out_channels, 1)
    )


class KeypointHead(nn.Module):
    """CenterNet's multi-pose outputs at ``stride`` (see the module docstring); ``forward(features, image_size)``
    returns them as a dict of tensors, plus ``stride`` (an int) and ``image_size`` (H, W)."""

    def __init__(
        self, in_channels: Sequence[int], in_strides: Sequence[int], num_keypoints: int, stride: int, width: int = 64
    ) -> None:
        super().__init__()
        if stride not in in_strides:
            raise ConfigError(
                f"keypoint head stride {stride} is not one of the backbone's feature strides {list(in_strides)}; "
                "set the keypoints task's `stride`."
            )
        self.stride = stride
        self.level_indices = [i for i, s in enumerate(in_strides) if s >= stride]
        self.lateral = nn.ModuleList(nn.Conv2d(in_channels[i], width, 1) for i in self.level_indices)
        self.smooth = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True))
        branches = {
            "center": _branch(width, 1),
            "center_offset": _branch(width, 2),
            "size": _branch(width, 2),
            "joints": _branch(width, 2 * num_keypoints),
            "keypoint_heatmaps": _branch(width, num_keypoints),
            "keypoint_offset": _branch(width, 2),
        }
        for name in ("center", "keypoint_heatmaps"):
            last = branches[name][-1]
            assert isinstance(last, nn.Conv2d) and last.bias is not None
            nn.init.constant_(last.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
        self.outputs = nn.ModuleDict(branches)

    def forward(self, features: Sequence[Tensor], image_size: tuple[int, int]) -> dict[str, object]:
        merged = self.lateral[-1](features[self.level_indices[-1]])
        for conv, index in zip(reversed(self.lateral[:-1]), reversed(self.level_indices[:-1]), strict=True):
            lateral = conv(features[index])
            merged = lateral + F.interpolate(merged, size=lateral.shape[-2:], mode="nearest")
        shared = self.smooth(merged)
        result: dict[str, object] = {name: branch(shared) for name, branch in self.outputs.items()}
        result["stride"] = self.stride
        result["image_size"] = (int(image_size[0]), int(image_size[1]))
        return result
