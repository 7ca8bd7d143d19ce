"""Knowledge distillation from single-task experts into one multi-task model.

Each task's term compares the student's prediction with its frozen expert's prediction on the same batch,
for every sample (labelled or not: an expert labels what the dataset lacks). The comparison depends on the
task kind only and is looked up in :data:`DISTILL_TERMS`:

- classification: KL divergence of temperature-softened class distributions, scaled by T² so that its
  gradients keep their size across temperatures (Hinton et al. 2015);
- segmentation: the same, per pixel (soft masks);
- multilabel: per label, binary cross-entropy to the expert's sigmoid minus the expert's own entropy (the
  Bernoulli KL divergence: the gradient of the cross-entropy, and zero when the student equals the expert);
- depth and normals: L1 (or L2) distance to the expert's maps;
- detection (FCOS outputs on the same locations): per location and class, the Bernoulli KL to the
  expert's class and centerness probabilities, and, where the expert sees an object, the L1 distance
  between log box distances weighted by the expert's score: the soft targets and teacher-guided box
  regression of Chen et al., "Learning Efficient Object Detection Models with Knowledge Distillation",
  NeurIPS 2017, on an anchor-free head.

With ``feature_weight`` > 0 the student's shared representation (its coarsest level) passes through a small
per-task adapter (a 1x1 convolution started at the identity) and is pulled towards the expert's
representation, both L2-normalised over channels, as in Li & Bilen, "Knowledge Distillation for Multi-task
Learning", ECCV Workshops 2020.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlvision.config import RunConfig
from mtlvision.engine.trainer import AuxiliaryLoss
from mtlvision.errors import ConfigError, MtlvisionError
from mtlvision.models.architectures.base import RepresentationUnavailable
from mtlvision.models.multitask import MultiTaskModel
from mtlvision.registry import Registry
from mtlvision.tasks.base import Task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillSettings:
    """What the terms need besides the two predictions."""

    temperature: float = 2.0
    regression: Literal["l1", "l2"] = "l1"


DistillTerm = Callable[[Any, Any, DistillSettings], Tensor]
DISTILL_TERMS: Registry[DistillTerm] = Registry("distillation term (by task kind)")


def _softened_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(teacher ‖ student) of softmax(logits / T) over dim 1, summed over classes, per sample/pixel."""
    log_student = F.log_softmax(student.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(1)


@DISTILL_TERMS.register("classification", "T² · KL of temperature-softened logits", "Hinton et al. 2015")
def classification_term(student: Tensor, teacher: Tensor, settings: DistillSettings) -> Tensor:
    return _softened_kl(student, teacher, settings.temperature).mean() * settings.temperature**2


@DISTILL_TERMS.register("segmentation", "T² · per-pixel KL of softened masks", "Hinton et al. 2015")
def segmentation_term(student: Tensor, teacher: Tensor, settings: DistillSettings) -> Tensor:
    return _softened_kl(student, teacher, settings.temperature).mean() * settings.temperature**2


def _bernoulli_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(Bernoulli(σ(teacher)) ‖ Bernoulli(σ(student))), elementwise."""
    target = torch.sigmoid(teacher_logits.float())
    cross = F.binary_cross_entropy_with_logits(student_logits.float(), target, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher_logits.float(), target, reduction="none")
    return cross - entropy


@DISTILL_TERMS.register("multilabel", "BCE to the expert's sigmoid, less the expert's entropy")
def multilabel_term(student: Tensor, teacher: Tensor, settings: DistillSettings) -> Tensor:
    return _bernoulli_kl(student, teacher).mean()


@DISTILL_TERMS.register(
    "detection",
    "Bernoulli KL to the expert's class and centerness maps, score-weighted L1 of log box distances",
    "Chen et al. 2017",
)
def detection_term(student: dict[str, Any], teacher: dict[str, Any], settings: DistillSettings) -> Tensor:
    if student["points"].shape != teacher["points"].shape or not torch.equal(student["points"], teacher["points"]):
        raise ConfigError(
            "detection distillation needs the expert's detection head on the same pyramid levels and image size "
            "as the student's (set the detection task's `strides` alike)"
        )
    classes = _bernoulli_kl(student["cls_logits"], teacher["cls_logits"]).sum(-1)  # [B, P]
    centerness = _bernoulli_kl(student["centerness"], teacher["centerness"])  # [B, P]
    with torch.no_grad():
        score = torch.sigmoid(teacher["cls_logits"].float()).amax(-1) * torch.sigmoid(teacher["centerness"].float())
        weight = score.sqrt()
    log_ratio = torch.log(student["box_distances"].float().clamp_min(1e-6)) - torch.log(
        teacher["box_distances"].float().clamp_min(1e-6)
    )
    boxes = (log_ratio.abs().sum(-1) * weight).sum() / weight.sum().clamp_min(1e-6)
    return (classes + centerness).mean() + boxes


def _regression_term(student: Tensor, teacher: Tensor, settings: DistillSettings) -> Tensor:
    difference = student.float() - teacher.float()
    return difference.abs().mean() if settings.regression == "l1" else difference.pow(2).mean()


DISTILL_TERMS.register("depth", "L1/L2 distance to the expert's depth map")(_regression_term)
DISTILL_TERMS.register("normals", "L1/L2 distance to the expert's unit normals")(_regression_term)


def feature_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over pixels of the squared distance between channel-wise L2-normalised feature maps."""
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    return (F.normalize(student.float(), dim=1) - F.normalize(teacher.float(), dim=1)).pow(2).sum(1).mean()


class Distillation(AuxiliaryLoss):
    """Per-task distillation terms from frozen experts, added to the task losses by the trainer.

    Args:
        tasks: the student's tasks, in the model's order (the returned vector follows it).
        experts: per task name, the expert model that predicts that task (under the same name).
        weights: per task name, the weight of its term; tasks not listed weigh 1, weight 0 leaves a task out.
        student: the student model, probed once on ``probe`` images for its representation's width.
        probe: a small batch of images ``[B, C, H, W]`` like the training images.
    """

    def __init__(
        self,
        tasks: Mapping[str, Task],
        experts: Mapping[str, MultiTaskModel],
        *,
        weights: Mapping[str, float] | None = None,
        temperature: float = 2.0,
        feature_weight: float = 1.0,
        regression: Literal["l1", "l2"] = "l1",
        student: MultiTaskModel | None = None,
        probe: Tensor | None = None,
    ) -> None:
        super().__init__()
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(tasks))
        if unknown:
            raise ConfigError(f"distill.weights names task(s) {', '.join(unknown)} that the run does not have")
        self.task_names = list(tasks)
        self.weights = {name: float(weights.get(name, 1.0)) for name in tasks if weights.get(name, 1.0) > 0}
        if not self.weights:
            raise ConfigError("distill.weights leaves every task out; remove distill.experts to train without it")
        self.settings = DistillSettings(temperature, regression)
        self.terms: dict[str, DistillTerm] = {}
        for name in self.weights:
            task = tasks[name]
            if task.kind not in DISTILL_TERMS:
                raise ConfigError(
                    f"distillation has no term for task {name!r} of kind {task.kind!r} (known: "
                    f"{', '.join(DISTILL_TERMS.names())}); set distill.weights.{name}=0 to leave it out"
                )
            if name not in experts:
                raise ConfigError(f"no expert for task {name!r}; set distill.weights.{name}=0 to leave it out")
            expert_tasks = getattr(experts[name], "tasks", {})
            if (
                name not in expert_tasks
                or expert_tasks[name].kind != task.kind
                or (expert_tasks[name].output_channels != task.output_channels)
            ):
                raise ConfigError(
                    f"the expert for task {name!r} does not predict a {task.kind} task {name!r} with "
                    f"{task.output_channels} outputs like the student's"
                )
            self.terms[name] = DISTILL_TERMS.get(task.kind)
        # The experts are frozen and kept out of the module tree: they are neither optimised nor saved in
        # the student's checkpoints (see _apply for moving them with this module).
        self._experts = {name: experts[name] for name in self.weights}
        for expert in self._unique_experts():
            expert.eval().requires_grad_(False)
        self.feature_weight = float(feature_weight)
        self.needs_representation = self.feature_weight > 0
        self.adapters = nn.ModuleDict()
        if self.needs_representation:
            self._build_adapters(student, probe)

    def _unique_experts(self) -> list[MultiTaskModel]:
        return list({id(m): m for m in self._experts.values()}.values())

    @torch.no_grad()
    def _build_adapters(self, student: MultiTaskModel | None, probe: Tensor | None) -> None:
        if student is None or probe is None:
            raise ConfigError("feature alignment (distill.feature_weight > 0) needs the student and a probe batch")
        student_width = self._representation(student, probe, "the student")[-1].shape[1]
        widths = {id(m): self._representation(m, probe, "an expert")[-1].shape[1] for m in self._unique_experts()}
        for name, expert in self._experts.items():
            adapter = nn.Conv2d(student_width, widths[id(expert)], kernel_size=1, bias=False)
            nn.init.dirac_(adapter.weight)
            self.adapters[name] = adapter

    @staticmethod
    def _representation(model: MultiTaskModel, images: Tensor, who: str) -> list[Tensor]:
        was_training = model.training
        model.eval()
        try:
            return model.forward_with_representation(images)[1]
        except RepresentationUnavailable as exc:
            raise ConfigError(
                f"distill.feature_weight > 0 aligns shared representations, but {who} has none ({exc}); "
                "set distill.feature_weight=0"
            ) from None
        finally:
            model.train(was_training)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Distillation:
        for expert in self._unique_experts():
            expert._apply(fn)
        return super()._apply(fn, recurse)

    def forward(
        self, batch: dict[str, Any], predictions: dict[str, Any], representation: list[Tensor] | None
    ) -> Tensor:
        images = batch["image"]
        if self.needs_representation and representation is None:
            raise ConfigError(
                "distill.feature_weight > 0 needs the model's shared representation, which its architecture does "
                "not provide; set distill.feature_weight=0"
            )
        outputs: dict[int, tuple[dict[str, Any], list[Tensor] | None]] = {}
        with torch.no_grad():
            for expert in self._unique_experts():
                expert.eval()
                if self.needs_representation:
                    outputs[id(expert)] = expert.forward_with_representation(images)
                else:
                    outputs[id(expert)] = (expert(images), None)
        terms = []
        for name in self.task_names:
            if name not in self.weights:
                terms.append(images.new_zeros((), dtype=torch.float32))
                continue
            expert_predictions, expert_representation = outputs[id(self._experts[name])]
            term = self.weights[name] * self.terms[name](predictions[name], expert_predictions[name], self.settings)
            if self.needs_representation:
                assert representation is not None and expert_representation is not None
                aligned = self.adapters[name](representation[-1])
                term = term + self.feature_weight * feature_distance(aligned, expert_representation[-1])
            terms.append(term)
        return torch.stack(terms)


