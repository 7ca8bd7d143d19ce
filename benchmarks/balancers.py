"""Training-step time and peak memory of every balancer, relative to equal weights, beside LibMTL and torchjd.

Setting (issue 3): a resnet18 trunk with hard parameter sharing, batch 16 of 64×64 images, either T = 3
tasks (classification, segmentation, depth) or T = 40 binary attributes. Every (framework, method, T, mode)
runs in its own subprocess, so that its peak memory is its own, over the timed steps (the warm-up's one-time
work left out): ``ru_maxrss`` after the high-water mark is reset at the end of the warm-up, minus the resident
size before the model is built on CPU (with a fixed glibc mmap threshold where the process measures memory
only, see :func:`run_worker`), ``torch.cuda.max_memory_allocated`` on GPU. Each ratio divides a median step
time by the equal-weights median of the same framework, T and run.

The peers are installed by this script with pip, each into its own environment directory under
``.bench_envs/`` (``pip install --no-deps --target``: ``LibMTL==1.1.5``; ``torchjd`` with ``qpsolvers``),
put first on the worker's ``PYTHONPATH``; everything else they need, torch included, comes from this
environment. ``--wheels DIR`` installs them offline from wheels in DIR. LibMTL 1.1.5 imports
``torchvision.models.utils``, gone from torchvision, and its gradient methods need
``encoder.zero_grad(set_to_none=False)`` on torch 2: the worker provides both, as LibMTL's GitHub head does.

    python benchmarks/balancers.py                 # short: T=3, a few methods, 3 timed steps
    python benchmarks/balancers.py --full          # every method, T=3 and T=40, 20 timed steps
    python benchmarks/balancers.py --tasks 40 --methods ew mgda upgrad --steps 10 --no-peers
    python benchmarks/balancers.py --device cuda --wheels .bench_envs/wheels    # on a GPU machine, offline
    python benchmarks/balancers.py --interleave --paths batched --steps 15   # steadier ratios on a shared CPU
    python benchmarks/balancers.py --device cuda --dtype bfloat16 --interleave   # bf16 autocast forward

Every table is printed beside the machine it was measured on (CPU model, logical CPUs, torch threads, torch
version and build, the GPU when ``--device cuda``), and followed by the step's multiply-adds per way
(``benchmarks/multiply_adds.py``): the least an exact Gramian method does, against the floors.

Every run also times the floor in plain PyTorch: the summed losses backpropagated once (its equal-weights
step) against each task's loss backpropagated through the trunk on its own (T backward passes, nothing
stored), the least work any method that needs T per-task gradients of the trunk's parameters can do.
``--interleave`` times all configurations in one process with their steps interleaved round-robin, so that
a slow spell of a shared machine falls on every method alike.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENVS = ROOT / ".bench_envs"
SHORT_METHODS = ["ew", "uw", "famo", "db_mtl", "mgda", "pcgrad", "cagrad", "nash_mtl", "upgrad"]
PEER_PACKAGES = {"libmtl": ["LibMTL==1.1.5"], "torchjd": ["torchjd", "qpsolvers"]}
# Our name -> (LibMTL 1.1.5 class, its keyword arguments at the paper defaults).
LIBMTL = {
    "ew": ("EW", {}),
    "uw": ("UW", {}),
    "gls": ("GLS", {}),
    "rlw": ("RLW", {"dist": "Normal"}),
    "dwa": ("DWA", {"T": 2.0}),
    "gradnorm": ("GradNorm", {"alpha": 1.5}),
    "mgda": ("MGDA", {"mgda_gn": "none"}),
    "pcgrad": ("PCGrad", {}),
    "cagrad": ("CAGrad", {"calpha": 0.5, "rescale": 1}),
    "imtl": ("IMTL", {}),
    "graddrop": ("GradDrop", {"leak": 0.0}),
    "gradvac": ("GradVac", {"beta": 0.5}),
}
# Our name -> torchjd aggregator class (None: plain sum of the losses, torchjd's equal-weights baseline).
TORCHJD = {
    "ew": None,
    "mgda": "MGDA",
    "pcgrad": "PCGrad",
    "upgrad": "UPGrad",
    "dualproj": "DualProj",
    "imtl_g": "IMTLG",
    "aligned_mtl": "AlignedMTL",
    "config": "ConFIG",
    "graddrop": "GradDrop",
    "gradvac": "GradVac",
}


# ------------------------------------------------------------------------------------------ the machine
def machine_line(device: str, threads: int = 0) -> str:
    """The machine a table was measured on: CPU model, cores and torch threads, torch version and build, and
    the CUDA device when ``device`` is one."""
    import platform

    import torch

    from mtlvision.balancers.jacobian.choice import cpu_model

    cpu = cpu_model()
    build = f"torch {torch.__version__}"
    build += f" (git {torch.version.git_version[:7]}" if getattr(torch.version, "git_version", None) else " ("
    build += f", CUDA {torch.version.cuda}" if torch.version.cuda else ", CPU-only build"
    build += f", mkldnn {'on' if torch.backends.mkldnn.is_available() else 'off'})"
    line = (
        f"# machine: {cpu}, {os.cpu_count()} logical CPUs, {threads or torch.get_num_threads()} torch threads; "
        f"{build}; Python {platform.python_version()}; {time.strftime('%Y-%m-%d', time.gmtime())}"
    )
    if device.startswith("cuda") and torch.cuda.is_available():
        line += f"; GPU: {torch.cuda.get_device_name(torch.device(device))}"
    return line


class Autocast:
    """Wraps a module so that its forward runs under ``torch.autocast`` (the backward, and so the engine's
    Gramian and update, stay outside it)."""

    def __new__(cls, module: Any, device: str, dtype: Any) -> Any:
        import torch
        from torch import nn

        class _Autocast(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = module

            def forward(self, *args: Any) -> Any:
                with torch.autocast(torch.device(device).type, dtype=dtype):
                    return self.inner(*args)

        return _Autocast()


# ------------------------------------------------------------------------------------------ the model
def build_problem(
    num_tasks: int, batch: int, size: int, device: str, dtype: str = "float32"
) -> tuple[Any, dict[str, Any], Callable, Any]:
    """The trunk, the heads, ``task_losses(heads, rep) -> list[Tensor]`` and the input batch; with ``dtype``
    ``"bfloat16"`` the trunk's and the heads' forward run under bfloat16 autocast."""
    import torch
    import torchvision
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(0)
    r = torchvision.models.resnet18()
    trunk = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4).to(device)
    x = torch.randn(batch, 3, size, size, device=device)

    def dense(out: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(512, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, out, 1),
            nn.Upsample(size=(size, size), mode="bilinear", align_corners=False),
        )

    def linear(out: int) -> nn.Module:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, out))

    if num_tasks == 3:
        heads = {"class": linear(10), "segmentation": dense(5), "depth": dense(1)}
        targets = {
            "class": torch.randint(0, 10, (batch,), device=device),
            "segmentation": torch.randint(0, 5, (batch, size, size), device=device),
            "depth": torch.rand(batch, 1, size, size, device=device),
        }
        criteria = {"class": F.cross_entropy, "segmentation": F.cross_entropy, "depth": F.l1_loss}
    else:
        heads = {f"attr{i}": linear(1) for i in range(num_tasks)}
        targets = {name: torch.randint(0, 2, (batch, 1), device=device).float() for name in heads}
        criteria = {name: F.binary_cross_entropy_with_logits for name in heads}
    heads = nn.ModuleDict(heads).to(device)
    if dtype == "bfloat16":
        trunk = Autocast(trunk, device, torch.bfloat16)
        heads = nn.ModuleDict({name: Autocast(head, device, torch.bfloat16) for name, head in heads.items()})

    def task_losses(heads_: Any, rep: Any) -> list[Any]:
        return [criteria[name](head(rep), targets[name]) for name, head in heads_.items()]

    return trunk, heads, task_losses, x


# ------------------------------------------------------------------------------------------ step makers
#: the path balancer.jacobian=auto chose, per method, in this worker (reported beside the time)
CHOSEN_PATHS: dict[str, str] = {}


@functools.cache
def path_cache() -> Path:
    """Where this process's balancer.jacobian=auto keeps its choices: a fresh file, so that every benchmark
    run measures the paths as a new training run's first step does (the user cache may hold a choice
    measured on a busy machine)."""
    return Path(tempfile.mkdtemp(prefix="mtlvision-bench-")) / "jacobian_paths.json"


def ours_step(method: str, mode: str, trunk: Any, heads: Any, task_losses: Callable, x: Any) -> Callable[[], None]:
    import torch

    from mtlvision import balancers

    balancer = balancers.get(method, **({"weights": [1.0] * len(heads)} if method == "fixed" else {}))
    balancer.setup(len(heads))
    balancer.to(x.device)
    shared, specific = list(trunk.parameters()), list(heads.parameters())
    optimiser = torch.optim.SGD([*shared, *specific, *balancer.parameters()], lr=1e-3)
    # "params": the path training takes (balancer.jacobian=auto: timed at the first, warm-up, step; the
    # choice is reported in the table); "rule": the fixed rule; "batched" / "loop" / "layers": that path forced
    engine_mode = "representation" if mode == "rep" else "params"
    requested = "auto" if mode in ("params", "rep") else mode
    jacobian = balancers.resolve_jacobian_path(requested, balancer, engine_mode, True)
    taps = balancers.LayerTaps(trunk, shared) if jacobian in ("layers", "auto") else None
    cache = path_cache()

    meta = bilevel_meta_step(balancer, trunk, heads, task_losses, x)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        if meta is not None:
            meta.before()
        if taps is not None:
            with taps.recording():
                rep = trunk(x)
        else:
            rep = trunk(x)
        losses = torch.stack(task_losses(heads, rep))
        engine = balancers.GradientEngine(
            shared, specific, rep, mode=engine_mode, jacobian=jacobian, taps=taps, cache_file=cache
        )
        engine.backward(losses, balancer)
        if engine.choice is not None:
            CHOSEN_PATHS[method] = engine.choice.path
        if meta is not None:
            meta.after()
        optimiser.step()
        if balancer.needs_post_step_losses:
            with torch.no_grad():
                balancer.after_step(torch.stack(task_losses(heads, trunk(x))))

    return step


class BilevelMeta:
    """A bilevel balancer's meta-step as the Trainer runs it (engine/bilevel.py): before the step, on the step's
    batch and a second ("validation") batch of other images with the same targets; after the backward, the
    meta-step's own part of the update (FORUM's) added to ``.grad``."""

    def __init__(self, balancer: Any, trunk: Any, heads: Any, task_losses: Callable, x: Any) -> None:
        import torch
        from torch import nn

        class Joint(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.trunk, self.heads = trunk, heads

            def forward(self, images: Any) -> Any:
                return torch.stack(task_losses(self.heads, self.trunk(images)))

        self.joint, self.balancer, self.x = Joint(), balancer, x
        self.x_val = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
        self.names = [n for n, _ in self.joint.named_parameters()]
        self.params = list(self.joint.parameters())

    def losses_at(self, images: Any) -> Callable[[list[Any]], Any]:
        import torch

        def losses(params: list[Any]) -> Any:
            tensors = {**{n: b.clone() for n, b in self.joint.named_buffers()}, **dict(zip(self.names, params))}
            return torch.func.functional_call(self.joint, tensors, (images,), strict=False)

        return losses

    def before(self) -> None:
        from mtlvision.balancers.bilevel import BilevelProblem

        problem = BilevelProblem(self.params, self.losses_at(self.x), self.losses_at(self.x_val), lr=1e-3)
        self.balancer.meta_step(problem)

    def after(self) -> None:
        extra = self.balancer.take_gradient()
        if extra is not None:
            for p, g in zip(self.params, extra.split([p.numel() for p in self.params])):
                p.grad = g.view_as(p) if p.grad is None else p.grad + g.view_as(p)


def bilevel_meta_step(balancer: Any, trunk: Any, heads: Any, task_losses: Callable, x: Any) -> BilevelMeta | None:
    from mtlvision.balancers.bilevel import BilevelBalancer

    return BilevelMeta(balancer, trunk, heads, task_losses, x) if isinstance(balancer, BilevelBalancer) else None


def libmtl_step(method: str, mode: str, trunk: Any, heads: Any, task_losses: Callable, x: Any) -> Callable[[], None]:
    import torch

    import_framework("libmtl")
    import LibMTL.weighting as weighting

    class_name, kwargs = LIBMTL[method]
    base = getattr(weighting, class_name)
    num_tasks = len(heads)

    class Bench(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoders = trunk, heads
            self.task_num, self.task_name, self.device = num_tasks, list(heads), x.device
            self.rep_grad, self.epoch = False, 2
            self.train_loss_buffer = torch.ones(num_tasks, 3).numpy()
            self.init_param()

        def get_share_params(self) -> Any:
            return self.encoder.parameters()

        def zero_grad_share_params(self) -> None:
            self.encoder.zero_grad(set_to_none=False)

    method_obj = Bench()
    optimiser = torch.optim.SGD([*trunk.parameters(), *heads.parameters(), *method_obj.parameters()], lr=1e-3)

    def step() -> None:
        optimiser.zero_grad(set_to_none=False)
        losses = torch.stack(task_losses(heads, trunk(x)))
        method_obj.backward(losses, **kwargs)
        optimiser.step()

    return step


def torchjd_step(method: str, mode: str, trunk: Any, heads: Any, task_losses: Callable, x: Any) -> Callable[[], None]:
    import torch
    import torchjd.aggregation as aggregation
    from torchjd.autojac import jac_to_grad, mtl_backward

    shared = list(trunk.parameters())
    optimiser = torch.optim.SGD([*shared, *heads.parameters()], lr=1e-3)
    aggregator = getattr(aggregation, TORCHJD[method])() if TORCHJD[method] else None

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        rep = trunk(x)
        losses = task_losses(heads, rep)
        if aggregator is None:
            sum(losses).backward()
        else:
            mtl_backward(losses, features=rep)
            jac_to_grad(shared, aggregator)
        optimiser.step()

    return step


def torch_step(method: str, mode: str, trunk: Any, heads: Any, task_losses: Callable, x: Any) -> Callable[[], None]:
    """Plain PyTorch: ``ew`` backpropagates the summed losses once; ``floor`` backpropagates each task's loss
    through the trunk on its own (T backward passes accumulated into ``.grad``, nothing stored per task), the
    least work any method that needs T per-task gradients of the trunk's parameters can do. ``outputs``: one
    vmapped backward of the T losses into the outputs of the trunk's layers only, no weight gradient at all
    (then the summed losses' update): what every per-task method pays before it touches a weight."""
    import torch
    from torch import nn
    from torch.autograd.graph import get_gradient_edge

    optimiser = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=1e-3)
    layers = [m for m in trunk.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    edges: list[Any] = []
    for layer in layers if method == "outputs" else []:
        layer.register_forward_hook(lambda module, args, out: edges.append(get_gradient_edge(out)))

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        edges.clear()
        losses = task_losses(heads, trunk(x))
        if method == "ew":
            sum(losses).backward()
        elif method == "outputs":
            eye = torch.eye(len(losses), device=x.device)
            torch.autograd.grad(torch.stack(losses), edges, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
            sum(losses).backward()
        else:
            for index, loss in enumerate(losses):
                loss.backward(retain_graph=index < len(losses) - 1)
        optimiser.step()

    return step


STEPS = {"ours": ours_step, "libmtl": libmtl_step, "torchjd": torchjd_step, "torch": torch_step}


# ------------------------------------------------------------------------------------------ one measurement
def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def reset_peak_rss() -> None:
    """Start the process's resident high-water mark (``VmHWM``, which ``ru_maxrss`` reads) afresh at the
    current resident size (Linux's ``clear_refs``), so that the peak of the timed steps leaves out the
    warm-up's one-time work (e.g. the layer path timing its two vmapped backwards with the graph kept)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def import_framework(framework: str) -> None:
    """Import what a framework's step needs, so that the modules' own resident size is not counted as the
    step's memory (mtlvision's import alone, with timm and torchmetrics, is about 100 MiB)."""
    import importlib

    import torch
    import torchvision  # noqa: F401  (every problem builds a torchvision resnet18)

    if framework == "libmtl":
        # LibMTL 1.1.5 imports a module torchvision removed; give it the function it wants from there.
        sys.modules["torchvision.models.utils"] = types.SimpleNamespace(  # type: ignore[assignment]
            load_state_dict_from_url=torch.hub.load_state_dict_from_url
        )
    modules = {
        "ours": ["mtlvision.balancers"],
        "libmtl": ["LibMTL.weighting"],
        "torchjd": ["torchjd.aggregation", "torchjd.autojac"],
        "torch": [],
    }
    for module in modules[framework]:
        importlib.import_module(module)


def build_step(spec: dict[str, Any]) -> Callable[[], None]:
    """The training step of one (framework, method, mode, T) configuration on a fresh model."""
    trunk, heads, task_losses, x = build_problem(
        spec["tasks"], spec["batch"], spec["size"], spec["device"], spec.get("dtype", "float32")
    )
    trunk.train(), heads.train()
    return STEPS[spec["framework"]](spec["method"], spec["mode"], trunk, heads, task_losses, x)


def timed(step: Callable[[], None], cuda: bool) -> float:
    """Seconds one step takes, the GPU's queue drained before and after."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"]) if spec["threads"] else None
    import_framework(spec["framework"])
    base_rss = rss_kib()
    step = build_step(spec)
    cuda = spec["device"].startswith("cuda")
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        if i == spec["warmup"]:
            torch.cuda.reset_peak_memory_stats() if cuda else reset_peak_rss()
        seconds = timed(step, cuda)
        if i >= spec["warmup"]:
            times.append(seconds)
    peak_mib = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    )
    chosen = {"path": CHOSEN_PATHS[spec["method"]]} if spec["method"] in CHOSEN_PATHS else {}
    return {"median_s": statistics.median(times), "peak_mib": peak_mib, **chosen}


