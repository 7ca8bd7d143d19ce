"""Our balancers in anyone's training loop: :class:`MultiTaskBackward` and the one-call :func:`mtl_backward`.

The user keeps their model, optimiser and loop (plain PyTorch, Lightning's manual optimisation, a detection
framework's) and replaces ``sum(losses).backward()`` by ``mtl.backward(losses)``. The object owns what the
Trainer wires for them (:class:`~mtlvision.balancers.GradientEngine`, the Jacobian path that
:func:`~mtlvision.balancers.resolve_jacobian_path` picks, the :class:`~mtlvision.balancers.LayerTaps` that
path records the forward with, the balancer's post-step and per-epoch calls), and refuses, with a message,
what a method cannot do in the loop it is given.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtlvision.balancers.base import Balancer, ExtraStateMixin, Needs
from mtlvision.balancers.bilevel import BilevelBalancer
from mtlvision.balancers.engine import GradientEngine, JacobianChoice, resolve_jacobian_path
from mtlvision.balancers.jacobian.choice import PathChoice
from mtlvision.balancers.layers import LayerTaps
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError


def loss_scaling_refusal(balancer: Balancer) -> str | None:
    """Why ``balancer`` cannot run under fp16 loss scaling (a ``GradScaler``), or None when it can.

    Scaled gradients reach a gradient method's solver (whose answer is not invariant to the scale) and a
    learnable balancer's parameters (which ``GradScaler.unscale_`` would divide); loss-weighting methods
    without parameters see the unscaled loss values and are exact."""
    name = type(balancer).__name__
    if balancer.needs is not Needs.LOSSES or any(True for _ in balancer.parameters()):
        return (
            f"fp16 loss scaling (a GradScaler) works with loss-weighting balancers without learnable parameters; "
            f"{name} needs unscaled gradients: use bf16 autocast, which needs no scaler"
        )
    return None


def _losses_vector(losses: Sequence[Tensor] | Tensor, what: str) -> Tensor:
    """The per-task losses as a [T] vector (``torch.stack`` of scalars keeps one graph node per task)."""
    if isinstance(losses, Tensor):
        if losses.dim() != 1 or losses.numel() < 1:
            raise ConfigError(f"{what}: losses must be a [T] vector or a list of T scalars, got {tuple(losses.shape)}")
        return losses
    items = list(losses)
    if not items or not all(isinstance(x, Tensor) and x.numel() == 1 for x in items):
        raise ConfigError(f"{what}: losses must be a non-empty list of scalar tensors, one per task")
    return torch.stack([x.reshape(()).float() for x in items])


def _features_list(features: Sequence[Tensor] | Tensor | None) -> list[Tensor] | None:
    if features is None:
        return None
    items = [features] if isinstance(features, Tensor) else list(features)
    if not items or not all(isinstance(t, Tensor) and t.requires_grad for t in items):
        raise ConfigError("backward(features=...): the shared features must be tensors of this step's graph")
    return items


def reached_parameters(losses: Tensor, exclude: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters ``losses`` depend on, found by walking its autograd graph, less ``exclude``.

    These are the task-specific parameters (the heads) when ``exclude`` holds the shared ones. Only
    ``nn.Parameter`` leaves that require grad are returned, in the order the walk meets them."""
    excluded = {id(p) for p in exclude}
    found: dict[int, nn.Parameter] = {}
    seen: set[Any] = set()
    stack = [losses.grad_fn] if losses.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, nn.Parameter) and id(variable) not in excluded:
            found.setdefault(id(variable), variable)
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return list(found.values())


def _all_reduce_mean(tensor: Tensor) -> Tensor:
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / dist.get_world_size()


