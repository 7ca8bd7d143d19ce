"""The benchmark protocols' model-selection rules: ``mean_last:N`` (Nash-MTL, FAMO), ``delta_m`` and ``delta_m_first``
(LibMTL)."""

from __future__ import annotations

import csv
import json

import pytest

from mtlvision.cli import main
from mtlvision.config import TrainConfig
from mtlvision.engine.logging import EpochSummary
from mtlvision.engine.loop_state import Selection
from mtlvision.engine.trainer import Trainer
from mtlvision.errors import ConfigError, MtlvisionError
from mtlvision.evaluation.evaluator import EvalResult
from mtlvision.tasks import Depth, Segmentation

from .tinyrun import TinyScenes, tiny_model

OPTIONS = dict(batch_size=8, lr=5e-3, seed=3, progress=False)


def test_mean_last_records_the_eval_split_at_the_last_epochs_and_averages_them():
    trainer = Trainer(tiny_model(), "ew", epochs=3, select="mean_last:2", **OPTIONS)
    test = TinyScenes(8, seed=2)
    result = trainer.fit(TinyScenes(16), eval_data=test)  # no validation split needed
    assert result.best_epoch == 3  # the last epoch's weights are kept
    first, second, third = result.history
    assert not any(key.startswith("eval/") for key in first)
    # what the last row records is the eval split's metrics of the final weights
    final = trainer.evaluate(test).metrics
    for task, values in final.items():
        for metric, value in values.items():
            assert third[f"eval/{task}/{metric}"] == pytest.approx(value, rel=1e-6)
    averaged = trainer.selection.averaged(result.history)
    assert averaged["seg"]["miou"] == pytest.approx((second["eval/seg/miou"] + third["eval/seg/miou"]) / 2)
    assert averaged["depth"]["abs_err"] == pytest.approx(
        (second["eval/depth/abs_err"] + third["eval/depth/abs_err"]) / 2
    )
    assert second["eval/depth/abs_err"] != third["eval/depth/abs_err"]  # two different epochs were averaged


def test_mean_last_needs_the_eval_split_and_a_valid_count():
    trainer = Trainer(tiny_model(), "ew", epochs=2, select="mean_last:2", **OPTIONS)
    with pytest.raises(ConfigError, match="needs eval_data"):
        trainer.fit(TinyScenes(16))
    for bad in ("mean_last:0", "mean_last:x", "mean_last:"):
        with pytest.raises(ConfigError, match="mean_last:N"):
            Selection(bad, {"d": Depth("d")})
    with pytest.raises(ValueError, match="from 1 to train.epochs"):
        TrainConfig(epochs=3, select="mean_last:5")


def test_delta_m_scores_an_epoch_by_validation_delta_m_against_the_experts():
    tasks = {"seg": Segmentation("seg", num_classes=3), "depth": Depth("depth")}
    selection = Selection("delta_m", tasks)
    result = EvalResult(
        metrics={
            "seg": {"miou": 0.6, "pixel_accuracy": 0.8},
            "depth": {"abs_err": 0.3, "rel_err": 0.2, "delta1": 0.5},
        },
        losses={"seg": 1.0, "depth": 1.0},
    )
    with pytest.raises(ConfigError, match="mtlvision baseline"):
        selection.score(result, 1)
    selection.baselines = {
        "seg": {"miou": 0.5, "pixel_accuracy": 0.8},
        "depth": {"abs_err": 0.6, "rel_err": 0.2, "delta1": 0.5},
    }
    # by hand: miou +20 % (better: -20), abs_err halved (better: -50), the rest unchanged; mean over 5 metrics
    assert selection.score(result, 1) == pytest.approx((-20.0 - 50.0) / 5)


def test_a_run_with_mean_last_reports_the_mean_of_the_history(tmp_path):
    from ..test_data_cli import write_folder

    config = write_folder(tmp_path / "data", corrupt=False, bad_label=False)
    (tmp_path / "data" / "splits" / "val.txt").write_text("")  # the protocol trains without validation
    args = ["train", str(config), "--set", "train.epochs=2", "train.select=mean_last:2", "train.progress=false"]
    assert main([*args, "--out", str(tmp_path / "runs"), "--name", "avg"]) == 0
    run = tmp_path / "runs" / "avg"
    report = json.loads((run / "metrics.json").read_text())
    assert "mean of the eval split's metrics over the last 2 epochs" in report["selection"]
    rows = list(csv.DictReader((run / "history.csv").open()))
    for task, values in report["metrics"].items():
        for metric, value in values.items():
            expected = sum(float(row[f"eval/{task}/{metric}"]) for row in rows) / 2
            assert value == pytest.approx(expected, rel=1e-6), (task, metric)


