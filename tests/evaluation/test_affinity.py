"""TAG's grouping: the exact search against brute force, the scores, the heuristic, bad input."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest

from mtlvision.errors import ConfigError
from mtlvision.evaluation.affinity import exact_search_fits, group_scores, select_groups


def brute_force(matrix: np.ndarray, n_groups: int) -> float:
    """The best total over every choice of up to ``n_groups`` task sets (singletons included: score −inf)."""
    tasks = matrix.shape[0]
    subsets = [s for k in range(1, tasks + 1) for s in combinations(range(tasks), k)]
    best = -math.inf
    for k in range(1, n_groups + 1):
        for choice in combinations(subsets, k):
            served = [-math.inf] * tasks
            for group in choice:
                for j in group:
                    others = [matrix[i, j] for i in group if i != j]
                    score = sum(others) / len(others) if others else -math.inf
                    served[j] = max(served[j], score)
            best = max(best, sum(served))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("tasks", "n_groups"), [(3, 2), (4, 2), (4, 3), (5, 2)])
def test_exact_search_equals_brute_force(seed, tasks, n_groups):
    matrix = np.random.default_rng(seed).normal(size=(tasks, tasks))
    names = [f"t{i}" for i in range(tasks)]
    grouping = select_groups(matrix, names, n_groups)
    assert grouping.exact
    assert grouping.total == pytest.approx(brute_force(matrix, n_groups), abs=1e-9)
    assert len(grouping.groups) <= n_groups
    # the total is what the groups say: each task served by its best group
    index = {n: i for i, n in enumerate(names)}
    recomputed = 0.0
    for task in names:
        best = max(
            group_scores(matrix, [index[m] for m in g])[list(g).index(task)] for g in grouping.groups if task in g
        )
        assert grouping.scores[grouping.served_by[task]][task] == pytest.approx(best)
        recomputed += best
    assert recomputed == pytest.approx(grouping.total)


def test_group_scores_are_the_mean_affinity_onto_each_member():
    z = np.array([[9.0, 1.0, 2.0], [3.0, 9.0, 4.0], [5.0, 6.0, 9.0]])  # z[i, j]: i onto j; diagonal unused
    assert group_scores(z, [0, 1, 2]).tolist() == pytest.approx([(3 + 5) / 2, (1 + 6) / 2, (2 + 4) / 2])


def test_two_blocks_of_friends_are_split_apart():
    # a and b help each other, c and d help each other, across the blocks every step hurts
    z = -np.ones((4, 4))
    z[0, 1] = z[1, 0] = z[2, 3] = z[3, 2] = 1.0
    grouping = select_groups(z, ["a", "b", "c", "d"], 2)
    assert sorted(grouping.groups) == [("a", "b"), ("c", "d")]
    assert grouping.total == pytest.approx(4.0)
    one = select_groups(z, ["a", "b", "c", "d"], 1)
    assert one.groups == [("a", "b", "c", "d")]


def test_more_groups_than_needed_keeps_the_fewest():
    z = np.ones((3, 3))  # everyone helps everyone equally: one network is as good as more
    assert select_groups(z, ["a", "b", "c"], 3).groups == [("a", "b", "c")]


def test_heuristic_beyond_the_exact_limit_finds_planted_blocks():
    tasks = 15
    assert not exact_search_fits(tasks, 3)
    rng = np.random.default_rng(0)
    blocks = [range(0, 5), range(5, 10), range(10, 15)]
    z = rng.normal(-1.0, 0.1, size=(tasks, tasks))
    for block in blocks:
        for i in block:
            for j in block:
                z[i, j] = 1.0
    names = [f"t{i:02d}" for i in range(tasks)]
    grouping = select_groups(z, names, 3)
    assert not grouping.exact
    assert sorted(grouping.groups) == [tuple(names[i] for i in b) for b in blocks]


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match="3×3"):
        select_groups(np.zeros((2, 2)), ["a", "b", "c"], 2)
    with pytest.raises(ConfigError, match="NaN"):
        select_groups(np.array([[0, np.nan], [0, 0]]), ["a", "b"], 1)
    with pytest.raises(ConfigError, match="at least 1"):
        select_groups(np.zeros((2, 2)), ["a", "b"], 0)
