"""SegNet-MTAN and SegNet split against facts of the MTAN authors' reference networks.

``fixtures/segnet_reference.json`` holds only facts measured on lorenmt/mtan's ``model_segnet_mtan.py`` and
``model_segnet_split.py`` (run outside this project): the names and shapes of their state dicts in order,
parameter counts per module, and summaries of their outputs, losses and metrics for seeded weights and a
seeded batch. The weights come from :func:`reference_weights`, the same rule the facts were made with: one
generator seeded 0, drawing for every reference key in order (``num_batches_tracked`` skipped) -

- ``running_var``: ``0.5 + U[0, 1)``;
- 4-D convolution weights: ``N(0, 1) * sqrt(2 / fan_in)``;
- other ``weight`` (batch-norm scale): ``1 + 0.1 N(0, 1)``;
- everything else (biases, running means, ``logsigma``): ``0.1 N(0, 1)``.

The batch: a generator seeded 1 draws the image ``U[0, 1)`` of shape [2, 3, 32, 64], then depth
``U[0, 1) + 0.5`` [2, 1, 32, 64], normals ``normalize(N(0, 1))`` [2, 3, 32, 64], labels ``randint(0, 13)``
[2, 32, 64]; then invalid regions are set: depth rows 0-7 (both samples) and 8-15 (sample 1) to 0, the
last four normal rows to 0, label rows 0-3 (both) and 4-9 (sample 0) to -1.

Reference keys map to ours by :func:`our_key`. ``logsigma`` (uncertainty weighting's log-variances) lives
in the ``uncertainty`` balancer here, not in the network.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mtlvision.errors import ConfigError
from mtlvision.models import MultiTaskModel
from mtlvision.models.architectures import MTAN, SegNetMTAN
from mtlvision.tasks import Depth, Normals, Segmentation

FACTS = json.loads((Path(__file__).parent / "fixtures" / "segnet_reference.json").read_text())
TASKS = ("segmentation", "depth", "normals")
SAMPLES = [0, 1, 17, 4242, 9999, 20000, 33333, 45000]


def our_key(reference_key: str) -> str | None:
    """Where a reference state-dict entry lives in our model (``None``: not part of the network)."""
    top, _, rest = reference_key.partition(".")
    if top == "logsigma":
        return None
    if top.startswith("pred_task"):
        return f"heads.{TASKS[int(top[-1]) - 1]}.predict.{rest}"
    if top in ("encoder_block", "decoder_block", "conv_block_enc", "conv_block_dec"):
        return f"architecture.backbone.{reference_key}"
    return f"architecture.{reference_key}"


def reference_weights(state_dict: list[list[Any]]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for key, shape in state_dict:
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("running_var"):
            value = 0.5 + torch.rand(shape, generator=generator)
        elif len(shape) == 4:
            value = torch.randn(shape, generator=generator) * math.sqrt(2.0 / math.prod(shape[1:]))
        elif key.endswith("weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            value = 0.1 * torch.randn(shape, generator=generator)
        weights[key] = value
    return weights


def reference_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 32, 64, generator=generator)
    depth = torch.rand(2, 1, 32, 64, generator=generator) + 0.5
    depth[:, :, :8] = 0
    depth[1, :, 8:16] = 0
    normals = F.normalize(torch.randn(2, 3, 32, 64, generator=generator), dim=1)
    normals[:, :, -4:] = 0
    label = torch.randint(0, 13, (2, 32, 64), generator=generator)
    label[:, :4] = -1
    label[0, 4:10] = -1
    return {"image": image, "depth": depth, "normals": normals, "segmentation": label}


def build(variant: str) -> MultiTaskModel:
    tasks = [Segmentation("segmentation", num_classes=13, ignore_index=-1), Depth("depth"), Normals("normals")]
    architecture = SegNetMTAN() if variant == "mtan" else None  # split = hard sharing of the whole SegNet
    return MultiTaskModel(
        "segnet",
        tasks,
        architecture=architecture,
        heads=dict.fromkeys(TASKS, "segnet"),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )


def loaded(variant: str) -> MultiTaskModel:
    model = build(variant)
    own = model.state_dict()
    state = {}
    for key, value in reference_weights(FACTS[variant]["state_dict"]).items():
        target = our_key(key)
        if target is not None:
            assert own[target].shape == value.shape, key
            state[target] = value
    missing = {k for k in own if not k.endswith("num_batches_tracked")} - set(state)
    assert not missing, f"our model has tensors the reference lacks: {sorted(missing)[:5]}"
    model.load_state_dict(state, strict=False)
    return model


def count(parameters: Iterator[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in parameters)


def assert_summary(output: torch.Tensor, expected: dict[str, Any]) -> None:
    assert list(output.shape) == expected["shape"]
    flat = output.detach().double().flatten()
    for name, value in (("sum", flat.sum()), ("abs_sum", flat.abs().sum()), ("sq_sum", (flat**2).sum())):
        assert float(value) == pytest.approx(expected[name], rel=1e-5, abs=1e-3), name
    samples = [float(flat[i % flat.numel()]) for i in SAMPLES]
    assert samples == pytest.approx(expected["samples"], abs=1e-5)


@pytest.mark.parametrize("variant", ["mtan", "split"])
def test_parameter_counts_equal_the_reference(variant: str) -> None:
    model = build(variant)
    facts = FACTS[variant]["parameters_by_module"]
    backbone = model.architecture.backbone
    for name in ("encoder_block", "decoder_block", "conv_block_enc", "conv_block_dec"):
        assert count(getattr(backbone, name).parameters()) == facts[name], name
    for index, task in enumerate(TASKS, start=1):
        assert count(model.heads[task].parameters()) == facts[f"pred_task{index}"], task
    if variant == "mtan":
        for name in ("encoder_att", "decoder_att", "encoder_block_att", "decoder_block_att"):
            assert count(getattr(model.architecture, name).parameters()) == facts[name], name
    # the whole network: the reference's total less its 3 uncertainty log-variances
    assert count(model.parameters()) == FACTS[variant]["parameters"] - facts["logsigma"]
    # the state dict: same tensors, same shapes, under the documented names
    own = model.state_dict()
    mapped = {our_key(k): tuple(s) for k, s in FACTS[variant]["state_dict"] if our_key(k) is not None}
    assert mapped == {k: tuple(v.shape) for k, v in own.items()}


@pytest.mark.parametrize("variant", ["mtan", "split"])
def test_outputs_equal_the_reference(variant: str) -> None:
    model = loaded(variant)
    image = reference_batch()["image"]
    for mode in ("eval", "train"):  # eval first: a training-mode pass updates the running statistics
        with torch.no_grad():
            out = model.train(mode == "train")(image)
        expected = FACTS[variant][mode]
        # the reference returns log-probabilities; our segmentation head returns logits
        assert_summary(F.log_softmax(out["segmentation"], dim=1), expected["segmentation"])
        assert_summary(out["depth"], expected["depth"])
        assert_summary(out["normals"], expected["normals"])


def test_segnet_mtan_needs_the_segnet_backbone_and_segnet_refuses_stage_architectures() -> None:
    with pytest.raises(ConfigError, match="model.backbone=segnet"):
        MultiTaskModel("resnet18", [Depth("depth")], architecture=SegNetMTAN())
    with pytest.raises(ConfigError, match="stages"):
        MultiTaskModel("segnet", [Depth("depth")], architecture=MTAN())
    model = build("split")
    with pytest.raises(ConfigError, match="divisible by 32"):
        model(torch.rand(1, 3, 48, 64))


def test_balance_attention_adds_the_per_task_masks_to_the_shared_parameters() -> None:
    tasks = [Depth("depth"), Normals("normals")]
    plain = MultiTaskModel("segnet", tasks, architecture=SegNetMTAN())
    wide = MultiTaskModel("segnet", tasks, architecture=SegNetMTAN(balance_attention=True))
    masks = count(wide.architecture.encoder_att.parameters()) + count(wide.architecture.decoder_att.parameters())
    assert count(wide.shared_parameters()) == count(plain.shared_parameters()) + masks
    assert count(wide.task_specific_parameters()) == count(wide.heads.parameters())
