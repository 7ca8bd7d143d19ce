import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtlvision.errors import MtlvisionError
from mtlvision.evaluation.delta_m import delta_m

DIRECTIONS = {"seg": {"miou": True, "pixel_accuracy": True}, "depth": {"abs_err": False}}


def test_delta_m_matches_the_formula_by_hand():
    baselines = {"seg": {"miou": 0.5, "pixel_accuracy": 0.8}, "depth": {"abs_err": 0.2}}
    metrics = {"seg": {"miou": 0.55, "pixel_accuracy": 0.8}, "depth": {"abs_err": 0.25}}
    result = delta_m(metrics, baselines, DIRECTIONS)
    # terms: miou improved 10% (-10), pixel acc unchanged (0), abs_err worse by 25% (+25)
    assert result.per_metric == {
        "seg": {"miou": pytest.approx(-10.0), "pixel_accuracy": 0.0},
        "depth": {"abs_err": pytest.approx(25.0)},
    }
    assert result.overall == pytest.approx((-10 + 0 + 25) / 3)
    assert result.per_task == {"seg": pytest.approx(-5.0), "depth": pytest.approx(25.0)}


@given(st.floats(0.01, 100), st.floats(0.01, 100))
def test_equal_to_the_experts_gives_zero_and_better_is_negative(base, value):
    baselines = {"seg": {"miou": base, "pixel_accuracy": base}, "depth": {"abs_err": base}}
    same = delta_m(baselines, baselines, DIRECTIONS)
    assert same.overall == 0.0
    better = {"seg": {"miou": base + value, "pixel_accuracy": base + value}, "depth": {"abs_err": base / (1 + value)}}
    assert delta_m(better, baselines, DIRECTIONS).overall < 0


def test_missing_baseline_is_an_error_not_a_skip():
    with pytest.raises(MtlvisionError, match="no single-task baseline for task 'depth'"):
        delta_m(
            {"seg": {"miou": 1.0, "pixel_accuracy": 1.0}, "depth": {"abs_err": 1.0}},
            {"seg": {"miou": 1.0, "pixel_accuracy": 1.0}},
            DIRECTIONS,
        )


def test_zero_baseline_is_reported():
    with pytest.raises(MtlvisionError, match="exactly 0"):
        delta_m({"depth": {"abs_err": 1.0}}, {"depth": {"abs_err": 0.0}}, {"depth": {"abs_err": False}})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("side", ["metrics", "baselines"])
def test_non_finite_metric_is_refused_naming_task_and_metric(bad: float, side: str) -> None:
    # issue 15: a NaN metric (a diverged run, a metric over an empty split) silently made Δm NaN
    good = {"seg": {"miou": 0.5, "pixel_accuracy": 0.8}, "depth": {"abs_err": 0.2}}
    broken = {"seg": dict(good["seg"]), "depth": {"abs_err": bad}}
    metrics, baselines = (broken, good) if side == "metrics" else (good, broken)
    with pytest.raises(MtlvisionError, match=r"task 'depth' metric 'abs_err'.* is (nan|inf|-inf)"):
        delta_m(metrics, baselines, DIRECTIONS)


def test_missing_or_non_numeric_metric_is_refused() -> None:
    baselines = {"seg": {"miou": 0.5, "pixel_accuracy": 0.8}, "depth": {"abs_err": 0.2}}
    with pytest.raises(MtlvisionError, match="task 'seg' reports no metric 'pixel_accuracy'"):
        delta_m({"seg": {"miou": 0.5}, "depth": {"abs_err": 0.2}}, baselines, DIRECTIONS)
    with pytest.raises(MtlvisionError, match="task 'depth' metric 'abs_err' is None, not a number"):
        delta_m({"seg": baselines["seg"], "depth": {"abs_err": None}}, baselines, DIRECTIONS)


def test_a_run_whose_metric_is_not_finite_gets_a_note_not_a_crash(tmp_path):
    """A diverged run still writes its report: Δm is left out with the reason (the metric named)."""
    from mtlvision.config import load_config
    from mtlvision.engine.build import build_tasks
    from mtlvision.engine.runs import Baselines, Expert, delta_m_against

    config = load_config("scenes", {"tasks": ["depth"]})
    path = tmp_path / "baselines.json"
    expert = Expert(run=str(tmp_path / "depth"), metrics={"test": {"abs_err": 0.3, "rel_err": 0.1, "delta1": 0.9}})
    Baselines(path=path, data=config.data.dataset_params, experts={"depth": expert}).save()
    nan = {"depth": {"abs_err": float("nan"), "rel_err": 0.1, "delta1": 0.9}}
    fields = delta_m_against(path, config, build_tasks(config), nan, "test")
    assert fields["delta_m"] is None and "abs_err" in fields["delta_m_note"]
