"""Small numerical helpers shared by the gradient methods: they work on the T×T Gramian in float64.

The Gramian is tiny (T ≤ a few dozen), so the solvers run on the CPU in numpy: one device-to-host copy of
T² numbers per step is far cheaper than hundreds of tiny kernel launches on an accelerator.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import quadprog
import torch
from scipy.optimize import minimize
from torch import Tensor

from mtlvision.errors import MtlvisionError


class SolverError(MtlvisionError):
    """A balancer's optimisation problem has no solution or its solver failed (never silently replaced)."""


class NonFiniteGramianError(SolverError):
    """The Gramian of the task gradients holds NaN or infinite values (overflow or non-finite gradients).

    A training loop that skips steps with non-finite gradients can catch this one and skip the step, as it
    would for a non-finite loss; called directly (``aggregate``), it is the error to show."""


class GramianArray(np.ndarray):
    """``K`` as a float64 numpy array that remembers ``eps``, the relative precision of the tensor it was
    computed in (float32 for the engine's default Gramian). Slices and arithmetic keep it, so that every
    rank decision downstream cuts at the precision the numbers really have, not at float64's."""

    eps: float

    def __array_finalize__(self, obj: object) -> None:
        self.eps = float(getattr(obj, "eps", np.finfo(np.float64).eps))


def precision(gramian: np.ndarray) -> float:
    """The relative precision of ``gramian``: its ``eps`` when it came from :func:`to_numpy_gramian`, else
    the machine epsilon of its dtype (float64 for a plain float64 array)."""
    eps = getattr(gramian, "eps", None)
    if eps is not None:
        return float(eps)
    dtype = gramian.dtype if np.issubdtype(gramian.dtype, np.floating) else np.float64
    return float(np.finfo(dtype).eps)


def to_numpy_gramian(gramian: Tensor) -> GramianArray:
    """``K`` as a symmetric float64 numpy array carrying the precision of ``gramian``'s dtype.

    A Gramian with non-finite entries is refused with :class:`NonFiniteGramianError`: the squared norms of the task
    gradients overflowed ``gramian``'s dtype (or the gradients themselves were not finite), and no method
    can recover a direction from it.
    """
    source = gramian.dtype if gramian.is_floating_point() else torch.float64
    k = gramian.detach().to("cpu", torch.float64).numpy()
    check_finite_gramian(k, str(source).removeprefix("torch."))
    symmetric = cast(GramianArray, (0.5 * k + 0.5 * k.T).view(GramianArray))  # halves first: no overflow
    symmetric.eps = float(torch.finfo(source).eps)
    return symmetric


def to_tensor(weights: np.ndarray, like: Tensor) -> Tensor:
    """Weights as a tensor with ``like``'s device and floating dtype."""
    return torch.as_tensor(np.ascontiguousarray(weights), dtype=like.dtype).to(like.device)


def check_finite_gramian(gramian: np.ndarray, dtype_name: str = "float64") -> None:
    """Refuse a Gramian with NaN or infinite entries, saying which and why (see :func:`to_numpy_gramian`)."""
    finite = np.isfinite(gramian)
    if finite.all():
        return
    if np.isnan(gramian).any() and not np.isinf(gramian).any():
        raise NonFiniteGramianError(
            "the Gramian K = G Gᵀ of the task gradients holds NaN: some task's loss or gradient is NaN "
            "(check the losses and the inputs of this step)"
        )
    diagonal = np.diag(gramian)
    bad = [int(t) for t in np.flatnonzero(~np.isfinite(diagonal))] or sorted(
        {int(t) for t in np.argwhere(~finite).ravel()}
    )
    largest = float(np.finfo(np.dtype(dtype_name)).max) if dtype_name in ("float16", "float32", "float64") else np.inf
    raise NonFiniteGramianError(
        f"the Gramian K = G Gᵀ of the task gradients overflows {dtype_name} (tasks {bad}): a squared gradient "
        f"norm or inner product exceeds {largest:.3g}, i.e. gradient norms above about {np.sqrt(largest):.3g} "
        "(or infinite gradients). No balancing direction can be computed from it; the losses have diverged or "
        "are badly scaled (lower the learning rate or scale the losses down"
        + (
            ", or use a float64 Gramian: gramian_dtype=torch.float64 in the engine, a float64 G in aggregate"
            if dtype_name != "float64"
            else ""
        )
        + ")"
    )


