"""The run folder under faults and repetition: resume (of runs and of `baseline`), what a finished run keeps,
failed starts, the folder lock, atomic folder creation, Δm settings warnings, and hostile files in it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mtlvision as mv
from mtlvision.cli import main
from mtlvision.config import load_config
from mtlvision.engine.run_lock import RunFolderBusy, run_folder_lock
from mtlvision.engine.runs import Baselines, Expert, delta_m_against, new_run_dir, read_config
from mtlvision.errors import ConfigError
from mtlvision.run_settings import comparable_settings
from mtlvision.tasks import TASKS

from .test_cli import TINY

FILES = ("config.yaml", "metrics.json", "history.csv", "model.safetensors")


def _snapshot(run: Path) -> dict[str, tuple[int, bytes]]:
    return {name: ((run / name).stat().st_mtime_ns, (run / name).read_bytes()) for name in FILES}


# ------------------------------------------------------------------------------------------- no training
def test_two_processes_creating_one_name_get_two_folders(tmp_path):
    barrier = threading.Barrier(8)

    def make(_: int) -> Path:
        barrier.wait()
        return new_run_dir(tmp_path / "runs", "joint")

    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(make, range(8)))
    assert sorted(p.name for p in made) == sorted(["joint"] + [f"joint-{i}" for i in range(2, 9)])


def test_a_locked_run_folder_is_refused_and_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"half written")
    (tmp_path / "keep.txt").write_text("mine")
    with run_folder_lock(tmp_path):
        assert not (tmp_path / ".checkpoint.pt.abc123.tmp").exists() and (tmp_path / "keep.txt").exists()
        with pytest.raises(RunFolderBusy, match=rf"in use by another mtlvision process \(pid {os.getpid()}\)"):
            with run_folder_lock(tmp_path):
                pass
    with run_folder_lock(tmp_path):  # released with the holder
        pass
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("text", ["train: {epochs: 3\n", "!!python/object/apply:os.system ['true']\n", "- a\n"])
def test_a_config_yaml_that_is_not_a_configuration_is_one_paragraph(tmp_path, capsys, text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match="config.yaml"):
        read_config(run)
    for args in (["eval", str(run)], ["predict", str(run), str(tmp_path)], ["train", "--resume", str(run)]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "config.yaml" in " ".join(err.split()) and "Traceback" not in err


def test_baselines_of_other_data_name_the_differing_keys(tmp_path):
    config = load_config("scenes", TINY)
    path = tmp_path / "baselines.json"
    other = {**config.data.dataset_params, "image_size": 64}
    Baselines(path=path, data=other).save()
    result = delta_m_against(path, config, [], {}, "test")
    assert result["delta_m"] is None
    assert "data.image_size (run 32, experts 64)" in result["delta_m_note"] and "{" not in result["delta_m_note"]


def test_delta_m_warns_naming_the_settings_the_experts_did_not_share(tmp_path):
    experts = load_config("scenes", [*TINY, "tasks=[count]"])
    joint = load_config("scenes", [*TINY, "train.epochs=3", "train.lr=0.01", "balancer.name=pcgrad", "seed=4"])
    count = TASKS.get("classification")("count", num_classes=4)
    metrics = {"count": {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5}}
    path = tmp_path / "baselines.json"
    Baselines(
        path=path,
        data=experts.data.dataset_params,
        experts={
            "count": Expert(
                run=str(tmp_path / "count"), metrics={"test": metrics["count"]}, settings=comparable_settings(experts)
            ),
        },
    ).save()
    result = delta_m_against(path, joint, [count], metrics, "test")
    assert result["delta_m"]["overall"] == pytest.approx(0.0)
    warning = result["delta_m_warning"]
    assert "train.epochs (run 3, expert 1) [count]" in warning and "train.lr (run 0.01, expert 0.002)" in warning
    assert "balancer" not in warning and "seed" not in warning and "tasks" not in warning
    same = load_config("scenes", [*TINY, "balancer.name=pcgrad"])
    assert delta_m_against(path, same, [count], metrics, "test").get("delta_m_warning") is None


@pytest.mark.parametrize("override", ["balancer.name=nope", "train.select=count.nope"])
def test_a_failed_start_leaves_no_run_folder(tmp_path, capsys, override):
    out = tmp_path / "runs"
    assert main(["train", "scenes", "--set", *TINY, override, "--out", str(out)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_a_failure_in_the_first_epoch_removes_the_new_folder(tmp_path, monkeypatch):
    from mtlvision.engine.trainer import Trainer

    def broken(self, batches):
        raise RuntimeError("boom")

    monkeypatch.setattr(Trainer, "train_step", broken)
    with pytest.raises(RuntimeError, match="boom"):
        mv.train("scenes", TINY, out=tmp_path / "runs")
    assert not any((tmp_path / "runs").iterdir())


def test_bad_balancer_weights_and_a_huge_dataset_are_one_paragraph(tmp_path, capsys, monkeypatch):
    args = ["train", "scenes", "--set", *TINY, "balancer.name=fixed", "balancer.weights=abc", "--out", str(tmp_path)]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "balancer.weights" in err and "'<' not supported" not in err

    from mtlvision.data.datasets import DATASETS

    def too_big(params, split):
        raise MemoryError

    monkeypatch.setattr(DATASETS.get("scenes"), "build", classmethod(lambda cls, params, split: too_big(params, split)))
    # (a size scenes can never render is refused at config time: tests/data/test_scenes.py)
    assert main(["train", "scenes", "--set", *TINY, "data.train_size=100000", "--out", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "not enough memory" in err and "data.train_size=100000" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "scenes", "--set", *TINY, "--out", str(out), "--name", "done"]) == 0
    return out / "done"


def test_a_finished_run_keeps_what_inference_needs_with_ordinary_modes(finished):
    assert not (finished / "checkpoint.pt").exists() and not (finished / ".lock").exists()
    assert not list(finished.glob(".*.tmp"))
    mode = 0o666 & ~_umask()
    for name in FILES:
        assert (finished / name).stat().st_mode & 0o777 == mode, name
    assert "best validation loss" in json.loads((finished / "metrics.json").read_text())["selection"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_resuming_a_finished_run_says_so_and_changes_nothing(finished, capsys):
    before = _snapshot(finished)
    capsys.readouterr()
    assert main(["train", "--resume", str(finished)]) == 0
    assert "has finished" in " ".join(capsys.readouterr().err.split())
    assert _snapshot(finished) == before
    assert main(["train", "--resume", str(finished), "--set", "train.epochs=2"]) == 2
    assert "train.keep_checkpoint" in " ".join(capsys.readouterr().err.split())
    assert main(["train", "--resume", str(finished), "--set", "train.lr=0.5", "data.image_size=64"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "train.lr (run 0.002, asked 0.5)" in err and "data.image_size" in err
    assert _snapshot(finished) == before


def test_resume_refuses_a_folder_another_process_trains_in(finished, capsys):
    with run_folder_lock(finished):
        assert main(["train", "--resume", str(finished), "--set", "train.epochs=2"]) == 2
    assert "in use by another mtlvision process" in " ".join(capsys.readouterr().err.split())


def test_weights_of_the_wrong_dtype_or_not_finite_are_refused_by_every_reader(finished, tmp_path, capsys):
    image = tmp_path / "image.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    for corruption in ("int8", "nan"):
        run = tmp_path / corruption
        shutil.copytree(finished, run)
        state = load_file(str(run / "model.safetensors"))
        state = {
            k: (v.to(torch.int8) if corruption == "int8" else torch.full_like(v, float("nan")))
            if v.is_floating_point()
            else v
            for k, v in state.items()
        }
        save_file(state, str(run / "model.safetensors"))
        for args in (
            ["eval", str(run)],
            ["predict", str(run), str(image), "--out", str(tmp_path / "p")],
            ["merge", str(run), "--out", str(tmp_path / f"m-{corruption}")],
            ["train", "scenes", "--set", *TINY, f"model.init={run}", "--out", str(tmp_path / "r")],
        ):
            assert main(args) == 2, args
            err = " ".join(capsys.readouterr().err.split())
            assert ("wrong kind of dtype" if corruption == "int8" else "infinite or NaN") in err, args
            assert "Traceback" not in err
    assert not (tmp_path / "p").exists() or not list((tmp_path / "p").glob("*.json"))


def test_merge_with_a_truncated_expert_is_one_paragraph(finished, tmp_path, capsys):
    run = tmp_path / "broken"
    shutil.copytree(finished, run)
    (run / "model.safetensors").write_bytes(b"\xff" * 16)
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "not a readable safetensors file" in err and "Traceback" not in err


def test_extending_a_run_that_kept_its_checkpoint(tmp_path, capsys):
    run = mv.train("scenes", [*TINY, "train.keep_checkpoint=true"], out=tmp_path, name="kept")
    assert (run.path / "checkpoint.pt").is_file()
    printed = capsys.readouterr().out
    assert "epoch 1/1" in printed and "best so far" in printed and "segmentation" in printed
    (run.path / ".checkpoint.pt.xyz.tmp").write_bytes(b"left by a killed process")
    extended = mv.train(resume=run.path, overrides={"train.epochs": 2})
    assert extended.report.best_epoch in (1, 2) and read_config(run.path).train.epochs == 2
    assert len((run.path / "history.csv").read_text().splitlines()) == 3
    assert not (run.path / ".checkpoint.pt.xyz.tmp").exists()
    with pytest.raises(ConfigError, match="train.lr"):
        mv.train(resume=run.path, overrides={"train.lr": 1.0})


# --------------------------------------------------------------------------------------------- baselines
BASELINE = ["baseline", "scenes", "--set", *TINY, "train.epochs=2"]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> tuple[Path, Path]:
    """`baseline` stopped in the segmentation expert's second epoch (the path of a SIGTERM), and a copy of it."""
    from mtlvision.engine.trainer import Trainer

    out = tmp_path_factory.mktemp("experts")
    original = Trainer._epoch_end

    def interrupt(self, row, val):
        original(self, row, val)
        if list(self.tasks) == ["segmentation"] and self.state.epoch == 1:
            self.stop.signal = signal.SIGTERM  # as the handler does: a checkpoint at the next step, then stop

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_epoch_end", interrupt)
        assert main([*BASELINE, "--out", str(out)]) == 2
    folder = out / "baseline-scenes"
    stored = json.loads((folder / "baselines.json").read_text())
    assert set(stored["experts"]) == {"count"} and (folder / "segmentation" / "checkpoint.pt").is_file()
    copy = tmp_path_factory.mktemp("copy") / "baseline-scenes"
    shutil.copytree(folder, copy)
    return folder, copy


