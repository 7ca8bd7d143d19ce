"""The search space of ``mtlvision tune``: dotted config keys, each with a distribution, validated up front.

A search-space YAML maps dotted config keys to a distribution::

    balancer.name: {type: categorical, choices: [ew, cagrad, famo]}
    balancer.c: {type: float, low: 0.1, high: 0.9, when: {balancer.name: cagrad}}
    train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    train.batch_size: {type: int, low: 16, high: 64, step: 16}

``when`` makes a parameter conditional: it is drawn only when each named key (drawn earlier in the file, or
set in the configuration) holds one of the listed values; a balancer's hyper-parameters are conditional on
its name. Every key is checked against the configuration before the first trial (an unknown key with a
did-you-mean, a value the key refuses, a balancer hyper-parameter its method does not take), and every
distribution against its own rules (empty choices, low > high, log with low ≤ 0): one :class:`ConfigError`
naming the key. This module imports no optuna: :meth:`SearchSpace.sample` takes any object with Optuna's
``suggest_*`` methods.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from mtlvision.config import apply_overrides, read_yaml, validate
from mtlvision.errors import ConfigError
from mtlvision.validation import config_error_from

#: the space searched when no ``--space`` is given: balancer (with its hyper-parameters), architecture,
#: learning rate, weight decay and augmentation strength
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "balancer.name": {
        "type": "categorical",
        "choices": ["ew", "uw", "dwa", "famo", "pcgrad", "cagrad", "upgrad", "nash_mtl"],
    },
    "balancer.temperature": {"type": "float", "low": 1.0, "high": 5.0, "when": {"balancer.name": "dwa"}},
    "balancer.c": {"type": "float", "low": 0.1, "high": 0.9, "when": {"balancer.name": "cagrad"}},
    "balancer.gamma": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True, "when": {"balancer.name": "famo"}},
    "model.architecture": {"type": "categorical", "choices": ["hps", "mtan", "cross_stitch", "mmoe"]},
    "train.lr": {"type": "float", "low": 3.0e-4, "high": 1.0e-2, "log": True},
    "train.weight_decay": {"type": "float", "low": 1.0e-6, "high": 1.0e-2, "log": True},
    "data.augment.color_jitter": {"type": "float", "low": 0.0, "high": 0.4},
}


class Suggests(Protocol):
    """What :meth:`SearchSpace.sample` needs of a trial (an ``optuna.Trial``)."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float: ...


