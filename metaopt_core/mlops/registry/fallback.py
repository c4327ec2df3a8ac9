"""An explicit fallback for a downstream job that must start even before anything was promoted.

``load_loss("models:/itl/production")`` fails with ``NoProductionVersionError`` while no version
of ``itl`` passed the promotion gate: production means "better than what you have for free", and
a rejected or untested version is not silently handed out instead. A job that prefers an
unpromoted version to no job at all says so, and names which one::

    criterion = load_loss("models:/itl/production", fallback="models:/itl/latest")

Only a missing production version falls back; a missing model, a tampered artifact or an
unreachable server still fail. Each fallback warns (:class:`UnpromotedVersionWarning`), naming
both URIs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

from metaopt_core.mlops.registry.common import NoProductionVersionError

T = TypeVar("T")


class UnpromotedVersionWarning(UserWarning):
    """A load fell back to a version that is not in production, as its caller asked."""


def with_fallback(load: Callable[[str], T], uri: str, fallback: str | None) -> T:
    """``load(uri)``, or ``load(fallback)`` with a warning when ``uri`` has no production version
    and the caller named a ``fallback``."""
    try:
        return load(uri)
    except NoProductionVersionError:
        if not fallback:
            raise
    warnings.warn(
        f"{uri}: no version is in production; loading {fallback}, the fallback this job asked for (not promoted: "
        "`metaopt models show` gives the gate's reason)",
        UnpromotedVersionWarning,
        stacklevel=3,
    )
    return load(fallback)


__all__ = ["UnpromotedVersionWarning", "with_fallback"]
