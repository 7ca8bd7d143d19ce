"""What may differ between two runs: the overrides ``train --resume`` accepts, and the settings a run and its
single-task experts must share for a fair Δm. Rules on configuration keys, like :mod:`mtlvision.config`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mtlvision.config import RunConfig, apply_overrides, parse_override, validate
from mtlvision.errors import ConfigError

#: what ``train --resume RUN --set ...`` may change: how the rest of the run is carried out, not what was
#: trained so far (the optimiser's settings, train.lr included, are part of the checkpoint and stay)
RESUME_KEYS = (
    "train.epochs",
    "train.early_stopping",
    "train.checkpoint_every",
    "train.keep_checkpoint",
    "train.progress",
    "train.device",
    "train.max_nonfinite",
    "data.num_workers",
    "diagnostics.every",
)

#: settings that may differ between a run and its single-task experts without a Δm warning: the tasks and
#: how they are balanced or distilled (what Δm measures), names and bookkeeping (prefixes of dotted keys)
DELTA_M_EXEMPT = (
    "tasks",
    "balancer",
    "distill",
    "baselines",
    "seed",
    "model.init",
    "model.architecture",
    "train.device",
    "train.progress",
    "train.checkpoint_every",
    "train.keep_checkpoint",
    "train.compile",
    "train.deterministic",
    "train.max_nonfinite",
    "train.eval_split",
    "data.num_workers",
    "data.skip_bad",
    "diagnostics",
)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (lists are values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def _show(value: Any) -> str:
    return "unset" if value is None else repr(value)


def _exempt(key: str, exempt: Sequence[str]) -> bool:
    return any(key == e or key.startswith(f"{e}.") for e in exempt)


def differences(
    mine: Mapping[str, Any], theirs: Mapping[str, Any], labels: tuple[str, str], exempt: Sequence[str] = ()
) -> list[str]:
    """``key (label0 X, label1 Y)`` for every dotted key of two flattened settings whose values differ, keys
    under ``exempt`` (prefixes) left out."""
    keys = [k for k in dict.fromkeys([*mine, *theirs]) if not _exempt(k, exempt)]
    return [
        f"{k} ({labels[0]} {_show(mine.get(k))}, {labels[1]} {_show(theirs.get(k))})"
        for k in keys
        if mine.get(k) != theirs.get(k)
    ]


def comparable_settings(config: RunConfig) -> dict[str, Any]:
    """The flattened settings of a run that its Δm experts should share (all but :data:`DELTA_M_EXEMPT`).

    An empty mapping (``data.augment: {}``) is left out: it says no more than its keys' absence, which the
    other side's keys already show (``data.augment.color_jitter (run 0.1, expert unset)``)."""
    flat = flatten(config.to_dict())
    return {k: v for k, v in flat.items() if not _exempt(k, DELTA_M_EXEMPT) and not (isinstance(v, Mapping) and not v)}


def with_resume_overrides(config: RunConfig, overrides: Mapping[str, Any] | Sequence[str] | None) -> RunConfig:
    """A stored run configuration with the overrides ``--resume`` accepts (:data:`RESUME_KEYS`); an override that
    would change any other key is refused, naming it (one that restates the stored value is accepted)."""
    if not overrides:
        return config
    items = dict(overrides) if isinstance(overrides, Mapping) else dict(parse_override(o) for o in overrides)
    updated = validate(apply_overrides(config.to_dict(), items))
    before, after = flatten(config.to_dict()), flatten(updated.to_dict())
    changed = differences(before, after, ("run", "asked"), exempt=RESUME_KEYS)
    if changed:
        raise ConfigError(
            f"--resume continues a run with its own settings; these cannot change: {', '.join(changed)}. "
            f"On resume --set accepts {', '.join(RESUME_KEYS)}; for other settings start a new run "
            "(from this run's weights with --set model.init=RUN)."
        )
    return updated
