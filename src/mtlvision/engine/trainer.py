"""The training loop: one forward, per-task losses, the balancer's update, the optimiser step.

Our own loop (rather than a generic one) so that gradient-balancing methods fit: the
:class:`~mtlvision.balancers.engine.GradientEngine` computes per-task gradients only when the balancer asks
for them. Validation runs every epoch; the best epoch on the validation split (never the test split) is
kept as ``model.safetensors``; a resumable ``checkpoint.pt`` is written atomically after every epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mtlvision.balancers import Balancer, GradientEngine, get as get_balancer
from mtlvision.data.collate import Collate
from mtlvision.engine.checkpoint import load_checkpoint, save_checkpoint, save_weights
from mtlvision.engine.device import resolve_device, rng_state, seed_everything, set_rng_state
from mtlvision.engine.logging import EpochProgress, TensorBoardLog, console, flatten_metrics, write_history
from mtlvision.engine.optim import build_optimizer, build_scheduler
from mtlvision.errors import ConfigError, MtlvisionError
from mtlvision.evaluation.evaluator import EvalResult, evaluate, move_batch
from mtlvision.tasks.base import Task

CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns: the per-epoch history and the best validation epoch."""

    history: list[dict[str, float]]
    best_epoch: int
    best_score: float
    best_val: EvalResult | None = None
    stopped_early: bool = False


@dataclass
class _State:
    epoch: int = 0  # completed epochs
    step: int = 0
    best_score: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


class NonFiniteLossError(MtlvisionError):
    """Training produced a NaN or infinite loss."""


