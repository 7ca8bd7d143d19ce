"""The label-free objective a learned merging rule (AdaMerging) minimises on unlabelled images.

:class:`EntropyObjective` evaluates the merged model (its shared tensors substituted by
``torch.func.functional_call``, so that the loss is differentiable in them) on ``batches`` random batches of
``batch_size`` unlabelled images per call, and sums over tasks and batches each task's mean prediction
entropy (:data:`~mtlvision.engine.merging.entropy.PREDICTION_ENTROPY`). BatchNorm layers normalise with each
batch's own statistics while the coefficients are learnt (the experts' running statistics describe other
weights; they are recomputed after merging), as entropy minimisation at test time does with BatchNorm
networks (Wang et al., Tent, ICLR 2021); every other module is in evaluation mode.

Depth and normals define no entropy. With ``regression="expert"`` such a task's term is instead the L1
distance between the merged model's output and its own expert's output on the same images (computed once,
the expert in evaluation mode): a label-free surrogate of ours, not AdaMerging's entropy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mtlvision.engine.merging.entropy import PREDICTION_ENTROPY
from mtlvision.errors import ConfigError
from mtlvision.models import MultiTaskModel


def stack_images(batches: Iterable[Tensor], where: str) -> Tensor:
    """All images of ``batches`` in one tensor ``[N, C, H, W]``; images of different sizes are refused."""
    images = list(batches)
    if not images:
        raise ConfigError(f"{where} holds no images to learn the merge coefficients on")
    shapes = {tuple(b.shape[1:]) for b in images}
    if len(shapes) > 1:
        raise ConfigError(f"{where}: images of different sizes {sorted(shapes)}; learned merging needs one size")
    return torch.cat(images)


class EntropyObjective:
    """Σ_tasks Σ_batches of each task's mean prediction entropy (or, with ``regression="expert"``, a regression
    task's L1 distance to its expert) of ``model`` with the given shared tensors.

    Args:
        model: the merged model, heads and buffers loaded; its shared parameters are substituted per call.
        images: the unlabelled images ``[N, C, H, W]`` (kept on the CPU; batches are moved to ``device``).
        batch_size: images per batch; batches: batches per call; seed: fixes the batches drawn.
        regression: ``refuse`` (a task without entropy is an error) or ``expert``.
        experts: per regression task's name, its expert model (needed with ``regression="expert"``).
        device: where the model runs.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        images: Tensor,
        *,
        batch_size: int,
        batches: int,
        seed: int,
        regression: str = "refuse",
        experts: Mapping[str, MultiTaskModel] | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.model, self.images = model, images
        self.batch_size, self.batches = min(batch_size, len(images)), batches
        self.device = device or torch.device("cpu")
        self.generator = torch.Generator().manual_seed(seed)
        self.targets: dict[str, Tensor] = {}
        for name, task in model.tasks.items():
            if task.kind in PREDICTION_ENTROPY:
                continue
            if regression != "expert":
                raise ConfigError(
                    f"AdaMerging and WEMoE minimise prediction entropy, which task {name!r} ({task.kind}, a "
                    "regression) does not define; set regression=expert to fit it to its own expert's outputs on the "
                    "same images instead (a label-free surrogate, not the paper's), or merge with another rule"
                )
            expert = (experts or {}).get(name)
            if expert is None:
                raise ConfigError(f"regression=expert needs the expert of task {name!r}; none was given")
            self.targets[name] = self._expert_outputs(expert, name)
        model.to(self.device).eval()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()

    @torch.no_grad()
    def _expert_outputs(self, expert: MultiTaskModel, name: str) -> Tensor:
        expert.to(self.device).eval()
        outputs = [expert(chunk.to(self.device))[name].float().cpu() for chunk in self.images.split(self.batch_size)]
        return torch.cat(outputs)

    def __call__(self, shared: Mapping[str, Tensor]) -> Tensor:
        parameters = {k: v.to(self.device) for k, v in shared.items()}
        total = torch.zeros((), device=self.device)
        for _ in range(self.batches):
            index = torch.randperm(len(self.images), generator=self.generator)[: self.batch_size]
            outputs: dict[str, Any] = functional_call(self.model, parameters, (self.images[index].to(self.device),))
            for name, task in self.model.tasks.items():
                if name in self.targets:
                    difference = outputs[name].float() - self.targets[name][index].to(self.device)
                    total = total + difference.abs().mean()
                else:
                    total = total + PREDICTION_ENTROPY.get(task.kind)(outputs[name])
        return total
