"""Pydantic validation errors as one :class:`ConfigError` that names every bad key, and the checks of values
no pydantic model describes (a section's extra keys, a method's keyword arguments).

Anything that validates user settings with pydantic (the run config, a dataset's keys, ``data.augment``)
turns the :class:`pydantic.ValidationError` into a :class:`ConfigError` here, so that every such message
reads the same way. This module imports only :mod:`mtlvision.errors` and pydantic, so that any layer may use it.
"""

from __future__ import annotations

import difflib
import inspect
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, PydanticUserError, TypeAdapter, ValidationError

from mtlvision.errors import ConfigError

_MAX_INPUT = 80
"""Longest rendering of a rejected value; longer ones (a whole section, typically) are cut."""


def config_error_from(
    exc: ValidationError,
    prefix: str,
    title: str,
    *,
    allowed: Iterable[str] | None = None,
    model: type[BaseModel] | None = None,
) -> ConfigError:
    """A :class:`ConfigError` with ``title`` on its first line, then one line per problem in ``exc``.

    Each line is ``<prefix>.<key>: <message> (got <value>)``: ``prefix`` is the dotted config key of the
    validated mapping (``"data.augment"``; ``""`` for the whole config), the key is pydantic's location
    dotted after it (the prefix alone, or ``(top level)`` without a prefix, for a problem with the mapping
    as a whole). Unknown keys read ``unknown key``, a value outside a fixed set ``must be one of ...``, a
    validator's ``ValueError`` its own message; a missing key shows no value. ``allowed`` (the keys the
    mapping accepts) is listed after the problems when one of them is an unknown key. An unknown key close to
    a known one (difflib) adds ``; did you mean <prefix>.<key>?``: the known keys are those of the nested
    pydantic ``model`` that was validated, at that key's level, or ``allowed`` for a key at the top. Raise the
    result ``from None``: the pydantic traceback adds nothing for the user.
    """
    allowed = list(allowed) if allowed is not None else None
    errors = exc.errors()
    lines = [
        f"{_key(prefix, error['loc'])}: {_message(error)}{_suggestion(prefix, error, allowed, model)}"
        for error in errors
    ]
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


def _suggestion(prefix: str, error: Any, allowed: list[str] | None, model: type[BaseModel] | None) -> str:
    """``; did you mean <key>?`` for an unknown key close to a known one, else ``""``."""
    if error["type"] != "extra_forbidden" or not error["loc"]:
        return ""
    *parents, unknown = error["loc"]
    if allowed is not None and not parents:
        known = allowed
    else:
        known = _fields_at(model, parents) if model is not None else []
    close = difflib.get_close_matches(str(unknown), known, n=1, cutoff=0.6)
    return f"; did you mean {_key(prefix, (*parents, close[0]))}?" if close else ""


def _members(annotation: Any) -> tuple[Any, ...]:
    """The members of a union (``X | None``), or the annotation alone."""
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def _fields_at(model: type[BaseModel], path: Sequence[int | str]) -> list[str]:
    """The field names of the model reached from ``model`` along ``path`` (mapping keys and list indices
    step into their value type); empty when the path leads to no model."""
    annotation: Any = model
    for part in [*path, None]:
        step = None
        for member in _members(annotation):
            if isinstance(member, type) and issubclass(member, BaseModel):
                if part is None:
                    return list(member.model_fields)
                field = member.model_fields.get(str(part))
                step = field.annotation if field is not None else None
                break
            origin, args = get_origin(member), get_args(member)
            if part is not None and isinstance(origin, type) and args:
                if issubclass(origin, Mapping):
                    step = args[-1]
                    break
                if issubclass(origin, Sequence) and not issubclass(origin, str):
                    step = args[0]
                    break
        if step is None:
            return []
        annotation = step
    return []


def _non_finite(value: Any, key: str) -> list[str]:
    """The dotted keys under ``key`` holding an infinite or NaN float."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [key]
    if isinstance(value, Mapping):
        return [k for name, v in value.items() for k in _non_finite(v, f"{key}.{name}" if key else str(name))]
    if isinstance(value, (list, tuple)):
        return [k for i, v in enumerate(value) for k in _non_finite(v, f"{key}[{i}]")]
    return []


def refuse_non_finite(values: Mapping[str, Any]) -> None:
    """A ValueError naming the dotted keys of ``values`` that hold an infinite or NaN float (for a model
    validator: the ``extra`` keys of a section)."""
    bad = _non_finite(dict(values), "")
    if bad:
        raise ValueError(f"{', '.join(bad)} must be a finite number, not infinite or NaN")


def check_annotated(cls: type, values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Keyword arguments for ``cls`` checked against the annotations of its constructor (infinite and NaN
    numbers refused), each error naming ``prefix.key``; returns them converted to those types. Arguments
    without an annotation pydantic can check are left to ``cls``."""
    try:
        hints = typing.get_type_hints(cls.__init__)  # type: ignore[misc]  # read, never called on the class
    except (NameError, TypeError):  # annotations that cannot be resolved here are left to the method
        hints = {}
    accepted = inspect.signature(cls).parameters
    checked = dict(values)
    for key, value in values.items():
        if key not in hints or key not in accepted:
            continue
        try:
            adapter = TypeAdapter(hints[key], config=ConfigDict(allow_inf_nan=False, arbitrary_types_allowed=True))
            checked[key] = adapter.validate_python(value)
        except PydanticUserError:  # a type pydantic cannot check: left to the method
            pass
        except ValidationError as exc:
            raise config_error_from(exc, f"{prefix}.{key}", "Invalid configuration") from None
    return checked
