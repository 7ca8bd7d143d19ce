"""The newest balancers (issue 23): GO4Align, NTKMTL, IMGrad, LDC-MTL. Defining properties against
independent computations, and values pinned from the authors' code (numbers only: the code was run
outside this repository on the matrices below, in float32 where it computes in float32)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from mtlvision.balancers import aggregate, get
from mtlvision.balancers.aggregate import MatrixGradients
from mtlvision.balancers.gradient.imgrad import imbalance_cosine
from mtlvision.balancers.weighting import WeightingError
from mtlvision.balancers.weighting.go4align import kmeans_1d
from mtlvision.errors import ConfigError

J = torch.tensor([[-4.0, 1.0, 1.0, 0.5], [6.0, 1.0, 1.0, -1.0], [0.5, -2.0, 3.0, 1.0]], dtype=torch.float64)
J2 = torch.tensor([[1.0, 0.2, 0.0, 0.3], [0.1, 2.0, 0.5, 0.0], [0.3, 0.1, 0.05, 0.2]], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- GO4Align
def brute_force_sse(values: np.ndarray, groups: int) -> float:
    """The smallest within-cluster sum of squares over every assignment of the values to ``groups`` labels."""
    best = np.inf
    for labels in itertools.product(range(groups), repeat=len(values)):
        labels_array = np.array(labels)
        sse = sum(((values[labels_array == g] - values[labels_array == g].mean()) ** 2).sum() for g in set(labels))
        best = min(best, float(sse))
    return best


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=5),
    groups=st.integers(1, 4),
)
def test_kmeans_1d_is_the_global_optimum(values: list[float], groups: int) -> None:
    x = np.array(values)
    groups = min(groups, len(x))
    centres = kmeans_1d(x, groups)
    assert len(set(np.round(centres, 12))) <= groups
    for centre in set(centres.tolist()):  # each value is replaced by the mean of the values sharing its centre
        members = x[centres == centre]
        assert centre == pytest.approx(members.mean(), abs=1e-12)
    assert float(((x - centres) ** 2).sum()) == pytest.approx(brute_force_sse(x, groups), abs=1e-9)


def test_go4align_follows_the_risk_indicator_and_groups() -> None:
    eta = 0.5
    balancer = get("go4align", num_groups=2, robust_step_size=eta)
    risk = np.full(3, 1 / 3)
    for losses in ([1.0, 2.0, 0.5], [0.9, 1.5, 0.6], [3.0, 0.2, 0.4]):
        got = balancer.balance(torch.tensor(losses, dtype=torch.float64), None).weights.numpy()
        x = np.array(losses)
        risk = risk * np.exp(-eta * x)
        risk = risk / risk.sum()
        gamma = x.sum() / x * risk
        # with T = 3 and two groups: the pair of closest sorted neighbours shares its mean
        order = np.argsort(gamma)
        s = gamma[order]
        expected_sorted = (
            np.array([(s[0] + s[1]) / 2, (s[0] + s[1]) / 2, s[2]])
            if s[1] - s[0] < s[2] - s[1]
            else np.array([s[0], (s[1] + s[2]) / 2, (s[1] + s[2]) / 2])
        )
        expected = np.empty(3)
        expected[order] = expected_sorted
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_go4align_with_one_group_is_the_mean_and_with_t_groups_each_its_own() -> None:
    losses = torch.tensor([1.0, 2.0, 0.5, 4.0], dtype=torch.float64)
    one, own = get("go4align", num_groups=1), get("go4align", num_groups=4)
    w1, w4 = one.balance(losses, None).weights, own.balance(losses, None).weights
    assert_close(w1, torch.full((4,), float(w4.mean()), dtype=torch.float64))
    # one step from the uniform indicator: γ_t ∝ (Σ L / L_t) · exp(−η L_t)
    gamma = losses.sum() / losses * torch.exp(-1e-4 * losses)
    assert_close(w4, gamma / torch.exp(-1e-4 * losses).sum())


def test_go4align_refuses_a_zero_loss_and_bad_settings() -> None:
    with pytest.raises(WeightingError, match="GO4Align"):
        get("go4align").balance(torch.tensor([1.0, 0.0]), None)
    with pytest.raises(ConfigError, match="num_groups"):
        get("go4align", num_groups=0)


# ------------------------------------------------------------------------------------------------ NTKMTL
# NTKMTL's ntkgrad: w = (tr K / diag K)^0.5, shared gradient T·Gᵀw clipped to norm 1 (torch's clip_grad_norm_)
NTK_REFERENCE = {
    "J": (
        [1.9793454016866492, 1.35400640077266, 2.2399874686366266],
        [0.12785726, -0.11050694, 0.96889814, 0.18076799],
    ),
    "J2": (
        [2.2126946692020217, 1.139609108505102, 6.230935836895512],
        [0.72800956, 0.58034325, 0.15291753, 0.33139088],
    ),
}


@pytest.mark.parametrize("name", ["J", "J2"])
def test_ntkmtl_matches_the_authors_code(name: str) -> None:
    matrix = {"J": J, "J2": J2}[name]
    weights, direction = NTK_REFERENCE[name]
    assert_close(aggregate("ntkmtl", matrix), torch.tensor(direction, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    unclipped = get("ntkmtl", max_norm=0.0).balance(torch.ones(3, dtype=torch.float64), MatrixGradients(matrix))
    assert_close(unclipped.shared_weights, 3 * torch.tensor(weights, dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.equal(unclipped.weights, torch.ones(3, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(2, 5), p=st.floats(0.0, 2.0))
def test_ntkmtl_equalises_the_weighted_kernels_at_exponent_one_half(seed: int, t: int, p: float) -> None:
    g = torch.randn(t, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = g * torch.logspace(-3, 3, t, dtype=torch.float64)[:, None]  # tasks of very different scales
    shared = (
        get("ntkmtl", ntk_exp=p, max_norm=0.0)
        .balance(torch.ones(t, dtype=torch.float64), MatrixGradients(g))
        .shared_weights
    )
    kernels = (g * g).sum(dim=1)
    assert_close(shared, t * (kernels.sum() / kernels) ** p)
    if p == 0.5:  # w_t² λ_t = tr K for every task: the weighted kernels are equal
        assert_close(shared**2 * kernels, torch.full((t,), t**2 * float(kernels.sum()), dtype=torch.float64))


def test_ntkmtl_clips_the_shared_update_and_skips_zero_tasks() -> None:
    g = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    d = aggregate("ntkmtl", g, max_norm=0.5)
    assert float(d.norm()) == pytest.approx(0.5)
    shared = get("ntkmtl").balance(torch.ones(3, dtype=torch.float64), MatrixGradients(g)).shared_weights
    assert shared[1] == 0 and (shared[[0, 2]] > 0).all()


# ------------------------------------------------------------------------------------------------ IMGrad
# IMGrad's imgrad(grads, alpha=0.8, rescale=1) × T (its overwrite_grad), float32, scipy's SLSQP defaults
IMGRAD_REFERENCE = {
    "J": [0.02036440, 1.61699760, 4.66577816, 0.36878219],
    "J2": [1.93653011, 1.76339614, 0.51584446, 1.02679229],
}


@pytest.mark.parametrize("name", ["J", "J2"])
def test_imgrad_matches_the_authors_code(name: str) -> None:
    matrix = {"J": J, "J2": J2}[name]
    expected = torch.tensor(IMGRAD_REFERENCE[name], dtype=torch.float64)
    assert_close(aggregate("imgrad", matrix), expected, rtol=0, atol=2e-4)  # the code's SLSQP stops at 1e-6


def test_imgrad_cosine_is_one_when_the_mean_is_the_min_norm_point() -> None:
    orthonormal = np.eye(3)  # the mean of orthonormal gradients is their min-norm convex combination
    assert imbalance_cosine(orthonormal) == pytest.approx(1.0)
    skewed = np.array([[1.0, 0.0], [0.0, 100.0]])
    assert 0.0 < imbalance_cosine(skewed) < 0.2


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(2, 5))
def test_imgrad_solves_its_dual_problem(seed: int, t: int) -> None:
    """The weights minimise (1.5 − κ) g_wᵀg0 + κ c‖g_w‖ over the simplex: no random simplex point does better."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(t, 6, generator=gen, dtype=torch.float64)
    k = (g @ g.T).numpy() / float(np.trace((g @ g.T).numpy()) / t)
    shared = get("imgrad").weights_from_gramian((g @ g.T).numpy(), np.ones(t)) * (1 + 0.8**2) / t
    mean = np.full(t, 1 / t)
    c = 0.8 * np.sqrt(mean @ k @ mean)
    kappa = imbalance_cosine(k)
    w = shared - mean
    if np.linalg.norm(w) == 0:
        return
    w = w / w.sum()  # the λ·w part, back on the simplex

    def objective(v: np.ndarray) -> float:
        return float((1.5 - kappa) * (v @ k @ mean) + kappa * c * np.sqrt(max(v @ k @ v, 0.0)))

    rng = np.random.default_rng(seed)
    for v in rng.dirichlet(np.ones(t), size=200):
        assert objective(w) <= objective(v) + 1e-7


