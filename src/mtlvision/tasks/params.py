"""Checks of task constructor parameters, raising :class:`ConfigError` with the task and parameter named."""

from __future__ import annotations

from collections.abc import Sequence

from mtlvision.errors import ConfigError


def require_count(task: str, parameter: str, value: int, minimum: int) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an integer of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"Task {task!r}: {parameter} must be an integer >= {minimum}, got {value!r}.")


def name_list(task: str, parameter: str, count: int, names: Sequence[str] | None) -> list[str]:
    """The given names (one per class, checked against ``count``), or ``"0" .. "count-1"`` when None."""
    if names is None:
        return [str(i) for i in range(count)]
    if isinstance(names, str):
        raise ConfigError(f"Task {task!r}: {parameter} must be a list of names, got the string {names!r}.")
    resolved = [str(name) for name in names]
    if len(resolved) != count:
        raise ConfigError(
            f"Task {task!r}: {parameter} has {len(resolved)} names for {count} outputs; give exactly one "
            f"name per output, or leave it out."
        )
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"Task {task!r}: {parameter} holds duplicate names: {resolved}.")
    return resolved


def require_choice(task: str, parameter: str, value: str, allowed: Sequence[str]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"Task {task!r}: unknown {parameter} {value!r}; allowed: {', '.join(sorted(allowed))}.")
