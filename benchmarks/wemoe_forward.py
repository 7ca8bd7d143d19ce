"""WEMoE's routed forward against the plain merged model: parameters and inference time.

For each number of experts T (``--experts``), the model of ``--backbone`` (one classification head) with its
residual blocks (ViT: MLPs) upscaled into weight-ensembling MoE blocks holding θ_0 and T task vectors (random
here: the time does not depend on their values), against the same model plain (what every other merging
rule produces); T experts are T times the plain model's size and, run one after another, its time. The
table gives parameters and the median of ``--repeats`` timed forward passes of a batch after ``--warmup``
untimed ones.

    python benchmarks/wemoe_forward.py                                   # resnet18, batch 8 of 64 x 64, T = 2, 6
    python benchmarks/wemoe_forward.py --device cuda --batch-size 64 --image-size 224 --experts 2 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mtlvision.engine.merging import WEMoE
from mtlvision.models.multitask import MultiTaskModel
from mtlvision.models.weight_ensembling import upscalable_blocks, upscale
from mtlvision.tasks import TASKS


def _model(backbone: str) -> MultiTaskModel:
    return MultiTaskModel(backbone, [TASKS.get("classification")("cls", num_classes=10)]).eval()


def _time(run: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> float:
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    plain = _model(args.backbone).to(device)
    plain_ms = _time(lambda: plain(images), args.warmup, args.repeats, device)
    count = sum(p.numel() for p in plain.parameters())
    print(f"{args.backbone}, batch {args.batch_size} of {args.image_size}², {device}; median of {args.repeats}")
    print("| model | T | parameters | ms / batch | vs plain merged |")
    print("|---|---|---|---|---|")
    print(f"| merged (any weight rule) | – | {count / 1e6:.2f}M | {plain_ms:.1f} | 1.00× |")
    for experts in args.experts:
        routed = _model(args.backbone)
        blocks = upscalable_blocks(routed, {k for k, _ in routed.named_parameters()})
        upscale(routed, blocks, experts, WEMoE().hidden_layers)
        for name, parameter in routed.named_parameters():
            if "vectors" in name:
                parameter.normal_(0, 0.01)
        routed = routed.to(device).eval()
        ms = _time(lambda: routed(images), args.warmup, args.repeats, device)  # noqa: B023  (timed at once)
        size = sum(p.numel() for p in routed.parameters())
        print(f"| wemoe ({len(blocks)} blocks) | {experts} | {size / 1e6:.2f}M | {ms:.1f} | {ms / plain_ms:.2f}× |")
        print(f"| {experts} experts (T × the plain time) | {experts} | {experts * count / 1e6:.2f}M | – | {experts}× |")


if __name__ == "__main__":
    main()