def test_imgrad_heads_get_the_plain_sum() -> None:
    update = get("imgrad").balance(torch.ones(3, dtype=torch.float64), MatrixGradients(J))
    assert torch.equal(update.weights, torch.ones(3, dtype=torch.float64)) and update.shared_weights is not None


# ----------------------------------------------------------------------------------------------- LDC-MTL
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 5), lamb=st.floats(0.0, 1.0))
def test_ldc_mtl_weights_are_the_objectives_gradient_in_the_losses(seed: int, t: int, lamb: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    balancer = get("ldc_mtl", lamb=lamb, num_tasks=t)
    with torch.no_grad():
        balancer.task_param.copy_(torch.randn(t, generator=gen))
    first = torch.rand(t, generator=gen, dtype=torch.float64) + 0.1
    balancer.balance(first, None)  # fixes the normalisation
    losses = (torch.rand(t, generator=gen, dtype=torch.float64) + 0.1).requires_grad_(True)
    update = balancer.balance(losses, None)
    # independent: autograd through the code's total loss, weights held fixed for the model's part
    weights = torch.softmax(balancer.task_param.detach().double(), dim=0)
    scaled = losses / (first / first.min())
    wl = weights * scaled
    total = (weights @ scaled) / weights.sum() + lamb * (wl[:-1] - wl[1:]).abs().sum()
    (expected,) = torch.autograd.grad(total, losses)
    assert_close(update.weights, expected)
    # the router's loss is the same objective with the losses fixed; its gradient reaches the logits only
    assert_close(update.extra_loss.double(), total.detach(), rtol=1e-6, atol=1e-7)
    update.extra_loss.backward()
    assert balancer.task_param.grad is not None and losses.grad is None


def test_ldc_mtl_router_levels_the_weighted_losses() -> None:
    """Driven on fixed losses, the router shifts weight so that the weighted normalised losses draw closer."""
    balancer = get("ldc_mtl", lamb=1.0, num_tasks=3)
    optimiser = torch.optim.SGD(balancer.parameters(), lr=0.5)
    balancer.balance(torch.ones(3), None)  # normalisation by ones
    losses = torch.tensor([0.2, 1.0, 3.0])
    gaps = []
    for _ in range(60):
        optimiser.zero_grad()
        update = balancer.balance(losses, None)
        update.extra_loss.backward()
        optimiser.step()
        wl = balancer.router_weights(balancer.task_param.detach()) * losses
        gaps.append(float((wl[:-1] - wl[1:]).abs().sum()))
    assert gaps[-1] < 0.5 * gaps[0]
    weights = balancer.router_weights(balancer.task_param.detach())
    assert weights[0] > weights[1] > weights[2]  # the smallest loss gets the largest weight


def test_ldc_mtl_clamps_and_refuses_bounds_that_freeze_the_router() -> None:
    balancer = get("ldc_mtl", min_weight=0.2, max_weight=0.8, num_tasks=3)
    assert_close(balancer.router_weights(torch.tensor([10.0, 0.0, -10.0])), torch.tensor([0.8, 0.2, 0.2]))
    with pytest.raises(ConfigError, match="router would learn nothing"):
        get("ldc_mtl", min_weight=0.2, num_tasks=6)
    with pytest.raises(ConfigError, match="min_weight < max_weight"):
        get("ldc_mtl", min_weight=0.5, max_weight=0.4)
    with pytest.raises(WeightingError, match="LDCMTL"):
        get("ldc_mtl", num_tasks=2).balance(torch.tensor([1.0, 0.0]), None)  # the first losses divide
    unnormalised = get("ldc_mtl", normalise=False, lamb=0.0, num_tasks=2).balance(torch.tensor([1.0, 0.0]), None)
    assert_close(unnormalised.weights, torch.tensor([0.5, 0.5]))  # softmax(0) / Σ = 1/T, no ratios
