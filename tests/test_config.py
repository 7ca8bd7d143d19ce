import pytest

from mtlvision.config import load_config, parse_override, preset_names
from mtlvision.errors import ConfigError


def test_presets_ship_with_the_package_and_validate():
    names = preset_names()
    assert {"scenes", "multimnist"} <= set(names)
    for name in names:
        config = load_config(name)
        assert config.data.name


def test_default_preset_is_scenes():
    assert load_config(None).data.name == "scenes"


@pytest.mark.parametrize(
    ("item", "key", "value"),
    [
        ("train.lr=3e-4", "train.lr", 3e-4),
        ("train.epochs=5", "train.epochs", 5),
        ("tasks=[segmentation,depth]", "tasks", ["segmentation", "depth"]),
        ("model.backbone=resnet34", "model.backbone", "resnet34"),
        ("train.deterministic=true", "train.deterministic", True),
    ],
)
def test_override_values_parse_as_yaml(item, key, value):
    assert parse_override(item) == (key, value)


def test_overrides_reach_the_validated_config():
    config = load_config("scenes", ["tasks=[segmentation,depth]", "train.lr=3e-4", "balancer.name=pcgrad"])
    assert [t.name for t in config.tasks] == ["segmentation", "depth"]
    assert config.train.lr == pytest.approx(3e-4)
    assert config.balancer.name == "pcgrad"


def test_balancer_hyperparameters_sit_beside_its_name():
    config = load_config("scenes", {"balancer": {"name": "cagrad", "c": 0.2}})
    assert config.balancer.hparams == {"c": 0.2}


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.epochz=3", "train.epochz: unknown key"),
        ("train.optimizer=lbfgs", "train.optimizer: must be one of"),
        ("train.epochs=0", "train.epochs"),
        ("train.lr=-1", "train.lr"),
        ("train.device=tpu", "train.device"),
        ("tasks=[depth,depth]", "repeated: depth"),
        ("model.architecture={c: 1}", "model.architecture"),
    ],
)
def test_invalid_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match="Invalid configuration") as info:
        load_config("scenes", [override])
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("train.epochz=3", "train.epochz: unknown key (got 3); did you mean train.epochs?"),
        ("model.backbon=resnet34", "model.backbon: unknown key (got 'resnet34'); did you mean model.backbone?"),
        ("trian.epochs=3", "trian: unknown key (got {'epochs': 3}); did you mean train?"),
        ("train.zzz=1", "train.zzz: unknown key (got 1)"),
    ],
)
def test_an_unknown_key_close_to_a_known_one_gets_a_suggestion(override, line):
    with pytest.raises(ConfigError) as info:
        load_config("scenes", [override])
    assert f"  {line}" in str(info.value).splitlines()


def test_a_dataset_key_typo_is_matched_against_every_data_key():
    from mtlvision.engine.build import dataset_source

    for override, suggestion in (("data.skip_bda=true", "data.skip_bad"), ("data.image_sise=32", "data.image_size")):
        with pytest.raises(ConfigError, match=f"did you mean {suggestion}\\?"):
            dataset_source(load_config("scenes", [override]))


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("false", False), ("warn", "warn")])
def test_data_check_is_true_false_or_warn(value, expected):
    assert load_config("scenes", [f"data.check={value}"]).data.check == expected
    with pytest.raises(ConfigError, match="data.check"):
        load_config("scenes", ["data.check=sometimes"])


def test_malformed_yaml_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [epochs: 3\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config(bad)


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="Presets: .*scenes"):
        load_config("nopreset")


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.lr")


def test_override_into_a_scalar_is_refused():
    with pytest.raises(ConfigError, match="not a section"):
        load_config("scenes", ["seed.x=1"])


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.lr=.inf", "train.lr: Input should be a finite number"),
        ("train.lr=1e999", "train.lr: Input should be a finite number"),
        ("train.grad_clip=.nan", "train.grad_clip: Input should be a finite number"),
        ("distill.weights={count: .inf}", "distill.weights.count"),
        ("model.backbone_lr_scale=.inf", "model.backbone_lr_scale"),
        ("balancer.weights=[1, .inf]", "weights[1] must be a finite number"),
        ("data.augment={scale: [.nan, 1.0]}", "augment.scale[0] must be a finite number"),
    ],
)
def test_non_finite_numbers_are_refused_at_config_time(override, fragment):
    with pytest.raises(ConfigError, match="Invalid configuration") as info:
        load_config("scenes", [override])
    assert fragment in str(info.value)


def test_balancer_hyperparameters_are_checked_against_the_method():
    from mtlvision.balancers import BALANCERS
    from mtlvision.validation import check_annotated

    with pytest.raises(ConfigError, match="balancer.weights: 'str' instances are not allowed"):
        check_annotated(BALANCERS.get("fixed"), {"weights": "abc"}, "balancer")
    with pytest.raises(ConfigError, match="balancer.c: Input should be a finite number"):
        check_annotated(BALANCERS.get("cagrad"), {"c": float("inf")}, "balancer")
    assert check_annotated(BALANCERS.get("fixed"), {"weights": [1, 2]}, "balancer") == {"weights": [1.0, 2.0]}


def test_resume_accepts_only_the_keys_that_may_change():
    from mtlvision.run_settings import RESUME_KEYS, with_resume_overrides

    stored = load_config("scenes", ["train.epochs=2"])
    assert with_resume_overrides(stored, ["train.epochs=5", "train.progress=false"]).train.epochs == 5
    assert with_resume_overrides(stored, {"train.lr": stored.train.lr}) == stored  # restating a value is no change
    with pytest.raises(ConfigError) as info:
        with_resume_overrides(stored, ["train.lr=0.5", "model.backbone=resnet34", "train.epochs=4"])
    message = str(info.value)
    assert "train.lr (run 0.002, asked 0.5)" in message and "model.backbone" in message
    assert "train.epochs (" not in message and all(key in message for key in RESUME_KEYS)