class Trainer:
    """Trains a multi-task model (dict in, dict out) with a balancer.

    Args mirror the ``train.*`` config keys. ``select`` is ``"loss"`` (the sum of the tasks' mean
    validation losses, lower is better) or ``"TASK.METRIC"`` (that validation metric in its own direction).
    """

    def __init__(
        self,
        model: nn.Module,
        balancer: Balancer | str = "ew",
        *,
        epochs: int = 10,
        batch_size: int = 32,
        lr: float = 1e-3,
        optimizer: str = "adamw",
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        scheduler: str = "cosine",
        step_size: int = 10,
        gamma: float = 0.1,
        warmup_epochs: int = 0,
        grad_clip: float | None = None,
        device: str = "auto",
        early_stopping: int | None = None,
        select: str = "loss",
        balancer_mode: str = "params",
        backbone_lr_scale: float = 1.0,
        num_workers: int = 0,
        seed: int = 0,
        deterministic: bool = False,
        run_dir: str | Path | None = None,
        progress: bool = True,
        on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        self.model = model
        self.tasks: dict[str, Task] = dict(model.tasks)
        self.balancer = get_balancer(balancer) if isinstance(balancer, str) else balancer
        if balancer_mode not in {"params", "representation"}:
            raise ConfigError(f"balancer.mode must be 'params' or 'representation', got {balancer_mode!r}")
        if balancer_mode == "representation" and not self.balancer.supports_representation:
            raise ConfigError(
                f"balancer {type(self.balancer).__name__} is not defined on representation gradients; "
                "use balancer.mode=params"
            )
        self.balancer_mode = balancer_mode
        self.epochs = epochs
        self.batch_size = batch_size
        self.grad_clip = grad_clip
        self.early_stopping = early_stopping
        self.select = self._parse_select(select)
        self.num_workers = num_workers
        self.seed = seed
        self.deterministic = deterministic
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress = progress
        self.on_epoch_end = on_epoch_end
        self.device = resolve_device(device)
        seed_everything(seed, deterministic)
        self.model.to(self.device)
        self.balancer.to(self.device)
        groups = list(model.parameter_groups(backbone_lr_scale))
        balancer_params = [p for p in self.balancer.parameters() if p.requires_grad]
        if balancer_params:
            groups.append({"params": balancer_params, "weight_decay": 0.0})
        self.optimizer = build_optimizer(optimizer, groups, lr, weight_decay, momentum)
        self.scheduler = build_scheduler(scheduler, self.optimizer, epochs, warmup_epochs, step_size, gamma)
        self.collate = Collate(self.tasks)
        self.state = _State()

    # ------------------------------------------------------------------------------------------ helpers
    def _parse_select(self, select: str) -> tuple[str, str, bool] | None:
        if select == "loss":
            return None
        task, _, metric = select.partition(".")
        if task not in self.tasks or metric not in self.tasks[task].metric_directions:
            options = ["loss"] + [f"{t}.{m}" for t, task_ in self.tasks.items() for m in task_.metric_directions]
            raise ConfigError(f"train.select={select!r} is not known; choose one of: {', '.join(options)}")
        return task, metric, self.tasks[task].metric_directions[metric]

    def _score(self, result: EvalResult) -> float:
        """Selection score on validation, lower is better."""
        if self.select is None:
            return result.total_loss
        task, metric, higher = self.select
        value = result.metrics[task][metric]
        return -value if higher else value

    def loader(self, data: Dataset | DataLoader, shuffle: bool, epoch: int = 0) -> DataLoader:
        """A DataLoader over ``data`` (returned as is if it already is one), reshuffled per epoch."""
        if isinstance(data, DataLoader):
            return data
        generator = torch.Generator()
        generator.manual_seed(self.seed * 100_003 + epoch)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            generator=generator,
            pin_memory=self.device.type == "cuda",
            drop_last=shuffle and len(data) > self.batch_size,  # type: ignore[arg-type]
            persistent_workers=False,
        )

    def task_losses(self, predictions: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        """The [T] vector of per-task losses, each over the samples that carry that task's label."""
        return torch.stack(
            [
                task.loss(predictions[name], batch["targets"][name], batch["valid"][name])
                for name, task in self.tasks.items()
            ]
        )

    # ------------------------------------------------------------------------------------------ training
    def train_step(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """One optimisation step; returns the detached task losses and the balancer's task weights."""
        self.optimizer.zero_grad(set_to_none=True)
        representation = None
        if self.balancer_mode == "representation":
            predictions, representation = self.model.forward_with_representation(batch["image"])
        else:
            predictions = self.model(batch["image"])
        losses = self.task_losses(predictions, batch)
        if not torch.isfinite(losses).all():
            bad = [n for n, v in zip(self.tasks, losses.tolist()) if not math.isfinite(v)]
            raise NonFiniteLossError(
                f"non-finite loss for task(s) {', '.join(bad)} at step {self.state.step}; "
                "lower train.lr or set train.grad_clip"
            )
        engine = GradientEngine(
            self.model.shared_parameters(), self.model.task_specific_parameters(), representation
        )
        update = engine.backward(losses, self.balancer)
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.balancer.needs_post_step_losses:
            with torch.no_grad():
                self.balancer.after_step(self.task_losses(self.model(batch["image"]), batch))
        self.state.step += 1
        return losses.detach(), update.weights.detach()

    def fit(
        self, train_data: Dataset | DataLoader, val_data: Dataset | DataLoader | None = None, resume: bool = False
    ) -> FitResult:
        """Train for ``epochs`` epochs (continuing from ``run_dir/checkpoint.pt`` when ``resume``)."""
        if resume:
            self.resume()
        tb = TensorBoardLog(self.run_dir)
        stopped_early = False
        best_val: EvalResult | None = None
        try:
            for epoch in range(self.state.epoch, self.epochs):
                row = self._train_epoch(train_data, epoch)
                if val_data is not None:
                    val = evaluate(self.model, self.loader(val_data, shuffle=False), self.tasks, self.device)
                    row.update({f"val_loss/{t}": v for t, v in val.losses.items()})
                    row.update(flatten_metrics("val", val.metrics))
                    score = self._score(val)
                else:
                    val, score = None, float(row["train_loss"])
                row["score"] = score
                self._step_scheduler(score)
                self.state.epoch = epoch + 1
                self.state.history.append(row)
                improved = score < self.state.best_score
                if improved:
                    self.state.best_score, self.state.best_epoch, self.state.bad_epochs = score, epoch + 1, 0
                    best_val = val
                    if self.run_dir is not None:
                        save_weights(self.model, self.run_dir / WEIGHTS_NAME)
                else:
                    self.state.bad_epochs += 1
                self._save_epoch(row, tb)
                if self.on_epoch_end is not None:
                    self.on_epoch_end(epoch + 1, row)
                if self.early_stopping is not None and self.state.bad_epochs >= self.early_stopping:
                    console.print(
                        f"Early stopping: no improvement of the validation score for {self.early_stopping} epochs."
                    )
                    stopped_early = True
                    break
        finally:
            tb.close()
        return FitResult(
            history=self.state.history,
            best_epoch=self.state.best_epoch,
            best_score=self.state.best_score,
            best_val=best_val,
            stopped_early=stopped_early,
        )

    def _train_epoch(self, train_data: Dataset | DataLoader, epoch: int) -> dict[str, float]:
        self.model.train()
        loader = self.loader(train_data, shuffle=True, epoch=epoch)
        names = list(self.tasks)
        loss_sum = torch.zeros(len(names), device=self.device)
        weight_sum = torch.zeros(len(names), device=self.device)
        steps = 0
        data_wait = 0.0
        start = time.perf_counter()
        with EpochProgress(f"epoch {epoch + 1}/{self.epochs}", len(loader), self.progress) as bar:
            fetch_start = time.perf_counter()
            for batch in loader:
                data_wait += time.perf_counter() - fetch_start
                batch = move_batch(batch, self.device)
                losses, weights = self.train_step(batch)
                loss_sum += losses
                weight_sum += weights.to(self.device, losses.dtype)
                steps += 1
                bar.advance(float(losses.sum()), int(batch["image"].shape[0]))
                fetch_start = time.perf_counter()
        if steps == 0:
            raise ConfigError("the training split yields no batch; lower train.batch_size or add data")
        mean_losses = loss_sum / steps
        self.balancer.on_epoch_end(mean_losses)
        elapsed = time.perf_counter() - start
        row: dict[str, float] = {
            "epoch": float(epoch + 1),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "train_loss": float(mean_losses.sum()),
            "epoch_seconds": elapsed,
            "data_wait_fraction": data_wait / max(elapsed, 1e-9),
        }
        row.update({f"train_loss/{n}": float(v) for n, v in zip(names, mean_losses)})
        row.update({f"weight/{n}": float(v) for n, v in zip(names, weight_sum / steps)})
        return row

    def _step_scheduler(self, score: float) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(score)
        else:
            self.scheduler.step()

    # ----------------------------------------------------------------------------------------- checkpoints
    def _save_epoch(self, row: dict[str, float], tb: TensorBoardLog) -> None:
        tb.scalars({k: v for k, v in row.items() if k != "epoch"}, self.state.epoch)
        if self.run_dir is None:
            return
        write_history(self.run_dir / "history.csv", self.state.history)
        save_checkpoint(self.checkpoint_state(), self.run_dir / CHECKPOINT_NAME)

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimiser, schedule, balancer, loop and RNG state."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "balancer": self.balancer.state_dict(),
            "loop": {
                "epoch": self.state.epoch,
                "step": self.state.step,
                "best_score": self.state.best_score,
                "best_epoch": self.state.best_epoch,
                "bad_epochs": self.state.bad_epochs,
            },
            "history": self.state.history,
            "rng": rng_state(),
        }

    def resume(self) -> None:
        """Restore the state saved in ``run_dir/checkpoint.pt``."""
        if self.run_dir is None:
            raise ConfigError("resuming needs a run folder")
        state = load_checkpoint(self.run_dir / CHECKPOINT_NAME, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.balancer.load_state_dict(state["balancer"])
        loop = state["loop"]
        self.state = _State(
            epoch=loop["epoch"],
            step=loop["step"],
            best_score=loop["best_score"],
            best_epoch=loop["best_epoch"],
            bad_epochs=loop["bad_epochs"],
            history=list(state["history"]),
        )
        set_rng_state(state["rng"])
        console.print(f"Resumed from {self.run_dir / CHECKPOINT_NAME} after epoch {self.state.epoch}.")
