"""``mtlvision serve``: its arguments and its handler (registered from :mod:`mtlvision.cli`)."""

from __future__ import annotations

import argparse
from typing import Any

MB = 1024 * 1024


def cmd_serve(args: argparse.Namespace) -> int:
    from mtlvision import api

    api.serve(
        args.run,
        host=args.host,
        port=args.port,
        backend=args.backend,
        device=args.device,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_images=args.max_images,
        max_upload_bytes=int(args.max_upload_mb * MB),
        max_pixels=args.max_pixels,
        onnx=args.onnx,
        threads=args.threads,
    )
    return 0


def add_parser(verbs: Any) -> None:
    """Add the ``serve`` verb to the CLI's sub-parsers."""
    sv = verbs.add_parser(
        "serve", help="serve a run over HTTP: /predict with dynamic batching, /model, /health, a page at /"
    )
    sv.add_argument("run", help="a run folder")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument(
        "--backend",
        choices=["torch", "onnx"],
        default="torch",
        help="torch: the run's weights; onnx: RUN/model.onnx (from `mtlvision export`) through onnxruntime",
    )
    sv.add_argument("--onnx", help="the ONNX graph for --backend onnx (default: RUN/model.onnx)")
    sv.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    sv.add_argument("--max-batch", type=int, default=8, help="most images per forward pass (default: 8)")
    sv.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more images (default: 5)"
    )
    sv.add_argument("--max-images", type=int, default=16, help="most images per request (default: 16)")
    sv.add_argument("--max-upload-mb", type=float, default=20.0, help="most MB per request body (default: 20)")
    sv.add_argument(
        "--max-pixels",
        type=int,
        default=16_777_216,
        help="most pixels per image, checked before decoding (default: 16777216 = 4096 x 4096)",
    )
    sv.add_argument(
        "--threads", type=int, help="the model's threads, PyTorch's or onnxruntime's (default: theirs, one per core)"
    )
    sv.set_defaults(handler=cmd_serve)
