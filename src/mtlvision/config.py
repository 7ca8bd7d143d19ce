"""Run configuration: YAML presets shipped with the package, ``--set KEY=VALUE`` overrides, validation.

A configuration is a nested mapping validated by :class:`RunConfig`. Errors name the dotted key that is
wrong and, where the allowed values are a fixed set, list them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtlvision.errors import ConfigError
from mtlvision.validation import check_annotated, config_error_from, refuse_non_finite

if TYPE_CHECKING:
    from mtlvision.balancers.base import Balancer

PRESET_PACKAGE = "mtlvision.presets"
DEFAULT_PRESET = "scenes"


class _Strict(BaseModel):
    # allow_inf_nan=False: an infinite or NaN float (train.lr=.inf) is refused where it is given
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TaskEntry(BaseModel):
    """One task of the run: a task the dataset provides, by name, with optional overrides.

    ``head`` picks the head (``fpn``, ``aspp``, ``mlp``, ``linear``) and ``head_params`` its arguments;
    any other key is passed to the task's constructor (e.g. ``loss: berhu`` for depth).
    """

    model_config = ConfigDict(extra="allow")

    name: str
    head: str | None = None
    head_params: dict[str, Any] = Field(default_factory=dict)

    @property
    def task_params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataConfig(BaseModel):
    """``data.*``: the dataset (its own keys are validated by the dataset), loading and augmentation."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    name: str = "scenes"
    root: str | None = None
    num_workers: int = Field(0, ge=0)
    augment: dict[str, Any] = Field(default_factory=dict)
    skip_bad: bool = False
    check: bool | Literal["warn"] = Field(
        True, description="cheap data checks before training: true stops on errors, warn logs them, false skips"
    )

    @property
    def dataset_params(self) -> dict[str, Any]:
        """The keys handed to the dataset's own Params model."""
        params = dict(self.model_extra or {})
        params["name"] = self.name
        params["root"] = self.root
        return params

    @model_validator(mode="after")
    def _finite_extras(self) -> DataConfig:
        refuse_non_finite({**(self.model_extra or {}), "augment": self.augment})
        return self


