"""EMR-merging: elect, mask, rescale (Huang, Ye, Li et al., NeurIPS 2024).

From the task vectors τ_t = θ_t − θ_0 of T experts:

* **Elect** a unified task vector: its sign is the sign of Σ_t τ_t (an exact zero elects −1, as the
  authors' code does: ``(sum > 0) * 2 - 1``), its magnitude per entry the largest |τ_t| among the experts
  whose entry agrees with that sign (0 where none agrees);
* **Mask** per expert: M_t = (τ_t ⊙ τ_uni > 0), where its task vector agrees in sign with the unified one;
* **Rescale** per expert: λ_t = Σ_l mean|τ_t,l| / Σ_l mean|M_t,l ⊙ τ_uni,l|, over the model's tensors l.
  The paper writes λ_t = sum(|τ_t|) / sum(|M_t ⊙ τ_uni|); the authors' code (and FusionBench's copy of it)
  sums each tensor's *mean* absolute value, so every tensor counts once whatever its size. We follow the
  code: the paper's numbers come from it.

Expert t then runs with θ_0 + λ_t · M_t ⊙ τ_uni: the result is one backbone per task, stored as θ_0, τ_uni,
one bit per entry and task, and T scalars. Nothing is tuned and no data is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from mtlvision.engine.merging.base import MERGE_RULES, ModulatedRule, TaskModulation
from mtlvision.errors import ConfigError


def elect_mask_rescale(vectors: Mapping[str, Tensor], names: list[str] | None = None) -> TaskModulation:
    """EMR's unified vector, masks and rescalers of the task vectors ``{name: [T, *shape]}``.

    Args:
        vectors: every tensor's task vectors, stacked over the T experts.
        names: the experts' names, for the error raised when one has no entry left by its mask.

    Returns:
        The :class:`TaskModulation` (unified ``{name: shape}``, masks ``{name: [T, *shape]}``, rescalers ``[T]``).
    """
    if not vectors:
        raise ConfigError("EMR-merging: there are no shared tensors to merge")
    count = next(iter(vectors.values())).shape[0]
    unified: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    magnitude = torch.zeros(count, dtype=torch.float64)
    kept = torch.zeros(count, dtype=torch.float64)
    for key, tau in vectors.items():
        sign = torch.where(tau.sum(0) > 0, 1.0, -1.0).to(tau.dtype)
        agrees = tau * sign > 0
        elected = (tau.abs() * agrees).amax(0) * sign
        unified[key], masks[key] = elected, agrees
        magnitude += tau.abs().flatten(1).mean(1, dtype=torch.float64)
        kept += (agrees * elected).abs().flatten(1).mean(1, dtype=torch.float64)
    empty = [i for i in range(count) if kept[i] == 0]
    if empty:
        who = ", ".join(names[i] if names else f"#{i}" for i in empty)
        raise ConfigError(
            f"EMR-merging: the task vector of expert(s) {who} agrees in sign with the elected vector nowhere (it is "
            "zero, i.e. the expert equals the common start, or opposes the others everywhere): its rescaler "
            "Σ|τ_t| / Σ|M_t ⊙ τ_uni| is undefined. Leave that expert out of the merge."
        )
    return TaskModulation(unified=unified, masks=masks, rescalers=(magnitude / kept).float())


@MERGE_RULES.register(
    "emr",
    "EMR: elect a unified task vector, per-task masks and rescalers; one backbone per task (T forwards)",
    "Huang, Ye, Li et al., EMR-Merging: Tuning-Free High-Performance Model Merging, NeurIPS 2024",
)
@dataclass
class EmrMerging(ModulatedRule):
    """EMR-merging (no hyper-parameters): each expert's backbone is rebuilt as θ_0 + λ_t · M_t ⊙ τ_uni."""

    def decompose(self, experts: Mapping[str, Tensor], base: Mapping[str, Tensor], names: list[str]) -> TaskModulation:
        if len(names) < 2:
            raise ConfigError(
                "EMR-merging needs at least two experts: with one, its modulated backbone is that expert itself"
            )
        return elect_mask_rescale({k: v - base[k] for k, v in experts.items()}, names)
