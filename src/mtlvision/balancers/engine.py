"""The gradient engine: per-task gradients on request, and a balancer's :class:`Update` turned into ``.grad``.

It knows no model: only the shared parameters, the task-specific parameters and, in representation mode,
the shared representation tensors of the current step. For a balancer that needs per-task gradients it
builds one :class:`~mtlvision.balancers.jacobian.StepGradients` for the step, which computes them lazily, at
most once: in parameter mode the Jacobian path's (:mod:`mtlvision.balancers.jacobian`), in representation
mode :class:`~mtlvision.balancers.jacobian.RepresentationGradients`. The update is then applied without a
further backward through the trunk where the per-task gradients are known: task-specific ``.grad`` is
``Σ_t w_t ∂L_t/∂θ_t`` from the heads' per-task gradients; shared ``.grad`` is ``Σ_t w_t G_t`` (or the
balancer's ``direction``) from the path; in representation mode ``Σ_t w_t ∂L_t/∂rep`` (or ``direction``) is
back-propagated from the representation into the shared parameters in one ordinary backward. A balancer
that needs only the losses gets one backward of ``Σ_t w_t L_t``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from mtlvision.balancers.base import Balancer, Needs, Update
from mtlvision.balancers.jacobian import BY_MEMORY, PATHS, RepresentationGradients, Step, StepGradients
from mtlvision.balancers.jacobian.base import ParameterGradients, split_like
from mtlvision.balancers.jacobian.choice import PathChoice, choose_path, path_key
from mtlvision.balancers.layers import LayerTaps
from mtlvision.errors import ConfigError, InternalError


def _one_of(names: Sequence[str]) -> str:
    quoted = [repr(name) for name in names]
    return ", ".join(quoted[:-1]) + f" or {quoted[-1]}"


#: ``balancer.jacobian`` after :func:`resolve_jacobian_path`: a path, or ``"auto"`` (chosen by timing at the first step)
JacobianChoice = Literal["auto", "batched", "loop", "layers"]
#: the names ``balancer.jacobian`` accepts: the paths, ``"auto"`` (measure) and ``"rule"`` (the fixed rule)
JACOBIAN_OPTIONS = ("auto", "rule", *sorted(PATHS))


def resolve_jacobian_path(requested: str, balancer: Balancer, mode: str, taps_possible: bool) -> JacobianChoice:
    """``balancer.jacobian`` for this balancer and mode. ``"auto"`` stays ``"auto"`` for a gradient method
    in parameter mode (the engine times each applicable path at the first step, see
    :mod:`mtlvision.balancers.jacobian.choice`) and is the rule otherwise. ``"rule"``, the fixed rule:
    ``"layers"`` for a gradient method in parameter mode when the model has layers to tap (``taps_possible``:
    some, and no compiled forward), else ``"batched"``. An explicit path is returned as it is."""
    if requested not in JACOBIAN_OPTIONS:
        raise ConfigError(f"balancer.jacobian must be {_one_of(JACOBIAN_OPTIONS)}, got {requested!r}")
    gradient_method = balancer.needs is not Needs.LOSSES and mode == "params"
    if requested == "auto" and gradient_method:
        return "auto"
    if requested in ("auto", "rule"):
        return "layers" if gradient_method and taps_possible else "batched"
    return requested  # type: ignore[return-value]


def _accumulate(param: Tensor, grad: Tensor, owned: bool = True) -> None:
    """Add ``grad`` into ``param.grad``; a tensor the engine does not own (a balancer's direction) is copied."""
    grad = grad.detach().to(param.dtype)
    if param.grad is None:
        param.grad = grad if owned else grad.clone()
    else:
        param.grad.add_(grad)


#: what a step's observer may ask the engine to keep: the Gramian, or the Gramian and the Jacobian's blocks
Record = Literal["gramian", "jacobian"]


@dataclass
class RecordedStep:
    """What :meth:`GradientEngine.backward` kept of one step when asked to ``record`` it (detached; to be read,
    not changed).

    ``gramian`` is ``K = G Gᵀ`` [T, T] (float64) of the per-task gradients the balancer sees: of the shared
    parameters in parameter mode, of the shared representation in representation mode. ``blocks`` (only for
    ``record="jacobian"`` in parameter mode) is one ``[T, *shape]`` block per shared parameter. Both are of the
    losses as given, i.e. of any loss scaling the caller applied.
    """

    gramian: Tensor
    blocks: list[Tensor] | None = None


class GradientEngine:
    """Computes one step's gradients for a balancer and accumulates them into ``.grad``.

    ``shared`` are the parameters every task depends on; ``task_specific`` the rest (the heads);
    ``representation`` the shared representation tensors of this step, as the heads consumed them. When
    they were cut from the trunk (:class:`~mtlvision.models.multitask.CutRepresentation`: detached copies,
    needed whenever one tensor is computed from another, as a backbone's stage outputs are), ``trunk`` gives
    the tensors they were cut from, and gradients reach the shared parameters through those.

    - ``mode``: ``"representation"`` (MGDA-UB style: gradient methods see the per-task gradients of the
      representation; only balancers with ``supports_representation``) or ``"params"`` (the per-task
      gradients of the shared parameters; a representation, when given, only speeds their computation up).
      Default: ``"representation"`` when a representation is given, else ``"params"``.
    - ``jacobian``: ``"batched"`` (one vmapped trunk backward, the default), ``"layers"`` (the same backward
      stopped at the outputs of the layers ``taps`` recorded: their per-task weight gradients, Gramian and
      weighted update come from activations, see :mod:`mtlvision.balancers.layers`; parameter mode only) or
      ``"loop"`` (T plain backward passes, for operations without a vmap batching rule), or ``"auto"``:
      at the first step of a gradient method in parameter mode, each applicable path is timed (see
      :func:`~mtlvision.balancers.jacobian.choice.choose_path`; cached per key in ``cache_file`` and in the
      process) and the fastest kept in :attr:`jacobian_path` and :attr:`choice`, a path holding more memory
      only where it is faster by ``choice.HEAVIER_MARGIN``; otherwise (loss weighting,
      representation mode, a ``reduce``: ranks must agree) the rule of :func:`resolve_jacobian_path`.
    - ``taps``: the :class:`~mtlvision.balancers.layers.LayerTaps` whose recording the step's forward ran in;
      needed by ``jacobian="layers"``.
    - ``reduce``: applied to the shared-parameter Jacobian (representation mode: to the Gramian) before the
      balancer sees it, e.g. an all-reduce mean across ranks in distributed training. None (the default):
      nothing to reduce, which also lets ``"layers"`` form a layer's Gramian term from activations.
    - ``gramian_dtype``: float32 (default) or float64 for ``TaskGradients.gramian()``.
    - ``cache_file``: where ``jacobian="auto"`` keeps its choices on disk (default: the user cache directory).
    """

    def __init__(
        self,
        shared: Sequence[nn.Parameter],
        task_specific: Sequence[nn.Parameter],
        representation: Sequence[Tensor] | Tensor | None = None,
        *,
        trunk: Sequence[Tensor] | None = None,
        mode: Literal["params", "representation"] | None = None,
        jacobian: JacobianChoice = "batched",
        taps: LayerTaps | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
        gramian_dtype: torch.dtype = torch.float32,
        cache_file: Path | None = None,
    ) -> None:
        if isinstance(representation, Tensor):
            representation = [representation]
        self.representation = list(representation) if representation is not None else None
        if trunk is not None and (
            self.representation is None or [t.shape for t in trunk] != [r.shape for r in self.representation]
        ):
            raise ConfigError("the trunk tensors must match the representation tensors cut from them, shape by shape")
        self.trunk = list(trunk) if trunk is not None else self.representation
        mode = mode or ("representation" if self.representation is not None else "params")
        if mode not in ("params", "representation"):
            raise ConfigError(f"balancer.mode must be 'params' or 'representation', got {mode!r}")
        if mode == "representation" and self.representation is None:
            raise ConfigError("representation mode needs the shared representation tensors of the step")
        if jacobian not in PATHS and jacobian != "auto":
            raise ConfigError(f"balancer.jacobian must be {_one_of(['auto', *sorted(PATHS)])}, got {jacobian!r}")
        if jacobian != "auto" and PATHS[jacobian].uses_taps and taps is None:
            raise ConfigError(
                f"GradientEngine(jacobian={jacobian!r}) needs the LayerTaps the step's forward recorded in"
            )
        if gramian_dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"the Gramian dtype must be float32 or float64, got {gramian_dtype}")
        self.shared = [p for p in shared if p.requires_grad]
        self.task_specific = [p for p in task_specific if p.requires_grad]
        self.mode = mode
        self.jacobian_path: JacobianChoice = jacobian
        self.cache_file = cache_file
        #: what ``jacobian="auto"`` chose at this engine's step, with each candidate's time (else None)
        self.choice: PathChoice | None = None
        self.taps = taps
        self.reduce = reduce
        self.gramian_dtype = gramian_dtype
        #: what the last :meth:`backward` kept when asked to ``record`` the step (else None)
        self.recorded: RecordedStep | None = None

    def backward(self, losses: Tensor, balancer: Balancer, record: Record | None = None) -> Update:
        """Run ``balancer`` on ``losses`` [T] and accumulate the resulting update into ``.grad``.

        Pass ``losses`` as ``torch.stack`` of the per-task losses: the engine then differentiates each task
        from its own loss node and never walks another task's head. ``record`` keeps the step's Gramian (and,
        for ``"jacobian"``, the shared-parameter Jacobian's blocks) in :attr:`recorded`, for an observer such as
        the trainer's diagnostics; the balancer is not told. A gradient method's Gramian is the one it uses
        (formed once); for a loss-weighting method the per-task gradients are computed for this step only, and
        the update is then read from them (no second backward)."""
        if losses.dim() != 1:
            raise ConfigError(f"the engine expects a vector of T task losses, got shape {tuple(losses.shape)}")
        name = type(balancer).__name__
        representation_mode = self.mode == "representation"
        if representation_mode and not balancer.supports_representation:
            raise ConfigError(
                f"balancer {name} is not defined on gradients of the shared representation; use balancer.mode=params"
            )
        grads: StepGradients | None = None
        self.recorded = None
        if balancer.needs is not Needs.LOSSES or record is not None:
            if not representation_mode and not self.shared:
                who = f"balancer {name} ({balancer.needs.value})" if record is None else "recording a step"
                raise ConfigError(
                    f"{who} needs per-task gradients but the engine was given no shared parameters that require grad"
                )
            if self.jacobian_path == "auto":
                self._choose(losses, balancer, representation_mode)
            grads = self._step_gradients(losses, representation_mode)
            if record is not None:
                # a gradient method may change the blocks it is handed; a loss-weighting one never sees them
                self.recorded = self._record(grads, record, copy=balancer.needs is not Needs.LOSSES)
        update = balancer.balance(losses, grads if balancer.needs is not Needs.LOSSES else None)
        if update.weights.shape != losses.shape:
            raise InternalError(
                f"balancer {name} returned weights of shape {tuple(update.weights.shape)} for {losses.numel()} tasks"
            )
        if (update.direction is not None or update.shared_weights is not None) and balancer.needs is Needs.LOSSES:
            raise InternalError(f"balancer {name} needs only losses, so it cannot return a direction or shared weights")
        if update.shared_weights is not None and not (grads is not None and grads.jacobian_known):
            raise InternalError(
                f"balancer {name} returned shared_weights without asking for the per-task gradients first"
            )
        if grads is not None and (grads.jacobian_known or update.direction is not None):
            self._apply_from_jacobian(update, grads)
        else:
            weights = update.weights.detach().to(device=losses.device, dtype=losses.dtype)
            if losses.requires_grad:
                self._backward_weighted((weights * losses).sum())
        if update.extra_loss is not None:
            own = [p for p in balancer.parameters() if p.requires_grad]
            if not own:
                raise InternalError(f"balancer {name} returned an extra_loss but has no learnable parameters")
            torch.autograd.backward(update.extra_loss, inputs=own)
        return update

    def _record(self, grads: StepGradients, record: Record, copy: bool) -> RecordedStep:
        """The step's Gramian (the one a Gramian method then reads: formed once) and, when asked, its blocks
        (copied when ``copy``; else the engine's own, which the update only reads)."""
        blocks = None
        if record == "jacobian":
            if not isinstance(grads, ParameterGradients):
                raise ConfigError("recording the Jacobian of the shared parameters needs balancer.mode=params")
            blocks = [b.detach().clone() if copy else b.detach() for b in grads.shared_blocks()]
        return RecordedStep(grads.gramian().detach().double(), blocks)

    def _step(self, losses: Tensor) -> Step:
        return Step(
            losses, self.shared, self.task_specific, self.representation, self.trunk, self.reduce, self.gramian_dtype
        )

    def _choose(self, losses: Tensor, balancer: Balancer, representation_mode: bool) -> None:
        """Resolve ``jacobian="auto"``: the fastest applicable path for this step's key (timed here, graph
        retained and results discarded, the first time), or the rule where there is nothing to time."""
        calls = self.taps.take() if self.taps is not None else []
        if self.taps is not None:
            self.taps.restore(calls)
        if balancer.needs is Needs.LOSSES or representation_mode or self.reduce is not None:
            self.jacobian_path = "layers" if calls and not representation_mode else "batched"
            return
        candidates = [name for name in BY_MEMORY if not PATHS[name].uses_taps or calls]
        step = self._step(losses)
        shapes = [
            *(p.shape for p in self.shared),
            *(t.shape for t in self.trunk or ()),
            *(c.input.shape for c in calls),
        ]
        dtypes = sorted({str(t.dtype) for t in [*self.shared, *(self.trunk or ()), *(c.input for c in calls)]})
        key = path_key(
            shapes, losses.numel(), losses.device, losses.dtype, [balancer.needs.value, *dtypes, *candidates]
        )
        weights = torch.ones(losses.numel(), device=losses.device)

        def run(name: str) -> None:
            if self.taps is not None:
                self.taps.restore(calls)
            grads = PATHS[name].for_step(step, self.taps)
            grads.keep_graph = True
            if balancer.needs is Needs.GRAMIAN:
                grads.gramian()
            else:
                for _ in grads.jacobian_blocks():
                    pass
            grads.ensure_heads()
            for _ in grads.consume_weighted_shared(weights):
                pass
            if losses.is_cuda:
                torch.cuda.synchronize(losses.device)

        self.choice = choose_path(key, candidates, run, self.cache_file)
        self.jacobian_path = self.choice.path  # type: ignore[assignment]
        if self.taps is not None:
            self.taps.restore(calls)

    def _step_gradients(self, losses: Tensor, representation_mode: bool) -> StepGradients:
        """This step's per-task gradients: the Jacobian path's in parameter mode, the representation's in
        representation mode (where the layer calls a path would use are dropped)."""
        step = self._step(losses)
        path = PATHS[self.jacobian_path]
        if representation_mode:
            if path.uses_taps and self.taps is not None:
                self.taps.take()
            return RepresentationGradients(step)
        return path.for_step(step, self.taps)

    def _backward_weighted(self, total: Tensor) -> None:
        """Accumulate ``∂total/∂θ`` into every parameter's ``.grad``, across the cut when there is one."""
        if self.trunk is self.representation:
            if self.shared or self.task_specific:
                torch.autograd.backward(total, inputs=self.shared + self.task_specific)
            return
        assert self.representation is not None
        inputs = [*self.task_specific, *self.representation]
        grads = torch.autograd.grad(total, inputs, allow_unused=True, materialize_grads=True)
        for param, g in zip(self.task_specific, grads):
            _accumulate(param, g)
        self._through_trunk(grads[len(self.task_specific) :])

    def _through_trunk(self, rep_grads: Sequence[Tensor]) -> None:
        """Back-propagate gradients of the representation into the shared parameters' ``.grad``."""
        assert self.trunk is not None
        pairs = [(t, g.to(t.dtype)) for t, g in zip(self.trunk, rep_grads) if t.requires_grad]
        if self.shared and pairs:
            torch.autograd.backward([t for t, _ in pairs], grad_tensors=[g for _, g in pairs], inputs=self.shared)

    def _apply_from_jacobian(self, update: Update, grads: StepGradients) -> None:
        """The update from the per-task gradients already computed: no second backward through the trunk."""
        weights = update.weights.detach().float()
        for param, g in zip(self.task_specific, grads.ensure_heads()):
            _accumulate(param, torch.tensordot(weights.to(device=g.device, dtype=g.dtype), g, dims=1))
        if update.shared_weights is not None:
            weights = update.shared_weights.detach().float()
            if weights.shape != update.weights.shape:
                raise InternalError(
                    f"the balancer's shared_weights have shape {tuple(weights.shape)} but its weights "
                    f"{tuple(update.weights.shape)}"
                )
        if self.mode == "representation":
            assert self.representation is not None
            flat = update.direction if update.direction is not None else weights @ grads.jacobian()
            if flat.shape != (sum(r.numel() for r in self.representation),):
                raise InternalError(
                    f"the balancer's direction has shape {tuple(flat.shape)} but the representation has "
                    f"{sum(r.numel() for r in self.representation)} entries"
                )
            parts = split_like(flat.detach(), self.representation)
            self._through_trunk(parts)
            return
        assert isinstance(grads, ParameterGradients)
        if update.direction is None:
            for param, g in zip(self.shared, grads.consume_weighted_shared(weights)):
                _accumulate(param, g)
            return
        numel = sum(p.numel() for p in self.shared)
        if update.direction.shape != (numel,):
            raise InternalError(
                f"the balancer's direction has shape {tuple(update.direction.shape)} but the shared parameters "
                f"have {numel} entries"
            )
        for param, g in zip(self.shared, split_like(update.direction.detach(), self.shared)):
            _accumulate(param, g, owned=False)
