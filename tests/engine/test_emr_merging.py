"""EMR-merging: the elected vector, masks and rescalers on hand-made task vectors, the task-modulated model
(its weights, forward, compact storage), refusals of bad input."""

from __future__ import annotations

import pytest
import torch

from mtlvision.engine.checkpoint import load_weights, modulation_layout, save_weights
from mtlvision.engine.merge import make_rule, merge_states
from mtlvision.engine.merging.emr import EmrMerging, elect_mask_rescale
from mtlvision.errors import CheckpointError, ConfigError
from mtlvision.models import MultiTaskModel
from mtlvision.models.modulated import ModulationLayout, TaskModulatedModel, pack_bits, unpack_bits
from mtlvision.tasks import TASKS
from tests.engine.tinyrun import SIZE, tiny_backbone

# three experts' task vectors on a 4-entry weight and a 2-entry bias
TAU = {
    "w": torch.tensor([[2.0, -1.0, 0.5, -3.0], [-1.0, -2.0, 1.0, 1.0], [3.0, 1.0, -0.5, 1.0]]),
    "b": torch.tensor([[1.0, 0.0], [1.0, 0.0], [-4.0, 0.0]]),
}


def test_elect_mask_rescale_on_hand_made_task_vectors() -> None:
    result = elect_mask_rescale(TAU)
    # w: sums [4, -2, 1, -1] elect signs [+, -, +, -]; b: sums [-2, 0] elect [-, -] (a zero sum elects −1)
    # the unified magnitude is the largest |τ_t| among the experts that agree with the elected sign
    torch.testing.assert_close(result.unified["w"], torch.tensor([3.0, -2.0, 1.0, -3.0]))
    torch.testing.assert_close(result.unified["b"], torch.tensor([-4.0, 0.0]))
    masks_w = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    masks_b = torch.tensor([[0, 0], [0, 0], [1, 0]], dtype=torch.bool)
    assert torch.equal(result.masks["w"], masks_w) and torch.equal(result.masks["b"], masks_b)
    # λ_t = Σ_tensors mean|τ_t| / Σ_tensors mean|M_t ⊙ τ_uni| (the authors' code: per-tensor means summed)
    by_hand = torch.tensor(
        [(6.5 / 4 + 1 / 2) / (9 / 4), (5 / 4 + 1 / 2) / (3 / 4), (5.5 / 4 + 4 / 2) / (3 / 4 + 4 / 2)]
    )
    torch.testing.assert_close(result.rescalers, by_hand)
    # not the paper's whole-model sums, which weigh each tensor by its size
    assert not torch.allclose(result.rescalers[0], torch.tensor((6.5 + 1) / 9))
    # each expert's modulated vector, θ_0 + λ_t M_t ⊙ τ_uni
    base = {"w": torch.full((4,), 0.5), "b": torch.zeros(2)}
    weights = result.task_weights(base, 1)
    torch.testing.assert_close(weights["w"], 0.5 + by_hand[1] * torch.tensor([0.0, -2.0, 1.0, 0.0]))
    torch.testing.assert_close(weights["b"], torch.zeros(2))


def test_the_rule_works_on_task_vectors_and_is_deterministic() -> None:
    base = {"w": torch.randn(4, generator=torch.Generator().manual_seed(0)), "b": torch.ones(2)}
    experts = {k: base[k] + v for k, v in TAU.items()}
    first = EmrMerging().decompose(experts, base, ["a", "b", "c"])
    again = EmrMerging().decompose(experts, base, ["a", "b", "c"])
    assert torch.equal(first.rescalers, again.rescalers)
    for key in TAU:
        torch.testing.assert_close(first.unified[key], elect_mask_rescale(TAU).unified[key])
        assert torch.equal(first.unified[key], again.unified[key]) and torch.equal(first.masks[key], again.masks[key])


def test_bad_input_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="at least two experts"):
        EmrMerging().decompose({"w": TAU["w"][:1]}, {"w": torch.zeros(4)}, ["a"])
    with pytest.raises(ConfigError, match="expert\\(s\\) b agrees in sign with the elected vector nowhere"):
        elect_mask_rescale({"w": torch.tensor([[1.0, 2.0], [0.0, 0.0]])}, ["a", "b"])
    with pytest.raises(ConfigError, match="hyper-parameters: none"):
        make_rule("emr", {"density": 0.5})
    with pytest.raises(ConfigError, match="task-specific weights"):
        EmrMerging().merge(TAU, {k: torch.zeros(v.shape[1:]) for k, v in TAU.items()})


def test_masks_pack_eight_to_a_byte_and_unpack_exactly() -> None:
    mask = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5)  # 35 bits -> 5 bytes per group
    for g in range(3):
        assert torch.equal(unpack_bits(packed[g], (5, 7)), mask[g])


# ---------------------------------------------------------------------------------- the modulated model
def _tasks() -> list:
    return [TASKS.get("classification")("cls", num_classes=3), TASKS.get("segmentation")("seg", num_classes=3)]


