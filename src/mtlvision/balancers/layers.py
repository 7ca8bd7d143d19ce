"""Per-layer gradients from activations: a layer's per-task weight gradients, their Gramian and the weighted
update, from the layer's input and the per-task gradients of its output.

A convolution or linear layer computes ``y = W a`` at ``M`` places (the rows of a linear layer's flattened
input; a convolution's patches over batch × output positions). With ``A`` [M, D] its inputs and ``B_t``
[M, O] the gradient of task t's loss w.r.t. ``y``, task t's weight gradient is ``B_tᵀ A``, so

    ⟨∇_W L_s, ∇_W L_t⟩ = Σ_mn (B_s B_tᵀ)_mn (A Aᵀ)_mn = ⟨B_s, (A Aᵀ) B_t⟩,

the identity behind per-example gradient norms (Goodfellow, "Efficient Per-Example Gradient Computations",
2015; for convolutions Rochette et al., "Efficient Per-Example Gradient Computations in Convolutional Neural
Networks", 2019), here applied across tasks. Forming ``K`` that way costs ``M²D + T M² O + T² M O`` instead
of ``T M O D + T² O D`` for the T weight gradients and their products: far less where M is small against O
and D, as in a backbone's deep stages (resnet18's layer4 at 64×64 input: M = 64 patches of D = 4608 inputs
for O = 512 outputs). Each layer takes the cheaper way. The weighted update needs one weight gradient per
layer, ``(Σ_t w_t B_t)ᵀ A``, whatever T is.

The engine gets ``B`` from one vmapped backward that stops at each tapped layer's output, so autograd never
forms the T per-task weight gradients itself (see :mod:`mtlvision.balancers.jacobian.layers`).
:class:`LayerTaps` records, during the forward, each tapped layer's input and the autograd edge of its output.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn import functional as F
from torch.nn.grad import conv2d_weight
from torch.utils.hooks import RemovableHandle

from mtlvision.errors import ConfigError


@dataclass
class LayerCall:
    """One call of a tapped layer in this step's forward."""

    module: nn.Module
    name: str
    input: Tensor
    output: GradientEdge
    output_shape: torch.Size
    input_version: int

    def released(self) -> LayerCall:
        """This call without its input activation (so that it can be freed)."""
        return dataclasses.replace(self, input=self.input.new_empty(0), input_version=-1)

    def checked_input(self) -> Tensor:
        """The layer's input, detached (what is computed from it is data, not graph), refusing one modified
        in place after the layer read it."""
        if self.input._version != self.input_version:
            raise ConfigError(
                f"the input of layer {self.name!r} was modified in place after the layer read it, so its weight "
                "gradients cannot be formed from it; use balancer.jacobian=batched"
            )
        return self.input.detach()


