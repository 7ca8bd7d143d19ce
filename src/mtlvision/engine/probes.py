"""Step probes: observers that look at a training step every ``every`` steps, before the optimiser moves.

A probe says how often it looks (:attr:`StepProbe.every`) and what of the step it needs the
:class:`~mtlvision.balancers.GradientEngine` to keep (:attr:`StepProbe.record`: the Gramian of the per-task
gradients, or also the shared-parameter Jacobian). On a step where a probe is due the trainer asks the engine
to record that much (the balancer is not told), then hands the probe a :class:`ProbeContext` before the
optimiser step, logs the scalars it returns to TensorBoard, adds its per-epoch summary to ``history.csv``,
lets it write its own files into the run folder, and keeps its state in the checkpoint. The gradient-conflict
diagnostics (:mod:`mtlvision.engine.diagnostics`) and TAG's task affinity
(:mod:`mtlvision.engine.affinity_run`) are probes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from mtlvision.balancers import RecordedStep
from mtlvision.balancers.engine import Record


@dataclass
class ProbeContext:
    """One recorded step, as a probe sees it, before the optimiser step.

    ``losses`` are the [T] detached task losses (unscaled); ``recorded`` the engine's record, whose gradients
    are those of ``grad_scale × losses`` (the fp16 loss scale, else 1); ``batch`` the step's batch (on the
    device); ``task_losses`` computes the [T] task losses of the batch under a mapping of parameter and buffer
    names to replacement tensors (``torch.func.functional_call``), without gradients, leaving the model's own
    parameters and buffers untouched; ``shared`` the shared parameters in the order of ``recorded.blocks``,
    ``shared_names`` their names in the model and ``shared_lrs`` each one's current learning rate (its
    optimiser group's).
    """

    step: int
    epoch: int
    task_names: list[str]
    losses: Tensor
    recorded: RecordedStep
    grad_scale: float
    batch: dict[str, Any]
    shared: Sequence[Tensor]
    shared_names: list[str]
    shared_lrs: list[float]
    task_losses: Callable[[dict[str, Tensor]], Tensor]


class StepProbe(ABC):
    """Looks at every ``every``-th training step (steps 0, every, 2·every, ...); 0 turns it off."""

    #: what the engine keeps of a step this probe looks at: ``"gramian"`` or ``"jacobian"``
    record: Record = "gramian"

    def __init__(self, every: int) -> None:
        self.every = int(every)

    def due(self, step: int) -> bool:
        """Whether the probe looks at optimiser step ``step`` (counted from 0)."""
        return self.every > 0 and step % self.every == 0

    @abstractmethod
    def observe(self, context: ProbeContext) -> dict[str, float]:
        """Look at one step; returns scalars for TensorBoard at that step."""

    @abstractmethod
    def epoch_end(self) -> dict[str, float]:
        """This epoch's summary columns for ``history.csv`` (empty when it looked at no step)."""

    def write(self, run_dir: Path) -> None:  # noqa: B027  (a probe without files writes nothing)
        """Write the probe's own files into ``run_dir`` (called with every checkpoint)."""

    def plot(self, plots_dir: Path) -> list[Path]:
        """Draw the probe's figures into ``plots_dir`` at the end of a run; returns the files written."""
        return []

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after a resume (plain data: numbers, strings, lists)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


def strongest_record(probes: Sequence[StepProbe], step: int) -> Record | None:
    """What the engine must keep of ``step`` for the probes due at it (None when none is)."""
    wanted = {probe.record for probe in probes if probe.due(step)}
    if not wanted:
        return None
    return "jacobian" if "jacobian" in wanted else "gramian"