def _experts() -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    start = MultiTaskModel(tiny_backbone, _tasks()).state_dict()
    experts = {}
    for i, task in enumerate(_tasks()):
        own = MultiTaskModel(tiny_backbone, [task]).state_dict()
        g = torch.Generator().manual_seed(i)
        experts[task.name] = {k: start[k] + 0.1 * torch.randn(v.shape, generator=g) for k, v in own.items()}
    return start, experts


def _modulated() -> tuple[TaskModulatedModel, dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], object]:
    start, experts = _experts()
    target = MultiTaskModel(tiny_backbone, _tasks())
    state, report = merge_states(target, experts, make_rule("emr"), base=start)
    assert report.modulation is not None
    layout = ModulationLayout("emr", (("cls",), ("seg",)), tuple(report.modulation.unified))
    model = TaskModulatedModel(tiny_backbone, _tasks(), layout=layout)
    model.load_state_dict(state, strict=False)
    model.set_modulation(report.modulation.unified, report.modulation.masks, report.modulation.rescalers)
    return model.eval(), start, experts, report.modulation


def test_each_tasks_backbone_is_the_start_plus_its_rescaled_masked_unified_vector() -> None:
    model, start, experts, modulation = _modulated()
    names = list(model.layout.modulated)
    assert names and all(n.startswith("architecture.") for n in names)
    tau = {n: torch.stack([experts[t][n] - start[n] for t in ("cls", "seg")]) for n in names}
    by_hand = elect_mask_rescale(tau)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        predictions = model(images)
    for g, task in enumerate(("cls", "seg")):
        state = model.group_state(g)
        for n in names:
            expected = start[n] + by_hand.rescalers[g] * by_hand.masks[n][g] * by_hand.unified[n]
            torch.testing.assert_close(state[n], expected)
        plain = MultiTaskModel(tiny_backbone, _tasks())
        plain.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(predictions[task], plain.eval()(images)[task])
    # heads are the experts' own, untouched by the modulation
    head = next(k for k in experts["seg"] if k.startswith("heads.seg."))
    assert torch.equal(model.state_dict()[head], experts["seg"][head])


def test_the_compact_weights_round_trip_and_a_plain_model_refuses_them(tmp_path) -> None:
    model, *_ = _modulated()
    path = tmp_path / "model.safetensors"
    save_weights(model, path)
    layout = modulation_layout(path)
    assert layout == model.layout
    again = TaskModulatedModel(tiny_backbone, _tasks(), layout=layout).eval()
    load_weights(again, path)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first, second = model(images), again(images)
    for task in first:
        assert torch.equal(first[task], second[task])
    # the masks are stored packed, one bit per entry and task
    masks = [v for k, v in again.state_dict().items() if k.startswith("modulation.mask_")]
    assert all(m.dtype == torch.uint8 for m in masks)
    size = sum(p.numel() for n, p in again.named_parameters() if n in layout.modulated)
    assert sum(m.numel() for m in masks) == sum(
        -(-p.numel() // 8) * 2 for n, p in again.named_parameters() if n in layout.modulated
    )
    assert again.storage()["unified_vector"] == size and again.storage()["forwards_per_batch"] == 2
    with pytest.raises(CheckpointError, match="task-specific merged backbone"):
        load_weights(MultiTaskModel(tiny_backbone, _tasks()), path)
    with pytest.raises(ConfigError, match="no single shared representation"):
        again.encode(images)


def test_experts_of_other_architectures_are_refused_with_the_tensor_named() -> None:
    start, experts = _experts()
    target = MultiTaskModel(tiny_backbone, _tasks())
    experts["seg"]["architecture.backbone.stages.0.conv.weight"] = torch.zeros(4, 3, 3, 3)
    with pytest.raises(ConfigError, match="different shapes"):
        merge_states(target, experts, make_rule("emr"), base=start)
    with pytest.raises(ConfigError, match="common initialisation"):
        merge_states(target, _experts()[1], make_rule("emr"))
    with pytest.raises(ConfigError, match="at least two experts"):
        merge_states(MultiTaskModel(tiny_backbone, _tasks()[:1]), {"cls": experts["cls"]}, make_rule("emr"), start)


@pytest.mark.slow  # importing FusionBench takes several seconds (it brings transformers)
def test_the_elected_vector_masks_and_rescalers_match_fusion_bench() -> None:
    from fusion_bench.method.emr_merging.utils import emr_merge

    g = torch.Generator().manual_seed(4)
    tau = {"a.weight": torch.randn(3, 6, 5, generator=g), "a.bias": torch.randn(3, 6, generator=g)}
    tau["a.bias"][:, 0] = 0.0  # a zero sum: both elect −1
    ours = elect_mask_rescale(tau)
    unified, masks, rescalers = emr_merge([{k: v[t] for k, v in tau.items()} for t in range(3)])
    torch.testing.assert_close(ours.rescalers, rescalers.float())
    for key in tau:
        torch.testing.assert_close(ours.unified[key], unified[key].float())
        assert torch.equal(ours.masks[key], torch.stack(masks[key]))
