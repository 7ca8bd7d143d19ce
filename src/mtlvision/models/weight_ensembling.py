"""Weight-ensembling mixture-of-experts blocks (Tang, Shen, Du et al., Merging Multi-Task Models via
Weight-Ensembling Mixture of Experts, ICML 2024; FusionBench's ``we_moe``).

A block of the shared backbone is upscaled: its layers keep the experts' common start θ_0 and the T task
vectors τ_t = θ_t − θ_0, and a router gives, per input sample, routing weights r(x) ∈ R^T so that the
block runs with the weights θ(x) = θ_0 + Σ_t r_t(x) τ_t. The router is the paper's: an MLP (0, 1 or 2
hidden layers of the block's input width, ReLU) applied to every token (ViT) or every spatial position
(convolutional blocks: the analogue of a token), its outputs averaged over the tokens, so one weight vector
per sample as in the reference code; it is initialised with weights N(0, 0.01²), zero hidden biases and an
output bias of ``init`` (λ = 0.3), so that at the start θ(x) ≈ θ_0 + λ Σ_t τ_t: task arithmetic.

A routed convolution never assembles per-sample weights: it is linear in its weights, so
``conv(x; θ_0 + Σ_t r_t τ_t) = conv(x; θ_0) + Σ_t r_t conv_lin(x; τ_t)``, the T task vectors applied in one
batched call (stacked along the output channels, groups kept) and weighted per sample: T + 1 times the
convolution's work, with a fixed number of groups (so the graph exports with a dynamic batch). A routed
linear layer (a ViT's MLP, one routing per sample for all its tokens) assembles each sample's weights
instead (T·out·in per sample) and applies them in one batched product: with many tokens that costs far
less than T more products.
Routed layers: Conv2d, Linear and BatchNorm2d (its affine part; the normalisation statistics are the
block's own, as for every merged BatchNorm). Blocks are the residual blocks of ResNets (timm and
torchvision ``BasicBlock``/``Bottleneck``) and the MLPs of ViT blocks (timm ``Mlp``), the modules the paper
upscales (its transformer MLPs) or their convolutional counterpart (:data:`BLOCK_KINDS`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mtlvision.errors import ConfigError

#: module class names upscaled into weight-ensembling MoE blocks -> how their input becomes router tokens
BLOCK_KINDS: dict[str, str] = {"BasicBlock": "map", "Bottleneck": "map", "Mlp": "tokens"}
HIDDEN_LAYERS = (0, 1, 2)


class Routing:
    """The routing weights ``[B, T]`` of the current forward pass, shared by the routed layers of one block."""

    weights: Tensor | None = None

    def get(self) -> Tensor:
        if self.weights is None:
            raise RuntimeError("a routed layer ran outside its weight-ensembling block")
        return self.weights


class Router(nn.Module):
    """r(h) per token, averaged over the tokens: ``[B, N, C] -> [B, T]``; ``hidden_layers`` 0 is one learnt
    vector for all inputs (the paper's depth-0 gate)."""

    def __init__(self, width: int, experts: int, hidden_layers: int = 2, init: float = 0.3) -> None:
        super().__init__()
        if hidden_layers not in HIDDEN_LAYERS:
            raise ConfigError(f"wemoe: hidden_layers must be one of {HIDDEN_LAYERS}, got {hidden_layers!r}")
        self.hidden_layers, self.init = hidden_layers, init
        self.constant = nn.Parameter(torch.full((experts,), init)) if hidden_layers == 0 else None
        self.hidden = nn.Linear(width, width) if hidden_layers == 2 else None
        self.out = nn.Linear(width, experts) if hidden_layers >= 1 else None
        self.reset(None)

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None) -> None:
        """The paper's initialisation: weights N(0, 0.01²), hidden bias 0, output bias ``init``."""
        if self.constant is not None:
            self.constant.fill_(self.init)
        for layer, bias in ((self.hidden, 0.0), (self.out, self.init)):
            if layer is not None:
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.01)
                layer.bias.fill_(bias)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.constant is not None:
            return self.constant.expand(tokens.shape[0], -1)
        assert self.out is not None
        hidden = F.relu(self.hidden(tokens)) if self.hidden is not None else tokens
        return self.out(hidden).mean(1)


