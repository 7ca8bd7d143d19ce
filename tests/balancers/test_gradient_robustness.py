"""Every gradient method on random, rank-deficient, badly scaled (1e-10 … 1e15) and zero gradients:
finite outputs, or a clear SolverError where the method is undefined; and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtlvision.balancers import aggregate, get
from mtlvision.balancers.aggregate import MatrixGradients, gradient_methods
from mtlvision.balancers.gradient import SolverError
from mtlvision.errors import ConfigError, UnknownNameError

# Methods whose defining equation can have no solution (no α > 0 with every (Kα)_i > 0): they may raise
# SolverError, never return garbage.
# Nash-MTL and FairGrad: no solution exists for some Gramians. IMGrad: SLSQP (as its authors solve it) can stop
# at the kink of √(wᵀKw) on a degenerate Gramian (rank 1, scales 1e-10…1e10) and says so; a solver that
# handles the kink is still to be written (found by a random example in the dev profile).
MAY_BE_UNDEFINED = {"nash_mtl", "fairgrad", "imgrad"}


@st.composite
def gradient_matrices(draw: st.DrawFn) -> torch.Tensor:
    t = draw(st.integers(1, 5))
    p = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    G = torch.randn(t, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    kind = draw(st.sampled_from(["random", "rank_deficient", "scaled", "zero_rows", "all_zero"]))
    if kind == "rank_deficient" and t > 1:
        coeffs = torch.randn(t, 1, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
        G = coeffs * G[:1]  # every row a multiple (possibly negative) of one gradient
    elif kind == "scaled":
        exponents = draw(st.lists(st.sampled_from([-10, -5, 0, 5, 10, 15]), min_size=t, max_size=t))
        G = G * torch.tensor([10.0**e for e in exponents], dtype=torch.float64)[:, None]
    elif kind == "zero_rows":
        G[draw(st.integers(0, t - 1))] = 0.0
    elif kind == "all_zero":
        G = torch.zeros_like(G)
    return G


def check_finite(name: str, G: torch.Tensor) -> None:
    if G.shape[0] < get(name).min_tasks():  # Krum, the trimmed mean: defined from 3 tasks on
        with pytest.raises(ConfigError, match=f"needs at least {get(name).min_tasks()} tasks"):
            aggregate(name, G)
        return
    try:
        d = aggregate(name, G)
    except SolverError:
        if name not in MAY_BE_UNDEFINED:
            raise
        return
    assert d.shape == (G.shape[1],)
    assert torch.isfinite(d).all(), f"{name} returned {d} for G = {G}"


@pytest.mark.parametrize("name", gradient_methods())
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(G=gradient_matrices())
def test_finite_or_clear_error(name: str, G: torch.Tensor) -> None:
    check_finite(name, G)


@pytest.mark.slow
@pytest.mark.parametrize("name", gradient_methods())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(G=gradient_matrices())
def test_finite_or_clear_error_thoroughly(name: str, G: torch.Tensor) -> None:
    check_finite(name, G)


@pytest.mark.parametrize("name", gradient_methods())
def test_zero_gradients_give_a_zero_update(name: str) -> None:
    d = aggregate(name, torch.zeros(3, 5))
    assert torch.equal(d, torch.zeros(5))


def test_opposite_gradients_have_no_nash_solution() -> None:
    g = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    with pytest.raises(SolverError, match="bargaining solution does not exist"):
        aggregate("nash_mtl", g)


def test_nash_mtl_can_reuse_previous_weights_with_a_warning() -> None:

    balancer = get("nash_mtl", on_solver_failure="previous", max_norm=0.0)
    losses = torch.ones(2)
    first = balancer.balance(losses, MatrixGradients(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))).weights
    with pytest.warns(RuntimeWarning, match="reusing the previous"):
        again = balancer.balance(losses, MatrixGradients(torch.tensor([[1.0, 2.0], [-1.0, -2.0]]))).weights
    assert torch.equal(first, again)


@pytest.mark.parametrize(
    ("G", "match"),
    [
        (torch.ones(5), "matrix"),
        (torch.ones(2, 3, 4), "matrix"),
        (torch.ones(0, 3), "T ≥ 1"),
        (torch.ones(2, 3, dtype=torch.int64), "floating-point"),
        (torch.tensor([[1.0, float("nan")]]), "NaN"),
    ],
)
def test_bad_matrices_are_rejected(G: torch.Tensor, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        aggregate("upgrad", G)


def test_loss_weighting_and_unknown_names_are_rejected() -> None:
    with pytest.raises(ConfigError, match="loss-weighting method"):
        aggregate("ew", torch.ones(2, 3))
    with pytest.raises(UnknownNameError, match="pcgrad"):
        aggregate("pcgard", torch.ones(2, 3))
    with pytest.raises(ConfigError, match="unexpected keyword"):
        aggregate("cagrad", torch.ones(2, 3), alpha=0.5)
    with pytest.raises(ConfigError, match="normalization"):
        aggregate("mgda", torch.ones(2, 3), normalization="l1")
    with pytest.raises(ConfigError, match="pref_vector has 3 values"):
        aggregate("upgrad", torch.ones(2, 3), pref_vector=[1.0, 1.0, 1.0])


class Float32Gramian(MatrixGradients):
    """The engine's default: K computed in float32, so a rank-deficient G gets round-off eigenvalues."""

    def gramian(self) -> torch.Tensor:
        g = self.jacobian().float()
        return g @ g.T


@pytest.mark.parametrize("name", ["aligned_mtl", "imtl_g", "config", "upgrad", "mgda"])
def test_rank_deficient_float32_gramian_matches_exact(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    g, h = torch.randn(2, 500, generator=gen, dtype=torch.float64)
    G = torch.stack([g, 0.3 * g + 0.7 * h, 2.0 * g, h])  # rank 2
    balancer = get(name)
    exact = balancer.balance(torch.ones(4, dtype=torch.float64), MatrixGradients(G)).weights @ G
    noisy = get(name).balance(torch.ones(4, dtype=torch.float64), Float32Gramian(G)).weights @ G
    assert torch.allclose(noisy, exact, rtol=1e-3, atol=1e-3 * float(exact.norm()))
