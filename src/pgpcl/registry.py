"""A tiny name -> object registry, used for methods and datasets."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from pgpcl.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, check: Callable[[str, T], None] | None = None):
        """``check(name, obj)`` raises when ``obj`` cannot serve as a registered item (at import time)."""
        self.kind = kind
        self._items: dict[str, T] = {}
        self._check = check

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            held = self._items.get(name)
            if held is not None and not _same_definition(held, obj):
                raise ConfigError(
                    f"{self.kind} '{name}' is registered twice ({_where(held)} and {_where(obj)}); "
                    "give one of them another name"
                )
            if self._check is not None:
                self._check(name, obj)
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown {self.kind} '{name}'{hint} (choose from: {', '.join(sorted(self._items))}); "
                              f"for a {self.kind} of your own, list its module under imports")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


def _where(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _same_definition(a: object, b: object) -> bool:
    """The same function or class defined again, as when a notebook cell or a reloaded module runs its
    registration a second time: the new definition replaces the old."""
    return a is b or _where(a) == _where(b)

