"""Sharing architectures: shapes over backbone families, the papers' properties, parameter sharing, errors."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from mtlvision.errors import ConfigError
from mtlvision.models.architectures import RepresentationUnavailable
from mtlvision.models.architectures._gates import ExpertLevel, GatedExperts, mix
from mtlvision.models.architectures.cgc import CGC
from mtlvision.models.architectures.cross_stitch import CrossStitch
from mtlvision.models.architectures.dselect_k import DSelectK, DSelectKGate, smooth_step
from mtlvision.models.architectures.mmoe import MMoE
from mtlvision.models.architectures.mtan import MTAN
from mtlvision.models.architectures.padnet import PADNet
from mtlvision.models.architectures.ple import PLE
from mtlvision.models.architectures.registry import ARCHITECTURES
from mtlvision.models.backbones import create_backbone

TASKS = ["seg", "depth", "cls"]


class TinyBackbone(nn.Module):
    """A four-stage conv backbone double: channels 4, 8, 8, 16 at strides 2, 4, 8, 16."""

    def __init__(self, num_stages: int = 4) -> None:
        super().__init__()
        widths = [3, 4, 8, 8, 16][: num_stages + 1]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in zip(widths, widths[1:])
        )
        self.feature_channels = widths[1:]
        self.feature_strides = [2 ** (i + 1) for i in range(num_stages)]

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def small_specs() -> dict[str, object]:
    """Every architecture of this module, with few experts so that the backbone matrix stays fast."""
    return {
        "cross_stitch": CrossStitch(),
        "mtan": MTAN(),
        "mmoe": MMoE(num_experts=2),
        "cgc": CGC(),
        "ple": PLE(),
        "dselect_k": DSelectK(num_experts=3, k=2),
        "padnet": PADNet(width=8),
    }


@pytest.fixture(scope="module")
def prototypes() -> dict[str, nn.Module]:
    return {}


def factory_of(prototypes: dict[str, nn.Module], name: str) -> Callable[[], nn.Module]:
    """Fresh backbones as deep copies of one prototype per family (creating a timm model is the slow part)."""
    if name not in prototypes:
        torch.manual_seed(0)
        prototypes[name] = create_backbone(name)
    return lambda: copy.deepcopy(prototypes[name])


def tiny_factory(num_stages: int = 4) -> Callable[[], nn.Module]:
    return lambda: TinyBackbone(num_stages)


def check_forward_backward(architecture: nn.Module, backbone: nn.Module, images: Tensor) -> None:
    """Every task gets the backbone's feature layout; one backward reaches every parameter."""
    expected = [tuple(f.shape) for f in backbone(images)]
    assert architecture.feature_channels == list(backbone.feature_channels)
    assert architecture.feature_strides == list(backbone.feature_strides)
    features = architecture(images)
    assert list(features) == TASKS
    for name, maps in features.items():
        assert [tuple(f.shape) for f in maps] == expected, name
        assert all(torch.isfinite(f).all() for f in maps)
    sum(f.square().mean() for maps in features.values() for f in maps).backward()
    unreached = [n for n, p in architecture.named_parameters() if p.grad is None]
    assert not unreached, f"parameters outside the computation: {unreached[:5]}"


FAST_FAMILIES = ["mobilenetv3_small_050", "regnetx_002", "convnext_atto"]


@pytest.mark.parametrize("family", FAST_FAMILIES)
@pytest.mark.parametrize("architecture", list(small_specs()))
def test_every_architecture_runs_on_backbone_families(prototypes, family: str, architecture: str) -> None:
    factory = factory_of(prototypes, family)
    built = small_specs()[architecture].build(factory, TASKS)
    check_forward_backward(built, factory().eval(), torch.randn(2, 3, 32, 32))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["resnet18", "efficientnet_b0", "tv/resnet18"])
