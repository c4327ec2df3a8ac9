"""The learner registry: a name -> the :class:`~metaopt_core.meta.protocol.MetaLearner` that runs it.

The built-in learners (:data:`BUILTIN`, one line each) are imported on first use (each pulls in torch-heavy modules). Other
packages add theirs with the ``metaopt.learners`` entry point group or :func:`register`. A learner
can also be named by its import reference, ``"package.module:LearnerClass"``: that is what a
pipeline hands its steps for a learner that is not built in (see :func:`reference`), because each
step runs in a fresh process (a pod, or a ``kfp.local`` subprocess) that only knows the built-ins.
"""

from __future__ import annotations

import importlib
import threading
from importlib import metadata
from typing import Any

from metaopt_core.meta.protocol import MetaLearner

BUILTIN = {
    "arl": "metaopt_core.meta.arl.learner:ARLLearner",
    "itl": "metaopt_core.meta.itl.learner:ITLLearner",
    "metamd": "metaopt_core.meta.metamd.learner:MetaMDLearner",
    "ml3": "metaopt_core.meta.ml3.learner:ML3Learner",
}
ENTRY_POINT_GROUP = "metaopt.learners"

_learners: dict[str, MetaLearner] = {}
_references: dict[str, str] = {}  # name -> "module:attr" for learners that are not built in
_lock = threading.Lock()


class UnknownLearnerError(ValueError):
    """No learner has that name; the message lists the names there are."""


def _load(ref: str) -> Any:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise UnknownLearnerError(f"learner: got {ref!r}; allowed: a registered name {names()} or 'package.module:LearnerClass'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownLearnerError(f"learner {ref!r}: cannot import {module_name!r} ({exc})") from None
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UnknownLearnerError(f"learner {ref!r}: {module_name!r} has no {attr!r}") from None
    return target() if isinstance(target, type) else target


def _checked(learner: Any, origin: str) -> MetaLearner:
    if not isinstance(learner, MetaLearner):
        missing = [name for name in ("name", "kind", "init", "ask", "evaluate", "tell", "export", "meta_test") if not hasattr(learner, name)]
        raise TypeError(f"learner {origin}: {learner!r} does not implement the MetaLearner protocol (missing {missing})")
    if learner.kind not in ("loss", "optimizer"):
        raise TypeError(f"learner {origin}: kind {learner.kind!r}; allowed: 'loss' or 'optimizer'")
    return learner


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def register(learner: Any, *, replace: bool = False) -> Any:
    """Register a learner (an instance, or a class that is instantiated). Returns what it was
    given, so it works as a class decorator. A second learner under a taken name is an error unless
    ``replace``."""
    instance = _checked(learner() if isinstance(learner, type) else learner, repr(learner))
    cls = type(instance)
    with _lock:
        if instance.name in BUILTIN and not replace:
            raise ValueError(f"learner name {instance.name!r} is a built-in learner's; pick another name")
        known = _learners.get(instance.name)
        if known is not None and type(known) is not cls and not replace:
            raise ValueError(f"learner name {instance.name!r} is taken by {known!r}; pass replace=True to replace it")
        _learners[instance.name] = instance
        if instance.name not in BUILTIN:
            _references[instance.name] = f"{cls.__module__}:{cls.__qualname__}"
    return learner


def unregister(name: str) -> None:
    with _lock:
        _learners.pop(name, None)
        _references.pop(name, None)


def names() -> list[str]:
    """Every learner name known to this process: built-ins, entry points, registered ones."""
    return sorted({*BUILTIN, *_entry_points(), *_learners})


def get(name: str) -> MetaLearner:
    """The learner called ``name`` (a registered name, or ``"package.module:LearnerClass"``)."""
    if not isinstance(name, str) or not name:
        raise UnknownLearnerError(f"learner: got {name!r}; allowed: {names()}")
    with _lock:
        if name in _learners:
            return _learners[name]
    if ":" in name:
        learner = _checked(_load(name), repr(name))
        with _lock:
            _learners.setdefault(learner.name, learner)
            if learner.name not in BUILTIN:
                _references.setdefault(learner.name, name)
        return learner
    ref = BUILTIN.get(name) or _entry_points().get(name)
    if ref is None:
        raise UnknownLearnerError(f"learner: got {name!r}; allowed: {names()} or 'package.module:LearnerClass'")
    learner = _checked(_load(ref), repr(ref))
    if learner.name != name:
        raise TypeError(f"learner {ref!r} is named {learner.name!r}, registered as {name!r}")
    with _lock:
        return _learners.setdefault(name, learner)


def reference(name: str) -> str:
    """What a pipeline step is told to find the learner with: the name of a built-in or entry-point
    learner, else its import reference (the step's process has not run :func:`register`)."""
    learner = get(name)
    if learner.name in BUILTIN or learner.name in _entry_points():
        return learner.name
    with _lock:
        return _references.get(learner.name, learner.name)


__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "UnknownLearnerError", "get", "names", "reference", "register", "unregister"]
