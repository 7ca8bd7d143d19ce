"""Learning to Branch: a tree of backbone stages, its branching learnt by Gumbel-softmax (Guo et al., ICML 2020)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlvision.errors import ConfigError
from mtlvision.models.architectures._stages import backbone_stages, feature_layout, stage_copies
from mtlvision.models.architectures.base import Architecture, ArchitectureSpec, RepresentationUnavailable
from mtlvision.models.architectures.registry import ARCHITECTURES
from mtlvision.models.backbones import Backbone


class LTBNetwork(Architecture):
    """T copies of the backbone's stages, one block per task and stage; block ``(s, t)`` (``s ≥ 1``) takes
    as input ``Σ_u A_s[t, u] x_{s-1, u}``, where ``A_s`` [T, T] is the stage's mixing matrix:

    - warm-up (``epoch < warmup · epochs``): all ones, every block takes the sum of the previous blocks;
    - training after it: ``gumbel_softmax(logits_s, τ, hard=True)`` over ``u``, one parent per block with a
      straight-through gradient into the logits, ``τ = temperature · epochs / √(epoch + 1)``;
    - evaluation after it: the final tree, one-hot at ``argmax_u logits_s[t, u]`` (:meth:`tree`).

    A one-hot ``A`` makes the blocks a tree rooted at the image (the stem blocks ``(0, t)`` all read it);
    task t's features are the outputs of the blocks on its path ``(0, ·), …, (S-1, t)`` (during warm-up, the
    mean of each earlier stage's blocks). Blocks that no task's path reaches are computed and receive no
    gradient. The logits start at 1 (uniform choices).
    """

    progress: Tensor

    def __init__(
        self,
        backbone_factory: Callable[[], Backbone],
        task_names: Sequence[str],
        warmup: float,
        temperature: float,
    ) -> None:
        super().__init__()
        backbone = backbone_factory()
        stages = backbone_stages(backbone, LTB.name, 2, "each task's block chooses its parent in the previous stage")
        self.task_names = list(task_names)
        self.feature_channels, self.feature_strides = feature_layout(backbone)
        num_tasks = len(self.task_names)
        self.columns = nn.ModuleList([stages, *stage_copies(backbone_factory, num_tasks - 1, 0, None)])
        self.logits = nn.Parameter(torch.ones(len(stages) - 1, num_tasks, num_tasks))
        self.warmup, self.temperature = warmup, temperature
        # (epoch, epochs) of the schedule, saved with the weights so that a loaded model evaluates its tree
        self.register_buffer("progress", torch.tensor([0, 1]))

    def set_progress(self, epoch: int, epochs: int) -> None:
        self.progress.copy_(torch.tensor([epoch, epochs]))

    def warming_up(self) -> bool:
        epoch, epochs = self.progress.tolist()
        return bool(epoch < self.warmup * epochs)

    def tau(self) -> float:
        """The Gumbel-softmax temperature of the current epoch."""
        epoch, epochs = self.progress.tolist()
        return float(self.temperature * epochs / math.sqrt(epoch + 1))

    def tree(self) -> list[list[int]]:
        """The final tree: for each stage ``s ≥ 1``, the parent (a block of stage ``s − 1``) of each task's block."""
        return self.logits.detach().argmax(dim=-1).tolist()

    def mixing(self) -> Tensor:
        """The [S-1, T, T] mixing matrices of this forward pass (see the class docstring)."""
        if self.warming_up():
            return torch.ones_like(self.logits)
        if self.training:
            return F.gumbel_softmax(self.logits, tau=self.tau(), hard=True, dim=-1)
        return F.one_hot(self.logits.detach().argmax(dim=-1), self.logits.shape[-1]).to(self.logits)

    def forward(self, images: Tensor) -> dict[str, list[Tensor]]:
        columns = [cast(nn.ModuleList, column) for column in self.columns]
        mixings = self.mixing()
        stacked = [torch.stack([column[0](images) for column in columns])]  # [T, B, C, H, W] per stage
        for stage, mixing in enumerate(mixings, start=1):
            inputs = torch.einsum("tu,ub...->tb...", mixing.to(stacked[-1].dtype), stacked[-1])
            stacked.append(torch.stack([column[stage](x) for column, x in zip(columns, inputs.unbind(0))]))
        # task t's feature at stage s: its path's block there, P_s[t] selecting it (P_{s-1} = P_s A_s, rows
        # normalised: during warm-up, the mean of the stage's blocks)
        path = torch.eye(len(columns), dtype=stacked[-1].dtype, device=stacked[-1].device)
        features = [stacked[-1]]
        for stage in range(len(mixings), 0, -1):
            path = path @ mixings[stage - 1].to(path.dtype)
            path = path / path.sum(dim=-1, keepdim=True)
            features.insert(0, torch.einsum("tu,ub...->tb...", path, stacked[stage - 1]))
        return {name: [feature[t] for feature in features] for t, name in enumerate(self.task_names)}

    def encode(self, images: Tensor) -> list[Tensor]:
        raise RepresentationUnavailable(
            "architecture 'ltb' has no single shared representation: every task has its own path through the "
            "tree of blocks. Use balancer.mode=params."
        )

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.parameters()


@ARCHITECTURES.register(
    "ltb",
    "Learning to Branch: one block per task and stage, each picking its parent block by Gumbel-softmax",
    "Guo, Lee & Ulbricht, Learning to Branch for Multi-Task Learning, ICML 2020",
)
@dataclass(frozen=True)
class LTB(ArchitectureSpec):
    """Learning to Branch as LibMTL implements it (``architecture/LTB.py``): T backbone copies, every stage
    after the first choosing, per task, its parent block among the previous stage's T blocks.

    ``warmup`` (LibMTL: 1/100) is the fraction of epochs during which every block takes the sum of all
    previous blocks; ``temperature`` (LibMTL: 1/20) scales the schedule ``τ = temperature · epochs /
    √(epoch + 1)``. LibMTL also samples at evaluation; here evaluation uses the final tree (the argmax of the
    logits), the deterministic network the paper derives after the search. With S stages and ``P`` backbone
    parameters it holds ``T P + (S − 1) T²`` parameters.
    """

    name: ClassVar[str] = "ltb"
    warmup: float = 0.01
    temperature: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, (int, float)) or not 0 <= self.warmup <= 1:
            raise ConfigError(f"architecture 'ltb': warmup={self.warmup!r} must be a fraction of epochs in [0, 1].")
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature <= 0
        ):
            raise ConfigError(f"architecture 'ltb': temperature={self.temperature!r} must be a number > 0.")

    def build(self, backbone_factory: Callable[[], Backbone], task_names: Sequence[str]) -> Architecture:
        return LTBNetwork(backbone_factory, task_names, float(self.warmup), float(self.temperature))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}
