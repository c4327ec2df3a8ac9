"""Tables of named references, imported on first use: the representation table
(:mod:`metaopt_core.losses.families`) and the export kinds (:mod:`metaopt_core.exports`). A table
is a plain dict ``name -> "package.module:Attribute"`` (one line per entry, so adding one is one
line) read through a :class:`LazyTable`, which imports an entry when it is first asked for."""

from __future__ import annotations

import importlib
import threading
from typing import Any, Callable


class LazyTable:
    """``references``: the table (kept, so an entry added to the dict is seen). ``what`` names an
    entry in messages; ``error`` is raised for an unknown name; ``make`` turns the imported
    attribute into the entry (e.g. instantiates a class)."""

    def __init__(self, what: str, references: dict[str, str], error: type[Exception] = ValueError, make: Callable[[Any], Any] | None = None):
        self.what, self.references, self.error, self.make = what, references, error, make
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return sorted(self.references)

    def __contains__(self, name: Any) -> bool:
        return isinstance(name, str) and name in self.references

    def register(self, name: str, reference: str, *, replace: bool = False) -> None:
        """Add an entry: ``reference`` is ``"package.module:Attribute"``."""
        with self._lock:
            known = self.references.get(name)
            if known is not None and known != reference and not replace:
                raise ValueError(f"{self.what} {name!r} is taken by {known}; pass replace=True to replace it")
            self.references[name] = reference
            self._loaded.pop(name, None)

    def get(self, name: Any) -> Any:
        """The entry called ``name`` (``error`` naming the names there are)."""
        with self._lock:
            if name in self._loaded and self.references.get(name) is not None:
                return self._loaded[name]
            reference = self.references.get(name) if isinstance(name, str) else None
        if reference is None:
            raise self.error(f"{self.what}: got {name!r}; allowed: {self.names()}")
        module, _, attribute = reference.partition(":")
        value = getattr(importlib.import_module(module), attribute)
        with self._lock:
            return self._loaded.setdefault(name, self.make(value) if self.make else value)

    def forget(self) -> None:
        """Drop what was imported (an entry replaced in the dict is imported anew)."""
        with self._lock:
            self._loaded.clear()


__all__ = ["LazyTable"]
