"""Merging rules on hand-made vectors, merging tiny experts into one model, BatchNorm recomputation, model.init."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from mtlvision.config import load_config
from mtlvision.engine.build import build_model, build_tasks, init_run, load_init_weights
from mtlvision.engine.merge import (
    MERGE_RULES,
    TaskArithmetic,
    Ties,
    WeightAverage,
    make_rule,
    merge_states,
    recompute_batch_norm,
)
from mtlvision.errors import CheckpointError, ConfigError
from mtlvision.models import MultiTaskModel
from mtlvision.models.backbones import Backbone, BackboneStage
from mtlvision.tasks import TASKS
from tests.engine.tinyrun import SIZE, tiny_backbone

matrices = st.integers(1, 4).flatmap(
    lambda t: st.integers(1, 12).flatmap(
        lambda p: st.lists(st.floats(-10, 10, width=32), min_size=t * p, max_size=t * p).map(
            lambda v: torch.tensor(v).view(t, p)
        )
    )
)


# ------------------------------------------------------------------------------------------------ rules
@given(matrices, st.randoms(use_true_random=False))
@settings(max_examples=40, deadline=None)
def test_average_is_symmetric_in_the_experts(experts: torch.Tensor, rng) -> None:
    order = list(range(experts.shape[0]))
    rng.shuffle(order)
    rule = WeightAverage()
    torch.testing.assert_close(rule(experts[order], None), rule(experts, None))
    torch.testing.assert_close(rule(experts, None), experts.double().mean(0).float())


@given(matrices)
@settings(max_examples=40, deadline=None)
def test_task_arithmetic_with_scale_zero_is_the_base_and_scale_one_sums_task_vectors(experts: torch.Tensor) -> None:
    base = experts.mean(0) * 0.5
    assert torch.equal(TaskArithmetic(scale=0.0)(experts, base), base)
    torch.testing.assert_close(TaskArithmetic(scale=1.0)(experts, base), base + (experts - base).sum(0))


def test_ties_trims_elects_sign_by_mass_and_takes_the_disjoint_mean() -> None:
    base = torch.tensor([1.0, -1.0, 0.0, 2.0, 0.5, 0.0])
    tau1 = torch.tensor([3.0, -1.0, 0.5, -4.0, 5.0, 0.2])  # top 3 by magnitude: 5, -4, 3
    tau2 = torch.tensor([-2.0, 2.0, 0.1, -1.0, 3.0, 0.3])  # top 3: 3, -2, 2
    merged = Ties(density=0.5, scale=1.0)(torch.stack([base + tau1, base + tau2]), base)
    # trimmed sums [1, 2, 0, -4, 8, 0] elect signs [+, +, 0, -, +, 0]; entries that agree are averaged
    expected = base + torch.tensor([3.0, 2.0, 0.0, -4.0, 4.0, 0.0])
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(
        Ties(density=0.5, scale=0.5)(torch.stack([base + tau1, base + tau2]), base), base + 0.5 * (expected - base)
    )


def test_ties_elects_the_sign_of_the_larger_mass_not_the_majority() -> None:
    base = torch.zeros(1)
    experts = torch.tensor([[1.0], [1.0], [-5.0]])  # two small positives against one large negative
    assert Ties(density=1.0)(experts, base).item() == -5.0


@given(matrices)
@settings(max_examples=30, deadline=None)
def test_every_rule_is_the_identity_on_one_expert(experts: torch.Tensor) -> None:
    one, base = experts[:1], experts[0] * 0.25
    torch.testing.assert_close(WeightAverage()(one, None), one[0])
    torch.testing.assert_close(TaskArithmetic(scale=1.0)(one, base), one[0])
    torch.testing.assert_close(Ties(density=1.0, scale=1.0)(one, base), one[0])


def test_rules_are_registered_and_bad_hyper_parameters_are_named() -> None:
    assert {"average", "task_arithmetic", "ties"} <= set(MERGE_RULES.names())
    assert make_rule("ties", {"density": 0.1}).density == 0.1
    with pytest.raises(ConfigError, match="density"):
        make_rule("ties", {"densty": 0.1})
    with pytest.raises(ConfigError, match="density must be in"):
        make_rule("ties", {"density": 0.0})
    with pytest.raises(ConfigError, match="Allowed: adamerging, average"):
        make_rule("no_such_rule")


# ------------------------------------------------------------------------------------- merging models
def _task(kind: str, name: str):
    return TASKS.get(kind)(name, num_classes=3)


def _expert(task, seed: int) -> MultiTaskModel:
    torch.manual_seed(seed)
    return MultiTaskModel(tiny_backbone, [task])


def _perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_merging_experts_with_identical_backbones_reproduces_each_expert_on_its_task() -> None:
    cls_expert, seg_expert = _expert(_task("classification", "cls"), 0), _expert(_task("segmentation", "seg"), 1)
    _perturb(cls_expert, 5)
    seg_expert.architecture.load_state_dict(cls_expert.architecture.state_dict())
    target = MultiTaskModel(tiny_backbone, [_task("classification", "cls"), _task("segmentation", "seg")])
    states = {"cls": cls_expert.state_dict(), "seg": seg_expert.state_dict()}
    for rule in (WeightAverage(), Ties(density=1.0)):
        state, report = merge_states(target, states, rule, base=cls_expert.state_dict())
        target.load_state_dict(state)
        images = torch.rand(4, 3, SIZE, SIZE)
        merged = target.eval()(images)
        torch.testing.assert_close(merged["cls"], cls_expert.eval()(images)["cls"])
        torch.testing.assert_close(merged["seg"], seg_expert.eval()(images)["seg"])
        assert report.merged and all(k.startswith("architecture.") for k in report.merged)
        assert {report.copied[k] for k in report.copied} == {"cls", "seg"}
        assert all(k.startswith(f"heads.{report.copied[k]}.") for k in report.copied)


def test_one_expert_merged_by_ties_from_its_init_gives_back_the_expert() -> None:
    expert = _expert(_task("classification", "cls"), 0)
    init = {k: v.clone() for k, v in expert.state_dict().items()}
    _perturb(expert, 3)
    target = MultiTaskModel(tiny_backbone, [_task("classification", "cls")])
    state, _ = merge_states(target, {"cls": expert.state_dict()}, Ties(density=1.0), base=init)
    target.load_state_dict(state)
    images = torch.rand(2, 3, SIZE, SIZE)
    torch.testing.assert_close(target(images)["cls"], expert(images)["cls"])


def test_averaging_two_different_backbones_gives_their_mean_and_keeps_each_head() -> None:
    a, b = _expert(_task("classification", "cls"), 0), _expert(TASKS.get("depth")("depth"), 1)
    target = MultiTaskModel(tiny_backbone, [_task("classification", "cls"), TASKS.get("depth")("depth")])
    state, _ = merge_states(target, {"cls": a.state_dict(), "depth": b.state_dict()}, WeightAverage())
    key = "architecture.backbone.stages.0.conv.weight"
    assert key in state
    torch.testing.assert_close(state[key], (a.state_dict()[key] + b.state_dict()[key]) / 2)
    head_keys = [k for k in state if k.startswith("heads.depth.")]
    assert head_keys
    for k in head_keys:
        assert torch.equal(state[k], b.state_dict()[k])


def _wide_backbone() -> Backbone:
    stages = [
        BackboneStage(0, OrderedDict(conv=nn.Conv2d(3, 12, 3, stride=2, padding=1), act=nn.ReLU())),
        BackboneStage(1, OrderedDict(conv=nn.Conv2d(12, 16, 3, stride=2, padding=1), act=nn.ReLU())),
    ]
    return Backbone("wide", stages, [12, 16], [2, 4], {})


def test_experts_with_incompatible_shapes_are_refused_with_the_tensor_named() -> None:
    a = _expert(_task("classification", "cls"), 0)
    torch.manual_seed(0)
    b = MultiTaskModel(_wide_backbone, [_task("segmentation", "seg")])
    target = MultiTaskModel(tiny_backbone, [_task("classification", "cls"), _task("segmentation", "seg")])
    with pytest.raises(ConfigError, match="stages.0.conv.weight.*different shapes"):
        merge_states(target, {"cls": a.state_dict(), "seg": b.state_dict()}, WeightAverage())


def test_task_arithmetic_without_a_base_is_refused() -> None:
    a, b = _expert(_task("classification", "cls"), 0), _expert(_task("segmentation", "seg"), 1)
    target = MultiTaskModel(tiny_backbone, [_task("classification", "cls"), _task("segmentation", "seg")])
    with pytest.raises(ConfigError, match="common initialisation"):
        merge_states(target, {"cls": a.state_dict(), "seg": b.state_dict()}, TaskArithmetic())


# ---------------------------------------------------------------------------------------- BatchNorm
def test_recompute_batch_norm_gives_the_exact_statistics_of_the_data() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[1].running_mean.fill_(7.0)
    batches = [torch.rand(5, 3, 8, 8) for _ in range(3)]
    recompute_batch_norm(model, iter(batches))
    with torch.no_grad():
        activations = torch.cat([model[0](b) for b in batches])
    mean = activations.mean(dim=(0, 2, 3))
    # update_bn averages the per-batch statistics (equal batch sizes: the mean is exact)
    torch.testing.assert_close(model[1].running_mean, mean, rtol=1e-5, atol=1e-5)
    per_batch_var = torch.stack([model[0](b).detach().var(dim=(0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(model[1].running_var, per_batch_var, rtol=1e-4, atol=1e-5)
    assert model[1].momentum == 0.1


# ---------------------------------------------------------------------------------------- model.init
def _scenes_config(tmp_path, **extra):
    overrides = {
        "data.image_size": 32,
        "data.train_size": 8,
        "data.val_size": 4,
        "data.test_size": 4,
        "tasks": ["count", "segmentation"],
        **extra,
    }
    return load_config("scenes", overrides)


def test_model_init_from_a_run_loads_matching_tensors_and_reports_the_rest(tmp_path) -> None:
    source_cfg = _scenes_config(tmp_path, tasks=["count"])
    torch.manual_seed(1)
    source = build_model(source_cfg, build_tasks(source_cfg))
    run = tmp_path / "source"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(run / "model.safetensors"))
    cfg = _scenes_config(tmp_path, **{"model.init": str(run)})
    assert init_run(cfg) == run
    torch.manual_seed(2)
    model = build_model(cfg, build_tasks(cfg))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert any(k.startswith("heads.segmentation.") for k in model.state_dict())
    result = load_init_weights(model, run / "model.safetensors")
    assert all(k.startswith("heads.segmentation.") for k in result["not_in_file"])
    assert result["not_in_file"] and not result["shape_differs"]


def test_model_init_from_a_local_safetensors_file(tmp_path) -> None:
    source_cfg = _scenes_config(tmp_path, tasks=["count"])
    torch.manual_seed(1)
    source = build_model(source_cfg, build_tasks(source_cfg))
    weights = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    cfg = _scenes_config(tmp_path, **{"model.init": str(weights)})
    assert init_run(cfg) == weights
    torch.manual_seed(2)
    model = build_model(cfg, build_tasks(cfg))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    (tmp_path / "start.pt").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="nor a local .safetensors file"):
        init_run(_scenes_config(tmp_path, **{"model.init": str(tmp_path / "start.pt")}))


def test_model_init_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(ConfigError, match="neither an initialisation scheme"):
        init_run(_scenes_config(tmp_path, **{"model.init": str(tmp_path / "nowhere")}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no model.safetensors"):
        init_run(_scenes_config(tmp_path, **{"model.init": str(tmp_path / "empty")}))
    save_file({"unrelated.weight": torch.zeros(2)}, str(tmp_path / "empty" / "model.safetensors"))
    cfg = _scenes_config(tmp_path, **{"model.init": str(tmp_path / "empty")})
    with pytest.raises(CheckpointError, match="no tensor .* matches"):
        build_model(cfg, build_tasks(cfg))
    assert init_run(_scenes_config(tmp_path, **{"model.init": "xavier"})) is None


def test_model_init_finds_backbone_stages_in_another_architecture(tmp_path) -> None:
    source_cfg = _scenes_config(tmp_path)
    torch.manual_seed(1)
    source = build_model(source_cfg, build_tasks(source_cfg))
    run = tmp_path / "hps"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(run / "model.safetensors"))
    cfg = _scenes_config(tmp_path, **{"model.init": str(run), "model.architecture": "mtan"})
    model = build_model(cfg, build_tasks(cfg))
    stage_keys = [k for k in model.state_dict() if k.startswith("architecture.stages.")]
    assert stage_keys
    for key in stage_keys:
        assert torch.equal(model.state_dict()[key], source.state_dict()["architecture.backbone." + key[13:]]), key
    assert any(k.startswith("architecture.attention") for k in model.state_dict())