def build_distillation(config: RunConfig, tasks: Sequence[Task], model: MultiTaskModel) -> Distillation:
    """The distillation loss of ``distill.*`` with the frozen experts of ``distill.experts``."""
    from mtlvision.engine.build import build_split, load_model
    from mtlvision.engine.runs import Baselines

    settings = config.distill
    assert settings.experts is not None
    runs = Baselines.load(settings.experts).expert_runs()
    weights = dict(settings.weights)
    wanted = [t.name for t in tasks if weights.get(t.name, 1.0) > 0]
    missing = [name for name in wanted if name not in runs]
    if missing:
        raise MtlvisionError(
            f"distill.experts={settings.experts} has no expert for task(s) {', '.join(missing)}; train them with "
            f"`mtlvision baseline` or set distill.weights.<task>=0"
        )
    experts = {name: load_model(runs[name])[0] for name in wanted}
    probe = build_split(config, tasks, "train", train=False)[0]["image"][None]
    logger.info("Distilling from experts: %s", ", ".join(f"{n} ({runs[n]})" for n in wanted))
    return Distillation(
        {t.name: t for t in tasks},
        experts,
        weights=weights,
        temperature=settings.temperature,
        feature_weight=settings.feature_weight,
        regression=settings.regression,
        student=model,
        probe=probe,
    )