class LayerRule(ABC):
    """How one kind of layer's weight gradients follow from its input ``A`` and output gradients ``B``."""

    module_type: ClassVar[type[nn.Module]]

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return True

    @staticmethod
    def parameters(module: nn.Module) -> list[Tensor]:
        """The layer's parameters in the order the rule returns their gradients: weight, then bias."""
        params = [module.weight, getattr(module, "bias", None)]  # Conv2d or Linear: a weight
        return [p for p in params if isinstance(p, Tensor)]

    @abstractmethod
    def task_gradients(self, module: nn.Module, inputs: Tensor, grads: Tensor) -> list[Tensor]:
        """``[T, *shape]`` per parameter, from ``grads`` [T, *output shape]."""

    @abstractmethod
    def weighted_gradients(self, module: nn.Module, inputs: Tensor, grad: Tensor) -> list[Tensor]:
        """``[*shape]`` per parameter, from one output gradient (``Σ_t w_t B_t``)."""

    def weights_in_backward(self, module: nn.Module, inputs: Tensor, grads: Tensor) -> bool:
        """Whether autograd's own weight gradient, formed inside the vmapped backward, is as fast a way to the
        T weight gradients as this rule's (``grads``: the ``[T, *output shape]`` the rule would be given, a
        meta tensor where only its shape is read). Default: yes (a linear layer's is one batched GEMM both
        ways)."""
        return True

    @abstractmethod
    def rows(self, module: nn.Module, inputs: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        """``A`` [M, D] and ``B`` [T, M, O]: the layer as one matrix product at M places."""

    @abstractmethod
    def places(self, module: nn.Module, grads: Tensor) -> int:
        """M: how many times the layer's weight is applied in this call."""

    def gramian_costs(self, module: nn.Module, grads: Tensor) -> tuple[int, int]:
        """Multiply-adds of the weight-gradient way and of the activation way to this layer's Gramian."""
        places, tasks = self.places(module, grads), grads.shape[0]
        weight = self.parameters(module)[0]
        outputs, width = weight.shape[0], weight[0].numel()
        direct = tasks * places * outputs * width + tasks * tasks * outputs * width
        by_activations = places * places * width + tasks * places * places * outputs + tasks * tasks * places * outputs
        return direct, by_activations

    def prefers_activations(self, module: nn.Module, grads: Tensor) -> bool:
        """Whether this call's Gramian term is cheaper the activation way, whose ``[M, M]`` matrix must also be
        no larger than the T weight gradients it avoids."""
        places = self.places(module, grads)
        direct, by_activations = self.gramian_costs(module, grads)
        return by_activations < direct and places * places <= grads.shape[0] * self.parameters(module)[0].numel()

    def gramian_by_activations(self, module: nn.Module, inputs: Tensor, grads: Tensor, dtype: torch.dtype) -> Tensor:
        """``K`` [T, T] of the layer's per-task gradients (bias included) as ``⟨B_s, (A Aᵀ) B_t⟩``."""
        rows, outs = self.rows(module, inputs, grads)
        rows, outs = rows.to(dtype), outs.to(dtype)
        gram = torch.einsum("smo,tmo->st", outs, torch.matmul(rows @ rows.T, outs))
        if getattr(module, "bias", None) is not None:
            summed = outs.sum(dim=1)
            gram = gram + summed @ summed.T
        return gram


class Conv2dRule(LayerRule):
    """``nn.Conv2d`` with zero padding given as numbers (or ``"valid"``)."""

    module_type = nn.Conv2d

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        assert isinstance(module, nn.Conv2d)
        return module.padding_mode == "zeros" and (module.padding == "valid" or not isinstance(module.padding, str))

    @staticmethod
    def _geometry(module: nn.Conv2d) -> dict[str, Any]:
        padding = (0, 0) if module.padding == "valid" else module.padding
        return {"stride": module.stride, "padding": padding, "dilation": module.dilation}

    def __init__(self, weight_way: str = "measure") -> None:
        """``weight_way``: how :meth:`task_gradients` forms the T weight gradients. ``"measure"`` (default)
        times both ways once per layer geometry, task count, device and dtype in this process and keeps the
        faster (:data:`MEASURED_WAYS`); ``"gemm"`` or ``"kernel"`` force one (for every layer path:
        ``RULES[nn.Conv2d].weight_way = "kernel"``). Grouped convolutions always take the kernel."""
        if weight_way not in ("measure", "gemm", "kernel"):
            raise ConfigError(f"Conv2dRule weight_way must be 'measure', 'gemm' or 'kernel', got {weight_way!r}")
        self.weight_way = weight_way

    def task_gradients(self, module: nn.Module, inputs: Tensor, grads: Tensor) -> list[Tensor]:
        assert isinstance(module, nn.Conv2d)
        inputs, grads = inputs.float(), grads.float()
        weight = self._weights(self._way(module, inputs, grads), module, inputs, grads)
        return [weight] if module.bias is None else [weight, grads.sum(dim=(1, 3, 4))]

    def _way(self, module: nn.Conv2d, inputs: Tensor, grads: Tensor) -> str:
        """``"gemm"`` or ``"kernel"`` for these float32 shapes: the kernel for a grouped convolution, else
        :attr:`weight_way`, measured once per key where it is ``"measure"`` (on random output gradients of
        ``grads``' shape where ``grads`` is a meta tensor: their values do not matter)."""
        if module.groups != 1:
            return "kernel"
        if self.weight_way != "measure":
            return self.weight_way
        key = self._way_key(module, inputs, grads)
        if key not in MEASURED_WAYS and grads.is_meta:
            grads = torch.randn(grads.shape, dtype=torch.float32, device=inputs.device)
        return measured_way(key, lambda w: self._weights(w, module, inputs, grads))

    def _weights(self, way: str, module: nn.Conv2d, inputs: Tensor, grads: Tensor) -> Tensor:
        """``[T, *weight shape]``: ``"gemm"``, one GEMM over the layer's unfolded patches, ``[T·O, M] @ [M, D]``;
        ``"kernel"``, the convolution's own weight-gradient kernel once per task (no unfolded copy)."""
        if way == "gemm":
            rows, outs = self.rows(module, inputs, grads)
            return torch.matmul(outs.transpose(1, 2), rows).view(grads.shape[0], *module.weight.shape)
        shape, geometry = tuple(module.weight.shape), self._geometry(module)
        return torch.stack([conv2d_weight(inputs, shape, g, groups=module.groups, **geometry) for g in grads])

    def weights_in_backward(self, module: nn.Module, inputs: Tensor, grads: Tensor) -> bool:
        """Yes where this rule would take the convolution's own kernel (autograd runs the same one, task by task,
        or a grouped convolution under ``torch.func``), no where the unfolded GEMM is measured faster."""
        assert isinstance(module, nn.Conv2d)
        return self._way(module, inputs.float(), grads) == "kernel"

    def _way_key(self, module: nn.Conv2d, inputs: Tensor, grads: Tensor) -> tuple[Any, ...]:
        geometry = self._geometry(module)
        return (
            tuple(module.weight.shape),
            *(tuple(v) if not isinstance(v, int) else v for v in geometry.values()),
            tuple(inputs.shape),
            tuple(grads.shape),
            inputs.device.type,
            inputs.dtype,
        )

    def weighted_gradients(self, module: nn.Module, inputs: Tensor, grad: Tensor) -> list[Tensor]:
        assert isinstance(module, nn.Conv2d)
        grad = grad.float()
        weight = conv2d_weight(
            inputs.float(), tuple(module.weight.shape), grad, groups=module.groups, **self._geometry(module)
        )
        return [weight] if module.bias is None else [weight, grad.sum(dim=(0, 2, 3))]

    def rows(self, module: nn.Module, inputs: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        assert isinstance(module, nn.Conv2d) and module.groups == 1
        geometry = self._geometry(module)
        patches = F.unfold(
            inputs.float(), module.kernel_size, geometry["dilation"], geometry["padding"], geometry["stride"]
        )
        batch, width, positions = patches.shape
        rows = patches.transpose(1, 2).reshape(batch * positions, width)
        tasks = grads.shape[0]
        outs = grads.float().reshape(tasks, batch, module.out_channels, positions).transpose(2, 3)
        return rows, outs.reshape(tasks, batch * positions, module.out_channels)

    def places(self, module: nn.Module, grads: Tensor) -> int:
        """Batch × output positions."""
        return int(grads.shape[1] * grads.shape[3] * grads.shape[4])

    def prefers_activations(self, module: nn.Module, grads: Tensor) -> bool:
        assert isinstance(module, nn.Conv2d)
        return module.groups == 1 and super().prefers_activations(module, grads)  # rows() flattens one group


class LinearRule(LayerRule):
    """``nn.Linear`` on inputs of any leading shape."""

    module_type = nn.Linear

    def task_gradients(self, module: nn.Module, inputs: Tensor, grads: Tensor) -> list[Tensor]:
        rows, outs = self.rows(module, inputs, grads)
        weight = torch.einsum("tmo,mi->toi", outs, rows)
        return [weight] if getattr(module, "bias", None) is None else [weight, outs.sum(dim=1)]

    def weighted_gradients(self, module: nn.Module, inputs: Tensor, grad: Tensor) -> list[Tensor]:
        rows, outs = self.rows(module, inputs, grad.unsqueeze(0))
        weight = outs[0].T @ rows
        return [weight] if getattr(module, "bias", None) is None else [weight, outs[0].sum(dim=0)]

    def places(self, module: nn.Module, grads: Tensor) -> int:
        """Every position of the input's leading dimensions."""
        return int(grads[0].numel() // grads.shape[-1])

    def rows(self, module: nn.Module, inputs: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        rows = inputs.float().reshape(-1, inputs.shape[-1])
        return rows, grads.float().reshape(grads.shape[0], -1, grads.shape[-1])


#: the faster way to a convolution's T weight gradients, measured once per key (geometry, shapes, device,
#: dtype) in this process: on one CPU the unfolded GEMM was 1.7-4x faster than the kernel, on another the
#: kernel was up to 4x faster (docs/balancers.md), so it is measured rather than assumed
MEASURED_WAYS: dict[tuple[Any, ...], str] = {}


def measured_way(key: tuple[Any, ...], run: Callable[[str], Tensor]) -> str:
    """The faster of ``"gemm"`` and ``"kernel"`` for ``key``, timing ``run(way)`` (a warm-up call, then the
    best of two) the first time the key is seen."""
    if key not in MEASURED_WAYS:
        seconds = {}
        for way in ("gemm", "kernel"):
            run(way)
            seconds[way] = min(_timed(run, way) for _ in range(2))
        MEASURED_WAYS[key] = min(seconds, key=seconds.__getitem__)
    return MEASURED_WAYS[key]


def _timed(run: Callable[[str], Tensor], way: str) -> float:
    start = time.perf_counter()
    result = run(way)
    if result.is_cuda:
        torch.cuda.synchronize(result.device)
    return time.perf_counter() - start


RULES: dict[type[nn.Module], LayerRule] = {rule.module_type: rule() for rule in (Conv2dRule, LinearRule)}


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule for ``module`` (its exact type: a subclass may compute something else), if it accepts it."""
    rule = RULES.get(type(module))
    return rule if rule is not None and rule.accepts(module) else None


class LayerTaps:
    """Forward hooks that record, for each tapped layer call, its input and its output's autograd edge.

    Tapped are the layers with a :data:`RULES` entry whose parameters are all in ``shared`` and require grad
    and belong to no other module (tied weights are left to autograd). Records are kept only inside
    :meth:`recording` and while gradients are enabled; :meth:`take` hands them over and forgets them.
    """

    def __init__(self, model: nn.Module, shared: Iterable[Tensor]) -> None:
        shared_ids = {id(p) for p in shared if p.requires_grad}
        owners: dict[int, int] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        self.modules: dict[nn.Module, str] = {}
        for name, module in model.named_modules():
            own = list(module.parameters(recurse=False))
            rule = rule_for(module)
            if rule is None or not own or len(own) != len(rule.parameters(module)):
                continue
            if all(id(p) in shared_ids and owners[id(p)] == 1 for p in own):
                self.modules[module] = name or type(module).__name__
        self._calls: list[LayerCall] = []
        self._active = False
        self._handles: list[RemovableHandle] = [m.register_forward_hook(self._record) for m in self.modules]

    def __len__(self) -> int:
        return len(self.modules)

    def _record(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self._active or not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return
        if output.grad_fn is None or len(args) != 1 or not isinstance(args[0], Tensor):
            return
        self._calls.append(
            LayerCall(module, self.modules[module], args[0], get_gradient_edge(output), output.shape, args[0]._version)
        )

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the layer calls of the forward run inside (earlier, untaken records are dropped)."""
        self._calls = []
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def take(self) -> list[LayerCall]:
        calls, self._calls = self._calls, []
        return calls

    def restore(self, calls: list[LayerCall]) -> None:
        """Put taken records back, for the next :meth:`take` (the engine times a path on them first)."""
        self._calls = list(calls)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._calls = []


def group_by_module(calls: Sequence[LayerCall]) -> dict[nn.Module, list[int]]:
    """Indices of ``calls`` per module, in first-call order."""
    groups: dict[nn.Module, list[int]] = {}
    for index, call in enumerate(calls):
        groups.setdefault(call.module, []).append(index)
    return groups
