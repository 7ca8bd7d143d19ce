"""benchmarks/multiply_adds.py: its counts of a step's convolution work agree with torch's own FLOP counter
(``torch.utils.flop_counter``), and its least Gramian work lies between the outputs floor's input gradients
and the T backward passes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from torch.utils.flop_counter import FlopCounterMode

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def script():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import multiply_adds

        yield multiply_adds
    finally:
        sys.path.remove(str(BENCHMARKS))


def torch_counted(script, num_tasks: int, batch: int, size: int) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Multiply-adds of the trunk's forward and of its backward from a scalar, by torch's FLOP counter."""
    trunk, _, _, x = script.build_problem(num_tasks, batch, size, "cpu")
    with FlopCounterMode(display=False) as forward:
        out = trunk(x)
    with FlopCounterMode(display=False) as backward:
        out.sum().backward()
    return forward.get_total_flops() // 2, backward.get_total_flops() // 2


@pytest.mark.parametrize(("num_tasks", "batch", "size"), [(3, 2, 32), (40, 2, 32)])
def test_the_counts_agree_with_torchs_flop_counter(script, num_tasks: int, batch: int, size: int) -> None:  # type: ignore[no-untyped-def]
    forward, backward = torch_counted(script, num_tasks, batch, size)
    counts = script.count(num_tasks, batch, size)
    weights = forward  # a layer's weight gradient costs its forward; torch forms no input gradient for the image
    inputs = backward - weights
    assert counts.equal_weights == forward + backward
    assert counts.floor == forward + num_tasks * backward
    assert counts.outputs_floor == forward + num_tasks * inputs + backward
    assert forward + num_tasks * inputs < counts.least_gramian < counts.floor
