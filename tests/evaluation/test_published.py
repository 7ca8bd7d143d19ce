"""Published benchmark rows: the side-by-side table and Δm against the published single-task row."""

from __future__ import annotations

import copy

import pytest

from mtlvision.cli import AGAINST
from mtlvision.errors import MtlvisionError
from mtlvision.evaluation.published import PUBLISHED, compare_published


def test_the_cli_lists_every_published_benchmark():
    assert sorted(AGAINST) == PUBLISHED.names()


def test_a_run_equal_to_the_single_task_row_has_zero_delta_m_and_a_better_miou_lowers_it():
    stl = PUBLISHED.get("nyuv2_segnet_mtan").baseline().metrics
    same = compare_published(stl, "nyuv2_segnet_mtan")
    assert [row.method for row in same.rows] == ["single task", "this run"]
    assert [row.delta_m for row in same.rows] == [0.0, 0.0]
    better = copy.deepcopy(stl)
    better["segmentation"]["miou"] = 0.3830 * 1.1  # 10 % better on one of nine metrics
    better["depth"]["abs_err"] = 0.6754 * 1.2  # 20 % worse on another
    better["depth"]["delta1"] = 0.5  # a metric the table does not report is left out
    row = compare_published(better, "nyuv2_segnet_mtan").rows[-1]
    assert row.delta_m == pytest.approx((-10.0 + 20.0) / 9)
    assert "delta1" not in row.metrics["depth"]


def test_a_run_without_the_benchmark_tasks_is_refused_by_name():
    with pytest.raises(MtlvisionError, match=r"normals\.mean_angle"):
        compare_published(
            {"segmentation": {"miou": 0.4, "pixel_accuracy": 0.6}, "depth": {"abs_err": 0.5, "rel_err": 0.2}},
            "nyuv2_segnet_mtan",
        )
