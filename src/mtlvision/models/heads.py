"""Task heads: multi-scale features in, one task's raw output out.

Every head is built as ``Head(feature_channels, feature_strides, out_channels, **params)`` and called as
``head(features, image_size)``. Dense heads return ``[B, out_channels, H, W]`` at the image size; image
heads return ``[B, out_channels]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead
from torchvision.ops import Conv2dNormActivation

from mtlvision.errors import ConfigError
from mtlvision.registry import Registry

HEADS: Registry[type[nn.Module]] = Registry("head")


def _finest_index(feature_strides: Sequence[int], min_stride: int = 4) -> int:
    """Index of the finest feature map with stride >= ``min_stride`` (the finest one if all are finer)."""
    by_stride = sorted(range(len(feature_strides)), key=lambda i: feature_strides[i])
    return next((i for i in by_stride if feature_strides[i] >= min_stride), by_stride[0])


def _upsample(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _check_positive(head: str, **values: int) -> None:
    for key, value in values.items():
        if int(value) < 1:
            raise ConfigError(f"head {head!r}: {key} must be a positive integer, got {value!r}.")


@HEADS.register(
    "fpn",
    "FPN-style dense decoder: lateral 1x1 convs, top-down sum, 3x3 smoothing, prediction at stride 4",
    "Lin et al., Feature Pyramid Networks for Object Detection, CVPR 2017; Kirillov et al., Panoptic FPN, 2019",
)
class FPNHead(nn.Module):
    """Merges every scale from the coarsest down to stride 4 (or the finest scale) and predicts there."""

    def __init__(
        self,
        feature_channels: Sequence[int],
        feature_strides: Sequence[int],
        out_channels: int,
        channels: int = 64,
    ) -> None:
        super().__init__()
        _check_positive("fpn", channels=channels, out_channels=out_channels)
        self.start = _finest_index(feature_strides)
        used = list(feature_channels)[self.start :]
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, kernel_size=1) for c in used)
        self.smooth = Conv2dNormActivation(channels, channels, kernel_size=3)
        self.predict = nn.Sequential(
            Conv2dNormActivation(channels, channels, kernel_size=3),
            nn.Conv2d(channels, out_channels, kernel_size=1),
        )

    def forward(self, features: Sequence[Tensor], image_size: Sequence[int]) -> Tensor:
        used = list(features)[self.start :]
        merged = self.lateral[-1](used[-1])
        for lateral, feature in zip(reversed(self.lateral[:-1]), reversed(used[:-1])):
            merged = lateral(feature) + F.interpolate(merged, size=feature.shape[-2:], mode="nearest")
        return _upsample(self.predict(self.smooth(merged)), image_size)


@HEADS.register(
    "aspp",
    "DeepLabV3+ decoder: ASPP on the coarsest scale, fused with a stride-4 skip",
    "Chen et al., Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation, ECCV 2018",
)
class ASPPHead(nn.Module):
    """torchvision's ASPP on the coarsest map, upsampled and concatenated with a 48-channel projection of
    the stride-4 (or finest) map, then two 3x3 convolutions and a 1x1 prediction."""

    def __init__(
        self,
        feature_channels: Sequence[int],
        feature_strides: Sequence[int],
        out_channels: int,
        channels: int = 128,
        skip_channels: int = 48,
        atrous_rates: Sequence[int] = (6, 12, 18),
    ) -> None:
        super().__init__()
        _check_positive("aspp", channels=channels, skip_channels=skip_channels, out_channels=out_channels)
        if len(atrous_rates) != 3 or any(int(r) < 1 for r in atrous_rates):
            raise ConfigError(f"head 'aspp': atrous_rates must be three positive integers, got {atrous_rates!r}.")
        self.skip_index = _finest_index(feature_strides)
        self.aspp = ASPP(feature_channels[-1], [int(r) for r in atrous_rates], channels)
        self.skip = Conv2dNormActivation(feature_channels[self.skip_index], skip_channels, kernel_size=1)
        self.fuse = nn.Sequential(
            Conv2dNormActivation(channels + skip_channels, channels, kernel_size=3),
            Conv2dNormActivation(channels, channels, kernel_size=3),
            nn.Conv2d(channels, out_channels, kernel_size=1),
        )

    def forward(self, features: Sequence[Tensor], image_size: Sequence[int]) -> Tensor:
        skip = self.skip(features[self.skip_index])
        context = _upsample(self.aspp(features[-1]), skip.shape[-2:])
        return _upsample(self.fuse(torch.cat([context, skip], dim=1)), image_size)


@HEADS.register(
    "deeplabv3",
    "DeepLabV3 head on the coarsest scale (ASPP 12/24/36, 256 channels), upsampled with align_corners: LibMTL's NYUv2",
    "Chen et al., Rethinking Atrous Convolution for Semantic Image Segmentation, 2017; LibMTL examples/nyu/aspp.py",
)
class DeepLabV3Head(nn.Module):
    """The task head of LibMTL's NYUv2 benchmark (``examples/nyu/aspp.py``, torchvision's ``DeepLabHead``):
    ASPP (a 1x1 branch, three dilated 3x3 branches, image pooling; 256 channels each; projection with dropout
    0.5), a 3x3 conv-BN-ReLU and a 1x1 prediction on the coarsest map, then bilinear upsampling to the image
    with ``align_corners=True`` (their ``process_preds``). No skip connection: the DeepLabV3+ decoder is the
    ``aspp`` head."""

    def __init__(
        self,
        feature_channels: Sequence[int],
        feature_strides: Sequence[int],
        out_channels: int,
        atrous_rates: Sequence[int] = (12, 24, 36),
    ) -> None:
        super().__init__()
        _check_positive("deeplabv3", out_channels=out_channels)
        if len(atrous_rates) != 3 or any(int(r) < 1 for r in atrous_rates):
            raise ConfigError(f"head 'deeplabv3': atrous_rates must be three positive integers, got {atrous_rates!r}.")
        self.decode = DeepLabHead(feature_channels[-1], out_channels, [int(r) for r in atrous_rates])

    def forward(self, features: Sequence[Tensor], image_size: Sequence[int]) -> Tensor:
        return F.interpolate(self.decode(features[-1]), size=tuple(image_size), mode="bilinear", align_corners=True)


@HEADS.register(
    "segnet",
    "MTAN's SegNet prediction layer: 3x3 conv then 1x1 conv (both with bias, no norm) on the finest scale",
    "Liu, Johns and Davison, End-to-End Multi-Task Learning with Attention, CVPR 2019",
)
class SegNetHead(nn.Module):
    """The task-specific prediction layer of the SegNet benchmark networks, ``Conv3x3(C, C)`` then
    ``Conv1x1(C, out)``, on the finest feature map; upsampled bilinearly only where that map is coarser
    than the image (SegNet's own output is at input resolution)."""

    def __init__(self, feature_channels: Sequence[int], feature_strides: Sequence[int], out_channels: int) -> None:
        super().__init__()
        _check_positive("segnet", out_channels=out_channels)
        self.index = min(range(len(feature_strides)), key=lambda i: feature_strides[i])
        channels = feature_channels[self.index]
        self.predict = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.Conv2d(channels, out_channels, kernel_size=1),
        )

    def forward(self, features: Sequence[Tensor], image_size: Sequence[int]) -> Tensor:
        out = self.predict(features[self.index])
        return out if tuple(out.shape[-2:]) == tuple(image_size) else _upsample(out, image_size)