def test_a_run_selecting_by_delta_m_without_experts_is_refused_and_leaves_no_folder(tmp_path, capsys):
    from ..test_data_cli import write_folder

    config = write_folder(tmp_path / "data", corrupt=False, bad_label=False)
    runs = tmp_path / "runs"
    args = ["train", str(config), "--set", "train.epochs=1", "train.select=delta_m", "train.progress=false"]
    assert main([*args, "--out", str(runs)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "train.select=delta_m" in err and "mtlvision baseline" in err
    assert not runs.exists() or not any(runs.iterdir())


def libmtl_count_improvement(base, new, weight):
    """A transcription of LibMTL's ``count_improvement`` (``LibMTL/utils.py``): per task the mean over its
    metrics of (-1)^w (B - N) / B, w = 1 where higher is better; then the mean over tasks."""
    per_task = []
    for task in base:
        terms = [(-1) ** w * (b - n) / b for b, n, w in zip(base[task], new[task], weight[task])]
        per_task.append(sum(terms) / len(terms))
    return sum(per_task) / len(per_task)


def test_delta_m_first_is_libmtls_improvement_over_the_first_epoch():
    tasks = {"seg": Segmentation("seg", num_classes=3), "depth": Depth("depth")}
    selection = Selection("delta_m_first", tasks)
    first = {"seg": {"miou": 0.4, "pixel_accuracy": 0.7}, "depth": {"abs_err": 0.8, "rel_err": 0.3, "delta1": 0.4}}
    later = {"seg": {"miou": 0.5, "pixel_accuracy": 0.72}, "depth": {"abs_err": 0.6, "rel_err": 0.33, "delta1": 0.5}}
    losses = {"seg": 1.0, "depth": 1.0}
    assert selection.score(EvalResult(metrics=first, losses=losses), 1) == 0.0  # the first epoch is the base
    row = {f"val/{t}/{m}": v for t, values in first.items() for m, v in values.items()}
    score = selection.score(EvalResult(metrics=later, losses=losses), 2, history=[row])
    order = {"seg": ["miou", "pixel_accuracy"], "depth": ["abs_err", "rel_err", "delta1"]}
    weight = {"seg": [1, 1], "depth": [0, 0, 1]}
    improvement = libmtl_count_improvement(
        {t: [first[t][m] for m in ms] for t, ms in order.items()},
        {t: [later[t][m] for m in ms] for t, ms in order.items()},
        weight,
    )
    assert score == pytest.approx(-100.0 * improvement)  # lower is better: the improvement in percent, negated
    # tasks weigh equally, not metrics: differs from the flat mean over the five metrics here
    flat = (-25.0 - 100 * 0.02 / 0.7 - 25.0 + 10.0 - 25.0) / 5  # miou, pixel_accuracy, abs_err, rel_err, delta1
    assert score != pytest.approx(flat)
    zero = {**first, "depth": {**first["depth"], "delta1": 0.0}}
    row = {f"val/{t}/{m}": v for t, values in zero.items() for m, v in values.items()}
    with pytest.raises(MtlvisionError, match="train.select=delta_m_first.*delta1"):
        selection.score(EvalResult(metrics=later, losses=losses), 2, history=[row])


def test_delta_m_first_keeps_the_epoch_with_the_best_gain_over_the_first():
    trainer = Trainer(tiny_model(), "ew", epochs=3, select="delta_m_first", **OPTIONS)
    result = trainer.fit(TinyScenes(16), TinyScenes(8, seed=2))
    first, *rest = result.history
    assert first["score"] == 0.0
    scores = [row["score"] for row in result.history]
    assert result.best_epoch == 1 + scores.index(min(scores))
    for row in rest:  # each later score recomputed from the history by LibMTL's formula
        base, new = EpochSummary.metrics_of(first), EpochSummary.metrics_of(row)
        tasks = trainer.tasks
        weight = {t: [int(tasks[t].metric_directions[m]) for m in base[t]] for t in base}
        improvement = libmtl_count_improvement(
            {t: list(v.values()) for t, v in base.items()}, {t: [new[t][m] for m in base[t]] for t in base}, weight
        )
        assert row["score"] == pytest.approx(-100.0 * improvement, rel=1e-9, abs=1e-9)
