"""Each gradient method checked against the property that defines it (issue 3, "Correctness")."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from mtlvision.balancers import aggregate, get
from mtlvision.balancers.aggregate import MatrixGradients, gradient_methods
from mtlvision.balancers.gradient.aligned_mtl import balance_transformation


def rand(t: int, p: int, seed: int, shift: float = 0.0) -> Tensor:
    return torch.randn(t, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def weights(name: str, G: Tensor, **hparams) -> Tensor:
    balancer = get(name, **hparams)
    return balancer.balance(torch.ones(G.shape[0], dtype=G.dtype), MatrixGradients(G)).weights


SEEDS = range(6)


@pytest.mark.parametrize("seed", SEEDS)
def test_mgda_weights_on_simplex_satisfy_min_norm_kkt(seed: int) -> None:
    G = rand(5, 8, seed, shift=0.3)
    K = G @ G.T
    alpha = weights("mgda", G, max_iter=20000, tol=1e-14)
    assert (alpha >= 0).all() and float(alpha.sum()) == pytest.approx(1.0)
    # KKT of min αᵀKα on the simplex: (Kα)_i ≥ αᵀKα for all i, with equality where α_i > 0.
    k_alpha, value = K @ alpha, alpha @ K @ alpha
    scale = float(K.diagonal().max())
    assert (k_alpha >= value - 1e-4 * scale).all()
    assert torch.allclose(k_alpha[alpha > 1e-6], value.expand(int((alpha > 1e-6).sum())), atol=1e-4 * scale)


@pytest.mark.parametrize("seed", SEEDS)
def test_pcgrad_two_tasks_non_conflicting_and_equal_to_upgrad_with_unit_preferences(seed: int) -> None:
    # torchjd's test_equivalence_upgrad_sum_two_rows: PCGrad = UPGrad with pref [1, 1], no normalisation.
    G = rand(2, 7, seed)
    d = aggregate("pcgrad", G)
    assert (G @ d >= -1e-10).all()
    assert_close(d, aggregate("upgrad", G, pref_vector=[1.0, 1.0], norm_eps=0.0, reg_eps=0.0))


@pytest.mark.parametrize("seed", SEEDS)
def test_upgrad_in_dual_cone_and_permutation_invariant(seed: int) -> None:
    G = rand(5, 6, seed)
    d = aggregate("upgrad", G, reg_eps=0.0)
    assert (G @ d >= -1e-9 * float(G.norm()) ** 2).all()
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(seed))
    assert_close(aggregate("upgrad", G[perm]), aggregate("upgrad", G))


@pytest.mark.parametrize("seed", SEEDS)
def test_dualproj_in_dual_cone_and_identity_inside_it(seed: int) -> None:
    G = rand(4, 6, seed)
    d = aggregate("dualproj", G, reg_eps=0.0)
    assert (G @ d >= -1e-9 * float(G.norm()) ** 2).all()
    aligned = rand(3, 5, seed).abs()  # non-negative rows: the mean is already in the dual cone
    assert_close(aggregate("dualproj", aligned, reg_eps=0.0), aligned.mean(0))


@pytest.mark.parametrize("seed", SEEDS)
def test_imtl_g_equal_projections_on_unit_gradients(seed: int) -> None:
    G = rand(4, 9, seed)
    d = aggregate("imtl_g", G)
    projections = (G / G.norm(dim=1, keepdim=True)) @ d
    assert_close(projections, projections[0].expand(4))
    assert float(weights("imtl_g", G).sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_aligned_mtl_rescaled_gramian_is_lambda_min_identity(seed: int) -> None:
    G = rand(4, 10, seed)
    K = (G @ G.T).numpy()
    B = balance_transformation(K)
    lam_min = np.linalg.eigvalsh(K).min()
    np.testing.assert_allclose(B @ K @ B.T, lam_min * np.eye(4), atol=1e-9 * lam_min)
    assert_close(aggregate("aligned_mtl", G), torch.from_numpy(B.T @ np.full(4, 0.25)) @ G)


@pytest.mark.parametrize("seed", SEEDS)
def test_cagrad_solves_its_primal_problem(seed: int) -> None:
    # d maximises min_i g_iᵀd over the ball ‖d − g0‖ ≤ c‖g0‖ (it lies on the sphere when g_w ≠ 0).
    G = rand(3, 4, seed)
    c = 0.4
    g0 = G.mean(0)
    d = aggregate("cagrad", G, c=c)
    radius = c * float(g0.norm())
    assert float((d - g0).norm()) == pytest.approx(radius, rel=1e-5)
    gen = torch.Generator().manual_seed(100 + seed)
    directions = torch.randn(20000, 4, generator=gen, dtype=torch.float64)
    candidates = g0 + radius * directions / directions.norm(dim=1, keepdim=True)
    best_sampled = (candidates @ G.T).min(dim=1).values.max()
    assert float((G @ d).min()) >= float(best_sampled) - 1e-6


@pytest.mark.parametrize("seed", SEEDS)
def test_nash_mtl_bargaining_equation(seed: int) -> None:
    G = rand(4, 12, seed, shift=0.5)
    K = G @ G.T
    alpha = weights("nash_mtl", G, max_norm=0.0)
    assert (alpha > 0).all()
    assert_close(alpha * (K @ alpha), torch.ones(4, dtype=torch.float64), rtol=1e-6, atol=0)
    clipped = aggregate("nash_mtl", G, max_norm=0.1)
    assert float(clipped.norm()) == pytest.approx(0.1, rel=1e-6)


def test_nash_mtl_forty_tasks() -> None:
    G = rand(40, 300, 0, shift=0.1)
    alpha = weights("nash_mtl", G, max_norm=0.0)
    assert_close(alpha * ((G @ G.T) @ alpha), torch.ones(40, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_config_equal_cosines_and_summed_projection_length(seed: int) -> None:
    G = rand(3, 8, seed)
    d = aggregate("config", G)
    cosines = (G / G.norm(dim=1, keepdim=True)) @ (d / d.norm())
    assert_close(cosines, cosines[0].expand(3))
    assert (cosines > 0).all()
    assert float(d.norm()) == pytest.approx(float((G @ (d / d.norm())).sum()))


def test_stochastic_mgda_variants_keep_weights_on_the_simplex() -> None:
    G = rand(4, 6, 0)
    for name in ("modo", "moco"):
        w = weights(name, G)
        assert (w >= 0).all() and float(w.sum()) == pytest.approx(1.0)
    w = weights("sdmgrad", G)  # (w + λ/T)/(1 + λ) with w in the simplex
    assert (w >= 0.3 / 4 / 1.3 - 1e-12).all() and float(w.sum()) == pytest.approx(1.0)


def test_graddrop_keeps_one_sign_per_coordinate() -> None:
    G = rand(4, 200, 0, shift=0.2)
    d = aggregate("graddrop", G)
    positive, negative = G.clamp_min(0).sum(0), G.clamp_max(0).sum(0)
    assert torch.all(torch.isclose(d, positive) | torch.isclose(d, negative))
    assert not torch.allclose(d, positive) and not torch.allclose(d, negative)


def test_imtl_hybrid_scales_direction_and_scale_loss() -> None:
    G = rand(3, 5, 1)
    balancer = get("imtl", num_tasks=3)
    with torch.no_grad():
        balancer.log_scales.copy_(torch.tensor([0.0, 0.5, -1.0]))
    losses = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    update = balancer.balance(losses, MatrixGradients(G))
    scales = torch.exp(torch.tensor([0.0, 0.5, -1.0], dtype=torch.float64))
    assert_close(update.weights, scales)
    assert update.direction is None and update.shared_weights is not None
    assert_close(update.shared_weights.to(G.dtype) @ G, aggregate("imtl_g", scales[:, None] * G))
    assert_close(aggregate("imtl", G, losses=losses), aggregate("imtl_g", G))  # fresh scales are ones
    update.extra_loss.backward()
    assert_close(balancer.log_scales.grad.double(), scales * losses - 1.0)


@pytest.mark.parametrize("name", [n for n in gradient_methods() if get(n).min_tasks() == 1])
def test_single_task_is_gradient_descent_up_to_positive_scale(name: str) -> None:
    g = rand(1, 7, 42)
    d = aggregate(name, g)
    scale = float(d @ g[0]) / float(g[0] @ g[0])
    assert scale > 0
    assert_close(d, scale * g[0])


# Nash-MTL's state matters when weights are reused between updates (its warm start only speeds it up).
STATEFUL = {"gradvac": {}, "nash_mtl": {"update_weights_every": 4}, "modo": {}, "sdmgrad": {}, "moco": {}}


@pytest.mark.parametrize("name", STATEFUL)
def test_state_survives_a_weights_only_checkpoint(name: str) -> None:
    steps = [rand(3, 6, s) for s in range(4)]
    losses = torch.ones(3, dtype=torch.float64)
    original = get(name, **STATEFUL[name])
    for G in steps[:2]:
        original.balance(losses, MatrixGradients(G))
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = get(name, **STATEFUL[name])
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for G in steps[2:]:
        torch.manual_seed(7)
        a = original.balance(losses, MatrixGradients(G))
        torch.manual_seed(7)
        b = restored.balance(losses, MatrixGradients(G))
        assert_close(a.weights, b.weights)
        if a.direction is not None:
            assert_close(a.direction, b.direction)
    fresh = get(name, **STATEFUL[name])
    torch.manual_seed(7)
    assert not torch.allclose(fresh.balance(losses, MatrixGradients(steps[3])).weights, a.weights)