@pytest.mark.parametrize("architecture", list(small_specs()))
def test_every_architecture_runs_on_heavier_backbones(prototypes, family: str, architecture: str) -> None:
    factory = factory_of(prototypes, family)
    built = small_specs()[architecture].build(factory, TASKS)
    check_forward_backward(built, factory().eval(), torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("name", ["cross_stitch", "mtan", "mmoe", "cgc", "ple", "dselect_k", "padnet"])
def test_registered_with_description_and_citation(name: str) -> None:
    entry = ARCHITECTURES.entry(name)
    assert entry.description and entry.citation
    spec = entry.obj()
    assert spec.describe()["name"] == name
    built = spec.build(tiny_factory(), TASKS)
    check_forward_backward(built, TinyBackbone().eval(), torch.randn(2, 3, 32, 32))


def test_whole_model_heads_consume_every_architecture() -> None:
    """Through MultiTaskModel: dense and image-level heads take every architecture's features, and the
    model's shared / task-specific split partitions its parameters."""
    from mtlvision.models.multitask import MultiTaskModel
    from mtlvision.tasks.classification import Classification
    from mtlvision.tasks.depth import Depth
    from mtlvision.tasks.segmentation import Segmentation

    tasks = [Segmentation("seg", num_classes=3), Depth("depth"), Classification("cls", num_classes=4)]
    images = torch.rand(2, 3, 32, 32)
    specs = [CrossStitch(), MTAN(), MMoE(num_experts=2), CGC(), PLE(), DSelectK(), PADNet(dense_tasks=("seg", "depth"))]
    for spec in specs:
        model = MultiTaskModel(backbone=tiny_factory(), tasks=tasks, architecture=spec)
        out = model(images)
        assert out["seg"].shape == (2, 3, 32, 32), spec.name
        assert out["depth"].shape[-2:] == (32, 32), spec.name
        assert out["cls"].shape == (2, 4), spec.name
        shared = {id(p) for p in model.shared_parameters()}
        specific = {id(p) for p in model.task_specific_parameters()}
        assert shared and not shared & specific
        assert shared | specific == {id(p) for p in model.parameters()}


# ------------------------------------------------------------------------------- shared parameters
def reachable_parameters(output: Tensor) -> set[int]:
    """Ids of the leaf parameters in ``output``'s autograd graph (structural, whatever their values)."""
    seen, found, stack = set(), set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


SHARING_CASES = {
    "cross_stitch": CrossStitch(),
    "mtan": MTAN(),
    "mmoe": MMoE(num_experts=3),
    "mmoe_on_stem": MMoE(num_experts=2, shared_stages=1),
    "cgc": CGC(task_experts=2, shared_experts=1),
    "ple_2": PLE(num_levels=2),
    "ple_3_on_stem": PLE(num_levels=3, shared_stages=1),
    "ple_4": PLE(num_levels=4, task_experts=2, shared_experts=2),
    "dselect_k": DSelectK(num_experts=4, k=2),
    "padnet": PADNet(width=4),
    "padnet_two_dense": PADNet(width=4, dense_tasks=("seg", "depth")),
}


@pytest.mark.parametrize("case", list(SHARING_CASES))
def test_shared_parameters_are_exactly_those_several_tasks_depend_on(case: str) -> None:
    architecture = SHARING_CASES[case].build(tiny_factory(), TASKS)
    features = architecture(torch.randn(2, 3, 32, 32))
    reach = [reachable_parameters(sum(f.sum() for f in maps)) for maps in features.values()]
    several = {p for p in set().union(*reach) if sum(p in r for r in reach) >= 2}
    shared = [id(p) for p in architecture.shared_parameters()]
    assert len(shared) == len(set(shared)), "a parameter is listed twice"
    all_ids = {id(p) for p in architecture.parameters()}
    assert set(shared) <= all_ids
    assert set(shared) == several
    specific = all_ids - set(shared)
    assert all(sum(p in r for r in reach) == 1 for p in specific), "a task-specific parameter serves no task"


# -------------------------------------------------------------------------------------- cross-stitch
def test_cross_stitch_with_identity_units_is_independent_networks() -> None:
    torch.manual_seed(1)
    architecture = CrossStitch(alpha=1.0, beta=0.0).build(tiny_factory(), TASKS).eval()
    images = torch.randn(2, 3, 32, 32)
    features = architecture(images)
    for name, column in zip(TASKS, architecture.columns):
        independent = TinyBackbone().eval()
        independent.stages.load_state_dict(column.state_dict())
        for mine, theirs in zip(features[name], independent(images)):
            torch.testing.assert_close(mine, theirs)
    assert not torch.allclose(features["seg"][-1], features["depth"][-1]), "columns must start different"
    features["seg"][-1].sum().backward()
    for name, column in zip(TASKS[1:], architecture.columns[1:]):
        assert all(p.grad is None or not p.grad.any() for p in column.parameters()), name


def test_cross_stitch_units_mix_columns_with_the_paper_initialisation() -> None:
    architecture = CrossStitch().build(tiny_factory(), ["a", "b"])
    unit = architecture.units[0]
    assert unit.shape == (2, 2, 4)
    torch.testing.assert_close(unit[:, :, 0], torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    three = CrossStitch(per_channel=False).build(tiny_factory(), TASKS).units[2]
    assert three.shape == (3, 3, 1)
    torch.testing.assert_close(three.sum(dim=1), torch.ones(3, 1))
    images = torch.randn(2, 3, 32, 32)
    architecture.eval()
    first = [column[0](images) for column in architecture.columns]
    torch.testing.assert_close(architecture(images)["b"][0], 0.1 * first[0] + 0.9 * first[1])


# ---------------------------------------------------------------------------------------------- MTAN
def test_mtan_masks_lie_in_unit_interval_and_weight_the_shared_features() -> None:
    architecture = MTAN().build(tiny_factory(), TASKS).eval()
    images = 50 * torch.randn(2, 3, 32, 32)
    shared = architecture.encode(images)
    features, masks = architecture.attend(shared)
    for name in TASKS:
        for feature, mask, base in zip(features[name], masks[name], shared):
            assert mask.shape == base.shape
            assert mask.min() >= 0 and mask.max() <= 1
            torch.testing.assert_close(feature, mask * base)
    assert masks["seg"][1].std() > 0
    for name, maps in architecture(images).items():
        for mine, expected in zip(maps, features[name]):
            torch.testing.assert_close(mine, expected)


def test_mtan_chains_attention_across_stages() -> None:
    """The mask at stage 2 depends on the task's attended feature at stage 1, not only on shared features."""
    architecture = MTAN().build(tiny_factory(), TASKS).eval()
    shared = architecture.encode(torch.randn(2, 3, 32, 32))
    _, masks = architecture.attend(shared)
    with torch.no_grad():
        for p in architecture.attention[0][0].parameters():
            p.add_(torch.randn_like(p))
    _, changed = architecture.attend(shared)
    assert not torch.allclose(masks["seg"][1], changed["seg"][1])
    torch.testing.assert_close(masks["depth"][1], changed["depth"][1])


# ------------------------------------------------------------------------------------- gated experts
@pytest.mark.parametrize(
    "spec", [MMoE(num_experts=3), CGC(task_experts=2), PLE(num_levels=3), DSelectK(num_experts=5, k=2)]
)
def test_gates_are_distributions_and_features_their_mixtures(spec) -> None:
    architecture: GatedExperts = spec.build(tiny_factory(), TASKS).eval()
    images = torch.randn(4, 3, 32, 32)
    level: ExpertLevel = architecture.levels[0]
    task_weights, shared_weights = level.gate_weights([images] * 3, images)
    for per_stage in task_weights:
        for weights in per_stage:
            assert weights.shape == (4, len(level.task_experts[0]) + len(level.shared_experts))
            assert (weights >= 0).all()
            torch.testing.assert_close(weights.sum(-1), torch.ones(4))
    if shared_weights is not None:
        assert shared_weights.shape == (4, 3 * len(level.task_experts[0]) + len(level.shared_experts))
        torch.testing.assert_close(shared_weights.sum(-1), torch.ones(4))
    first = architecture(images)["depth"][0]
    experts = [e[0](images) for e in [*level.task_experts[1], *level.shared_experts]]
    weights = task_weights[1][0]
    manual = sum(weights[:, i, None, None, None] * expert for i, expert in enumerate(experts))
    torch.testing.assert_close(first, manual)


def test_mix_is_a_per_sample_weighted_sum() -> None:
    weights = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    outputs = [torch.ones(2, 1, 2, 2), 3 * torch.ones(2, 1, 2, 2)]
    mixed = mix(weights, torch.stack(outputs))
    torch.testing.assert_close(mixed[0], torch.ones(1, 2, 2))
    torch.testing.assert_close(mixed[1], 2.5 * torch.ones(1, 2, 2))


def test_ple_levels_split_stages_and_feed_the_shared_gate() -> None:
    architecture = PLE(num_levels=2, shared_stages=1).build(tiny_factory(), TASKS)
    assert len(architecture.trunk) == 1
    assert [level.num_stages for level in architecture.levels] == [2, 1]
    assert architecture.levels[0].shared_gate is not None and architecture.levels[1].shared_gate is None
    features = architecture(torch.randn(2, 3, 32, 32))
    assert all(maps[0] is features["seg"][0] for maps in features.values()), "the trunk stage is shared as is"


def test_mmoe_experts_on_a_shared_stem_copy_only_the_later_stages() -> None:
    architecture = MMoE(num_experts=3, shared_stages=1).build(tiny_factory(), TASKS)
    assert all(len(expert) == 3 for expert in architecture.levels[0].shared_experts)
    full = MMoE(num_experts=3).build(tiny_factory(), TASKS)
    assert all(len(expert) == 4 for expert in full.levels[0].shared_experts)


# ---------------------------------------------------------------------------------------- DSelect-k
@settings(max_examples=60, deadline=None)
@given(x=st.floats(-3, 3), gamma=st.floats(0.1, 5))
def test_smooth_step_is_a_c1_step_symmetric_about_zero(x: float, gamma: float) -> None:
    value = float(smooth_step(torch.tensor(x, dtype=torch.float64), gamma))
    assert 0.0 <= value <= 1.0
    assert value + float(smooth_step(torch.tensor(-x, dtype=torch.float64), gamma)) == pytest.approx(1.0)
    if abs(x) >= gamma / 2:
        assert value == (1.0 if x > 0 else 0.0)


def test_smooth_step_pinned_values_and_flat_ends() -> None:
    gamma = 2.0
    points = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    values = smooth_step(points, gamma)
    cubic = -2 / gamma**3 * points.detach() ** 3 + 3 / (2 * gamma) * points.detach() + 0.5
    torch.testing.assert_close(values.detach(), cubic)
    (slope,) = torch.autograd.grad(values.sum(), points)
    assert slope[0] == pytest.approx(0.0) and slope[-1] == pytest.approx(0.0)
    assert slope[2] == pytest.approx(3 / (2 * gamma))


@settings(max_examples=40, deadline=None)
@given(num_experts=st.integers(2, 9), data=st.data())
def test_dselect_k_weights_sum_to_one_and_saturate_to_at_most_k_experts(num_experts: int, data) -> None:
    k = data.draw(st.integers(1, num_experts))
    gate = DSelectKGate(in_features=5, num_experts=num_experts, k=k, gamma=1.0)
    x = torch.randn(3, 5)
    weights = gate(x)
    assert weights.shape == (3, num_experts) and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    bits = gate.codes.shape[1]
    signs = torch.tensor(data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=k * bits, max_size=k * bits)))
    with torch.no_grad():
        gate.selector_logits.weight.zero_()
        gate.selector_logits.bias.copy_(signs)
    selectors = gate.selectors(x)
    assert ((selectors == 0) | (selectors == 1)).all(), "saturated selectors pick one expert each"
    chosen = {int(i) for i in selectors[0].argmax(-1)}
    for i, row in enumerate(signs.view(k, bits)):
        code = sum(int(bit > 0) << b for b, bit in enumerate(row.tolist()))
        assert int(selectors[0, i].argmax()) == code % num_experts
    weights = gate(x)
    assert int((weights[0] > 0).sum()) <= k
    assert {int(i) for i in torch.nonzero(weights[0]).flatten()} <= chosen
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))