@HEADS.register("mlp", "global average pool of the coarsest scale, then an MLP with one hidden layer")
class MLPHead(nn.Module):
    """Image-level head: pooled coarsest features -> Linear -> ReLU -> Dropout -> Linear."""

    def __init__(
        self,
        feature_channels: Sequence[int],
        feature_strides: Sequence[int],
        out_channels: int,
        hidden: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_positive("mlp", hidden=hidden, out_channels=out_channels)
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"head 'mlp': dropout must lie in [0, 1), got {dropout!r}.")
        self.mlp = nn.Sequential(
            nn.Linear(feature_channels[-1], hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(float(dropout)),
            nn.Linear(hidden, out_channels),
        )

    def forward(self, features: Sequence[Tensor], image_size: Sequence[int]) -> Tensor:
        return self.mlp(features[-1].mean(dim=(-2, -1)))


@HEADS.register("linear", "global average pool of the coarsest scale, then one linear layer")
class LinearHead(nn.Module):
    """Image-level head: pooled coarsest features -> Linear."""

    def __init__(self, feature_channels: Sequence[int], feature_strides: Sequence[int], out_channels: int) -> None:
        super().__init__()
        _check_positive("linear", out_channels=out_channels)
        self.linear = nn.Linear(feature_channels[-1], out_channels)

    def forward(self, features: Sequence[Tensor], image_size: Sequence[int]) -> Tensor:
        return self.linear(features[-1].mean(dim=(-2, -1)))


def build_head(
    spec: str | dict, feature_channels: Sequence[int], feature_strides: Sequence[int], out_channels: int
) -> nn.Module:
    """Build a head from a name (``"fpn"``) or a dict with ``name`` and its parameters."""
    params = dict(spec) if isinstance(spec, dict) else {"name": spec}
    if "name" not in params:
        raise ConfigError(f"head {spec!r} has no 'name'; choose one of {', '.join(HEADS.names())}.")
    name = params.pop("name")
    cls = HEADS.get(name)
    try:
        return cls(list(feature_channels), list(feature_strides), int(out_channels), **params)
    except TypeError as exc:
        raise ConfigError(f"head {name!r}: {exc}") from None
