"""Training-step time and peak memory of every sharing architecture relative to HPS, beside LibMTL's.

Setting: a ResNet-18 backbone (timm's for mtlvision, LibMTL's own ResNet-18 for LibMTL: the same
network), T = 3 tasks (10-way classification, 5-class segmentation, depth), a batch of random images.
LibMTL's architectures hand their decoders the last backbone stage only, so both frameworks get the same
small decoder per task on that stage (mtlvision's architectures also produce the other scales; the
heads ignore them here). One step: forward, the sum of the task losses, backward, an SGD step. Every
(framework, architecture) runs in its own subprocess, so that its peak memory is its own: ``ru_maxrss``
growth from just before the model is built on CPU, ``torch.cuda.max_memory_allocated`` on GPU. Each
ratio divides by the HPS figure of the same framework in the same run.

Hyper-parameters are each library's defaults where it has them and matched otherwise: MMoE 4 experts,
CGC one expert per task plus one shared, DSelect-k 4 experts with k = 2, gamma = 1. PLE: mtlvision's
default of two levels over the stages; LibMTL puts one level on each ResNet layer. LibMTL has no
PAD-Net or MTI-Net; MTI-Net (its default: task channels equal to the backbone's at strides 4-32) makes
intermediate segmentation and depth predictions at every scale, and their losses (resized to the image,
as the model does) join the step's loss. LibMTL 1.1.5 (PyPI) is installed by this script with
``pip install --no-deps --target .bench_envs/libmtl`` (the directory ``benchmarks/balancers.py`` uses
too) and put first on the worker's ``PYTHONPATH``; torch and the rest come from this environment.
``--wheels DIR`` installs it offline from a wheel in DIR (a GPU machine has no network). LibMTL imports
``torchvision.models.utils``, which torchvision removed; the worker provides the one function it wants
from there. LibMTL's LTB is not timed here (it wants its own
trainer's epoch counters); ours is timed past its warm-up, with sampled parents.

    python benchmarks/architectures.py              # short: batch 4 of 64×64, 2 timed steps
    python benchmarks/architectures.py --full       # batch 16 of 128×128, 20 timed steps
    python benchmarks/architectures.py --architectures hps mtan mmoe --steps 5 --no-peers
    python benchmarks/architectures.py --full --device cuda --wheels .bench_envs/wheels
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

# the LibMTL environment is the one the balancers benchmark installs (same package, same folder)
from balancers import peer_path, timed

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURES = ["hps", "cross_stitch", "mtan", "mmoe", "cgc", "ple", "dselect_k", "padnet", "mti_net", "ltb"]
NUM_EXPERTS = 4
# Our name -> (LibMTL 1.1.5 class, its keyword arguments for three tasks).
LIBMTL = {
    "hps": ("HPS", {}),
    "cross_stitch": ("Cross_stitch", {}),
    "mtan": ("MTAN", {}),
    "mmoe": ("MMoE", {"num_experts": [NUM_EXPERTS]}),
    "cgc": ("CGC", {"num_experts": [1, 1, 1, 1]}),
    "ple": ("PLE", {"num_experts": [1, 1, 1, 1]}),
    "dselect_k": ("DSelect_k", {"num_experts": [NUM_EXPERTS], "num_nonzeros": 2, "kgamma": 1.0}),
}
OURS = {"mmoe": {"num_experts": NUM_EXPERTS}, "dselect_k": {"num_experts": NUM_EXPERTS, "k": 2, "gamma": 1.0}}
TASKS = {"class": 10, "segmentation": 5, "depth": 1}


# ------------------------------------------------------------------------------------------- worker
def decoders(size: int, channels: int) -> Any:
    """One small decoder per task on the last backbone stage, the same for both frameworks."""
    from torch import nn

    def dense(out: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(channels, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, out, 1),
            nn.Upsample(size=(size, size), mode="bilinear", align_corners=False),
        )

    return nn.ModuleDict(
        {
            "class": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, TASKS["class"])),
            "segmentation": dense(TASKS["segmentation"]),
            "depth": dense(TASKS["depth"]),
        }
    )


def ours_model(architecture: str, size: int, device: str) -> Any:
    from torch import nn

    from mtlvision.models.architectures import ARCHITECTURES
    from mtlvision.models.architectures.base import intermediate_key
    from mtlvision.models.backbones import create_backbone
    from mtlvision.tasks import Classification, Depth, Segmentation

    tasks = [
        Classification("class", TASKS["class"]),
        Segmentation("segmentation", TASKS["segmentation"]),
        Depth("depth"),
    ]
    spec = ARCHITECTURES.get(architecture)(**OURS.get(architecture, {}))
    built = spec.build_for(lambda: create_backbone("resnet18"), tasks)
    built.set_progress(1, 2)  # past LTB's warm-up: its blocks' parents are sampled (no schedule elsewhere)
    heads = decoders(size, built.feature_channels[-1])

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.architecture, self.heads = built, heads

        def forward(self, images: Any) -> dict[str, Any]:
            features = self.architecture(images)
            out = {name: self.heads[name](features[name][-1]) for name in TASKS}
            for name in built.intermediate_tasks:  # deep supervision (MTI-Net): raw, resized in the step
                out[f"{name}/intermediate"] = features[intermediate_key(name)]
            return out

    return Model().to(device)


def import_framework(framework: str) -> None:
    """Import everything a framework's model needs, so that the memory of the imports is not counted."""
    import torch

    if framework == "mtlvision":
        import mtlvision.models.architectures
        import mtlvision.models.backbones  # noqa: F401

        return
    # LibMTL 1.1.5 imports a module that torchvision removed; give it the one function it wants from there.
    sys.modules["torchvision.models.utils"] = types.SimpleNamespace(  # type: ignore[assignment]
        load_state_dict_from_url=torch.hub.load_state_dict_from_url
    )
    import LibMTL.architecture  # noqa: F401