class _RoutedLayer(nn.Module):
    """The state a routed layer holds beside its ``layer`` (θ_0): ``vectors [T, *weight]`` and
    ``bias_vectors [T, *bias]`` (None without a bias), the task vectors the routing mixes."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, experts: int, routing: Routing) -> None:
        super().__init__()
        self.routing = routing
        self.vectors = nn.Parameter(torch.zeros(experts, *layer.weight.shape), requires_grad=False)
        self.bias_vectors = (
            nn.Parameter(torch.zeros(experts, *layer.bias.shape), requires_grad=False)
            if layer.bias is not None
            else None
        )


class RoutedConv2d(_RoutedLayer):
    """A convolution with per-sample weights θ_0 + Σ_t r_t τ_t (``vectors [T, *weight]``, ``bias_vectors``)."""

    def __init__(self, layer: nn.Conv2d, experts: int, routing: Routing) -> None:
        super().__init__(layer, experts, routing)
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        r = self.routing.get()
        experts, out_channels = self.vectors.shape[:2]
        groups = self.layer.groups
        # stacked so that the output channels of each group stay together: [groups, T, out/groups, ...]
        stacked = self.vectors.view(experts, groups, out_channels // groups, *self.vectors.shape[2:])
        stacked = stacked.transpose(0, 1).reshape(experts * out_channels, *self.vectors.shape[2:])
        delta = self.layer._conv_forward(x, stacked, None)
        delta = delta.view(x.shape[0], groups, experts, out_channels // groups, *delta.shape[2:])
        routed = torch.einsum("bt,bgtohw->bgohw", r, delta).reshape(x.shape[0], out_channels, *delta.shape[-2:])
        y = self.layer(x) + routed
        if self.bias_vectors is not None:
            y = y + (r @ self.bias_vectors)[:, :, None, None]
        return y


class RoutedLinear(_RoutedLayer):
    """A linear layer with per-sample weights θ_0 + Σ_t r_t τ_t on inputs ``[B, ..., in]``."""

    def __init__(self, layer: nn.Linear, experts: int, routing: Routing) -> None:
        super().__init__(layer, experts, routing)
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        r = self.routing.get()
        # per-sample weights [B, out, in]: T·out·in per sample to assemble, cheaper than T more products when a
        # sample has many tokens (a ViT's 197), and one batched product
        weight = self.layer.weight + torch.einsum("bt,toi->boi", r, self.vectors)
        y = torch.einsum("b...i,boi->b...o", x, weight)
        if self.layer.bias is not None and self.bias_vectors is not None:
            bias = self.layer.bias + r @ self.bias_vectors
            y = y + bias.view(r.shape[0], *([1] * (x.dim() - 2)), -1)
        return y


class RoutedBatchNorm2d(nn.Module):
    """BatchNorm whose affine part is routed: ``norm`` (affine-free, the statistics) then per-sample
    γ_0 + Σ_t r_t τ^γ_t and β_0 + Σ_t r_t τ^β_t."""

    def __init__(self, layer: nn.BatchNorm2d, experts: int, routing: Routing) -> None:
        super().__init__()
        if not layer.affine:
            raise ConfigError("wemoe routes a BatchNorm's affine weights; this one has none")
        self.routing = routing
        self.norm = nn.BatchNorm2d(
            layer.num_features, layer.eps, layer.momentum, affine=False, track_running_stats=True
        )
        self.norm.load_state_dict(
            {k: v for k, v in layer.state_dict().items() if k not in ("weight", "bias")}, strict=True
        )
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.vectors = nn.Parameter(torch.zeros(experts, layer.num_features), requires_grad=False)
        self.bias_vectors = nn.Parameter(torch.zeros(experts, layer.num_features), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        r = self.routing.get()
        scale = self.weight + r @ self.vectors
        shift = self.bias + r @ self.bias_vectors
        return self.norm(x) * scale[:, :, None, None] + shift[:, :, None, None]


ROUTED_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: RoutedConv2d,
    nn.Linear: RoutedLinear,
    nn.BatchNorm2d: RoutedBatchNorm2d,
}


class WeightEnsemblingBlock(nn.Module):
    """A block whose routed layers run with θ_0 + Σ_t r_t(x) τ_t, r from :class:`Router` on its input."""

    def __init__(self, block: nn.Module, experts: int, hidden_layers: int = 2, init: float = 0.3) -> None:
        super().__init__()
        kind = BLOCK_KINDS.get(type(block).__name__)
        if kind is None:
            raise ConfigError(
                f"wemoe cannot upscale a {type(block).__name__}; it upscales {', '.join(sorted(BLOCK_KINDS))}"
            )
        self.kind, self.routing = kind, Routing()
        width = _input_width(block)
        self.block = _route_layers(block, experts, self.routing)
        self.router = Router(width, experts, hidden_layers, init)

    def routes(self, x: Tensor) -> Tensor:
        """The routing weights ``[B, T]`` of the inputs ``x``."""
        tokens = x.flatten(2).transpose(1, 2) if self.kind == "map" else x.reshape(x.shape[0], -1, x.shape[-1])
        return self.router(tokens)

    def forward(self, x: Tensor) -> Tensor:
        self.routing.weights = self.routes(x)
        try:
            return self.block(x)
        finally:
            self.routing.weights = None

    def routed_layers(self) -> Iterator[tuple[str, RoutedConv2d | RoutedLinear | RoutedBatchNorm2d]]:
        """``(name inside the original block, routed layer)`` of every routed layer."""
        for name, module in self.block.named_modules():
            if isinstance(module, RoutedConv2d | RoutedLinear | RoutedBatchNorm2d):
                yield name, module


def _input_width(block: nn.Module) -> int:
    first = next((m for m in block.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if first is None:
        raise ConfigError(f"wemoe: the {type(block).__name__} holds no convolution or linear layer to route")
    return first.in_channels if isinstance(first, nn.Conv2d) else first.in_features


def _route_layers(module: nn.Module, experts: int, routing: Routing) -> nn.Module:
    for name, child in list(module.named_children()):
        routed = ROUTED_LAYERS.get(type(child))
        if routed is not None:
            setattr(module, name, routed(child, experts, routing))
        elif any(True for _ in child.parameters(recurse=False)):
            raise ConfigError(
                f"wemoe cannot route the {type(child).__name__} {name!r} of a {type(module).__name__}: it routes "
                f"{', '.join(t.__name__ for t in ROUTED_LAYERS)}"
            )
        else:
            _route_layers(child, experts, routing)
    return module


def upscale(model: nn.Module, names: list[str], experts: int, hidden_layers: int = 2, init: float = 0.3) -> None:
    """Replace each module ``names[i]`` of ``model`` by a :class:`WeightEnsemblingBlock` of ``experts``
    (task vectors zero until loaded)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, WeightEnsemblingBlock(model.get_submodule(name), experts, hidden_layers, init))


