"""End to end: the FCOS head on a timm resnet18 feature pyramid learns a two-image toy set."""

from __future__ import annotations

import pytest
import timm
import torch
from torchvision.ops import box_iou

from mtlvision.tasks.detection import Detection


def toy_set() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Two 64 x 64 images with flat red (class 0) and blue (class 1) rectangles on dark noise."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=generator) * 0.3
    boxes = [
        torch.tensor([[8.0, 10.0, 30.0, 28.0], [36.0, 30.0, 58.0, 60.0]]),
        torch.tensor([[20.0, 16.0, 44.0, 40.0]]),
    ]
    labels = [torch.tensor([0, 1]), torch.tensor([1])]
    colours = torch.tensor([[1.0, 0.2, 0.2], [0.2, 0.3, 1.0]])
    for index in range(2):
        for (x1, y1, x2, y2), label in zip(boxes[index].int().tolist(), labels[index].tolist()):
            images[index, :, y1:y2, x1:x2] = colours[label][:, None, None]
    return images, [{"boxes": b, "labels": c} for b, c in zip(boxes, labels)]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_head_overfits_two_images(device: str) -> None:
    torch.manual_seed(0)
    images, targets = toy_set()
    images = images.to(device)
    targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
    task = Detection("det", 2, class_names=["red", "blue"])
    backbone = timm.create_model("resnet18", features_only=True, pretrained=False).to(device)
    head = task.build_custom_head(backbone.feature_info.channels(), backbone.feature_info.reduction()).to(device)
    optimiser = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=1e-3)
    valid = torch.ones(2, dtype=torch.bool, device=device)
    losses = []
    for _ in range(80):
        loss = task.loss(head(backbone(images), (64, 64)), targets, valid)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]

    backbone.eval()
    head.eval()
    with torch.no_grad():
        prediction = head(backbone(images), (64, 64))
    metric = task.metric()
    metric.update(prediction, targets, valid)
    assert metric.compute()["map_50"] == pytest.approx(1.0)
    for found, target in zip(task.detect(prediction), targets):
        assert len(found["boxes"]) == len(target["boxes"])  # no duplicates above the default threshold
        assert found["boxes"].device.type == device
        iou = box_iou(found["boxes"], target["boxes"])
        best = iou.argmax(dim=1)
        assert (iou.amax(dim=1) > 0.7).all()
        assert found["labels"].tolist() == target["labels"][best].tolist()
