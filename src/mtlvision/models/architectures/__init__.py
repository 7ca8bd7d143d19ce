"""Sharing architectures, one module each, registered in :data:`ARCHITECTURES`."""

from __future__ import annotations

from mtlvision.models.architectures import hps  # noqa: F401  (registers the architecture)
from mtlvision.models.architectures.base import Architecture, ArchitectureSpec, RepresentationUnavailable
from mtlvision.models.architectures.cgc import CGC
from mtlvision.models.architectures.cross_stitch import CrossStitch
from mtlvision.models.architectures.dselect_k import DSelectK
from mtlvision.models.architectures.hps import HPS
from mtlvision.models.architectures.ltb import LTB
from mtlvision.models.architectures.mmoe import MMoE
from mtlvision.models.architectures.mtan import MTAN
from mtlvision.models.architectures.mti_net import MTINet
from mtlvision.models.architectures.mtlora import MTLoRA
from mtlvision.models.architectures.nddr_cnn import NDDRCNN
from mtlvision.models.architectures.padnet import PADNet
from mtlvision.models.architectures.ple import PLE
from mtlvision.models.architectures.registry import ARCHITECTURES
from mtlvision.models.architectures.segnet_mtan import SegNetMTAN
from mtlvision.models.architectures.task_attention import TaskAttention

__all__ = [
    "ARCHITECTURES",
    "CGC",
    "HPS",
    "LTB",
    "MMoE",
    "MTAN",
    "MTINet",
    "MTLoRA",
    "NDDRCNN",
    "PLE",
    "Architecture",
    "ArchitectureSpec",
    "CrossStitch",
    "DSelectK",
    "PADNet",
    "RepresentationUnavailable",
    "SegNetMTAN",
    "TaskAttention",
]
