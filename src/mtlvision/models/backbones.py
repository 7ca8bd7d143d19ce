"""Backbones: any timm ``features_only`` model, or a torchvision classifier, split into stages.

A :class:`Backbone` is a plain sequence of stages; stage ``i`` maps the output of stage ``i - 1`` to the
feature map of scale ``i`` (fine to coarse). Sharing architectures (cross-stitch, MTAN, ...) work on
stages, so every architecture works with every backbone that can be split this way.

Names: a timm model name (``resnet18``, ``convnext_atto``, ``efficientnet_b0``, ``regnetx_002``, ...) or a
torchvision classifier with the ``tv/`` prefix (``tv/resnet18``, ``tv/mobilenet_v3_small``, ...). A timm plain
ViT (``vit_tiny_patch16_224``, ...) gets ViTDet's simple feature pyramid (:mod:`mtlvision.models.vit`).
Nothing is downloaded: pretrained weights are read from a local file (safetensors, or ``.pth``/``.pt``
loaded with ``torch.load(weights_only=True)``) in the key naming of the timm or torchvision model.
"""

from __future__ import annotations

import difflib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mtlvision.errors import CheckpointError, ConfigError, UnknownNameError
from mtlvision.registry import Registry

TORCHVISION_PREFIX = "tv/"

#: Recommended backbones for ``mtlvision list backbones``; any timm model that supports
#: ``features_only`` (and is built from a chain of modules) works too.
BACKBONES: Registry[str] = Registry("backbone")
for _name, _description in [
    ("resnet18", "timm ResNet-18 (11.2M parameters), the default"),
    ("resnet34", "timm ResNet-34 (21.3M parameters)"),
    ("resnet50", "timm ResNet-50 (23.5M parameters)"),
    ("convnext_atto", "timm ConvNeXt-atto (3.4M parameters)"),
    ("convnext_tiny", "timm ConvNeXt-T (27.8M parameters)"),
    ("efficientnet_b0", "timm EfficientNet-B0 (3.6M parameters)"),
    ("mobilenetv3_large_100", "timm MobileNetV3-Large (2.9M parameters)"),
    ("regnetx_002", "timm RegNetX-200MF (2.3M parameters)"),
    ("vit_tiny_patch16_224", "timm ViT-Ti/16 (5.5M parameters) with ViTDet's simple feature pyramid"),
    ("vit_small_patch16_224", "timm ViT-S/16 (21.7M parameters) with ViTDet's simple feature pyramid"),
    ("tv/resnet18", "torchvision ResNet-18 (load torchvision checkpoints as they are)"),
    ("tv/resnet50", "torchvision ResNet-50"),
    ("tv/mobilenet_v3_small", "torchvision MobileNetV3-Small"),
    ("tv/efficientnet_b0", "torchvision EfficientNet-B0"),
    ("tv/convnext_tiny", "torchvision ConvNeXt-T"),
    ("tv/regnet_y_400mf", "torchvision RegNetY-400MF"),
]:
    BACKBONES.register(_name, _description)(_name)

#: Backbones built by this library rather than timm or torchvision (name -> class taking ``in_chans``);
#: their modules register themselves here (see :mod:`mtlvision.models.segnet`).
NATIVE_BACKBONES: Registry[Callable[[int], Backbone]] = Registry("backbone")

ANY_TIMM_NOTE = "any timm model name that supports features_only=True also works (see timm.list_models())"


@dataclass
class LoadReport:
    """What :meth:`Backbone.load_pretrained` did: tensors loaded, backbone tensors the file lacked, and file
    tensors that are not part of the backbone (a classifier, usually)."""

    path: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


class BackboneStage(nn.Sequential):
    """One stage of a backbone (its modules in order), wherever an architecture places it.

    A frozen stage has no gradients and stays in eval mode (batch-norm statistics fixed) even when the
    model around it is put in training mode.
    """

    def __init__(self, index: int, modules: OrderedDict[str, nn.Module]) -> None:
        super().__init__(modules)
        self.index = index
        self.frozen = False

    def freeze(self, frozen: bool = True) -> None:
        self.frozen = frozen
        for parameter in self.parameters():
            parameter.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> BackboneStage:
        return super().train(mode and not self.frozen)


