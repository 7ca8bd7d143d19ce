"""Load test of ``mtlvision serve``: throughput and latency with dynamic batching, without it (max batch 1),
and against calling the model in a plain loop (the same decode, forward pass, per-task decoding and
encoding, one image after another, no HTTP).

A real uvicorn server runs in a subprocess on loopback (``python -m mtlvision serve``); ``--clients``
concurrent clients (asyncio, httpx) each send one PNG per request until ``--requests`` requests are done or
``--seconds`` have passed, after a few warm-up requests. Latency is per request, as a client sees it. The
clients share the machine with the server, as on a one-box deployment.

    python benchmarks/serve.py                          # trains a throwaway scenes run (resnet18, 64 px)
    python benchmarks/serve.py --run runs/scenes --clients 16 --requests 400 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def sample_png(run: Path) -> bytes:
    """A validation image of the run's data, as PNG bytes."""
    from mtlvision import api
    from mtlvision.engine.runs import Run

    config = Run.load(run).config
    sample = api.split(config, "val", augment=False)[0]
    array = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def plain_loop(run: Path, image: bytes, count: int, seconds: float, args: argparse.Namespace) -> dict[str, float]:
    """The same work as a request, in-process, one image after another."""
    import torch

    from mtlvision.serving.encode import Formats
    from mtlvision.serving.service import Service
    from mtlvision.serving.settings import ServeSettings
    from mtlvision.serving.uploads import Upload

    torch.set_num_threads(args.threads)
    service = Service(run, ServeSettings(backend=args.backend, device=args.device, threads=args.threads))
    formats = Formats()

    def once() -> None:
        prepared = service.prepare(Upload("x.png", image))
        decoded = service.run_batch([prepared.network])[0]
        service.finish(prepared, decoded, formats)

    for _ in range(5):
        once()
    latencies: list[float] = []
    started = time.perf_counter()
    while len(latencies) < count and time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        once()
        latencies.append((time.perf_counter() - t0) * 1000)
    elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "throughput": len(latencies) / elapsed, "latencies": latencies, "batch": 1.0}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def load(url: str, image: bytes, clients: int, count: int, seconds: float) -> tuple[list[float], float]:
    """``clients`` concurrent clients sending until ``count`` requests or ``seconds``; latencies (ms), elapsed."""
    latencies: list[float] = []
    sent = 0
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as client:

        async def post() -> None:
            reply = await client.post("/predict", files={"image": ("x.png", image, "image/png")})
            reply.raise_for_status()

        await asyncio.gather(*(post() for _ in range(min(clients, 8))))  # warm-up
        started = time.perf_counter()

        async def worker() -> None:
            nonlocal sent
            while sent < count and time.perf_counter() - started < seconds:
                sent += 1
                t0 = time.perf_counter()
                await post()
                latencies.append((time.perf_counter() - t0) * 1000)

        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return latencies, elapsed


def served(run: Path, image: bytes, args: argparse.Namespace, max_batch: int, max_wait_ms: float) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "mtlvision", "serve", str(run), "--port", str(port), "--backend", args.backend]
    command += ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--device", args.device]
    command += ["--threads", str(args.threads)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the server did not start: {server.stderr.read().decode() if server.stderr else ''}"
                )
            time.sleep(0.2)
        before = httpx.get(url + "/health").json()
        latencies, elapsed = asyncio.run(load(url, image, args.clients, args.requests, args.seconds))
        after = httpx.get(url + "/health").json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    batches = after["batches"] - before["batches"]
    batch = (after["images"] - before["images"]) / batches if batches else float("nan")
    return {"requests": len(latencies), "throughput": len(latencies) / elapsed, "latencies": latencies, "batch": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a run folder (default: train a throwaway scenes run)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default: 16)")
    parser.add_argument("--requests", type=int, default=400, help="requests per setting at most (default: 400)")
    parser.add_argument("--seconds", type=float, default=60, help="seconds per setting at most (default: 60)")
    parser.add_argument("--max-batch", type=int, default=8, help="max batch of the batched setting (default: 8)")
    parser.add_argument("--max-wait-ms", type=float, default=5, help="max wait of the batched setting (default: 5)")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="the model's threads (PyTorch's or onnxruntime's), everywhere (default: 1)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        if args.run:
            run = Path(args.run)
        else:
            from mtlvision import api

            overrides = {"data.train_size": 32, "data.val_size": 8, "data.test_size": 8, "train.epochs": 1}
            run = api.train("scenes", {**overrides, "train.progress": False}, out=scratch, name="bench").path
        if args.backend == "onnx" and not (run / "model.onnx").is_file():
            from mtlvision import api

            api.export(run)
        image = sample_png(run)
        rows = [
            ("plain loop, 1 caller", plain_loop(run, image, args.requests, args.seconds, args)),
            (f"serve, max batch 1, {args.clients} clients", served(run, image, args, 1, 0)),
            (
                f"serve, max batch {args.max_batch}, wait {args.max_wait_ms:g} ms, {args.clients} clients",
                served(run, image, args, args.max_batch, args.max_wait_ms),
            ),
        ]
    size = Image.open(io.BytesIO(image)).size
    print(
        f"run {run.name}, backend {args.backend} on {args.device} ({args.threads} model thread(s)), one "
        f"{size[0]}x{size[1]} PNG per request, {os.cpu_count()} CPU cores; at most {args.requests} requests or "
        f"{args.seconds:g} s per setting\n"
    )
    print("| setting | requests | images/s | p50 ms | p99 ms | mean batch |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        lat = r["latencies"]
        print(
            f"| {name} | {r['requests']} | {r['throughput']:.1f} | {statistics.median(lat):.1f} | "
            f"{percentile(lat, 99):.1f} | {r['batch']:.2f} |"
        )


if __name__ == "__main__":
    main()
