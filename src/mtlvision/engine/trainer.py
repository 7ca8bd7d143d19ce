"""The training loop: one forward, per-task losses, the balancer's update, the optimiser step.

Our own loop (rather than a generic one) so that gradient-balancing methods fit: the
:class:`~mtlvision.balancers.engine.GradientEngine` computes per-task gradients only when the balancer asks
for them. Validation runs every epoch; the best epoch on the validation split (never the test split) is
kept as ``model.safetensors``; a resumable ``checkpoint.pt`` is written atomically after every epoch and,
with ``checkpoint_every``, every that many steps, holding everything a step depends on (weights, optimiser,
schedule, balancer state, EMA, sampler position, RNG states), so that a killed run resumes exactly.

Under torchrun every rank runs this loop on its shard of each batch; see :mod:`mtlvision.engine.distributed`
for how updates are made equal to a single process on the combined batch.

The module is longer than most (about 550 lines) because the step, the epoch loop and its checkpoints are
one object; the pieces that stand alone live beside it (:mod:`~mtlvision.engine.loop_state`,
:func:`~mtlvision.engine.sampler.epoch_loader`).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset

from mtlvision.balancers import (
    Balancer,
    GradientEngine,
    LayerTaps,
    Needs,
    NonFiniteGramianError,
    RecordedStep,
    resolve_jacobian_path,
)
from mtlvision.balancers import get as get_balancer
from mtlvision.balancers.bilevel import BilevelBalancer
from mtlvision.balancers.engine import JacobianChoice
from mtlvision.balancers.jacobian.choice import CACHE_NAME, PathChoice
from mtlvision.config import BalancerConfig, RunConfig, TrainConfig, resolve_balancing, validate_section
from mtlvision.data.collate import Collate
from mtlvision.engine import distributed as dist
from mtlvision.engine.bilevel import MetaStep
from mtlvision.engine.checkpoint import load_checkpoint, save_checkpoint, save_weights
from mtlvision.engine.compilation import CompiledModel
from mtlvision.engine.device import resolve_device, rng_state, seed_everything, set_rng_state
from mtlvision.engine.diagnostics import GradientDiagnostics
from mtlvision.engine.logging import EpochProgress, EpochSummary, TensorBoardLog, flatten_metrics, write_history
from mtlvision.engine.loop_state import (
    EVAL_PREFIX,
    FitResult,
    LoopState,
    NonFiniteLossError,
    Selection,
    StopRequest,
    TrainingInterrupted,
)
from mtlvision.engine.optim import build_optimizer, build_scheduler
from mtlvision.engine.precision import Precision
from mtlvision.engine.probes import ProbeContext, StepProbe, strongest_record
from mtlvision.engine.runs import CHECKPOINT_NAME, HISTORY_NAME, TENSORBOARD_DIR, WEIGHTS_NAME
from mtlvision.engine.sampler import epoch_loader
from mtlvision.errors import ConfigError, MtlvisionError
from mtlvision.evaluation.evaluator import EvalResult, evaluate, move_batch
from mtlvision.models.architectures.base import DEEP_SUPERVISION, RepresentationUnavailable
from mtlvision.models.multitask import CutRepresentation, MultiTaskModel
from mtlvision.tasks.base import Task

logger = logging.getLogger(__name__)

#: keyword options of :class:`Trainer` that set ``balancer.*`` keys
_BALANCING_OPTIONS = {"balancer_mode": "mode", "jacobian": "jacobian"}


class AuxiliaryLoss(nn.Module, ABC):
    """Extra per-task loss terms added to the task losses before balancing (e.g. distillation).

    Called with the batch, the model's predictions and, when ``needs_representation``, the shared
    representation (else None); returns a [T] vector in task order. Its parameters join the optimiser.
    """

    needs_representation: bool = False

    @abstractmethod
    def forward(
        self, batch: dict[str, Any], predictions: dict[str, Any], representation: list[Tensor] | None
    ) -> Tensor: ...


class Trainer:
    """Trains a multi-task model (dict in, dict out) with a balancer.

    ``train`` is the validated ``train.*`` section (:class:`~mtlvision.config.TrainConfig`); keyword
    ``options`` override its keys (``epochs=5, lr=3e-4``) and are validated the same way. ``balancer`` is a
    method (an instance or a registered name) or the whole ``balancer.*`` section
    (:class:`~mtlvision.config.BalancerConfig`, with ``mode`` and ``jacobian``); ``balancer_mode`` and
    ``jacobian`` options override those two keys. ``seed`` seeds data order, augmentation and the global RNGs
    at construction; ``num_workers`` is ``data.num_workers``; ``backbone_lr_scale`` is
    ``model.backbone_lr_scale``. Every rule tying these together is checked once, by
    :func:`~mtlvision.config.resolve_balancing`.

    ``select`` (``train.select``) is ``"loss"`` (the sum of the tasks' mean validation losses, lower is
    better), ``"TASK.METRIC"`` (that validation metric in its own direction), ``"delta_m"`` (validation Δm
    against ``selection.baselines``), ``"delta_m_first"`` (gain over the first epoch's validation metrics,
    LibMTL's rule), ``"last"`` (the last epoch) or ``"mean_last:N"`` (the last epoch, the
    eval split's metrics recorded over the last N epochs; see :class:`~mtlvision.engine.loop_state.Selection`).
    ``ema`` keeps an exponential moving average of the weights, which is what gets evaluated and saved.
    ``on_epoch_end`` is called with an :class:`~mtlvision.engine.logging.EpochSummary` after every epoch.
    ``probes`` (:mod:`mtlvision.engine.probes`) look at every ``every``-th step before the optimiser moves:
    the gradient-conflict diagnostics, TAG's task affinity.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        balancer: Balancer | str | BalancerConfig = "ew",
        train: TrainConfig | None = None,
        *,
        seed: int = 0,
        num_workers: int = 0,
        backbone_lr_scale: float = 1.0,
        run_dir: str | Path | None = None,
        on_step: Callable[[Trainer], None] | None = None,
        on_epoch_end: Callable[[EpochSummary], None] | None = None,
        auxiliary: AuxiliaryLoss | None = None,
        probes: Sequence[StepProbe] = (),
        **options: Any,
    ) -> None:
        balancing_options = {key: options.pop(old) for old, key in _BALANCING_OPTIONS.items() if old in options}
        config = validate_section("train", TrainConfig, {**(train.model_dump() if train else {}), **options})
        if isinstance(balancer, BalancerConfig):
            balancing = validate_section("balancer", BalancerConfig, {**balancer.model_dump(), **balancing_options})
            method = get_balancer(balancing.name, **balancing.checked_hparams())
        else:
            name = balancer if isinstance(balancer, str) else type(balancer).__name__
            balancing = validate_section("balancer", BalancerConfig, {"name": name, **balancing_options})
            method = get_balancer(balancer) if isinstance(balancer, str) else balancer
        self.config, self.balancing, self.balancer = config, balancing, method
        self.balancer_mode = resolve_balancing(config, balancing, method)
        self.model = model
        self.tasks: dict[str, Task] = dict(model.tasks)
        self.epochs = config.epochs
        self.batch_size = config.batch_size
        self.selection = Selection(config.select, self.tasks)
        self.num_workers = num_workers
        self.seed = seed
        self.accumulate = config.accumulate
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress = config.progress and dist.is_main()
        self.on_step = on_step
        self.on_epoch_end = on_epoch_end
        self.auxiliary = auxiliary
        self.device = dist.setup(resolve_device(config.device), config.dist_timeout)
        seed_everything(seed, config.deterministic)
        self.precision = Precision(config.precision, self.device)
        self.model.to(self.device)
        self.balancer.setup(len(self.tasks))
        self.balancer.to(self.device)
        self.forward: Any = CompiledModel(model) if config.compile else model
        # the EMA copy averages the weights; update_parameters copies the model's buffers (BatchNorm statistics)
        self.ema = (
            AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema)) if config.ema is not None else None
        )
        # after the EMA copy, which would otherwise copy the taps' hooks
        self.jacobian, self.taps = self._jacobian_path(balancing.jacobian, config.compile)
        #: what ``balancer.jacobian=auto`` measured at the first step (path and seconds per path), else None
        self.jacobian_choice: PathChoice | None = None
        groups = list(model.parameter_groups(backbone_lr_scale))
        balancer_params = [p for p in self.balancer.parameters() if p.requires_grad]
        if balancer_params:
            groups.append({"name": "balancer", "params": balancer_params, "weight_decay": 0.0})
        if auxiliary is not None:
            auxiliary.to(self.device)
            auxiliary_params = [p for p in auxiliary.parameters() if p.requires_grad]
            if auxiliary_params:
                groups.append({"name": "auxiliary", "params": auxiliary_params})
        self.optimizer = build_optimizer(config.optimizer, groups, config.lr, config.weight_decay, config.momentum)
        self.scheduler = build_scheduler(
            config.scheduler, self.optimizer, config.epochs, config.warmup_epochs, config.step_size, config.gamma
        )
        self.collate = Collate(self.tasks)
        self.state = LoopState()
        # Gradient methods get the shared representation too: the engine then reaches each head once and
        # batches the trunk. Architectures without one raise RepresentationUnavailable (see _forward_losses).
        self._uses_representation = (
            self.balancer_mode == "representation"
            or self.balancer.needs is not Needs.LOSSES
            or (auxiliary is not None and auxiliary.needs_representation)
        )
        self.stop = StopRequest()
        self.probes = list(probes)
        if self.probes and config.accumulate > 1:
            raise ConfigError(
                f"diagnostics and affinity look at one batch's gradients; train.accumulate={config.accumulate} "
                "spreads a step over several: use train.accumulate=1"
            )
        if any(probe.record == "jacobian" for probe in self.probes) and self.balancer_mode == "representation":
            raise ConfigError(
                "task affinity takes lookahead steps on the shared parameters, so it needs their per-task gradients: "
                f"use balancer.mode=params (balancer {type(self.balancer).__name__} runs in representation mode)"
            )
        self._recorded: tuple[RecordedStep, float] | None = None
        self._tb = TensorBoardLog(None)
        self._meta: MetaStep | None = None  # bilevel balancers' meta-step, set up by fit() with val_data

    @classmethod
    def from_config(
        cls,
        config: RunConfig,
        model: MultiTaskModel,
        run_dir: Path | None = None,
        auxiliary: AuxiliaryLoss | None = None,
        probes: Sequence[StepProbe] = (),
    ) -> Trainer:
        """A trainer with every ``train.*``, ``balancer.*`` and ``diagnostics.*`` setting of a whole run
        configuration; ``probes`` are added to the diagnostics."""
        every = config.diagnostics.every
        return cls(
            model,
            config.balancer,
            config.train,
            seed=config.seed,
            num_workers=config.data.num_workers,
            backbone_lr_scale=config.model.backbone_lr_scale,
            run_dir=run_dir,
            auxiliary=auxiliary,
            probes=[*([GradientDiagnostics(every)] if every else []), *probes],
        )

    # ------------------------------------------------------------------------------------------ helpers
    def _jacobian_path(self, requested: str, compile: bool) -> tuple[JacobianChoice, LayerTaps | None]:
        """``balancer.jacobian`` resolved (see :func:`~mtlvision.balancers.resolve_jacobian_path`), with the
        forward hooks path ``"layers"`` needs; the configuration's rules were checked by ``resolve_balancing``,
        what is left depends on the model."""
        needs_gradients = self.balancer.needs is not Needs.LOSSES
        taps = None
        if (
            requested in ("auto", "rule", "layers")
            and needs_gradients
            and not compile
            and self.balancer_mode == "params"
        ):
            taps = LayerTaps(self.model, self.model.shared_parameters())
        path = resolve_jacobian_path(requested, self.balancer, self.balancer_mode, bool(taps))
        if path == "layers" and needs_gradients and not taps:
            raise ConfigError(
                f"balancer.jacobian=layers cannot run {type(self.balancer).__name__}: the shared parameters hold "
                "no Conv2d or Linear layer it can tap; use balancer.jacobian=batched"
            )
        if taps is not None and path not in ("layers", "auto"):
            taps.remove()
            taps = None
        return path, taps

    def _chosen(self, engine: GradientEngine) -> None:
        """Keep what ``balancer.jacobian=auto`` chose at the first step (see :attr:`jacobian_choice`)."""
        if self.jacobian != "auto" or engine.jacobian_path == "auto":
            return
        self.jacobian, self.jacobian_choice = engine.jacobian_path, engine.choice
        if self.taps is not None and self.jacobian != "layers":
            self.taps.remove()
            self.taps = None

    def loader(self, data: Dataset | DataLoader, shuffle: bool, epoch: int = 0, start: int = 0) -> DataLoader:
        """A DataLoader over this rank's shard of ``data`` (see :func:`~mtlvision.engine.sampler.epoch_loader`)."""
        return epoch_loader(
            data,
            self.batch_size,
            shuffle,
            seed=self.seed,
            epoch=epoch,
            start=start,
            num_workers=self.num_workers,
            collate=self.collate,
            pin_memory=self.device.type == "cuda",
        )

    def task_losses(self, predictions: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        """The [T] vector of per-task losses (float32), each over the samples that carry that task's label.

        A task's intermediate predictions (deep supervision, see :data:`DEEP_SUPERVISION`) add their losses
        to its own, unweighted, as MTI-Net's and PAD-Net's papers train them.
        """
        intermediate = predictions.get(DEEP_SUPERVISION, {})
        losses = []
        for name, task in self.tasks.items():
            target, valid = batch["targets"][name], batch["valid"][name]
            loss = task.loss(predictions[name], target, valid).float()
            for prediction in intermediate.get(name, ()):
                loss = loss + task.loss(prediction, target, valid).float()
            losses.append(loss)
        return torch.stack(losses)

    # ------------------------------------------------------------------------------------------ training
    def _forward_losses(self, batch: dict[str, Any]) -> tuple[Tensor, CutRepresentation | None]:
        cut = None
        with self.precision.autocast(), self.taps.recording() if self.taps is not None else nullcontext():
            if self._uses_representation:
                try:
                    predictions, cut = self.forward.forward_cut(batch["image"])
                except RepresentationUnavailable:
                    if self.balancer_mode == "representation":
                        raise
                    self._uses_representation = False
                    predictions = self.forward(batch["image"])
            else:
                predictions = self.forward(batch["image"])
            losses = self.task_losses(predictions, batch)
            if self.auxiliary is not None:
                losses = losses + self.auxiliary(batch, predictions, cut.inputs if cut is not None else None).float()
        return losses, cut

    def _backward(self, losses: Tensor, cut: CutRepresentation | None, scale: float) -> Tensor:
        """Accumulate this batch's update into ``.grad``; returns the balancer's task weights."""
        # an auxiliary loss's parameters (distillation adapters) act on one task's term each: task-specific
        auxiliary = [p for p in self.auxiliary.parameters() if p.requires_grad] if self.auxiliary is not None else []
        engine = GradientEngine(
            list(self.model.shared_parameters()),
            [*self.model.task_specific_parameters(), *auxiliary],
            cut.inputs if cut is not None else None,
            trunk=cut.trunk if cut is not None else None,
            mode=self.balancer_mode,
            jacobian=self.jacobian,
            taps=self.taps,
            reduce=dist.all_reduce_mean if dist.is_distributed() else None,
            cache_file=self.run_dir / CACHE_NAME if self.run_dir is not None else None,
        )
        balanced = dist.global_valued(losses)
        if self.precision.scaler is not None:
            # the balancer sees unscaled loss values; gradients arrive scaled for the fp16 scaler
            factor = self.precision.scaler.get_scale() * scale
            balanced = balanced * factor - (balanced * (factor - 1)).detach()
        elif scale != 1.0:
            balanced = balanced * scale - (balanced * (scale - 1)).detach()
        record = strongest_record(self.probes, self.state.step)
        weights = engine.backward(balanced, self.balancer, record).weights.detach()
        self._chosen(engine)
        if engine.recorded is not None:
            factor = self.precision.scaler.get_scale() * scale if self.precision.scaler is not None else scale
            self._recorded = (engine.recorded, factor)
        return weights

    def _observe(self, batch: dict[str, Any], losses: Tensor) -> None:
        """Hand the recorded step to the probes due at it (before the optimiser step)."""
        if self._recorded is None:
            return
        (recorded, factor), self._recorded = self._recorded, None
        model = self.model

        def task_losses(replaced: dict[str, Tensor]) -> Tensor:
            # fresh copies of the buffers: a BatchNorm in train mode updates its running statistics in place
            tensors = {**{n: b.clone() for n, b in model.named_buffers()}, **replaced}
            with torch.no_grad(), self.precision.autocast():
                predictions = torch.func.functional_call(model, tensors, (batch["image"],), strict=False)
                return self.task_losses(predictions, batch)

        names = {id(p): n for n, p in model.named_parameters()}
        lrs = {id(p): float(group["lr"]) for group in self.optimizer.param_groups for p in group["params"]}
        shared = [p for p in model.shared_parameters() if p.requires_grad]  # the engine's order
        context = ProbeContext(
            step=self.state.step,
            epoch=self.state.epoch,
            task_names=list(self.tasks),
            losses=losses.detach(),
            recorded=recorded,
            grad_scale=factor,
            batch=batch,
            shared=shared,
            shared_names=[names[id(p)] for p in shared],
            shared_lrs=[lrs[id(p)] for p in shared],
            task_losses=task_losses,
        )
        for probe in self.probes:
            if probe.due(self.state.step):
                self._tb.scalars(probe.observe(context), self.state.step)

    def _grads_finite(self) -> bool:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return True
        return bool(torch.isfinite(torch.stack([g.detach().float().norm() for g in grads])).all())

    def train_step(self, batches: list[dict[str, Any]]) -> tuple[Tensor, Tensor] | None:
        """One optimisation step over ``batches`` (one, or ``accumulate`` of them).

        Returns the mean detached task losses and task weights, or None when the step was skipped
        because a loss or gradient was not finite.
        """
        if isinstance(self.balancer, BilevelBalancer):
            if self._meta is None:
                raise ConfigError(
                    f"balancer {type(self.balancer).__name__} is bilevel: train it with fit(..., val_data)"
                )
            self._meta(batches[0])  # the task weights learn from a validation batch first
        self.optimizer.zero_grad(set_to_none=True)
        loss_total: Tensor | None = None
        weights: Tensor | None = None
        for batch in batches:
            losses, cut = self._forward_losses(batch)
            if not bool(torch.isfinite(dist.all_reduce_sum(losses.detach())).all()):
                self._skip(losses)
                return None
            try:
                weights = self._backward(losses, cut, 1.0 / len(batches))
            except NonFiniteGramianError:  # gradients overflowed: skipped like a non-finite loss
                self._skip(losses)
                return None
            loss_total = losses.detach() if loss_total is None else loss_total + losses.detach()
            self._observe(batch, losses)
        assert loss_total is not None and weights is not None
        if self._meta is not None:  # a bilevel method's own part of the update (FORUM's)
            self._meta.add_gradient(self.precision.scaler.get_scale() if self.precision.scaler is not None else 1.0)
        dist.average_gradients(list(self.model.parameters()) + list(self.balancer.parameters()))
        scaler = self.precision.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        elif not self._grads_finite():
            self._skip(loss_total)
            return None
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        if scaler is not None:
            scale_before = scaler.get_scale()
            scaler.step(self.optimizer)
            scaler.update()
            if scaler.get_scale() < scale_before:  # the scaler found inf/NaN gradients and skipped the step
                self.state.skipped_steps += 1
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        if self.balancer.needs_post_step_losses:
            with torch.no_grad():
                new = torch.stack([self._forward_losses(b)[0] for b in batches]).mean(0)
            self.balancer.after_step(dist.all_reduce_mean(new))
        self.state.step += 1
        return dist.all_reduce_mean(loss_total / len(batches)), weights

    def _skip(self, losses: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.state.skipped_steps += 1
        logger.warning(
            "step %d: non-finite loss or gradient (%s); step skipped (%d/%d)",
            self.state.step,
            ", ".join(f"{n}={v:.3g}" for n, v in zip(self.tasks, losses.tolist())),
            self.state.skipped_steps,
            self.config.max_nonfinite,
        )
        if self.state.skipped_steps >= self.config.max_nonfinite:
            raise NonFiniteLossError(
                f"{self.state.skipped_steps} steps had a non-finite loss or gradient (train.max_nonfinite="
                f"{self.config.max_nonfinite}); lower train.lr, set train.grad_clip, or check the data"
            )

    def fit(
        self,
        train_data: Dataset | DataLoader,
        val_data: Dataset | DataLoader | None = None,
        resume: bool = False,
        eval_data: Dataset | DataLoader | None = None,
    ) -> FitResult:
        """Train for ``epochs`` epochs (continuing from ``run_dir/checkpoint.pt`` when ``resume``).

        Under ``train.select=mean_last:N``, ``eval_data`` (the eval split) is evaluated after each of the last
        ``N`` epochs and its metrics recorded in the history as ``eval/TASK/METRIC``.
        """
        if self.selection.average_last is not None and eval_data is None:
            raise ConfigError(
                f"train.select={self.config.select}: the eval split's metrics of the last epochs are averaged, "
                "so fit() needs eval_data."
            )
        if isinstance(self.balancer, BilevelBalancer):
            self._meta = MetaStep(self, val_data)
        if resume:
            self.resume()
        tb = TensorBoardLog(self.run_dir / TENSORBOARD_DIR if self.run_dir is not None and dist.is_main() else None)
        self._tb = tb
        stopped_early = False
        best_val: EvalResult | None = None
        try:
            with self.stop.catching(), dist.peer_guard(self.run_dir):
                for epoch in range(self.state.epoch, self.epochs):
                    self.model.architecture.set_progress(epoch, self.epochs)
                    row = self._train_epoch(train_data, epoch, tb)
                    val, monitor = None, float(row["train_loss"])
                    if val_data is not None:
                        val = self.evaluate(val_data)
                        row.update({f"val_loss/{t}": v for t, v in val.losses.items()})
                        row.update(flatten_metrics("val", val.metrics))
                        monitor = val.total_loss
                    if eval_data is not None and self.selection.tracks_eval_split(epoch, self.epochs):
                        row.update(flatten_metrics(EVAL_PREFIX, self.evaluate(eval_data).metrics))
                    score = self.selection.score(val, epoch + 1, fallback=monitor, history=self.state.history)
                    row["score"] = score
                    self._step_scheduler(monitor if self.selection.last else score)
                    self.state.epoch, self.state.epoch_batches = epoch + 1, 0
                    self.state.history.append(row)
                    if score < self.state.best_score:
                        self.state.best_score, self.state.best_epoch, self.state.bad_epochs = score, epoch + 1, 0
                        best_val = val
                        if self.run_dir is not None and dist.is_main():
                            save_weights(self.evaluated_model, self.run_dir / WEIGHTS_NAME)
                    else:
                        self.state.bad_epochs += 1
                    tb.scalars({k: v for k, v in row.items() if k != "epoch"}, self.state.epoch)
                    self._save()
                    self._epoch_end(row, val)
                    if self.config.early_stopping is not None and self.state.bad_epochs >= self.config.early_stopping:
                        logger.info(
                            "Early stopping: the validation score did not improve for %d epochs.",
                            self.config.early_stopping,
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
            skipped_steps=self.state.skipped_steps,
        )

    def _epoch_end(self, row: dict[str, float], val: EvalResult | None) -> None:
        if self.on_epoch_end is None or not dist.is_main():
            return
        state = self.state
        best = next((r for r in state.history if int(r["epoch"]) == state.best_epoch), row)
        self.on_epoch_end(
            EpochSummary(
                epoch=state.epoch,
                epochs=self.epochs,
                train_loss=float(row["train_loss"]),
                val_loss=val.total_loss if val is not None else None,
                metrics=EpochSummary.metrics_of(row),
                best_epoch=state.best_epoch,
                best_metrics=EpochSummary.metrics_of(best),
                is_best=state.best_epoch == state.epoch,
            )
        )

    @property
    def evaluated_model(self) -> nn.Module:
        """The weights that are evaluated and saved: the EMA when enabled, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def evaluate(self, data: Dataset | DataLoader) -> EvalResult:
        """Metrics and losses of the evaluated model over ``data`` (sharded and reduced across ranks)."""
        return evaluate(
            self.evaluated_model, self.loader(data, shuffle=False), self.tasks, self.device, dist.all_reduce_sum
        )

    def _train_epoch(self, train_data: Dataset | DataLoader, epoch: int, tb: TensorBoardLog) -> dict[str, float]:
        self.model.train()
        state = self.state
        start_batch = state.epoch_batches
        if start_batch == 0:
            state.loss_sum, state.weight_sum, state.epoch_steps = [0.0] * len(self.tasks), [0.0] * len(self.tasks), 0
        loader = self.loader(train_data, shuffle=True, epoch=epoch, start=start_batch * self.batch_size)
        names = list(self.tasks)
        data_wait, started = 0.0, time.perf_counter()
        pending: list[dict[str, Any]] = []
        with EpochProgress(f"epoch {epoch + 1}/{self.epochs}", len(loader), self.progress) as bar:
            fetch_start = time.perf_counter()
            for batch in loader:
                data_wait += time.perf_counter() - fetch_start
                pending.append(move_batch(batch, self.device))
                state.epoch_batches += 1
                if len(pending) == self.accumulate or state.epoch_batches == start_batch + len(loader):
                    result = self.train_step(pending)
                    dist.average_running_stats(self.model)
                    images = sum(int(b["image"].shape[0]) for b in pending)
                    pending = []
                    if result is not None:
                        losses, weights = result
                        state.loss_sum = [a + float(b) for a, b in zip(state.loss_sum, losses)]
                        state.weight_sum = [a + float(b) for a, b in zip(state.weight_sum, weights)]
                        state.epoch_steps += 1
                        bar.advance(float(losses.sum()), images)
                        tb.scalars({f"step/weight/{n}": float(w) for n, w in zip(names, weights)}, state.step)
                    if self.on_step is not None:
                        self.on_step(self)
                    if self.config.checkpoint_every and state.step % self.config.checkpoint_every == 0:
                        self._save()
                    if self.stop.agreed(self.device):  # every rank, at the same step
                        self._save()
                        raise TrainingInterrupted(
                            f"stopped by signal {self.stop.name} at step {state.step}; "
                            f"checkpoint saved — resume with `mtlvision train --resume {self.run_dir}`"
                        )
                else:
                    bar.advance(float("nan"), 0)
                fetch_start = time.perf_counter()
        if state.epoch_steps == 0:
            raise ConfigError("no training step succeeded this epoch; lower train.batch_size or add data")
        mean_losses = torch.tensor(state.loss_sum) / state.epoch_steps
        self.balancer.on_epoch_end(mean_losses.to(self.device))
        elapsed = time.perf_counter() - started
        row: dict[str, float] = {
            "epoch": float(epoch + 1),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "train_loss": float(mean_losses.sum()),
            "epoch_seconds": elapsed,
            "data_wait_fraction": data_wait / max(elapsed, 1e-9),
            "skipped_steps": float(state.skipped_steps),
        }
        row.update({f"train_loss/{n}": float(v) for n, v in zip(names, mean_losses)})
        row.update({f"weight/{n}": v / state.epoch_steps for n, v in zip(names, state.weight_sum)})
        for probe in self.probes:
            row.update(probe.epoch_end())
        return row

    def _step_scheduler(self, score: float) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(score)
        else:
            self.scheduler.step()

    # ----------------------------------------------------------------------------------------- checkpoints
    def _save(self) -> None:
        """History and checkpoint, from rank 0 only; every rank waits until they are on disk."""
        if self.run_dir is not None and dist.is_main():
            if self.state.history:
                write_history(self.run_dir / HISTORY_NAME, self.state.history)
            for probe in self.probes:
                probe.write(self.run_dir)
            save_checkpoint(self.checkpoint_state(), self.run_dir / CHECKPOINT_NAME)
        dist.barrier()

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimiser, schedule, balancer, EMA, loop, RNG."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "balancer": self.balancer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "auxiliary": self.auxiliary.state_dict() if self.auxiliary is not None else None,
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else None,
            **self.state.to_checkpoint(),
            "probes": [probe.state_dict() for probe in self.probes],
            "rng": rng_state(),
        }

    def resume(self) -> None:
        """Restore the state saved in ``run_dir/checkpoint.pt`` (every rank reads the same file)."""
        if self.run_dir is None:
            raise ConfigError("resuming needs a run folder")
        saved = load_checkpoint(self.run_dir / CHECKPOINT_NAME, map_location=self.device)
        try:
            self.model.load_state_dict(saved["model"])
        except RuntimeError as exc:
            raise MtlvisionError(
                f"{self.run_dir / CHECKPOINT_NAME} does not fit this model: {str(exc).splitlines()[0]}"
            ) from None
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.balancer.load_state_dict(saved["balancer"])
        if self.ema is not None and saved["ema"] is not None:
            self.ema.load_state_dict(saved["ema"])
        if self.auxiliary is not None and saved.get("auxiliary") is not None:
            self.auxiliary.load_state_dict(saved["auxiliary"])
        if self.precision.scaler is not None and saved["scaler"] is not None:
            self.precision.scaler.load_state_dict(saved["scaler"])
        self.state = LoopState.from_checkpoint(saved)
        for probe, probe_state in zip(self.probes, saved.get("probes") or []):
            probe.load_state_dict(probe_state)
        if self.state.epoch > self.epochs:
            raise ConfigError(
                f"train.epochs={self.epochs} is fewer than the {self.state.epoch} epochs {self.run_dir} has completed"
            )
        set_rng_state(saved["rng"])
        logger.info(
            "Resumed from %s: epoch %d, batch %d, step %d.",
            self.run_dir / CHECKPOINT_NAME,
            self.state.epoch + 1,
            self.state.epoch_batches,
            self.state.step,
        )
