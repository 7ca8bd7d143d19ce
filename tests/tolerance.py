"""Tolerances derived from the arithmetic, so that a comparison cannot fail by chance.

A sum of ``terms`` products computed in a floating-point type of unit round-off ``eps`` (inputs rounded to
that type first) differs from the exact sum by at most about ``(terms + 4) · eps · Σ|products|`` (Higham,
Accuracy and Stability of Numerical Algorithms, §3.1: ``γ_n = n·u / (1 − n·u)``, plus the input roundings).
``magnitude`` is that sum of absolute values; it is computed by running the same operation on the absolute
values of its inputs (for a bilinear map such as a matrix product or a convolution's weight gradient,
``|a|·|b|``), or bounded by the largest value times the number of terms where that is easier.
"""

from __future__ import annotations

import torch
from torch import Tensor


def roundoff_bound(magnitude: Tensor | float, terms: int, dtype: torch.dtype) -> Tensor:
    """The largest error a ``terms``-term sum of products in ``dtype`` can have, entry by entry."""
    eps = torch.finfo(dtype).eps
    return (terms + 4) * eps * torch.as_tensor(magnitude, dtype=torch.float64).abs()


def assert_within_roundoff(
    got: Tensor, want: Tensor, magnitude: Tensor | float, terms: int, dtype: torch.dtype
) -> None:
    """``|got − want| ≤ roundoff_bound(magnitude, terms, dtype)`` everywhere, with a message on the worst entry."""
    error = (got.double() - want.double()).abs()
    bound = roundoff_bound(magnitude, terms, dtype).expand_as(error) + torch.finfo(torch.float64).tiny
    ratio = error / bound
    worst = int(ratio.argmax())
    assert bool((error <= bound).all()), (
        f"error {error.flatten()[worst].item():.3g} exceeds the {dtype} round-off bound "
        f"{bound.flatten()[worst].item():.3g} of a {terms}-term sum at entry {worst} "
        f"(got {got.flatten()[worst].item()!r}, want {want.flatten()[worst].item()!r})"
    )
