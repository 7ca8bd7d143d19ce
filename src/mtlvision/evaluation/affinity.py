"""Inter-task affinity and TAG's choice of task groups (Fifty et al., "Efficiently Identifying Task Groupings
for Multi-Task Learning", NeurIPS 2021).

Affinity (the paper's eq. 2 and 3): at step t, a lookahead SGD step on the shared parameters with task i's
gradient, ``θ_s^{t+1|i} = θ_s^t − η ∇_{θ_s} L_i``, and the relative change of task j's loss on the same batch,

    Z^t_{i→j} = 1 − L_j(X^t; θ_s^{t+1|i}, θ_j^t) / L_j(X^t; θ_s^t, θ_j^t),

averaged over the steps it was measured at. Positive: i's step lowered j's loss (i helps j).

Grouping (the paper's network selection, with overlapping groups as in its released code): a group of at
least two tasks serves each member j with the score ``mean_{i ∈ group, i ≠ j} Z_{i→j}`` (the affinity onto j
from the other members); a choice of at most N groups that together cover every task is worth
``Σ_j max_{groups ∋ j} score(group, j)``: each task is served by the network where it scores best, a task may
be trained in several. A task alone gains no affinity, so one-task groups are not candidates (with N ≥ 1 the
group of all tasks always covers). The search is exact (every choice of up to N of the 2^T − T − 1 groups,
vectorised) while that is at most :data:`EXACT_LIMIT` choices (:func:`exact_search_fits`): any N for up to 5
tasks, N ≤ 5 for 6, N ≤ 4 for 7, N ≤ 3 for 8–10 (10 tasks into 3 groups: about 40 s on one CPU core), N ≤ 2 up to
14. Beyond, a stated heuristic: greedy (add the group that raises the total most, N times), then
swaps of one chosen group for another while one improves the total; ``Grouping.exact`` says which was used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from mtlvision.errors import ConfigError

#: the most choices of groups the exact search enumerates
EXACT_LIMIT = 200_000_000
#: the most choices it holds at once (those of one group fewer than asked; the last level is streamed)
HELD_LIMIT = 2_000_000


@dataclass(frozen=True)
class Grouping:
    """A choice of task groups.

    ``groups`` the chosen groups (task names, in task order); ``scores`` each group's score of each member;
    ``served_by`` the index of the group that serves each task (its best); ``total`` the sum over tasks of
    the served score; ``exact`` whether the search was exhaustive.
    """

    groups: list[tuple[str, ...]]
    scores: list[dict[str, float]]
    served_by: dict[str, int]
    total: float
    exact: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "groups": [list(g) for g in self.groups],
            "scores": self.scores,
            "served_by": {task: list(self.groups[i]) for task, i in self.served_by.items()},
            "total": self.total,
            "search": "exact" if self.exact else "heuristic (greedy, then single-group swaps)",
        }


def check_matrix(matrix: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """``matrix`` as a finite float [T, T] array matching ``names``, or a clear error."""
    array = np.asarray(matrix, dtype=float)
    if array.ndim != 2 or array.shape != (len(names), len(names)):
        raise ConfigError(f"the affinity matrix must be {len(names)}×{len(names)} for tasks {list(names)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"task names must be unique, got {list(names)}")
    if not np.isfinite(array).all():
        raise ConfigError("the affinity matrix holds NaN or infinite entries (a diverged or empty affinity run)")
    return array


def group_scores(matrix: np.ndarray, members: Sequence[int]) -> np.ndarray:
    """Each member's score in the group ``members`` (≥ 2 task indices): the mean affinity onto it from the
    other members, ``mean_{i ≠ j} Z[i, j]``."""
    sub = matrix[np.ix_(members, members)]
    return (sub.sum(axis=0) - np.diag(sub)) / (len(members) - 1)


def _candidates(matrix: np.ndarray) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """Every group of two or more tasks, and its [groups, T] score table (−inf where a task is not in it)."""
    tasks = matrix.shape[0]
    groups = [g for size in range(2, tasks + 1) for g in combinations(range(tasks), size)]
    table = np.full((len(groups), tasks), -np.inf)
    for row, group in enumerate(groups):
        table[row, list(group)] = group_scores(matrix, group)
    return groups, table


def _exact(table: np.ndarray, n_groups: int) -> tuple[tuple[int, ...], float]:
    """The best choice of up to ``n_groups`` rows (fewest rows on a tie, then the first in order).

    Level k holds every choice of k rows (their rows, last row, per-task maxima); the last level is streamed
    row by row, never held."""
    count = table.shape[0]
    best: tuple[tuple[int, ...], float] = ((), -math.inf)

    def consider(chosen: np.ndarray, maxima: np.ndarray) -> None:
        nonlocal best
        if not len(chosen):
            return
        totals = maxima.sum(axis=1)
        at = int(np.argmax(totals))
        if totals[at] > best[1] + 1e-12:
            best = (tuple(int(r) for r in chosen[at]), float(totals[at]))

    chosen, maxima = np.arange(count)[:, None], table.copy()
    consider(chosen, maxima)
    for size in range(2, min(n_groups, count) + 1):
        last = chosen[:, -1]
        parts_chosen, parts_max = [], []
        for row in range(1, count):
            keep = last < row
            grown = np.concatenate([chosen[keep], np.full((int(keep.sum()), 1), row)], axis=1)
            grown_max = np.maximum(maxima[keep], table[row])
            if size == n_groups:
                consider(grown, grown_max)
            else:
                parts_chosen.append(grown)
                parts_max.append(grown_max)
        if size == n_groups:
            break
        chosen, maxima = np.concatenate(parts_chosen), np.concatenate(parts_max)
        consider(chosen, maxima)
    return best


def _heuristic(table: np.ndarray, n_groups: int) -> tuple[tuple[int, ...], float]:
    """Greedy forward choice of ``n_groups`` rows, then single-row swaps while one raises the total."""

    def total(rows: Sequence[int]) -> float:
        return float(table[list(rows)].max(axis=0).sum())

    rows: list[int] = []
    for _ in range(n_groups):
        scores = [total([*rows, r]) if r not in rows else -math.inf for r in range(table.shape[0])]
        rows.append(int(np.argmax(scores)))
    current, improved = total(rows), True
    while improved:
        improved = False
        for slot in range(len(rows)):
            for r in range(table.shape[0]):
                if r in rows:
                    continue
                trial = [*rows[:slot], r, *rows[slot + 1 :]]
                value = total(trial)
                if value > current + 1e-12:
                    rows, current, improved = trial, value, True
    return tuple(sorted(rows)), current


def exact_search_fits(tasks: int, n_groups: int) -> bool:
    """Whether the exact search runs for ``tasks`` tasks and up to ``n_groups`` groups: at most
    :data:`EXACT_LIMIT` choices in all, and at most :data:`HELD_LIMIT` choices held at the level before last."""
    candidates = 2**tasks - tasks - 1
    levels = min(n_groups, candidates)
    choices = sum(math.comb(candidates, k) for k in range(1, levels + 1))
    return choices <= EXACT_LIMIT and math.comb(candidates, max(levels - 1, 1)) <= HELD_LIMIT


def select_groups(matrix: np.ndarray, names: Sequence[str], n_groups: int) -> Grouping:
    """TAG's choice of at most ``n_groups`` groups of the tasks ``names`` from the affinity ``matrix``.

    Args:
        matrix: ``Z[i, j]``, the affinity of task i onto task j ([T, T]; the diagonal is not used).
        names: the T task names.
        n_groups: the most networks to train (≥ 1).

    Returns:
        The :class:`Grouping` with the highest total (exact search up to :data:`EXACT_LIMIT` choices).
    """
    matrix = check_matrix(matrix, names)
    if n_groups < 1:
        raise ConfigError(f"the number of groups must be at least 1, got {n_groups}")
    if len(names) < 2:
        raise ConfigError("grouping needs at least two tasks")
    groups, table = _candidates(matrix)
    exact = exact_search_fits(len(names), n_groups)
    rows, total = _exact(table, n_groups) if exact else _heuristic(table, n_groups)
    chosen = [groups[r] for r in rows]
    served = {names[j]: int(np.argmax([table[r, j] for r in rows])) for j in range(len(names))}
    return Grouping(
        groups=[tuple(names[i] for i in g) for g in chosen],
        scores=[{names[i]: float(table[r, i]) for i in groups[r]} for r in rows],
        served_by=served,
        total=total,
        exact=exact,
    )