def test_baseline_again_keeps_finished_experts_resumes_the_interrupted_one(interrupted, capsys):
    folder = interrupted[0]
    count_files = _snapshot(folder / "count")
    assert main([*BASELINE, "--out", str(folder.parent)]) == 0
    assert _snapshot(folder / "count") == count_files  # the finished expert was kept, not retrained
    err = " ".join(capsys.readouterr().err.split())
    assert "Expert count: kept" in err and "Expert segmentation: resuming" in err
    stored = json.loads((folder / "baselines.json").read_text())
    assert set(stored["experts"]) == {"count", "segmentation"}
    assert stored["experts"]["segmentation"]["settings"]["train.epochs"] == 2
    assert len((folder / "segmentation" / "history.csv").read_text().splitlines()) == 3
    assert not (folder / "segmentation" / "checkpoint.pt").exists()

    # a joint run whose settings differ from its experts': Δm with a warning naming them, on the console too
    capsys.readouterr()
    args = ["train", "scenes", "--set", *TINY, "train.lr=0.01", "--out", str(folder.parent), "--name", "joint"]
    assert main(args) == 0
    printed = " ".join(capsys.readouterr().out.split())
    report = json.loads((folder.parent / "joint" / "metrics.json").read_text())
    assert report["delta_m"] is not None and "train.lr (run 0.01, expert 0.002)" in report["delta_m_warning"]
    assert "train.epochs (run 1, expert 2)" in report["delta_m_warning"]
    assert "warning:" in printed and "train.lr" in printed and "Δm (val)" in printed


