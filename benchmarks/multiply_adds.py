"""Multiply-adds of one training step's convolutions and linear layers, per way of computing it (issue 24).

The problem of ``benchmarks/balancers.py`` (resnet18 trunk, batch 16 of 64×64, T = 3 or 40 tasks). Counted
are the trunk's convolutions and linear layers, each ``M·O·D`` multiply-adds per pass (``M`` places: batch ×
output positions; ``O`` outputs; ``D`` inputs per place), with standard (direct or im2col) convolution
arithmetic; normalisation, activations and pooling are left out (their backward is the same in every way
below). Per step:

- equal weights: the forward, every layer's input gradient (but the first's, whose input is the image) and
  its weight gradient, once;
- T backward passes (the floor): the forward, then T input and weight gradients;
- the outputs floor: the forward, T input gradients (one vmapped backward into the layer outputs), then the
  equal-weights backward;
- the least an exact Gramian method does on the layer path: the forward, T input gradients, each layer's
  Gramian term the cheaper way (its T weight gradients and their products, or ``⟨B_s, (A Aᵀ) B_t⟩``, see
  :mod:`mtlvision.balancers.layers`; the same cost model the layer path decides by), and the weighted update
  (one weight gradient per layer whose term came from activations).

Any method that needs the T per-task gradients of every layer's output pays the T input gradients of the
outputs floor; what it adds beyond them is the Gramian's least work, so where that exceeds the
equal-weights backward the outputs floor cannot be reached with this arithmetic, however fast the rest.

    python benchmarks/multiply_adds.py                # T = 3 and 40, batch 16 of 64x64
    python benchmarks/multiply_adds.py --tasks 40 --batch 8 --size 32
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from balancers import build_problem  # the sibling benchmark script
from mtlvision.balancers.layers import rule_for


@dataclass(frozen=True)
class StepCounts:
    """Multiply-adds (in units of one) of the ways to one step."""

    equal_weights: int
    floor: int
    outputs_floor: int
    least_gramian: int


def layer_calls(num_tasks: int, batch: int, size: int) -> list[tuple[nn.Module, torch.Size, bool]]:
    """Each convolution or linear call of the trunk's forward: the module, its output shape, and whether its
    input needs a gradient (not for the first layer, which reads the image)."""
    trunk, _, _, x = build_problem(num_tasks, batch, size, "cpu")
    calls: list[tuple[nn.Module, torch.Size, bool]] = []

    def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        calls.append((module, output.shape, args[0].requires_grad))

    for module in trunk.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(record)
    trunk(x)
    return calls


def count(num_tasks: int, batch: int, size: int) -> StepCounts:
    forward = inputs = gramian = update = 0
    for module, shape, input_grad in layer_calls(num_tasks, batch, size):
        rule = rule_for(module)
        assert rule is not None
        grads = torch.empty((num_tasks, *shape), device="meta")
        weight = rule.parameters(module)[0]
        one_pass = rule.places(module, grads) * weight.shape[0] * weight[0].numel()
        forward += one_pass
        inputs += one_pass if input_grad else 0
        direct, by_activations = rule.gramian_costs(module, grads)
        activations = rule.prefers_activations(module, grads)
        gramian += by_activations if activations else direct
        update += one_pass if activations else num_tasks * weight.numel()
    weights = forward  # one weight gradient per layer: as many multiply-adds as its forward
    return StepCounts(
        equal_weights=forward + inputs + weights,
        floor=forward + num_tasks * (inputs + weights),
        outputs_floor=forward + num_tasks * inputs + inputs + weights,
        least_gramian=forward + num_tasks * inputs + gramian + update,
    )


def summary(num_tasks: int, batch: int, size: int) -> str:
    """One line: each way's multiply-adds, and the ratios the timing tables compare."""
    c = count(num_tasks, batch, size)
    return (
        f"multiply-adds of the trunk's convolutions per step (benchmarks/multiply_adds.py): equal weights "
        f"{c.equal_weights / 1e9:.1f} G; T backward passes {c.floor / c.equal_weights:.2f}×; outputs floor "
        f"{c.outputs_floor / c.equal_weights:.2f}×; the least an exact Gramian method does on the layer path "
        f"{c.least_gramian / c.equal_weights:.2f}× ({c.least_gramian / c.outputs_floor:.2f}× the outputs floor, "
        f"{c.least_gramian / c.floor:.2f}× the T backward passes)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[3, 40], choices=[3, 40])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    for num_tasks in args.tasks:
        print(f"T = {num_tasks}: {summary(num_tasks, args.batch, args.size)}")


if __name__ == "__main__":
    main()