class Backbone(nn.Module):
    """A chain of stages returning one feature map per stage, fine to coarse.

    ``source_keys`` maps this module's state-dict keys to the key names of the original timm or
    torchvision model, so that checkpoints of that model load as they are.
    """

    def __init__(
        self,
        name: str,
        stages: Sequence[BackboneStage],
        feature_channels: Sequence[int],
        feature_strides: Sequence[int],
        source_keys: dict[str, str],
    ) -> None:
        super().__init__()
        if not all(isinstance(stage, BackboneStage) for stage in stages):
            raise TypeError("Backbone stages must be BackboneStage modules (an indexed nn.Sequential)")
        self.name = name
        self.stages = nn.ModuleList(stages)
        self.feature_channels = [int(c) for c in feature_channels]
        self.feature_strides = [int(s) for s in feature_strides]
        self.source_keys = dict(source_keys)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def freeze_stages(self, n: int) -> None:
        """Freeze the first ``n`` stages (no gradients, batch norm kept in eval mode); unfreeze the rest."""
        if not 0 <= n <= len(self.stages):
            raise ConfigError(
                f"model.freeze_stages={n} is out of range: backbone {self.name!r} has "
                f"{len(self.stages)} stages (0 freezes nothing, {len(self.stages)} freezes all)."
            )
        for stage in self.stages:
            assert isinstance(stage, BackboneStage)  # __init__ accepts BackboneStage stages only
            stage.freeze(stage.index < n)

    # ----------------------------------------------------------------------------------- pretrained
    def load_pretrained(self, path: str | Path) -> LoadReport:
        """Load a local timm/torchvision checkpoint of this backbone's model; see :class:`LoadReport`.

        An RGB stem is adapted to a backbone built for other input channels as timm does it (summed for
        one channel, tiled and rescaled for more).

        Raises :class:`CheckpointError` when the file is missing or unreadable, when no tensor of it
        belongs to this backbone, or when a tensor's shape differs from the backbone's.
        """
        state = read_weights(path)
        own = self.state_dict()
        by_source = {source: key for key, source in self.source_keys.items()}
        loaded: dict[str, Tensor] = {}
        mismatched = []
        for source_key, tensor in state.items():
            key = by_source.get(source_key)
            if key is None:
                continue
            if _is_input_conv_of_other_width(tensor, own[key]):
                from timm.models import adapt_input_conv

                tensor = adapt_input_conv(own[key].shape[1], tensor)
            if tuple(tensor.shape) != tuple(own[key].shape):
                mismatched.append(f"{source_key}: file {tuple(tensor.shape)} vs model {tuple(own[key].shape)}")
                continue
            loaded[key] = tensor
        if mismatched:
            raise CheckpointError(
                f"{path}: {len(mismatched)} tensors do not fit backbone {self.name!r} (e.g. "
                f"{'; '.join(mismatched[:3])}). The file holds weights of another model variant."
            )
        if not loaded:
            example = ", ".join(sorted(state)[:3])
            expected = ", ".join(sorted(by_source)[:3])
            raise CheckpointError(
                f"{path}: none of its {len(state)} tensors belongs to backbone {self.name!r} (file keys like "
                f"{example}; expected keys like {expected}). Give a checkpoint of the same timm or "
                "torchvision model."
            )
        missing = sorted(self.source_keys[k] for k in own if k not in loaded and not k.endswith("num_batches_tracked"))
        unexpected = sorted(k for k in state if k not in by_source)
        self.load_state_dict(loaded, strict=False)
        report = LoadReport(str(path), len(loaded), missing, unexpected)
        if missing:
            warnings.warn(
                f"{path}: {len(missing)} tensors of backbone {self.name!r} are not in the file and keep their "
                f"initial values: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}",
                stacklevel=2,
            )
        return report


