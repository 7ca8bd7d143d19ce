"""Plain ViT backbones from timm with the simple feature pyramid of ViTDet (Li et al., ECCV 2022).

A plain Vision Transformer has one feature map, at the patch stride ``p``. ViTDet's simple feature pyramid
builds four scales from that last map alone: two stride-2 transposed convolutions (stride ``p / 4``), one
(``p / 2``), the map itself (``p``) and a stride-2 max-pool (``2 p``); each is then projected to
``out_channels`` by a 1×1 and a 3×3 convolution, each followed by a channel LayerNorm, as in the paper.
Dense heads then work over the four maps as over a convolutional backbone's.

The transformer is one backbone stage (``stages[0]``), so a local timm checkpoint of the ViT loads through
:meth:`Backbone.load_pretrained` and ``freeze_stages=1`` freezes it; the pyramid is not a stage. Architectures
that need a chain of several stages (cross-stitch, MTAN, ...) refuse this backbone with a clear error.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from torch import Tensor, nn

from mtlvision.errors import ConfigError
from mtlvision.models.backbones import Backbone, BackboneStage

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

#: timm modules whose models are plain ViTs (a patch embedding, ``blocks``, a final ``norm``)
VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")


def is_timm_vit(name: str) -> bool:
    """Whether ``name`` is a timm model built by timm's plain-ViT modules (see :data:`VIT_MODULES`)."""
    import timm
    from timm.models import model_entrypoint

    return timm.is_model(name) and model_entrypoint(name).__module__ in VIT_MODULES


class ViTTrunk(nn.Module):
    """A timm ViT as ``images -> [B, C, H / p, W / p]``, in three steps architectures can run apart:
    :meth:`embed` (patches, position embedding, prefix tokens), ``blocks``, :meth:`to_map` (final norm,
    prefix tokens dropped, tokens laid out as a map)."""

    model: VisionTransformer

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        self.model = model
        size = model.patch_embed.patch_size
        self.patch_size = int(size[0] if isinstance(size, Sequence) else size)
        self.num_prefix_tokens = int(model.num_prefix_tokens)

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.blocks

    def embed(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ConfigError(
                f"a ViT backbone with patch size {self.patch_size} takes images whose height and width are "
                f"multiples of {self.patch_size}; got {height} x {width}. Change data.image_size."
            )
        model = self.model
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))

    def to_map(self, tokens: Tensor, image_size: Sequence[int]) -> Tensor:
        """The final-normed patch tokens of images of ``image_size`` as an NCHW map."""
        tokens = self.model.norm(tokens)[:, self.num_prefix_tokens :]
        rows, columns = int(image_size[0]) // self.patch_size, int(image_size[1]) // self.patch_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], rows, columns)

    def forward(self, images: Tensor) -> Tensor:
        return self.to_map(self.blocks(self.embed(images)), images.shape[-2:])


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: scales 4, 2, 1 and 1/2 of one map, each projected to ``out_channels``.

    Args:
        channels: channels of the ViT map.
        out_channels: channels of every pyramid level.
    """

    def __init__(self, channels: int, out_channels: int) -> None:
        from timm.layers import LayerNorm2d

        super().__init__()
        half, quarter = channels // 2, channels // 4
        self.scales = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(channels, half, 2, stride=2),
                    LayerNorm2d(half),
                    nn.GELU(),
                    nn.ConvTranspose2d(half, quarter, 2, stride=2),
                ),
                nn.ConvTranspose2d(channels, half, 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2, stride=2),
            ]
        )
        self.projections = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, out_channels, 1, bias=False),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            )
            for width in (quarter, half, channels, channels)
        )

    def forward(self, feature: Tensor) -> list[Tensor]:
        return [project(scale(feature)) for scale, project in zip(self.scales, self.projections)]


class ViTBackbone(Backbone):
    """A timm ViT (one stage) followed by a :class:`SimpleFeaturePyramid`: four maps, fine to coarse.

    Args:
        name: a timm plain-ViT model name (see :func:`is_timm_vit`); built with ``pretrained=False``.
        in_chans: image channels.
        out_channels: channels of the pyramid levels (default: the ViT's embedding width).
    """

    #: the stages do not chain into the returned features (the pyramid follows the one stage)
    chained_stages = False

    def __init__(self, name: str, in_chans: int = 3, out_channels: int | None = None) -> None:
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, dynamic_img_size=True)
        trunk = ViTTrunk(cast("VisionTransformer", model))
        width = int(trunk.model.embed_dim)
        out = width if out_channels is None else out_channels
        p = trunk.patch_size
        if p % 4:
            raise ConfigError(f"backbone {name!r}: the feature pyramid needs a patch size divisible by 4, got {p}.")
        stage = BackboneStage(0, OrderedDict(vit=trunk))
        keys = {f"stages.0.vit.model.{key}": key for key in model.state_dict()}
        pyramid = SimpleFeaturePyramid(width, out)
        # the pyramid is not part of the timm model: a checkpoint of the ViT leaves it at its initial values
        keys.update({f"pyramid.{key}": f"pyramid.{key}" for key in pyramid.state_dict()})
        super().__init__(name, [stage], [out] * 4, [p // 4, p // 2, p, 2 * p], keys)
        self.pyramid = pyramid

    @property
    def trunk(self) -> ViTTrunk:
        trunk = cast(BackboneStage, self.stages[0])[0]
        assert isinstance(trunk, ViTTrunk)  # set in __init__
        return trunk

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.pyramid(self.stages[0](x))
