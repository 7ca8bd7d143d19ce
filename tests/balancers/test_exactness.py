"""Issue 15: each gradient method computes what its docstring says, to round-off, against references the
test computes independently (quadprog or scipy on the same problem, closed forms, defining equations), on
ill-conditioned and badly scaled inputs too; extreme scales are normalised or refused with a message."""

from __future__ import annotations

import numpy as np
import pytest
import quadprog
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from mtlvision.balancers import aggregate, get
from mtlvision.balancers.aggregate import MatrixGradients, gradient_methods
from mtlvision.balancers.gradient import NonFiniteGramianError, SolverError
from mtlvision.balancers.gradient.aligned_mtl import balance_transformation
from mtlvision.errors import ConfigError

FLOAT64_EPS = float(np.finfo(np.float64).eps)


def weights(name: str, g: Tensor, **hparams: object) -> Tensor:
    balancer = get(name, **hparams)
    balancer.setup(g.shape[0])
    return balancer.balance(torch.ones(g.shape[0], dtype=g.dtype), MatrixGradients(g)).weights


def gaussian(t: int, p: int, seed: int) -> Tensor:
    return torch.randn(t, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def conditioned(t: int, p: int, seed: int, condition: float) -> Tensor:
    """G [t, p] whose Gramian has condition number ``condition`` (singular values log-spaced)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(t, t)))
    v, _ = np.linalg.qr(rng.normal(size=(p, t)))
    return torch.tensor((u * np.logspace(0, -0.5 * np.log10(condition), t)) @ v.T)


def min_norm_point_by_quadprog(g: Tensor) -> Tensor:
    """min ‖Gᵀα‖² over the simplex, by quadprog (needs a positive definite K: linearly independent rows)."""
    k = (g @ g.T).numpy()
    t = k.shape[0]
    constraints = np.hstack([np.ones((t, 1)), np.eye(t)])
    alpha = quadprog.solve_qp(k, np.zeros(t), constraints, np.r_[1.0, np.zeros(t)], 1)[0]
    return torch.from_numpy(alpha) @ g


# ------------------------------------------------------------------------------------------------------ MGDA
@pytest.mark.parametrize("seed", range(12))
def test_mgda_by_default_is_the_min_norm_point_of_an_independent_qp(seed: int) -> None:
    # issue 15: at the defaults (Frank-Wolfe, tol 1e-5) it was up to 3 % of ‖g‖ off at T = 10, P = 10
    g = gaussian(10, 10, seed)
    scale = float(g.norm(dim=1).max())
    assert float((aggregate("mgda", g) - min_norm_point_by_quadprog(g)).norm()) <= 1e-9 * scale


def test_frank_wolfe_is_an_option_and_is_inexact_as_documented() -> None:
    g = gaussian(10, 10, 19)
    exact = min_norm_point_by_quadprog(g)
    scale = float(g.norm(dim=1).max())
    assert float((aggregate("mgda", g, solver="frank_wolfe") - exact).norm()) > 0.01 * scale
    assert float((aggregate("mgda", g, solver="exact") - exact).norm()) <= 1e-9 * scale
    with pytest.raises(ConfigError, match="balancer.solver must be one of exact, frank_wolfe"):
        get("mgda", solver="fw")


@st.composite
def hard_matrices(draw: st.DrawFn) -> Tensor:
    """Ill-conditioned, badly scaled, rank-deficient (more tasks than dimensions, duplicated or opposite
    rows) and ordinary matrices."""
    t = draw(st.integers(2, 8))
    p = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["gaussian", "conditioned", "scaled", "duplicated", "opposite"]))
    if kind == "conditioned" and p >= t:
        return conditioned(t, p, seed, draw(st.sampled_from([1e4, 1e8, 1e12])))
    g = gaussian(t, p, seed) + draw(st.sampled_from([0.0, 0.5])) * gaussian(1, p, seed + 1)
    if kind == "scaled":
        g = g * torch.tensor(10.0 ** np.random.default_rng(seed).uniform(-4, 4, size=(t, 1)))
    elif kind == "duplicated":
        g[1] = 2.0 * g[0]
    elif kind == "opposite":
        g[1] = -0.5 * g[0]
    return g


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=hard_matrices())
def test_mgda_weights_satisfy_the_min_norm_kkt_conditions_to_round_off(g: Tensor) -> None:
    # α in the simplex is the min-norm point iff (Kα)_i ≥ αᵀKα for every i (equality where α_i > 0)
    alpha = weights("mgda", g)
    k = g @ g.T
    assert bool((alpha >= 0).all()) and float(alpha.sum()) == pytest.approx(1.0, abs=1e-12)
    k_alpha, value = k @ alpha, float(alpha @ k @ alpha)
    tolerance = 1e-12 * float(k.diagonal().max())
    assert float(k_alpha.min()) >= value - tolerance
    assert float((k_alpha - value).abs()[alpha > 1e-9].max()) <= tolerance + 1e-9 * float(k.abs().max())


# -------------------------------------------------------------------------------------------------- Nash-MTL
@pytest.mark.parametrize("seed", range(30))
def test_nash_mtl_solves_full_rank_problems_with_condition_1e8(seed: int) -> None:
    # issue 15: "the bargaining solution does not exist" was raised on 13 of 90 such problems (every
    # full-rank K has a solution); the previous L-BFGS-B solve failed on 13 of these 30
    t = 2 + seed % 9
    g = conditioned(t, t + 3, seed, 1e8)
    k = g @ g.T
    alpha = weights("nash_mtl", g, max_norm=0.0)
    assert bool((alpha > 0).all())
    assert float((alpha * (k @ alpha) - 1.0).abs().max()) <= 1e-6


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=hard_matrices())
def test_nash_mtl_solves_the_bargaining_equation_or_says_there_is_no_solution(g: Tensor) -> None:
    k = g @ g.T
    try:
        alpha = weights("nash_mtl", g, max_norm=0.0)
    except SolverError as exc:
        # no solution exactly when a convex combination of the gradients vanishes: check it independently
        unit = g / g.norm(dim=1, keepdim=True)
        rank = int(torch.linalg.matrix_rank(unit))
        assert rank < g.shape[0], f"raised on linearly independent gradients: {exc}"
        assert "does not exist" in str(exc) or "round-off" in str(exc)
        return
    assert bool((alpha > 0).all())
    # |αᵢ(Kα)ᵢ − 1| ≤ tol, or within the round-off of computing αᵢ(Kα)ᵢ (componentwise backward error) where
    # the gradients nearly cancel and the weights are huge
    roundoff = 1e3 * FLOAT64_EPS * alpha * (k.abs() @ alpha)
    assert bool(((alpha * (k @ alpha) - 1.0).abs() <= torch.clamp(roundoff, min=1e-6)).all())


def test_nash_mtl_says_why_there_is_no_solution() -> None:
    g = torch.tensor([[1.0, 2.0, 0.0], [-2.0, -4.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    with pytest.raises(SolverError, match=r"does not exist: a convex combination of the task gradients is zero"):
        aggregate("nash_mtl", g)


# ------------------------------------------------------------------------- eigenvalue cut-offs (pseudo-inverses)
def small_second_task(scale: float = 1e-4) -> Tensor:
    """Two tasks in float64, the second gradient 10⁻⁴ of the first and at 60° to it: K's eigenvalues 1 and
    ~7.5e-9, below float32's cut-off 2·eps32 but far above float64's."""
    return torch.tensor([[1.0, 0.0, 0.0], [0.5 * scale, 0.866 * scale, 0.0]], dtype=torch.float64)


def test_imtl_g_projections_are_equal_when_one_gradient_is_tiny() -> None:
    # issue 15: cut at float32 precision, the second direction was dropped and the projections differed
    g = small_second_task()
    d = aggregate("imtl_g", g)
    projections = (g / g.norm(dim=1, keepdim=True)) @ d
    assert float((projections[0] - projections[1]).abs()) <= 1e-9 * float(projections.abs().max())


def test_aligned_mtl_step_has_the_size_of_the_smallest_principal_component() -> None:
    # issue 15: the float32 cut dropped λ_min and took λ_max's scale: a step ~1e4 times too large
    g = small_second_task()
    k = (g @ g.T).numpy()
    b = balance_transformation(k)
    lam_min = float(np.linalg.eigvalsh(k).min())
    np.testing.assert_allclose(b @ k @ b.T, lam_min * np.eye(2), atol=1e-9 * lam_min)
    d = aggregate("aligned_mtl", g)
    expected = torch.from_numpy(b.T @ np.full(2, 0.5)) @ g
    assert float((d - expected).norm()) <= 1e-9 * float(expected.norm())
    assert float(d.norm()) < 1e-3  # √λ_min-sized, not 1


def nearly_coplanar() -> Tensor:
    """Three gradients 1e-5 rad out of a plane: the unit gradients' Gramian has an eigenvalue ~3e-11, whose
    eigenvector is not orthogonal to 1 (so IMTL-G's equal projections need it)."""
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1e-5]], dtype=torch.float64)


