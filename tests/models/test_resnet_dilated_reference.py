"""ResNet-50 (dilated, output stride 8) with DeepLabV3 heads against facts of LibMTL's NYUv2 network.

``fixtures/resnet_dilated_reference.json`` holds only facts measured on LibMTL 1.1.5's
``resnet_dilated('resnet50')`` encoder with one ``DeepLabHead(2048, C)`` per task (``examples/nyu/aspp.py``)
and the bilinear ``align_corners=True`` upsampling of ``examples/nyu/main.py``, run outside this project: the
names and shapes of the state dict (``encoder.*``, ``decoders.<task>.*``), parameter counts per module, and
summaries of the outputs, of the losses of ``examples/nyu/utils.py`` and of its metrics (two batches: the
batch, then its first sample alone), for seeded weights and a seeded 2 x 3 x 32 x 64 batch. Weights and batch
follow the rules of :mod:`tests.models.test_segnet_reference` (``reference_weights``, ``reference_batch``).
The training-mode outputs were taken after ``torch.manual_seed(2)`` (ASPP's dropout).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mtlvision.models import MultiTaskModel
from mtlvision.tasks import Depth, Normals, Segmentation
from tests.models.test_segnet_reference import SAMPLES, count, reference_batch, reference_weights

FACTS = json.loads((Path(__file__).parent / "fixtures" / "resnet_dilated_reference.json").read_text())
#: LibMTL's task names -> ours
TASKS = {"segmentation": "segmentation", "depth": "depth", "normal": "normals"}
SIZE = (32, 64)


def our_key(reference_key: str) -> str:
    """Where a reference state-dict entry lives in our model."""
    top, _, rest = reference_key.partition(".")
    if top == "decoders":
        task, _, rest = rest.partition(".")
        return f"heads.{TASKS[task]}.decode.{rest}"
    source = {v: k for k, v in MODEL.architecture.backbone.source_keys.items()}
    return f"architecture.backbone.{source[rest]}"


def build(reduction: str = "pixel") -> MultiTaskModel:
    tasks = [
        Segmentation("segmentation", num_classes=13, ignore_index=-1, reduction=reduction),
        Depth("depth", reduction=reduction),
        Normals("normals", reduction=reduction),
    ]
    return MultiTaskModel(
        "resnet50_dilated",
        tasks,
        heads=dict.fromkeys(TASKS.values(), "deeplabv3"),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )


MODEL = build()


def assert_summary(output: torch.Tensor, expected: dict[str, Any], tolerance: float = 1e-5) -> None:
    """Shape, sums (to ``tolerance`` of the sum of magnitudes) and sampled values (to ``tolerance`` of the root
    mean square) equal to the reference:
    this network's activations reach the hundreds (seeded weights, no training), where float32 sums in another
    order (another thread count) move the fourth decimal; in training mode the batch-norm statistics of a
    two-image batch amplify that (``tolerance`` 1e-3 there)."""
    assert list(output.shape) == expected["shape"]
    flat = output.detach().double().flatten()
    for name, value in (("sum", flat.sum()), ("abs_sum", flat.abs().sum()), ("sq_sum", (flat**2).sum())):
        assert float(value) == pytest.approx(expected[name], rel=tolerance, abs=tolerance * expected["abs_sum"]), name
    samples = [float(flat[i % flat.numel()]) for i in SAMPLES]
    scale = (expected["sq_sum"] / flat.numel()) ** 0.5
    assert samples == pytest.approx(expected["samples"], rel=tolerance, abs=tolerance * scale)


@pytest.fixture(scope="module")
def loaded() -> MultiTaskModel:
    own = MODEL.state_dict()
    state = {}
    for key, value in reference_weights(FACTS["state_dict"]).items():
        target = our_key(key)
        assert own[target].shape == value.shape, key
        state[target] = value
    missing = {k for k in own if not k.endswith("num_batches_tracked")} - set(state)
    assert not missing, f"our model has tensors the reference lacks: {sorted(missing)[:5]}"
    MODEL.load_state_dict(state, strict=False)
    return MODEL


def test_parameter_counts_and_state_dict_equal_the_reference() -> None:
    facts = FACTS["parameters_by_module"]
    backbone = MODEL.architecture.backbone
    assert count(backbone.parameters()) == facts["encoder"]
    for index, stage in enumerate(("layer1", "layer2", "layer3", "layer4"), start=1):
        assert count(backbone.stages[index].parameters()) == facts[f"encoder.{stage}"], stage
    assert count(backbone.stages[0].parameters()) == facts["encoder.conv1"] + facts["encoder.bn1"]
    for reference, ours in TASKS.items():
        assert count(MODEL.heads[ours].parameters()) == facts[f"decoders.{reference}"], ours
        assert count(MODEL.heads[ours].decode[0].parameters()) == facts[f"decoders.{reference}.aspp"], ours
    assert count(MODEL.parameters()) == FACTS["parameters"]
    mapped = {our_key(k): tuple(s) for k, s in FACTS["state_dict"]}
    assert mapped == {k: tuple(v.shape) for k, v in MODEL.state_dict().items()}


def test_outputs_losses_and_metrics_equal_the_reference(loaded: MultiTaskModel) -> None:
    batch = reference_batch()
    for mode in ("eval", "train"):  # eval first: a training-mode pass updates the running statistics
        torch.manual_seed(2)
        with torch.no_grad():
            features = loaded.train(mode == "train").encode(batch["image"])
            out = {t: loaded.heads[t](features, SIZE) for t in TASKS.values()}  # raw: before normals are normalised
        expected = FACTS[mode]
        tolerance = 1e-5 if mode == "eval" else 1e-3
        assert_summary(features[-1], expected["representation"], tolerance)
        for reference, ours in TASKS.items():
            assert_summary(out[ours], expected[reference], tolerance)
        if mode == "train":
            continue
        tasks = dict(loaded.tasks)
        valid = torch.ones(2, dtype=torch.bool)
        for reference, ours in TASKS.items():
            loss = tasks[ours].loss(out[ours], batch[ours], valid)
            assert float(loss) == pytest.approx(FACTS["losses"][reference], rel=1e-5), ours
        # LibMTL's metrics over two batches: the batch, then its first sample alone
        metrics = {}
        for ours, task in tasks.items():
            metric = task.metric()
            prediction = task.postprocess(out[ours]) if ours == "normals" else out[ours]
            metric.update(prediction, batch[ours], valid)
            metric.update(prediction[:1], batch[ours][:1], valid[:1])
            metrics[ours] = metric.compute()
        seg, depth, normal = (FACTS["metrics"][k] for k in ("segmentation", "depth", "normal"))
        assert [metrics["segmentation"]["miou"], metrics["segmentation"]["pixel_accuracy"]] == pytest.approx(seg)
        assert [metrics["depth"]["abs_err"], metrics["depth"]["rel_err"]] == pytest.approx(depth, rel=1e-5)
        ours_normal = metrics["normals"]
        assert ours_normal["mean_angle"] == pytest.approx(normal[0], abs=1e-3)
        assert ours_normal["median_angle"] == pytest.approx(normal[1], abs=2e-3)  # histogram: within 0.001°
        shares = [ours_normal[k] / 100 for k in ("within_11_25", "within_22_5", "within_30")]
        assert shares == pytest.approx(normal[2:], abs=1e-9)