def _is_input_conv_of_other_width(weight: Tensor, own: Tensor) -> bool:
    """An RGB stem convolution loaded into a backbone built for another number of input channels."""
    return (
        weight.ndim == 4
        and own.ndim == 4
        and weight.shape[1] == 3
        and own.shape[1] != 3
        and weight.shape[0] == own.shape[0]
        and weight.shape[2:] == own.shape[2:]
    )


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a local safetensors or torch file (never unpickling arbitrary objects).

    Accepts the usual wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and a ``module.`` prefix
    left by DataParallel/DistributedDataParallel.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"pretrained weights file {str(file)!r} does not exist.")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read pretrained weights {str(file)!r} ({type(exc).__name__}: {exc}). Give a .safetensors "
            "file or a .pth/.pt state dict (pickled objects other than tensors are refused)."
        ) from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{str(file)!r} is not a state dict (a mapping of names to tensors).")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


# ------------------------------------------------------------------------------------------------ factory
def create_backbone(name: str, pretrained: str | Path | None = None, in_chans: int = 3) -> Backbone:
    """Build backbone ``name`` (one of :data:`NATIVE_BACKBONES`, a timm name, or ``tv/<torchvision name>``),
    optionally from local weights."""
    if name.lower() in NATIVE_BACKBONES.names():
        backbone = NATIVE_BACKBONES.get(name)(in_chans)
    elif name.startswith(TORCHVISION_PREFIX):
        backbone = _torchvision_backbone(name, in_chans)
    elif _is_timm_vit(name):
        from mtlvision.models.vit import ViTBackbone

        backbone = ViTBackbone(name, in_chans)
    else:
        backbone = _timm_backbone(name, in_chans)
    if pretrained is not None:
        backbone.load_pretrained(pretrained)
    return backbone


def _is_timm_vit(name: str) -> bool:
    from mtlvision.models.vit import is_timm_vit

    return is_timm_vit(name)