def test_train_resume_of_an_expert_records_it_in_its_own_baselines(interrupted):
    copy = interrupted[1]
    run = mv.train(resume=copy / "segmentation")
    stored = json.loads((copy / "baselines.json").read_text())
    assert set(stored["experts"]) == {"count", "segmentation"}
    assert stored["experts"]["segmentation"]["run"] == str(copy / "segmentation")
    note = run.report.delta_m_note or ""  # measured against the folder's own baselines.json, not a doubled path
    assert str(copy / "baselines.json") in note and "baseline-scenes/baseline-scenes" not in note
    report = mv.evaluate(copy / "segmentation")
    assert report.delta_m is not None and report.delta_m["overall"] == pytest.approx(0.0)


def test_predict_writes_no_nan_into_json(tmp_path):
    from mtlvision.engine.predict import _jsonable

    record = _jsonable({"score": float("nan"), "scores": [np.float32("inf"), 0.5]}, tmp_path / "a", "t")
    assert json.loads(json.dumps(record, allow_nan=False)) == {"score": None, "scores": [None, 0.5]}


def test_an_empty_validation_split_is_an_error_unless_the_last_epoch_is_selected(tmp_path, capsys):
    from .test_data_cli import write_folder

    config = write_folder(tmp_path / "data", corrupt=False, bad_label=False)
    (tmp_path / "data" / "splits" / "val.txt").write_text("")
    args = ["train", str(config), "--set", "train.epochs=1", "train.progress=false", "--out", str(tmp_path / "runs")]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the val split of dataset 'folder' is empty" in err and "train.select=last" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert main([*args[:-2], "train.select=last", "--out", str(tmp_path / "runs"), "--name", "last"]) == 0
    report = json.loads((tmp_path / "runs" / "last" / "metrics.json").read_text())
    assert report["selection"] == "the last epoch (train.select=last; no validation split)"
    assert report["best_epoch"] == 1 and "val_metrics" not in report


def test_an_empty_settings_mapping_is_no_difference_of_its_own():
    from mtlvision.api import config
    from mtlvision.run_settings import differences

    tuned = config("scenes", {"data.augment": {"color_jitter": 0.1}})
    plain = config("scenes", {"data.augment": {}})
    lines = differences(comparable_settings(tuned), comparable_settings(plain), ("run", "expert"))
    assert lines == ["data.augment.color_jitter (run 0.1, expert unset)"]