def scaled(gramian: np.ndarray) -> tuple[np.ndarray, float]:
    """``(K / s, s)`` with ``s`` a power of two that brings the largest diagonal entry of ``K`` into
    ``[1, 4)`` (``s = 1`` for a zero Gramian).

    Dividing by a power of two is exact, so methods whose weights do not depend on the scale of ``K`` solve
    on ``K / s`` and lose nothing, while their intermediate products (``K²``, sums over ``T`` entries,
    eigen-solvers' norms) can no longer overflow or underflow for gradients of extreme size.
    """
    top = float(np.max(np.diag(gramian), initial=0.0))
    if not top > 0.0 or not np.isfinite(top):
        return gramian, 1.0
    exponent = int(np.frexp(top)[1]) - 1  # top = m · 2^(exponent + 1), m in [0.5, 1)
    exponent -= exponent % 2  # an even exponent: √s is a power of two as well
    s = float(np.ldexp(1.0, exponent))
    return gramian / s, s


def eigenvalue_cutoff(eigenvalues: np.ndarray, size: int, eps: float) -> float:
    """Eigenvalues of a PSD Gramian at or below ``size · eps · λ_max`` are round-off, not directions of the
    gradients: the rule of ``torch.linalg.pinv``'s default ``rtol`` (which torchjd relies on), applied with
    the precision ``eps`` of the Gramian's own dtype and relative to its own scale ``λ_max``."""
    return max(float(np.max(eigenvalues, initial=0.0)), 0.0) * size * eps


def pinv_psd(gramian: np.ndarray) -> np.ndarray:
    """Pseudo-inverse of a PSD Gramian, cutting eigenvalues at :func:`eigenvalue_cutoff` (its own
    precision and scale). Computed on the power-of-two rescaled ``K`` (:func:`scaled`), so that Gramians of
    very large or very small gradients neither overflow nor underflow inside the eigen-solver."""
    k, s = scaled(np.asarray(gramian))
    eigenvalues, vectors = np.linalg.eigh(k)
    keep = eigenvalues > eigenvalue_cutoff(eigenvalues, k.shape[0], precision(gramian))
    vectors = vectors[:, keep]
    return (vectors / eigenvalues[keep]) @ vectors.T / s


def gradient_norms(gramian: np.ndarray) -> np.ndarray:
    """``‖g_t‖`` from the diagonal of ``K`` (clamped at 0 against round-off)."""
    return np.sqrt(np.clip(np.diag(gramian), 0.0, None))


def nonzero_tasks(gramian: np.ndarray, rel_tol: float = 1e-12) -> np.ndarray:
    """Mask of tasks whose gradient is not (numerically) zero relative to the largest one."""
    norms = gradient_norms(gramian)
    top = norms.max(initial=0.0)
    return norms > rel_tol * top if top > 0 else np.zeros_like(norms, dtype=bool)


