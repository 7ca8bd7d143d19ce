"""The FCOS detection head: a small FPN over chosen pyramid levels, shared towers, per-location outputs.

FCOS (Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection", ICCV 2019) predicts, at every
location of every pyramid level, class logits, the distances (left, top, right, bottom) from the location
to the sides of its box, and a "centerness" logit that down-weights locations far from an object's centre.
The towers and output convolutions are shared by all levels; a learnable scalar per level rescales the
regression (the paper's ``exp(s_i x)``), multiplied here by the level's stride so that every level starts
from boxes of its own size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlvision.errors import ConfigError

#: Upper bound of the regression exponent: exp(8) * stride keeps distances finite in early training.
MAX_LOG_DISTANCE = 8.0


def location_grid(height: int, width: int, stride: int, device: torch.device) -> Tensor:
    """Pixel centres ``[(h * w), 2]`` (x, y) of a feature map's cells, row-major like ``flatten(2)``."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)


def _conv_tower(width: int, depth: int, groups: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(groups, width), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """FPN + FCOS head over the backbone levels whose strides are listed in ``strides``.

    ``forward(features, image_size)`` takes the backbone's feature maps (fine to coarse, as described by
    ``in_channels`` / ``in_strides``) and returns a dict of raw outputs, concatenated over levels:

    - ``cls_logits`` ``[B, P, num_classes]``, ``centerness`` ``[B, P]`` (logits),
    - ``box_distances`` ``[B, P, 4]`` (left, top, right, bottom, in pixels, positive),
    - ``points`` ``[P, 2]`` (x, y pixel centres), ``strides`` ``[P]``, and ``image_size`` ``(H, W)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        num_classes: int,
        strides: Sequence[int] = (8, 16, 32),
        width: int = 64,
        tower_depth: int = 2,
        prior_probability: float = 0.01,
    ) -> None:
        super().__init__()
        missing = [s for s in strides if s not in in_strides]
        if missing or not strides:
            raise ConfigError(
                f"detection head strides {list(strides)} must be a non-empty subset of the backbone's feature "
                f"strides {list(in_strides)}; {missing} are not available. Set the detection task's `strides`."
            )
        if width % 8:
            raise ConfigError(f"detection head width must be a multiple of 8 (GroupNorm groups), got {width}")
        self.strides = sorted(strides)
        self.level_indices = [list(in_strides).index(s) for s in self.strides]
        self.lateral = nn.ModuleList(nn.Conv2d(in_channels[i], width, 1) for i in self.level_indices)
        self.smooth = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in self.level_indices)
        groups = 8
        self.cls_tower = _conv_tower(width, tower_depth, groups)
        self.box_tower = _conv_tower(width, tower_depth, groups)
        self.cls_logits = nn.Conv2d(width, num_classes, 3, padding=1)
        self.box_regression = nn.Conv2d(width, 4, 3, padding=1)
        self.centerness = nn.Conv2d(width, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(self.strides)))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                assert module.bias is not None  # every convolution of the head has a bias
                nn.init.zeros_(module.bias)
        for lateral in self.lateral:
            assert isinstance(lateral, nn.Conv2d)
            nn.init.kaiming_uniform_(lateral.weight, a=1)
        # Focal-loss prior (Lin et al. 2017): every location starts as background with probability 1 - pi.
        assert self.cls_logits.bias is not None
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability))

    def _pyramid(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Top-down FPN (Lin et al. 2017) over the selected levels, finest first."""
        laterals = [conv(features[i]) for conv, i in zip(self.lateral, self.level_indices, strict=True)]
        for level in range(len(laterals) - 2, -1, -1):
            laterals[level] = laterals[level] + F.interpolate(
                laterals[level + 1], size=laterals[level].shape[-2:], mode="nearest"
            )
        return [smooth(x) for smooth, x in zip(self.smooth, laterals, strict=True)]

    def forward(self, features: Sequence[Tensor], image_size: tuple[int, int]) -> dict[str, object]:
        cls_out, box_out, ctr_out, points, point_strides = [], [], [], [], []
        for level, feature in enumerate(self._pyramid(features)):
            batch, _, height, width = feature.shape
            stride = self.strides[level]
            cls_feature = self.cls_tower(feature)
            box_feature = self.box_tower(feature)
            cls_out.append(self.cls_logits(cls_feature).flatten(2).transpose(1, 2))
            log_distance = (self.scales[level] * self.box_regression(box_feature)).clamp(max=MAX_LOG_DISTANCE)
            box_out.append((log_distance.exp() * stride).flatten(2).transpose(1, 2))
            ctr_out.append(self.centerness(box_feature).flatten(1))
            grid = location_grid(height, width, stride, feature.device)
            points.append(grid)
            point_strides.append(torch.full((grid.shape[0],), float(stride), device=feature.device))
        return {
            "cls_logits": torch.cat(cls_out, dim=1),
            "box_distances": torch.cat(box_out, dim=1),
            "centerness": torch.cat(ctr_out, dim=1),
            "points": torch.cat(points),
            "strides": torch.cat(point_strides),
            "image_size": (int(image_size[0]), int(image_size[1])),
        }
