"""config_error_from: one ConfigError naming every bad key of a pydantic ValidationError."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mtlvision.errors import ConfigError
from mtlvision.validation import config_error_from


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")

    depth: int = Field(1, ge=1)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["fast", "slow"] = "fast"
    size: int
    ratio: float = 0.5
    inner: Inner = Field(default_factory=Inner)

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, value: float) -> float:
        if not 0 < value < 1:
            raise ValueError("ratio must lie strictly between 0 and 1")
        return value


def error_for(raw: dict, prefix: str = "section", **kwargs) -> ConfigError:
    with pytest.raises(ValidationError) as info:
        Settings.model_validate(raw)
    return config_error_from(info.value, prefix, "Invalid settings", **kwargs)


def test_every_problem_is_one_line_under_the_title():
    message = str(error_for({"size": 3, "mode": "medium", "colour": "red", "ratio": 2, "inner": {"depth": 0}}))
    lines = message.splitlines()
    assert lines[0] == "Invalid settings:"
    assert "  section.mode: must be one of 'fast' or 'slow' (got 'medium')" in lines
    assert "  section.colour: unknown key (got 'red')" in lines
    assert "  section.ratio: ratio must lie strictly between 0 and 1 (got 2)" in lines
    assert "  section.inner.depth: Input should be greater than or equal to 1 (got 0)" in lines
    assert len(lines) == 5


def test_a_missing_key_shows_no_value_and_an_empty_prefix_adds_no_dot():
    assert str(error_for({}, prefix="")).splitlines()[1] == "  size: Field required"


def test_allowed_keys_are_listed_only_for_an_unknown_key():
    allowed = Settings.model_fields
    assert str(error_for({"size": 1, "colour": 1}, allowed=allowed)).endswith("Allowed keys: mode, size, ratio, inner.")
    assert "Allowed keys" not in str(error_for({"size": 1, "mode": "x"}, allowed=allowed))


def test_a_whole_mapping_at_the_top_level_is_named_and_cut_short():
    with pytest.raises(ValidationError) as info:
        Settings.model_validate(list(range(100)))
    assert str(config_error_from(info.value, "", "Invalid settings")).splitlines()[1].startswith("  (top level): ")
    line = str(config_error_from(info.value, "data", "Invalid settings")).splitlines()[1]
    assert line.startswith("  data: ") and line.endswith("...)") and len(line) < 200


def test_an_unknown_key_gets_the_closest_known_key_of_its_own_level():
    message = str(error_for({"size": 1, "sise": 2, "inner": {"dept": 2}, "colour": 1}, model=Settings))
    assert "  section.sise: unknown key (got 2); did you mean section.size?" in message.splitlines()
    assert "  section.inner.dept: unknown key (got 2); did you mean section.inner.depth?" in message.splitlines()
    assert "  section.colour: unknown key (got 1)" in message.splitlines()  # nothing close
    flat = str(error_for({"size": 1, "rato": 2}, allowed=["size", "ratio"]))
    assert "section.rato: unknown key (got 2); did you mean section.ratio?" in flat


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = "a"


class Holder(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entries: dict[str, Entry] = Field(default_factory=dict)
    items: list[Entry] | None = None


def test_suggestions_step_through_mappings_and_lists():
    with pytest.raises(ValidationError) as info:
        Holder.model_validate({"entries": {"x": {"kinds": 1}}, "items": [{"knd": 2}]})
    message = str(config_error_from(info.value, "data", "Invalid", model=Holder))
    assert "data.entries.x.kinds: unknown key (got 1); did you mean data.entries.x.kind?" in message
    assert "data.items.0.knd: unknown key (got 2); did you mean data.items.0.kind?" in message
