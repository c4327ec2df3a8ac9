"""Bounded retries for MLflow client calls: which errors are transient (a dropped connection, a
timeout, HTTP 429 / 5xx, MLflow's ``TEMPORARILY_UNAVAILABLE`` / ``INTERNAL_ERROR``), and calling
with exponential back-off while they last.

MLflow's REST client retries HTTP 429/5xx itself (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``); what it
then raises (``MlflowException("API request to ... failed ...")``), a connection reset between
its attempts, or a locked SQLite store is what these retries cover. Only calls that are safe to
repeat go through them: tags and params overwrite with the same value, a metric batch is resent
with the same timestamps, artifacts overwrite, terminating a run twice is harmless.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# MLflow error codes (mlflow.protos.databricks_pb2) that say "try again", not "you are wrong".
TRANSIENT_ERROR_CODES = frozenset({"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "ABORTED"})


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all, sleeping ``backoff_s * 2**k`` (at most ``max_backoff_s``) before try k + 2."""

    attempts: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"attempts: got {self.attempts!r}; allowed: an int >= 1")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(f"backoff_s, max_backoff_s: got {self.backoff_s!r}, {self.max_backoff_s!r}; allowed: >= 0")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        return min(self.backoff_s * 2**retry, self.max_backoff_s)


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(attempts=1)


def is_transient(exc: BaseException) -> bool:
    """True for errors a later attempt may not see: connection errors and timeouts (``requests``,
    the standard library), and ``MlflowException`` with HTTP status 429 / 5xx or a transient code."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import requests

        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
    except ImportError:  # pragma: no cover (mlflow depends on requests)
        pass
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        if exc.error_code in TRANSIENT_ERROR_CODES:
            return True
        status = exc.get_http_status_code()
        return status == 429 or status >= 500
    return False


def call_with_retries(
    fn: Callable[..., T],
    *args: Any,
    policy: RetryPolicy = DEFAULT_RETRY,
    sleep: Callable[[float], None] = time.sleep,
    **kwargs: Any,
) -> T:
    """``fn(*args, **kwargs)``, retried under ``policy`` while it raises a transient error; the
    last error (or the first non-transient one) propagates."""
    for retry in range(policy.attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if retry + 1 >= policy.attempts or not is_transient(exc):
                raise
            sleep(policy.delay(retry))
    raise AssertionError("unreachable")  # pragma: no cover


__all__ = ["DEFAULT_RETRY", "NO_RETRY", "RetryPolicy", "TRANSIENT_ERROR_CODES", "call_with_retries", "is_transient"]
