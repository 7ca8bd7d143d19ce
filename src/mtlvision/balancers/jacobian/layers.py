"""``jacobian="layers"``: the vmapped backward stops at the outputs of the tapped layers.

:class:`~mtlvision.balancers.layers.LayerTaps` records, in the forward, each shared ``Conv2d`` and ``Linear``
call's input and output. Before the backward, a layer whose Gramian term is not cheaper from activations and
whose T weight gradients autograd forms as fast as the rule would (the convolution's own kernel) is handed
back to autograd: its parameters become targets of the backward like the other untapped ones (norms), so its
input and output gradients are freed where autograd meets it. The one vmapped backward (from the T losses,
or from the trunk with the per-task representation gradients) goes into the remaining layers' outputs and
those parameters, and frees the graph. Then, per remaining layer:

- its Gramian term comes from its input and per-task output gradients (``⟨B_s, (A Aᵀ) B_t⟩``) where that is
  cheaper and exact, else from its per-task weight gradients, formed as one GEMM; those are kept (and the
  layer's activations and output gradients dropped) where they hold no more numbers than the output
  gradients, else dropped;
- the Jacobian's blocks are formed one layer at a time when a balancer reads them;
- the update is ``Σ_t w_t`` of a layer's kept weight gradients, else one weight gradient of ``Σ_t w_t B_t``
  (see :mod:`mtlvision.balancers.layers`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from mtlvision.balancers.jacobian.base import ParameterGradients, Step
from mtlvision.balancers.layers import LayerCall, LayerRule, LayerTaps, group_by_module, rule_for
from mtlvision.errors import ConfigError


def _rule(module: nn.Module) -> LayerRule:
    rule = rule_for(module)
    assert rule is not None, f"{type(module).__name__} was tapped without a layer rule"
    return rule


class LayerGradients(ParameterGradients):
    """The Jacobian's blocks, Gramian and weighted update layer by layer, from the tapped layer calls."""

    uses_taps: ClassVar[bool] = True
    #: into the layer outputs no weight gradient is formed, and functorch folds the T tasks into the batch of
    #: every convolution's input gradient (torch's ``is_grads_batched`` runs it once per task): faster at
    #: large T, slower at small T on one CPU, so the faster is measured once per model, T, device and dtype
    vmap_way: ClassVar[str] = "measure"

    @classmethod
    def for_step(cls, step: Step, taps: LayerTaps | None) -> LayerGradients:
        assert taps is not None
        calls = taps.take()
        if not calls:
            raise ConfigError(
                "GradientEngine(jacobian='layers') found no layer call recorded in this step's forward: run the "
                "forward inside taps.recording(), with gradients enabled"
            )
        return cls(step, calls)

    def __init__(self, step: Step, calls: Sequence[LayerCall]) -> None:
        super().__init__(step)
        self._calls: list[LayerCall] | None = list(calls)
        self._groups = group_by_module(self._calls)
        tapped = {id(p) for m in self._groups for p in _rule(m).parameters(m)}
        self._untapped = [p for p in self._shared if id(p) not in tapped]
        self._output_grads: list[Tensor] | None = None  # per call: [T, *output shape]
        # per module whose T weight gradients the Gramian formed and which are no larger than its output
        # gradients: those gradients, kept instead of the calls' activations (the blocks and the update read them)
        self._held: dict[nn.Module, list[Tensor]] = {}
        self._untapped_grads: list[Tensor] | None = None  # per untapped shared parameter: [T, *shape]
        #: the modules whose Gramian term comes from activations (decided before the backward)
        self._by_activations: set[nn.Module] = set()

    @property
    def jacobian_known(self) -> bool:
        return super().jacobian_known or self._output_grads is not None

    def _forget_layers(self) -> None:
        self._calls = self._output_grads = self._untapped_grads = None
        self._groups, self._held = {}, {}

    def _hand_to_autograd(self) -> None:
        """Leave to the vmapped backward itself every tapped layer whose Gramian term is not cheaper from its
        activations and whose rule forms the T weight gradients no faster than autograd's own kernel
        (:meth:`~mtlvision.balancers.layers.LayerRule.weights_in_backward`): autograd then forms them where
        it meets the layer and frees the layer's input and output gradients at once, where the path would
        hold both until the update (resnet18's stem, layer1 and layer2 at batch 16 of 64x64: 32 MiB of
        output gradients at T = 3, 420 MiB at T = 40)."""
        assert self._calls is not None
        kept: list[LayerCall] = []
        for module, indices in self._groups.items():
            rule, first = _rule(module), self._calls[indices[0]]
            shape = torch.empty((self.num_tasks, *first.output_shape), device="meta")
            if self._reduce_is_identity and len(indices) == 1 and rule.prefers_activations(module, shape):
                self._by_activations.add(module)
            if module in self._by_activations or not rule.weights_in_backward(module, first.checked_input(), shape):
                kept.extend(self._calls[i] for i in indices)
            else:
                self._untapped.extend(rule.parameters(module))
        self._calls = kept
        self._groups = group_by_module(kept)

    def _backward(self) -> None:
        """One vmapped backward into the tapped layers' outputs and the other shared parameters (and, without
        a representation, the task-specific ones). The graph is freed (unless ``keep_graph``: the path is
        being timed): everything the step needs from the trunk is in what it returns."""
        if self._output_grads is not None:
            return
        self._hand_to_autograd()
        assert self._calls is not None
        edges: list[Tensor | GradientEdge] = [call.output for call in self._calls]
        reduced = any(call.input.dtype in (torch.float16, torch.bfloat16) for call in self._calls)
        key = (self.num_tasks, *((tuple(c.input.shape), tuple(c.output_shape), c.input.dtype) for c in self._calls))
        grads = self._batched_backward(
            [*edges, *self._untapped], retain_graph=self.keep_graph, reduced=reduced, key=key
        )
        like, num_tasks = self._losses, self.num_tasks
        self._output_grads = [
            g if g is not None else torch.zeros((num_tasks, *call.output_shape), dtype=like.dtype, device=like.device)
            for g, call in zip(grads[: len(edges)], self._calls)
        ]
        self._untapped_grads = self._zeros_where_none(grads[len(edges) :], self._untapped)

    def _compute_heads(self) -> None:
        if self._representation is not None:
            self._heads()
        else:
            self._backward()

    def _task_gradients(self, module: nn.Module) -> list[Tensor]:
        """``[T, *shape]`` per parameter of ``module``, summed over its calls, reduced."""
        if module in self._held:
            return self._held[module]
        assert self._calls is not None and self._output_grads is not None
        rule, total = _rule(module), None
        for index in self._groups[module]:
            grads = rule.task_gradients(module, self._calls[index].checked_input(), self._output_grads[index])
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
        assert total is not None
        return [self._reduce(g) for g in total]

    def _compute_blocks(self) -> list[Tensor]:
        """Every block at once; from here on they answer every request."""
        blocks = [
            block.view(self.num_tasks, *param.shape)
            for (_, block), param in zip(self._fresh_blocks(release=False), self._shared)
        ]
        self._forget_layers()
        return blocks

    def _fresh_blocks(self, release: bool) -> Iterator[tuple[slice, Tensor]]:
        """The Jacobian's per-parameter blocks in order, each formed when reached (a tapped layer's from its
        activations) and dropped once the caller moves on: no ``[T, P]`` array is ever held. The layer data
        stay for the weighted update, unless ``release``."""
        self._backward()
        assert self._calls is not None and self._output_grads is not None and self._untapped_grads is not None
        if release:
            self._released = True
        untapped = dict(zip(map(id, self._untapped), self._untapped_grads))
        owner = {id(p): m for m in self._groups for p in _rule(m).parameters(m)}
        pending: dict[int, Tensor] = {}
        start = 0
        for param in self._shared:
            key = id(param)
            if key in untapped:
                block = self._reduce(untapped[key].float())
            else:
                if key not in pending:
                    module = owner[key]
                    pending.update(zip(map(id, _rule(module).parameters(module)), self._task_gradients(module)))
                block = pending.pop(key)
            block = block.reshape(self.num_tasks, -1)
            yield slice(start, start + block.shape[1]), block
            start += block.shape[1]
            del block
        if release:
            self._forget_layers()

    def _fresh_gramian(self) -> Tensor:
        """``K`` layer by layer: a tapped layer's term from its activations where that is cheaper (and exact:
        one call, no cross-process reduction), else from its per-task weight gradients, formed and dropped."""
        self._backward()
        assert self._calls is not None and self._output_grads is not None and self._untapped_grads is not None
        num_tasks, dtype = self.num_tasks, self._gramian_dtype
        gram = torch.zeros(num_tasks, num_tasks, dtype=dtype, device=self._losses.device)

        def add(blocks: Sequence[Tensor]) -> None:
            nonlocal gram
            for block in blocks:
                flat = block.reshape(num_tasks, -1).to(dtype)
                gram = gram + flat @ flat.T

        add([self._reduce(g.float()) for g in self._untapped_grads])
        for module, indices in self._groups.items():
            rule = _rule(module)
            call, grads = self._calls[indices[0]], self._output_grads[indices[0]]
            if module in self._by_activations:
                gram = gram + rule.gramian_by_activations(module, call.checked_input(), grads, dtype)
            else:
                weight_grads = self._task_gradients(module)
                add(weight_grads)
                self._hold(module, weight_grads)
        return gram

    def _hold(self, module: nn.Module, grads: list[Tensor]) -> None:
        """Keep ``module``'s T weight gradients, formed for the Gramian, for the blocks and the update, and
        drop its calls' output gradients and inputs instead, where that holds no more numbers: the update then
        costs a ``[T]``-weighted sum of them, not another weight gradient over every place of the layer."""
        assert self._calls is not None and self._output_grads is not None
        indices = self._groups[module]
        if sum(g.numel() for g in grads) > sum(self._output_grads[i].numel() for i in indices):
            return
        self._held[module] = grads
        for index in indices:
            self._output_grads[index] = self._output_grads[index].new_empty(0)
            self._calls[index] = self._calls[index].released()

    def _fresh_weighted(self, weights: Tensor) -> Iterator[Tensor]:
        """``Σ_t w_t ∂L_t/∂θ`` per shared parameter: a tapped layer's from ``Σ_t w_t B_t`` (one weight gradient
        per call); the per-call output gradients are released as they are used."""
        self._backward()
        assert self._calls is not None and self._output_grads is not None and self._untapped_grads is not None
        calls, outputs = self._calls, self._output_grads
        by_param = {
            id(p): self._reduce(torch.tensordot(weights.to(g.device, g.dtype), g, dims=1))
            for p, g in zip(self._untapped, self._untapped_grads)
        }
        self._untapped_grads = None
        for module, indices in self._groups.items():
            rule, total = _rule(module), None
            if module in self._held:  # reduced already
                held = self._held.pop(module)
                by_param.update(
                    (id(p), torch.tensordot(weights.to(g.device, g.dtype), g, dims=1))
                    for p, g in zip(rule.parameters(module), held)
                )
                continue
            for index in indices:
                grad = outputs[index]
                combined = torch.tensordot(weights.to(grad.device, grad.dtype), grad, dims=1)
                outputs[index] = grad.new_empty(0)
                del grad
                result = rule.weighted_gradients(module, calls[index].checked_input(), combined)
                calls[index] = calls[index].released()  # its input activation is needed no more
                total = result if total is None else [a + b for a, b in zip(total, result)]
            assert total is not None
            by_param.update(zip(map(id, rule.parameters(module)), (self._reduce(g) for g in total)))
        self._output_grads = None
        for param in self._shared:
            yield by_param.pop(id(param))
