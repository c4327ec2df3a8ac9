"""The storage errors: every failure is a ``StorageError`` (an ``OSError``) naming the operation,
the URI and, for S3, the error code; a missing object or path is a ``StorageNotFoundError``."""

from __future__ import annotations

import errno


class StorageError(OSError):
    """A storage operation failed.

    Attributes:
        uri: the URI or path the operation was about.
        operation: what was attempted (``read``, ``write``, ``list`` ...).
        code: the S3 error code (``AccessDenied``, ``NoSuchBucket`` ...), the botocore error
            class name for client-side failures, or ``None`` for local file-system errors.
    """

    def __init__(self, message: str, *, uri: str, operation: str, code: str | None = None):
        super().__init__(message)
        self.uri = uri
        self.operation = operation
        self.code = code

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self):  # keyword-only arguments need help to survive pickling
        return (_rebuild_error, (type(self), self.args[0], self.uri, self.operation, self.code))


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The object, bucket or path does not exist."""

    def __init__(self, message: str, *, uri: str, operation: str, code: str | None = None):
        super().__init__(message, uri=uri, operation=operation, code=code)
        self.errno = errno.ENOENT
        self.filename = uri


def _rebuild_error(cls, message, uri, operation, code):
    return cls(message, uri=uri, operation=operation, code=code)


__all__ = ["StorageError", "StorageNotFoundError"]