def test_imtl_g_projections_are_equal_for_nearly_coplanar_gradients() -> None:
    g = nearly_coplanar()
    d = aggregate("imtl_g", g)
    projections = (g / g.norm(dim=1, keepdim=True)) @ d
    assert float((projections - projections[0]).abs().max()) <= 1e-6 * float(projections.abs().max())


def nearly_parallel() -> Tensor:
    """Two gradients 1e-5 rad apart and a third: the unit gradients' Gramian has an eigenvalue ~5e-11."""
    return torch.tensor([[1.0, 0.0, 0.0], [1.0, 1e-5, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def test_config_cosines_follow_the_preferences_for_nearly_parallel_gradients() -> None:
    # ĝ has cosines proportional to the preferences; with float32's cut-off the small eigenvalue, and with
    # it the difference between the first two preferences, was dropped
    g, prefs = nearly_parallel(), torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    d = aggregate("config", g, pref_vector=prefs.tolist())
    ratios = ((g / g.norm(dim=1, keepdim=True)) @ (d / d.norm())) / prefs
    assert float((ratios - ratios[0]).abs().max()) <= 1e-6 * float(ratios[0])


@pytest.mark.parametrize(
    ("name", "make", "hparams"),
    [
        ("imtl_g", nearly_coplanar, {}),
        ("aligned_mtl", small_second_task, {}),
        ("config", nearly_parallel, {"pref_vector": [1.0, 2.0, 1.0]}),
    ],
)
def test_cut_offs_follow_the_input_dtype(name: str, make: object, hparams: dict) -> None:
    # float32 input: its Gramian is handed over in float32, so directions below float32's round-off are cut
    g = make().float()  # type: ignore[operator]
    d32, d64 = aggregate(name, g, **hparams), aggregate(name, g.double(), **hparams)
    assert bool(torch.isfinite(d32).all()) and not torch.allclose(d32.double(), d64, rtol=1e-3, atol=0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    t=st.integers(2, 6),
    extra=st.integers(0, 6),
    seed=st.integers(0, 2**31 - 1),
    condition=st.sampled_from([1e2, 1e5, 1e8]),
    scaled=st.booleans(),
)
def test_imtl_g_projections_on_unit_gradients_are_equal(t: int, extra: int, seed: int, condition: float, scaled: bool):
    g = conditioned(t, t + extra, seed, condition)
    if scaled:
        g = g * torch.tensor(10.0 ** np.random.default_rng(seed).uniform(-3, 3, size=(t, 1)))
    alpha = weights("imtl_g", g)
    projections = (g / g.norm(dim=1, keepdim=True)) @ (alpha @ g)
    # the solve loses about cond(K)·eps relative to the size of the terms of d = Σ αⱼgⱼ, which may cancel
    # (a row scaling does not count: IMTL-G is invariant to it, and so is the solve)
    tolerance = 1e3 * condition * FLOAT64_EPS * float(alpha.abs() @ g.norm(dim=1))
    assert float((projections - projections[0]).abs().max()) <= tolerance
    assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-9)


# ------------------------------------------------------------------------------------------- UPGrad, DualProj
def conflicting_small_task() -> Tensor:
    """Task 2's gradient is 100× smaller than task 1's, at cosine −0.55."""
    c = -0.55
    return torch.tensor([[1.0, 0.0], [0.01 * c, 0.01 * np.sqrt(1 - c * c)]], dtype=torch.float64)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_methods_satisfy_what_their_docstrings_state(name: str) -> None:
    # issue 15: the docstrings claimed Gd ≥ 0, which fails at the default regularisation (torchjd alike)
    g = conflicting_small_task()
    k = g @ g.T
    w = weights(name, g)
    gd = k @ w
    assert float(gd[1]) < 0  # the conflict the regularisation allows
    bound = -1e-4 * float(k.trace()) * w  # documented: Gd ≥ −reg_eps · trace(K) · w
    assert bool((gd >= bound - 1e-15).all())
    exact = k @ weights(name, g, reg_eps=0.0)  # documented: Gd ≥ 0 with reg_eps = 0
    assert bool((exact >= -1e-12 * float(k.trace())).all())
    doc = " ".join(type(get(name)).__doc__.split())
    assert "reg_eps = 0" in doc and "satisfies ``Gd ≥ 0`` and" not in doc


# ------------------------------------------------------------------------------------------- extreme scales
# GradDrop and the trimmed mean are coordinate-wise: they never form K
GRAMIAN_METHODS = [name for name in gradient_methods() if name not in ("graddrop", "trimmed_mean")]
SCALE_FREE = {"nash_mtl"}  # d(cG) = d(G) (without max_norm)
NOT_HOMOGENEOUS = {"modo", "moco", "fairgrad"}  # steps on K itself, or d(cG) = c^(1-2α/(1+α)) d(G)


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
def test_huge_gradients_are_normalised_before_solving(name: str) -> None:
    g = gaussian(3, 6, 1) + 0.5
    hparams = {"max_norm": 0.0} if name in ("nash_mtl", "ntkmtl") else {}  # clipping is not homogeneous
    torch.manual_seed(0)
    small = aggregate(name, g, **hparams)
    torch.manual_seed(0)
    huge = aggregate(name, 1e150 * g, **hparams)  # K ~ 1e300: finite, but K² and sums of T entries are not
    assert bool(torch.isfinite(huge).all()), f"{name}: {huge}"
    if name in NOT_HOMOGENEOUS:
        return
    expected = small if name in SCALE_FREE else 1e150 * small
    assert float((huge - expected).norm()) <= 1e-9 * float(expected.norm())


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
def test_gradients_whose_gramian_overflows_are_refused_with_a_message(name: str) -> None:
    # issue 15: gradients around 1e160 gave non-finite directions or numpy's LinAlgError
    g = 1e160 * (gaussian(3, 6, 1) + 0.5)
    message = r"overflows float64 \(tasks \[0, 1, 2\]\).*gradient norms above about 1.34e\+154"
    with pytest.raises(NonFiniteGramianError, match=message):
        aggregate(name, g)


def test_a_float32_gramian_that_overflows_names_float32() -> None:
    g = torch.full((2, 4), 1e20, dtype=torch.float32)
    with pytest.raises(NonFiniteGramianError, match="overflows float32.*or use a float64 Gramian"):
        aggregate("upgrad", g)


class NanGramian(MatrixGradients):
    """Finite losses, NaN gradients (e.g. a sqrt at 0 inside a loss): what a training step can hand over."""

    def gramian(self) -> Tensor:
        return torch.full((2, 2), float("nan"), dtype=torch.float32)


@pytest.mark.parametrize("name", ["mgda", "imtl_g", "nash_mtl", "upgrad"])
def test_a_nan_gramian_is_a_typed_error_a_training_loop_can_skip(name: str) -> None:
    with pytest.raises(NonFiniteGramianError, match="holds NaN"):
        get(name).balance(torch.ones(2), NanGramian(torch.ones(2, 3)))
