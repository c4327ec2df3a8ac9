"""Atomic writes of local files: the one implementation every module that persists a file uses.

A write goes to a temporary file in the destination's directory (named ``.<name>.<random>`` +
:data:`TEMP_SUFFIX`, so listings can hide it with :func:`is_temp_name`), is flushed and fsynced,
then renamed over the destination with ``os.replace``, which POSIX guarantees to be atomic within
one file system: a concurrent reader, or a reader after a crash, sees the old file or the new one,
never half of one. Parent directories are created; on any error the temporary file is removed and
the destination keeps its old content. Standard library only (no boto3, no torch).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "TEMP_SUFFIX",
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "current_umask",
    "is_temp_name",
]

TEMP_SUFFIX = ".metaopt-tmp"


def current_umask() -> int:
    """The process umask, read without changing it (falls back to 0o022 where it cannot be read)."""
    # os.umask() can only be read by setting it, which races with other threads; Linux
    # publishes it in /proc instead.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def is_temp_name(name: str) -> bool:
    """Whether ``name`` (a file name, not a path) is the temporary file of an in-progress atomic write."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary handle to a temp file beside ``path``; on a clean exit fsync it and rename
    it over ``path``. An exception inside the block removes the temp file and leaves ``path``
    as it was."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> Path:
    """Replace the file at ``path`` with ``data`` atomically; returns ``path`` as a ``Path``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"data: got {type(data).__name__}; allowed: bytes, bytearray or memoryview" + (" (use atomic_write_text for str)" if isinstance(data, str) else "")
        )
    with atomic_file(path) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Replace the file at ``path`` with ``text`` (encoded) atomically; returns ``path`` as a ``Path``."""
    if not isinstance(text, str):
        raise TypeError(f"text: got {type(text).__name__}; allowed: str")
    return atomic_write_bytes(path, text.encode(encoding))