def test_dselect_k_selector_matches_a_numpy_product_over_bits() -> None:
    gate = DSelectKGate(in_features=2, num_experts=4, k=1, gamma=1.0)
    with torch.no_grad():
        gate.selector_logits.weight.zero_()
        gate.selector_logits.bias.copy_(torch.tensor([0.1, -0.3]))
    s = [float(smooth_step(torch.tensor(v), 1.0)) for v in (0.1, -0.3)]
    expected = np.array([(1 - s[0]) * (1 - s[1]), s[0] * (1 - s[1]), (1 - s[0]) * s[1], s[0] * s[1]])
    np.testing.assert_allclose(gate(torch.zeros(1, 2))[0].detach().numpy(), expected, rtol=1e-6)


# -------------------------------------------------------------------------------------------- PAD-Net
def test_padnet_leaves_image_level_tasks_the_shared_features_and_distils_the_dense_ones() -> None:
    architecture = PADNet(width=4, dense_tasks=("seg", "depth")).build(tiny_factory(), TASKS).eval()
    images = torch.randn(2, 3, 32, 32)
    shared = architecture.encode(images)[-4:]  # after 4 scales x 2 tasks' intermediate features: the backbone's
    assert len(architecture.encode(images)) == 4 * 2 + 4
    features = architecture(images)
    for mine, base in zip(features["cls"], shared, strict=True):
        torch.testing.assert_close(mine, base)
    assert not torch.allclose(features["seg"][0], shared[0])
    assert not torch.allclose(features["seg"][0], features["depth"][0])