def timing_worker(specs: list[dict[str, Any]]) -> dict[str, float | str]:
    """Median step time of every spec, measured in one process with the steps interleaved round-robin, so
    that a slow spell of a shared machine falls on every method alike instead of on whichever ran then. A
    configuration that cannot be built gets ``"failed: ..."`` instead."""
    import torch

    first = specs[0]
    torch.set_num_threads(first["threads"]) if first["threads"] else None
    cuda = first["device"].startswith("cuda")
    steps: dict[str, Callable[[], None]] = {}
    failed: dict[str, float | str] = {}
    for spec in specs:
        try:
            import_framework(spec["framework"])
            steps[spec_key(spec)] = build_step(spec)
        except Exception as exc:  # a peer missing or refusing the configuration: reported in its cell
            failed[spec_key(spec)] = f"failed: {str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__}"
    times: dict[str, list[float]] = {key: [] for key in steps}
    order = list(steps)
    for round_ in range(first["warmup"] + first["steps"]):
        for key in order[round_ % len(order) :] + order[: round_ % len(order)]:
            seconds = timed(steps[key], cuda)
            if round_ >= first["warmup"]:
                times[key].append(seconds)
    return {**failed, **{key: statistics.median(values) for key, values in times.items()}}


def spec_key(spec: dict[str, Any]) -> str:
    return f"{spec['framework']}/{spec['method']}/{spec['mode']}"


