"""Our dense losses and metrics against a transcription of LibMTL's NYUv2 formulas (``examples/nyu/utils.py``
of median-research-group/LibMTL, the same as mtan's), on several batches whose valid-pixel counts differ.

Transcribed here (not imported): the depth loss sum|d - d*|·m / Σm with m = (d* != 0); the normal loss
1 - Σ(n̂·n*)·m / Σm with m = (Σ_c n*_c != 0); the segmentation loss ``cross_entropy(ignore_index=-1)``; the
depth metric, each batch's mean over its valid pixels weighted by that batch's valid-pixel count; the normal
metric, mean / median / shares below 11.25, 22.5, 30 degrees of acos(clamp(n̂·n*)) over every valid pixel
of the split; mIoU and pixel accuracy from the split's confusion matrix.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtlvision.errors import ConfigError
from mtlvision.tasks import Depth, Normals, Segmentation


def batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    out = []
    for size, holes in ((3, 5), (2, 11), (1, 0)):
        depth = torch.rand(size, 1, 12, 16, generator=generator) + 0.3
        depth[:, :, :holes] = 0
        depth[0, :, :, : 2 * holes] = 0
        normals = F.normalize(torch.randn(size, 3, 12, 16, generator=generator), dim=1)
        normals[-1, :, : holes + 1] = 0
        label = torch.randint(0, 5, (size, 12, 16), generator=generator)
        label[0, : holes + 2] = -1
        out.append(
            {
                "depth": depth,
                "depth_pred": torch.rand(size, 1, 12, 16, generator=generator) + 0.2,
                "normals": normals,
                "normals_pred": torch.randn(size, 3, 12, 16, generator=generator),
                "segmentation": label,
                "segmentation_pred": torch.randn(size, 5, 12, 16, generator=generator),
            }
        )
    return out


def libmtl_depth_loss(pred: torch.Tensor, gt: torch.Tensor) -> float:
    mask = (gt.sum(dim=1) != 0).float().unsqueeze(1)
    return float((pred - gt).abs().mul(mask).sum() / mask.nonzero().size(0))


def libmtl_normal_loss(pred: torch.Tensor, gt: torch.Tensor) -> float:
    pred = pred / pred.norm(p=2, dim=1, keepdim=True)
    mask = (gt.sum(dim=1) != 0).float().unsqueeze(1)
    return float(1 - (pred * gt * mask).sum() / mask.nonzero().size(0))


def test_pixel_reduction_gives_libmtls_losses_and_sample_reduction_differs() -> None:
    depth, normals = Depth("d", reduction="pixel"), Normals("n", reduction="pixel")
    seg = Segmentation("s", num_classes=5, ignore_index=-1, reduction="pixel")
    per_sample = Depth("d")
    for batch in batches():
        valid = torch.ones(batch["depth"].shape[0], dtype=torch.bool)
        expected = libmtl_depth_loss(batch["depth_pred"], batch["depth"])
        assert float(depth.loss(batch["depth_pred"], batch["depth"], valid)) == pytest.approx(expected, rel=1e-6)
        expected = libmtl_normal_loss(batch["normals_pred"], batch["normals"])
        assert float(normals.loss(batch["normals_pred"], batch["normals"], valid)) == pytest.approx(expected, rel=1e-6)
        expected = float(F.cross_entropy(batch["segmentation_pred"], batch["segmentation"], ignore_index=-1))
        got = seg.loss(batch["segmentation_pred"], batch["segmentation"], valid)
        assert float(got) == pytest.approx(expected, rel=1e-6)
    first = batches()[0]  # its samples hold different numbers of valid depth pixels
    valid = torch.ones(3, dtype=torch.bool)
    pooled = libmtl_depth_loss(first["depth_pred"], first["depth"])
    assert float(per_sample.loss(first["depth_pred"], first["depth"], valid)) != pytest.approx(pooled, rel=1e-3)


def test_metrics_equal_libmtls_over_batches_of_different_valid_counts() -> None:
    abs_record, rel_record, counts, angles = [], [], [], []
    confusion = np.zeros((5, 5), dtype=np.int64)
    depth_metric, normal_metric = Depth("d").metric(), Normals("n").metric()
    seg_metric = Segmentation("s", num_classes=5, ignore_index=-1).metric()
    for batch in batches():
        valid = torch.ones(batch["depth"].shape[0], dtype=torch.bool)
        # LibMTL DepthMetric.update_fun
        mask = (batch["depth"].sum(dim=1) != 0).unsqueeze(1)
        pred, gt = batch["depth_pred"].masked_select(mask), batch["depth"].masked_select(mask)
        abs_record.append(float((pred - gt).abs().sum() / mask.nonzero().size(0)))
        rel_record.append(float(((pred - gt).abs() / gt).sum() / mask.nonzero().size(0)))
        counts.append(pred.size(0))
        # LibMTL NormalMetric.update_fun
        unit = batch["normals_pred"] / batch["normals_pred"].norm(p=2, dim=1, keepdim=True)
        normal_mask = batch["normals"].sum(dim=1) != 0
        cosine = torch.clamp((unit * batch["normals"]).sum(1).masked_select(normal_mask), -1, 1)
        angles.append(np.degrees(torch.acos(cosine).double().numpy()))
        # LibMTL SegMetric.update_fun
        label = batch["segmentation"].flatten()
        predicted = batch["segmentation_pred"].softmax(1).argmax(1).flatten()
        keep = (label >= 0) & (label < 5)
        confusion += np.bincount((5 * label[keep] + predicted[keep]).numpy(), minlength=25).reshape(5, 5)
        depth_metric.update(batch["depth_pred"], batch["depth"], valid)
        normal_metric.update(F.normalize(batch["normals_pred"], dim=1), batch["normals"], valid)
        seg_metric.update(batch["segmentation_pred"], batch["segmentation"], valid)
    weights = np.array(counts, dtype=np.float64)
    depth = depth_metric.compute()
    assert depth["abs_err"] == pytest.approx((np.array(abs_record) * weights).sum() / weights.sum(), rel=1e-6)
    assert depth["rel_err"] == pytest.approx((np.array(rel_record) * weights).sum() / weights.sum(), rel=1e-6)
    errors = np.concatenate(angles)
    normal = normal_metric.compute()
    assert normal["mean_angle"] == pytest.approx(errors.mean(), abs=1e-4)
    assert normal["median_angle"] == pytest.approx(np.median(errors), abs=1e-3)
    for key, limit in (("within_11_25", 11.25), ("within_22_5", 22.5), ("within_30", 30.0)):
        assert normal[key] == pytest.approx(100 * np.mean(errors < limit), abs=1e-9)
    iou = np.diag(confusion) / (confusion.sum(1) + confusion.sum(0) - np.diag(confusion))
    seg = seg_metric.compute()
    assert seg["miou"] == pytest.approx(iou.mean(), rel=1e-6)
    assert seg["pixel_accuracy"] == pytest.approx(np.diag(confusion).sum() / confusion.sum(), rel=1e-6)


def test_reduction_must_be_known() -> None:
    with pytest.raises(ConfigError, match="reduction"):
        Depth("d", reduction="batch")
