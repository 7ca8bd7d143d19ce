"""Pydantic validation errors as one :class:`ConfigError` that names every bad key.

Anything that validates user settings with pydantic (the run config, a dataset's keys, ``data.augment``)
turns the :class:`pydantic.ValidationError` into a :class:`ConfigError` here, so that every such message
reads the same way. This module imports only :mod:`mtlvision.errors` and pydantic, so that any layer may use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from mtlvision.errors import ConfigError

_MAX_INPUT = 80
"""Longest rendering of a rejected value; longer ones (a whole section, typically) are cut."""


def config_error_from(
    exc: ValidationError, prefix: str, title: str, *, allowed: Iterable[str] | None = None
) -> ConfigError:
    """A :class:`ConfigError` with ``title`` on its first line, then one line per problem in ``exc``.

    Each line is ``<prefix>.<key>: <message> (got <value>)``: ``prefix`` is the dotted config key of the
    validated mapping (``"data.augment"``; ``""`` for the whole config), the key is pydantic's location
    dotted after it (the prefix alone, or ``(top level)`` without a prefix, for a problem with the mapping
    as a whole). Unknown keys read ``unknown key``, a value outside a fixed set ``must be one of ...``, a
    validator's ``ValueError`` its own message; a missing key shows no value. ``allowed`` (the keys the
    mapping accepts) is listed after the problems when one of them is an unknown key. Raise the result
    ``from None``: the pydantic traceback adds nothing for the user.
    """
    errors = exc.errors()
    lines = [f"{_key(prefix, error['loc'])}: {_message(error)}" for error in errors]
    message = f"{title}:\n  " + "\n  ".join(lines)
    if allowed is not None and any(error["type"] == "extra_forbidden" for error in errors):
        message += f"\nAllowed keys: {', '.join(allowed)}."
    return ConfigError(message)


def _key(prefix: str, loc: tuple[int | str, ...]) -> str:
    return ".".join([part for part in [prefix] if part] + [str(part) for part in loc]) or "(top level)"


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        text = "unknown key"
    elif kind == "literal_error":
        text = f"must be one of {error['ctx']['expected']}"
    elif kind == "value_error":
        text = str(error["msg"]).removeprefix("Value error, ")
    else:
        text = str(error["msg"])
    if kind == "missing":
        return text
    shown = repr(error.get("input"))
    if len(shown) > _MAX_INPUT:
        shown = shown[: _MAX_INPUT - 3] + "..."
    return f"{text} (got {shown})"
