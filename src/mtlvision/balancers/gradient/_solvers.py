"""Small numerical helpers shared by the gradient methods: they work on the T×T Gramian in float64.

The Gramian is tiny (T ≤ a few dozen), so the solvers run on the CPU in numpy: one device-to-host copy of
T² numbers per step is far cheaper than hundreds of tiny kernel launches on an accelerator.
"""

from __future__ import annotations

import numpy as np
import quadprog
import torch
from torch import Tensor

from mtlvision.errors import MtlvisionError


class SolverError(MtlvisionError):
    """A balancer's optimisation problem has no solution or its solver failed (never silently replaced)."""


def to_numpy_gramian(gramian: Tensor) -> np.ndarray:
    """``K`` as a symmetric float64 numpy array."""
    k = gramian.detach().to("cpu", torch.float64).numpy()
    return 0.5 * (k + k.T)


def to_tensor(weights: np.ndarray, like: Tensor) -> Tensor:
    """Weights as a tensor with ``like``'s device and floating dtype."""
    return torch.as_tensor(np.ascontiguousarray(weights), dtype=like.dtype).to(like.device)


#: relative precision of the Gramian the engine hands over (float32 by default): eigenvalues of ``K`` below
#: ``T · RELATIVE_PRECISION · λ_max`` are round-off, not directions of the gradients.
RELATIVE_PRECISION = float(np.finfo(np.float32).eps)


def pinv_psd(gramian: np.ndarray) -> np.ndarray:
    """Pseudo-inverse of a PSD Gramian, cutting eigenvalues at the Gramian's precision (as torch's
    default ``rtol`` does for float32, which torchjd relies on)."""
    return np.linalg.pinv(gramian, rcond=gramian.shape[0] * RELATIVE_PRECISION, hermitian=True)


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
    """``K / trace(K)`` (the Gramian of ``G / ‖G‖_F``), or zeros when ``trace(K) < eps``."""
    trace = float(np.trace(gramian))
    return gramian / trace if trace >= eps else np.zeros_like(gramian)


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
