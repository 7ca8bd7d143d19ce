"""One rank of a torchrun-like gloo run of the tiny set-up, BatchNorm kept, for the fault-injection tests.

``python faultrun.py RUN_DIR OPTIONS_JSON`` with torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) set. ``fault`` in the options (``{"rank": 1, "step": 4, "signal": "SIGTERM"}``) makes that rank
send itself that signal once it has taken that step, after writing the time to ``RUN_DIR/fault.json``;
``resume`` continues the run folder. A :class:`MtlvisionError` ends the process as the CLI does (one
paragraph, exit 2). Every rank writes its final weights and buffers to ``final-RANK.pt``; rank 0 writes the
history to ``history.json``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tinyrun import TinyScenes, flat_weights, tiny_backbone, tiny_tasks

from mtlvision.engine import distributed
from mtlvision.engine.trainer import Trainer
from mtlvision.errors import MtlvisionError
from mtlvision.models import MultiTaskModel


def main() -> int:
    run_dir, options = Path(sys.argv[1]), json.loads(sys.argv[2])
    fault = options.pop("fault", None)
    resume = options.pop("resume", False)
    torch.set_num_threads(1)

    def on_step(trainer: Trainer) -> None:
        if fault and distributed.rank() == fault["rank"] and trainer.state.step == fault["step"]:
            (run_dir / "fault.json").write_text(json.dumps({"time": time.time(), **fault}))
            os.kill(os.getpid(), getattr(signal, fault["signal"]))

    torch.manual_seed(0)
    model = MultiTaskModel(tiny_backbone, tiny_tasks())  # the heads' BatchNorm layers stay
    trainer = Trainer(model, "ew", run_dir=run_dir, device="cpu", progress=False, on_step=on_step, **options)
    try:
        result = trainer.fit(TinyScenes(), TinyScenes(8, seed=1), resume=resume)
    except MtlvisionError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    torch.save(flat_weights(model), run_dir / f"final-{distributed.rank()}.pt")
    if distributed.is_main():
        (run_dir / "history.json").write_text(json.dumps(result.history))
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
