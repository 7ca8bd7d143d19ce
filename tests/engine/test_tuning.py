"""``tune``: trials are run folders scored on val; experts once; failures recorded; kill and resume; workers.

The studies that train experts, several trials or worker processes take about a minute of CPU each: marked slow.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

import mtlvision as mv  # noqa: E402
from mtlvision.cli import main  # noqa: E402
from mtlvision.errors import MtlvisionError  # noqa: E402

TINY = {
    "data.image_size": 32,
    "data.train_size": 16,
    "data.val_size": 8,
    "data.test_size": 8,
    "train.epochs": 1,
    "train.batch_size": 8,
    "train.device": "cpu",
    "train.progress": False,
    "tasks": ["count", "segmentation"],
}
SPACE = {
    "balancer.name": {"type": "categorical", "choices": ["ew", "cagrad"]},
    "balancer.c": {"type": "float", "low": 0.1, "high": 0.9, "when": {"balancer.name": "cagrad"}},
    "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
}
SRC = str(Path(mv.__file__).resolve().parents[1])


def _rows(study_dir: Path) -> list[dict[str, str]]:
    with (study_dir / "trials.csv").open() as handle:
        return list(csv.DictReader(handle))


def _relative_change(value, base, higher):
    return (-1 if higher else 1) * (value - base) / base * 100


@pytest.fixture(scope="module")
def delta_study(tmp_path_factory):
    """A delta_m study of two trials, its experts trained by the study itself (shared by the tests below)."""
    return mv.tune("scenes", TINY, space=SPACE, trials=2, out=tmp_path_factory.mktemp("tune"), seed=0)


@pytest.mark.slow
def test_delta_m_study_scores_each_trial_against_the_experts_on_val(delta_study):
    result = delta_study
    assert result.study_dir.name == "tune-scenes" and len(result.trials) == 2
    assert result.baselines == (result.study_dir / "baseline" / "baselines.json").resolve()
    experts = json.loads(result.baselines.read_text())["experts"]
    assert set(experts) == {"count", "segmentation"}
    directions = {
        "count": {"accuracy": True, "precision": True, "recall": True, "f1": True},
        "segmentation": {"miou": True, "pixel_accuracy": True},
    }
    for trial in result.trials:
        assert trial.state == "COMPLETE" and trial.epochs == 1
        report = json.loads((Path(trial.run) / "metrics.json").read_text())
        terms = [
            _relative_change(report["val_metrics"][task][metric], experts[task]["metrics"]["val"][metric], higher)
            for task, metrics in directions.items()
            for metric, higher in metrics.items()
        ]
        assert trial.values == pytest.approx([sum(terms) / len(terms)])  # Δm% over the K metrics, on val
        config = yaml.safe_load((Path(trial.run) / "config.yaml").read_text())
        assert config["balancer"]["name"] == trial.params["balancer.name"]
        assert config["train"]["lr"] == pytest.approx(trial.params["train.lr"])
    best = min(result.trials, key=lambda t: t.values[0])
    assert result.best_trial == best.number and result.best_values == best.values
    assert [r["state"] for r in _rows(result.study_dir)] == ["COMPLETE", "COMPLETE"]
    assert (result.study_dir / "plots" / "history.png").is_file()
    assert result.importances_note is None and set(result.importances["delta_m"]) <= set(SPACE)
    assert result.budget() == "2 trials × up to 1 epochs (2 epochs trained in all)"


@pytest.mark.slow
def test_best_yaml_is_a_configuration_train_accepts(delta_study, tmp_path):
    best = next(t for t in delta_study.trials if t.number == delta_study.best_trial)
    assert main(["train", str(delta_study.best_config), "--out", str(tmp_path), "--name", "best"]) == 0
    retrained = mv.Run.load(tmp_path / "best")
    assert retrained.config.balancer.name == best.params["balancer.name"]
    assert retrained.config.train.lr == pytest.approx(best.params["train.lr"])
    assert retrained.report.delta_m is not None  # measured against the study's experts


@pytest.mark.slow
def test_pareto_reuses_given_experts_with_one_objective_per_task(delta_study, tmp_path):
    experts = delta_study.baselines
    result = mv.tune("scenes", TINY, space=SPACE, trials=2, objective="pareto", out=tmp_path, baselines=experts)
    assert not (result.study_dir / "baseline").exists()
    assert result.names == ["delta_m.count", "delta_m.segmentation"]
    assert result.pareto and result.best_trial in result.pareto
    stored = json.loads(experts.read_text())["experts"]
    for trial in result.trials:
        val = json.loads((Path(trial.run) / "metrics.json").read_text())["val_metrics"]
        count = [
            _relative_change(val["count"][m], stored["count"]["metrics"]["val"][m], True)
            for m in ("accuracy", "precision", "recall", "f1")
        ]
        assert trial.values[0] == pytest.approx(sum(count) / 4)
    assert (result.study_dir / "plots" / "pareto.png").is_file()


def test_a_failing_trial_is_recorded_with_its_reason_and_the_study_goes_on(tmp_path):
    # gradient methods refuse gradient accumulation: every trial fails when it builds its trainer
    space = {"balancer.name": {"type": "categorical", "choices": ["pcgrad"]}}
    result = mv.tune(
        "scenes", {**TINY, "train.accumulate": 2}, space=space, trials=2, objective="count.accuracy", out=tmp_path
    )
    assert [t.state for t in result.trials] == ["FAIL", "FAIL"]
    assert all("train.accumulate=2" in (t.reason or "") for t in result.trials)
    assert result.best_trial is None and result.best_config is None
    assert "at least two completed" in (result.importances_note or "")


def test_a_diverging_trial_is_pruned_with_its_reason(tmp_path):
    space = {"train.lr": {"type": "categorical", "choices": [1.0e30]}}
    result = mv.tune(
        "scenes", {**TINY, "train.max_nonfinite": 1}, space=space, trials=1, objective="count.accuracy", out=tmp_path
    )
    assert result.trials[0].state == "PRUNED"
    assert result.trials[0].reason.startswith("diverged")


def test_a_study_started_with_other_settings_is_refused(tmp_path):
    space = {"train.lr": {"type": "float", "low": 1e-3, "high": 2e-3}}
    mv.tune("scenes", TINY, space=space, trials=1, objective="count.accuracy", out=tmp_path)
    with pytest.raises(MtlvisionError, match="other settings .*objective"):
        mv.tune("scenes", TINY, space=space, trials=1, objective="count.f1", out=tmp_path)


def test_a_bad_objective_lists_the_choices(tmp_path):
    with pytest.raises(MtlvisionError, match="count.accuracy"):
        mv.tune("scenes", TINY, space=SPACE, trials=1, objective="count.acuracy", out=tmp_path)


ONE_TASK = {**TINY, "tasks": ["count"]}


def _tune_command(out: Path, *extra: str) -> list[str]:
    sets = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in ONE_TASK.items()]
    return [sys.executable, "-m", "mtlvision", "tune", "scenes", "--set", *sets, "--objective", "count.accuracy",
            "--out", str(out), *extra]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_a_killed_study_resumes_and_loses_no_finished_trial(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}))
    command = _tune_command(tmp_path, "--space", str(space), "--trials", "4")
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    storage = f"sqlite:///{tmp_path / 'tune-scenes' / 'study.db'}"
    deadline, before = time.monotonic() + 240, []
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(1)
        try:
            trials = optuna.load_study(study_name="tune-scenes", storage=storage).trials
        except (KeyError, Exception):  # the storage is not created yet
            continue
        before = [(t.number, t.value) for t in trials if t.state.name == "COMPLETE"]
        if before:
            break
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert before, "the study finished no trial before the deadline"
    result = mv.tune("scenes", ONE_TASK, space=space, trials=4, objective="count.accuracy", out=tmp_path)
    after = {t.number: t for t in result.trials}
    for number, value in before:  # every trial finished before the kill is there, unchanged
        assert after[number].state == "COMPLETE" and after[number].values == [value]
    finished = [t for t in result.trials if t.state in ("COMPLETE", "PRUNED", "FAIL")]
    assert len(finished) == 4
    assert len(_rows(result.study_dir)) == len(result.trials)


@pytest.mark.slow
def test_two_workers_share_one_study_on_a_journal_file(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}))
    journal = tmp_path / "journal.log"
    command = _tune_command(tmp_path, "--space", str(space), "--trials", "6", "--storage", f"journal:{journal}")
    workers = [
        subprocess.Popen([*command, "--seed", str(seed)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for seed in (0, 1)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=400)
        assert worker.returncode == 0, err.decode()[-2000:]
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    studies = optuna.get_all_study_names(storage)
    assert studies == ["tune-scenes"]
    trials = optuna.load_study(study_name="tune-scenes", storage=storage).trials
    # six finished trials (the median pruner may stop some), or one more per worker that was mid-trial then
    assert 6 <= len([t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]) <= 7
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers ran trials of the one study
    assert len({t.user_attrs["run"] for t in trials}) == len(trials)  # each trial its own run folder


def test_objective_directions_follow_the_tasks_metrics():
    from mtlvision.engine.tuning import Objective

    tasks = mv.build_tasks("scenes", {"tasks": ["count", "depth"]})
    assert Objective.parse("count.accuracy", tasks).directions == ("maximize",)
    depth_metric = next(m for m, higher in tasks[1].metric_directions.items() if not higher)
    assert Objective.parse(f"depth.{depth_metric}", tasks).directions == ("minimize",)
    pareto = Objective.parse("pareto", tasks)
    assert pareto.names == ("delta_m.count", "delta_m.depth") and pareto.directions == ("minimize", "minimize")
    with pytest.raises(MtlvisionError, match="at least two tasks"):
        Objective.parse("pareto", tasks[:1])


def test_an_interrupted_trial_stops_the_study_and_does_not_count(tmp_path, monkeypatch):
    from mtlvision.engine import tuning
    from mtlvision.engine.loop_state import TrainingInterrupted

    def interrupted(self):
        raise TrainingInterrupted("SIGINT received; a checkpoint was saved")

    monkeypatch.setattr(tuning.TrainingRun, "execute", interrupted)
    space = {"train.lr": {"type": "float", "low": 1e-3, "high": 2e-3}}
    with pytest.raises(TrainingInterrupted):
        mv.tune("scenes", TINY, space=space, trials=3, objective="count.accuracy", out=tmp_path)
    rows = _rows(tmp_path / "tune-scenes")  # the outputs so far are written before stopping
    assert [r["state"] for r in rows] == ["FAIL"] and rows[0]["reason"].startswith("interrupted")
    storage = f"sqlite:///{tmp_path / 'tune-scenes' / 'study.db'}"
    assert tuning.finished_trials(optuna.load_study(study_name="tune-scenes", storage=storage)) == 0