class ParamSpec(BaseModel):
    """One key's distribution: ``categorical`` (``choices``), ``int`` or ``float`` (``low``, ``high``, ``log`` or
    ``step``), drawn only ``when`` each named key holds one of the given values."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["categorical", "int", "float"]
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    when: dict[str, Any] = {}

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty list of choices")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("a categorical parameter takes choices, not low/high/log/step")
            return self
        if self.choices is not None:
            raise ValueError(f"an {self.type} parameter takes low and high, not choices")
        if self.low is None or self.high is None:
            raise ValueError(f"an {self.type} parameter needs low and high")
        if self.low > self.high:
            raise ValueError(f"low ({self.low:g}) is greater than high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"log=true needs low > 0 (got low={self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step must be positive (got {self.step:g})")
        if self.type == "int" and any(v is not None and v != int(v) for v in (self.low, self.high, self.step)):
            raise ValueError("an int parameter needs whole numbers for low, high and step")
        return self


@dataclass(frozen=True)
class Param:
    """A validated parameter of the space."""

    key: str
    spec: ParamSpec

    def applies(self, drawn: Mapping[str, Any]) -> bool:
        """Whether every ``when`` condition holds for the values drawn (or set) so far."""
        for key, allowed in self.spec.when.items():
            values = allowed if isinstance(allowed, list) else [allowed]
            if key not in drawn or drawn[key] not in values:
                return False
        return True

    def suggest(self, trial: Suggests) -> Any:
        spec = self.spec
        if spec.type == "categorical":
            return trial.suggest_categorical(self.key, spec.choices)
        low, high = float(spec.low or 0.0), float(spec.high or 0.0)
        if spec.type == "int":
            return trial.suggest_int(self.key, int(low), int(high), step=int(spec.step or 1), log=spec.log)
        return trial.suggest_float(self.key, low, high, step=spec.step, log=spec.log)

    def representatives(self) -> list[Any]:
        """Values checked against the configuration: every choice, or both ends of a range."""
        spec = self.spec
        if spec.type == "categorical":
            return list(spec.choices or [])
        ends = [spec.low, spec.high]
        return [int(v or 0) for v in ends] if spec.type == "int" else [float(v or 0.0) for v in ends]


@dataclass(frozen=True)
class SearchSpace:
    """The parameters of a study, in the order they are drawn (a condition refers to an earlier key)."""

    params: tuple[Param, ...]
    source: str = "the default search space"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str) -> SearchSpace:
        """Parse ``{key: {type: ..., ...}}``; a problem raises ConfigError naming ``source`` and the key."""
        if not data:
            raise ConfigError(f"{source} holds no parameters to search")
        params = []
        for key, raw in data.items():
            if not isinstance(raw, Mapping):
                raise ConfigError(
                    f"Invalid search space {source}:\n  {key}: must be a mapping with a type "
                    f"(categorical, int or float), got {raw!r}"
                )
            try:
                spec = ParamSpec.model_validate(dict(raw))
            except ValidationError as exc:
                raise config_error_from(exc, str(key), f"Invalid search space {source}", model=ParamSpec) from None
            params.append(Param(str(key), spec))
        return cls(tuple(params), source)

    @classmethod
    def load(cls, path: str | Path | None) -> SearchSpace:
        """A search-space YAML, or :data:`DEFAULT_SPACE` when ``path`` is None."""
        if path is None:
            return cls.from_mapping(DEFAULT_SPACE, "the default search space")
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"search space file {path} does not exist")
        return cls.from_mapping(read_yaml(path.read_text(), f"search space {path}"), f"search space {path}")

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def sample(self, trial: Suggests, base: Mapping[str, Any]) -> dict[str, Any]:
        """The overrides of one trial: each parameter whose conditions hold, drawn in order. ``base`` holds the
        configuration's own values of the keys that conditions name."""
        drawn: dict[str, Any] = dict(base)
        chosen: dict[str, Any] = {}
        for param in self.params:
            if param.applies(drawn):
                chosen[param.key] = drawn[param.key] = param.suggest(trial)
        return chosen

    def check(self, raw: Mapping[str, Any]) -> None:
        """Every key and every representative value against the configuration ``raw``; the first problem
        raises one ConfigError naming the space, the key and what is wrong."""
        for param in self.params:
            conditions = {k: (v[0] if isinstance(v, list) else v) for k, v in param.spec.when.items()}
            for value in param.representatives():
                try:
                    config = validate(apply_overrides(dict(raw), {**conditions, param.key: value}))
                    if param.key.startswith("balancer."):
                        _check_balancer_key(param.key, config.balancer.name)
                        config.balancer.checked_hparams()
                    if param.key == "model.architecture":
                        _check_architecture(config.model.architecture_name)
                except ConfigError as exc:
                    raise ConfigError(
                        f"Invalid search space {self.source}: key {param.key} = {value!r}. {exc}"
                    ) from None


def _check_architecture(name: str) -> None:
    from mtlvision.models.architectures import ARCHITECTURES

    ARCHITECTURES.get(name)  # an unknown name raises its own message listing the architectures


def _check_balancer_key(key: str, balancer: str) -> None:
    """A balancer hyper-parameter the method's constructor does not take is an error naming it."""
    from mtlvision.balancers import BALANCERS

    name = key.removeprefix("balancer.")
    if name in ("name", "mode", "jacobian"):
        BALANCERS.get(balancer)  # an unknown name raises its own message listing the balancers
        return
    accepted = inspect.signature(BALANCERS.get(balancer)).parameters
    if name in accepted or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return
    close = difflib.get_close_matches(name, list(accepted), n=1)
    hint = f"; did you mean balancer.{close[0]}?" if close else ""
    known = ", ".join(accepted) or "none"
    raise ConfigError(f"balancer {balancer!r} takes no hyper-parameter {name!r}{hint} (it takes: {known})")