def project_to_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex (Held, Wolfe & Crowder 1974; sort-based).

    The projection commutes with adding a constant to every entry, so ``v`` is shifted to a maximum of 0
    first: this keeps the threshold exact for entries of very different magnitude.
    """
    v = v - v.max()
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    index = np.arange(1, v.size + 1)
    support = np.flatnonzero(u - cumulative / index > 0)
    rho = int(support[-1]) if support.size else 0  # the largest entry is always in the support
    return np.maximum(v - cumulative[rho] / (rho + 1.0), 0.0)


def _solve_psd(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``matrix⁻¹ rhs`` for a small symmetric positive (semi-)definite matrix (least squares if singular)."""
    try:
        return np.linalg.solve(matrix, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(matrix, rhs, rcond=None)[0]


def _nonnegative_least_squares(normal: np.ndarray, moment: np.ndarray, tol: float) -> np.ndarray:
    """``argmin_{x ≥ 0} ‖a x − b‖`` given ``normal = aᵀa`` and ``moment = aᵀb``, by Lawson & Hanson's
    active-set algorithm (Solving Least Squares Problems, 1974, Ch. 23), which ends after finitely many
    steps at the exact minimiser.

    Columns enter the passive set one at a time (the one whose dual ``aᵀ(b − a x)`` is largest and above
    ``tol``); each sub-problem on the passive set is a small linear solve; a step that would make a passive
    entry non-positive stops at the boundary and drops that column. A column whose own sub-problem value
    comes out non-positive as it enters (impossible in exact arithmetic, so round-off at a degenerate point)
    is held out until ``x`` changes, the standard safeguard against cycling.
    """
    n = normal.shape[0]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    blocked = np.zeros(n, dtype=bool)  # columns that failed to enter since x last changed
    for _ in range(10 * (n + 1)):
        dual = moment - normal @ x
        free = ~passive & ~blocked & (dual > tol)
        if not free.any():
            return x
        entering = int(np.argmax(np.where(free, dual, -np.inf)))
        passive[entering] = True
        first = True
        while True:
            z = np.zeros(n)
            z[passive] = _solve_psd(normal[np.ix_(passive, passive)], moment[passive])
            if (z[passive] > 0).all():
                x = z
                blocked[:] = False
                break
            if first and z[entering] <= 0:  # impossible in exact arithmetic (dual > 0): round-off
                passive[entering] = False
                blocked[entering] = True
                break
            first = False
            hitting = passive & (z <= 0)
            ratios = np.where(hitting, x / np.where(hitting, x - z, 1.0), np.inf)
            first_out = int(np.argmin(ratios))
            x = x + ratios[first_out] * (z - x)
            leaving = passive & (x <= 0)
            leaving[first_out] = True
            x[leaving] = 0.0
            passive &= ~leaving
    raise SolverError("min-norm solver: the active-set iteration did not terminate")


def min_norm_weights(gramian: np.ndarray) -> np.ndarray:
    """The exact min-norm point of the convex hull of the gradients: ``α = argmin_{α ∈ Δ} αᵀKα``.

    ``α = v / 1ᵀv`` for ``v = argmin_{v ≥ 0} ‖Gᵀv‖² + (1ᵀv − 1)²``, a non-negative least-squares problem
    whose normal matrix ``K + 11ᵀ`` and moment ``1`` need only ``K``: its KKT conditions, divided by
    ``1ᵀv > 0``, are exactly those of the min-norm problem (``(Kα)_i ≥ αᵀKα`` with equality where
    ``α_i > 0``). The active-set method ends at the exact minimiser (to round-off), rank-deficient ``K``
    included (the weights are then one of the minimisers; the point ``Gᵀα`` is unique). ``K`` is rescaled
    by a power of two first (:func:`scaled`), which changes nothing but the range of the numbers.
    """
    t = gramian.shape[0]
    if t == 1:
        return np.ones(1)
    k, _ = scaled(np.asarray(gramian, dtype=np.float64))
    v = _nonnegative_least_squares(k + 1.0, np.ones(t), tol=16.0 * (t + 1) * float(np.finfo(np.float64).eps))
    total = v.sum()
    if not total > 0:
        raise SolverError(f"min-norm solver: no weights found (sum {total}) for the Gramian {k.tolist()}")
    return v / total


def _line_search(v1v1: np.ndarray, v1v2: np.ndarray, v2v2: np.ndarray) -> np.ndarray:
    """``argmin_γ∈[0,1] ‖γ v1 + (1-γ) v2‖²`` from the three inner products (vectorised)."""
    denom = v1v1 + v2v2 - 2.0 * v1v2  # = ‖v1 - v2‖² ≥ 0
    safe = np.where(denom > 1e-300, denom, 1.0)
    return np.where(denom > 1e-300, np.clip((v2v2 - v1v2) / safe, 0.0, 1.0), 1.0)


def min_norm_frank_wolfe(gramian: np.ndarray, max_iter: int = 250, tol: float = 1e-5) -> np.ndarray:
    """Min-norm point of the convex hull of the gradients (Sener & Koltun 2018, Algorithm 2).

    Initialised at the best pair of gradients as in the authors' solver, then Frank–Wolfe with exact line
    search on the simplex, stopping when the weights move by less than ``tol`` (L1) or after ``max_iter``.
    """
    t = gramian.shape[0]
    if t == 1:
        return np.ones(1)
    i, j = np.triu_indices(t, k=1)
    gamma = _line_search(gramian[i, i], gramian[i, j], gramian[j, j])
    cost = gamma**2 * gramian[i, i] + 2 * gamma * (1 - gamma) * gramian[i, j] + (1 - gamma) ** 2 * gramian[j, j]
    best = int(np.argmin(cost))
    alpha = np.zeros(t)
    alpha[i[best]] = gamma[best]
    alpha[j[best]] += 1.0 - gamma[best]
    if t == 2:
        return alpha
    k_alpha = gramian @ alpha
    for _ in range(max_iter):
        vertex = int(np.argmin(k_alpha))
        v1v1, v1v2, v2v2 = float(alpha @ k_alpha), float(k_alpha[vertex]), float(gramian[vertex, vertex])
        denom = v1v1 + v2v2 - 2.0 * v1v2
        step = min(max((v2v2 - v1v2) / denom, 0.0), 1.0) if denom > 1e-300 else 1.0
        moved = (1.0 - step) * (np.abs(alpha).sum() - alpha[vertex] + abs(1.0 - alpha[vertex]))
        alpha = step * alpha
        alpha[vertex] += 1.0 - step
        k_alpha = step * k_alpha + (1.0 - step) * gramian[vertex]  # K(γα + (1−γ)e_v), updated in O(T)
        if moved < tol:
            break
    return alpha


def random_orders(t: int) -> np.ndarray:
    """Row i: the other tasks in a uniformly random order (from torch's global generator), shape [T, T−1]."""
    keys = torch.rand(t, t, dtype=torch.float64)
    keys.fill_diagonal_(2.0)  # task i itself sorts last and is dropped
    return keys.argsort(dim=1)[:, : t - 1].numpy()


def normalise_gramian(gramian: np.ndarray, eps: float) -> np.ndarray:
    """``K / trace(K)`` (the Gramian of ``G / ‖G‖_F``), or zeros when ``trace(K) < eps`` (an absolute
    threshold, torchjd's rule). The trace is taken of the power-of-two rescaled ``K`` (:func:`scaled`), so
    it cannot overflow."""
    k, s = scaled(gramian)
    trace = float(np.trace(k))
    return k / trace if trace * s >= eps and trace > 0 else np.zeros_like(k)


def project_weights_to_dual_cone(gramian: np.ndarray, prefs: np.ndarray) -> np.ndarray:
    """Weights ``w`` with ``Gᵀw`` the projection of ``Gᵀu`` onto the dual cone ``{x: Gx ≥ 0}``.

    By Quinton & Rey (2024, Prop. 1) this is ``argmin_{w ≥ u} wᵀ K w``, solved per row ``u`` of ``prefs``
    with quadprog (Goldfarb–Idnani); returns one row of weights per row of ``prefs``. ``gramian`` must be
    positive definite (regularise it first).
    """
    t = gramian.shape[0]
    prefs = np.atleast_2d(prefs)
    out = np.empty((prefs.shape[0], t))
    for row, u in enumerate(prefs):
        try:
            out[row] = quadprog.solve_qp(gramian, np.zeros(t), np.eye(t), u.astype(np.float64), 0)[0]
        except ValueError as exc:
            raise SolverError(f"dual-cone projection QP failed: {exc}") from None
    return out


def conflict_averse_dual(k: np.ndarray, linear: float, root: float, method: str) -> np.ndarray:
    """``argmin_{w ∈ Δ} linear·wᵀK1/T + root·√(wᵀKw)``, CAGrad's dual problem (Liu et al., NeurIPS 2021) and
    IMGrad's re-weighting of it: SLSQP from ``w = 1/T``, as both authors' codes solve it, clipped to the simplex.
    ``method`` names the balancer in the error raised when SLSQP does not converge."""
    t = k.shape[0]
    mean = np.full(t, 1.0 / t)
    k_mean = k @ mean

    def objective(w: np.ndarray) -> float:
        return float(linear * (w @ k_mean) + root * np.sqrt(max(w @ k @ w, 0.0) + 1e-12))

    def jacobian(w: np.ndarray) -> np.ndarray:
        return linear * k_mean + root * (k @ w) / np.sqrt(max(w @ k @ w, 0.0) + 1e-12)

    result = minimize(
        objective,
        mean,
        jac=jacobian,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * t,
        constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)},),
        options={"ftol": 1e-12, "maxiter": 200},
    )
    if not result.success:
        raise SolverError(f"{method}: the dual problem did not converge ({result.message})")
    w = np.clip(result.x, 0.0, None)
    return cast(np.ndarray, w / w.sum())
