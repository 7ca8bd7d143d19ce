"""SegNet, the encoder-decoder with pooling indices of the standard NYUv2 / Cityscapes MTL benchmark.

Badrinarayanan, Kendall and Cipolla, SegNet: A Deep Convolutional Encoder-Decoder Architecture for Image
Segmentation, TPAMI 2017, in the variant that Liu, Johns and Davison (End-to-End Multi-Task Learning with
Attention, CVPR 2019) use as the shared network of their NYUv2 / Cityscapes experiments, and that Nash-MTL,
FAMO and their successors report Δm with: five levels of widths 64-128-256-512-512, each a 3×3 conv-BN-ReLU
block followed by one (levels 0-1) or two (levels 2-4) more; 2×2 max pooling whose indices the mirrored
decoder unpools with.

The module and parameter names follow the authors' code (``encoder_block``, ``conv_block_enc``,
``decoder_block``, ``conv_block_dec``, indexed the same way), so a state dict of their network loads into
:meth:`Backbone.load_pretrained` as it is, task heads and attention left out.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from mtlvision.errors import ConfigError
from mtlvision.models.backbones import BACKBONES, NATIVE_BACKBONES, Backbone

#: channel widths of the five levels, as in the MTAN authors' SegNet
SEGNET_WIDTHS = (64, 128, 256, 512, 512)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3×3 convolution (with bias, as in the reference), batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _repeat(channels: int, times: int) -> nn.Sequential:
    """``times`` conv-BN-ReLU blocks of ``channels`` channels; a single block is not wrapped again."""
    return (
        conv_bn_relu(channels, channels)
        if times == 1
        else nn.Sequential(*(conv_bn_relu(channels, channels) for _ in range(times)))
    )


@dataclass
class SegNetLevels:
    """Every intermediate map of one SegNet pass, the taps of the MTAN attention modules.

    Lists are indexed by pass order: ``encoder_first[j]`` / ``encoder_out[j]`` are the outputs of level ``j``'s
    first block and of its whole convolution stack (before pooling), fine to coarse; ``unpooled[j]`` and
    ``decoder_out[j]`` are the unpooled input and the output of the ``j``-th decoder step, coarse to fine.
    """

    encoder_first: list[Tensor]
    encoder_out: list[Tensor]
    unpooled: list[Tensor]
    decoder_out: list[Tensor]


class SegNet(Backbone):
    """SegNet returning one feature map: the decoder's 64-channel output at input resolution (stride 1).

    Inputs must have a height and width divisible by 32 (five poolings that the decoder mirrors exactly).
    The network is not a chain of independent stages (the decoder needs the encoder's pooling indices), so
    it has no ``stages``: architectures that cut a backbone into stages (cross-stitch, the generic MTAN, ...)
    refuse it with a clear message; use ``hps`` (the reference's "split" network) or ``segnet_mtan``.
    """

    def __init__(self, in_chans: int = 3) -> None:
        nn.Module.__init__(self)
        if in_chans < 1:
            raise ConfigError(f"backbone 'segnet': in_chans must be positive, got {in_chans}.")
        w = SEGNET_WIDTHS
        self.name = "segnet"
        self.encoder_block = nn.ModuleList(
            [conv_bn_relu(in_chans, w[0])] + [conv_bn_relu(w[i], w[i + 1]) for i in range(4)]
        )
        self.conv_block_enc = nn.ModuleList(_repeat(w[i], 1 if i < 2 else 2) for i in range(5))
        # decoder_block[i] maps level i's width down to level i - 1's (level 0 keeps 64): indexed as the
        # encoder, so the decoder runs them from index 4 to index 0
        self.decoder_block = nn.ModuleList(
            [conv_bn_relu(w[0], w[0])] + [conv_bn_relu(w[i + 1], w[i]) for i in range(4)]
        )
        self.conv_block_dec = nn.ModuleList(_repeat(w[max(i - 1, 0)], 1 if i < 2 else 2) for i in range(5))
        self.feature_channels = [w[0]]
        self.feature_strides = [1]
        self.source_keys = {key: key for key in self.state_dict()}

    def levels(self, x: Tensor) -> SegNetLevels:
        """Run the encoder and the decoder, keeping every map the attention modules read."""
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ConfigError(
                f"backbone 'segnet' needs an image height and width divisible by 32 (five poolings); got "
                f"{tuple(x.shape[-2:])}. Resize the data (data.image_size) to a multiple of 32, e.g. 288 x 384."
            )
        first, out, indices = [], [], []
        for block, convs in zip(self.encoder_block, self.conv_block_enc):
            first.append(block(x))
            out.append(convs(first[-1]))
            x, index = F.max_pool2d(out[-1], kernel_size=2, stride=2, return_indices=True)
            indices.append(index)
        unpooled, decoded = [], []
        for level in reversed(range(5)):
            unpooled.append(F.max_unpool2d(x, indices[level], kernel_size=(2, 2), stride=(2, 2)))
            x = self.conv_block_dec[level](self.decoder_block[level](unpooled[-1]))
            decoded.append(x)
        return SegNetLevels(first, out, unpooled, decoded)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.levels(x).decoder_out[-1]]

    def freeze_stages(self, n: int) -> None:
        if n:
            raise ConfigError(
                "model.freeze_stages: backbone 'segnet' is an encoder-decoder without separable stages; "
                "leave freeze_stages at 0."
            )

    def named_levels(self) -> Iterator[tuple[str, nn.Module]]:
        """The four module lists in reference order (for parameter-count reports)."""
        yield from (
            (name, getattr(self, name))
            for name in ("encoder_block", "decoder_block", "conv_block_enc", "conv_block_dec")
        )


BACKBONES.register("segnet", "SegNet encoder-decoder with pooling indices (MTAN's NYUv2/Cityscapes network)")("segnet")
NATIVE_BACKBONES.register(
    "segnet",
    "SegNet encoder-decoder with pooling indices",
    "Badrinarayanan et al., TPAMI 2017; as in Liu et al., End-to-End Multi-Task Learning with Attention, CVPR 2019",
)(SegNet)
