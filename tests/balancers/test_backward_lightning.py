"""The any-loop API inside a Lightning module (manual optimisation) trains as the same plain loop does."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import mtlvision as mv

from .test_backward import Net, batch, task_losses

L = pytest.importorskip("lightning", reason="Lightning is an optional test dependency (pip install lightning)")


class MultiTaskModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = Net()
        self.mtl = mv.MultiTaskBackward(self.net.trunk, "upgrad")

    def training_step(self, data: list[torch.Tensor], index: int) -> None:
        x, *ys = data
        opt = self.optimizers()
        opt.zero_grad()
        with self.mtl.record():
            losses = task_losses(self.net, self.net.trunk(x), ys)
        self.mtl.backward(losses)
        opt.step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


def test_a_lightning_module_trains_two_steps_as_the_plain_loop_does():
    x, ys = batch(n=8)
    loader = DataLoader(TensorDataset(x, *ys), batch_size=4, shuffle=False)
    module = MultiTaskModule()
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)

    net = Net()
    mtl = mv.MultiTaskBackward(net.trunk, "upgrad")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for x_, *ys_ in loader:
        opt.zero_grad()
        with mtl.record():
            losses = task_losses(net, net.trunk(x_), ys_)
        mtl.backward(losses)
        opt.step()
    moved = sum(float((p.detach() - q.detach()).abs().sum()) for p, q in zip(net.parameters(), Net().parameters()))
    assert moved > 0
    for p, q in zip(module.net.parameters(), net.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
