"""Pinned values on small matrices, from torchjd's published tests (tests/unit/aggregation/test_values.py)
and cross-checks between independent formulations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from mtlvision.balancers import aggregate

J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])

# torchjd's pinned outputs for J (same defaults: UPGrad/DualProj norm_eps = reg_eps = 1e-4, CAGrad c=0.5,
# NashMTL max_norm=1).
TORCHJD = [
    ("aligned_mtl", {}, [0.2133, 0.9673, 0.9673]),
    ("config", {}, [0.1588, 2.0706, 2.0706]),
    ("dualproj", {}, [0.5563, 1.1109, 1.1109]),
    ("imtl_g", {}, [0.0767, 1.0000, 1.0000]),
    ("mgda", {}, [0.0, 1.0, 1.0]),
    ("pcgrad", {}, [0.5848, 3.8012, 3.8012]),
    ("upgrad", {}, [0.2929, 1.9004, 1.9004]),
    ("cagrad", {"c": 0.5}, [0.1835, 1.2041, 1.2041]),
    ("nash_mtl", {}, [0.0542, 0.7061, 0.7061]),
]


@pytest.mark.parametrize(("name", "hparams", "expected"), TORCHJD, ids=[t[0] for t in TORCHJD])
def test_torchjd_pinned_values(name: str, hparams: dict, expected: list[float]) -> None:
    assert_close(aggregate(name, J, **hparams), torch.tensor(expected), rtol=0, atol=1e-4)


def test_mgda_two_tasks_closed_form() -> None:
    # min ‖a g1 + (1-a) g2‖: a = g2·(g2-g1)/‖g1-g2‖² = (38+22)/100 = 0.6 -> d = 0.6 g1 + 0.4 g2 = [0, 1, 1]
    d = aggregate("mgda", J, normalization="none")
    assert_close(d, 0.6 * J[0] + 0.4 * J[1])


def test_mgda_l2_normalisation_is_min_norm_of_unit_gradients() -> None:
    units = J / J.norm(dim=1, keepdim=True)
    assert_close(aggregate("mgda", J, normalization="l2"), aggregate("mgda", units), atol=1e-6, rtol=1e-6)


def test_mgda_loss_normalisations_use_losses() -> None:
    losses = torch.tensor([2.0, 0.5])
    d_loss = aggregate("mgda", J, normalization="loss", losses=losses)
    assert_close(d_loss, aggregate("mgda", J / losses[:, None]), atol=1e-6, rtol=1e-6)
    d_plus = aggregate("mgda", J, normalization="loss+", losses=losses)
    scaled = J / (losses * J.norm(dim=1))[:, None]
    assert_close(d_plus, aggregate("mgda", scaled), atol=1e-6, rtol=1e-6)


def test_cagrad_c0_and_rescale() -> None:
    G = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    assert_close(aggregate("cagrad", G, c=0.0), G.mean(0))
    assert_close(aggregate("cagrad", G, c=0.4, rescale=True), aggregate("cagrad", G, c=0.4) / 1.16)


def test_fairgrad_alpha_one_is_nash_mtl() -> None:
    # FairGrad with α = 1 solves (Kw)_i = 1/w_i, the Nash-MTL equation: two different solvers must agree.
    G = torch.randn(5, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert_close(aggregate("fairgrad", G, alpha=1.0), aggregate("nash_mtl", G, max_norm=0.0), atol=1e-6, rtol=1e-5)


def test_fairgrad_optimality_condition() -> None:
    G = torch.randn(4, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 1.0
    K = G @ G.T
    for alpha in (0.5, 2.0, 5.0):
        d = aggregate("fairgrad", G, alpha=alpha)
        w = torch.linalg.lstsq(G.T, d[:, None]).solution[:, 0]
        assert (w > 0).all()
        assert_close(K @ w, w ** (-1.0 / alpha), rtol=1e-4, atol=0)


def test_gradvac_first_step_is_pcgrad_and_then_raises_similarity() -> None:
    # With targets 0, a pair is altered only when the cosine is negative, and then it is set to exactly 0
    # (the PCGrad projection): for two tasks both orders coincide.
    assert_close(aggregate("gradvac", J), aggregate("pcgrad", J))
    from mtlvision.balancers import get
    from mtlvision.balancers.aggregate import MatrixGradients

    balancer = get("gradvac", beta=0.5)
    G = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)  # cosine 0.6
    balancer.balance(torch.ones(2, dtype=torch.float64), MatrixGradients(G))
    assert balancer.targets[0, 1] == pytest.approx(0.3)
    G2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # cosine 0 < target 0.3
    w = balancer.balance(torch.ones(2, dtype=torch.float64), MatrixGradients(G2)).weights
    # g1' = g1 + c g2 has cosine with g2 equal to the target 0.3 (and symmetrically for g2')
    g1 = G2[0] + (w[1] - 1.0) * G2[1]
    assert float(g1 @ G2[1] / g1.norm()) == pytest.approx(0.3, abs=1e-9)


def test_sdmgrad_inner_problem_converges_to_its_minimiser() -> None:
    # w = argmin_{w ∈ Δ} ‖G_ᵀw + λ g0‖²; for J: a = 0.63, so d = (g_w + 0.3 g0)/1.3 = [0, 1, 1]
    d = aggregate("sdmgrad", J, lr=0.1, momentum=0.0, niter=2000)
    assert_close(d, torch.tensor([0.0, 1.0, 1.0]), atol=1e-5, rtol=0)


def test_modo_and_moco_first_steps_by_hand() -> None:
    K = (J @ J.T).double().numpy()
    lam = np.full(2, 0.5) - 1e-3 * (K @ np.full(2, 0.5) + 0.1 * 0.5)
    from mtlvision.balancers.gradient._solvers import project_to_simplex

    expected = torch.tensor(project_to_simplex(lam), dtype=torch.float32) @ J
    assert_close(aggregate("modo", J), expected)
    # MoCo step 1: Y = β G = G/2; λ = Π(1/2 − γ (YYᵀ) λ); d = Yᵀλ
    y = 0.5 * J
    lam = project_to_simplex(np.full(2, 0.5) - 0.1 * ((y @ y.T).double().numpy() @ np.full(2, 0.5)))
    assert_close(aggregate("moco", J), torch.tensor(lam, dtype=torch.float32) @ y)


def test_graddrop_by_hand() -> None:
    # columns: all positive -> P = 1 -> every positive component kept; all negative -> P = 0 -> kept;
    # mixed: P = ½(1 + 2/10) = 0.6, so the positive one survives iff U < 0.6.
    G = torch.tensor([[1.0, -2.0, 6.0], [3.0, -1.0, -4.0]])
    torch.manual_seed(0)
    u = torch.rand(3)
    torch.manual_seed(0)
    d = aggregate("graddrop", G)
    expected_last = 6.0 if 0.6 > u[2] else -4.0
    assert_close(d, torch.tensor([4.0, -3.0, expected_last]))
    assert_close(aggregate("graddrop", G, leak=1.0), G.sum(0))


@pytest.mark.parametrize("leak", [0.0, 0.3, [0.0, 0.5, 1.0, 0.25]])
def test_graddrop_equals_algorithm_one_coordinate_by_coordinate(leak) -> None:  # type: ignore[no-untyped-def]
    # Chen et al. 2020, Algorithm 1 written out per coordinate, with the same uniform draws
    G = torch.randn(4, 500, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.1
    G[:, :20] = 0.0  # coordinates no task moves: purity ½, direction 0
    leaks = torch.tensor(leak if isinstance(leak, list) else [leak] * 4, dtype=torch.float64)[:, None]
    torch.manual_seed(7)
    u = torch.rand(500, dtype=torch.float64)
    purity = 0.5 * (1 + torch.nan_to_num(G.sum(0) / G.abs().sum(0)))
    mask = ((purity > u) & (G > 0)) | ((purity < u) & (G < 0))
    expected = ((leaks + (1 - leaks) * mask) * G).sum(0)
    torch.manual_seed(7)
    assert_close(aggregate("graddrop", G, leak=leak), expected, rtol=1e-12, atol=1e-12)
