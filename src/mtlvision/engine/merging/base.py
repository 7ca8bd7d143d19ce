"""The contract of a merging rule and the registry of rules (``mtlvision list merges``).

A rule receives the experts' shared parameters tensor by tensor, each stacked over the experts
(``experts[name]`` of shape ``[T, *shape]``), and the experts' common start ``base[name]`` (``None`` for a rule
that needs none); it returns the merged tensor of every name. Two helpers cover the two kinds of rules in
the papers: :class:`FlatRule` sees all tensors flattened into one row per expert (TIES trims over the whole
task vector), :class:`TensorRule` merges one tensor at a time (TSV-M, Iso-C and Model Stock work per layer).
A :class:`ModulatedRule` (EMR-merging) gives no single set of weights but one per task, as a
:class:`TaskModulation` of the common start.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor

from mtlvision.errors import ConfigError
from mtlvision.registry import Registry


@dataclass(frozen=True)
class DataUse:
    """The data a rule reads, as its paper defines it: the ``split``, and whether it needs the tasks' ``labels``
    (Fisher merging's per-sample losses) or the images alone (RegMean's inputs, AdaMerging's test batches)."""

    split: str
    labels: bool


class MergeRule(ABC):
    """Combines the experts' stacked shared tensors ``{name: [T, *shape]}`` (and the base) into merged tensors."""

    #: the rule is defined on task vectors θ_t − θ_0 and needs the experts' common start
    needs_base: ClassVar[bool] = False
    #: the data statistics the rule needs from each expert (``fisher``, ``gram``: see
    #: :mod:`mtlvision.engine.merging.statistics`), gathered on ``samples`` training samples; None for none
    statistics: ClassVar[str | None] = None

    @abstractmethod
    def merge(
        self,
        experts: Mapping[str, Tensor],
        base: Mapping[str, Tensor] | None,
        statistics: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Args: experts: ``{name: [T, *shape]}``; base: ``{name: shape}`` or None; statistics: ``{name:
        [T, ...]}`` for a rule that needs them. Returns ``{name: shape}``."""

    def describe(self) -> dict[str, float]:
        return {k: float(v) for k, v in vars(self).items()}

    def data_use(self) -> DataUse | None:
        """The data the rule reads; None for a rule that combines the experts' weights alone."""
        return None


class DataRule(MergeRule):
    """A rule that needs data statistics (its ``statistics``) from each expert on ``samples`` training samples."""

    samples: int
    #: the statistics come from the tasks' losses (Fisher) rather than from the images alone (RegMean)
    needs_labels: ClassVar[bool] = False

    def data_use(self) -> DataUse:
        """The training split, as both papers gather their statistics on training data."""
        return DataUse(split="train", labels=self.needs_labels)

    def check_samples(self, rule: str) -> None:
        """A clear error unless ``samples`` is a positive whole number."""
        check_whole(rule, "samples", self.samples, 1)


#: what a learned rule minimises: the loss of the merged model whose shared parameters are the given tensors
#: (differentiable in them), on the next unlabelled batch(es)
Objective = Callable[[Mapping[str, Tensor]], Tensor]


class LearnedRule(MergeRule):
    """A rule that learns its merge coefficients by minimising an objective of the merged model on unlabelled
    data (AdaMerging): :meth:`learn` replaces :meth:`merge`, which has no data to learn from."""

    #: what was learnt (coefficients, objective before and after), recorded in the merged run's report
    learned: dict[str, object]

    @abstractmethod
    def learn(
        self, experts: Mapping[str, Tensor], base: Mapping[str, Tensor], objective: Objective
    ) -> dict[str, Tensor]:
        """Args: experts: ``{name: [T, *shape]}``; base: ``{name: shape}``; objective: the loss of the merged
        model given its shared tensors. Returns ``{name: shape}``."""

    def merge(
        self,
        experts: Mapping[str, Tensor],
        base: Mapping[str, Tensor] | None,
        statistics: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        raise ConfigError(
            f"merging rule {type(self).__name__} learns its coefficients on unlabelled batches: it needs the merged "
            "model's objective (mtlvision merge builds it from the experts' data), not only their weights"
        )


@dataclass
class TaskModulation:
    """Task-specific weights from one shared vector: expert t's tensor ``name`` is
    ``base[name] + rescalers[t] · masks[name][t] ⊙ unified[name]``.

    Attributes:
        unified: ``{name: shape}``, the vector every expert shares.
        masks: ``{name: [T, *shape]}`` booleans, where each expert keeps the unified vector.
        rescalers: ``[T]``, each expert's scale.
    """

    unified: dict[str, Tensor]
    masks: dict[str, Tensor]
    rescalers: Tensor

    def task_weights(self, base: Mapping[str, Tensor], task: int) -> dict[str, Tensor]:
        """Expert ``task``'s tensors (index in the experts' order) rebuilt from ``base``."""
        scale = float(self.rescalers[task])
        return {k: base[k] + scale * self.masks[k][task] * v for k, v in self.unified.items()}


class ModulatedRule(MergeRule):
    """A rule whose result is one set of weights per expert (:meth:`decompose`), not one merged set: the
    merged run keeps the start, the shared vector and each expert's modulation, and runs one forward per
    expert (:class:`mtlvision.models.modulated.TaskModulatedModel`)."""

    needs_base: ClassVar[bool] = True

    @abstractmethod
    def decompose(self, experts: Mapping[str, Tensor], base: Mapping[str, Tensor], names: list[str]) -> TaskModulation:
        """Args: experts: ``{name: [T, *shape]}``; base: ``{name: shape}``; names: the experts' names in
        order (for error messages). Returns the modulation of ``base`` that gives each expert's weights."""

    def merge(
        self,
        experts: Mapping[str, Tensor],
        base: Mapping[str, Tensor] | None,
        statistics: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        raise ConfigError(
            f"merging rule {type(self).__name__} gives task-specific weights (one backbone per task), not one merged "
            "set: use decompose(), as mtlvision merge does"
        )


class FlatRule(MergeRule):
    """A rule on the whole flattened vector: ``experts [T, P]`` and ``base [P]`` in, ``[P]`` out."""

    @abstractmethod
    def __call__(self, experts: Tensor, base: Tensor | None) -> Tensor: ...

    def merge(
        self,
        experts: Mapping[str, Tensor],
        base: Mapping[str, Tensor] | None,
        statistics: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        names = list(experts)
        rows = torch.cat([experts[k].flatten(1) for k in names], dim=1)
        flat_base = torch.cat([base[k].flatten() for k in names]) if base is not None else None
        merged = self(rows, flat_base)
        out, offset = {}, 0
        for key in names:
            shape = experts[key].shape[1:]
            n = experts[key][0].numel()
            out[key] = merged[offset : offset + n].view(shape)
            offset += n
        return out


class TensorRule(MergeRule):
    """A rule applied to each tensor on its own: ``experts [T, *shape]`` and ``base [*shape]`` in, ``shape`` out."""

    @abstractmethod
    def merge_tensor(self, experts: Tensor, base: Tensor | None) -> Tensor: ...

    def merge(
        self,
        experts: Mapping[str, Tensor],
        base: Mapping[str, Tensor] | None,
        statistics: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        return {k: self.merge_tensor(v, base[k] if base is not None else None) for k, v in experts.items()}


def as_matrices(tensor: Tensor) -> Tensor | None:
    """Per-expert matrices ``[T, out, in·k·k]`` of a stacked linear or convolution weight ``[T, out, in, ...]``;
    None for vectors (biases, normalisation), which the SVD-based rules do not decompose."""
    if tensor.dim() < 3:
        return None
    return tensor.flatten(2)


def check_range(
    rule: str, name: str, value: float, low: float, high: float, *, open_low: bool = True, open_high: bool = False
) -> None:
    """A clear error when a hyper-parameter lies outside the interval from ``low`` to ``high`` (open or closed)."""
    above = low < value if open_low else low <= value
    below = value < high if open_high else value <= high
    if not (above and below):
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ConfigError(f"{rule}: {name} must be in {interval}, got {value}")


def check_whole(rule: str, name: str, value: object, low: int) -> None:
    """A clear error unless a hyper-parameter is a whole number (not a bool) of at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{rule}: {name} must be a whole number >= {low}, got {value!r}")


def check_choice(rule: str, name: str, value: object, allowed: tuple[object, ...]) -> None:
    """A clear error unless a hyper-parameter is one of ``allowed`` (a bool never is)."""
    if isinstance(value, bool) or value not in allowed:
        raise ConfigError(f"{rule}: {name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


MERGE_RULES: Registry[type[MergeRule]] = Registry("merging rule")


def make_rule(name: str, hparams: Mapping[str, float] | None = None) -> MergeRule:
    """The rule ``name`` with its hyper-parameters; an unknown one is named with the allowed ones."""
    cls = MERGE_RULES.get(name)
    try:
        return cls(**dict(hparams or {}))
    except TypeError as exc:
        allowed = ", ".join(f.name for f in fields(cls)) or "none"  # type: ignore[arg-type]  # rules are dataclasses
        raise ConfigError(f"merging rule {name!r}: {exc}; its hyper-parameters: {allowed}") from None