def upscalable_blocks(model: nn.Module, shared: set[str]) -> list[str]:
    """The names of the modules of ``model`` of a kind in :data:`BLOCK_KINDS` whose parameters are all in
    ``shared`` (held by every expert), outermost first."""
    found: list[str] = []
    for name, module in model.named_modules():
        if type(module).__name__ not in BLOCK_KINDS or any(name.startswith(f"{f}.") for f in found):
            continue
        keys = [f"{name}.{p}" for p, _ in module.named_parameters()]
        if keys and all(k in shared for k in keys):
            found.append(name)
    return found


@torch.no_grad()
def load_experts(model: nn.Module, names: list[str], base: dict[str, Tensor], vectors: dict[str, Tensor]) -> None:
    """Give the upscaled blocks ``names`` of ``model`` their start θ_0 (``base``) and task vectors
    (``vectors[key]: [T, *shape]``), both keyed by the parameter names of the model before upscaling."""
    for name in names:
        for local, layer in block_of(model, name).routed_layers():
            target = layer if isinstance(layer, RoutedBatchNorm2d) else layer.layer
            for param, vector in (("weight", "vectors"), ("bias", "bias_vectors")):
                key = f"{name}.{local}.{param}"
                if getattr(layer, vector) is None:
                    continue
                getattr(target, param).copy_(base[key])
                getattr(layer, vector).copy_(vectors[key])


def block_of(model: nn.Module, name: str) -> WeightEnsemblingBlock:
    """The upscaled block ``name`` of ``model``."""
    block = model.get_submodule(name)
    if not isinstance(block, WeightEnsemblingBlock):
        raise ConfigError(f"{name} is a {type(block).__name__}, not an upscaled weight-ensembling block")
    return block