def _unknown(name: str, known: Sequence[str], family: str) -> UnknownNameError:
    close = difflib.get_close_matches(name, known, n=5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UnknownNameError(
        f"Unknown backbone {name!r}: not a {family} model.{hint} Recommended: "
        f"{', '.join(BACKBONES.names())}; {ANY_TIMM_NOTE}."
    )


def _timm_backbone(name: str, in_chans: int) -> Backbone:
    import timm
    from timm.models import FeatureListNet

    if not timm.is_model(name):
        raise _unknown(name, timm.list_models(), "timm")
    try:
        features = timm.create_model(name, pretrained=False, features_only=True, in_chans=in_chans)
        if not isinstance(features, FeatureListNet):
            # Some families (EfficientNet, MobileNet) default to a feature class of their own; timm's
            # generic FeatureListNet over the same model is a chain of modules that splits into stages.
            features = timm.create_model(
                name,
                pretrained=False,
                features_only=True,
                in_chans=in_chans,
                feature_cfg={"flatten_sequential": True},
            )
    except Exception as exc:
        raise ConfigError(
            f"backbone {name!r}: timm cannot build it with features_only=True ({type(exc).__name__}: {exc}). "
            f"Choose a convolutional backbone, e.g. {', '.join(BACKBONES.names()[:6])}."
        ) from None
    if not isinstance(features, FeatureListNet) or str(getattr(features, "output_fmt", "NCHW")) not in (
        "NCHW",
        "Format.NCHW",
    ):
        raise ConfigError(
            f"backbone {name!r} cannot be split into stages (timm builds its features as "
            f"{type(features).__name__}, not as a chain of NCHW modules). Choose a convolutional backbone, "
            f"e.g. {', '.join(BACKBONES.names()[:6])}."
        )

    # Group the chain of modules that FeatureListNet runs in order: a stage ends at each returned layer.
    stages: list[BackboneStage] = []
    current: OrderedDict[str, nn.Module] = OrderedDict()
    for module_name, module in features.items():
        current[module_name] = module
        if module_name in features.return_layers:
            stages.append(BackboneStage(len(stages), current))
            current = OrderedDict()
    info = features.feature_info
    backbone_keys = _timm_source_keys(name, in_chans, stages)
    return Backbone(name, stages, info.channels(), info.reduction(), backbone_keys)


def _timm_source_keys(name: str, in_chans: int, stages: Sequence[BackboneStage]) -> dict[str, str]:
    """Map ``stages.<i>.<module>.<rest>`` to the key of the plain timm model.

    FeatureListNet renames a child ``seq.k`` of a top-level Sequential ``seq`` to ``seq_k``; the plain
    model (built on the meta device, so for free) tells which names were renamed.
    """
    import timm

    with torch.device("meta"):
        plain = timm.create_model(name, pretrained=False, in_chans=in_chans)
    top = dict(plain.named_children())
    renamed: dict[str, str] = {}
    for parent, module in top.items():
        if isinstance(module, nn.Sequential):
            for child, _ in module.named_children():
                renamed[f"{parent}_{child}"] = f"{parent}.{child}"
    mapping = {}
    for index, stage in enumerate(stages):
        for key in stage.state_dict():
            module_name, _, rest = key.partition(".")
            original = module_name if module_name in top else renamed.get(module_name, module_name)
            mapping[f"stages.{index}.{key}"] = f"{original}.{rest}"
    return mapping


def _torchvision_trunk(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules a torchvision classifier runs before pooling, in order, with their key prefixes."""
    children = dict(model.named_children())
    if isinstance(children.get("features"), nn.Sequential):  # MobileNet, EfficientNet, ConvNeXt, VGG
        return [(f"features.{n}", m) for n, m in children["features"].named_children()]
    if "layer4" in children:  # ResNet, ResNeXt, Wide ResNet
        order = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        return [(n, children[n]) for n in order]
    if "trunk_output" in children:  # RegNet
        return [("stem", children["stem"])] + [
            (f"trunk_output.{n}", m) for n, m in children["trunk_output"].named_children()
        ]
    if isinstance(children.get("layers"), nn.Sequential):  # MNASNet
        return [(f"layers.{n}", m) for n, m in children["layers"].named_children()]
    raise ConfigError(
        f"torchvision model {type(model).__name__} has no chain of stages this library can split "
        "(supported: ResNet/ResNeXt/Wide ResNet, RegNet, and models with a `features` sequence such as "
        "MobileNet, EfficientNet, ConvNeXt, VGG; MNASNet). Use the timm name of the model instead."
    )


def _torchvision_backbone(name: str, in_chans: int) -> Backbone:
    import torchvision

    arch = name[len(TORCHVISION_PREFIX) :]
    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise _unknown(arch, [TORCHVISION_PREFIX + k for k in known], "torchvision classification")
    if in_chans != 3:
        raise ConfigError(
            f"backbone {name!r}: torchvision models take 3 input channels, got in_chans={in_chans}; "
            "use the timm model of the same name, which adapts its stem."
        )
    return split_torchvision(name, torchvision.models.get_model(arch, weights=None))


def split_torchvision(name: str, model: nn.Module, stage_ends: Sequence[str] = ()) -> Backbone:
    """Cut a torchvision classifier's trunk into stages: a stage ends where the next module lowers the
    resolution, and after each module named in ``stage_ends`` (a dilated network keeps its resolution)."""
    trunk = _torchvision_trunk(model)
    # strides and channels come from one probe
    probe_size = 64
    strides, channels_after = [], []
    model.eval()
    with torch.no_grad():
        x = torch.zeros(1, 3, probe_size, probe_size)
        for _, module in trunk:
            x = module(x)
            strides.append(probe_size // x.shape[-1])
            channels_after.append(int(x.shape[1]))
    model.train()
    stages: list[BackboneStage] = []
    channels: list[int] = []
    stage_strides: list[int] = []
    mapping: dict[str, str] = {}
    current: OrderedDict[str, nn.Module] = OrderedDict()
    for index, (prefix, module) in enumerate(trunk):
        local = prefix.replace(".", "_")
        current[local] = module
        for key in module.state_dict():
            mapping[f"stages.{len(stages)}.{local}.{key}"] = f"{prefix}.{key}"
        if index == len(trunk) - 1 or strides[index + 1] > strides[index] or prefix in stage_ends:
            stages.append(BackboneStage(len(stages), current))
            channels.append(channels_after[index])
            stage_strides.append(strides[index])
            current = OrderedDict()
    return Backbone(name, stages, channels, stage_strides, mapping)
