"""A tiny, fast, BatchNorm-free multi-task set-up shared by the engine tests (also run as a script)."""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from mtlvision.models import MultiTaskModel
from mtlvision.models.backbones import Backbone, BackboneStage
from mtlvision.tasks import TASKS

SIZE = 16


def tiny_backbone() -> Backbone:
    stages = [
        BackboneStage(0, OrderedDict(conv=nn.Conv2d(3, 8, 3, stride=2, padding=1), act=nn.ReLU())),
        BackboneStage(1, OrderedDict(conv=nn.Conv2d(8, 16, 3, stride=2, padding=1), act=nn.ReLU())),
    ]
    return Backbone("tiny", stages, [8, 16], [2, 4], {})


def tiny_tasks() -> list:
    return [
        TASKS.get("classification")("cls", num_classes=3),
        TASKS.get("segmentation")("seg", num_classes=3),
        TASKS.get("depth")("depth"),
    ]


def _without_batch_norm(module: nn.Module) -> None:
    # batch statistics depend on how a batch is split, which would hide the equalities the tests check
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.Identity())
        else:
            _without_batch_norm(child)


def tiny_model(seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    model = MultiTaskModel(tiny_backbone, tiny_tasks())
    _without_batch_norm(model)
    return model


class TinyScenes(Dataset):
    """Images whose brightness gives the class; a bright square is the segment and nearer in depth."""

    def __init__(self, n: int = 24, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            label = int(torch.randint(3, (), generator=g))
            image = torch.rand(3, SIZE, SIZE, generator=g) * 0.2 + 0.3 * label
            mask = torch.zeros(SIZE, SIZE, dtype=torch.long)
            y, x = (int(v) for v in torch.randint(0, SIZE - 6, (2,), generator=g))
            mask[y : y + 6, x : x + 6] = 1 + label % 2
            image[:, mask > 0] += 0.1
            depth = torch.where(mask > 0, 1.0, 3.0)[None].float()
            self.items.append(
                {
                    "image": image.clamp(0, 1),
                    "targets": {"cls": torch.tensor(label), "seg": mask, "depth": depth},
                    "valid": {"cls": True, "seg": True, "depth": True},
                    "id": f"tiny/{i}",
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def flat_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.state_dict().values() if p.is_floating_point()])


if __name__ == "__main__":
    # python tinyrun.py RUN_DIR OPTIONS_JSON: train (resuming when asked) and save the final weights.
    from mtlvision.engine.trainer import Trainer

    run_dir, options = Path(sys.argv[1]), json.loads(sys.argv[2])
    marker = options.pop("marker", None)
    resume = options.pop("resume", False)
    slow_save_after = options.pop("slow_save_after", None)
    mark_step = options.pop("mark_step", None)
    if slow_save_after is not None:
        import time

        import mtlvision.engine.checkpoint as checkpoint

        original = checkpoint.torch.save
        calls = {"n": 0}

        def slow_save(obj, path):  # writes the temporary file, then hangs before the rename
            original(obj, path)
            calls["n"] += 1
            if calls["n"] > slow_save_after:
                Path(marker).write_text("writing")
                time.sleep(60)

        checkpoint.torch.save = slow_save

    def on_step(trainer):
        if marker and trainer.state.step == mark_step:
            Path(marker).write_text("step")
            import time

            time.sleep(60)

    model = tiny_model()
    trainer = Trainer(model, run_dir=run_dir, progress=False, on_step=on_step, **options)
    trainer.fit(TinyScenes(), resume=resume)
    torch.save(flat_weights(model), run_dir / "final.pt")


def distributed_worker(rank: int, world_size: int, port: int, out: str, balancer: str, batch_size: int) -> None:
    """One torchrun-like rank: join a gloo group, train one epoch, rank 0 saves the final weights."""
    import os

    from mtlvision.engine import distributed
    from mtlvision.engine.trainer import Trainer

    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    model = tiny_model()
    trainer = Trainer(
        model, balancer, epochs=1, batch_size=batch_size, lr=5e-3, seed=3, device="cpu", optimizer="sgd", progress=False
    )
    trainer.fit(TinyScenes(), TinyScenes(8, seed=1))
    if rank == 0:
        torch.save(flat_weights(model), out)
    distributed.cleanup()
