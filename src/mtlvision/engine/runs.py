"""Run folders: creation, the files they hold, and reading them back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtlvision.config import RunConfig, validate
from mtlvision.engine.checkpoint import atomic_write
from mtlvision.errors import MtlvisionError

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.json"


def new_run_dir(out: str | Path, name: str) -> Path:
    """``out/name``, or ``out/name-2``, ``-3``... when taken (ultralytics-style increments)."""
    out = Path(out)
    candidate, index = out / name, 2
    while candidate.exists():
        candidate, index = out / f"{name}-{index}", index + 1
    candidate.mkdir(parents=True)
    return candidate


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def write_config(run_dir: Path, config: RunConfig) -> None:
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write(run_dir / CONFIG_NAME, lambda tmp: tmp.write_text(text))


def read_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise MtlvisionError(f"{run_dir} is not an mtlvision run folder (no {CONFIG_NAME})")
    return validate(yaml.safe_load(path.read_text()) or {})


@dataclass
class Run:
    """A run folder and what it holds.

    ``metrics`` maps each task to its metrics on the evaluation split, plus ``delta_m`` (overall Δm in %,
    lower is better) when single-task baselines were available; ``report`` is the whole metrics.json.
    """

    path: Path
    config: RunConfig
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, Any]:
        result: dict[str, Any] = dict(self.report.get("metrics", {}))
        delta = self.report.get("delta_m")
        if delta is not None:
            result["delta_m"] = delta["overall"]
        return result

    @classmethod
    def load(cls, path: str | Path) -> Run:
        path = Path(path)
        report_path = path / METRICS_NAME
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        return cls(path=path, config=read_config(path), report=report)