def test_padnet_messages_carry_other_tasks_information() -> None:
    """Changing depth's intermediate branch changes segmentation's distilled features."""
    architecture = PADNet(width=4, dense_tasks=("seg", "depth")).build(tiny_factory(), TASKS).eval()
    images = torch.randn(2, 3, 32, 32)
    before = architecture(images)
    with torch.no_grad():
        for p in architecture.scales[1].branches[1].parameters():
            p.add_(torch.randn_like(p))
    after = architecture(images)
    assert not torch.allclose(before["seg"][1], after["seg"][1])
    torch.testing.assert_close(before["seg"][0], after["seg"][0])


# --------------------------------------------------------------------------------- representations
@pytest.mark.parametrize("spec", [MTAN(), PADNet(width=4)])
def test_encode_then_decode_equals_forward(spec) -> None:
    architecture = spec.build(tiny_factory(), TASKS).eval()
    images = torch.randn(2, 3, 32, 32)
    decoded = architecture.decode(architecture.encode(images))
    for name, maps in architecture(images).items():
        for a, b in zip(maps, decoded[name]):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("spec", [CrossStitch(), MMoE(num_experts=2), CGC(), PLE(), DSelectK()])
def test_architectures_without_one_shared_representation_say_so(spec) -> None:
    architecture = spec.build(tiny_factory(), TASKS)
    with pytest.raises(RepresentationUnavailable, match=f"{spec.name}.*no single shared representation.*mode=params"):
        architecture.encode(torch.randn(1, 3, 32, 32))


