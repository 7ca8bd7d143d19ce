"""ResNet-50 with dilated last stages (output stride 8), the shared encoder of LibMTL's NYUv2 benchmark.

Yu, Koltun and Funkhouser, Dilated Residual Networks, CVPR 2017, as LibMTL builds it (Lin and Zhang, LibMTL:
A Python Library for Multi-Task Learning, JMLR 2023; ``LibMTL/model/resnet_dilated.py``, ``dilate_scale=8``):
the strided convolutions of ``layer3`` and ``layer4`` get stride 1, the 3×3 convolutions there dilation 2 and
4 (the first block of each keeps half of it), which is torchvision's ``replace_stride_with_dilation=[False,
True, True]``. Stages: stem (stride 2), ``layer1`` (4), ``layer2`` (8), ``layer3`` (8), ``layer4`` (8, 2048
channels).

The keys are torchvision's, so an ImageNet checkpoint of torchvision's ResNet-50 (the weights LibMTL starts
from) loads as it is through ``model.pretrained``; nothing is downloaded.
"""

from __future__ import annotations

from mtlvision.errors import ConfigError
from mtlvision.models.backbones import BACKBONES, NATIVE_BACKBONES, Backbone, split_torchvision

#: the trunk modules after which a stage ends even though the resolution stays (stride 8 from layer2 on)
STAGE_ENDS = ("layer1", "layer2", "layer3", "layer4")


def resnet50_dilated(in_chans: int = 3) -> Backbone:
    """torchvision's ResNet-50 (no weights) with ``layer3`` and ``layer4`` dilated: output stride 8."""
    import torchvision

    if in_chans != 3:
        raise ConfigError(
            f"backbone 'resnet50_dilated' takes 3 input channels (torchvision's ResNet-50), got in_chans={in_chans}."
        )
    model = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    return split_torchvision("resnet50_dilated", model, STAGE_ENDS)


BACKBONES.register(
    "resnet50_dilated",
    "torchvision ResNet-50, layer3/layer4 dilated (output stride 8): LibMTL's NYUv2 encoder",
)("resnet50_dilated")
NATIVE_BACKBONES.register(
    "resnet50_dilated",
    "ResNet-50 with dilated last stages (output stride 8)",
    "Yu et al., Dilated Residual Networks, CVPR 2017; as in LibMTL (Lin and Zhang, JMLR 2023)",
)(resnet50_dilated)