class ModelConfig(_Strict):
    """``model.*``: backbone, sharing architecture, heads and initialisation."""

    backbone: str = "resnet18"
    architecture: str | dict[str, Any] = "hps"
    init: str = "kaiming"
    pretrained: str | None = None
    freeze_stages: int = Field(0, ge=0)
    backbone_lr_scale: float = Field(1.0, ge=0.0)

    @property
    def architecture_name(self) -> str:
        return self.architecture if isinstance(self.architecture, str) else str(self.architecture["name"])

    @property
    def architecture_params(self) -> dict[str, Any]:
        if isinstance(self.architecture, str):
            return {}
        return {k: v for k, v in self.architecture.items() if k != "name"}

    @field_validator("init")
    @classmethod
    def _init_is_scheme_or_run(cls, value: str) -> str:
        # A scheme name (checked against the registry by the model), a run folder or a local .safetensors
        # file to start from; the path's existence is checked when the model is built, so that a finished run
        # whose init folder was moved can still be read back and evaluated.
        if not value.strip():
            raise ValueError(
                "must name an init scheme (kaiming, xavier, orthogonal, pretrained), a run folder or a "
                ".safetensors file"
            )
        return value

    @field_validator("architecture")
    @classmethod
    def _architecture_has_name(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        if isinstance(value, dict) and "name" not in value:
            raise ValueError("a mapping for model.architecture needs a 'name' key")
        return value


class BalancerConfig(BaseModel):
    """``balancer.*``: the method's name, its mode, and its hyper-parameters beside them."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    name: str = "ew"
    mode: Literal["auto", "params", "representation"] = "auto"
    jacobian: Literal["auto", "rule", "batched", "layers", "loop"] = "auto"

    @property
    def hparams(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def checked_hparams(self) -> dict[str, Any]:
        """The hyper-parameters checked against the annotations of the method's constructor, each error naming
        its key (``balancer.weights=abc``), converted to those types."""
        from mtlvision.balancers import BALANCERS

        return check_annotated(BALANCERS.get(self.name), self.hparams, "balancer")

    @model_validator(mode="after")
    def _finite_hparams(self) -> BalancerConfig:
        refuse_non_finite(self.hparams)
        return self


class TrainConfig(_Strict):
    """``train.*``: the optimisation loop.

    ``select`` chooses the kept epoch: ``loss`` (validation loss), ``TASK.METRIC`` (that validation metric),
    ``delta_m`` (validation Δm against the single-task experts), ``delta_m_first`` (the gain of the validation
    metrics over the first epoch's, tasks weighted equally: LibMTL's rule), ``last`` (the last epoch) or
    ``mean_last:N`` (the last epoch's weights, reporting the mean of the eval split's metrics over the last N
    epochs: the Nash-MTL / FAMO protocol); the last two need no validation split. ``keep_checkpoint`` keeps
    ``checkpoint.pt`` after a run finishes (needed to extend it later with ``--resume --set train.epochs=N``);
    by default a finished run keeps only what inference needs.
    """

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0)
    scheduler: Literal["none", "cosine", "step", "plateau"] = "cosine"
    step_size: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0)
    warmup_epochs: int = Field(0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    device: str = "auto"
    early_stopping: int | None = Field(None, ge=1)
    select: str = "loss"
    deterministic: bool = False
    eval_split: Literal["val", "test"] = "test"
    progress: bool = True
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    accumulate: int = Field(1, ge=1)
    ema: float | None = Field(None, gt=0, lt=1)
    compile: bool = False
    checkpoint_every: int = Field(0, ge=0)
    max_nonfinite: int = Field(10, ge=1)
    dist_timeout: float = Field(300.0, gt=0)  # seconds a torchrun collective waits for the other ranks
    keep_checkpoint: bool = False

    @model_validator(mode="after")
    def _mean_last_within_epochs(self) -> TrainConfig:
        prefix = "mean_last:"
        count = self.select[len(prefix) :] if self.select.startswith(prefix) else None
        if count is not None and (not count.isdigit() or not 1 <= int(count) <= self.epochs):
            raise ValueError(
                f"select={self.select!r}: N in mean_last:N must be an integer from 1 to train.epochs ({self.epochs})"
            )
        return self

    @field_validator("device")
    @classmethod
    def _device_known(cls, value: str) -> str:
        if value == "auto" or value == "cpu" or value == "mps" or value.startswith("cuda"):
            return value
        raise ValueError("must be 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'")


class DistillConfig(_Strict):
    """``distill.*``: knowledge distillation from single-task experts (off while ``experts`` is unset).

    ``experts`` is a ``baselines.json`` or the folder holding it; ``weights`` maps a task to the weight of
    its distillation term (1 for tasks not listed, 0 leaves a task out); ``temperature`` softens logits;
    ``feature_weight`` weighs the feature alignment through per-task adapters (0 turns it off);
    ``regression`` is the distance to the experts' dense regression maps (depth, normals).
    """

    experts: str | None = None
    weights: dict[str, float] = Field(default_factory=dict)
    temperature: float = Field(2.0, gt=0)
    feature_weight: float = Field(1.0, ge=0)
    regression: Literal["l1", "l2"] = "l1"

    @field_validator("weights")
    @classmethod
    def _weights_non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        negative = sorted(task for task, weight in value.items() if weight < 0)
        if negative:
            raise ValueError(f"weights must be non-negative; negative for {', '.join(negative)}")
        return value


class DiagnosticsConfig(_Strict):
    """``diagnostics.*``: gradient-conflict diagnostics (:mod:`mtlvision.engine.diagnostics`).

    ``every``: every that many optimiser steps, the pairwise cosines and norms of the tasks' gradients and
    the share of conflicting pairs are recorded (0, the default, turns them off).
    """

    every: int = Field(0, ge=0)


class RunConfig(_Strict):
    """The whole run configuration."""

    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    tasks: list[TaskEntry] | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    balancer: BalancerConfig = Field(default_factory=BalancerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    baselines: str | None = None
    distill: DistillConfig = Field(default_factory=DistillConfig)
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig)

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks_from_names(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise ValueError("must be a non-empty list of task names or mappings with a 'name'")
        entries = [{"name": v} if isinstance(v, str) else v for v in value]
        names = [e.get("name") if isinstance(e, dict) else None for e in entries]
        duplicates = sorted({n for n in names if n is not None and names.count(n) > 1})
        if duplicates:
            raise ValueError(f"task names must be unique; repeated: {', '.join(duplicates)}")
        return entries

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved configuration as plain data (written to the run's config.yaml)."""
        return self.model_dump(mode="json")


# ------------------------------------------------------------------------------- rules across sections
def resolve_balancing(
    train: TrainConfig, balancing: BalancerConfig, method: Balancer
) -> Literal["params", "representation"]:
    """``balancer.mode`` resolved for ``method`` (``auto`` runs the "-UB" variants on the shared representation
    and every other method on the shared parameters), after checking every rule that ties ``train.*`` and
    ``balancer.*`` to what the method needs. The one place these rules live."""
    from mtlvision.balancers.backward import loss_scaling_refusal
    from mtlvision.balancers.base import Needs

    name = type(method).__name__
    needs_gradients = method.needs is not Needs.LOSSES
    mode: Literal["params", "representation"] = (
        ("representation" if method.prefers_representation else "params")
        if balancing.mode == "auto"
        else balancing.mode
    )
    if mode == "representation" and not method.supports_representation:
        raise ConfigError(f"balancer {name} is not defined on representation gradients; use balancer.mode=params")
    if train.accumulate > 1 and needs_gradients:
        raise ConfigError(
            f"train.accumulate={train.accumulate} works with loss-weighting balancers only: "
            f"{name} needs the per-task gradients of the whole batch at once"
        )
    if train.precision == "fp16" and loss_scaling_refusal(method) is not None:
        raise ConfigError(
            "train.precision=fp16 (with loss scaling) works with loss-weighting balancers without learnable "
            f"parameters; {name} needs unscaled gradients: use precision=bf16"
        )
    if needs_gradients and balancing.jacobian == "layers" and (train.compile or mode != "params"):
        why = (
            "a compiled forward (train.compile) runs no forward hooks"
            if train.compile
            else "it is a parameter-mode path (balancer.mode=params)"
        )
        raise ConfigError(f"balancer.jacobian=layers cannot run {name}: {why}; use balancer.jacobian=batched")
    if needs_gradients and train.compile and balancing.jacobian in ("auto", "rule", "batched"):
        raise ConfigError(
            f"train.compile=true with {name} needs balancer.jacobian=loop: the per-task gradients come from a "
            "vmapped backward, which torch.func cannot run through a compiled graph"
        )
    return mode


# --------------------------------------------------------------------------------------------- loading
def preset_names() -> list[str]:
    """Names of the presets shipped with the package."""
    folder = resources.files(PRESET_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def load_raw(source: str | Path | None) -> dict[str, Any]:
    """The raw mapping of a preset name or a YAML file path (``None`` = the default preset)."""
    source = DEFAULT_PRESET if source is None else source
    path = Path(source)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return read_yaml(path.read_text(), f"config file {path}")
    name = str(source)
    if name not in preset_names():
        raise ConfigError(f"{name!r} is neither a config file nor a preset. Presets: {', '.join(preset_names())}.")
    text = resources.files(PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text()
    return read_yaml(text, f"preset {name}")


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``KEY=VALUE`` with the value parsed as YAML (``tasks=[a,b]``, ``train.lr=3e-4``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like KEY=VALUE (e.g. train.epochs=5)")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {text!r} is not valid YAML ({exc})") from None
    # YAML 1.1 reads "3e-4" as a string; a number was meant.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key, value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set each dotted key of ``overrides`` in a copy of ``raw``."""
    result = copy.deepcopy(raw)
    for key, value in overrides.items():
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part!r} is not a section (it holds {child!r})")
            node = child
        node[parts[-1]] = value
    return result


Section = TypeVar("Section", bound=BaseModel)


def validate_section(section: str, model: type[Section], data: Mapping[str, Any]) -> Section:
    """One section of the configuration (``train``, ``balancer``, ...) from a mapping, errors naming ``section.key``."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise config_error_from(exc, section, "Invalid configuration", model=model) from None


def validate(raw: dict[str, Any]) -> RunConfig:
    """Validate a raw mapping; every problem is reported with its dotted key."""
    return validate_section("", RunConfig, raw)


def load_config(source: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> RunConfig:
    """Load a preset or YAML file, apply overrides (a mapping or ``KEY=VALUE`` strings) and validate."""
    if isinstance(overrides, list):
        overrides = dict(parse_override(item) for item in overrides)
    return validate(apply_overrides(load_raw(source), overrides or {}))