# ------------------------------------------------------------------------------------------- errors
class NoStages(nn.Module):
    feature_channels = [4]
    feature_strides = [2]


@pytest.mark.parametrize("spec", list(small_specs().values()))
def test_backbone_without_stages_is_a_clear_error(spec) -> None:
    with pytest.raises(ConfigError, match="stages"):
        spec.build(NoStages, TASKS)


@pytest.mark.parametrize(
    ("spec", "stages", "why"),
    [
        (CrossStitch(), 1, "between stages"),
        (MTAN(), 1, "stage to stage"),
        (PLE(num_levels=3), 2, "3 expert level"),
        (MMoE(shared_stages=2), 2, "2 shared stage"),
    ],
)
def test_too_shallow_backbone_is_a_clear_error(spec, stages: int, why: str) -> None:
    with pytest.raises(ConfigError, match=f"at least .* stages .*{why}"):
        spec.build(tiny_factory(stages), TASKS)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DSelectK(num_experts=4, k=5), "k=5 must not exceed num_experts=4"),
        (lambda: DSelectK(gamma=0.0), "gamma"),
        (lambda: MMoE(num_experts=0), "num_experts=0"),
        (lambda: MMoE(num_experts=2.5), "num_experts=2.5 must be an integer"),
        (lambda: CGC(shared_experts=0), "shared_experts=0"),
        (lambda: PLE(num_levels=0), "num_levels=0"),
        (lambda: CrossStitch(alpha=1.5), "alpha"),
        (lambda: PADNet(dense_tasks=("seg",)).build(tiny_factory(), TASKS), "at least two"),
        (lambda: PADNet(dense_tasks=("seg", "edges")).build(tiny_factory(), TASKS), "edges"),
    ],
)
def test_bad_hyper_parameters_are_clear_errors(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()
