"""The Jacobian paths: how one step's per-task gradients reach a balancer, one strategy per module.

The engine (:mod:`mtlvision.balancers.engine`) builds, per step that needs per-task gradients, one
:class:`~mtlvision.balancers.jacobian.base.StepGradients` (a
:class:`~mtlvision.balancers.base.TaskGradients`) and reads the update back from it:

- ``base.py``: :class:`~.base.Step` (the losses, shared and task-specific parameters, representation, trunk,
  ``reduce``, Gramian dtype), the heads (each task differentiated through its own head only), and
  :class:`~.base.ParameterGradients`, the base of every path: it keeps the shared-parameter Jacobian as
  per-parameter blocks or the flat ``[T, P]`` matrix and answers the Jacobian, Gramian, block and weighted
  update views from them.
- ``vmap.py``: the two ways to run one vmapped backward (torch's ``is_grads_batched`` or ``torch.func.vmap``,
  which folds the tasks into the batch), chosen by ``BACKWARD_VMAP`` or measured per key.
- ``batched.py`` (``jacobian="batched"``): one vmapped backward into the shared parameters.
- ``loop.py`` (``jacobian="loop"``): T plain backward passes, for an operation without a vmap batching rule.
- ``layers.py`` (``jacobian="layers"``): the vmapped backward stops at the outputs of the layers that
  :class:`~mtlvision.balancers.layers.LayerTaps` recorded; Gramian, blocks and update come layer by layer.
- ``choice.py``: ``balancer.jacobian="auto"``: the fastest applicable path, timed once per key at the first
  step and cached in memory and in a JSON file.
- ``representation.py``: representation mode (MGDA-UB style), where ``G`` is over the shared representation.
  Only the heads are differentiated there, so it is the same for every path. In parameter mode a
  representation, when given, is a parameter of each path: its backward starts from the trunk with the
  per-task representation gradients instead of from the T losses.

Adding a path touches two files here: a new module with a subclass of
:class:`~.base.ParameterGradients` (``_compute_blocks``; optionally the ``_fresh_*`` views, ``for_step`` and
``uses_taps``), and this file (:data:`PATHS` and :data:`JacobianPath`); :class:`~mtlvision.balancers.GradientEngine`
and :func:`~mtlvision.balancers.resolve_jacobian_path` take every name in :data:`PATHS`. Outside the package,
the config schema's ``balancer.jacobian`` lists the names a YAML config may select, and the trainer creates
:class:`~mtlvision.balancers.layers.LayerTaps` for ``"layers"`` only.
"""

from __future__ import annotations

from typing import Literal

from mtlvision.balancers.jacobian.base import ParameterGradients, Step, StepGradients
from mtlvision.balancers.jacobian.batched import BatchedGradients
from mtlvision.balancers.jacobian.layers import LayerGradients
from mtlvision.balancers.jacobian.loop import LoopGradients
from mtlvision.balancers.jacobian.representation import RepresentationGradients

JacobianPath = Literal["batched", "loop", "layers"]

#: every Jacobian path by its ``balancer.jacobian`` name
PATHS: dict[str, type[ParameterGradients]] = {
    "batched": BatchedGradients,
    "loop": LoopGradients,
    "layers": LayerGradients,
}

#: the paths from the lightest peak memory to the heaviest (the layer path never holds the ``[T, P]``
#: Jacobian, the batched path holds it, the loop holds it and its T rows; docs/balancers.md): the order in
#: which ``balancer.jacobian=auto`` weighs them
BY_MEMORY: tuple[str, ...] = ("layers", "batched", "loop")

__all__ = [
    "BY_MEMORY",
    "PATHS",
    "BatchedGradients",
    "JacobianPath",
    "LayerGradients",
    "LoopGradients",
    "ParameterGradients",
    "RepresentationGradients",
    "Step",
    "StepGradients",
]