def run_worker(
    flag: str, payload: Any, frameworks: set[str], wheels: str | None, memory_only: bool = False
) -> subprocess.CompletedProcess:
    """Run this script as a worker (``--worker`` or ``--timing-worker``) with the peers among ``frameworks``
    first on its ``PYTHONPATH``. A worker that measures memory only gets a fixed glibc mmap threshold, so that
    every large buffer is returned to the system when freed and the resident set follows the live tensors
    (glibc's sliding threshold otherwise keeps freed buffers of a size it saw freed, in proportions that
    depend on allocation order, not on what the method holds)."""
    env = dict(os.environ)
    if memory_only:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    paths = [str(peer_path(peer, wheels)) for peer in sorted(frameworks & set(PEER_PACKAGES))]
    env["PYTHONPATH"] = os.pathsep.join(p for p in [*paths, env.get("PYTHONPATH", "")] if p)
    return subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), flag, json.dumps(payload)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=False,
    )


def measure_interleaved(specs: list[dict[str, Any]], wheels: str | None) -> dict[str, float | str]:
    done = run_worker("--timing-worker", specs, {s["framework"] for s in specs}, wheels)
    if done.returncode != 0:
        raise SystemExit(f"the interleaved timing process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peer_path(peer: str, wheels: str | None) -> Path:
    """The environment directory of ``peer`` under ``.bench_envs/``, installed with pip on first use."""
    target = ENVS / peer
    marker = target / ".installed"
    if not marker.exists():
        offline = ["--no-index", "--find-links", wheels] if wheels else []
        subprocess.check_call(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--upgrade",
                "--target",
                str(target),
                *offline,
                *PEER_PACKAGES[peer],
            ]
        )
        marker.write_text("ok\n")
    return target