def libmtl_model(architecture: str, size: int, device: str) -> Any:
    import LibMTL.architecture as libmtl_architectures
    import torch
    from LibMTL.model import resnet18

    class_name, kwargs = LIBMTL[architecture]
    return getattr(libmtl_architectures, class_name)(
        task_name=list(TASKS),
        encoder_class=resnet18,
        decoders=decoders(size, 512),
        rep_grad=False,
        multi_input=False,
        device=torch.device(device),
        img_size=[3, size, size],
        **kwargs,
    ).to(device)


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one model, run warm-up and timed steps, return the median step time and peak memory."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    device, size, batch = spec["device"], spec["size"], spec["batch"]
    cuda = device.startswith("cuda")
    import_framework(spec["framework"])
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = (ours_model if spec["framework"] == "mtlvision" else libmtl_model)(spec["architecture"], size, device)
    model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, TASKS["class"], (batch,), device=device)
    masks = torch.randint(0, TASKS["segmentation"], (batch, size, size), device=device)
    depth = torch.rand(batch, 1, size, size, device=device)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        out = model(images)
        loss = (
            F.cross_entropy(out["class"], labels)
            + F.cross_entropy(out["segmentation"], masks)
            + F.l1_loss(out["depth"], depth)
        )
        for raw in out.get("segmentation/intermediate", []):
            loss = loss + F.cross_entropy(F.interpolate(raw, size=(size, size), mode="bilinear"), masks)
        for raw in out.get("depth/intermediate", []):
            loss = loss + F.l1_loss(F.interpolate(raw, size=(size, size), mode="bilinear"), depth)
        loss.backward()
        optimiser.step()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for index in range(spec["warmup"] + spec["steps"]):
        seconds = timed(step, cuda)
        if index >= spec["warmup"]:
            times.append(seconds)
    peak_mib = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    )
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return {"median_s": statistics.median(times), "peak_mib": peak_mib, "params_m": params}


# ------------------------------------------------------------------------------------------- driver
def measure(spec: dict[str, Any], wheels: str | None) -> dict[str, Any] | str:
    env = dict(os.environ)
    if spec["framework"] == "libmtl":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(peer_path("libmtl", wheels)), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"failed: {last[:120]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def cells(result: dict[str, Any] | str | None, baseline: dict[str, Any] | str | None) -> list[str]:
    """Step time, its ratio to HPS, peak memory, its ratio to HPS, parameters."""
    if result is None:
        return ["—"] * 5
    if isinstance(result, str):
        return [result, "", "", "", ""]
    ok = isinstance(baseline, dict)
    return [
        f"{result['median_s'] * 1000:.0f} ms",
        f"{result['median_s'] / baseline['median_s']:.2f}×" if ok else "",
        f"{result['peak_mib']:.0f} MiB",
        f"{result['peak_mib'] / baseline['peak_mib']:.2f}×" if ok and baseline["peak_mib"] > 0 else "",
        f"{result['params_m']:.1f} M",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="batch 16 of 128×128 images, 20 timed steps")
    parser.add_argument("--architectures", nargs="+", choices=ARCHITECTURES, default=ARCHITECTURES)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-peers", action="store_true", help="skip LibMTL")
    parser.add_argument("--wheels", help="install LibMTL offline from the wheels in this folder")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return
    batch = args.batch or (16 if args.full else 4)
    size = args.size or (128 if args.full else 64)
    steps = args.steps or (20 if args.full else 2)
    architectures = ["hps", *[a for a in args.architectures if a != "hps"]]
    frameworks = ["mtlvision"] if args.no_peers else ["mtlvision", "libmtl"]
    results: dict[tuple[str, str], dict[str, Any] | str | None] = {}
    for architecture in architectures:
        for framework in frameworks:
            if framework == "libmtl" and architecture not in LIBMTL:
                results[framework, architecture] = None
                continue
            spec = {
                "framework": framework,
                "architecture": architecture,
                "device": args.device,
                "batch": batch,
                "size": size,
                "steps": steps,
                "warmup": args.warmup,
            }
            results[framework, architecture] = measure(spec, args.wheels)
            print(f"  {framework:9s} {architecture:12s} {results[framework, architecture]}", file=sys.stderr)
    header = ["architecture"]
    for framework in frameworks:
        header += [f"{framework} step", "× HPS", "peak memory", "× HPS", "parameters"]
    print(f"\nResNet-18, T=3, batch {batch} of {size}×{size}, device {args.device}, median of {steps} steps\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for architecture in architectures:
        row = [architecture]
        for framework in frameworks:
            row += cells(results[framework, architecture], results[framework, "hps"])
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
