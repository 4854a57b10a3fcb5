"""A name -> entry table with one set of rules (timm-style), for every registry semguard has:
attacks, layer presets, model builders.

Rules: a name is registered once; registering the same entry again is a no-op (a module reload),
another entry under a taken name raises unless `overwrite=True`; an unknown name fails listing the
known ones. Built-in entries that are costly to compute can be registered lazily and are built
(and validated) the first time they are asked for.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """dict[str, T] filled by `register`; `registry[name]` raises KeyError, `lookup(name)` ValueError,
    both listing the known names."""

    def __init__(self, kind: str, validate: Callable[[str, T], T] | None = None) -> None:
        super().__init__()
        self.kind = kind  # "attack", "layer preset", ...: the word error messages use
        self._validate = validate
        self._lazy: dict[str, Callable[[], T]] = {}

    def register(self, name: str, entry: T | None = None, *, overwrite: bool = False):
        """Register `entry` under `name` and return it; without `entry`, a decorator."""

        def add(value: T) -> T:
            if not isinstance(name, str) or not name:
                raise ValueError(f"name: expected a non-empty string, got {name!r}")
            value = self._validate(name, value) if self._validate else value
            if name in self and self[name] != value and not overwrite:
                raise ValueError(f"name: {self.kind} {name!r} is already registered; pass overwrite=True")
            self[name] = value
            return value

        return add(entry) if entry is not None else add

    def register_lazy(self, name: str, factory: Callable[[], T]) -> None:
        """`factory()` gives the entry the first time `name` is looked up."""
        self._lazy[name] = factory

    def names(self) -> list[str]:
        return sorted(set(self) | set(self._lazy))

    def lookup(self, name: str) -> T:
        """The entry under `name` (built now if registered lazily); ValueError listing known names."""
        if name not in self and name in self._lazy:
            self.register(name, self._lazy[name]())
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.kind}s: {self.names()}")
        return self[name]

    def __missing__(self, name: str) -> T:
        raise KeyError(f"unknown {self.kind} {name!r}; known {self.kind}s: {self.names()}")
