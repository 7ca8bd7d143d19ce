"""Models: backbones split into stages, sharing architectures, task heads and the multi-task model."""

from __future__ import annotations

from mtlvision.models.architectures import ARCHITECTURES, HPS, Architecture, ArchitectureSpec
from mtlvision.models.backbones import BACKBONES, Backbone, BackboneStage, create_backbone
from mtlvision.models.heads import HEADS, build_head
from mtlvision.models.init import INIT_SCHEMES
from mtlvision.models.multitask import MultiTaskModel
from mtlvision.models.resnet_dilated import resnet50_dilated
from mtlvision.models.segnet import SegNet

__all__ = [
    "ARCHITECTURES",
    "BACKBONES",
    "HEADS",
    "HPS",
    "INIT_SCHEMES",
    "Architecture",
    "ArchitectureSpec",
    "Backbone",
    "BackboneStage",
    "MultiTaskModel",
    "SegNet",
    "build_head",
    "create_backbone",
    "resnet50_dilated",
]
