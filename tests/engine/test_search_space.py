"""The search space of ``tune``: validation with one clear message naming the key, and conditional drawing."""

import pytest

optuna = pytest.importorskip("optuna")

from mtlvision.config import load_raw  # noqa: E402
from mtlvision.engine.search_space import DEFAULT_SPACE, SearchSpace  # noqa: E402
from mtlvision.errors import ConfigError  # noqa: E402


@pytest.mark.parametrize("preset", ["scenes", "multimnist"])
def test_default_space_is_valid_for_the_presets(preset):
    space = SearchSpace.load(None)
    space.check(load_raw(preset))
    assert space.keys == list(DEFAULT_SPACE)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"trian.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}, ["trian.lr", "did you mean train"]),
        ({"train.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}}, ["train.lrr", "did you mean train.lr"]),
        ({"balancer.name": {"type": "categorical", "choices": []}}, ["balancer.name", "non-empty list of choices"]),
        ({"train.lr": {"type": "float", "low": 1.0, "high": 0.1}}, ["train.lr", "low (1) is greater than high (0.1)"]),
        ({"train.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, ["train.lr", "log=true needs low > 0"]),
        ({"train.lr": {"type": "flot", "low": 0.1, "high": 1}}, ["train.lr.type", "categorical"]),
        ({"train.epochs": {"type": "int", "low": 1.5, "high": 3}}, ["train.epochs", "whole numbers"]),
        ({"train.epochs": {"type": "categorical", "choices": ["many"]}}, ["train.epochs", "valid integer"]),
        ({"train.lr": {"type": "float", "high": 0.1}}, ["train.lr", "needs low and high"]),
        ({"train.lr": 0.1}, ["train.lr", "must be a mapping"]),
        ({"balancer.name": {"type": "categorical", "choices": ["ew", "pcgard"]}}, ["balancer.name", "pcgrad"]),
        ({"model.architecture": {"type": "categorical", "choices": ["hps", "mtann"]}}, ["model.architecture", "mtan"]),
        (
            {
                "balancer.name": {"type": "categorical", "choices": ["cagrad"]},
                "balancer.cc": {"type": "float", "low": 0.1, "high": 0.5, "when": {"balancer.name": "cagrad"}},
            },
            ["balancer.cc", "did you mean balancer.c"],
        ),
    ],
)
def test_a_bad_space_gets_one_message_naming_the_key(entry, expected):
    with pytest.raises(ConfigError) as info:
        SearchSpace.from_mapping(entry, "space.yaml").check(load_raw("scenes"))
    message = str(info.value)
    assert "space.yaml" in message
    for part in expected:
        assert part in message


def test_a_missing_or_empty_space_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        SearchSpace.load(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="holds no parameters"):
        SearchSpace.load(tmp_path / "empty.yaml")


def test_conditional_parameters_are_drawn_only_when_their_condition_holds():
    space = SearchSpace.from_mapping(DEFAULT_SPACE, "default")
    base = {"balancer.name": "ew"}
    # FixedTrial raises for any parameter it was not given: a conditional one drawn by mistake fails here
    common = {
        "model.architecture": "hps",
        "train.lr": 1e-3,
        "train.weight_decay": 1e-4,
        "data.augment.color_jitter": 0.1,
    }
    drawn = space.sample(optuna.trial.FixedTrial({"balancer.name": "cagrad", "balancer.c": 0.3, **common}), base)
    assert drawn == {"balancer.name": "cagrad", "balancer.c": 0.3, **common}
    drawn = space.sample(optuna.trial.FixedTrial({"balancer.name": "pcgrad", **common}), base)
    assert drawn == {"balancer.name": "pcgrad", **common}
    # a condition on a key the space does not draw reads the configuration's own value
    only = SearchSpace.from_mapping(
        {"balancer.c": {"type": "float", "low": 0, "high": 1, "when": {"balancer.name": "cagrad"}}}, "x"
    )
    assert only.sample(optuna.trial.FixedTrial({}), {"balancer.name": "ew"}) == {}
    assert only.sample(optuna.trial.FixedTrial({"balancer.c": 0.5}), {"balancer.name": "cagrad"}) == {"balancer.c": 0.5}


def test_int_log_and_step_ranges_reach_optuna_as_written():
    space = SearchSpace.from_mapping(
        {
            "train.batch_size": {"type": "int", "low": 16, "high": 64, "step": 16},
            "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        },
        "x",
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        drawn = space.sample(trial, {})
        assert drawn["train.batch_size"] in (16, 32, 48, 64)
        assert 1e-4 <= drawn["train.lr"] <= 1e-2
        study.tell(trial, 0.0)
    distributions = study.trials[0].distributions
    assert distributions["train.lr"].log and distributions["train.batch_size"].step == 16


def test_the_cli_prints_one_paragraph_for_a_bad_space(tmp_path, capsys):
    from mtlvision.cli import main

    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {type: float, low: 0.1, high: 0.01}\n")
    assert main(["tune", "scenes", "--space", str(space), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train.lr: low (0.1) is greater than high (0.01)" in " ".join(err.split())
    assert "Traceback" not in err and not (tmp_path / "tune-scenes").exists()  # nothing written