def measure(spec: dict[str, Any], wheels: str | None, memory_only: bool) -> dict[str, Any] | str:
    done = run_worker("--worker", spec, {spec["framework"]}, wheels, memory_only)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"failed: {last[:120]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ the table
def methods_for(args: argparse.Namespace) -> list[str]:
    if args.methods:
        return args.methods
    if args.full:
        from mtlvision.balancers import BALANCERS

        return ["ew", *[name for name in BALANCERS.names() if name not in ("ew", "fixed")]]
    return SHORT_METHODS


def supports_representation(method: str) -> bool:
    from mtlvision.balancers import BALANCERS

    return bool(BALANCERS.get(method).supports_representation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="every method, T=3 and T=40, 20 timed steps")
    parser.add_argument("--tasks", type=int, nargs="+", choices=[3, 40], help="task counts (default 3; --full: 3 40)")
    parser.add_argument("--methods", nargs="+", help="balancer names (default: a short list; --full: all)")
    parser.add_argument("--steps", type=int, help="timed steps per method (default 3; --full: 20)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the forward's precision: bfloat16 runs the trunk and heads under autocast (on cuda)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--no-peers", action="store_true", help="skip LibMTL and torchjd")
    parser.add_argument("--wheels", help="install the peers offline from the wheels in this folder")
    parser.add_argument("--no-representation", action="store_true", help="skip representation mode")
    parser.add_argument(
        "--paths",
        nargs="+",
        default=[],
        choices=["batched", "layers", "loop", "rule"],
        help="also time parameter mode with balancer.jacobian forced to these paths (batched: one "
        "vmapped backward into the parameters; layers: into the layer outputs; loop: T plain "
        "backward passes; rule: the fixed rule, no measuring); the params column is balancer.jacobian=auto, "
        "with the path it chose in brackets",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="time every method in one process, steps interleaved round-robin (peak memory still "
        "comes from one process per method); steadier ratios on a shared machine",
    )
    parser.add_argument(
        "--no-memory",
        action="store_true",
        help="with --interleave: time only, no process per method for peak memory (for a short GPU slot)",
    )
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="peak memory only: one process per method, one warm-up and one measured step",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--timing-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.no_memory and not args.interleave:
        parser.error("--no-memory needs --interleave")
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.timing_worker:
        print(json.dumps(timing_worker(json.loads(args.timing_worker))))
        return

    tasks = args.tasks or ([3, 40] if args.full else [3])
    steps = args.steps or (20 if args.full else 3)
    methods = methods_for(args)
    frameworks = ["ours"] if args.no_peers else ["ours", "libmtl", "torchjd"]
    peers_of = {"libmtl": LIBMTL, "torchjd": TORCHJD}
    floor_methods = ["ew", "floor", "outputs"]
    common = {
        "batch": args.batch,
        "size": args.size,
        "device": args.device,
        "steps": steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "dtype": args.dtype,
    }
    how = "interleaved in one process" if args.interleave else "one process per method"
    how = "NOT MEANINGFUL: --memory-only" if args.memory_only else how
    machine = machine_line(args.device, args.threads)
    print(
        f"# balancer step time / equal weights ({args.device}, {args.dtype}, batch {args.batch} of "
        f"{args.size}x{args.size}, median of {steps} steps, {how}; peak memory in MiB, one process per method)\n"
    )
    for num_tasks in tasks:
        specs = [
            {**common, "framework": "torch", "method": method, "mode": "params", "tasks": num_tasks}
            for method in floor_methods
        ]
        for framework in frameworks:
            for method in methods:
                ours = framework == "ours"
                modes = (
                    ["params"]
                    + (args.paths if ours and method != "ew" else [])
                    + (["rep"] if ours and not args.no_representation and supports_representation(method) else [])
                )
                if framework != "ours" and method not in peers_of[framework]:
                    continue
                specs += [
                    {**common, "framework": framework, "method": method, "mode": mode, "tasks": num_tasks}
                    for mode in modes
                ]
        results: dict[tuple[str, str, str], dict[str, Any] | str] = {}
        for spec in specs if not args.no_memory else []:
            if args.memory_only:
                alone = {**spec, "steps": 1, "warmup": 1}
            else:  # with --interleave these runs give the memory only: a few steps
                alone = {**spec, "steps": min(steps, 3)} if args.interleave else spec
            key = (spec["framework"], spec["method"], spec["mode"])
            results[key] = measure(alone, args.wheels, args.memory_only or args.interleave)
            print(f"  measured {spec_key(spec)} T={num_tasks}: {results[key]}", file=sys.stderr)
        if args.interleave and not args.memory_only:
            if args.no_memory:
                results = {(s["framework"], s["method"], s["mode"]): {"peak_mib": float("nan")} for s in specs}
            runnable = [
                spec for spec in specs if isinstance(results[(spec["framework"], spec["method"], spec["mode"])], dict)
            ]
            for key, median_s in measure_interleaved(runnable, args.wheels).items():
                framework, method, mode = key.split("/")
                if isinstance(median_s, str):
                    results[(framework, method, mode)] = median_s
                else:
                    results[(framework, method, mode)]["median_s"] = median_s  # type: ignore[index]
            print(f"  interleaved timing of {len(runnable)} configurations done", file=sys.stderr)
        print(machine + "\n")
        print(table(num_tasks, methods, frameworks, results, args.paths))
        print(multiply_adds_line(num_tasks, args.batch, args.size) + "\n")