def _average_grads(params: Sequence[Tensor]) -> None:
    """Average ``.grad`` over ranks in one flat all-reduce (a parameter without a gradient counts as 0)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    flat = _all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
    for g, part in zip(grads, torch.split(flat, [g.numel() for g in grads])):
        g.copy_(part.view_as(g))


class MultiTaskBackward:
    """A balancer's backward for any training loop: per-task losses in, every parameter's ``.grad`` out.

    ``shared`` is the part of the model every task goes through (a module, e.g. ``model.backbone``, or its
    parameters); the task-specific parameters (the heads) are those the losses reach beyond it, found by
    walking the losses' autograd graph at each step, or given as ``task_specific``. The Jacobian path is chosen
    as the Trainer's (:func:`~mtlvision.balancers.resolve_jacobian_path`): ``"auto"`` times each applicable
    path at the first step and keeps the fastest (:attr:`jacobian`, :attr:`jacobian_choice`); for a gradient
    method on a ``shared`` module with Conv2d or Linear layers, ``"layers"`` is one of them, and the forward
    must then run inside :meth:`record`.

    Args:
        shared: The shared module, or its parameters (no layer taps then: the ``"batched"`` path).
        balancer: A registered method name (``mtlvision list balancers``) or a
            :class:`~mtlvision.balancers.Balancer` instance.
        task_specific: The task-specific parameters; None finds them from the losses at every step.
        num_tasks: T, needed up front by methods with learnable weights (UW, IMTL-L, GradNorm) so that
            :meth:`parameters` exist before the optimiser is built.
        mode: ``"auto"`` (representation for the "-UB" variants, else params), ``"params"`` or
            ``"representation"`` (per-task gradients of the ``features`` given to :meth:`backward`).
        jacobian: ``"auto"`` (measured), ``"rule"``, ``"batched"``, ``"loop"`` or ``"layers"`` (see
            ``docs/balancers.md``).
        distributed: Average over the ranks of an initialised ``torch.distributed`` group, as the Trainer
            does: loss values and the Jacobian before the method sees them, then ``.grad``. Run the model
            unwrapped, or forward and backward inside ``DistributedDataParallel.no_sync()``.
        gramian_dtype: ``torch.float32`` (default) or ``torch.float64`` for the Gramian.
        **hparams: The method's hyper-parameters when ``balancer`` is a name.
    """

    def __init__(
        self,
        shared: nn.Module | Iterable[nn.Parameter],
        balancer: str | Balancer = "ew",
        *,
        task_specific: Iterable[nn.Parameter] | None = None,
        num_tasks: int | None = None,
        mode: Literal["auto", "params", "representation"] = "auto",
        jacobian: Literal["auto", "rule", "batched", "loop", "layers"] = "auto",
        distributed: bool = False,
        gramian_dtype: torch.dtype = torch.float32,
        **hparams: Any,
    ) -> None:
        self.balancer = _build(balancer, hparams)
        if isinstance(self.balancer, BilevelBalancer):
            raise ConfigError(
                f"balancer {type(self.balancer).__name__} is bilevel: it learns its task weights from validation "
                "batches by a meta-step before each training step, which MultiTaskBackward does not run; train it with "
                "mv.Trainer or `mtlvision train` (with a validation split)"
            )
        params = list(shared.parameters()) if isinstance(shared, nn.Module) else list(shared)
        self.shared: list[nn.Parameter] = [p for p in params if p.requires_grad]
        if not self.shared:
            raise ConfigError("MultiTaskBackward: the shared part has no parameters that require grad")
        self.task_specific = list(task_specific) if task_specific is not None else None
        name = type(self.balancer).__name__
        if mode == "auto":
            self.mode: Literal["params", "representation"] = (
                "representation" if self.balancer.prefers_representation else "params"
            )
        elif mode in ("params", "representation"):
            self.mode = mode
        else:
            raise ConfigError(f"MultiTaskBackward(mode=...) must be 'auto', 'params' or 'representation', got {mode!r}")
        if self.mode == "representation" and not self.balancer.supports_representation:
            raise ConfigError(f"balancer {name} is not defined on representation gradients; use mode='params'")
        if distributed and not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("MultiTaskBackward(distributed=True) needs an initialised torch.distributed group")
        self.distributed = distributed
        self.gramian_dtype = gramian_dtype
        self.num_tasks: int | None = None
        if num_tasks is not None:
            self._setup(num_tasks)
        needs_gradients = self.balancer.needs is not Needs.LOSSES
        self.taps: LayerTaps | None = None
        if (
            jacobian in ("auto", "rule", "layers")
            and needs_gradients
            and self.mode == "params"
            and isinstance(shared, nn.Module)
        ):
            self.taps = LayerTaps(shared, self.shared)
        self.jacobian: JacobianChoice = resolve_jacobian_path(jacobian, self.balancer, self.mode, bool(self.taps))
        #: what ``jacobian="auto"`` measured at the first step (path and seconds per path), else None
        self.jacobian_choice: PathChoice | None = None
        if self.jacobian == "layers" and needs_gradients and not self.taps:
            raise ConfigError(
                f"jacobian='layers' cannot run {name}: it needs mode='params' and a shared nn.Module holding "
                "Conv2d or Linear layers; use jacobian='batched'"
            )
        self._drop_unused_taps()
        self._recorded = False
        self._awaiting_after_step = False
        self._loss_sum: Tensor | None = None
        self._loss_steps = 0

    def _drop_unused_taps(self) -> None:
        if self.taps is not None and self.jacobian not in ("layers", "auto"):
            self.taps.remove()
            self.taps = None

    # ------------------------------------------------------------------------------------ what it says
    @property
    def needs_record(self) -> bool:
        """Whether the step's forward must run inside :meth:`record` (the ``"layers"`` path)."""
        return self.taps is not None

    @property
    def needs_post_step_losses(self) -> bool:
        """Whether :meth:`after_step` must be called after each optimiser step (FAMO)."""
        return self.balancer.needs_post_step_losses

    @property
    def needs_epoch_end(self) -> bool:
        """Whether :meth:`end_epoch` must be called after each epoch (DWA, STCH use the epoch's losses)."""
        return type(self.balancer).on_epoch_end is not Balancer.on_epoch_end

    def parameters(self) -> list[nn.Parameter]:
        """The method's learnable parameters (UW's log-variances, ...): give them to your optimiser."""
        return [p for p in self.balancer.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------ the step
    @contextmanager
    def record(self) -> Iterator[None]:
        """Run the step's forward inside: the ``"layers"`` path records the shared layers' inputs (free
        otherwise)."""
        if self.taps is None:
            self._recorded = True
            yield
            return
        with self.taps.recording():
            yield
        self._recorded = True

    def backward(
        self,
        losses: Sequence[Tensor] | Tensor,
        features: Sequence[Tensor] | Tensor | None = None,
        *,
        scale: float = 1.0,
        scaler: torch.amp.GradScaler | None = None,
        accumulate: bool = False,
    ) -> Tensor:
        """Balance ``losses`` and accumulate the update into ``.grad`` of the shared and task-specific parameters.

        Args:
            losses: One scalar loss per task (a list, or their ``torch.stack``), in a fixed task order.
            features: The shared representation the heads consumed (the output of ``shared``): needed in
                representation mode; in params mode it lets the heads be differentiated once, before the trunk.
            scale: Multiplies the gradients, not the loss values the method sees (``1 / accumulation steps``).
            scaler: A ``torch.amp.GradScaler`` for fp16: gradients arrive scaled, as ``scaler.step`` expects.
            accumulate: Let a gradient method add to ``.grad`` already there; its update is then balanced per
                call, not over the accumulated batch (the Trainer refuses ``train.accumulate`` for it).

        Returns:
            The method's task weights [T], detached.
        """
        vector = _losses_vector(losses, "MultiTaskBackward.backward")
        name = type(self.balancer).__name__
        if self._awaiting_after_step:
            raise ConfigError(
                f"balancer {name} needs the losses after each optimiser step: call mtl.after_step(new_losses) "
                "with the same batch's losses re-evaluated after optimizer.step() before the next backward"
            )
        self._setup(int(vector.numel()), late=True)
        factor = scale
        if scaler is not None and scaler.is_enabled():
            refusal = loss_scaling_refusal(self.balancer)
            if refusal is not None:
                raise ConfigError(refusal)
            # scale() also creates the scaler's state on the losses' device at its first use
            factor = float(scaler.scale(torch.ones((), device=vector.device))) * scale
        if self.taps is not None and not self._recorded:
            raise ConfigError(
                f"the 'layers' path of {name} needs this step's forward run inside `with mtl.record():`; or build "
                "MultiTaskBackward(..., jacobian='batched')"
            )
        rep = _features_list(features)
        if self.mode == "representation" and rep is None:
            raise ConfigError(
                f"balancer {name} runs on the shared representation: pass backward(losses, features=...), the "
                "output of the shared part the heads consumed"
            )
        needs_gradients = self.balancer.needs is not Needs.LOSSES
        if needs_gradients and not accumulate and any(p.grad is not None for p in self.shared):
            raise ConfigError(
                f"the shared parameters already hold gradients: call optimizer.zero_grad() (set_to_none=True) "
                f"before backward; {name} balances one batch's per-task gradients (accumulate=True adds a "
                "per-call balanced update instead)"
            )
        balanced = vector
        if self.distributed:
            balanced = balanced + (_all_reduce_mean(balanced) - balanced).detach()
        if factor != 1.0:
            balanced = balanced * factor - (balanced * (factor - 1)).detach()
        specific = self.task_specific if self.task_specific is not None else reached_parameters(vector, self.shared)
        engine = GradientEngine(
            self.shared,
            specific,
            rep,
            mode=self.mode,
            jacobian=self.jacobian,
            taps=self.taps,
            reduce=_all_reduce_mean if self.distributed else None,
            gramian_dtype=self.gramian_dtype,
        )
        self._recorded = False
        weights = engine.backward(balanced, self.balancer).weights.detach()
        if self.jacobian == "auto" and engine.jacobian_path != "auto":
            self.jacobian, self.jacobian_choice = engine.jacobian_path, engine.choice
            self._drop_unused_taps()
        if self.distributed:
            # the Jacobian was reduced, so a gradient method's shared .grad already agrees across ranks
            _average_grads([*(specific if needs_gradients else [*self.shared, *specific]), *self.parameters()])
        self._awaiting_after_step = self.balancer.needs_post_step_losses
        detached = vector.detach().float()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._loss_steps += 1
        return weights

    def after_step(self, new_losses: Sequence[Tensor] | Tensor) -> None:
        """After ``optimizer.step()``: the same batch's losses re-evaluated (under ``torch.no_grad()``), for
        methods whose update reads ``L(θ_{t+1})`` (FAMO). A no-op for the others (see
        :attr:`needs_post_step_losses`)."""
        if not self.balancer.needs_post_step_losses:
            return
        vector = _losses_vector(new_losses, "MultiTaskBackward.after_step").detach().float()
        if self.num_tasks is not None and vector.numel() != self.num_tasks:
            raise ConfigError(f"after_step: expected {self.num_tasks} task losses, got {vector.numel()}")
        self.balancer.after_step(_all_reduce_mean(vector) if self.distributed else vector)
        self._awaiting_after_step = False

    def end_epoch(self) -> None:
        """After each epoch: the method sees each task's mean loss over the epoch's :meth:`backward` calls
        (DWA, STCH; a no-op for methods without a per-epoch update)."""
        if self._loss_sum is None:
            raise ConfigError("end_epoch: no backward was run since the last epoch ended")
        mean = self._loss_sum / self._loss_steps
        self.balancer.on_epoch_end(_all_reduce_mean(mean) if self.distributed else mean)
        self._loss_sum, self._loss_steps = None, 0

    def remove(self) -> None:
        """Remove the forward hooks of the ``"layers"`` path from the shared module."""
        if self.taps is not None:
            self.taps.remove()

    def _setup(self, num_tasks: int, late: bool = False) -> None:
        if self.num_tasks is not None:
            if num_tasks != self.num_tasks:
                raise ConfigError(f"backward: expected {self.num_tasks} task losses, got {num_tasks}")
            return
        before = len(self.parameters())
        self.balancer.setup(num_tasks)
        self.balancer.to(self.shared[0].device)
        self.num_tasks = num_tasks
        if late and len(self.parameters()) > before:
            raise ConfigError(
                f"balancer {type(self.balancer).__name__} learns its own parameters: build "
                f"MultiTaskBackward(..., num_tasks={num_tasks}) and give mtl.parameters() to your optimiser"
            )


def _build(balancer: str | Balancer, hparams: dict[str, Any]) -> Balancer:
    if isinstance(balancer, Balancer):
        if hparams:
            raise ConfigError(f"hyper-parameters {sorted(hparams)} go to a method given by name, not to an instance")
        return balancer
    if not isinstance(balancer, str):
        raise ConfigError(f"balancer must be a registered name or a Balancer, got {type(balancer).__name__}")
    cls = BALANCERS.get(balancer)
    try:
        return cls(**hparams)
    except TypeError as exc:
        raise ConfigError(f"balancer {balancer!r}: {exc}") from None


def mtl_backward(
    losses: Sequence[Tensor] | Tensor,
    shared: nn.Module | Iterable[nn.Parameter],
    balancer: str | Balancer = "upgrad",
    *,
    features: Sequence[Tensor] | Tensor | None = None,
    task_specific: Iterable[nn.Parameter] | None = None,
    **hparams: Any,
) -> Tensor:
    """One call, after a forward that ran outside any recording: balance ``losses`` into ``.grad``.

    The ``"batched"`` path (the forward was not recorded for ``"layers"``). A method named here starts from
    a fresh state at every call, so only stateless methods are taken by name; give a stateful one (GradVac,
    Nash-MTL, FAMO, UW, DWA, ...) as an instance kept across steps, or use :class:`MultiTaskBackward`.

    Args:
        losses: One scalar loss per task.
        shared: The shared module or its parameters.
        balancer: A registered method name or a :class:`~mtlvision.balancers.Balancer` kept by the caller.
        features: The shared representation the heads consumed (see :meth:`MultiTaskBackward.backward`).
        task_specific: The task-specific parameters; None finds them from the losses.
        **hparams: The method's hyper-parameters when ``balancer`` is a name.

    Returns:
        The method's task weights [T], detached.
    """
    method = _build(balancer, hparams)
    if method.needs_post_step_losses:
        raise ConfigError(
            f"balancer {type(method).__name__} needs the losses after each optimiser step: use "
            "mv.MultiTaskBackward and its after_step"
        )
    if isinstance(balancer, str):
        method.setup(len(losses))
        if (
            (isinstance(method, ExtraStateMixin) and method._state_names)
            or type(method).on_epoch_end is not Balancer.on_epoch_end
            or any(True for _ in method.parameters())
            or any(True for _ in method.buffers())
        ):
            raise ConfigError(
                f"balancer {balancer!r} keeps state across steps, which a fresh method per call would lose: "
                f"keep one (mv.balancers.get({balancer!r})) and pass it, or use mv.MultiTaskBackward"
            )
    mtl = MultiTaskBackward(shared, method, task_specific=task_specific, jacobian="batched")
    return mtl.backward(losses, features)
