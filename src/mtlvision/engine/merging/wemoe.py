"""WEMoE: the shared layers merged by task arithmetic, chosen blocks upscaled into weight-ensembling
mixture-of-experts modules whose routers are learnt by entropy minimisation on unlabelled test batches
(Tang, Shen, Du et al., Merging Multi-Task Models via Weight-Ensembling Mixture of Experts, ICML 2024).

The blocks (:mod:`mtlvision.models.weight_ensembling`) are ResNets' residual blocks and ViTs' MLPs; the model
keeps, for each, the common start θ_0, the T task vectors and a router, so a merged run folder records which
blocks were upscaled (``wemoe.json``) and every loader rebuilds that structure before reading the weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtlvision.engine.merging.adamerging import check_learning_options
from mtlvision.engine.merging.arithmetic import TaskArithmetic
from mtlvision.engine.merging.base import (
    MERGE_RULES,
    DataUse,
    MergeRule,
    Objective,
    check_choice,
    check_range,
)
from mtlvision.errors import ConfigError
from mtlvision.models.weight_ensembling import (
    BLOCK_KINDS,
    HIDDEN_LAYERS,
    block_of,
    load_experts,
    upscalable_blocks,
    upscale,
)

#: the file of a merged run folder that says which blocks are upscaled (absent: a plain model)
LAYOUT_NAME = "wemoe.json"


@MERGE_RULES.register(
    "wemoe",
    "WEMoE: task arithmetic for the shared layers; residual blocks (ViT: MLPs) keep θ_0 and every task vector, "
    "mixed per sample by routers learnt by entropy minimisation on unlabelled test batches",
    "Tang, Shen, Du et al., Merging Multi-Task Models via Weight-Ensembling Mixture of Experts, ICML 2024",
)
@dataclass
class WEMoE(MergeRule):
    """Layers outside the upscaled blocks: θ_0 + λ Σ_t τ_t with λ = ``scale`` (0.3). Upscaled blocks: θ_0 +
    Σ_t r_t(x) τ_t with routers of ``hidden_layers`` (2) hidden layers whose output starts at ``scale``, learnt
    by Adam (``lr`` 1e-4) for ``steps`` (1000) steps, each on ``batches`` (1) random batches of ``batch_size``
    (16) images of the experts' ``split`` (test): the defaults of the reference code. The objective is
    AdaMerging's (:mod:`~mtlvision.engine.merging.test_time`: prediction entropy summed over tasks;
    ``regression=expert`` for depth and normals). ``seed`` fixes the routers' initialisation and the batches."""

    needs_base: ClassVar[bool] = True
    scale: float = 0.3
    hidden_layers: int = 2
    steps: int = 1000
    lr: float = 1e-4
    batch_size: int = 16
    batches: int = 1
    split: str = "test"
    regression: str = "refuse"
    seed: int = 0

    def __post_init__(self) -> None:
        check_learning_options("wemoe", self)
        check_choice("wemoe", "hidden_layers", self.hidden_layers, HIDDEN_LAYERS)
        check_range("wemoe", "scale", self.scale, 0.0, 1.0, open_low=False)
        self.learned: dict[str, Any] = {}
        self.blocks: list[str] = []

    def data_use(self) -> DataUse:
        """The images of ``split`` (the test split by default, as in the paper), unlabelled: the routers' data."""
        return DataUse(split=self.split, labels=False)

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k not in ("learned", "blocks")}

    def merge(
        self,
        experts: Mapping[str, Tensor],
        base: Mapping[str, Tensor] | None,
        statistics: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        raise ConfigError(
            "merging rule wemoe changes the model (blocks upscaled into routed mixtures of the task vectors): "
            "mtlvision merge builds it from the expert runs; it is not a combination of tensors"
        )

    def arithmetic(self) -> TaskArithmetic:
        """The rule for the layers outside the upscaled blocks (and the start of every routed block)."""
        return TaskArithmetic(scale=self.scale)

    def upscale(
        self,
        model: nn.Module,
        experts: Mapping[str, Mapping[str, Tensor]],
        base: Mapping[str, Tensor],
        shared: list[str],
    ) -> list[str]:
        """Upscale the blocks of ``model`` (loaded with the task-arithmetic merge) whose parameters are all in
        ``shared``: θ_0 from ``base``, task vectors θ_t − θ_0 from ``experts`` (in their order), routers
        initialised as the paper does (seeded). Returns the blocks' names."""
        self.blocks = upscalable_blocks(model, set(shared))
        if not self.blocks:
            raise ConfigError(
                f"wemoe found no block to upscale in the shared backbone: it upscales {', '.join(sorted(BLOCK_KINDS))} "
                "modules (ResNets' residual blocks, ViTs' MLPs); use another rule for this backbone"
            )
        keys = [k for k in shared if any(k.startswith(f"{b}.") for b in self.blocks)]
        upscale(model, self.blocks, len(experts), self.hidden_layers, self.scale)
        start = {k: base[k].float() for k in keys}
        vectors = {k: torch.stack([state[k].float() for state in experts.values()]) - start[k] for k in keys}
        load_experts(model, self.blocks, start, vectors)
        generator = torch.Generator().manual_seed(self.seed)
        for name in self.blocks:
            block_of(model, name).router.reset(generator)
        return self.blocks

    def learn_routers(self, model: nn.Module, objective: Objective) -> None:
        """Adam on the routers' parameters alone, minimising ``objective`` (given those parameters)."""
        model.requires_grad_(False)
        routers = {
            f"{name}.router.{k}": p for name in self.blocks for k, p in block_of(model, name).router.named_parameters()
        }
        for parameter in routers.values():
            parameter.requires_grad_(True)
        optimizer = torch.optim.Adam(routers.values(), lr=self.lr)
        losses = []
        for _ in range(self.steps):
            loss = objective(routers)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        self.learned = {
            "objective_first_step": losses[0],
            "objective_last_step": losses[-1],
            "upscaled_blocks": list(self.blocks),
            "router_parameters": sum(p.numel() for p in routers.values()),
            "mean_routing_per_block": self._mean_routing(model, objective, routers),
        }

    def _mean_routing(self, model: nn.Module, objective: Objective, routers: Mapping[str, Tensor]) -> dict[str, Any]:
        """Each block's routing weights (per expert, in the order of the experts) averaged over one more batch."""
        seen: dict[str, list[Tensor]] = {}
        hooks = [
            block_of(model, name).router.register_forward_hook(
                lambda _m, _i, out, name=name: seen.setdefault(name, []).append(out.detach())
            )
            for name in self.blocks
        ]
        try:
            with torch.no_grad():
                objective(routers)
        finally:
            for hook in hooks:
                hook.remove()
        return {name: [round(float(v), 4) for v in torch.cat(seen[name]).mean(0)] for name in self.blocks}

    def layout(self, experts: int) -> dict[str, Any]:
        """What a loader needs to rebuild the upscaled model (written as ``wemoe.json``)."""
        return {"rule": "wemoe", "blocks": self.blocks, "experts": experts, "hidden_layers": self.hidden_layers}


def save_layout(run_dir: Path, layout: Mapping[str, Any]) -> None:
    (run_dir / LAYOUT_NAME).write_text(json.dumps(dict(layout), indent=2) + "\n")


def rebuild(model: nn.Module, run_dir: Path) -> None:
    """Upscale ``model`` as the merged run ``run_dir`` records in ``wemoe.json`` (nothing when absent), so that
    its weights load; a malformed file is refused with the field named."""
    path = run_dir / LAYOUT_NAME
    if not path.is_file():
        return
    try:
        layout = json.loads(path.read_text())
        blocks, experts, hidden = layout["blocks"], layout["experts"], layout["hidden_layers"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a WEMoE layout ({exc!r}); it needs blocks, experts and hidden_layers") from None
    if not isinstance(experts, int) or experts < 1 or not isinstance(blocks, list):
        raise ConfigError(f"{path}: experts must be a whole number >= 1 and blocks a list, got {experts!r}, {blocks!r}")
    try:
        upscale(model, [str(b) for b in blocks], experts, int(hidden))
    except AttributeError as exc:
        raise ConfigError(f"{path}: block not in the run's model ({exc})") from None