def multiply_adds_line(num_tasks: int, batch: int, size: int) -> str:
    """The step's multiply-adds per way (``benchmarks/multiply_adds.py``), to read the time ratios against."""
    from multiply_adds import summary  # the sibling script, which imports this one

    return summary(num_tasks, batch, size)


def table(num_tasks: int, methods: list[str], frameworks: list[str], results: dict, paths: list[str]) -> str:
    def ratio(framework: str, method: str, mode: str, key: str) -> str:
        value, base = results.get((framework, method, mode)), results.get((framework, "ew", "params"))
        if value is None:
            return "–"
        if isinstance(value, str):
            return value
        if value[key] != value[key]:  # NaN: not measured (--no-memory)
            return "–"
        chosen = f" ({value['path']})" if "path" in value and key == "median_s" else ""
        if not isinstance(base, dict):
            return f"{value[key]:.3g}{chosen}"
        return f"{value[key] / base[key]:.2f}×{chosen}"

    head = ["method", "ours (params)", *[f"ours (params, {path})" for path in paths], "ours (rep)", "ours peak mem"]
    head += [f"ours peak mem ({path})" for path in paths]
    head += [f"{f}" for f in frameworks[1:]] + [f"{f} peak mem" for f in frameworks[1:]]
    lines = [f"## T = {num_tasks}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = results.get(("ours", "ew", "params"))
    if isinstance(base, dict):
        lines.insert(1, f"equal weights (ours): {base['median_s'] * 1000:.1f} ms/step, {base['peak_mib']:.0f} MiB\n")
    floor, torch_ew = results.get(("torch", "floor", "params")), results.get(("torch", "ew", "params"))
    if isinstance(floor, dict) and isinstance(torch_ew, dict):
        lines.insert(
            1,
            f"floor (plain PyTorch, one forward and T backward passes through the trunk): "
            f"{floor['median_s'] / torch_ew['median_s']:.2f}× its equal-weights step "
            f"({torch_ew['median_s'] * 1000:.1f} ms), peak memory "
            f"{floor['peak_mib'] / torch_ew['peak_mib']:.2f}×\n",
        )
    outputs = results.get(("torch", "outputs", "params"))
    if isinstance(outputs, dict) and isinstance(torch_ew, dict):
        lines.insert(
            2,
            f"per-task gradients of the layer outputs only (one vmapped backward, no weight gradient, "
            f"then the summed update): {outputs['median_s'] / torch_ew['median_s']:.2f}×\n",
        )
    for method in methods:
        row = [
            method,
            ratio("ours", method, "params", "median_s"),
            *[ratio("ours", method, path, "median_s") for path in paths],
            ratio("ours", method, "rep", "median_s"),
            ratio("ours", method, "params", "peak_mib"),
            *[ratio("ours", method, path, "peak_mib") for path in paths],
        ]
        row += [ratio(f, method, "params", "median_s") for f in frameworks[1:]]
        row += [ratio(f, method, "params", "peak_mib") for f in frameworks[1:]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
