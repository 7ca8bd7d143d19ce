"""Weight initialisation schemes (``model.init``) for convolutions and linear layers.

``pretrained`` is not a scheme of its own: the backbone is read from a local file and the heads take
the default scheme (see :class:`mtlvision.models.multitask.MultiTaskModel`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from mtlvision.errors import ConfigError
from mtlvision.registry import Registry

INIT_SCHEMES: Registry[Callable[[Tensor], None]] = Registry("init scheme")

PRETRAINED = "pretrained"


@INIT_SCHEMES.register(
    "kaiming", "He normal, fan-in, for ReLU networks", "He et al., Delving Deep into Rectifiers, ICCV 2015"
)
def kaiming(weight: Tensor) -> None:
    nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")


@INIT_SCHEMES.register(
    "xavier",
    "Glorot uniform",
    "Glorot & Bengio, Understanding the difficulty of training deep feedforward networks, AISTATS 2010",
)
def xavier(weight: Tensor) -> None:
    nn.init.xavier_uniform_(weight)


@INIT_SCHEMES.register(
    "xavier_normal",
    "Glorot normal (MTAN's SegNet and the NYUv2/Cityscapes benchmark code)",
    "Glorot & Bengio, Understanding the difficulty of training deep feedforward networks, AISTATS 2010",
)
def xavier_normal(weight: Tensor) -> None:
    nn.init.xavier_normal_(weight)


@INIT_SCHEMES.register(
    "orthogonal",
    "orthogonal matrices (convolutions flattened per output channel)",
    "Saxe et al., Exact solutions to the nonlinear dynamics of learning in deep linear networks, ICLR 2014",
)
def orthogonal(weight: Tensor) -> None:
    nn.init.orthogonal_(weight)


def initialise(module: nn.Module, scheme: str) -> None:
    """Re-initialise every convolution and linear layer inside ``module``: weights by ``scheme``, biases 0."""
    if scheme == PRETRAINED:
        raise ConfigError(
            "model.init=pretrained needs a local weights file (model.pretrained: path/to/weights.safetensors "
            "or .pth); nothing is downloaded."
        )
    init_weight = INIT_SCHEMES.get(scheme)
    for layer in module.modules():
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            init_weight(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
