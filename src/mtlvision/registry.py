"""A small name -> object registry shared by tasks, balancers, architectures, datasets and backbones."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from mtlvision.errors import UnknownNameError

T = TypeVar("T")

#: what ``mtlvision list`` can list, one registry each
REGISTRY_KINDS = ("tasks", "balancers", "architectures", "backbones", "datasets", "merges")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered object with the one-line description and citation shown by ``mtlvision list``."""

    name: str
    obj: T
    description: str
    citation: str = ""


class Registry(Generic[T]):
    """Maps lower-case names to objects; unknown names raise an error listing the allowed ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, description: str = "", citation: str = "") -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (names are case-insensitive and unique)."""
        key = name.lower()

        def decorate(obj: T) -> T:
            if key in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = description or (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            self._entries[key] = Entry(key, obj, doc, citation)
            return obj

        return decorate

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        key = str(name).lower()
        if key not in self._entries:
            close = difflib.get_close_matches(key, self._entries, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownNameError(f"Unknown {self.kind} {name!r}.{hint} Allowed: {', '.join(sorted(self._entries))}.")
        return self._entries[key]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)
